"""Speed and memory of every cache policy, side by side in one process (``make bench``).

For each context length x budget x policy x batch size x decode path: prefill a random prompt,
then decode ``--steps`` tokens greedily, and record prefill tokens/s, decode ms/token,
compaction ms/step, peak KV bytes and peak process/GPU memory. Each point is a record in
``runs/records`` like any other run. Policies are built from ``configs/cache/<name>.yaml`` (the
same defaults as ``run.py``), with ``--budgets``/``--span``/... overriding.

Decode paths: ``eager`` runs the model's forward per token on the exact caches (every policy);
``graph`` runs :mod:`lacache.decode.fast` (full, StreamingLLM, LaCache; H2O, TOVA, SnapKV, PyramidKV
through :mod:`lacache.decode.eviction`, whose eviction is part of the step), CUDA-graph captured on
a GPU; ``fused`` is ``graph`` with fused projections and elementwise chains
(:class:`lacache.decode.fused.FusedStep`); ``triton`` (CUDA) is ``fused`` with every per-layer step
a Triton kernel (:mod:`lacache.decode.triton_kernels`; tasks: ``cache.decode=triton``); ``hf-static`` (full cache only) is the anchor:
transformers' own ``generate`` with a ``StaticCache`` and its automatic ``torch.compile``, same
model, prompt and steps. Compaction time: ``eager`` wraps the cache's plan/apply in device syncs (a
separate pass, so the decode timing stays unsynchronised); ``graph`` times the compaction replays
with CUDA events inside the measured loop.

The weight-streaming bound is measured in the same process: the bytes of the model's weights over
the device's copy bandwidth (a large device-to-device copy, bytes read + written); a batch-1 decode
step reads every weight once, so no decoder beats it. Each row prints its ratio to the bound.

    python -m lacache.harness.bench --model smollm2-135m --contexts 1024 4096 --budgets 256 1024
    python -m lacache.harness.bench --model llama3-8b-shape --device cuda --dtype bfloat16 --contexts 2048 32768 \\
        --policies full streamingllm lacache lacache_reference --decode eager graph --batch 1 8
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from lacache import CONFIGS
from lacache.compat import cache_kwarg
from lacache.decode.chunk_graphs import graphed_prefill
from lacache.decode.grouped_attention import grouped_attention
from lacache.harness import records
from lacache.kvcache import CompactingCache
from lacache.measure import device_peak_bytes, peak_rss_bytes, reset_device_peak, sync

SHAPES = {  # random-weight models: no download needed
    "llama3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0),
    "tiny-shape": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=65536),
}
DECODE_PATHS = ("eager", "graph", "fused", "triton", "hf-static")
GRAPH_POLICIES = ("full", "streamingllm", "lacache")  # the ring path: graph, fused and triton
EVICTION_POLICIES = ("h2o", "tova", "snapkv", "pyramidkv")  # the eviction path (lacache.decode.eviction): graph only


def make_policy(name: str, budget: int, args):
    """The policy of ``configs/cache/<name>.yaml`` with this run's overrides (only keys it has)."""
    from omegaconf import OmegaConf

    from lacache.harness.runner import build

    path = CONFIGS / "cache" / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"unknown policy {name!r}; valid: {valid}")
    node = OmegaConf.load(path)
    overrides = {"budget": budget, "span": args.span, "overlap": args.overlap, "compact_every": args.compact_every,
                 "prefill": args.prefill, "prefill_chunk": args.chunk}
    for key, value in overrides.items():
        if key in node:
            node[key] = value
    return build(node, "cache")


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

    spec = models.ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{args.model}.yaml")))
    spec.device, spec.dtype, spec.attn_implementation = args.device, args.dtype, args.attn
    return models.load(spec)[0]


class CompactionTimer:
    """Wraps a compacting cache's plan/apply with device-synchronised timers."""

    def __init__(self, cache, device):
        self.seconds = 0.0
        for name in ("_apply", "plan", "_compact"):
            original = getattr(cache, name, None)
            if original is None:
                continue

            def timed(*a, _original=original, **kw):
                sync(device)
                start = time.perf_counter()
                out = _original(*a, **kw)
                sync(device)
                self.seconds += time.perf_counter() - start
                return out

            setattr(cache, name, timed)


