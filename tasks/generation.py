"""Greedy generation through a cache policy: the loop shared by ``task=ruler``, ``longbench``, ``niah``.

One sample = one fresh cache (``policy.make_cache(model, prompt_length=len(prompt))``, so budget
fractions resolve against this prompt). The prompt is fed through ``policy.prefill_chunks`` (one
forward per chunk, all into the same cache), then the answer is decoded token by token through that
cache, greedily (argmax), until an end-of-sequence token, a stop token, a stop string, or
``max_new_tokens``. :func:`generate_batch` does the same for prompts of one length at once, one
cache row each (a task's ``batch_size``, grouped by :func:`generate_all`): each row's answer is the
one it gets alone.

What is compressed is the task's ``compress`` setting (:data:`COMPRESS_MODES`):

* ``prompt`` (default): the whole prompt = context + question (+ chat template and answer prefix),
  compressed as one sequence: the paper's setting (LaCache's LongBench/NIAH scripts prefill the whole
  prompt, then compact). The question is therefore not protected from eviction; a policy with
  ``prefill=full`` still computes the first generated token from the uncompressed prompt (the cache
  compacts lazily, at the next forward), while ``prefill=chunked`` compresses between chunks.
* ``context``: kvpress's evaluation (``query_aware=false``). ``generate(..., context_tokens=k)``
  feeds the first ``k`` prompt tokens (the context, as each task defines it) through the policy's
  prefill path, so the policy compresses them; then the rest (question, chat-template tail, answer
  prefix) goes through the compressed cache in a forward of its own (chunked like the context under
  ``prefill=chunked``), whose logits give the first answer token; then decoding as usual. The tokens
  fed are the same, in the same order, as in ``prompt`` mode; only the compression point differs.
  A fractional budget resolves against ``k`` (the context), not the whole prompt. Decode-time
  compression stays the policy's own (kvpress compresses nothing after the context).

The loop is a plain ``model(ids, **cache_kwarg(model, cache))`` call per step, with no ``position_ids``
and no ``attention_mask``: positions come from the cache (``cache.get_seq_length()``).
``model.generate(ids, **cache_kwarg(model, cache))`` gives the same tokens for one sequence (the input
guard that ``make_cache`` installs drops the absolute positions and the all-ones mask ``generate``
builds, and refuses padded batches and second turns: :mod:`lacache.compat`, tested in
``tests/test_library.py``); this loop stays because it also stops at strings, times prefill and
decode separately and feeds ``compress=context`` in two parts. With
``cache.decode=fast`` the answer is decoded by :class:`lacache.decode.fast.GraphDecoder` instead
(same positions and logits up to rounding; CUDA graphs on a GPU); ``cache.decode=triton``: through its
fused step with Triton kernels. With either, the prompt's masked forwards (a chunk after the first, the
question of ``compress=context``) attend without copying keys and values per query head
(:mod:`lacache.decode.grouped_attention`; the same up to rounding), and a chunked prefill on a GPU replays
its middle layers as CUDA graphs where the cache allows (:mod:`lacache.decode.chunk_graphs`; bit for bit).

Per sample it records prompt and generated token counts, prefill and decode speed, peak memory
(:mod:`lacache.measure`) and the cache's own ``stats()`` (KV entries / bytes held).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from lacache.compat import cache_kwarg
from lacache.decode.chunk_graphs import graphed_prefill
from lacache.decode.grouped_attention import grouped_attention
from lacache.measure import Stopwatch, device_peak_bytes, peak_rss_bytes, reset_device_peak
from lacache.models import input_device
from lacache.policy import CachePolicy
from lacache.tasks.base import TaskConfigError


class ChatTemplateError(ValueError):
    """The task asks for the model's chat template but the tokenizer has none."""


COMPRESS_MODES = ("prompt", "context")


def check_compress(compress: str) -> str:
    """A task's ``compress`` setting, validated."""
    if compress not in COMPRESS_MODES:
        raise TaskConfigError(f"task.compress={compress!r} is not one of {COMPRESS_MODES}")
    return compress


