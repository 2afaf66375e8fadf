"""A transformers ``Cache`` whose slots can be merged or evicted, with position-shift RoPE.

Position shift (StreamingLLM, LaCache): a cached key's rotary position is its slot index in the
compacted cache and the query's is its own slot index. transformers takes a call's positions from
``get_seq_length()`` (the number of slots held), so the stock attention already rotates the query
and the new keys at their slot indices; only keys that *move* to another slot need a new rotation.

To rotate without accumulating rounding error, the cache keeps each key twice: rotated at its
current slot (what attention reads) and un-rotated ("raw", derived once at insertion in fp32).
A compaction gathers raw keys, values and original positions into the region that changed and
re-rotates just that region from the raw keys: no whole-cache re-rotation, no Python index lists,
no per-step allocation of a new cache.

All layers live in stacked buffers ``[num_layers, batch, heads, capacity, head_dim]`` so that one
gather compacts every layer at once. Subclasses decide *what* to keep (:meth:`plan`); this class
does the moving.

Compaction is lazy: a forward appends its tokens; the first layer's ``update`` of the *next*
forward applies the pending plan to all layers before appending. ``get_seq_length`` already
reports the compacted length, so positions and masks of the next call are right, and a plain
``model(ids, past_key_values=cache)`` loop works without any hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Plan:
    """What a compaction keeps. Output slots ``[start, start + m)`` take the source slots in
    ``index`` (per layer, batch, head; ``m = index.shape[-1]``, none if ``index`` is None); the
    remaining output slots ``[start + m, new_length)`` take the contiguous source slots from
    ``tail_source`` on (one slice copy for all layers: the common case of a shifting tail)."""

    start: int
    index: torch.Tensor | None  # int64 [layers | 1, batch | 1, heads | 1, m], absolute source slots
    new_length: int
    tail_source: int | None = None

    @property
    def gathered(self) -> int:
        return 0 if self.index is None else self.index.shape[-1]


@dataclass
class RingRule:
    """A policy's compaction in the terms of the fast decode path (``lacache.fast_decode``): each
    merge at ``cursor`` turns a block of ``block`` slots into the ``kept`` slots at per-layer
    ``offsets`` inside it; ``plan(n)`` gives the merges due at length ``n`` as segments with
    ``cursor`` and ``count`` (a cursor that goes back starts a new sweep); a decode step never
    holds more than ``max_length`` slots."""

    max_length: int
    block: int
    kept: int
    offsets: Sequence[int]
    cursor: int
    plan: Callable[[int], Sequence | None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` rotated by the angles of ``cos``/``sin`` (rotate_half convention; ``-sin`` rotates back)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RotaryTable:
    """cos/sin of the model's own rotary embedding (scaled variants included) at integer positions.

    Tables are kept in fp32 and in the cache's dtype; rotating in the cache's dtype matches the
    precision of the stock attention (which rotates in the model's dtype) and halves the traffic.
    The model's tables carry its ``attention_scaling`` factor ``s`` (YaRN, LongRoPE: ``s != 1``),
    so a rotated key is ``s * R(p) k``; un-rotation divides by ``s**2`` (``ucos32``/``usin32``)
    so that re-rotating a raw key gives exactly what the model would have produced.
    """

    def __init__(self, rotary_emb: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.rotary_emb, self.device, self.dtype = rotary_emb, device, dtype
        self.scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
        self.cos = self.sin = self.cos32 = self.sin32 = self.ucos32 = self.usin32 = torch.empty(0, 0, device=device)

    def _ensure(self, size: int) -> None:
        if size <= self.cos.shape[0]:
            return
        size = max(size, 2 * self.cos.shape[0], 256)
        probe = torch.empty(0, dtype=torch.float32, device=self.device)
        positions = torch.arange(size, device=self.device)[None]
        cos, sin = self.rotary_emb(probe, positions)
        self.cos32, self.sin32 = cos[0].float(), sin[0].float()
        self.ucos32, self.usin32 = self.cos32 / self.scale**2, self.sin32 / self.scale**2
        self.cos, self.sin = self.cos32.to(self.dtype), self.sin32.to(self.dtype)

    def rotate_into(self, out: torch.Tensor, x: torch.Tensor, start: int) -> None:
        """``out = x`` rotated to positions ``start..start+m-1`` (rotate_half convention), no temporaries."""
        m = x.shape[-2]
        self._ensure(start + m)
        cos, sin = self.cos[start : start + m], self.sin[start : start + m]
        half = x.shape[-1] // 2
        torch.mul(x, cos, out=out)
        out[..., :half].addcmul_(x[..., half:], sin[:, :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[:, half:])

    def unrotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Inverse rotation (by ``-position``, scale removed), in fp32: the raw key is derived once, at insertion."""
        m = x.shape[-2]
        self._ensure(start + m)
        return rotate(x.float(), self.ucos32[start : start + m], -self.usin32[start : start + m]).to(self.dtype)


def rotary_embedding_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model's rotary embedding module; position shift needs a RoPE decoder (Llama, Qwen2, Mistral, ...)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ValueError(
            f"{type(model).__name__} has no `model.rotary_emb`; position-shift cache policies need a RoPE decoder "
            "such as Llama, Qwen2 or Mistral"
        )
    return rotary


