"""LaCache: the ladder-shaped KV cache with iterative compaction (``cache=lacache``).

Deliberate differences from the reference code (``docs/LACACHE.md`` lists them all):
- bulk compactions that need several sweeps merge ladders sweep after sweep instead of the
  reference's stretched-block approximation, so no token is duplicated and the newest is never
  dropped (spec section 5.1-5.2); single-sweep calls, and every decode step, are identical;
- positions: the query and new keys get their slot index from ``get_seq_length`` as in the
  reference's LongBench loop (spec section 2.2), so the ppl query-position drift for ``r > 1``
  (spec section 5.6) does not occur;
- ``sink='auto'`` clamps the LongBench rule so that the budget leaves room for one ladder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lacache.compat import compressed_layers, sliding_layers, text_config
from lacache.kvcache import CompactingCache, Plan, RingRule
from lacache.ladder import LAYOUTS, Ladder, LadderConfigError, LadderState, validate
from lacache.policy import CachePolicy, PolicyConfigError


class LadderCache(CompactingCache):
    """Keeps exactly :func:`lacache.ladder.kept_positions`'s slots, computed on the device for all layers."""

    def __init__(self, model, ladder: Ladder, budget: int, sink: int, compact_every: int = 1):
        self.ladder, self.compact_every = ladder, compact_every
        self.state = LadderState(ladder, budget, sink, compact_every)
        super().__init__(model, capacity=budget + ladder.freed // 2 + compact_every)
        self._layer_pattern = None

    def _merged_source(self, seg, u: torch.Tensor) -> torch.Tensor:
        """Source slot of the ``u``-th kept slot of a segment's merged ladders, one row per offset ``0 .. b-a``."""
        lad = self.ladder
        offsets = torch.arange(lad.patterns, device=u.device)[:, None]
        return seg.cursor + torch.div(u, lad.kept, rounding_mode="floor") * lad.block + offsets + u % lad.kept

    def _per_layer(self, rows: torch.Tensor) -> torch.Tensor:
        """Expand ``[patterns, m]`` rows (one per offset) to the ``[layers, 1, 1, m]`` index of a plan."""
        if self._layer_pattern is None:
            offsets = [self.ladder.offset(i) for i in range(self.num_layers)]
            self._layer_pattern = torch.tensor(offsets, device=rows.device)
        return rows[self._layer_pattern][:, None, None, :]

    def ring_rule(self) -> RingRule:
        lad = self.ladder
        offsets = [lad.offset(i) for i in range(self.num_layers)]

        def plan(length: int):
            compaction = self.state.plan(length)
            return compaction.segments if compaction is not None else None

        return RingRule(self.state.budget + lad.freed // 2 + self.compact_every, lad.block, lad.kept, offsets, self.state.cursor, plan)

    def plan(self, length: int) -> Plan | None:
        compaction = self.state.plan(length)
        if compaction is None:
            return None
        device, lad = self.positions.device, self.ladder
        if len(compaction.segments) == 1:  # every decode step: a small gather for the merged block, a shifted tail
            seg = compaction.segments[0]
            merged = self._merged_source(seg, torch.arange(seg.count * lad.kept, device=device)[None, :])
            return Plan(start=seg.cursor, index=self._per_layer(merged), new_length=compaction.new_length,
                        tail_source=seg.cursor + seg.count * lad.block)
        start, index, current = compaction.first_changed, None, length
        for seg in compaction.segments:  # several sweeps (bulk): compose their maps into one gather
            out_len = current - seg.count * lad.freed
            j = torch.arange(start, out_len, device=device)[None, :]
            u = j - seg.cursor
            merged = self._merged_source(seg, u)
            src = torch.where(u < 0, j, torch.where(u < seg.count * lad.kept, merged, j + seg.count * lad.freed))
            index = src if index is None else torch.gather(index, 1, src - start)
            current = out_len
        return Plan(start=start, index=self._per_layer(index), new_length=compaction.new_length)


def hybrid_note(config) -> str:
    """What the ladder spans on a hybrid model, for an error message ("" for other models)."""
    if sliding_layers(config) is None:
        return ""
    layers = len(compressed_layers(config))
    return (f"on this hybrid model the ladder spans its {layers} global layers (its sliding-window layers keep the "
            "model's window), so num_layers is that count: ")


@dataclass
class LaCachePolicy(CachePolicy):
    """LaCache (ICML 2025): span ``S``, overlap ``O``, budget, sink; spec-exact kept positions."""

    name: ClassVar[str] = "lacache"
    fast_decode: ClassVar[bool] = True
    ring_decode: ClassVar[bool] = True

    budget: int | float | None = 256
    span: int = 16
    overlap: int = 0
    sink: int | str = 4
    compact_every: int = 1
    layout: str = "reference"  # reference: layer i keeps offset i mod P | bands: the paper's S-layer bands

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layout not in LAYOUTS:
            raise PolicyConfigError(f"layout={self.layout!r} is not one of {LAYOUTS}")
        if self.budget is None:
            raise PolicyConfigError("lacache needs a budget (entries per layer, or a fraction)")
        if not (isinstance(self.sink, int) or self.sink == "auto"):
            raise PolicyConfigError(f"sink={self.sink!r} must be an int or 'auto' (LongBench rule)")
        if self.compact_every < 1:
            raise PolicyConfigError(f"compact_every={self.compact_every} must be >= 1")

    def check(self, model_config) -> None:
        super().check(model_config)
        layers = len(compressed_layers(model_config))
        try:
            if self.is_fraction or self.sink == "auto":
                validate(layers, self.span, self.overlap, layout=self.layout)
            else:
                validate(layers, self.span, self.overlap, self.budget, self.sink, self.layout)
        except LadderConfigError as err:
            raise PolicyConfigError(hybrid_note(model_config) + str(err)) from None

    def resolve_sink(self, budget: int, prompt_length: int | None, ladder: Ladder) -> int:
        if self.sink != "auto":
            return self.sink
        # LongBench rule (spec section 3): min(128, max(1, T-(L+1)), C-(L+1)); clamped so a ladder fits.
        longest = prompt_length if prompt_length is not None else budget
        return max(0, min(128, max(1, longest - (ladder.num_layers + 1)), budget - ladder.num_layers - ladder.kept))

    def make_cache(self, model, prompt_length: int | None = None) -> LadderCache:
        config = text_config(model.config)
        budget = self.resolve_budget(prompt_length, getattr(config, "max_position_embeddings", None))
        ladder = Ladder(len(compressed_layers(config)), self.span, self.overlap, self.layout)
        sink = self.resolve_sink(budget, prompt_length, ladder)
        try:
            validate(ladder.num_layers, self.span, self.overlap, budget, sink, self.layout)
        except LadderConfigError as err:
            raise PolicyConfigError(hybrid_note(config) + str(err)) from None
        return LadderCache(model, ladder, budget, sink, self.compact_every)

    def describe(self) -> dict:
        return {**super().describe(), "span": self.span, "overlap": self.overlap, "sink": self.sink, "layout": self.layout}
