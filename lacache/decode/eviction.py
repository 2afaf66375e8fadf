"""The fast decode path of the evicting policies (H2O, TOVA) and of the prompt-only ones (SnapKV,
PyramidKV after the prompt): static shapes, no host syncs, CUDA-graph captured by
:class:`lacache.decode.fast.GraphDecoder`.

Why: on the exact path a scored policy recomputes each layer's attention weights from a hooked
query and evicts through a host-side plan, one Python-driven step at a time (52 ms per token on an
H200 for a 135M model, against 5.9 ms for LaCache's fast path); a study of 300-sample points
cannot afford that. Here one step is one graph replay:

* **Storage in logical order.** Raw (un-rotated) keys, values and original positions ``[L, B, H,
  capacity(, D)]`` as the exact cache holds them, plus H2O's accumulated scores; ``lengths[l]``
  (a device tensor) entries held per layer, the rest masked.
* **One step, per layer:** the new entry is written at slot ``lengths[l]``; the layer's keys are
  rotated at read (at their slot index for ``position_mode="shift"``, H2O; at their original
  position for ``"original"``, the others), the new key as the model rotated it; attention is
  computed with explicit fp32 probabilities, which also give the scores (H2O: added to each
  slot's running sum, per KV head; TOVA: the step's own weights summed over the layer's heads).
  When the layer then holds more than ``budget`` entries, the lowest-scored one outside the
  ``protected`` newest is dropped by a gather that closes the gap (a few MB per step), so no
  branch, sync or shape depends on the data.
* **The host mirrors the lengths** (``min(n + 1, budget)`` per layer), which are fixed by the
  schedule, never read back.

Logits equal the exact path's up to rounding, and the same entries are kept (tests in
``tests/test_eviction_decode.py``), except where two scores tie exactly (the exact path's ``topk``
and this path's ``argmin`` may then drop different ones).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lacache.compat import text_config
from lacache.decode.fused import Kernels
from lacache.kvcache import CompactingCache, EvictionRule, rotate

SCORES = ("none", "accumulated", "last")


class EvictionRing(Cache):
    """A converted :class:`~lacache.kvcache.CompactingCache` whose policy has an :class:`EvictionRule`."""

    compacts = False  # no merges for GraphDecoder.settle to schedule: eviction happens inside the step

    def __init__(self, model, source: CompactingCache, rule: EvictionRule, room: int = 0, slack: int = 8):
        if rule.score not in SCORES:
            raise ValueError(f"EvictionRule.score={rule.score!r} is not one of {SCORES}")
        self.num_layers = text_config(model.config).num_hidden_layers
        super().__init__(layers=[DynamicLayer() for _ in range(self.num_layers)])
        source.apply_pending()
        if source.raw_keys is None:
            raise ValueError("the evicting fast path starts after a prefill: the cache holds nothing yet")
        self.rule, self.shift = rule, source.position_mode == "shift"
        lengths = source.entries_per_layer()
        if self.shift and len(set(lengths)) > 1:
            raise ValueError("position_mode='shift' needs every layer to hold the same number of entries")
        longest = max(lengths)
        self.capacity = (max(longest, rule.budget) + 1 if rule.budget is not None else longest + room) + slack
        L, B, H, _, D = source.raw_keys.shape
        self.raw = source.raw_keys.new_zeros((L, B, H, self.capacity, D))
        self.values = source.values.new_zeros((L, B, H, self.capacity, source.values.shape[-1]))
        self.origin = torch.zeros((L, B, H, self.capacity), dtype=torch.long, device=self.raw.device)
        scored = getattr(source, "scores", None) if rule.score == "accumulated" else None
        if rule.score == "accumulated" and scored is None:
            raise ValueError(f"{type(source).__name__} keeps no accumulated scores for EvictionRule.score='accumulated'")
        self.scores = torch.zeros((L, B, H, self.capacity), dtype=torch.float32, device=self.raw.device) if scored is not None else None
        for layer, n in enumerate(lengths):  # only held slots: the rest stays zero (never NaN under a mask)
            self.raw[layer, :, :, :n] = source.raw_keys[layer, :, :, :n]
            self.values[layer, :, :, :n] = source.values[layer, :, :, :n]
            self.origin[layer, :, :, :n] = source.positions[layer, :, :, :n]
            if scored is not None:
                self.scores[layer, :, :, :n] = scored[layer, :, :, :n]
        device = self.raw.device
        self.slots = torch.arange(self.capacity, device=device)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)
        self.seen = torch.tensor([source.seen], dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # this step's query position
        self.host_lengths, self.host_seen = list(lengths), source.seen
        self.rope = source.rope
        self.rope._ensure(max(self.capacity, source.seen + room + 1) + 1)
        self.evictions = 0
        self.kernels = Kernels(model, fuse=False)  # the model's own modules (GraphDecoder runs them in the step)

    # ------------------------------------------------------------------ per step, on the device
    def begin_step(self, position_ids: torch.Tensor) -> None:
        self.position.copy_(self.lengths[:1] if self.shift else self.seen)
        position_ids.copy_(self.position.expand_as(position_ids))

    def end_step(self) -> None:
        self.seen += 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rope, slot = self.rope, self.lengths[layer_idx : layer_idx + 1]
        raw = rotate(key_states.float(), rope.ucos32.index_select(0, self.position), -rope.usin32.index_select(0, self.position))
        self.raw[layer_idx].index_copy_(2, slot, raw.to(self.raw.dtype))
        self.values[layer_idx].index_copy_(2, slot, value_states)
        self.origin[layer_idx].index_copy_(2, slot, self.seen.expand(*self.origin.shape[1:3], 1))
        if self.shift:
            keys = rotate(self.raw[layer_idx], rope.cos[: self.capacity], rope.sin[: self.capacity])
        else:
            where = self.origin[layer_idx]
            keys = rotate(self.raw[layer_idx], rope.cos[where], rope.sin[where])
        keys.index_copy_(2, slot, key_states)  # the new key as the model rotated it (as the exact cache returns it)
        return keys, self.values[layer_idx]

    def attend(self, layer: int, query, key, value, scaling: float) -> torch.Tensor:
        """Attention of the step's query over the layer (fp32 probabilities), then the layer's eviction."""
        batch, q_heads, _, dim = query.shape
        kv_heads = key.shape[1]
        held = self.lengths[layer] + 1
        grouped = query.float().reshape(batch, kv_heads, q_heads // kv_heads, dim)
        logits = torch.matmul(grouped, key.float().transpose(-1, -2)) * scaling
        probs = torch.softmax(logits.masked_fill(self.slots >= held, float("-inf")), dim=-1)
        out = torch.matmul(probs.to(value.dtype), value)
        self._evict(layer, probs, held)
        return out.reshape(batch, q_heads, 1, dim).transpose(1, 2).contiguous()

    def _evict(self, layer: int, probs: torch.Tensor, held: torch.Tensor) -> None:
        rule, lengths = self.rule, self.lengths[layer : layer + 1]
        if rule.budget is None:
            lengths.add_(1)
            return
        if rule.score == "accumulated":
            kept = torch.where(self.slots < held - 1, self.scores[layer], 0.0)
            self.scores[layer] = kept + probs.sum(dim=2)
            score, candidates = self.scores[layer], self.slots < held - rule.protected
        else:
            score = probs.sum(dim=(1, 2))[:, None].expand(-1, probs.shape[1], -1)
            candidates = self.slots < held
        over = held > rule.budget
        drop = torch.where(candidates, score, float("inf")).argmin(dim=-1)
        drop = torch.where(over, drop, self.capacity)  # capacity: nothing dropped
        index = (self.slots + (self.slots >= drop[..., None])).clamp_(max=self.capacity - 1)
        for buffer in (self.raw, self.values, self.origin, self.scores):
            if buffer is None:
                continue
            part = buffer[layer]
            part.copy_(part.gather(2, index[..., None].expand_as(part) if part.dim() == 4 else index))
        lengths.add_(1 - over.long())

    # ------------------------------------------------------------------ host mirror
    @property
    def host_n(self) -> int:
        return max(self.host_lengths)

    def advance(self) -> None:
        """After a step, on the host: the lengths the step left (fixed by the schedule)."""
        budget = self.rule.budget
        if budget is not None:
            self.evictions += sum(n + 1 > budget for n in self.host_lengths)
        self.host_lengths = [n + 1 if budget is None else min(n + 1, budget) for n in self.host_lengths]
        self.host_seen += 1

    def kept_positions(self) -> torch.Tensor:
        """Original token positions held, ``[layers, batch, heads, slots]`` (-1 beyond a shorter layer)."""
        beyond = self.slots[: self.host_n] >= torch.tensor(self.host_lengths, device=self.raw.device)[:, None, None, None]
        return self.origin[..., : self.host_n].masked_fill(beyond, -1)

    def decode_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.raw, self.values, self.origin, self.scores) if b is not None)

    # ------------------------------------------------------------------ Cache API used by the model
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.host_n if self.shift else self.host_seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.capacity, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    @property
    def is_compileable(self) -> bool:
        return False

    def snapshot(self) -> dict:
        names = ("raw", "values", "origin", "scores", "lengths", "seen", "position")
        return {name: getattr(self, name).clone() for name in names if getattr(self, name) is not None}

    def restore(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)