def prefill(model, policy, prompt, graphs: bool = False, grouped: bool = False):
    """The cache after feeding ``prompt`` in the policy's chunks, the first token, and how many chunks
    replayed graphs (``graphs``: a chunked prefill replays its middle layers' CUDA graphs where it
    can, :mod:`lacache.decode.chunk_graphs`; ``grouped``: masked forwards attend through
    :mod:`lacache.decode.grouped_attention`, as the fast paths do)."""
    cache = policy.make_cache(model, prompt_length=prompt.shape[1])
    offset = 0
    with grouped_attention(model, enabled=grouped), \
            graphed_prefill(model, cache, enabled=graphs and policy.prefill == "chunked") as graphed:
        for size in policy.prefill_chunks(prompt.shape[1]):
            logits = model(prompt[:, offset : offset + size], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
            offset += size
    return cache, logits.argmax(-1, keepdim=True), graphed.replays if graphed is not None else 0


def timed_prefill(model, policy, prompt, device, fast: bool = False):
    """Prefill with the device's memory peak reset first: the cache, the first token, prefill readings
    (``fast``: the fast paths' prefill, graphs and grouped attention)."""
    reset_device_peak(device)
    sync(device)
    start = time.perf_counter()
    cache, token, replays = prefill(model, policy, prompt, graphs=fast, grouped=fast)
    sync(device)
    seconds = time.perf_counter() - start
    return cache, token, {"prefill_tokens_per_s": prompt.numel() / seconds, "prefill_peak_device_bytes": device_peak_bytes(device),
                          "prefill_graph_replays": replays}


def measure_eager(model, policy, prompt, steps: int, device) -> dict:
    cache, token, out = timed_prefill(model, policy, prompt, device)
    step_times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        token = model(token, **cache_kwarg(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        step_times.append(time.perf_counter() - start)
    warm = step_times[min(5, steps // 4) :]
    out.update(decode_ms_per_token=1000 * statistics.median(warm), decode_ms_per_token_mean=1000 * statistics.mean(warm),
               **(cache.stats() if hasattr(cache, "stats") else {}))
    if isinstance(cache, CompactingCache) or hasattr(cache, "_compact"):  # second pass: synchronised compaction timing
        cache, token, _ = prefill(model, policy, prompt)
        timer = CompactionTimer(cache, device)
        timed_steps = max(16, steps // 2)
        for _ in range(timed_steps):
            token = model(token, **cache_kwarg(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        out["compaction_ms_per_step"] = 1000 * timer.seconds / timed_steps
    return out


def measure_graph(model, policy, prompt, steps: int, device, fuse: bool = False, triton: bool = False,
                  profile: bool = False) -> dict:
    from lacache.decode.fast import GraphDecoder

    warmup = 8
    cache, token, out = timed_prefill(model, policy, prompt, device, fast=True)
    stats = cache.stats() if hasattr(cache, "stats") else {}
    decoder = GraphDecoder(model, cache, token, max_new_tokens=steps + warmup, fuse=fuse, triton=triton)
    try:
        for _ in range(warmup):  # captures the step graph and the compaction graphs
            decoder.step()
        decoder.timed = True
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            decoder.step()
        sync(device)
        seconds = time.perf_counter() - start
        if profile:
            print_profile(decoder.step, device)
        compaction = decoder.compaction_seconds()
    finally:
        decoder.close()
    held = decoder.ring.host_n
    out.update(decode_ms_per_token=1000 * seconds / steps, decode_ms_per_token_mean=1000 * seconds / steps,
               compaction_ms_per_step=1000 * compaction / steps if decoder.ring.compacts and decoder.ring.rule is not None else None,
               **stats)
    out["kv_entries_per_layer_max"] = max(out.get("kv_entries_per_layer_max", 0), held)
    out["kv_bytes_decode"] = decoder.ring.decode_bytes()  # kv_bytes_max stays the prefill's peak
    return out


def mib(value) -> str:
    """Bytes as MiB for the console table; ``-`` where the cache does not report it."""
    return "-" if value is None else f"{value / 2**20:.1f}"


def measure_hf_static(model, prompt, steps: int, device) -> dict:
    """transformers' ``generate`` with a ``StaticCache`` (and the automatic compilation ``generate``
    applies to a static cache on a GPU): decode ms/token = (time of ``steps + 1`` new tokens - time
    of 1) / ``steps``, both with the same cache size so that nothing recompiles, after two warm-ups."""
    from transformers import StaticCache

    size = prompt.shape[1] + steps + 1

    def run(new: int) -> float:
        cache = StaticCache(config=model.config, max_cache_len=size)
        sync(device)
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, **cache_kwarg(model, cache))
        sync(device)
        return time.perf_counter() - start

    reset_device_peak(device)
    for _ in range(2):
        run(steps + 1)
    long, short = run(steps + 1), run(1)
    ms = 1000 * (long - short) / steps
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * prompt.shape[0] * size * config.num_key_value_heads * head_dim * \
        next(model.parameters()).element_size()  # the StaticCache's keys and values
    return {"prefill_tokens_per_s": prompt.numel() / short, "decode_ms_per_token": ms, "decode_ms_per_token_mean": ms,
            "prefill_peak_device_bytes": device_peak_bytes(device), "kv_bytes_max": kv, "kv_bytes_decode": kv, "kv_entries_per_layer_max": size}


def memory_formula(model, policy, context: int, batch: int, steps: int, chunk: int | None, weights: int,
                   ring: int = 0) -> dict:
    """What a long prompt's peak GPU memory should be: the weights, the budget's KV, one chunk's working set.

    ``W + KV + A + R + S + ring + logits`` with ``s`` bytes per element, ``L`` layers, ``h`` hidden size, ``I`` the
    MLP's width, ``H``/``Hkv`` query/KV heads of size ``d``, ``c`` the prefill chunk (the whole prompt when it is
    fed in one pass), ``B`` the slots a layer holds once compacted (the budget; the whole sequence for the full
    cache; PyramidKV's stacked buffers give every layer its longest layer's budget):

    * ``KV = L·b·(B + c)·2·Hkv·d·s``: every layer's keys and values, room for one chunk beside the budget;
    * ``A = b·c·(4h + (H + 2·Hkv)·d + 3I)·s``: one layer's activations for the chunk (hidden states and norms,
      q/k/v, gate/up/act);
    * ``R = 2·b·(B + c)·Hkv·d·s``: one layer's held keys rotated for attention, beside its values;
    * ``S = 3 · 2^24 · 4``: the attention scores a scored policy (H2O, TOVA, SnapKV, PyramidKV) recomputes, in
      chunks of 2^24 fp32 logits (logits, mask, softmax);
    * ``ring``: the fast decode path's buffers (``ring``: their bytes, which the decoder reports): the kept
      entries are copied into them, so they sit beside the exact cache they were converted from;
    * ``logits = b·V·4``: the last position's fp32 logits.
    """
    from lacache.baselines.attention_scores import SCORE_CHUNK_ELEMENTS

    config = model.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = next(model.parameters()).element_size()
    c = chunk or context
    if policy.name == "full":
        slots = context + steps
    elif policy.name == "pyramidkv":
        from lacache.baselines.pyramidkv import pyramid_budgets

        budget = policy.resolve_budget(context)
        slots = max(pyramid_budgets(budget, policy.window, config.num_hidden_layers, context, policy.beta))
    else:
        slots = policy.resolve_budget(context)
    per_slot = 2 * config.num_key_value_heads * dim * size  # one layer's key + value of one token
    terms = {
        "weights": weights,
        "kv": config.num_hidden_layers * batch * (min(slots, context + steps) + (0 if policy.name == "full" else c)) * per_slot,
        "activations": batch * c * (4 * config.hidden_size + (config.num_attention_heads + 2 * config.num_key_value_heads) * dim
                                    + 3 * config.intermediate_size) * size,
        "rotated_keys": batch * (min(slots, context) + c) * per_slot,
        "scores": 3 * SCORE_CHUNK_ELEMENTS * 4 if policy.name in EVICTION_POLICIES else 0,
        "ring": ring,
        "logits": batch * config.vocab_size * 4,
    }
    return {"memory_formula_bytes": sum(terms.values()), **{f"memory_formula_{k}_bytes": v for k, v in terms.items()}}


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (each tensor once: tied weights count once)."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def copy_bandwidth(device, size: int = 2**30, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s: the median of ``repeats`` copies of ``size`` bytes, counting
    bytes read plus bytes written."""
    source = torch.empty(size // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 3):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        times.append(time.perf_counter() - start)
    del source, target
    return 2 * size / statistics.median(times[3:])


def print_profile(step, device, steps: int = 8) -> None:
    """The device kernels that take the time of a few decode steps (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60), flush=True)


def release(device) -> None:
    """Free what the last measurement left (graph pools, caches) so the next one starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Every argument checked before anything loads: exit 2 naming the argument, its value and what is allowed
    (policy settings through the policies' own validation, against the model's config)."""
    from lacache import models
    from lacache.harness.runner import ConfigError
    from lacache.ladder import LadderConfigError
    from lacache.policy import PolicyConfigError

    for name in ("steps", "chunk", "compact_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("budgets", "contexts", "batch"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            parser.error(f"--{name} {' '.join(map(str, bad))}: every value must be >= 1")
    try:
        torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device={args.device!r}: {err}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(models.no_gpu(f"--device={args.device!r}", "use --device cpu"))
    if "triton" in args.decode and torch.device(args.device).type != "cuda":
        parser.error(f"--decode triton runs Triton kernels on a GPU, not on --device={args.device!r}; "
                     f"on a CPU use one of {', '.join(p for p in DECODE_PATHS if p != 'triton')}")
    model_names = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
    if args.model not in SHAPES and args.model not in model_names:
        parser.error(f"--model={args.model!r} is not a config in configs/model/ ({', '.join(model_names)}) "
                     f"nor a random shape ({', '.join(sorted(SHAPES))})")
    policy_names = sorted(p.stem for p in (CONFIGS / "cache").glob("*.yaml"))
    unknown = [name for name in args.policies if name not in policy_names]
    if unknown:
        parser.error(f"--policies: unknown {unknown}; valid: {', '.join(policy_names)}")
    try:
        records.check_writable(args.runs_dir)
    except OSError as err:
        parser.error(f"--runs-dir={args.runs_dir!r}: {err}")
    if args.model in SHAPES:
        from transformers import LlamaConfig

        config = LlamaConfig(**SHAPES[args.model])
    else:
        from omegaconf import OmegaConf

        try:
            spec = models.ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{args.model}.yaml")))
            config = models.load_config(spec)
        except (ValueError, models.ModelUnavailableError) as err:
            parser.error(f"--model={args.model!r}: {err}")
    for name in args.policies:
        for budget in args.budgets:
            try:
                make_policy(name, budget, args).check(config)
            except (ConfigError, PolicyConfigError, LadderConfigError) as err:
                parser.error(f"--policies {name} --budgets {budget} (--span {args.span} --overlap {args.overlap}): {err}")


def plan(args) -> list[tuple[int, int, int, str, str]]:
    """The bench's points, in the order they run: (context, batch, budget, policy, decode path). The full cache has
    no budget (once per context); each decode path runs the policies it supports."""
    points = []
    for context in args.contexts:
        for batch in args.batch:
            for budget in args.budgets:
                for name in args.policies:
                    if name == "full" and budget != args.budgets[0]:
                        continue
                    for path in args.decode:
                        if (path == "graph" and name not in GRAPH_POLICIES + EVICTION_POLICIES) or \
                                (path in ("fused", "triton") and name not in GRAPH_POLICIES) or (path == "hf-static" and name != "full"):
                            continue
                        points.append((context, batch, budget, name, path))
    return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help=f"configs/model/<name> or a random shape: {sorted(SHAPES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--policies", nargs="+", default=sorted(p.stem for p in (CONFIGS / "cache").glob("*.yaml")),
                        help="default: every configs/cache/<name>.yaml")
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (equal-length prompts)")
    parser.add_argument("--decode", nargs="+", default=["eager"], choices=DECODE_PATHS)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--span", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--compact-every", type=int, default=1)
    parser.add_argument("--prefill", default="full", choices=["full", "chunked"])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--runs-dir", default=os.environ.get("LACACHE_RUNS_DIR", "runs"), help="default: $LACACHE_RUNS_DIR, else runs")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of the graph/fused decode step")
    parser.add_argument("--plot", default="reports/bench.png", help="KV memory and decode speed vs context of this run's points")
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = torch.device(args.device)
    model = load_model(args)
    env = records.environment()
    vocab = model.config.vocab_size
    weights, bandwidth = weight_bytes(model), copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    bound_ms = 1000 * weights / bandwidth
    print(f"[lacache] weight-streaming bound: {weights / 1e9:.2f} GB of weights / {bandwidth / 1e9:.0f} GB/s copy bandwidth "
          f"= {bound_ms:.2f} ms/token", flush=True)
    written = []
    points = plan(args)
    policies, paths = dict.fromkeys(point[3] for point in points), dict.fromkeys(point[4] for point in points)
    print(f"[lacache] bench of {len(points)} points: {len(policies)} policies ({', '.join(policies)}), "
          f"decode {', '.join(paths)}", flush=True)
    print(f"{'policy':>18} {'budget':>6} {'context':>7} {'batch':>5} {'decode':>9} {'prefill tok/s':>13} {'ms/token':>9} "
          f"{'x bound':>7} {'compact ms':>10} {'KV prefill MiB':>14} {'KV decode MiB':>13} {'peak GiB':>8} {'x formula':>9}",
          flush=True)
    shape = None
    for context, batch, budget, name, path in points:
        if (batch, context) != shape:  # one random prompt per context and batch size, as every policy sees it
            shape = (batch, context)
            prompt = torch.randint(0, vocab, shape, device=device, generator=torch.Generator(device).manual_seed(0))
        release(device)
        policy = make_policy(name, budget, args)
        policy.prepare_model(model)
        with torch.inference_mode():
            if path == "eager":
                result = measure_eager(model, policy, prompt, args.steps, device)
            elif path == "hf-static":
                result = measure_hf_static(model, prompt, args.steps, device)
            else:
                result = measure_graph(model, policy, prompt, args.steps, device, fuse=path in ("fused", "triton"),
                                       triton=path == "triton", profile=args.profile)
        result["peak_rss_bytes"] = peak_rss_bytes()
        result["peak_device_bytes"] = device_peak_bytes(device)
        if path != "hf-static":
            chunk = args.chunk if args.prefill == "chunked" else None
            ring = result.get("kv_bytes_decode", 0) if path != "eager" else 0
            result.update(memory_formula(model, policy, context, batch, args.steps, chunk, weights, ring))
            if result["peak_device_bytes"]:
                result["memory_formula_ratio"] = result["peak_device_bytes"] / result["memory_formula_bytes"]
        result.update(weight_bytes=weights, copy_bytes_per_s=bandwidth, bound_ms_per_token=bound_ms,
                      bound_ratio=result["decode_ms_per_token"] / bound_ms)
        ids = {"model": args.model, **policy.describe(), "task": "bench", "context": context, "batch": batch,
               "decode": path, "prefill": args.prefill, "dtype": args.dtype,
               "device": env["cuda_device"] if device.type == "cuda" else env["platform"]}
        if name == "full":
            ids["budget"] = None
        if args.prefill == "chunked":
            ids["prefill_chunk"] = args.chunk  # one record per chunk size
        key = records.config_key({**ids, "steps": args.steps, "compact_every": args.compact_every})
        records.write_record(args.runs_dir, {"schema": records.SCHEMA, "key": key, "status": "ok", "ids": ids,
                                             "config": vars(args), "metrics": {}, "stats": result, "env": env})
        written.append(key)
        compact = result.get("compaction_ms_per_step")
        peak, ratio = result["peak_device_bytes"], result.get("memory_formula_ratio")
        print(f"{name:>18} {str(ids['budget']):>6} {context:>7} {batch:>5} {path:>9} "
              f"{result['prefill_tokens_per_s']:>13.0f} {result['decode_ms_per_token']:>9.2f} {result['bound_ratio']:>7.2f} "
              f"{'-' if compact is None else f'{compact:.3f}':>10} "
              f"{mib(result.get('kv_bytes_prefill', result.get('kv_bytes_max'))):>14} {mib(result.get('kv_bytes_decode')):>13} "
              f"{'-' if peak is None else f'{peak / 2**30:.2f}':>8} {'-' if ratio is None else f'{ratio:.3f}':>9}", flush=True)

    if args.plot and written:
        from lacache.report.figures import bench_vs_context

        frame = records.load_records(args.runs_dir)
        path = bench_vs_context(frame[frame["key"].isin(written)], args.plot, f"{args.model} on {env['cuda_device'] or env['platform']}")
        print(f"[lacache] plot: {path}")


if __name__ == "__main__":
    main()
