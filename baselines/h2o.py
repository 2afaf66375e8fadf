"""H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023; ``cache=h2o``).

Per layer and per KV head, keep the ``budget - heavy`` most recent tokens plus the ``heavy``
older tokens with the largest accumulated attention. Scores accumulate from every query that
attends to the cache, prefill included; the query heads that share a KV head (GQA) add up.

Scores come from an attention wrapper registered with transformers' ``AttentionInterface``: the
model's own kernel (sdpa or eager) computes the output, and the wrapper adds the attention
column sums to the cache, computed in query chunks so a long prompt never materialises an
N x N matrix (eager already returns the weights; they are reused).

Positions: the original code keeps each token's original position. Here, as for StreamingLLM
and LaCache, a key's rotary position is its slot in the cache, so all policies compare on the
same position terms and none runs positions past the model's training length.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from lacache.kvcache import CompactingCache, Plan
from lacache.policy import CachePolicy, PolicyConfigError, text_config

SCORE_CHUNK_ELEMENTS = 1 << 24  # logits per chunk when scoring long prompts


def attention_column_sums(query, key, attention_mask, scaling) -> torch.Tensor:
    """Sum over queries (and the query heads of each KV head) of softmax attention: ``[B, H_kv, kv]``."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    query = query.reshape(batch, kv_heads, groups, q_len, dim)
    key = key.float()
    totals = torch.zeros(batch, kv_heads, kv_len, dtype=torch.float32, device=query.device)
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, q_heads * kv_len))
    for start in range(0, q_len, step):
        end = min(q_len, start + step)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", query[:, :, :, start:end].float(), key) * scaling
        if attention_mask is not None:
            mask = attention_mask[:, :, start:end, :kv_len][:, :, None]
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
        elif q_len > 1:  # causal (a single query sees every cached key)
            rows = torch.arange(start, end, device=query.device)[:, None] + (kv_len - q_len)
            allowed = torch.arange(kv_len, device=query.device)[None, :] <= rows
            logits = logits.masked_fill(~allowed, float("-inf"))
        totals += torch.softmax(logits, dim=-1).sum(dim=(2, 3))
    return totals


def _scored(base):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        output, weights = base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        owner = getattr(module, "lacache_score_cache", None)
        cache = owner() if owner is not None else None
        if cache is not None and cache.awaiting_scores[module.layer_idx]:  # only for the forward this cache serves
            if weights is not None:
                b, hq, _, kv = weights.shape
                sums = weights.float().sum(dim=2).reshape(b, key.shape[1], hq // key.shape[1], kv).sum(dim=2)
            else:
                sums = attention_column_sums(query, key, attention_mask, scaling or module.scaling)
            cache.observe(module.layer_idx, sums)
        return output, weights

    return attention


def use_scored_attention(model) -> None:
    """Switch the model to an attention implementation that also reports scores to the cache."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    current = model.config._attn_implementation
    if current.startswith("lacache_scored_"):
        return
    if current == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as base
    elif current == "eager":
        base = sys.modules[type(_attention_modules(model)[0]).__module__].eager_attention_forward
    else:
        raise PolicyConfigError(f"h2o supports attn_implementation sdpa or eager, not {current!r}")
    name = f"lacache_scored_{current}"
    AttentionInterface.register(name, _scored(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)


def _attention_modules(model) -> list:
    return [layer.self_attn for layer in getattr(model, "model", model).layers]


class HeavyHitterCache(CompactingCache):
    def __init__(self, model, budget: int, heavy: int):
        self.budget, self.heavy = budget, heavy
        super().__init__(model, capacity=budget)
        self.scores = None
        self.awaiting_scores = [False] * self.num_layers
        for module in _attention_modules(model):
            module.lacache_score_cache = weakref.ref(self)

    def on_append(self, layer: int, start: int, count: int) -> None:
        if self.scores is None or self.scores.shape[-1] != self.keys.shape[3]:
            grown = torch.zeros(self.keys.shape[:4], dtype=torch.float32, device=self.keys.device)
            if self.scores is not None:
                grown[..., : self.scores.shape[-1]] = self.scores
            self.scores = grown
        self.scores[layer, :, :, start : start + count] = 0
        self.awaiting_scores[layer] = True

    def observe(self, layer: int, column_sums: torch.Tensor) -> None:
        """Add the attention column sums of the forward that just appended to ``layer``."""
        self.scores[layer, :, :, : column_sums.shape[-1]] += column_sums
        self.awaiting_scores[layer] = False

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

    def entries_per_layer(self) -> list[int]:
        return [self.get_seq_length()] * self.num_layers


@dataclass
class H2OPolicy(CachePolicy):
    name: ClassVar[str] = "h2o"

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

    def prepare_model(self, model) -> None:
        use_scored_attention(model)

    def make_cache(self, model, prompt_length=None) -> HeavyHitterCache:
        budget = self.resolve_budget(prompt_length, getattr(text_config(model.config), "max_position_embeddings", None))
        use_scored_attention(model)
        return HeavyHitterCache(model, budget, self.split(budget))

    def describe(self) -> dict:
        return {**super().describe(), "heavy_ratio": self.heavy_ratio}
