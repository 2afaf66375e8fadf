"""Decode without moving data, captured in CUDA graphs: the fast path of the position-shift caches.

Why: a transformers decode step in eager mode is bound by ~1,000 kernel launches (27-29 ms for
an 8B model on an H100 whose weights stream in ~5 ms), and the exact path's compaction moves the
tail of every layer's cache by a few slots on every step. Here neither happens:

* **Two regions, no tail moves** (spec section 4.2 item 4). Physical slots never move; a per-layer
  map ``slot_of[layer, j]`` gives the physical slot of logical slot ``j`` (the slot index the
  exact path would use). Logical slots before the cursor (sinks and merged ladders) are the
  *compacted* region: keys rotated at their logical index ``j``, attended by the query rotated at
  ``n`` (its own index). Slots from the cursor on are the *tail*: a FIFO whose distance to the
  query never changes when its front is merged away, so a tail key stays rotated at its insertion
  counter ``tau`` and is attended by the query rotated at the global counter ``T``
  (``T - tau = n - j``). One attention kernel reads every key once and picks, per slot, the score
  of the query rotated for that slot's region. A merge re-rotates only the ``a`` slots it keeps;
  freeing a slot is a mask bit; the map shift is a gather of ``L x capacity`` integers.
* **Wraps and rebasing.** When the cursor starts a new sweep, the tail is re-rotated at its logical
  indices and ``T`` is reset to ``n`` (then ``tau = j`` everywhere); the region behind the old
  cursor joins the tail as it is. The same rebase runs every ``rebase_every`` steps, so rotary
  angles stay small whatever the stream length (StreamingLLM never wraps).
* **Static shapes, no host syncs.** Every per-step quantity (``n``, ``T``, cursor, free slot) is a
  device tensor updated on the device; the host only mirrors the integer schedule of the policy
  (:class:`lacache.kvcache.RingRule`) to choose which captured graph to replay. On CUDA the
  decode step and each compaction size are CUDA graphs; on CPU the same code runs eagerly.
* **Fused (``fuse=True``).** For Llama-family models the step is written out (:class:`FusedStep`):
  one q/k/v and one gate/up matrix product per layer over the model's own weights stacked in place,
  and one compiled kernel per elementwise chain, so that the weight products, which stream at the
  copy bandwidth, are most of the step (docs/PERFORMANCE.md: 1.27-1.33x the weight-streaming
  bound on an H200). ``triton=True`` (CUDA) runs each layer as the 7 kernels of
  :mod:`lacache.decode.triton_kernels` (matrix-vector products with the norms and SiLU as their prologues,
  rotary + cache write, flash-decoding attention): 1.11-1.17x the bound for StreamingLLM and LaCache.

Logits equal the exact path's up to floating-point rounding (tests on CPU in fp32, and over 1,000
bf16 steps with compactions and wraps on a GPU). Decode only (one token per step, batch of equal
lengths); prefill runs on the exact path, then :meth:`GraphDecoder.__init__` converts the cache:
to a :class:`RingCache` here, or, for a cache with an eviction rule (H2O, TOVA, SnapKV, PyramidKV),
to :class:`lacache.decode.eviction.EvictionRing`, which the same graph capture drives.
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lacache.compat import cache_kwarg
from lacache.decode.fused import Kernels
from lacache.decode.kernels import SPLIT
from lacache.kvcache import CompactingCache, RotaryTable, rotary_embedding_of

ATTENTION_NAME = "lacache_ring"


def ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention implementation the decode step switches to (registered as ``lacache_ring``)."""
    if query.shape[2] != 1:
        raise ValueError("the ring decode path runs one token per step; prefill goes through the exact cache")
    scaling = float(scaling if scaling is not None else module.scaling)
    return module.lacache_ring.attend(module.layer_idx, query, key, value, scaling), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ring_attention)


