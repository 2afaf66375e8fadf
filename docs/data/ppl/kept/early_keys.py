"""Which early tokens (positions < 64) SnapKV and TOVA keep after streaming the essays token by token at
budget 256 (docs/RESULTS.md, streaming PPL): per layer, the set held by any head, counted over layers.
Usage: python early_keys.py POLICY TOKENS"""
import sys
from collections import Counter

import torch

from lacache import api
from lacache.assets import essays_text
from lacache.compat import cache_kwarg
name, tokens = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
S = {"tova": {}, "snapkv": {"window": 32, "kernel": 7, "pooling": "max"}}
model, tok = api.load_model("smollm2-135m")
policy = api.make_policy(name, budget=256, **S[name])
ids = torch.tensor(tok(essays_text())["input_ids"][:tokens])[None]
cache = policy.make_cache(model, prompt_length=tokens)
with torch.inference_mode():
    for t in range(tokens):
        model(ids[:, t:t+1], **cache_kwarg(model, cache), use_cache=True)
kept = cache.kept_positions()[:, 0]  # [layers, heads, slots]
c = Counter()
for layer in range(kept.shape[0]):
    early = sorted(set(int(p) for p in kept[layer].flatten() if 0 <= int(p) < 64))
    c[tuple(early)] += 1
print(name, tokens, dict(c))
