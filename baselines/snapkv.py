"""SnapKV (Li et al., 2024; FasterDecoding/SnapKV; ``cache=snapkv``).

At the end of the prompt, per layer and KV head, score every prompt position by the attention the
last ``window`` queries pay it, smooth the scores with a 1-D pooling (``max`` or ``avg``, kernel
``kernel``, as the reference's ``SnapKVCluster``), and keep the top ``budget - window`` positions
plus the ``window`` newest ones. The query heads that share a KV head (GQA) add up (the reference
repeats the KV heads instead).

When it compresses:

- a full prefill: once, after the prompt's forward (the reference);
- a chunked prefill or a token-by-token stream (``task=ppl``): after every forward of the prompt
  that leaves a layer above its budget, the window being the newest ``window`` queries fed so far
  (the reference has no chunked prefill; this keeps the memory bound the chunking is for);
- decode: never by default, as the reference (the cache then grows by one entry per generated
  token); ``decode_budget=N`` compresses again, with the same rule, whenever a layer holds
  ``budget + N`` entries.

The newest ``window`` queries of each layer are kept (rotated, fp32) for windows that span
forwards; a query's weights are recomputed over the keys held at the compression.

Positions: as in the reference, every key keeps its original position and the query sits at the
number of tokens seen (``position_mode = "original"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lacache.baselines.attention_scores import ScoredCache, attention_column_sums
from lacache.compat import text_config
from lacache.kvcache import EvictionRule, Plan
from lacache.policy import CachePolicy, PolicyConfigError

POOLINGS = ("max", "avg")


def snap_select(scores: torch.Tensor, window: int, keep: int, kernel: int, pooling: str) -> torch.Tensor:
    """Slots to keep, ascending ``[B, H, keep]``: the pooled top ``keep - window`` of the slots before
    the ``window`` newest, then those ``window`` slots. ``scores``: ``[B, H, N]`` window attention."""
    prefix = scores.shape[-1] - window
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(scores[..., :prefix], kernel_size=kernel, stride=1, padding=kernel // 2)
    top = pooled.topk(keep - window, dim=-1).indices.sort(dim=-1).values
    recent = torch.arange(prefix, prefix + window, device=scores.device).expand(*top.shape[:2], window)
    return torch.cat([top, recent], dim=-1)


def pack_plan(kept: list[torch.Tensor]) -> Plan:
    """One plan from each layer's kept slots ``[B, H, n_l]`` (lengths may differ per layer)."""
    lengths = [k.shape[-1] for k in kept]
    longest = max(lengths)
    rows = [torch.cat([k, k[..., -1:].expand(*k.shape[:2], longest - k.shape[-1])], dim=-1) for k in kept]
    return Plan(start=0, index=torch.stack(rows), new_length=longest, lengths=None if len(set(lengths)) == 1 else lengths)


class SnapKVCache(ScoredCache):
    position_mode = "original"

    def __init__(self, model, budget: int, window: int, kernel: int, pooling: str,
                 prompt_length: int | None = None, decode_budget: int | None = None):
        self.budget, self.window, self.kernel, self.pooling = budget, window, kernel, pooling
        self.prompt_length, self.decode_budget = prompt_length, decode_budget
        super().__init__(model, capacity=budget)
        self.recent: list[torch.Tensor | None] = [None] * self.num_layers  # newest `window` queries per layer
        self.due_now: list[tuple | None] = [None] * self.num_layers  # (window attention, entries to keep) when a compression is due

    def targets(self, seen: int, count: int) -> list[int]:
        """Entries each layer keeps at a compression after a forward of ``count`` tokens, ``seen`` in all."""
        return [self.budget] * self.num_layers

    def due(self, length: int, target: int, seen: int) -> bool:
        if length <= target:
            return False
        if self.prompt_length is None or seen <= self.prompt_length:
            return True
        return self.decode_budget is not None and length >= target + self.decode_budget

    def query_count(self, count: int) -> int:
        return min(count, self.window)

    def observe(self, layer, start, count, query, keys) -> None:
        held = self.recent[layer]
        self.recent[layer] = (query if held is None else torch.cat([held, query], dim=2))[:, :, -self.window :]
        seen = self.seen + count
        target = self.targets(seen, count)[layer]
        if self.due(start + count, target, seen):
            self.due_now[layer] = (attention_column_sums(self.recent[layer], keys, self.scaling), target)

    def plan(self, length: int) -> Plan | None:
        if all(d is None for d in self.due_now):
            return None
        kept = []
        for layer, due in enumerate(self.due_now):
            if due is None:
                held = self.layer_length(layer)
                kept.append(torch.arange(held, device=self.raw_keys.device).expand(*self.raw_keys.shape[1:3], held))
            else:
                kept.append(snap_select(due[0], self.window, due[1], self.kernel, self.pooling))
        self.due_now = [None] * self.num_layers
        return pack_plan(kept)

    def eviction_rule(self) -> EvictionRule | None:
        """Decode after the prompt only appends (``decode_budget=None``); a stream or a decode budget compresses
        with the pooled window rule, which only the exact path runs."""
        if self.prompt_length is None or self.decode_budget is not None or self.seen < self.prompt_length:
            return None
        return EvictionRule(budget=None)


@dataclass
class SnapKVPolicy(CachePolicy):
    name: ClassVar[str] = "snapkv"
    fast_decode: ClassVar[bool] = True
    fast_stream: ClassVar[bool] = False  # a stream compresses with the pooled window rule (exact path only)

    budget: int | float | None = 256
    window: int = 32  # newest queries that score the prompt (kept as well)
    kernel: int = 7  # pooling kernel (odd)
    pooling: str = "max"  # max | avg
    decode_budget: int | None = None  # None: compress the prompt only (the reference); N: also whenever a layer holds budget + N

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise PolicyConfigError(f"{self.name} needs a budget (entries per layer, or a fraction)")
        if self.window < 1:
            raise PolicyConfigError(f"window={self.window} must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise PolicyConfigError(f"kernel={self.kernel} must be an odd number >= 1 (a pooling that keeps the length)")
        if self.pooling not in POOLINGS:
            raise PolicyConfigError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.decode_budget is not None and self.decode == "fast":
            raise PolicyConfigError(f"decode=fast needs decode_budget=null (got {self.decode_budget}): compressing again "
                                    "during decode runs on the exact path only")
        if self.decode_budget is not None and self.decode_budget < 1:
            raise PolicyConfigError(f"decode_budget={self.decode_budget} must be >= 1 (or null: no compression in decode)")
        if not self.is_fraction:
            self.check_budget(self.budget)

    def check_budget(self, budget: int) -> None:
        if budget <= self.window:
            raise PolicyConfigError(
                f"budget={self.budget} gives {budget} entries per layer, which must exceed window={self.window} "
                "(room for at least one selected prompt position)"
            )

    def resolved(self, model, prompt_length) -> int:
        budget = self.resolve_budget(prompt_length, getattr(text_config(model.config), "max_position_embeddings", None))
        self.check_budget(budget)
        return budget

    def make_cache(self, model, prompt_length=None) -> SnapKVCache:
        return SnapKVCache(model, self.resolved(model, prompt_length), self.window, self.kernel, self.pooling,
                           prompt_length, self.decode_budget)

    def describe(self) -> dict:
        ids = {**super().describe(), "window": self.window, "kernel": self.kernel, "pooling": self.pooling}
        if self.decode_budget is not None:
            ids["decode_budget"] = self.decode_budget
        return ids
