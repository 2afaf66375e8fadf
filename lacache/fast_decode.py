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
  :mod:`lacache.triton_decode` (matrix-vector products with the norms and SiLU as their prologues,
  rotary + cache write, flash-decoding attention): 1.11-1.17x the bound for StreamingLLM and LaCache.

Logits equal the exact path's up to floating-point rounding (tests on CPU in fp32, and over 1,000
bf16 steps with compactions and wraps on a GPU). Decode only (one token per step, batch of equal
lengths); prefill runs on the exact path, then :meth:`GraphDecoder.__init__` converts the cache:
to a :class:`RingCache` here, or, for a cache with an eviction rule (H2O, TOVA, SnapKV, PyramidKV),
to :class:`lacache.eviction_decode.EvictionRing`, which the same graph capture drives.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lacache.compat import cache_kwarg
from lacache.kvcache import CompactingCache, RotaryTable, rotary_embedding_of, rotate

ATTENTION_NAME = "lacache_ring"
SPLIT = 128  # slots per split of the attention; ring capacities are rounded up to a multiple of it


def ring_scores(query, key, value, is_tail, valid, shift_cos, shift_sin, scaling: float):
    """Attention of one query over a ring layer: the query rotated at ``n`` for compacted slots and at
    ``T`` for tail slots (one matmul for both), invalid slots masked; ``[B, 1, H_q, D]`` out.

    The probabilities x values product is split along the slots (split-K, as in flash-decoding):
    with one query token a plain matmul would stream every head's values through a single block."""
    batch, q_heads, _, dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    tail_query = query.reshape(batch, kv_heads, groups, dim)
    compact_query = rotate(tail_query, shift_cos, shift_sin)
    scores = torch.matmul(torch.cat((compact_query, tail_query), dim=2), key.transpose(-1, -2))
    scores = torch.where(is_tail, scores[:, :, groups:], scores[:, :, :groups]).float() * scaling
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).to(value.dtype)
    splits = capacity // SPLIT if capacity % SPLIT == 0 else 1
    probs = probs.reshape(batch, kv_heads, groups, splits, capacity // splits).transpose(2, 3)
    partial = torch.matmul(probs, value.reshape(batch, kv_heads, splits, capacity // splits, dim))
    out = partial.float().sum(dim=2).to(value.dtype)  # [B, H_kv, groups, D]
    return out.reshape(batch, q_heads, 1, dim).transpose(1, 2).contiguous()


def ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention implementation the decode step switches to (registered as ``lacache_ring``)."""
    if query.shape[2] != 1:
        raise ValueError("the ring decode path runs one token per step; prefill goes through the exact cache")
    scaling = float(scaling if scaling is not None else module.scaling)
    return module.lacache_ring.attend(module.layer_idx, query, key, value, scaling), None


def claim_slot(slot, valid, is_tail, slot_of, origin, n, T, cursor, seen, position_ids, ucos32, usin32, inv_freq, dtype):
    """Start a decode step on the device: take the first free physical slot of every layer for the
    new token (logical slot ``n``, original position ``seen``), set the query position to ``T``, and
    return the rotations the step needs (un-rotation at ``T`` for the raw key; the query's shift from
    ``T`` to ``n`` for the compacted region). The token joins the tail, unless it lands before the
    cursor (a prompt shorter than the sinks): such a slot is never merged away or shifted, so it is
    compacted, its key rotated at ``T``, which equals ``n`` until the first merge."""
    layers = valid.shape[0]
    slot.copy_((~valid).to(torch.uint8).argmax(dim=1))
    column = slot[:, None]
    valid.scatter_(1, column, True)
    is_tail.scatter_(1, column, (n >= cursor).expand(layers, 1))
    slot_of.scatter_(1, n.expand(layers, 1), column)
    origin.scatter_(1, column, seen.expand(layers, 1))
    position_ids.copy_(T.expand_as(position_ids))
    angle = (n - T).float() * inv_freq
    return ucos32.index_select(0, T), -usin32.index_select(0, T), angle.cos().to(dtype), angle.sin().to(dtype)


def _rms_norm(x, weight, eps: float):
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _greedy(logits):
    """The next token of each row: on a GPU ATen's argmax reduces a 128K-wide row in one block (36 us on
    an H200); compiled, it is a split reduction."""
    return logits.argmax(dim=-1, keepdim=True)


def _silu_mul(gate, up):
    return torch.nn.functional.silu(gate) * up


class Kernels:
    """The decode step's kernels: plain, or fused (``fuse=True``).

    In a CUDA graph every small kernel still costs a few microseconds, and a stock Llama step has
    ~20 per layer besides its matrix products (RMSNorm alone is ~7, twice per layer). Fused, a
    Llama-family model (:func:`fusable`) decodes through :class:`FusedStep`: q/k/v and gate/up
    weights as single matrix products and the elementwise chains as one kernel each. Other models
    keep their modules, with their RMSNorms, gated-MLP activation and rotary embedding swapped for
    compiled versions around the decode step only. ``compile``: fuse the elementwise chains with
    ``torch.compile`` (default: on CUDA); uncompiled, the fused step runs the same arithmetic eagerly.
    """

    def __init__(self, model, fuse: bool, compile: bool = True, triton: bool = False):
        if triton and not (fuse and compile):
            raise ValueError("triton=True is a variant of the fused step on CUDA: it needs fuse=True on a CUDA device")
        compile_ = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if fuse and compile else (lambda fn: fn)
        self.scores, self.rotate, self.claim = compile_(ring_scores), compile_(rotate), compile_(claim_slot)
        self.greedy = compile_(_greedy)
        self.patches: list[tuple] = []
        self.step: FusedStep | None = None
        if not fuse:
            return
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if fusable(model) is None:
            self.step = FusedStep(model, compile_, triton)
            return
        if triton:
            raise ValueError(f"triton=True needs the fused step, which cannot run this model: {fusable(model)}")
        rms, silu_mul = compile_(_rms_norm), compile_(_silu_mul)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                self.patches.append((module, "forward", types.MethodType(lambda m, x: rms(x, m.weight, m.variance_epsilon), module)))
            if getattr(config, "hidden_act", None) == "silu" and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
                self.patches.append((module, "forward", types.MethodType(lambda m, x: m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x))), module)))
        layers = getattr(model, "model", model).layers
        modeling = sys.modules[type(layers[0].self_attn).__module__]
        if hasattr(modeling, "apply_rotary_pos_emb"):
            self.patches.append((modeling, "apply_rotary_pos_emb", compile_(modeling.apply_rotary_pos_emb)))

    @contextlib.contextmanager
    def installed(self):
        saved = [(target, name, target.__dict__.get(name, _MISSING)) for target, name, _ in self.patches]
        for target, name, replacement in self.patches:
            setattr(target, name, replacement)
        try:
            yield
        finally:
            for target, name, value in saved:
                if value is _MISSING:
                    delattr(target, name)
                else:
                    setattr(target, name, value)


FUSABLE_TYPES = ("llama", "mistral", "qwen2")  # pre-norm RMSNorm decoders with q/k/v/o and a SiLU-gated MLP


def fusable_config(config) -> str | None:
    """Why :class:`FusedStep` cannot run a model with this config (``None``: its config allows it)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if config.model_type not in FUSABLE_TYPES:
        return f"model_type {config.model_type!r} is not one of {FUSABLE_TYPES}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not 'silu'"
    return None


def fusable(model) -> str | None:
    """Why :class:`FusedStep` cannot run ``model``'s decode step (``None``: it can)."""
    why = fusable_config(model.config)
    if why is not None:
        return why
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(model, "lm_head"):
        return "not a <Model>ForCausalLM with model.embed_tokens/layers/norm/rotary_emb and lm_head"
    weights = {p.device for p in model.parameters()} | {p.dtype for p in model.parameters()}
    if len(weights) != 2:
        return "its weights are spread over several devices or dtypes"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                  [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(m) is torch.nn.Linear for m in linears):
            return "a projection is not a plain nn.Linear (quantized or adapted?)"
        if any(m.bias is not None for m in linears[3:]):
            return "o_proj or the MLP has a bias"
        if set(dict(attn.named_children())) != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            return f"{type(attn).__name__} has other parts than q/k/v/o_proj (e.g. q/k norms)"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, inner.norm):
            if not (type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")):
                return f"{type(norm).__name__} is not a Llama-style RMSNorm"
    return None


def fuse_linears(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) whose row blocks *are* the given layers' weights: the layers' parameters
    become views of it, so the model holds no second copy and its own forward is unchanged. Idempotent."""
    weight = _stack_in_place([m.weight for m in linears])
    return weight, (_stack_in_place([m.bias for m in linears]) if linears[0].bias is not None else None)


def _stack_in_place(params) -> torch.Tensor:
    rows = sum(p.shape[0] for p in params)
    storage = params[0].untyped_storage().data_ptr()  # one storage: adjacent allocations are not one tensor
    offset, stacked = params[0].data_ptr(), True
    for p in params:
        stacked &= p.is_contiguous() and p.data_ptr() == offset and p.untyped_storage().data_ptr() == storage
        offset += p.numel() * p.element_size()
    if not stacked:
        with torch.no_grad(), torch.inference_mode(False):
            whole = torch.cat([p.data for p in params])
            for p, part in zip(params, whole.split([p.shape[0] for p in params])):
                p.data = part
    first = params[0].data
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _add_rms_norm(delta, residual, weight, eps: float):
    """``residual + delta`` (the decoder's skip connection) and its RMSNorm, in one kernel."""
    total = residual + delta
    return _rms_norm(total, weight, eps), total


def _rope_split(qkv, cos, sin, heads: int, kv_heads: int, raw: bool):
    """Split a fused q/k/v projection into heads, rotate q and k (``[B, 1, D]`` cos/sin, rotate_half
    convention); return the query ``[B, H, 1, D]`` and the new cache entries ``[2|3, B, H_kv, 1, D]``
    (rotated key, raw key if ``raw``, value): what the stock attention computes, in one kernel."""
    batch = qkv.shape[0]
    dim = qkv.shape[-1] // (heads + 2 * kv_heads)
    q, k, v = qkv.view(batch, heads + 2 * kv_heads, dim).split((heads, kv_heads, kv_heads), dim=1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    k = k[:, :, None]
    entries = (rotate(k, cos, sin), k, v[:, :, None]) if raw else (rotate(k, cos, sin), v[:, :, None])
    return rotate(q[:, :, None], cos, sin), torch.stack(entries)


def _silu_mul_split(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class FusedStep:
    """The decode step of a Llama-family model (:func:`fusable`) on a :class:`RingCache`, written out
    as gpt-fast-style decoders do: per layer one RMSNorm (with the previous skip connection added),
    one q/k/v product, one kernel for head split + rotary + the new key's raw copy, one cache
    write, the ring attention, the output product, RMSNorm, one gate/up product, SiLU x up, the down
    product. The weights are the model's own (:func:`fuse_linears` makes its q/k/v and gate/up
    parameters views of one tensor each); logits equal the stock forward's up to rounding."""

    def __init__(self, model, compile_, triton: bool = False):
        inner = model.model
        self.model, self.inner = model, inner
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, _ = fuse_linears([mlp.gate_proj, mlp.up_proj])
            self.layers.append((layer.input_layernorm, qkv, qkv_bias, attn.o_proj.weight, float(attn.scaling),
                                layer.post_attention_layernorm, gate_up, mlp.down_proj.weight))
        self.norm, self.add_norm = compile_(_rms_norm), compile_(_add_rms_norm)
        self.rope, self.silu_mul = compile_(_rope_split), compile_(_silu_mul_split)
        self.triton = None
        if triton:
            from lacache import triton_decode

            self.triton = triton_decode

    def __call__(self, ring: RingCache, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.triton is not None:
            return self._triton_step(ring, ids, position_ids)
        linear = torch.nn.functional.linear
        kernels, raw = ring.kernels, ring.raw is not None
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, position_ids)
        residual = None
        for i, (norm1, qkv, qkv_bias, wo, scaling, norm2, gate_up, down) in enumerate(self.layers):
            if residual is None:
                x, residual = self.norm(h, norm1.weight, norm1.variance_epsilon), h
            else:
                x, residual = self.add_norm(h, residual, norm1.weight, norm1.variance_epsilon)
            query, entries = self.rope(linear(x, qkv, qkv_bias), cos, sin, self.heads, self.kv_heads, raw)
            ring.kv[:, i].index_copy_(3, ring.slot[i : i + 1], entries)
            out = kernels.scores(query, ring.keys[i], ring.values[i], ring.is_tail[i], ring.valid[i], ring.shift_cos,
                                 ring.shift_sin, scaling)
            x, residual = self.add_norm(linear(out.flatten(2), wo), residual, norm2.weight, norm2.variance_epsilon)
            h = linear(self.silu_mul(linear(x, gate_up)), down)
        x, _ = self.add_norm(h, residual, self.inner.norm.weight, self.inner.norm.variance_epsilon)
        return self.model.lm_head(x)[:, -1]

    def _triton_step(self, ring: RingCache, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The same step in 7 kernels per layer: each product a Triton matrix-vector kernel that first
        applies what precedes it (the skip connection and RMSNorm before q/k/v and gate/up, SiLU x up
        before down), then rotary + cache write, the two attention kernels."""
        kernels, raw = self.triton, ring.raw is not None
        residual = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(residual, position_ids)
        delta = None
        for i, (norm1, qkv, qkv_bias, wo, scaling, norm2, gate_up, down) in enumerate(self.layers):
            if delta is None:
                projected = kernels.matvec(residual, qkv, qkv_bias, kernels.NORM, residual, norm1.weight, norm1.variance_epsilon)
            else:
                projected, residual = kernels.matvec(delta, qkv, qkv_bias, kernels.NORM, residual, norm1.weight,
                                                     norm1.variance_epsilon, add=True)
            query = kernels.rope_write(projected, cos, sin, ring.slot[i : i + 1], ring.keys[i], ring.raw[i] if raw else None,
                                       ring.values[i], self.heads, self.kv_heads)
            out = kernels.ring_attention(query, ring.keys[i], ring.values[i], ring.is_tail[i], ring.valid[i],
                                         ring.shift_cos, ring.shift_sin, scaling)
            hidden, residual = kernels.matvec(kernels.matvec(out, wo), gate_up, None, kernels.NORM, residual, norm2.weight,
                                              norm2.variance_epsilon, add=True)
            delta = kernels.matvec(hidden, down, None, kernels.SILU)
        x, _ = self.add_norm(delta, residual, self.inner.norm.weight, self.inner.norm.variance_epsilon)
        return self.model.lm_head(x)[:, -1]


_MISSING = object()


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
            from lacache.eviction_decode import EvictionRing

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
