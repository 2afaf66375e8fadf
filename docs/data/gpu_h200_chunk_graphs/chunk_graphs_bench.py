"""Chunked prefill at 32K on the 8B shape, budget 4096, with and without the middle layers' CUDA graphs
(lacache.decode.chunk_graphs): prefill tokens/s against the one-pass prefill, rounds in one process; then
the graphed and the eager 512-token prefill compared bit for bit (first token's logits and every cache
slot). Usage: python chunk_graphs_bench.py [--context 32768] [--rounds 2]"""
import argparse
import time

import torch

from lacache.harness import bench
from lacache.compat import cache_kwarg
from lacache.decode.chunk_graphs import ChunkGraphs

parser = argparse.ArgumentParser()
parser.add_argument("--context", type=int, default=32768)
parser.add_argument("--rounds", type=int, default=2)
cli = parser.parse_args()
args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
prompt = torch.randint(0, 128000, (1, cli.context), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
print(torch.cuda.get_device_name(), torch.__version__, flush=True)


def policy_for(name, chunk):
    return bench.make_policy(name, 4096, argparse.Namespace(**{**vars(args), "prefill": "chunked" if chunk else "full",
                                                               "chunk": chunk or 512}))


def rate(name, chunk, graphs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, _, replays = bench.prefill(model, policy_for(name, chunk), prompt, graphs=graphs)
    torch.cuda.synchronize()
    return prompt.shape[1] / (time.perf_counter() - start), replays


with torch.inference_mode():
    for name in ("lacache", "streamingllm"):
        bench.prefill(model, policy_for(name, 512), prompt[:, :8192], graphs=True)  # warm-up
    for round_ in range(1, cli.rounds + 1):
        for name in ("lacache", "streamingllm"):
            full, _ = rate(name, 0, False)
            print(f"round {round_} {name:12s} one pass: {full:8.0f} tok/s", flush=True)
            for chunk in (512, 2048):
                for graphs in (False, True):
                    value, replays = rate(name, chunk, graphs)
                    print(f"round {round_} {name:12s} chunk {chunk:>5} {'graphs' if graphs else 'eager ':6}: {value:8.0f} tok/s "
                          f"({value / full:.2f}x of one pass; {replays} replays)", flush=True)

    for name in ("lacache", "streamingllm"):
        results = []
        for graphs in (False, True):
            cache = policy_for(name, 512).make_cache(model, prompt_length=prompt.shape[1])
            context = ChunkGraphs(model, cache) if graphs else None
            with (context if graphs else torch.inference_mode()):
                for start in range(0, prompt.shape[1], 512):
                    logits = model(prompt[:, start : start + 512], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits
            results.append((logits, cache, context))
        (want, eager, _), (got, graphed, context) = results
        same = torch.equal(got, want) and all(
            torch.equal(getattr(graphed, b)[:, :, :, : graphed.length], getattr(eager, b)[:, :, :, : eager.length])
            for b in ("raw_keys", "values", "positions"))
        print(f"{name}: graphed 512-token prefill of {prompt.shape[1]} tokens bit-equal to eager: {same} "
              f"({context.captures} capture, {context.replays} replays)", flush=True)
