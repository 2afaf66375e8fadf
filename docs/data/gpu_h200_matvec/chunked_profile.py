"""Profile one 8K chunked (512) prefill of StreamingLLM 4096 on the 8B shape."""
import argparse, time
import torch
from torch.profiler import ProfilerActivity, profile
from lacache.harness import bench

args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
prompt = torch.randint(0, 128000, (1, 8192), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
for name in ("streamingllm", "lacache"):
    policy = bench.make_policy(name, 4096, args)
    with torch.inference_mode():
        bench.prefill(model, policy, prompt)
        torch.cuda.synchronize(); t = time.perf_counter()
        bench.prefill(model, policy, prompt)
        torch.cuda.synchronize(); print(name, "8K chunked 512:", f"{time.perf_counter() - t:.3f} s", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            bench.prefill(model, policy, prompt)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14), flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), flush=True)
