"""lm-eval's ``HFLM`` with every request run through a cache policy (the model of ``task=lm_eval``).

Kept apart from :mod:`lacache.tasks.lm_eval` because it imports lm-eval at module level, which is an
optional dependency: the task imports this module only once lm-eval is known to be installed.

Each request gets a fresh cache (``policy.make_cache``; a fractional budget resolves against the
request's context, or against the window for rolling loglikelihood), and requests run one at a
time, whatever ``batch_size`` says: a compressing cache holds one sequence.

Every request type follows one rule: the context but its last token is prefilled through
``policy.prefill_chunks`` and compressed by the policy; then the last context token goes through
the compressed cache, and so does everything after it. Every logit that is scored or decoded thus
comes from a forward that reads the compressed cache. (Feeding the whole context in one forward
would give the first answer token, under ``prefill=full``, from the uncompressed context: a
one-token multiple-choice answer would score exactly as with the full cache.) A fractional budget
resolves against the compressed part.

- ``generate_until``: lm-eval's context encoding and left truncation, then
  :func:`lacache.tasks.generation.generate` with ``context_tokens`` = all but the last token, the
  request's ``until`` strings and ``max_gen_toks``: greedy decoding through the compressed cache.
- ``loglikelihood``: the last context token and the continuation but its last token go through the
  compressed cache (one forward where the policy's chunking is exact, else one token per forward,
  as in decoding). The sum of the continuation's log-probabilities and whether greedy decoding
  would produce it are returned, as lm-eval expects. With the full cache this is HFLM's
  computation (one forward over context + continuation), up to float rounding.
- ``loglikelihood_rolling``: lm-eval's rolling windows (``max_length`` tokens each, the first with a
  one-token context), each scored as a loglikelihood request whose budget resolves against the
  whole window: under a compressing policy each window streams through the cache token by token.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from lacache.compat import cache_kwarg
from lacache.measure import Stopwatch
from lacache.models import input_device
from lacache.policy import CachePolicy
from lacache.tasks import generation as gen


def entries_held(cache) -> int:
    """KV entries the cache holds now (most over layers)."""
    return max(cache.entries_per_layer())


def score_continuation(model, policy: CachePolicy, context: list[int], continuation: list[int], *,
                       budget_length: int | None = None, softmax_dtype=None) -> tuple[float, bool, dict]:
    """(sum of log p(continuation | context), greedy?, measurements) through a fresh cache of ``policy``;
    a fractional budget resolves against ``budget_length`` (default: the compressed part of the context)."""
    device = input_device(model)
    ids = torch.tensor([context + continuation[:-1]], dtype=torch.long, device=device)
    targets = torch.tensor(continuation, dtype=torch.long, device=device)
    prefix = len(context) - 1
    cache = policy.make_cache(model, prompt_length=budget_length or max(1, prefix))
    kwargs = gen._forward_kwargs(model)
    logits, read = [], []
    with torch.inference_mode(), Stopwatch(device) as clock:
        start = 0
        for size in policy.prefill_chunks(prefix) if prefix else []:
            model(ids[:, start : start + size], **cache_kwarg(model, cache), use_cache=True, **kwargs)
            start += size
        step = ids.shape[1] - prefix if policy.exact_chunks else 1
        for start in range(prefix, ids.shape[1], step):
            read.append(entries_held(cache) if start else 0)
            logits.append(model(ids[:, start : start + step], **cache_kwarg(model, cache), use_cache=True).logits[0])
    logprobs = F.log_softmax(torch.cat(logits), dim=-1, dtype=softmax_dtype)
    greedy = bool((logprobs.argmax(-1) == targets).all())
    total = float(logprobs.gather(1, targets[:, None]).sum())
    measured = {
        "context_tokens": len(context),
        "continuation_tokens": len(continuation),
        "seconds": clock.seconds,
        "kv_entries_read_max": max(read),  # entries a scored forward read besides its own tokens
        **(cache.stats() if hasattr(cache, "stats") else {}),
    }
    return total, greedy, measured


class PolicyLM(HFLM):
    """``HFLM`` on an already loaded model and tokenizer whose requests go through ``policy``.

    ``requests`` collects one dict per request (or rolling window) with its kind, lm-eval's task
    name, doc id and index, and what running it measured; ``generations`` the generate_until outputs."""

    def __init__(self, model, tokenizer, policy: CachePolicy, max_length: int | None = None,
                 batch_size: int = 1, progress: bool = True):
        super().__init__(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)
        self.policy = policy
        self.progress = progress
        self.requests: list[dict] = []
        self.generations: list[gen.Generation] = []

    def _note(self, kind: str, instance, measured: dict) -> None:
        self.requests.append({"kind": kind, "task": instance.task_name, "doc_id": instance.doc_id,
                              "idx": instance.idx, **measured})

    def _bar(self, requests, kind: str, disable_tqdm: bool):
        return tqdm(requests, desc=f"lm_eval {kind} {self.policy.name}", unit="request",
                    disable=disable_tqdm or not self.progress)

    def _score(self, context: list[int], continuation: list[int], budget_length: int | None = None):
        """HFLM's left truncation to ``max_length + 1`` tokens, then :func:`score_continuation`."""
        whole = (context + continuation)[-(self.max_length + 1):]
        context = whole[: len(whole) - len(continuation)]
        return score_continuation(self.model, self.policy, context, continuation,
                                  budget_length=budget_length, softmax_dtype=self.softmax_dtype)

    # ------------------------------------------------------------------ lm-eval's request types
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._instances = requests  # _loglikelihood_tokens gets (strings, ids) in the same order
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            del self._instances

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        results = []
        for instance, (strings, context, continuation) in zip(self._instances, self._bar(requests, "loglikelihood", disable_tqdm)):
            total, greedy, measured = self._score(context, continuation)
            results.append((total, greedy))
            self._note("loglikelihood", instance, measured)
            self.cache_hook.add_partial("loglikelihood", strings, (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        results = []
        for instance in self._bar(requests, "loglikelihood_rolling", disable_tqdm):
            (text,) = instance.args
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1,
            )
            total = 0.0
            for context, continuation in map(lm_utils.make_disjoint_window, windows):
                logprob, _, measured = self._score(context, continuation, budget_length=len(context) + len(continuation))
                total += logprob
                self._note("loglikelihood_rolling", instance, measured)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        eos_ids = gen.eos_token_ids(self.model, self.tokenizer)
        results = []
        for instance in self._bar(requests, "generate_until", disable_tqdm):
            context, gen_kwargs = instance.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample"):
                raise ValueError(
                    f"lm-eval task {instance.task_name!r} asks for sampling (do_sample=true, {gen_kwargs}); "
                    "task=lm_eval decodes greedily through the cache policy"
                )
            if max_gen_toks >= self.max_length:
                raise ValueError(f"lm-eval task {instance.task_name!r}: max_gen_toks={max_gen_toks} leaves no room for a context "
                                 f"within max_length={self.max_length}; raise task.max_length")
            ids, _ = self.tok_batch_encode([context], left_truncate_len=self.max_length - max_gen_toks, truncation=self.truncation)
            ids = ids[0]
            out = gen.generate(self.model, self.tokenizer, self.policy, ids, max_gen_toks, stop_strings=until,
                               eos_ids=eos_ids, context_tokens=len(ids) - 1 if len(ids) > 1 else None)
            text = postprocess_generated_text(out.text, until, None)
            results.append(text)
            self.generations.append(out)
            self._note("generate_until", instance, {"prediction": text, **out.record()})
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def by_doc(self) -> dict[tuple[str, int], list[dict]]:
        """The collected request measurements per (task, doc id)."""
        grouped = defaultdict(list)
        for request in self.requests:
            grouped[(request["task"], request["doc_id"])].append(request)
        return grouped
