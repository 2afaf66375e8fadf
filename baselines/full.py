"""The full (uncompressed) KV cache: transformers' own ``DynamicCache`` (``cache=full``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transformers.cache_utils import DynamicCache

from lacache.compat import compressed_layers, sliding_layers, text_config
from lacache.policy import CachePolicy


class FullCache(DynamicCache):
    """``DynamicCache`` that also reports what it held, like every policy's cache. On a hybrid model
    (Gemma 3) transformers keeps the sliding-window layers' window itself; entries are counted in the
    global layers, bytes over all layers."""

    def __init__(self, config):
        super().__init__(config=config)
        self.sliding = sliding_layers(config) or [False] * len(self.layers)
        self.last_global = compressed_layers(config)[-1]
        self.held = 0
        self.peak_slots = 0
        self.slot_steps = 0
        self.forwards = 0
        self.bytes_prefill = self.bytes_decode = 0
        self.window_bytes_sum = self.window_bytes_max = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.last_global:
            self.held = keys.shape[-2]
        if layer_idx == len(self.layers) - 1:
            n = self.held
            self.peak_slots = max(self.peak_slots, n)
            self.slot_steps += n
            self.forwards += 1
            self._bytes_per_slot = sum(
                layer.keys[..., :1, :].numel() * layer.keys.element_size()
                + layer.values[..., :1, :].numel() * layer.values.element_size()
                for layer, sliding in zip(self.layers, self.sliding) if not sliding
            )
            window = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                         for layer, sliding in zip(self.layers, self.sliding) if sliding)
            self.window_bytes_sum += window
            self.window_bytes_max = max(self.window_bytes_max, window)
            held = n * self._bytes_per_slot + window
            if key_states.shape[-2] > 1:
                self.bytes_prefill = max(self.bytes_prefill, held)
            else:
                self.bytes_decode = max(self.bytes_decode, held)
        return keys, values

    def entries_per_layer(self) -> list[int]:
        return [layer.get_seq_length() for layer, sliding in zip(self.layers, self.sliding) if not sliding]

    def stats(self) -> dict:
        per_slot = getattr(self, "_bytes_per_slot", 0)
        mean = self.slot_steps / self.forwards if self.forwards else 0.0
        window_mean = self.window_bytes_sum / self.forwards if self.forwards else 0.0
        peak = self.peak_slots * per_slot + self.window_bytes_max
        return {
            "kv_entries_per_layer_mean": mean,
            "kv_entries_per_layer_max": self.peak_slots,
            "kv_bytes_mean": mean * per_slot + window_mean,
            "kv_bytes_max": peak,
            "kv_bytes_allocated": peak,
            "kv_bytes_prefill": self.bytes_prefill,
            "kv_bytes_decode": self.bytes_decode,
            "kv_bytes_peak": peak,
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
