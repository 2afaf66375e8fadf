"""A transformers ``Cache`` whose slots can be merged or evicted, with position-shift RoPE.

Position shift (StreamingLLM, LaCache, H2O's streaming code): a cached key's rotary position is
its slot index in the compacted cache and the query's is its own slot index. transformers takes a
call's positions from ``get_seq_length()`` (the number of slots held), so the stock attention
rotates the query and the new keys at their slot indices. Policies whose reference keeps original
positions (``position_mode = "original"``: SnapKV, TOVA, PyramidKV) report the number of tokens
seen instead, so the query sits at its true position and each key at its own.

Storage holds what a key *is*, not where it sits: un-rotated ("raw") keys, values and original
positions, in stacked buffers ``[num_layers, batch, heads, capacity, head_dim]`` so that one
gather compacts every layer at once. A compaction only moves slots; nothing is re-rotated. Each
layer's ``update`` returns its held keys rotated at their current positions (the reference's
"rotate at attention time"): a transient of one layer, so the cache holds ``budget`` plain K + V
entries and no second copy of the keys, and a key never accumulates rounding from repeated
re-rotation. New keys are returned as the model rotated them.

Memory: buffers grow as needed (a full prefill holds the whole prompt once) and shrink back to
``budget + slack`` slots at the first compaction that makes room, one buffer at a time.

Compaction is lazy: a forward appends its tokens; the policy's :meth:`plan` runs at the first
question asked after the forward (``get_seq_length``, the next forward), i.e. after every layer's
attention of that forward ran, so score-based policies see complete scores; the plan is applied
by the first layer's ``update`` of the next forward. A plain ``model(ids, **cache_kwarg(model, cache))``
loop (:mod:`lacache.compat`) works without any hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lacache.compat import GLOBAL, compressed_layers, sliding_layers, text_config


@dataclass
class Plan:
    """What a compaction keeps. Output slots ``[start, start + m)`` take the source slots in
    ``index`` (per layer, batch, head; ``m = index.shape[-1]``, none if ``index`` is None); the
    remaining output slots ``[start + m, new_length)`` take the contiguous source slots from
    ``tail_source`` on (one slice copy for all layers: the common case of a shifting tail).
    ``lengths``: per-layer slots kept when layers keep different counts (layer ``l`` keeps the first
    ``lengths[l]`` of its ``index`` row; ``new_length`` is their maximum); only for caches whose
    ``position_mode`` is ``"original"``, where a query's position does not depend on a layer's length."""

    start: int
    index: torch.Tensor | None  # int64 [layers | 1, batch | 1, heads | 1, m], absolute source slots
    new_length: int
    tail_source: int | None = None
    lengths: Sequence[int] | None = None

    @property
    def gathered(self) -> int:
        return 0 if self.index is None else self.index.shape[-1]


@dataclass
class RingRule:
    """A policy's compaction in the terms of the fast decode path (``lacache.decode``): each
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


