"""Where a chunked prefill waits on the GPU: sync points (torch sync debug mode) and timings."""
import argparse, collections, time, traceback, warnings
import torch
from lacache.harness import bench

args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
counts = collections.Counter()
def show(message, category, filename, lineno, file=None, line=None):
    stack = [f for f in traceback.extract_stack()[:-2] if any(s in f.filename for s in ("/lacache/", "/baselines/", "transformers"))]
    counts["\n   ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}: {f.line}" for f in stack[-5:])] += 1
for name in ("lacache", "streamingllm"):
    policy = bench.make_policy(name, 4096, args)
    prompt = torch.randint(0, 128000, (1, 8192), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        bench.prefill(model, policy, prompt)
        torch.cuda.synchronize()
        counts.clear()
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        bench.prefill(model, policy, prompt)
        torch.cuda.set_sync_debug_mode(0)
    print(f"== {name}: {sum(counts.values())} syncs in a 16-chunk prefill", flush=True)
    for k, v in counts.most_common(12):
        print(f"{v:4d} x {k}\n", flush=True)
for name in ("lacache", "streamingllm", "full"):
    for chunk in (512, 2048, 0):
        a = argparse.Namespace(**{**vars(args), "prefill": "chunked" if chunk else "full", "chunk": chunk or 512})
        policy = bench.make_policy(name, 4096, a)
        prompt = torch.randint(0, 128000, (1, 32768), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.inference_mode():
            bench.prefill(model, policy, prompt[:, :4096])
            torch.cuda.synchronize(); t = time.perf_counter()
            bench.prefill(model, policy, prompt)
            torch.cuda.synchronize(); s = time.perf_counter() - t
        print(f"{name:12s} chunk {chunk or 'full':>5}: {32768 / s:8.0f} tok/s ({s:.2f} s)", flush=True)
        if chunk == 512 and name == "lacache":
            from torch.profiler import ProfilerActivity, profile
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                bench.prefill(model, policy, prompt[:, :8192])
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
