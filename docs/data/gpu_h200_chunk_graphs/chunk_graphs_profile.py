"""Where a 512-token chunk's time goes at 32K, budget 4096, on the 8B shape: per steady-state chunk, the
host's time to enqueue it and the GPU's time to run it (CUDA events), eager and graphed, against the
one-pass prefill; then the top kernels of 8 graphed chunks. Usage: python chunk_graphs_profile.py"""
import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lacache.harness import bench
from lacache.decode.chunk_graphs import ChunkGraphs
from lacache.compat import cache_kwarg

args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
prompt = torch.randint(0, 128000, (1, 32768), device="cuda", generator=torch.Generator("cuda").manual_seed(0))


def chunks(name, graphs, profiled=0):
    cache = bench.make_policy(name, 4096, args).make_cache(model, prompt_length=prompt.shape[1])
    host, events = [], []
    context = ChunkGraphs(model, cache) if graphs else None
    torch.cuda.synchronize()
    wall = time.perf_counter()
    with (context if graphs else torch.inference_mode()):
        for start in range(0, prompt.shape[1], 512):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            t = time.perf_counter()
            model(prompt[:, start : start + 512], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
            host.append(time.perf_counter() - t)
            end.record()
            events.append((begin, end))
            if profiled and start == 16 * 512:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for s in range(start + 512, start + 512 * (profiled + 1), 512):
                        model(prompt[:, s : s + 512], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)
                return
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    gpu = [b.elapsed_time(e) for b, e in events]
    steady = slice(12, None)
    print(f"{name:12s} {'graphs' if graphs else 'eager ':6}: wall {wall:.3f} s; steady chunk: host {1000 * statistics.median(host[steady]):.2f} ms, "
          f"GPU {statistics.median(gpu[steady]):.2f} ms; fill chunks 0-11: GPU {sum(gpu[:12]):.0f} ms, host {1000 * sum(host[:12]):.0f} ms", flush=True)


with torch.inference_mode():
    for _ in range(2):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        bench.prefill(model, bench.make_policy("lacache", 4096, argparse.Namespace(**{**vars(args), "prefill": "full"})), prompt)
        end.record()
        torch.cuda.synchronize()
        print(f"one pass: GPU {begin.elapsed_time(end):.0f} ms", flush=True)
    for name in ("lacache", "streamingllm"):
        for graphs in (False, True, False, True):
            chunks(name, graphs)
    chunks("lacache", True, profiled=8)
