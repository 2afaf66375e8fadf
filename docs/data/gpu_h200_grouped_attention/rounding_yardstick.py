"""How large is 'up to rounding' on the 8B shape (random weights, bf16, 32K prompt)? With the full cache
every chunking computes the same thing, so transformers' own 512- against 2048-token chunked prefill
differ by rounding alone: the yardstick. Against it: the same 512-token prefill through
lacache.decode.grouped_attention. Last position's logits; largest difference and argmax.
Usage: python rounding_yardstick.py"""
import argparse

import torch

from lacache.harness import bench
from lacache.compat import cache_kwarg
from lacache.decode.grouped_attention import grouped_attention

args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="chunked", chunk=512)
model = bench.load_model(args)
prompt = torch.randint(0, 128000, (1, 32768), device="cuda", generator=torch.Generator("cuda").manual_seed(0))


def last_logits(name, chunk, grouped):
    policy = bench.make_policy(name, 4096, argparse.Namespace(**{**vars(args), "chunk": chunk}))
    cache = policy.make_cache(model, prompt_length=prompt.shape[1])
    with torch.inference_mode(), grouped_attention(model, enabled=grouped):
        for start in range(0, prompt.shape[1], chunk):
            logits = model(prompt[:, start : start + chunk], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits
    return logits[0, -1].float()


for name in ("full", "lacache"):
    stock = last_logits(name, 512, False)
    pairs = {"grouped 512 vs transformers 512": last_logits(name, 512, True)}
    if name == "full":
        pairs["transformers 2048 vs transformers 512 (rounding alone)"] = last_logits(name, 2048, False)
    for label, other in pairs.items():
        print(f"{name:8s} {label:55s}: largest logit difference {(other - stock).abs().max().item():.4f}, "
              f"logits' std {stock.std().item():.3f}, same argmax {bool(other.argmax() == stock.argmax())}", flush=True)
