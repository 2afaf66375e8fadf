"""Speed and memory of every cache policy, side by side in one process (``make bench``).

For each policy x budget x context length: prefill a random prompt, then decode ``--steps``
tokens greedily through the policy's cache, and record prefill tokens/s, decode ms/token,
compaction ms/step (the cache's own work, timed with device syncs around it), peak KV bytes and
peak process/GPU memory. Each point becomes a record in ``runs/records`` like any other run.

    python -m lacache.bench --model smollm2-135m --contexts 1024 4096 --budgets 256 1024
    python -m lacache.bench --model llama3-8b-shape --device cuda --dtype bfloat16 --contexts 2048 32768
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lacache import records
from lacache.kvcache import CompactingCache
from lacache.measure import device_peak_bytes, peak_rss_bytes, reset_device_peak, sync

SHAPES = {  # random-weight models: no download needed
    "llama3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0),
    "tiny-shape": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=65536),
}


def policies(names: list[str], budget: int, args) -> list:
    from baselines.full import FullCachePolicy
    from baselines.h2o import H2OPolicy
    from baselines.streamingllm import StreamingLLMPolicy
    from lacache.ladder_cache import LaCachePolicy

    made = {
        "full": lambda: FullCachePolicy(prefill=args.prefill, prefill_chunk=args.chunk),
        "streamingllm": lambda: StreamingLLMPolicy(budget=budget, prefill=args.prefill, prefill_chunk=args.chunk),
        "h2o": lambda: H2OPolicy(budget=budget, prefill=args.prefill, prefill_chunk=args.chunk),
        "lacache": lambda: LaCachePolicy(budget=budget, span=args.span, overlap=args.overlap, sink=4,
                                         compact_every=args.compact_every, prefill=args.prefill, prefill_chunk=args.chunk),
    }
    unknown = sorted(set(names) - set(made))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; valid: {sorted(made)}")
    return [made[name]() for name in names]


def load_model(args):
    if args.model in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**SHAPES[args.model])
        config._attn_implementation = args.attn
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
        return model.eval()
    from omegaconf import OmegaConf

    from lacache import models

    spec = models.ModelSpec(**OmegaConf.to_container(OmegaConf.load(f"configs/model/{args.model}.yaml")))
    spec.device, spec.dtype, spec.attn_implementation = args.device, args.dtype, args.attn
    return models.load(spec)[0]


class CompactionTimer:
    """Wraps a compacting cache's plan/apply with device-synchronised timers."""

    def __init__(self, cache: CompactingCache, device):
        self.seconds = 0.0
        for name in ("_apply", "plan"):
            original = getattr(cache, name)

            def timed(*a, _original=original, **kw):
                sync(device)
                start = time.perf_counter()
                out = _original(*a, **kw)
                sync(device)
                self.seconds += time.perf_counter() - start
                return out

            setattr(cache, name, timed)


def measure(model, policy, context: int, steps: int, device, timed: bool) -> dict:
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context), device=device, generator=torch.Generator(device).manual_seed(0))
    cache = policy.make_cache(model, prompt_length=context)
    timer = CompactionTimer(cache, device) if timed and isinstance(cache, CompactingCache) else None
    reset_device_peak(device)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        offset = 0
        for size in policy.prefill_chunks(context):
            logits = model(prompt[:, offset : offset + size], past_key_values=cache, use_cache=True).logits[:, -1]
            offset += size
        sync(device)
        prefill_s = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        step_times = []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            step_times.append(time.perf_counter() - start)
    warm = step_times[min(5, steps // 4) :]
    stats = cache.stats() if hasattr(cache, "stats") else {}
    out = {
        "prefill_tokens_per_s": context / prefill_s,
        "decode_ms_per_token": 1000 * statistics.median(warm),
        "decode_ms_per_token_mean": 1000 * statistics.mean(warm),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_device_bytes": device_peak_bytes(device),
        **stats,
    }
    if timer is not None:
        out["compaction_ms_per_step"] = 1000 * timer.seconds / (steps + len(policy.prefill_chunks(context)))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help=f"configs/model/<name> or a random shape: {sorted(SHAPES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--policies", nargs="+", default=["full", "streamingllm", "h2o", "lacache"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--span", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--compact-every", type=int, default=1)
    parser.add_argument("--prefill", default="full", choices=["full", "chunked"])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = load_model(args)
    env = records.environment()
    print(f"{'policy':>12} {'budget':>7} {'context':>8} {'prefill tok/s':>14} {'decode ms':>10} {'compact ms':>11} {'KV MiB':>8}")
    for context in args.contexts:
        for budget in args.budgets:
            for policy in policies(args.policies, budget, args):
                if policy.name == "full" and budget != args.budgets[0]:
                    continue  # the full cache has no budget: measure it once per context
                policy.prepare_model(model)
                untimed = measure(model, policy, context, args.steps, device, timed=False)
                timed = measure(model, policy, context, max(16, args.steps // 2), device, timed=True)
                result = {**untimed, "compaction_ms_per_step": timed.get("compaction_ms_per_step")}
                ids = {"model": args.model, **policy.describe(), "task": "bench", "context": context, "prefill": args.prefill,
                       "device": env["cuda_device"] if device.type == "cuda" else env["platform"], "dtype": args.dtype}
                if policy.name == "full":
                    ids["budget"] = None
                key = records.config_key({**ids, "steps": args.steps, "compact_every": args.compact_every})
                records.write_record(args.runs_dir, {"schema": records.SCHEMA, "key": key, "status": "ok", "ids": ids,
                                                     "config": vars(args), "metrics": {}, "stats": result, "env": env})
                compact = result["compaction_ms_per_step"]
                print(f"{policy.name:>12} {str(ids['budget']):>7} {context:>8} {result['prefill_tokens_per_s']:>14.0f} "
                      f"{result['decode_ms_per_token']:>10.2f} {compact if compact is None else round(compact, 3)!s:>11} "
                      f"{result['kv_bytes_max'] / 2**20:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
