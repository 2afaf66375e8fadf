"""TOVA, Token Omission Via Attention (Oren et al., 2024; schwartz-lab-NLP/TOVA; ``cache=tova``).

A fixed-size cache: after every forward that leaves a layer with more than ``budget`` entries
(prefill, full or chunked, and every decode step), the layer keeps the ``budget`` positions with
the largest attention weight of the forward's *last* query, averaged over all the layer's query
heads (one choice per layer, shared by its KV heads), as the reference's ``TOVACache.reduce``.
The newest token itself may be dropped.

Positions: as in the reference, every key keeps its original position and the query sits at the
number of tokens seen (``position_mode = "original"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lacache.baselines.attention_scores import ScoredCache, attention_column_sums
from lacache.compat import text_config
from lacache.kvcache import EvictionRule, Plan
from lacache.policy import CachePolicy, PolicyConfigError


def tova_select(weights: torch.Tensor, keep: int) -> torch.Tensor:
    """Slots to keep, ascending ``[B, keep]``: the top ``keep`` of the last query's weights ``[B, N]``."""
    return weights.topk(keep, dim=-1).indices.sort(dim=-1).values


class TOVACache(ScoredCache):
    position_mode = "original"

    def __init__(self, model, budget: int):
        self.budget = budget
        super().__init__(model, capacity=budget)
        self.weights: list[torch.Tensor | None] = [None] * self.num_layers  # last query's weights [B, N] when over budget

    def query_count(self, count: int) -> int:
        return 1

    def observe(self, layer, start, count, query, keys) -> None:
        if start + count > self.budget:
            self.weights[layer] = attention_column_sums(query, keys, self.scaling).sum(dim=1)

    def plan(self, length: int) -> Plan | None:
        if self.weights[0] is None:
            return None
        index = torch.stack([tova_select(w, self.budget) for w in self.weights])[:, :, None]
        self.weights = [None] * self.num_layers
        return Plan(start=0, index=index, new_length=self.budget)

    def eviction_rule(self) -> EvictionRule:
        return EvictionRule(budget=self.budget, score="last")


@dataclass
class TOVAPolicy(CachePolicy):
    name: ClassVar[str] = "tova"
    fast_decode: ClassVar[bool] = True

    budget: int | float | None = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise PolicyConfigError("tova needs a budget (entries per layer, or a fraction)")

    def make_cache(self, model, prompt_length=None) -> TOVACache:
        return TOVACache(model, self.resolve_budget(prompt_length, getattr(text_config(model.config), "max_position_embeddings", None)))