class RingCache(Cache):
    """Physical-slot storage of a converted compacting (or full) cache; see the module docstring."""

    compacts = True  # GraphDecoder.settle applies the policy's merges between steps

    def __init__(self, model, source, rebase_every: int = 4096, room: int = 0, slack: int = 8, fuse: bool = False,
                 triton: bool = False):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = config.num_hidden_layers
        super().__init__(layers=[DynamicLayer() for _ in range(self.num_layers)])
        self.rule = None
        if isinstance(source, CompactingCache):
            source.apply_pending()
            self.rule = source.ring_rule()
            if self.rule is None:
                raise ValueError(f"{type(source).__name__} has no fast decode path (only exact decode)")
            n, cursor = source.length, self.rule.cursor
            capacity = -(-(self.rule.max_length + slack) // SPLIT) * SPLIT
            keys = torch.stack([source.rotated_keys(layer) for layer in range(source.num_layers)])
            held = (keys, source.raw_keys[:, :, :, :n], source.values[:, :, :, :n])
            origin = source.positions[:, 0, 0, :n].long()
            self.rope = source.rope
        else:  # a DynamicCache holding every token at its own position: no compaction, no raw keys
            n, cursor = source.get_seq_length(), 0
            capacity = -(-(n + room + slack) // SPLIT) * SPLIT  # room: the tokens this cache will be asked to decode
            held = (torch.stack([layer.keys for layer in source.layers]), torch.stack([layer.values for layer in source.layers]))
            origin = torch.arange(n, device=held[0].device).expand(self.num_layers, n)
            self.rope = RotaryTable(rotary_embedding_of(model), held[0].device, held[0].dtype)
        # one buffer [keys, raw keys, values] (no raw keys for a full cache): the fused step writes a new token's
        # entries with one copy; zeros: free slots must not hold NaN
        self.kv = held[0].new_zeros((len(held), *held[0].shape[:3], capacity, held[0].shape[-1]))
        for part, tensor in zip(self.kv, held):
            part[:, :, :, :n].copy_(tensor)
        keys, values = self.kv[0], self.kv[-1]
        raw = self.kv[1] if len(held) == 3 else None
        origin = torch.cat((origin, torch.arange(n, capacity, device=origin.device).expand(self.num_layers, -1)), dim=1)
        self.keys, self.raw, self.values, self.origin = keys, raw, values, origin
        self.capacity = keys.shape[3]
        self.rebase_every = rebase_every
        device, L, cap = keys.device, self.num_layers, self.capacity
        slots = torch.arange(cap, device=device)
        self.slots = slots
        self.slot_of = slots.expand(L, cap).clone()  # logical -> physical, per layer
        self.valid = (slots < n).expand(L, cap).clone()
        self.is_tail = (slots >= cursor).expand(L, cap).clone()
        scalar = lambda v: torch.tensor([v], dtype=torch.long, device=device)  # noqa: E731
        self.n, self.T, self.cursor, self.seen = scalar(n), scalar(n), scalar(cursor), scalar(int(origin[0, :n].max()) + 1 if n else 0)
        self.slot = torch.zeros(L, dtype=torch.long, device=device)  # physical slot of this step's token
        self.host_n, self.host_T, self.host_cursor = n, n, cursor
        self.rope._ensure(cap + rebase_every + 2)
        inv_freq = rotary_embedding_of(model).inv_freq.float().to(device)
        self.inv_freq = torch.cat((inv_freq, inv_freq))
        self.unrotate_cos = self.unrotate_sin = self.shift_cos = self.shift_sin = None
        self.compactions = self.wraps = 0
        self.kernels = Kernels(model, fuse, compile=device.type == "cuda", triton=triton)
        self.offsets = torch.tensor(self.rule.offsets if self.rule else [0] * L, device=device)  # per layer, for merges

    # ------------------------------------------------------------------ per step, on the device
    def begin_step(self, position_ids: torch.Tensor) -> None:
        self.unrotate_cos, self.unrotate_sin, self.shift_cos, self.shift_sin = self.kernels.claim(
            self.slot, self.valid, self.is_tail, self.slot_of, self.origin, self.n, self.T, self.cursor, self.seen, position_ids,
            self.rope.ucos32, self.rope.usin32, self.inv_freq, self.keys.dtype)

    def end_step(self) -> None:
        self.n += 1
        self.T += 1
        self.seen += 1

    def attend(self, layer: int, query, key, value, scaling: float) -> torch.Tensor:
        return self.kernels.scores(query, key, value, self.is_tail[layer], self.valid[layer], self.shift_cos,
                                   self.shift_sin, scaling)

    def advance(self) -> None:
        """After a step, on the host: one more slot held, one more step since the last rebase."""
        self.host_n += 1
        self.host_T += 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        index = self.slot[layer_idx : layer_idx + 1]
        self.keys[layer_idx].index_copy_(2, index, key_states)
        self.values[layer_idx].index_copy_(2, index, value_states)
        if self.raw is not None:
            raw = self.kernels.rotate(key_states.float(), self.unrotate_cos, self.unrotate_sin).to(key_states.dtype)
            self.raw[layer_idx].index_copy_(2, index, raw)
        return self.keys[layer_idx], self.values[layer_idx]

    def compact(self, count: int) -> None:
        """Merge ``count`` ladders at the device cursor (static shapes for a given ``count``)."""
        rule, L = self.rule, self.num_layers
        kept, freed = count * rule.kept, count * (rule.block - rule.kept)
        block = self.cursor + self.slots[: count * rule.block]
        physical = self.slot_of.gather(1, block.expand(L, -1))
        self.valid.scatter_(1, physical, False)
        source = torch.where(self.slots < self.cursor, self.slots, self.slots + freed).clamp_(max=self.capacity - 1)
        new_map = self.slot_of.gather(1, source.expand(L, -1))
        if kept:
            chosen = physical.gather(1, self._kept_index(count))
            self.valid.scatter_(1, chosen, True)
            self.is_tail.scatter_(1, chosen, False)
            self._rerotate(chosen, self.cursor + self.slots[:kept])
            inside = (self.slots >= self.cursor) & (self.slots < self.cursor + kept)
            merged = chosen.gather(1, (self.slots - self.cursor).clamp(0, kept - 1).expand(L, -1))
            new_map = torch.where(inside, merged, new_map)
        self.slot_of.copy_(new_map)
        self.n -= freed
        self.cursor += kept

    def _kept_index(self, count: int) -> torch.Tensor:
        """``[L, count*a]``: offsets inside the merged blocks of the slots each layer keeps."""
        rule, offsets = self.rule, self.offsets[:, None]
        ladder, within = torch.div(self.slots[: count * rule.kept], rule.kept, rounding_mode="floor"), self.slots[: count * rule.kept] % rule.kept
        return ladder * rule.block + offsets + within

    def _rerotate(self, physical: torch.Tensor, positions: torch.Tensor) -> None:
        """Keys of ``physical`` slots ``[L, m]`` := raw keys rotated at ``positions`` ``[m]``."""
        L, B, H, _, D = self.keys.shape
        index = physical[:, None, None, :, None].expand(L, B, H, physical.shape[1], D)
        cos, sin = self.rope.cos.index_select(0, positions), self.rope.sin.index_select(0, positions)
        self.keys.scatter_(3, index, self.kernels.rotate(self.raw.gather(3, index), cos, sin))

    # ------------------------------------------------------------------ host-driven events (eager, rare)
    def rebase(self) -> None:
        """``T := n``: re-rotate the tail at its logical indices (``tau = j``)."""
        start, n = self.host_cursor, self.host_n
        if n > start and self.raw is not None:
            self._rerotate(self.slot_of[:, start:n], self.slots[start:n])
        self.T.copy_(self.n)
        self.host_T = n

    def wrap(self, new_cursor: int) -> None:
        """A new sweep starts at ``new_cursor``: the compacted region behind the old cursor rejoins the tail."""
        self.rebase()
        self.wraps += 1
        self.is_tail.scatter_(1, self.slot_of[:, new_cursor : self.host_cursor], True)
        self.cursor.fill_(new_cursor)
        self.host_cursor = new_cursor

    def pending_segments(self):
        """Host side, after a step: the merges the policy's schedule asks for now."""
        return self.rule.plan(self.host_n) if self.rule is not None else None

    def kept_positions(self) -> torch.Tensor:
        """Original token positions held in logical order, ``[layers, slots]``."""
        return self.origin.gather(1, self.slot_of[:, : self.host_n])

    def decode_bytes(self) -> int:
        """Bytes of the ring's buffers (keys, raw keys if any, values), allocated once for the whole decode."""
        return sum(b.numel() * b.element_size() for b in (self.keys, self.raw, self.values) if b is not None)

    # ------------------------------------------------------------------ Cache API used by the model
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.host_n

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.capacity, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.host_n

    @property
    def is_compileable(self) -> bool:
        return False

    def snapshot(self) -> dict:
        names = ("slot_of", "valid", "is_tail", "origin", "n", "T", "cursor", "seen", "slot")
        return {name: getattr(self, name).clone() for name in names}

    def restore(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)


class GraphDecoder:
    """Greedy or teacher-forced decode through a :class:`RingCache`, CUDA-graph captured on CUDA.

    ``decoder = GraphDecoder(model, cache, next_ids)`` after a prefill on the exact path;
    ``decoder.step()`` returns the logits of the token in ``decoder.ids`` and leaves the greedy
    next token there (copy your own token into ``decoder.ids`` first to force one).
    """

    def __init__(self, model, cache, next_ids: torch.Tensor, max_new_tokens: int = 0, graphs: bool | None = None,
                 rebase_every: int = 4096, fuse: bool = False, triton: bool = False):
        _register()
        self.model = model
        rule = cache.eviction_rule() if isinstance(cache, CompactingCache) else None
        if rule is not None:  # H2O, TOVA, SnapKV, PyramidKV: eviction inside the step (plain kernels, no fusing)
            from lacache.decode.eviction import EvictionRing

            if fuse or triton:
                raise ValueError(f"fuse=True and triton=True are for the ring path (full, streamingllm, lacache), not {type(cache).__name__}")

            self.ring = EvictionRing(model, cache, rule, room=max_new_tokens)
        else:
            self.ring = RingCache(model, cache, rebase_every=rebase_every, room=max_new_tokens, fuse=fuse, triton=triton)
        self.ids = next_ids.clone()
        self.position_ids = torch.zeros_like(self.ids)
        self.graphs = (self.ids.device.type == "cuda") if graphs is None else graphs
        self.modules = [layer.self_attn for layer in getattr(model, "model", model).layers]
        for module in self.modules:
            module.lacache_ring = self.ring
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.step_graph = None
        self.compact_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits = None
        self.compaction_clocks: list[tuple] = []  # (start, end) around compactions, while `timed`
        self.timed = False

    def close(self) -> None:
        for module in self.modules:
            del module.lacache_ring

    def _forward(self) -> torch.Tensor:
        """One decode step. The attention implementation (and any fused kernels) are switched only for
        this call, so exact-path caches can keep using the same model object."""
        self.ring.begin_step(self.position_ids)
        if self.ring.kernels.step is not None:
            logits = self.ring.kernels.step(self.ring, self.ids, self.position_ids)
        else:
            config = self.model.config
            usual, config._attn_implementation = config._attn_implementation, ATTENTION_NAME
            try:
                with self.ring.kernels.installed():
                    logits = self.model(input_ids=self.ids, position_ids=self.position_ids, **cache_kwarg(self.model, self.ring),
                                        use_cache=True).logits[:, -1]
            finally:
                config._attn_implementation = usual
        self.ids.copy_(self.ring.kernels.greedy(logits))
        self.ring.end_step()
        return logits

    def _capture(self, fn):
        state, ids = self.ring.snapshot(), self.ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
                self.ring.restore(state)
                self.ids.copy_(ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out

    def _compact(self, count: int) -> None:
        if not self.graphs:
            self.ring.compact(count)
            return
        if count not in self.compact_graphs:
            self.compact_graphs[count] = self._capture(lambda: self.ring.compact(count))[0]
        self.compact_graphs[count].replay()

    def settle(self) -> None:
        """Apply the merges (and any wrap or rebase) due after the last step; ``step`` calls it first."""
        ring = self.ring
        if not ring.compacts:
            return
        segments = ring.pending_segments() or ()
        if not segments and ring.host_T - ring.host_n < ring.rebase_every:
            return
        clock = self._clock() if self.timed else None
        for segment in segments:
            if segment.cursor != ring.host_cursor:
                ring.wrap(segment.cursor)
            self._compact(segment.count)
            ring.host_n -= segment.count * (ring.rule.block - ring.rule.kept)
            ring.host_cursor += segment.count * ring.rule.kept
            ring.compactions += segment.count
        if ring.host_T - ring.host_n >= ring.rebase_every:
            ring.rebase()
        if clock is not None:
            self.compaction_clocks.append((clock, self._clock()))

    def _clock(self):
        """A point in time on the device's stream (a CUDA event) or on the host (CPU runs synchronously)."""
        if not self.graphs:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def compaction_seconds(self) -> float:
        """Time spent in compactions while ``timed`` was set (on CUDA: event times, one sync here)."""
        if not self.graphs:
            return sum(end - start for start, end in self.compaction_clocks)
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.compaction_clocks) / 1000

    def step(self) -> torch.Tensor:
        """Decode one token; on CUDA the returned logits are a static buffer the next step overwrites."""
        self.settle()
        ring = self.ring
        if ring.host_n >= ring.capacity:
            raise RuntimeError(f"the cache holds {ring.host_n} of {ring.capacity} slots: pass max_new_tokens for a full cache")
        if not self.graphs:
            logits = self._forward()
        else:
            if self.step_graph is None:
                self.step_graph, self.logits = self._capture(self._forward)
            self.step_graph.replay()
            logits = self.logits
        ring.advance()
        return logits
