"""The full (uncompressed) KV cache: transformers' own ``DynamicCache`` (``cache=full``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transformers.cache_utils import DynamicCache

from lacache.compat import text_config
from lacache.policy import CachePolicy


class FullCache(DynamicCache):
    """``DynamicCache`` that also reports what it held, like every policy's cache."""

    def __init__(self, config):
        super().__init__(config=config)
        self.peak_slots = 0
        self.slot_steps = 0
        self.forwards = 0
        self.bytes_prefill = self.bytes_decode = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            n = keys.shape[-2]
            self.peak_slots = max(self.peak_slots, n)
            self.slot_steps += n
            self.forwards += 1
            self._bytes_per_slot = sum(
                layer.keys[..., :1, :].numel() * layer.keys.element_size()
                + layer.values[..., :1, :].numel() * layer.values.element_size()
                for layer in self.layers
            )
            held = n * self._bytes_per_slot
            if key_states.shape[-2] > 1:
                self.bytes_prefill = max(self.bytes_prefill, held)
            else:
                self.bytes_decode = max(self.bytes_decode, held)
        return keys, values

    def entries_per_layer(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.layers]

    def stats(self) -> dict:
        per_slot = getattr(self, "_bytes_per_slot", 0)
        mean = self.slot_steps / self.forwards if self.forwards else 0.0
        return {
            "kv_entries_per_layer_mean": mean,
            "kv_entries_per_layer_max": self.peak_slots,
            "kv_bytes_mean": mean * per_slot,
            "kv_bytes_max": self.peak_slots * per_slot,
            "kv_bytes_allocated": self.peak_slots * per_slot,
            "kv_bytes_prefill": self.bytes_prefill,
            "kv_bytes_decode": self.bytes_decode,
            "kv_bytes_peak": self.peak_slots * per_slot,
        }


@dataclass
class FullCachePolicy(CachePolicy):
    """Keeps every token: the accuracy ceiling and the memory floor to beat."""

    name: ClassVar[str] = "full"
    exact_chunks: ClassVar[bool] = True
    fast_decode: ClassVar[bool] = True
    ring_decode: ClassVar[bool] = True
    hf_generate: ClassVar[bool] = True

    def make_cache(self, model, prompt_length=None) -> FullCache:
        return FullCache(text_config(model.config))
