"""Cost of the exact decode path on Gemma 3's layer structure, per policy, on the CPU.

A random-weight model with Gemma 3 270M's layers (18: 15 sliding-window, 3 global; 4 query heads,
1 KV head of 256 dims) but a 64-wide residual stream and a 256-token vocabulary: its step time is
almost all host work (Python, dispatch, the cache's bookkeeping), the part of a small model's exact
decode step that a GPU does not shorten. Prompt of ``--prompt`` tokens, budget 50%, ``--steps``
greedy steps, batch 1 and ``--batch``.

    PYTHONPATH=. python docs/data/gemma3_cpu/exact_step_cost.py --prompt 2048 --steps 32 --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.pyramidkv import PyramidKVPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.baselines.tova import TOVAPolicy
from lacache.compat import cache_kwarg
from lacache.ladder_cache import LaCachePolicy


def proxy_model() -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def measure(model, policy, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill CPU s, decode CPU ms per step) for one prompt batch through a fresh cache: this process's CPU
    time, which a shared machine's load does not inflate as it does wall time."""
    with torch.inference_mode():
        start = time.process_time()
        cache = policy.make_cache(model, prompt_length=prompt.shape[1])
        logits = model(prompt, **cache_kwarg(model, cache), logits_to_keep=1).logits
        prefill = time.process_time() - start
        token = logits[:, -1:].argmax(-1)
        start = time.process_time()
        for _ in range(steps):
            token = model(token, **cache_kwarg(model, cache)).logits[:, -1:].argmax(-1)
        return prefill, (time.process_time() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = proxy_model()
    policies = {
        "full": FullCachePolicy(), "streamingllm": StreamingLLMPolicy(budget=0.5), "h2o": H2OPolicy(budget=0.5),
        "snapkv": SnapKVPolicy(budget=0.5), "tova": TOVAPolicy(budget=0.5), "pyramidkv": PyramidKVPolicy(budget=0.5),
        "lacache S=2": LaCachePolicy(budget=0.5, span=2, overlap=0, sink=4),
    }
    print(f"torch {torch.__version__}, 1 thread, prompt {args.prompt}, {args.steps} steps")
    print("| policy | batch | prefill CPU s | decode CPU ms/step |")
    print("|---|---|---|---|")
    for batch in (1, args.batch):
        prompt = torch.randint(0, 256, (batch, args.prompt), generator=torch.Generator().manual_seed(1))
        for name, policy in policies.items():
            measure(model, policy, prompt[:, :256], 2)  # warm-up
            prefill, step = measure(model, policy, prompt, args.steps)
            print(f"| {name} | {batch} | {prefill:.2f} | {step:.1f} |", flush=True)


if __name__ == "__main__":
    main()