@dataclass
class EvictionRule:
    """A policy's decode in the terms of the fast decode path for evicting policies
    (:mod:`lacache.decode.eviction`): after each step's attention, a layer holding more than
    ``budget`` entries drops one, the lowest-scored (``score``: ``"accumulated"``: the attention
    every query paid it, per KV head, H2O; ``"last"``: the step's own attention summed over the
    layer's heads, one choice per layer, TOVA); the newest ``protected`` entries are never dropped.
    ``budget=None``: decode only appends (SnapKV, PyramidKV after the prompt)."""

    budget: int | None = None
    score: str = "none"  # none | accumulated | last
    protected: int = 0


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
    so that re-rotating a raw key gives exactly what the model would have produced. ``layer_type``:
    the layers' type on a hybrid model, whose rotary embedding has one base per type (Gemma 3:
    ``full_attention`` 1M, ``sliding_attention`` 10K).
    """

    def __init__(self, rotary_emb: torch.nn.Module, device: torch.device, dtype: torch.dtype, layer_type: str | None = None):
        self.rotary_emb, self.device, self.dtype = rotary_emb, device, dtype
        self.layer_type = layer_type  # a hybrid model's rotary takes the layer type (one base per type)
        self.scale = rotary_scale(rotary_emb, layer_type)
        self.cos = self.sin = self.cos32 = self.sin32 = self.ucos32 = self.usin32 = torch.empty(0, 0, device=device)
        self.pairs = self.unpairs32 = torch.empty(0, 2, 0, device=device)

    def _ensure(self, size: int) -> None:
        if size <= self.cos.shape[0]:
            return
        size = max(size, 2 * self.cos.shape[0], 256)
        probe = torch.empty(0, dtype=torch.float32, device=self.device)
        positions = torch.arange(size, device=self.device)[None]
        cos, sin = rotary_tables(self.rotary_emb, probe, positions, self.layer_type)
        self.cos32, self.sin32 = cos[0].float(), sin[0].float()
        self.ucos32, self.usin32 = self.cos32 / self.scale**2, self.sin32 / self.scale**2
        self.cos, self.sin = self.cos32.to(self.dtype), self.sin32.to(self.dtype)
        half = self.cos.shape[-1] // 2
        signed = torch.cat((-torch.ones(half, device=self.device), torch.ones(half, device=self.device)))
        self.pairs = torch.stack((self.cos, self.sin * signed.to(self.dtype)), dim=1)  # [P, 2, D]: cos, signed sin
        self.unpairs32 = torch.stack((self.ucos32, -self.usin32 * signed), dim=1)

    def _rotate(self, x: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`rotate` with ``pairs[..., 0, :]`` = cos and ``pairs[..., 1, :]`` = sin with its first half
        negated: ``rotate_half(x) * sin`` is ``x``'s halves swapped times that, the same products bit for
        bit (a sign flip is exact), each half written in place (no gather); one table read for both.
        ``out``: where the sum goes (e.g. the head of the keys attention reads, saving a concatenation)."""
        half = x.shape[-1] // 2
        swapped = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, pairs.dtype), device=x.device)
        torch.mul(x[..., half:], pairs[..., 1, :half], out=swapped[..., :half])
        torch.mul(x[..., :half], pairs[..., 1, half:], out=swapped[..., half:])
        return torch.add(x * pairs[..., 0, :], swapped, out=out)

    def rotate_into(self, out: torch.Tensor, x: torch.Tensor, start: int) -> None:
        """``out = x`` rotated to positions ``start..start+m-1`` (rotate_half convention), no temporaries."""
        m = x.shape[-2]
        self._ensure(start + m)
        cos, sin = self.cos[start : start + m], self.sin[start : start + m]
        half = x.shape[-1] // 2
        torch.mul(x, cos, out=out)
        out[..., :half].addcmul_(x[..., half:], sin[:, :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[:, half:])

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor, bound: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[..., m, D]`` rotated to per-slot ``positions`` ``[..., m]`` (each head may differ), all
        below ``bound`` (known on the host: reading the tensor's maximum would wait for the device)."""
        self._ensure(bound)
        return self._rotate(x, self.pairs[positions.long()], out)

    def rotate(self, x: torch.Tensor, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[..., count, D]`` rotated to positions ``0..count-1``."""
        self._ensure(count)
        return self._rotate(x, self.pairs[:count], out)

    def unrotate(self, x: torch.Tensor, start: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse rotation (by ``-position``, scale removed) to positions ``start..start+m-1``, in fp32
        (``x`` is promoted as it is read) and rounded once to the cache's dtype, into ``out`` if given:
        the raw key is derived once, at insertion."""
        m = x.shape[-2]
        self._ensure(start + m)
        raw = self._rotate(x, self.unpairs32[start : start + m])
        return raw.to(self.dtype) if out is None else out.copy_(raw)


def rotary_tables(rotary_emb: torch.nn.Module, probe: torch.Tensor, positions: torch.Tensor, layer_type: str | None = None):
    """The model's own ``(cos, sin)`` at ``positions``; a hybrid model's rotary takes the layer type."""
    return rotary_emb(probe, positions) if layer_type is None else rotary_emb(probe, positions, layer_type)


def rotary_scale(rotary_emb: torch.nn.Module, layer_type: str | None = None) -> float:
    """The rotary tables' ``attention_scaling`` factor (1 for plain RoPE), of ``layer_type``'s tables on a hybrid model."""
    scale = getattr(rotary_emb, f"{layer_type}_attention_scaling", None) if layer_type is not None else None
    return float(scale or getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)


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


class SlidingWindow:
    """The sliding-window layers of a hybrid model (Gemma 2/3), kept as the model's own cache keeps them.

    Each such layer holds the newest ``window - 1`` tokens between forwards, so that every query
    attends to itself and the ``window - 1`` tokens before it, whatever the policy does to the global
    layers. Keys are held rotated at their original positions, with the sliding layers' own rotary
    base, as the model's cache holds them.

    Position bookkeeping: a forward's queries sit at ``q0, q0 + 1, ...`` with ``q0 = get_seq_length()``
    (the policy's convention: slots held for position shift, tokens seen for original positions), in
    every layer, since the model computes one set of positions for both layer types. Its first token's
    original position is ``seen``, so the forward's frame is shifted by ``shift = seen - q0`` (0 for
    original positions, and for position shift until the first compaction). A held key at original
    position ``j`` must be read at ``j - shift`` (its true distance to every query; it may be negative
    when the global layers hold fewer slots than the window), so it is rotated by ``-shift`` when
    read; the forward's new keys, which the model rotated at ``j - shift``, are attended as they are
    and stored rotated by ``+shift``. With ``shift = 0`` nothing is rotated: the layers are the
    model's own sliding cache, bit for bit. The mask: the model builds the sliding layers' mask from
    ``get_mask_sizes``, i.e. keys at ``q0 - held .. q0 - 1`` then the new tokens, its own window rule.
    """

    def __init__(self, rotary_emb: torch.nn.Module, window: int):
        if window < 1:
            raise ValueError(f"sliding_window={window} must be >= 1")
        self.rotary_emb, self.window = rotary_emb, window
        self.keys: dict[int, torch.Tensor] = {}  # model layer -> [B, H, n, D], rotated at original positions
        self.values: dict[int, torch.Tensor] = {}
        self.shift = 0
        self.turns: tuple[torch.Tensor, ...] | None = None  # fp32 cos/sin of +shift, then of -shift

    def held(self, seen: int) -> int:
        """Tokens each sliding layer holds between forwards after ``seen`` tokens."""
        return min(seen, self.window - 1)

    def begin(self, shift: int, like: torch.Tensor) -> None:
        """Set this forward's frame shift (``seen - q0``)."""
        if shift != self.shift or (shift and self.turns is None):
            self.shift = shift
            self.turns = None
            if shift:
                probe = torch.empty(0, dtype=torch.float32, device=like.device)
                positions = torch.tensor([[shift, -shift]], device=like.device)
                cos, sin = rotary_tables(self.rotary_emb, probe, positions, "sliding_attention")
                cos, sin = cos[0].float(), sin[0].float()
                self.turns = (cos[0], sin[0], cos[1], sin[1])

    @staticmethod
    def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = x`` rotated by one angle (rotate-half convention), three kernels and no temporaries."""
        half = x.shape[-1] // 2
        torch.mul(x, cos, out=out)
        out[..., :half].addcmul_(x[..., half:], sin[:half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[half:])
        return out

    def append(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Attend the held tokens and the new ones (keys read at ``j - shift``); keep the newest ``window - 1``."""
        held_keys, held_values = self.keys.get(layer), self.values.get(layer)
        if self.shift:  # stored at original positions: the model rotated the new keys at j - shift
            stored = self.turn(key_states, *self.turns[:2], out=torch.empty_like(key_states))
        else:
            stored = key_states
        if held_keys is None:
            keys, values, stored_all = key_states, value_states, stored
        else:
            stored_all = torch.cat([held_keys, stored], dim=-2)
            values = torch.cat([held_values, value_states], dim=-2)
            if self.shift:  # the held keys read at j - shift, the new ones as the model gave them
                n = held_keys.shape[-2]
                keys = torch.empty_like(stored_all)
                self.turn(held_keys, *self.turns[2:], out=keys[:, :, :n])
                keys[:, :, n:] = key_states
            else:
                keys = stored_all
        n, q = values.shape[-2], key_states.shape[-2]
        start = max(0, n - (self.window - 1))
        keep = (lambda t: t[:, :, start:].clone()) if q > 1 else (lambda t: t[:, :, start:])  # a prefill's bulk is freed
        self.keys[layer], self.values[layer] = keep(stored_all), keep(values)
        return keys, values

    def read_keys(self, layer: int) -> torch.Tensor | None:
        """The layer's held keys as the next forward reads them (rotated at ``j - shift``)."""
        held = self.keys.get(layer)
        if held is None or not self.shift:
            return held
        return self.turn(held, *self.turns[2:], out=torch.empty_like(held))

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())


class CompactingLayer(DynamicLayer):
    """One layer's view of the stacked buffers; the owning cache does the bookkeeping. ``index``: the
    layer among those the policy compresses; ``model_layer``: its index in the model (the same unless
    the model is hybrid)."""

    def __init__(self, owner: "CompactingCache", index: int, model_layer: int | None = None):
        super().__init__()
        self.owner, self.index = owner, index
        self.model_layer = index if model_layer is None else model_layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner.update_layer(self.model_layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_mask_sizes(query_length, self.model_layer)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a compacting cache holds one sequence; build a new one per sequence")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compacting cache cannot be cropped")

    @property
    def keys(self):
        """This layer's held keys rotated as attention reads them (computed: the cache stores raw keys)."""
        return self.owner.rotated_keys(self.index)

    @keys.setter
    def keys(self, value):
        pass  # DynamicLayer.__init__ assigns None; the owner's buffers are the storage

    @property
    def values(self):
        return self.owner._view("values", self.index)

    @values.setter
    def values(self, value):
        pass


class SlidingLayer(CompactingLayer):
    """A sliding-window layer of a hybrid model: the owner's :class:`SlidingWindow` holds it."""

    is_sliding = True

    @property
    def keys(self):
        return self.owner.sliding.read_keys(self.model_layer)

    @keys.setter
    def keys(self, value):
        pass

    @property
    def values(self):
        return self.owner.sliding.values.get(self.model_layer)

    @values.setter
    def values(self, value):
        pass


class CompactingCache(Cache):
    """Base class of the merging/evicting policies: stacked raw buffers + rotation at read + lazy compaction."""

    #: Slots allocated beyond the steady-state need so that decode never reallocates.
    slack = 8
    #: "shift": keys at their slot index, the query at the slot count; "original": every token keeps its own position.
    position_mode: ClassVar[str] = "shift"
    #: Names of the per-slot buffers; resized together (subclasses add their own, e.g. scores).
    per_slot: ClassVar[tuple[str, ...]] = ("raw_keys", "values", "positions")

    def __init__(self, model: torch.nn.Module, capacity: int):
        config = text_config(model.config)
        sliding = sliding_layers(config)
        self.model_layers = config.num_hidden_layers
        self.global_layers = compressed_layers(config)  # the model layers the policy compresses
        self.num_layers = len(self.global_layers)  # a policy's layer index counts those
        slot = {layer: i for i, layer in enumerate(self.global_layers)}
        self.compressed_index = [slot.get(layer) for layer in range(self.model_layers)]
        super().__init__(layers=[CompactingLayer(self, slot[i], i) if i in slot else SlidingLayer(self, i, i)
                                 for i in range(self.model_layers)])
        self.rotary_emb = rotary_embedding_of(model)
        self.sliding = None if sliding is None else SlidingWindow(self.rotary_emb, config.sliding_window)
        self.layer_type = None if sliding is None else GLOBAL  # the global layers' rotary base
        self.initial_capacity = capacity + self.slack
        self.length = 0  # slots held (the longest layer), before the pending plan
        self.layer_lengths: list[int] | None = None  # per layer when they differ (Plan.lengths)
        self.pending: Plan | None = None
        self.planned = True  # False between a forward and the plan made for it
        self.seen = 0  # tokens appended so far (= next token's original position)
        self.raw_keys = self.values = self.positions = None
        self.rope: RotaryTable | None = None
        self.peak_slots = 0
        self.slot_steps = 0  # sum over forwards of slots held, for the mean
        self.forwards = 0
        self.bytes_prefill = self.bytes_decode = self.bytes_peak = 0
        self.window_bytes_sum = self.window_bytes_max = 0  # sliding layers (hybrid models)

    # ------------------------------------------------------------------ policy hooks
    def plan(self, length: int) -> Plan | None:
        """Called once after each forward (after every layer's attention ran) with the slots held;
        return what to keep (``None``: keep all)."""
        raise NotImplementedError

    def on_append(self, layer: int, start: int, count: int, keys: torch.Tensor) -> None:
        """Called after a layer's new tokens were written at ``[start, start+count)``; ``keys`` are the
        layer's keys ``[batch, heads, start+count, dim]`` rotated as attention reads them (for scoring)."""

    def on_compact(self, plan: Plan) -> None:
        """Called after a plan was applied to every buffer (subclasses move their own per-slot state)."""

    def ring_rule(self) -> RingRule | None:
        """The policy as merges for the fast decode path; ``None``: exact decode only."""
        return None

    def eviction_rule(self) -> EvictionRule | None:
        """The policy's decode for the evicting fast path (:mod:`lacache.decode.eviction`); ``None``: none."""
        return None

    # ------------------------------------------------------------------ transformers Cache API
    def _settle(self) -> None:
        """Make the plan for the last forward (its attention has run in every layer by now)."""
        if not self.planned:
            self.planned = True
            self.pending = self.plan(self.length)

    def held(self) -> int:
        """Slots held after the pending plan (the longest layer)."""
        self._settle()
        return self.pending.new_length if self.pending is not None else self.length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen if self.position_mode == "original" else self.held()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self.sliding is not None and self.compressed_index[layer_idx] is None:
            held = self.sliding.held(self.seen)  # the newest tokens, at query frame positions q0 - held .. q0 - 1
            return held + query_length, self.get_seq_length() - held
        held = self.held()
        return held + query_length, (self.seen - held if self.position_mode == "original" else 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    # ------------------------------------------------------------------ storage
    @property
    def capacity(self) -> int:
        """Slots allocated per layer."""
        return 0 if self.raw_keys is None else self.raw_keys.shape[3]

    def slot_buffers(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor ``[L, B, H, capacity, ...]`` the cache holds, by attribute name (:attr:`per_slot`)."""
        return {name: getattr(self, name) for name in self.per_slot if getattr(self, name, None) is not None}

    def allocated_bytes(self) -> int:
        """Bytes of every tensor the cache holds (raw keys, values, positions, a subclass's per-slot state)."""
        return sum(b.numel() * b.element_size() for b in self.slot_buffers().values())

    def _resize(self, capacity: int) -> None:
        """Re-allocate every per-slot buffer to ``capacity`` slots, keeping the held ones; one buffer at
        a time, so the transient is one buffer, never a second copy of the cache."""
        n = self.length
        for name in list(self.slot_buffers()):
            old = getattr(self, name)
            fresh = old.new_zeros(old.shape[:3] + (capacity,) + old.shape[4:])
            fresh[:, :, :, :n].copy_(old[:, :, :, :n])
            self.bytes_peak = max(self.bytes_peak, self.allocated_bytes() + fresh.numel() * fresh.element_size())
            setattr(self, name, fresh)
            del old

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        if self.raw_keys is not None:
            self._resize(capacity)
            return
        batch, heads, _, dim = key_states.shape
        shape = (self.num_layers, batch, heads, capacity)
        self.raw_keys = key_states.new_empty(shape + (dim,))
        self.values = value_states.new_empty(shape + (value_states.shape[-1],))
        self.positions = torch.zeros(shape, dtype=torch.int32, device=key_states.device)
        self.rope = RotaryTable(self.rotary_emb, key_states.device, key_states.dtype, self.layer_type)

    def layer_length(self, layer: int) -> int:
        return self.length if self.layer_lengths is None else self.layer_lengths[layer]

    def _view(self, name: str, layer: int):
        buffer = getattr(self, name)
        if buffer is None:
            return None
        return buffer[layer, :, :, : self.layer_length(layer)]

    def rotated_keys(self, layer: int, count: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The first ``count`` (default: all held) keys of ``layer`` rotated at their current positions
        (into ``out`` if given)."""
        if self.raw_keys is None:
            return None
        n = self.layer_length(layer) if count is None else count
        raw = self.raw_keys[layer, :, :, :n]
        if self.position_mode == "original":
            return self.rope.rotate_at(raw, self.positions[layer, :, :, :n], self.seen, out)
        return self.rope.rotate(raw, n, out)

    def update_layer(self, model_layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """One model layer's update: a forward begins at the model's first layer and ends at its last."""
        if model_layer == 0:
            self._begin_forward(key_states, value_states)
        layer = self.compressed_index[model_layer]
        if layer is None:
            out = self.sliding.append(model_layer, key_states, value_states)
        else:
            out = self._append(layer, key_states, value_states)
        if model_layer == self.model_layers - 1:
            self._end_forward(key_states.shape[-2])
        return out

    def _append(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        n, q = self.layer_length(layer), key_states.shape[-2]
        if self.layer_lengths is not None and q > 1:
            raise ValueError(
                f"{type(self).__name__}: its layers hold different numbers of slots, so one causal mask cannot "
                "serve a multi-token forward; feed the following tokens one at a time"
            )
        if self.layer_lengths is not None:  # else _begin_forward wrote every layer's positions at once
            self.positions[layer, :, :, n : n + q] = self.seen
        # new tokens sit at positions seen.. (original) or at their slots n.. (shift): the same for every head
        self.rope.unrotate(key_states, self.seen if self.position_mode == "original" else n, out=self.raw_keys[layer, :, :, n : n + q])
        self.values[layer, :, :, n : n + q] = value_states
        if n == 0:
            keys = key_states  # nothing held before: the model's own keys are the whole layer
        else:  # held keys rotated straight into the head of the layer's keys, the new ones after them
            keys = key_states.new_empty(key_states.shape[:2] + (n + q, key_states.shape[-1]))
            self.rotated_keys(layer, n, out=keys[:, :, :n])
            keys[:, :, n:] = key_states
        self.on_append(layer, n, q, keys)
        return keys, self.values[layer, :, :, : n + q]

    def apply_pending(self) -> bool:
        """Make and apply the plan of the last forward now (True if it compacted anything): the cache's
        buffers then hold exactly what the next forward reads (e.g. before the fast path converts them)."""
        self._settle()
        if self.pending is None:
            return False
        self._apply(self.pending)
        self.pending = None
        return True

    def _begin_forward(self, key_states, value_states) -> None:
        compacted = self.apply_pending()
        q = key_states.shape[-2]
        needed = self.length + q
        fits = max(self.initial_capacity, needed + self.slack)
        if self.raw_keys is None or needed > self.capacity:
            room = q if q < self.initial_capacity else 0  # a prefill chunk: the next one of its size fits too
            grown = self.capacity * 5 // 4 if q == 1 else 0  # decoding without compaction (SnapKV): amortised growth
            self._allocate(key_states, value_states, max(fits, self.initial_capacity + room, grown))
        elif compacted and q == 1 and self.capacity > fits:
            self._resize(fits)  # decoding after a compaction: give a prefill's extra memory back
        if self.layer_lengths is None:  # one write for every layer (a chunk's 32 layers: 2 kernels, not 64)
            self.positions[:, :, :, self.length : needed].copy_(
                torch.arange(self.seen, self.seen + q, device=self.positions.device, dtype=self.positions.dtype))
        if self.sliding is not None:  # this forward's queries sit at q0 = get_seq_length(), token `seen` at q0
            self.sliding.begin(self.seen - (self.seen if self.position_mode == "original" else self.length), key_states)

    def _end_forward(self, q: int) -> None:
        self.length += q
        if self.layer_lengths is not None:
            self.layer_lengths = [n + q for n in self.layer_lengths]
        self.seen += q
        self.forwards += 1
        self.peak_slots = max(self.peak_slots, self.length)
        self.slot_steps += self.length
        allocated = self.allocated_bytes()
        if self.sliding is not None:  # the sliding layers' tokens, on top of the compressed layers' slots
            window = self.sliding.allocated_bytes()
            self.window_bytes_sum += window
            self.window_bytes_max = max(self.window_bytes_max, window)
            allocated += window
        self.bytes_peak = max(self.bytes_peak, allocated)
        if q > 1:
            self.bytes_prefill = max(self.bytes_prefill, allocated)
        else:
            self.bytes_decode = max(self.bytes_decode, allocated)
        self.planned = False

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
        """Move the kept slots into ``[start, new_length)``; keys are stored raw, so nothing is re-rotated."""
        if plan.lengths is not None and self.position_mode != "original":
            raise ValueError("per-layer lengths need position_mode='original' (a shifted query's position is its layer's length)")
        for buffer in (self.raw_keys, self.values, self.positions):
            self.move(buffer, plan)
        self.on_compact(plan)
        self.length = plan.new_length
        self.layer_lengths = None if plan.lengths is None or len(set(plan.lengths)) == 1 else list(plan.lengths)

    # ------------------------------------------------------------------ reporting
    def kept_positions(self) -> torch.Tensor:
        """Original token positions held, ``[layers, batch, heads, slots]`` (after any pending compaction;
        with per-layer lengths, a layer's row beyond its length is -1)."""
        self._settle()
        held = self.positions[:, :, :, : self.length].long()
        lengths = self.layer_lengths
        if self.pending is not None:
            self.move(held, self.pending)
            held = held[..., : self.pending.new_length]
            lengths = self.pending.lengths
        if lengths is not None:
            beyond = torch.arange(held.shape[-1], device=held.device) >= torch.tensor(lengths, device=held.device)[:, None, None, None]
            held = held.masked_fill(beyond, -1)
        return held

    def entries_per_layer(self) -> list[int]:
        self._settle()
        if self.pending is not None and self.pending.lengths is not None:
            return list(self.pending.lengths)
        if self.pending is None and self.layer_lengths is not None:
            return list(self.layer_lengths)
        return [self.held()] * self.num_layers

    def bytes_per_slot(self) -> int:
        """Bytes one slot costs over all layers: every per-slot buffer (raw key, value, position, scores)."""
        if self.raw_keys is None:
            return 0
        return self.allocated_bytes() // self.capacity

    def stats(self) -> dict:
        """KV entries and bytes: slots held (mean and max over forwards) and bytes allocated (after the
        prefill, in decode, peak including a resize's transient), as the harness records them. On a
        hybrid model the entries are per global layer and the bytes include the sliding layers' window."""
        mean_slots = self.slot_steps / self.forwards if self.forwards else 0.0
        per_slot = self.bytes_per_slot()
        window_mean = self.window_bytes_sum / self.forwards if self.forwards else 0.0
        window_now = self.sliding.allocated_bytes() if self.sliding is not None else 0
        return {
            "kv_entries_per_layer_mean": mean_slots,
            "kv_entries_per_layer_max": self.peak_slots,
            "kv_bytes_mean": mean_slots * per_slot + window_mean,
            "kv_bytes_max": self.peak_slots * per_slot + self.window_bytes_max,
            "kv_bytes_allocated": self.allocated_bytes() + window_now,
            "kv_bytes_prefill": self.bytes_prefill,
            "kv_bytes_decode": self.bytes_decode,
            "kv_bytes_peak": self.bytes_peak,
        }
