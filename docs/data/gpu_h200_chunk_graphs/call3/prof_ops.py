"""Steady 512-token chunks (LaCache 4096, 16K prompt) against a 4096-token one-pass forward: aten ops by self CUDA time, with shapes (call 3)."""
import argparse, torch
from torch.profiler import ProfilerActivity, profile
from lacache.harness import bench
from lacache.compat import cache_kwarg
args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0, compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
prompt = torch.randint(0, 128000, (1, 16384), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
with torch.inference_mode():
    for full in (True, False):
        if full:
            x = prompt[:, :4096]
            model(x, use_cache=False, logits_to_keep=1); torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                model(x, use_cache=False, logits_to_keep=1); model(x, use_cache=False, logits_to_keep=1); torch.cuda.synchronize()
            print("ONE PASS of 4096 tokens x2 (no cache)")
        else:
            cache = bench.make_policy("lacache", 4096, args).make_cache(model, prompt_length=16384)
            for s in range(0, 12 * 512, 512):
                model(prompt[:, s:s+512], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                for s in range(12 * 512, 28 * 512, 512):
                    model(prompt[:, s:s+512], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
            print("16 STEADY CHUNKS of 512, lacache 4096")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=110), flush=True)