@dataclass
class Generation:
    """One generated answer and what producing it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str  # "eos" | "stop_token" | "stop_string" | "length"
    prefill_s: float
    decode_s: float
    peak_device_bytes: int | None
    peak_rss_bytes: int
    cache_stats: dict = field(default_factory=dict)
    context_tokens: int | None = None  # prompt tokens compressed before the rest was fed (compress=context)
    batch_size: int = 1  # rows decoded together (generate_batch); times and KV bytes are this row's share

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_steps(self) -> int:
        """Decode forwards: every generated token but the first (it comes from the prefill logits)
        is the output of one forward of the previous token."""
        return max(0, self.generated_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else None

    def record(self) -> dict:
        """Flat per-sample fields for a task's ``samples``."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "context_tokens": self.context_tokens,
            "batch_size": self.batch_size,
            "generated_tokens": self.generated_tokens,
            "stop_reason": self.stop_reason,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "peak_device_bytes": self.peak_device_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            **self.cache_stats,
        }


# ---------------------------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_prefix_suffix(tokenizer) -> tuple[str, str]:
    """The text the chat template puts before and after a user message (generation prompt included)."""
    marker = "\x00LACACHE-USER-MESSAGE\x00"
    wrapped = apply_chat(tokenizer, marker)
    before, found, after = wrapped.partition(marker)
    if not found:  # pragma: no cover - a template that rewrites the message
        raise ChatTemplateError("the tokenizer's chat template does not keep the user message verbatim")
    return before, after


def apply_chat(tokenizer, text: str) -> str:
    if not has_chat_template(tokenizer):
        raise ChatTemplateError(
            "the tokenizer has no chat template; set task.chat_template=false for a base model"
        )
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    if not isinstance(out, str):  # pragma: no cover - older/newer return types
        out = tokenizer.decode(out)
    return out


def build_prompt(tokenizer, text: str, chat_template: bool, answer_prefix: str = "") -> list[int]:
    """Prompt token ids: ``text`` as one user message of the chat template (with the generation
    prompt) followed by ``answer_prefix``, or plainly ``text + answer_prefix`` with the tokenizer's
    usual special tokens (e.g. a BOS)."""
    if chat_template:
        # the template writes its own special tokens (BOS included where the model wants one)
        return encode(tokenizer, apply_chat(tokenizer, text) + answer_prefix)
    return list(tokenizer.encode(text + answer_prefix, add_special_tokens=True))


def chat_overhead(tokenizer, chat_template: bool) -> int:
    """Tokens the prompt wrapper adds around a message (measured on a short probe text)."""
    probe = "Some text in the middle of a prompt."
    return len(build_prompt(tokenizer, probe, chat_template)) - len(encode(tokenizer, probe))


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return ids


def context_split(prompt_ids: Sequence[int], head_ids: Sequence[int]) -> int:
    """How many leading tokens of ``prompt_ids`` are context, for ``compress=context``.

    ``head_ids``: the prompt built the same way (same wrapper) from its text cut at the end of the
    context. The context is the tokens both share from the start, so a token that straddles the
    boundary (BPE merges across it) goes to the question, and the split is a point in the very
    tokens ``compress=prompt`` feeds, never a second tokenization."""
    shared = 0
    for a, b in zip(prompt_ids, head_ids):
        if a != b:
            break
        shared += 1
    if not 0 < shared < len(prompt_ids):
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) and its context ({len(head_ids)} tokens) share {shared} leading "
            "tokens; compress=context needs a non-empty context and a non-empty rest"
        )
    return shared


def newline_token_id(tokenizer) -> int:
    """The token LongBench's pred.py stops at for samsum: ``tokenizer.encode("\\n")[-1]``."""
    return encode(tokenizer, "\n")[-1]


# ---------------------------------------------------------------------------------------------- the loop
_LOGITS_TO_KEEP: dict[type, bool] = {}


