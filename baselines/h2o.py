"""H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023; ``cache=h2o``).

Per layer and per KV head, keep the ``budget - heavy`` most recent tokens plus the ``heavy``
older tokens with the largest accumulated attention. As in the reference (FMInference/H2O,
``H2OKVCache_LayerWise``), a forward first adds its attention to the scores and then evicts: the
scores of every layer include every query up to and including the current forward, for full and
chunked prefill and for decode. The query heads that share a KV head (GQA) add up (the reference
is MHA only).

Scores come from :mod:`lacache.baselines.attention_scores`: the cache recomputes the forward's
attention weights in its own update, so the model's attention implementation is left alone.

Positions: as in the reference's streaming variant (``H2OLlamaAttention_streaming``: un-rotated
keys rotated at their slot index, the query at its own slot), a key's rotary position is its slot
in the cache, the same position terms as StreamingLLM and LaCache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lacache.baselines.attention_scores import ScoredCache, attention_column_sums
from lacache.compat import text_config
from lacache.kvcache import EvictionRule, Plan
from lacache.policy import CachePolicy, PolicyConfigError


class HeavyHitterCache(ScoredCache):
    per_slot = ScoredCache.per_slot + ("scores",)

    def __init__(self, model, budget: int, heavy: int):
        self.budget, self.heavy = budget, heavy
        super().__init__(model, capacity=budget)
        self.scores = None  # [layers, batch, kv_heads, capacity] accumulated attention per slot

    def observe(self, layer: int, start: int, count: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        if self.scores is None:  # allocated with the first keys; the base class resizes it with the other slot buffers
            self.scores = torch.zeros(self.raw_keys.shape[:4], dtype=torch.float32, device=keys.device)
        end = start + count
        self.scores[layer, :, :, start:end] = 0
        self.scores[layer, :, :, :end] += attention_column_sums(query, keys, self.scaling)

    def plan(self, length: int) -> Plan | None:
        if length <= self.budget:
            return None
        recent = self.budget - self.heavy
        older = length - recent
        top = torch.topk(self.scores[:, :, :, :older], self.heavy, dim=-1).indices.sort(dim=-1).values
        L, B, H = top.shape[:3]
        tail = torch.arange(older, length, device=top.device).expand(L, B, H, recent)
        return Plan(start=0, index=torch.cat([top, tail], dim=-1), new_length=self.budget)

    def on_compact(self, plan: Plan) -> None:
        self.move(self.scores, plan)

    def eviction_rule(self) -> EvictionRule:
        return EvictionRule(budget=self.budget, score="accumulated", protected=self.budget - self.heavy)


@dataclass
class H2OPolicy(CachePolicy):
    name: ClassVar[str] = "h2o"
    fast_decode: ClassVar[bool] = True

    budget: int | float | None = 256
    heavy_ratio: float = 0.5  # share of the budget for heavy hitters; the rest is the recent window

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise PolicyConfigError("h2o needs a budget (entries per layer, or a fraction)")
        if not 0 < self.heavy_ratio < 1:
            raise PolicyConfigError(f"heavy_ratio={self.heavy_ratio} must be in (0, 1)")
        if not self.is_fraction:
            self.split(self.budget)

    def split(self, budget: int) -> int:
        heavy = int(budget * self.heavy_ratio)
        if heavy < 1 or budget - heavy < 1:
            raise PolicyConfigError(
                f"budget={budget} with heavy_ratio={self.heavy_ratio} leaves {heavy} heavy hitters and "
                f"{budget - heavy} recent tokens; h2o needs at least one of each (budget >= recent window + 1 heavy hitter)"
            )
        return heavy

    def make_cache(self, model, prompt_length=None) -> HeavyHitterCache:
        budget = self.resolve_budget(prompt_length, getattr(text_config(model.config), "max_position_embeddings", None))
        return HeavyHitterCache(model, budget, self.split(budget))

    def describe(self) -> dict:
        return {**super().describe(), "heavy_ratio": self.heavy_ratio}