class CompactingLayer(DynamicLayer):
    """One layer's view of the stacked buffers; the owning cache does the bookkeeping."""

    def __init__(self, owner: "CompactingCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner._append(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a compacting cache holds one sequence; build a new one per sequence")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compacting cache cannot be cropped")

    @property
    def keys(self):
        return self.owner._view("keys", self.index)

    @keys.setter
    def keys(self, value):
        pass  # DynamicLayer.__init__ assigns None; the owner's buffers are the storage

    @property
    def values(self):
        return self.owner._view("values", self.index)

    @values.setter
    def values(self, value):
        pass


class CompactingCache(Cache):
    """Base class of the merging/evicting policies: stacked buffers + position shift + lazy compaction."""

    #: Slots allocated beyond the steady-state need so that decode never reallocates.
    slack = 8

    def __init__(self, model: torch.nn.Module, capacity: int):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = config.num_hidden_layers
        super().__init__(layers=[CompactingLayer(self, i) for i in range(self.num_layers)])
        self.rotary_emb = rotary_embedding_of(model)
        self.initial_capacity = capacity + self.slack
        self.length = 0  # slots held (all layers equal), before the pending plan
        self.pending: Plan | None = None
        self.seen = 0  # tokens appended so far (= next token's original position)
        self.keys = self.raw_keys = self.values = self.positions = None
        self.rope: RotaryTable | None = None
        self.peak_slots = 0
        self.slot_steps = 0  # sum over forwards of slots held, for the mean
        self.forwards = 0

    # ------------------------------------------------------------------ policy hooks
    def plan(self, length: int) -> Plan | None:
        """Called after each forward with the slots held; return what to keep (``None``: keep all)."""
        raise NotImplementedError

    def on_append(self, layer: int, start: int, count: int) -> None:
        """Called after a layer's new tokens were written at ``[start, start+count)`` (for score keeping)."""

    def on_compact(self, plan: Plan) -> None:
        """Called after a plan was applied to every buffer (subclasses move their own per-slot state)."""

    def ring_rule(self) -> RingRule | None:
        """The policy as merges for the fast decode path; ``None``: exact decode only."""
        return None

    # ------------------------------------------------------------------ transformers Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pending.new_length if self.pending is not None else self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    # ------------------------------------------------------------------ storage
    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        batch, heads, _, dim = key_states.shape
        shape = (self.num_layers, batch, heads, capacity, dim)
        old = (self.keys, self.raw_keys, self.values, self.positions)
        self.keys = key_states.new_empty(shape)
        self.raw_keys = key_states.new_empty(shape)
        self.values = value_states.new_empty(shape[:-1] + (value_states.shape[-1],))
        self.positions = torch.empty(shape[:-1], dtype=torch.long, device=key_states.device)
        if old[0] is not None:
            n = self.length
            for new, prev in zip((self.keys, self.raw_keys, self.values, self.positions), old):
                new[:, :, :, :n].copy_(prev[:, :, :, :n])
        if self.rope is None:
            self.rope = RotaryTable(self.rotary_emb, key_states.device, key_states.dtype)

    def _view(self, name: str, layer: int):
        buffer = getattr(self, name)
        if buffer is None:
            return None
        return buffer[layer, :, :, : self.length]

    def _append(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if layer == 0:
            self._begin_forward(key_states, value_states)
        n, q = self.length, key_states.shape[-2]
        self.keys[layer, :, :, n : n + q] = key_states
        self.raw_keys[layer, :, :, n : n + q] = self.rope.unrotate(key_states, n)
        self.values[layer, :, :, n : n + q] = value_states
        self.on_append(layer, n, q)
        if layer == self.num_layers - 1:
            self._end_forward(q)
        end = n + q
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def _begin_forward(self, key_states, value_states) -> None:
        if self.pending is not None:
            self._apply(self.pending)
            self.pending = None
        q = key_states.shape[-2]
        needed = self.length + q
        if self.keys is None or needed > self.keys.shape[3]:
            capacity = max(needed + self.slack, self.initial_capacity)
            if self.keys is not None:
                capacity = max(capacity, int(self.keys.shape[3] * 1.5))
            self._allocate(key_states, value_states, capacity)
        self.positions[:, :, :, self.length : needed] = torch.arange(self.seen, self.seen + q, device=self.positions.device)

    def _end_forward(self, q: int) -> None:
        self.length += q
        self.seen += q
        self.forwards += 1
        self.peak_slots = max(self.peak_slots, self.length)
        self.slot_steps += self.length
        self.pending = self.plan(self.length)

    def move(self, buffer: torch.Tensor, plan: Plan) -> None:
        """Apply ``plan`` in place to one per-slot buffer ``[L, B, H, capacity(, D)]`` holding ``self.length`` slots."""
        n = self.length
        start, m = plan.start, plan.gathered
        if m:
            index = plan.index.expand(*buffer.shape[:3], m)
            if buffer.dim() == 5:
                index = index[..., None].expand(*index.shape, buffer.shape[-1])
            gathered = torch.gather(buffer[:, :, :, :n], 3, index)
        if plan.tail_source is not None:
            count = plan.new_length - start - m
            tail = buffer[:, :, :, plan.tail_source : plan.tail_source + count].clone()  # source and target overlap
            buffer[:, :, :, start + m : plan.new_length] = tail
        if m:
            buffer[:, :, :, start : start + m] = gathered

    def _apply(self, plan: Plan) -> None:
        """Move the kept slots into ``[start, new_length)`` and re-rotate exactly that region."""
        for buffer in (self.raw_keys, self.values, self.positions):
            self.move(buffer, plan)
        start, end = plan.start, plan.new_length
        self.rope.rotate_into(self.keys[:, :, :, start:end], self.raw_keys[:, :, :, start:end], start)
        self.on_compact(plan)
        self.length = plan.new_length

    # ------------------------------------------------------------------ reporting
    def kept_positions(self) -> torch.Tensor:
        """Original token positions held, ``[layers, batch, heads, slots]`` (after any pending compaction)."""
        held = self.positions[:, :, :, : self.length].clone()
        if self.pending is not None:
            self.move(held, self.pending)
            held = held[..., : self.pending.new_length]
        return held

    def entries_per_layer(self) -> list[int]:
        return [self.get_seq_length()] * self.num_layers

    def bytes_per_slot(self) -> int:
        """Bytes one slot costs over all layers: rotated key + raw key + value (+ position index)."""
        if self.keys is None:
            return 0
        L, B, H, _, D = self.keys.shape
        per = B * H * (2 * D * self.keys.element_size() + self.values.shape[-1] * self.values.element_size() + 8)
        return L * per

    def stats(self) -> dict:
        """KV entries and bytes held: mean and max over forwards, as the harness records them."""
        mean_slots = self.slot_steps / self.forwards if self.forwards else 0.0
        return {
            "kv_entries_per_layer_mean": mean_slots,
            "kv_entries_per_layer_max": self.peak_slots,
            "kv_bytes_mean": mean_slots * self.bytes_per_slot(),
            "kv_bytes_max": self.peak_slots * self.bytes_per_slot(),
            "kv_bytes_allocated": (self.keys.shape[3] * self.bytes_per_slot()) if self.keys is not None else 0,
        }
