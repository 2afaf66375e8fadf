"""LaCache the way the reference code does it per step, re-implemented from the spec (``cache=lacache_reference``).

For benchmarks: same kept positions as ``cache=lacache`` (same :class:`lacache.ladder.LadderState`,
so the same scores), but the reference's costs (spec section 4.1): every compaction builds a
Python index list per layer, copies it to the device and gathers each layer's keys and values
into new tensors; keys are stored un-rotated and the *whole* key cache of every layer is rotated
afresh on every forward; the cache grows by concatenation. This is not the reference's code,
only its method, so that "LaCache vs the reference method" is a ratio measured in one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lacache.compat import sliding_layers, text_config
from lacache.kvcache import RotaryTable, rotary_embedding_of
from lacache.ladder import Ladder, LadderState
from lacache.ladder_cache import LaCachePolicy
from lacache.policy import PolicyConfigError


class ReferenceLadderCache(Cache):
    def __init__(self, model, ladder: Ladder, budget: int, sink: int):
        self.num_layers = text_config(model.config).num_hidden_layers
        super().__init__(layers=[DynamicLayer() for _ in range(self.num_layers)])
        self.state = LadderState(ladder, budget, sink)
        self.rotary_emb = rotary_embedding_of(model)
        self.rope: RotaryTable | None = None
        self.raw_keys: list[torch.Tensor | None] = [None] * self.num_layers
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self.pending = None
        self.peak_slots = self.slot_steps = self.forwards = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.pending is not None:
            return self.pending.new_length
        return 0 if self.values[0] is None else self.values[0].shape[2]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def _compact(self) -> None:
        compaction, self.pending = self.pending, None
        device = self.values[0].device
        for layer in range(self.num_layers):
            index = list(range(compaction.length))
            for segment in compaction.segments:  # a Python list of ~budget ints per layer, as in the reference
                index = [index[j] for j in self.state.kept_sources(layer, segment, len(index))]
            where = torch.as_tensor(index, device=device)
            self.raw_keys[layer] = self.raw_keys[layer].index_select(2, where)
            self.values[layer] = self.values[layer].index_select(2, where)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            if self.pending is not None:
                self._compact()
            if self.rope is None:
                self.rope = RotaryTable(self.rotary_emb, key_states.device, key_states.dtype)
        n = 0 if self.values[layer_idx] is None else self.values[layer_idx].shape[2]
        raw = self.rope.unrotate(key_states, n)
        if self.values[layer_idx] is None:
            self.raw_keys[layer_idx], self.values[layer_idx] = raw, value_states
        else:
            self.raw_keys[layer_idx] = torch.cat([self.raw_keys[layer_idx], raw], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        length = self.values[layer_idx].shape[2]
        keys = torch.empty_like(self.raw_keys[layer_idx])
        self.rope.rotate_into(keys, self.raw_keys[layer_idx], 0)  # whole-key re-rotation, every layer, every forward
        if layer_idx == self.num_layers - 1:
            self.forwards += 1
            self.peak_slots = max(self.peak_slots, length)
            self.slot_steps += length
            self.pending = self.state.plan(length)
        return keys, self.values[layer_idx]

    def stats(self) -> dict:
        per_slot = sum(k.shape[0] * k.shape[1] * (k.shape[3] * k.element_size() + v.shape[3] * v.element_size())
                       for k, v in zip(self.raw_keys, self.values) if k is not None)
        mean = self.slot_steps / self.forwards if self.forwards else 0.0
        return {"kv_entries_per_layer_mean": mean, "kv_entries_per_layer_max": self.peak_slots,
                "kv_bytes_mean": mean * per_slot, "kv_bytes_max": self.peak_slots * per_slot,
                "kv_bytes_allocated": self.peak_slots * per_slot}


@dataclass
class ReferenceLaCachePolicy(LaCachePolicy):
    """LaCache's kept positions at the reference method's cost (benchmark baseline; clearly not the fast path)."""

    name: ClassVar[str] = "lacache_reference"
    fast_decode: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compact_every != 1:
            raise ValueError(f"lacache_reference compacts after every forward, as the reference does (compact_every={self.compact_every})")

    def check(self, model_config) -> None:
        super().check(model_config)
        if sliding_layers(model_config) is not None:
            raise PolicyConfigError(
                "lacache_reference re-enacts the reference code's costs on a model whose layers are all global; this "
                "model has sliding-window layers (Gemma 2/3): use cache=lacache, whose ladder spans its global layers"
            )

    def make_cache(self, model, prompt_length: int | None = None) -> ReferenceLadderCache:
        self.check(model.config)
        fast = super().make_cache(model, prompt_length)  # validated budget, sink and ladder
        return ReferenceLadderCache(model, fast.ladder, fast.state.budget, fast.state.sink)
