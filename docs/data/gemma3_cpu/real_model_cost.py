"""Cost of one RULER-2K/4K sample on Gemma 3 270M through the exact path, per policy, on the CPU.

Measures the prefill and the decode steps of one ``niah_single_1`` prompt (base model, plain template)
with wall time and this process's CPU time (on a shared machine the CPU time is the cost, the wall
time what the load made of it). One torch thread.

    PYTHONPATH=. python docs/data/gemma3_cpu/real_model_cost.py --context 2048 --steps 16
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from lacache import models
from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.compat import cache_kwarg
from lacache.ladder_cache import LaCachePolicy
from lacache.tasks.ruler import RulerTask


def clocks():
    return time.perf_counter(), time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = models.ModelSpec(**OmegaConf.to_container(OmegaConf.load("configs/model/gemma3-270m.yaml")))
    model, tokenizer = models.load(spec)
    task = RulerTask(tasks=["niah_single_1"], context_length=args.context, num_samples=1, chat_template=False)
    (_, prompt_ids), = task.samples(tokenizer)["niah_single_1"]
    prompt = torch.tensor([prompt_ids] * args.batch)
    print(f"torch {torch.__version__}, 1 thread, prompt {prompt.shape[1]} tokens, batch {args.batch}, {args.steps} steps")
    print("| policy | prefill wall s | prefill CPU s | decode wall ms/step | decode CPU ms/step |")
    print("|---|---|---|---|---|")
    for policy in (FullCachePolicy(), StreamingLLMPolicy(budget=0.5), LaCachePolicy(budget=0.5, span=2, overlap=0),
                   H2OPolicy(budget=0.5), SnapKVPolicy(budget=0.5)):
        with torch.inference_mode():
            wall, cpu = clocks()
            cache = policy.make_cache(model, prompt_length=prompt.shape[1])
            logits = model(prompt, **cache_kwarg(model, cache), logits_to_keep=1).logits
            wall2, cpu2 = clocks()
            token = logits[:, -1:].argmax(-1)
            for _ in range(args.steps):
                token = model(token, **cache_kwarg(model, cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
            wall3, cpu3 = clocks()
        print(f"| {policy.name} | {wall2 - wall:.1f} | {cpu2 - cpu:.1f} | {(wall3 - wall2) / args.steps * 1e3:.0f} | "
              f"{(cpu3 - cpu2) / args.steps * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
