"""Why SnapKV and PyramidKV break down on the 16K PPL stream while TOVA (original positions too) does not:
stream the essays token by token through one policy at budget 256 (as docs/data/ppl) and, every 512
tokens, record how far back the kept keys reach. Usage: python kept_distance.py POLICY TOKENS OUT.json"""

import json
import math
import sys
import time

import torch

from lacache import api
from lacache.assets import essays_text
from lacache.compat import cache_kwarg

SETTINGS = {"tova": {}, "snapkv": {"window": 32, "kernel": 7, "pooling": "max"},
            "pyramidkv": {"window": 32, "kernel": 7, "pooling": "max", "beta": 20}}

name, tokens, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)  # two policies side by side on the 2-core CPU
model, tokenizer = api.load_model("smollm2-135m")
policy = api.make_policy(name, budget=256, **SETTINGS[name])
ids = torch.tensor(tokenizer(essays_text())["input_ids"][:tokens])[None]
cache = policy.make_cache(model, prompt_length=tokens)
nll, rows, started = [], [], time.time()
with torch.inference_mode():
    for t in range(tokens - 1):
        logits = model(ids[:, t : t + 1], **cache_kwarg(model, cache), use_cache=True).logits[0, -1].float()
        nll.append(-torch.log_softmax(logits, -1)[ids[0, t + 1]].item())
        if (t + 1) % 512 == 0:
            kept = cache.kept_positions()  # [layers, 1, heads, slots], -1 beyond a layer's length
            valid = kept >= 0
            distance = (t + 1) - kept  # the query sits at the number of tokens seen
            far = lambda d: ((distance > d) & valid).sum(dim=(1, 2, 3)).float() / valid[:, 0, 0].sum(-1) / kept.shape[2]  # noqa: E731
            rows.append({"seen": t + 1, "ppl_last_1024": math.exp(sum(nll[-1024:]) / len(nll[-1024:])),
                         "oldest_kept": int(kept.masked_fill(~valid, 1 << 30).min()),
                         "layers_holding_position_0": int(((kept == 0) & valid).any(-1).any(-1).any(-1).sum()),
                         "share_farther_than_8192": far(8192).mean().item(),
                         "share_farther_than_11264": far(11264).mean().item(),
                         "layers_with_keys_farther_than_11264": int((far(11264) > 0).sum()),
                         "elapsed_s": round(time.time() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
json.dump({"policy": name, "budget": 256, "settings": SETTINGS[name], "tokens": tokens, "checkpoints": rows},
          open(out, "w"), indent=1)
