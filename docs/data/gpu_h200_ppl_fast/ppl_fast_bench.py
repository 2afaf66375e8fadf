"""task=ppl token by token on the 8B shape (random weights, bf16): tokens/s of the exact stream (the
model's forward per token) against cache.decode=fast and triton (lacache.decode.fast, teacher-forced),
LaCache and StreamingLLM at budget 1024; the perplexity of the first windows compared between paths.
Usage: python ppl_fast_bench.py [--exact-tokens 513] [--fast-tokens 2048]"""
import argparse
import dataclasses

import torch

from lacache.harness import bench
from lacache.tasks.base import RunContext
from lacache.tasks.ppl import PerplexityTask

parser = argparse.ArgumentParser()
parser.add_argument("--exact-tokens", type=int, default=513)
parser.add_argument("--fast-tokens", type=int, default=2048)
cli = parser.parse_args()
args = argparse.Namespace(model="llama3-8b-shape", device="cuda", dtype="bfloat16", attn="sdpa", span=16, overlap=0,
                          compact_every=1, prefill="full", chunk=512)
model = bench.load_model(args)
print(torch.cuda.get_device_name(), torch.__version__, flush=True)


class IdTokenizer:
    """The text is token ids written out: random weights need no real text, only true timings."""

    def __call__(self, text, return_tensors="pt"):
        return type("Encoding", (), {"input_ids": torch.tensor([[int(t) for t in text.split()]])})()


path = "/tmp/ppl_ids.txt"
ids = torch.randint(0, 128000, (cli.fast_tokens,), generator=torch.Generator().manual_seed(0))
open(path, "w").write(" ".join(str(int(i)) for i in ids))
window = 256
for name in ("lacache", "streamingllm"):
    results = {}
    for decode, tokens in (("exact", cli.exact_tokens), ("fast", cli.fast_tokens), ("triton", cli.fast_tokens)):
        policy = dataclasses.replace(bench.make_policy(name, 1024, args), decode=decode)
        task = PerplexityTask(dataset="text_file", path=path, num_tokens=tokens, window=window)
        result = task.run(RunContext(model, IdTokenizer(), policy, model.config, 8192, progress=False))
        results[decode] = result
        print(f"{name:12s} decode={decode:6s} {tokens:5d} tokens: {result.stats['tokens_per_s']:7.1f} tokens/s "
              f"({1000 / result.stats['tokens_per_s']:.2f} ms/token), ppl {result.metrics['ppl']:.1f}, "
              f"entries held max {result.stats['kv_entries_per_layer_max']}", flush=True)
    full_windows = (cli.exact_tokens - 1) // window  # the windows both streams complete
    first = [w["ppl"] for w in results["exact"].curves["ppl_window"]][:full_windows]
    for decode in ("fast", "triton"):
        same = [w["ppl"] for w in results[decode].curves["ppl_window"]][: len(first)]
        print(f"{name:12s} first {full_windows * window} predictions, ppl per {window}-token window: exact {[round(p, 1) for p in first]}, "
              f"{decode} {[round(p, 1) for p in same]}", flush=True)