def _forward_kwargs(model) -> dict:
    """Ask only for the last position's logits where the model supports it (a 4K prompt's full logits
    are ~800 MB in fp32 for a 49K vocabulary)."""
    cls = type(model)
    if cls not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if _LOGITS_TO_KEEP[cls] else {}


def _exact_step(model, cache, kwargs: dict, device):
    """One decode step on the exact cache: each row's last token in, ``[B, 1, vocab]`` logits out."""

    def step(tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        return model(ids, **cache_kwarg(model, cache), use_cache=True, **kwargs).logits

    return step


def _fast_step(decoder):
    """One decode step on :mod:`lacache.decode.fast` (``cache.decode=fast``), same contract as :func:`_exact_step`."""

    def step(tokens: list[int]) -> torch.Tensor:
        decoder.ids.copy_(torch.tensor(tokens, dtype=decoder.ids.dtype)[:, None])
        return decoder.step()[:, None]

    return step


def _chunks(policy: CachePolicy, cache, count: int, after_compression: bool) -> list[int]:
    """Sizes of the forwards that feed ``count`` prompt tokens: the policy's prefill chunks; for the
    tokens after a compressed context (``compress=context``), one at a time when the compression left
    layers of different lengths (PyramidKV), which one causal mask cannot serve in a multi-token forward."""
    if after_compression and hasattr(cache, "entries_per_layer") and len(set(cache.entries_per_layer())) > 1:
        return [1] * count
    return policy.prefill_chunks(count)


def _find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


def generate(model, tokenizer, policy: CachePolicy, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
             **options) -> Generation:
    """Greedy-decode one prompt through a fresh cache of ``policy`` (:func:`generate_batch` of one)."""
    return generate_batch(model, tokenizer, policy, [prompt_ids], max_new_tokens, **options)[0]


def generate_batch(
    model,
    tokenizer,
    policy: CachePolicy,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    *,
    stop_strings: Iterable[str] = (),
    stop_token_ids: Iterable[int] = (),
    eos_ids: Iterable[int] | None = None,
    min_new_tokens: int = 0,
    context_tokens: int | None = None,
    max_length: int | None = None,
) -> list[Generation]:
    """Greedy-decode prompts of one length together: one cache of ``policy`` with a row per prompt.

    Why: a small model's decode step is bound by kernel count, not by rows, so ``B`` rows cost about
    one; the policies keep and evict per row, so each row's answer is the one it gets alone (logits
    equal up to the rounding of a larger matrix product). Prompts must have equal lengths (and share
    ``context_tokens``): the caches share one set of slot positions across the batch, so padding
    would be attended and mis-positioned.

    Each row stops at an EOS id (``eos_ids``; default: the tokenizer's and the generation config's),
    at a token of ``stop_token_ids``, or when its decoded answer contains one of ``stop_strings`` (the
    text is cut before it), or after ``max_new_tokens``; the batch steps until every row stopped.
    Until ``min_new_tokens`` tokens exist, EOS and stop tokens are masked out (``min_length`` in
    LongBench's ``generate`` call). EOS / stop tokens are not part of the returned text. Prefill and
    decode seconds and KV bytes are the batch's shared out over its rows, so per-sample figures and
    their sums mean the same at any batch size.

    ``context_tokens=k`` (``compress=context``): the policy compresses the first ``k`` prompt tokens
    (its cache and a fractional budget are sized for them), then the other tokens are fed through the
    compressed cache before decoding; ``None`` compresses the whole prompt. ``max_length``: the task's
    max length, which a fractional budget with ``budget_of=max_length`` resolves against
    (:meth:`~lacache.policy.CachePolicy.new_cache`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    device = input_device(model)
    rows = [torch.as_tensor(list(p) if not isinstance(p, torch.Tensor) else p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("no prompts")
    if policy.decode == "hf-generate":
        return hf_generate(model, tokenizer, rows, max_new_tokens, stop_strings=stop_strings, stop_token_ids=stop_token_ids,
                           eos_ids=eos_ids, min_new_tokens=min_new_tokens)
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(f"a batch needs prompts of one length (one set of cache positions); got lengths {lengths}")
    ids = torch.stack(rows).to(device)
    batch, n = ids.shape
    if n < 1:
        raise ValueError("empty prompt")
    if context_tokens is not None and not 0 < context_tokens < n:
        raise ValueError(f"context_tokens={context_tokens} must be in [1, {n - 1}] for a prompt of {n} tokens")
    parts = [n] if context_tokens is None else [context_tokens, n - context_tokens]  # compressed, then fed through
    eos = set(eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids)
    stop_tokens = set(stop_token_ids)
    enders = sorted(eos | stop_tokens)
    stop_strings = [s for s in stop_strings if s]
    kwargs = _forward_kwargs(model)

    def pick(logits: torch.Tensor, produced: int) -> list[int]:
        logits = logits[:, -1]
        if produced < min_new_tokens and enders:
            logits = logits.clone()
            logits[:, enders] = -math.inf
        return logits.argmax(dim=-1).tolist()

    reset_device_peak(device)
    cache = policy.new_cache(model, prompt_length=parts[0], max_length=max_length)
    generated: list[list[int]] = [[] for _ in range(batch)]
    reasons, texts = ["length"] * batch, [None] * batch
    with torch.inference_mode():
        fast = policy.decode != "exact"  # grouped attention (rounding differs); chunks replay graphs (bit-equal)
        with Stopwatch(device) as prefill_clock, grouped_attention(model, enabled=fast), \
                graphed_prefill(model, cache, enabled=fast and policy.prefill == "chunked") as graphed:
            start = 0
            for i, part in enumerate(parts):
                for size in _chunks(policy, cache, part, after_compression=i > 0):  # sized once the context ran
                    logits = model(ids[:, start : start + size], **cache_kwarg(model, cache), use_cache=True, **kwargs).logits
                    start += size
            tokens = pick(logits, 0)
        step_fn, decoder = _exact_step(model, cache, kwargs, device), None
        if policy.decode in ("fast", "triton"):
            from lacache.decode.fast import GraphDecoder

            fused = policy.decode == "triton"
            decoder = GraphDecoder(model, cache, torch.tensor(tokens, device=device)[:, None], max_new_tokens=max_new_tokens,
                                   fuse=fused, triton=fused)
            step_fn = _fast_step(decoder)
        active = list(range(batch))
        release = contextlib.closing(decoder) if decoder is not None else contextlib.nullcontext()
        with release, Stopwatch(device) as decode_clock:  # the fast decoder is released however decoding ends
            while True:
                for row in list(active):
                    token, out = tokens[row], generated[row]
                    if token in eos or token in stop_tokens:
                        reasons[row] = "eos" if token in eos else "stop_token"
                        active.remove(row)
                        continue
                    out.append(token)
                    if stop_strings:
                        decoded = tokenizer.decode(out, skip_special_tokens=True)
                        cut = _find_stop(decoded, stop_strings)
                        if cut is not None:
                            reasons[row], texts[row] = "stop_string", decoded[:cut]
                            active.remove(row)
                            continue
                    if len(out) >= max_new_tokens:
                        active.remove(row)
                if not active:
                    break
                tokens = pick(step_fn(tokens), len(generated[active[0]]))  # every active row holds as many tokens
    stats = dict(cache.stats()) if hasattr(cache, "stats") else {}
    stats["prefill_graph_replays"] = graphed.replays if graphed is not None else 0
    stats = {k: v / batch if k.startswith("kv_bytes") and isinstance(v, (int, float)) else v for k, v in stats.items()}
    peak = device_peak_bytes(device)
    return [
        Generation(
            text=texts[row] if texts[row] is not None else tokenizer.decode(generated[row], skip_special_tokens=True),
            token_ids=generated[row],
            prompt_tokens=n,
            generated_tokens=len(generated[row]) + (reasons[row] in ("eos", "stop_token")),  # the ending token too
            stop_reason=reasons[row],
            prefill_s=prefill_clock.seconds / batch,
            decode_s=decode_clock.seconds / batch,
            peak_device_bytes=peak,
            peak_rss_bytes=peak_rss_bytes(),
            cache_stats=stats,
            context_tokens=context_tokens,
            batch_size=batch,
        )
        for row in range(batch)
    ]


def hf_generate(model, tokenizer, rows: Sequence[torch.Tensor], max_new_tokens: int, *, stop_strings: Iterable[str] = (),
                stop_token_ids: Iterable[int] = (), eos_ids: Iterable[int] | None = None,
                min_new_tokens: int = 0) -> list[Generation]:
    """``cache.decode=hf-generate``: transformers' own ``model.generate`` (greedy, its default dynamic cache)
    over the prompts left-padded to one length, as evaluation scripts run a full cache; the anchor that
    the harness's decoders are measured against. The same stopping rules as :func:`generate_batch`
    (``generate`` stops each row at the enders and stop strings, and pads it until the batch ends). The
    whole call is timed as decode (``generate`` gives no prefill time); times are the batch's shared out."""
    device = input_device(model)
    eos = set(eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids)
    stop_tokens = set(stop_token_ids)
    enders = sorted(eos | stop_tokens)
    stop_strings = [s for s in stop_strings if s]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (enders[0] if enders else 0)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    config = copy.deepcopy(model.generation_config)  # greedy, and only this call's enders end a row
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=enders or None, pad_token_id=pad)
    options = dict(generation_config=config, max_new_tokens=max_new_tokens)
    if min_new_tokens:
        options["min_new_tokens"] = min_new_tokens
    if stop_strings:
        options.update(stop_strings=stop_strings, tokenizer=tokenizer)
    reset_device_peak(device)
    with torch.inference_mode(), Stopwatch(device) as clock:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
    results = []
    for i, row in enumerate(rows):
        new = out[i, width:].tolist()
        reason, text, kept = "length", None, new
        for j, token in enumerate(new):
            if token in eos or token in stop_tokens:
                reason, kept = ("eos" if token in eos else "stop_token"), new[:j]
                break
        decoded = tokenizer.decode(kept, skip_special_tokens=True)
        cut = _find_stop(decoded, stop_strings)
        if cut is not None:
            reason, text = "stop_string", decoded[:cut]
        results.append(Generation(
            text=decoded if text is None else text,
            token_ids=kept,
            prompt_tokens=len(row),
            generated_tokens=len(kept) + (reason in ("eos", "stop_token")),
            stop_reason=reason,
            prefill_s=0.0,
            decode_s=clock.seconds / len(rows),
            peak_device_bytes=device_peak_bytes(device),
            peak_rss_bytes=peak_rss_bytes(),
            batch_size=len(rows),
        ))
    return results


