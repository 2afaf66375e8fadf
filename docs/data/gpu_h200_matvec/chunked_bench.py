"""Prefill tokens/s at 32K on the 8B shape, budget 4096: LaCache, StreamingLLM and the full cache, in
512- and 2048-token chunks and in one pass, two rounds in one process; then a profile of StreamingLLM's
512-token chunked prefill. Usage: python chunked_bench.py"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lacache.harness import bench

args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
prompt = torch.randint(0, 128000, (1, 32768), device="cuda", generator=torch.Generator("cuda").manual_seed(0))


def policy_for(name, chunk):
    return bench.make_policy(name, 4096, argparse.Namespace(**{**vars(args), "prefill": "chunked" if chunk else "full",
                                                               "chunk": chunk or 512}))


with torch.inference_mode():
    for name in ("lacache", "streamingllm", "full"):
        bench.prefill(model, policy_for(name, 512), prompt[:, :4096])  # warm-up
    for round_ in (1, 2):
        for name in ("lacache", "streamingllm", "full"):
            full = None
            for chunk in (0, 512, 2048):
                torch.cuda.synchronize()
                start = time.perf_counter()
                bench.prefill(model, policy_for(name, chunk), prompt)
                torch.cuda.synchronize()
                rate = 32768 / (time.perf_counter() - start)
                full = full or rate
                print(f"round {round_} {name:12s} chunk {chunk or 'full':>5}: {rate:8.0f} tok/s ({rate / full:.2f}x of full)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench.prefill(model, policy_for("streamingllm", 512), prompt[:, :8192])
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), flush=True)
