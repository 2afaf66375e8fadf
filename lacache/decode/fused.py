"""The decode step's kernels, plain or fused: :class:`Kernels` compiles the ring's device functions and,
for Llama-family models (:func:`fusable`), writes the step out as :class:`FusedStep` over the model's
own weights stacked in place (``triton=True``: the 7 Triton kernels per layer of
:mod:`lacache.decode.triton_kernels`)."""

from __future__ import annotations

import contextlib
import sys
import types

import torch

from lacache.decode.kernels import (
    add_rms_norm,
    claim_slot,
    greedy,
    ring_scores,
    rms_norm,
    rope_split,
    silu_mul,
    silu_mul_split,
)
from lacache.kvcache import rotate

_MISSING = object()


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
        self.greedy = compile_(greedy)
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
        rms, gated = compile_(rms_norm), compile_(silu_mul)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                self.patches.append((module, "forward", types.MethodType(lambda m, x: rms(x, m.weight, m.variance_epsilon), module)))
            if getattr(config, "hidden_act", None) == "silu" and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
                self.patches.append((module, "forward", types.MethodType(lambda m, x: m.down_proj(gated(m.gate_proj(x), m.up_proj(x))), module)))
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


class FusedStep:
    """The decode step of a Llama-family model (:func:`fusable`) on a :class:`lacache.decode.fast.RingCache`, written out
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
        self.norm, self.add_norm = compile_(rms_norm), compile_(add_rms_norm)
        self.rope, self.silu_mul = compile_(rope_split), compile_(silu_mul_split)
        self.triton = None
        if triton:
            from lacache.decode import triton_kernels

            self.triton = triton_kernels

    def __call__(self, ring, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
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

    def _triton_step(self, ring, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
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