@dataclass
class Request:
    """One prompt of a task and how to answer it (``options``: the keywords of :func:`generate_batch`)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    options: dict = field(default_factory=dict)

    def batch_key(self, padded: bool = False) -> str:
        """Requests with equal keys can share a batch: same prompt length, same settings (``padded``: any
        length, and the context split does not matter: ``decode=hf-generate`` left-pads a full cache)."""
        options = sorted((k, repr(v)) for k, v in self.options.items() if not (padded and k == "context_tokens"))
        return repr((None if padded else len(self.prompt_ids), self.max_new_tokens, options))


def check_batch_size(batch_size: int) -> int:
    """A task's ``batch_size`` setting, validated."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise TaskConfigError(f"task.batch_size={batch_size!r} must be a positive integer (1: one prompt at a time)")
    return int(batch_size)


def generate_fitting(model, tokenizer, policy: CachePolicy, prompts: Sequence, max_new_tokens: int,
                     **options) -> list[Generation]:
    """:func:`generate_batch`, halving the batch while it runs out of device memory.

    Why: a batch's prefill memory grows with rows x length^2 where the attention kernel materialises
    its scores (fp32 GQA on CUDA falls back to the math kernel: 36 GiB for 16 rows of 8K tokens on
    SmolLM2), and workers sharing a GPU change what fits from one moment to the next. Each row's
    answer is the one it gets alone, so splitting changes no result; a single row that does not fit
    still fails."""
    try:
        return generate_batch(model, tokenizer, policy, prompts, max_new_tokens, **options)
    except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError from torch 2.5
        if len(prompts) == 1:
            raise
        reason = str(error).split(". ")[0]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed batch's blocks, now unreferenced
    half = (len(prompts) + 1) // 2
    print(f"[lacache] a batch of {len(prompts)} prompts of {len(prompts[0])} tokens ran out of device memory "
          f"({reason}); retrying as {half} + {len(prompts) - half}", flush=True)
    return [g for part in (prompts[:half], prompts[half:])
            for g in generate_fitting(model, tokenizer, policy, part, max_new_tokens, **options)]


