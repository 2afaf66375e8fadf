"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks + the most recent tokens (``cache=streamingllm``).

Positions are shifted as in mit-han-lab/streaming-llm's ``pos_shift``: a key's rotary position is
its slot in the cache, not its original position. After each forward the cache is cut back to
``budget`` entries (the ``sink`` first tokens and the newest ``budget - sink``), so the next
forward attends ``budget`` entries plus its own tokens, the same terms as LaCache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lacache.kvcache import CompactingCache, Plan, RingRule
from lacache.ladder import Segment
from lacache.policy import CachePolicy, PolicyConfigError


class SinkWindowCache(CompactingCache):
    def __init__(self, model, budget: int, sink: int):
        self.budget, self.sink = budget, sink
        super().__init__(model, capacity=budget)

    def plan(self, length: int) -> Plan | None:
        if length <= self.budget:
            return None
        window = self.budget - self.sink
        return Plan(start=self.sink, index=None, new_length=self.budget, tail_source=length - window)

    def ring_rule(self) -> RingRule:
        """Eviction as a merge that keeps nothing of a one-slot block at the sink boundary."""

        def plan(length: int):
            return (Segment(self.sink, length - self.budget),) if length > self.budget else None

        return RingRule(max_length=self.budget + 1, block=1, kept=0, offsets=[0] * self.num_layers, cursor=self.sink, plan=plan)


@dataclass
class StreamingLLMPolicy(CachePolicy):
    name: ClassVar[str] = "streamingllm"
    fast_decode: ClassVar[bool] = True
    ring_decode: ClassVar[bool] = True

    budget: int | float | None = 256
    sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise PolicyConfigError("streamingllm needs a budget (entries per layer, or a fraction)")
        if self.sink < 0:
            raise PolicyConfigError(f"sink={self.sink} must be >= 0")
        if not self.is_fraction and self.budget <= self.sink:
            raise PolicyConfigError(f"budget={self.budget} must exceed sink={self.sink} (no room for recent tokens)")

    def make_cache(self, model, prompt_length=None) -> SinkWindowCache:
        budget = self.resolve_budget(prompt_length, getattr(model.config, "max_position_embeddings", None))
        if budget <= self.sink:
            raise PolicyConfigError(
                f"budget={self.budget} resolves to {budget} entries, which must exceed sink={self.sink}"
            )
        return SinkWindowCache(model, budget, self.sink)

    def describe(self) -> dict:
        return {**super().describe(), "sink": self.sink}
