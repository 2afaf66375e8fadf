"""Masked grouped-query attention without repeat_kv (lacache.decode.grouped_attention) on the 8B shape, bf16:
1. one layer's attention for a 512-token chunk over 4,096 held slots: transformers' SDPA path
   (repeat_kv + masked SDPA), lacache's packed path (a mask tensor), lacache's path for the chunk's
   lower-right causal bias, and torch's SDPA called with that bias directly;
2. chunked prefill of a 32K prompt, budget 4096, tokens/s against the one-pass prefill, with and
   without chunk graphs and grouped attention, rounds in one process;
3. graphed vs eager 512-token prefill under grouped attention bit for bit, and grouped vs
   transformers' attention (largest logit difference, same argmax).
Usage: python grouped_bench.py [--context 32768] [--rounds 2]"""
import argparse
import time
from types import SimpleNamespace

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lacache.harness import bench
from lacache.decode.chunk_graphs import ChunkGraphs
from lacache.compat import cache_kwarg
from lacache.decode.grouped_attention import grouped_attention, grouped_sdpa_attention

parser = argparse.ArgumentParser()
parser.add_argument("--context", type=int, default=32768)
parser.add_argument("--rounds", type=int, default=2)
cli = parser.parse_args()
print(torch.cuda.get_device_name(), torch.__version__, flush=True)

# ---------------------------------------------------------------- 1. one layer's attention
generator = torch.Generator("cuda").manual_seed(0)
rows, held = 512, 4096
query = torch.randn(1, rows, 32, 128, device="cuda", generator=generator).transpose(1, 2).bfloat16()
key = torch.randn(1, 8, held + rows, 128, device="cuda", generator=generator).bfloat16()
value = torch.randn(1, 8, held + rows, 128, device="cuda", generator=generator).bfloat16()
mask = torch.ones(rows, held + rows, dtype=torch.bool, device="cuda").tril(held)[None, None]
module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
scale = 128 ** -0.5
ways = {
    "transformers sdpa (repeat_kv)": lambda: sdpa_attention_forward(module, query, key, value, mask, scaling=scale)[0],
    "lacache grouped, mask (packed)": lambda: grouped_sdpa_attention(module, query, key, value, mask, scaling=scale)[0],
    "lacache grouped, lower-right bias": lambda: grouped_sdpa_attention(module, query, key, value, causal_lower_right(rows, held + rows),
                                                                         scaling=scale)[0],
    "torch sdpa, lower-right bias": lambda: torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_lower_right(rows, held + rows), scale=scale, enable_gqa=True).transpose(1, 2),
}
reference = torch.nn.functional.scaled_dot_product_attention(
    query.float(), key.float().repeat_interleave(4, 1), value.float().repeat_interleave(4, 1), attn_mask=mask, scale=scale).transpose(1, 2)
with torch.inference_mode():
    for name, way in ways.items():
        try:
            out = way()
        except RuntimeError as error:
            print(f"{name:32s} unavailable: {str(error)[:200]}", flush=True)
            continue
        for _ in range(5):
            out = way()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            way()
        end.record()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            way()
            torch.cuda.synchronize()
        kernels = sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
        print(f"{name:32s} {start.elapsed_time(end) * 10:7.1f} us/layer  max err vs fp32 "
              f"{(out.float() - reference).abs().max().item():.4f}  kernels: {kernels}", flush=True)

# ---------------------------------------------------------------- 2. chunked prefill rates
args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
prompt = torch.randint(0, 128000, (1, cli.context), device="cuda", generator=torch.Generator("cuda").manual_seed(0))


def policy_for(name, chunk):
    return bench.make_policy(name, 4096, argparse.Namespace(**{**vars(args), "prefill": "chunked" if chunk else "full",
                                                               "chunk": chunk or 512}))


def rate(name, chunk, graphs, grouped):
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, _, replays = bench.prefill(model, policy_for(name, chunk), prompt, graphs=graphs, grouped=grouped)
    torch.cuda.synchronize()
    return prompt.shape[1] / (time.perf_counter() - start), replays


with torch.inference_mode():
    for name in ("lacache", "streamingllm"):
        bench.prefill(model, policy_for(name, 512), prompt[:, :8192], graphs=True, grouped=True)  # warm-up
    for round_ in range(1, cli.rounds + 1):
        for name in ("lacache", "streamingllm"):
            full, _ = rate(name, 0, False, False)
            print(f"round {round_} {name:12s} one pass: {full:8.0f} tok/s", flush=True)
            for chunk in (512, 2048):
                for graphs, grouped in ((False, False), (True, False), (False, True), (True, True)):
                    value, replays = rate(name, chunk, graphs, grouped)
                    label = f"{'graphs' if graphs else 'eager '} {'grouped' if grouped else 'sdpa   '}"
                    print(f"round {round_} {name:12s} chunk {chunk:>5} {label}: {value:8.0f} tok/s "
                          f"({value / full:.2f}x of one pass; {replays} replays)", flush=True)

# ---------------------------------------------------------------- 3. equality
for name in ("lacache", "streamingllm"):
    results = []
    for graphs, grouped in ((False, False), (False, True), (True, True)):
        cache = policy_for(name, 512).make_cache(model, prompt_length=prompt.shape[1])
        context = ChunkGraphs(model, cache) if graphs else None
        with torch.inference_mode(), grouped_attention(model, enabled=grouped):
            with (context if graphs else torch.inference_mode()):
                for start in range(0, prompt.shape[1], 512):
                    logits = model(prompt[:, start : start + 512], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits
        results.append((logits, cache, context))
    (stock, _, _), (want, eager, _), (got, graphed, context) = results
    same = torch.equal(got, want) and all(
        torch.equal(getattr(graphed, b)[:, :, :, : graphed.length], getattr(eager, b)[:, :, :, : eager.length])
        for b in ("raw_keys", "values", "positions"))
    print(f"{name}: graphed grouped 512-token prefill of {prompt.shape[1]} tokens bit-equal to eager grouped: {same} "
          f"({context.captures} capture, {context.replays} replays); grouped vs transformers' attention: largest logit "
          f"difference {(want.float() - stock.float()).abs().max().item():.4f} (logits' std {stock.float().std().item():.3f}), "
          f"same argmax: {torch.equal(want.argmax(-1), stock.argmax(-1))}", flush=True)