def generate_all(model, tokenizer, policy: CachePolicy, requests: Sequence[Request], batch_size: int = 1,
                 on_done=None) -> list[Generation]:
    """Answer every request, ``batch_size`` prompts of one :meth:`Request.batch_key` at a time (in the
    order given when ``batch_size=1``); results in the requests' order. ``on_done(count)`` after each batch."""
    if batch_size == 1:
        batches = [[i] for i in range(len(requests))]
    else:
        groups: dict[str, list[int]] = {}
        padded = policy.decode == "hf-generate"
        for i, request in enumerate(requests):
            groups.setdefault(request.batch_key(padded), []).append(i)
        batches = [group[j : j + batch_size] for group in groups.values() for j in range(0, len(group), batch_size)]
    out: list[Generation | None] = [None] * len(requests)
    for batch in batches:
        first = requests[batch[0]]
        options = {k: v for k, v in first.options.items() if not (k == "context_tokens" and policy.decode == "hf-generate")}
        results = generate_fitting(model, tokenizer, policy, [requests[i].prompt_ids for i in batch],
                                   first.max_new_tokens, **options)
        for i, result in zip(batch, results):
            out[i] = result
        if on_done is not None:
            on_done(len(batch))
    return out


# ---------------------------------------------------------------------------------------------- summaries
def summarize(generations: Sequence[Generation], wall_s: float) -> dict:
    """Run-level speed and memory over a task's generations (``TaskResult.stats``)."""
    if not generations:
        return {"wall_s": wall_s}
    prompt = sum(g.prompt_tokens for g in generations)
    produced = sum(g.generated_tokens for g in generations)
    prefill_s = sum(g.prefill_s for g in generations)
    decode_s = sum(g.decode_s for g in generations)
    steps = sum(g.decode_steps for g in generations)
    device_peaks = [g.peak_device_bytes for g in generations if g.peak_device_bytes is not None]
    batches = max(1, round(sum(1 / g.batch_size for g in generations)))  # each generation holds its batch's size
    stats = {
        "wall_s": wall_s,
        "samples": len(generations),
        "prompt_tokens_mean": prompt / len(generations),
        "prompt_tokens_max": max(g.prompt_tokens for g in generations),
        "generated_tokens_mean": produced / len(generations),
        # every prompt and generated token processed, per second of generation time
        "tokens_per_s": (prompt + produced) / (prefill_s + decode_s) if prefill_s + decode_s > 0 else None,
        "prefill_tokens_per_s": prompt / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": steps / decode_s if steps and decode_s > 0 else None,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "peak_rss_bytes": max(g.peak_rss_bytes for g in generations),
        "peak_device_bytes": max(device_peaks) if device_peaks else None,
        "batches": batches,
        "batch_rows_mean": len(generations) / batches,  # how full the batches were
        "samples_per_min": 60 * len(generations) / wall_s if wall_s > 0 else None,
    }
    keys = sorted({k for g in generations for k in g.cache_stats})
    for key in keys:
        values = [g.cache_stats[key] for g in generations if isinstance(g.cache_stats.get(key), (int, float))]
        if values:
            stats[key] = max(values) if key.endswith(("_max", "_allocated")) else sum(values) / len(values)
    return stats
