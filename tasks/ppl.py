"""Streaming perplexity (the paper's Wikitext-2 experiment, ``task=ppl``).

A long text is streamed through the model with the cache policy active: token by token, or in
chunks where the policy says chunking is exact (the full cache). Reports overall PPL and PPL per
window of ``window`` predicted tokens, so a curve shows where a policy breaks down.

Token by token, ``cache.decode=fast|triton`` streams through :class:`lacache.decode.fast.GraphDecoder`
(CUDA graphs on a GPU) instead of the model's forward: the first token goes through the forward, then
each step is fed the text's next token (teacher forcing, ``decoder.ids``) and its logits score the
one after. The positions and compactions are the exact path's; the logits are equal up to rounding
(``tests/test_fast_decode.py``). A policy whose chunks are exact (the full cache) keeps its chunked
forward, which is already one pass per chunk.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from lacache.assets import essays_text
from lacache.compat import cache_kwarg
from lacache.measure import Stopwatch, device_peak_bytes, peak_rss_bytes, reset_device_peak
from lacache.models import first_line, hub_offline_reason, input_device
from lacache.tasks.base import RunContext, Task, TaskConfigError, TaskResult

DATASETS = ("pg_essays", "wikitext2", "pg19", "text_file")
HEAD_MARGIN = 64  # tokens tokenized past num_tokens: the last ones of a cut text may differ from the whole text's


def _hub_text(dataset: str, hub_id: str, config: str | None, split: str, sample: int | None) -> str:
    import datasets

    offline = hub_offline_reason()
    try:
        data = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # datasets raises many types for "offline" / "not found"
        why = (f"is not in the local Hugging Face cache and the hub is unreachable ({offline})" if offline else
               f"could not be loaded ({type(err).__name__}: {first_line(err)})")
        raise TaskConfigError(
            f"dataset {dataset!r} ({hub_id}{'/' + config if config else ''}, split {split}) {why}: use "
            "task.dataset=text_file task.path=<file>, or task.dataset=pg_essays (embedded, offline)"
        ) from None
    if sample is not None:
        return data[sample]["text"]
    return "\n\n".join(data["text"])


@dataclass
class PerplexityTask(Task):
    name: ClassVar[str] = "ppl"

    dataset: str = "pg_essays"
    path: str | None = None  # for dataset=text_file
    hub_id: str | None = None  # override the hub dataset id
    sample: int | None = None  # pg19: which book (None: all concatenated, as for wikitext2)
    num_tokens: int = 16384
    window: int = 1024
    chunk: int = 512  # tokens per forward for policies whose chunking is exact

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise TaskConfigError(f"task.dataset={self.dataset!r} is not one of {DATASETS}")
        if self.num_tokens < 2:
            raise TaskConfigError(f"task.num_tokens={self.num_tokens} must be >= 2")
        if self.window < 1 or self.chunk < 1:
            raise TaskConfigError("task.window and task.chunk must be >= 1")
        if self.dataset == "text_file" and not self.path:
            raise TaskConfigError("task.dataset=text_file needs task.path=<a text file>")

    def check(self, model_config, policy, max_length) -> None:
        if policy.decode == "hf-generate":
            raise TaskConfigError("task=ppl scores a given text token by token; cache.decode=hf-generate generates "
                                  "answers: use cache.decode=exact, fast or triton")
        if policy.decode != "exact" and not policy.exact_chunks and not type(policy).fast_stream:
            raise TaskConfigError(
                f"task=ppl streams the text into an empty {policy.name} cache, which compresses the stream in a way "
                f"only the exact path runs; cache.decode={policy.decode!r} cannot: use cache.decode=exact")
        if self.dataset == "text_file":
            self._file_text()

    def _file_text(self) -> str:
        """task.path's text; an error naming the file if it is missing, unreadable, not UTF-8 text or empty."""
        path = Path(self.path)
        if not path.is_file():
            raise TaskConfigError(f"task.path={self.path!r} is not a file: give the path of a UTF-8 text file of at least "
                                  f"task.num_tokens={self.num_tokens} tokens")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise TaskConfigError(f"task.path={self.path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise TaskConfigError(f"task.path={self.path!r} cannot be read ({err.strerror or err})") from None
        if "\x00" in text:
            raise TaskConfigError(f"task.path={self.path!r} is a binary file (it holds NUL bytes), not text")
        if not text.strip():
            raise TaskConfigError(f"task.path={self.path!r} is empty")
        return text

    def text(self) -> str:
        if self.dataset == "pg_essays":
            return essays_text()
        if self.dataset == "text_file":
            return self._file_text()
        if self.dataset == "wikitext2":
            return _hub_text(self.dataset, self.hub_id or "wikitext", "wikitext-2-raw-v1", "test", None)
        return _hub_text(self.dataset, self.hub_id or "emozilla/pg19-test", None, "test", self.sample if self.sample is not None else 0)

    def tokens(self, tokenizer) -> torch.Tensor:
        """The text's first ``num_tokens`` tokens. Only a head of the text is tokenized (the embedded essays are
        3 MB, ~3 s to tokenize whole): one that yields ``HEAD_MARGIN`` tokens more than needed, so the tokens
        kept are those of the whole text (a token depends only on the text up to a few characters past it)."""
        text = self.text()
        chars = 8 * self.num_tokens + 1024  # English prose has ~4 characters a token
        while True:
            ids = tokenizer(text[:chars], return_tensors="pt").input_ids[0]
            if chars >= len(text) or ids.numel() >= self.num_tokens + HEAD_MARGIN:
                break
            chars *= 2
        if ids.numel() < self.num_tokens:
            source = f"task.path={self.path!r}" if self.dataset == "text_file" else f"dataset {self.dataset!r}"
            raise TaskConfigError(f"task.num_tokens={self.num_tokens} but {source} has only {ids.numel()} tokens")
        return ids[: self.num_tokens]

    def prompt_length(self, tokenizer) -> int:
        return len(self.tokens(tokenizer))

    def run(self, ctx: RunContext) -> TaskResult:
        device = input_device(ctx.model)
        ids = self.tokens(ctx.tokenizer).to(device)[None]
        n = ids.shape[1]
        cache = ctx.policy.make_cache(ctx.model, prompt_length=n)
        step = self.chunk if ctx.policy.exact_chunks else 1
        nll = torch.empty(n - 1, dtype=torch.float64)
        reset_device_peak(device)
        bar = tqdm(total=n - 1, desc=f"ppl {ctx.policy.name}", unit="tok", disable=not ctx.progress, mininterval=2)
        fast = step == 1 and ctx.policy.decode != "exact" and n > 2
        ring_stats = {}
        with torch.inference_mode(), Stopwatch(device) as clock:
            if fast:
                ring_stats = self._stream_fast(ctx, ids, cache, nll, bar)
            else:
                total = 0.0
                for start in range(0, n - 1, step):
                    end = min(start + step, n - 1)
                    logits = ctx.model(ids[:, start:end], **cache_kwarg(ctx.model, cache), use_cache=True).logits[0]
                    nll[start:end] = token_nll(logits, ids[0, start + 1 : end + 1]).double().cpu()
                    if not bar.disable:  # the PPL so far, current whenever the bar is drawn (a running sum: O(1) a step)
                        total += float(nll[start:end].sum())
                        bar.set_postfix(ppl=f"{math.exp(total / end):.2f}", refresh=False)
                    bar.update(end - start)
        bar.close()
        windows = [
            {"end": min(s + self.window, n - 1), "ppl": math.exp(nll[s : s + self.window].mean().item())}
            for s in range(0, n - 1, self.window)
        ]
        metrics = {"ppl": math.exp(nll.mean().item()), "nll": nll.mean().item(), "num_tokens": n}
        stats = {
            "wall_s": clock.seconds,
            "tokens_per_s": (n - 1) / clock.seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_device_bytes": device_peak_bytes(device),
            **(cache.stats() if hasattr(cache, "stats") else {}),
            **ring_stats,  # the fast stream's cache readings, where it ran
        }
        return TaskResult(metrics=metrics, curves={"ppl_window": windows}, stats=stats)

    @staticmethod
    def _stream_fast(ctx: RunContext, ids: torch.Tensor, cache, nll: torch.Tensor, bar) -> dict:
        """Token by token through the fast decoder, each step fed the text's next token; fills ``nll`` and
        returns the cache readings of the decoder's ring (the exact cache saw only the first token)."""
        from lacache.decode.fast import GraphDecoder

        model, n = ctx.model, ids.shape[1]
        losses = torch.empty(n - 1, dtype=torch.float32, device=ids.device)  # kept on the device: no sync a step
        losses[:1] = token_nll(model(ids[:, :1], **cache_kwarg(model, cache), use_cache=True).logits[0], ids[0, 1:2])
        fused = ctx.policy.decode == "triton"
        decoder = GraphDecoder(model, cache, ids[:, 1:2], max_new_tokens=n, fuse=fused, triton=fused)
        held = []
        with contextlib.closing(decoder):
            for t in range(1, n - 1):
                logits = decoder.step()  # the logits of token t (on CUDA a buffer the next step overwrites)
                losses[t : t + 1] = token_nll(logits, ids[0, t + 1 : t + 2])
                decoder.ids.copy_(ids[:, t + 1 : t + 2])  # teacher forcing: the text's token, not the greedy one
                held.append(decoder.ring.host_n)
                if not bar.disable and (t % 256 == 0 or t == n - 2):  # one device sync per 256 tokens for the bar
                    bar.set_postfix(ppl=f"{math.exp(losses[: t + 1].mean().item()):.2f}", refresh=False)
                    bar.update(t + 1 - bar.n)
        nll.copy_(losses.double().cpu())
        per_slot = cache.bytes_per_slot() if hasattr(cache, "bytes_per_slot") else 0
        mean = sum(held) / len(held)
        decode_bytes = decoder.ring.decode_bytes()
        return {"kv_entries_per_layer_mean": mean, "kv_entries_per_layer_max": max(held), "kv_bytes_mean": mean * per_slot,
                "kv_bytes_max": max(held) * per_slot, "kv_bytes_decode": decode_bytes, "kv_bytes_allocated": decode_bytes,
                "kv_bytes_peak": max(cache.stats().get("kv_bytes_peak", 0), decode_bytes) if hasattr(cache, "stats") else decode_bytes}

    def describe(self) -> dict:
        return {"task": self.name, "dataset": self.dataset, "num_tokens": self.num_tokens}


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target under its row of logits, computed in fp32."""
    return -torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]
