"""Attention weights for the scored policies (H2O, SnapKV, TOVA, PyramidKV), computed by the cache.

The model's attention kernel (sdpa, flash) does not return its weights, and switching the model to
another attention implementation would change it for every later user. A scored cache therefore
recomputes the weights it needs inside its own ``update()``, from the layer's query and the keys it
hands to attention: the numbers attention is about to compute, so a forward's scores are complete
in every layer (the last one included) when the forward ends, whatever the attention kernel.

The query comes from hooks that never change an output, installed once per attention module while
at least one scored cache is alive (removed with the last one): a forward pre-hook notes which
cache serves the running forward and the rotary cos/sin the model passes, and a forward hook on
``q_proj`` (``q_norm`` where the model has one) hands the un-rotated query to that cache only.
Assumes Llama-style attention in the layers the policy compresses: causal softmax of ``q.k * scaling``,
no logit soft-capping (Gemma 3 has none: its config's ``attn_logit_softcapping`` is not applied by the
model), no padding inside a batch. On a hybrid model
(Gemma 3) only the global layers are scored and hooked; the sliding-window layers keep their window.
"""

from __future__ import annotations

import weakref

import torch

from lacache.kvcache import CompactingCache, rotate
from lacache.policy import PolicyConfigError

SCORE_CHUNK_ELEMENTS = 1 << 24  # logits per chunk when scoring long prompts


def attention_column_sums(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention summed over the queries and the query heads of each KV head.

    ``query`` ``[B, Hq, Q, D]`` rotated as attention uses it, ``keys`` ``[B, Hkv, N, D]`` as
    attention reads them; query ``i`` is the token held at slot ``N - Q + i`` and sees the slots up
    to it. Returns fp32 ``[B, Hkv, N]``, computed in query chunks (never an N x N matrix). The logits
    are the product in the inputs' dtype, the softmax and the sums fp32, as the H2O reference computes
    its weights (``softmax(q @ k.T / sqrt(d), dtype=float32)``); for a bf16 model the product runs on
    tensor cores (H2O's 8K prefill on an H200: 1.85 -> 1.5-1.85 s; the softmax and sums are the rest).
    """
    batch, q_heads, count, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    query = query.reshape(batch, kv_heads, q_heads // kv_heads, count, dim).to(keys.dtype)
    columns = torch.arange(length, device=keys.device)
    totals = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, q_heads * length))
    for start in range(0, count, step):
        end = min(count, start + step)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", query[:, :, :, start:end], keys).float() * scaling
        if count > 1:
            last = torch.arange(start, end, device=keys.device)[:, None] + (length - count)
            logits = logits.masked_fill(columns > last, float("-inf"))
        totals += torch.softmax(logits, dim=-1).sum(dim=(2, 3))
    return totals


def attention_modules(model) -> list:
    layers = getattr(getattr(model, "model", model), "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in layers or ()]
    if not modules or any(getattr(m, "q_proj", None) is None for m in modules):
        raise PolicyConfigError(
            f"{type(model).__name__}: scored cache policies need decoder layers with a `self_attn.q_proj` "
            "(Llama, Qwen2/3, Mistral, ...)"
        )
    return modules


class QueryTap:
    """The hooks on one attention module, shared by every scored cache alive."""

    def __init__(self, attention):
        self.attention, self.layer, self.users = attention, attention.layer_idx, 0
        self.cache = self.rotary = None  # weakref to the cache serving the running forward, its (cos, sin)
        projection = getattr(attention, "q_norm", None)
        projection = attention.q_proj if projection is None else projection
        self.handles = [
            attention.register_forward_pre_hook(self._enter, with_kwargs=True),
            attention.register_forward_hook(self._leave),
            projection.register_forward_hook(self._query),
        ]

    def _enter(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cache = weakref.ref(cache) if isinstance(cache, ScoredCache) else None
        self.rotary = kwargs.get("position_embeddings") if self.cache is not None else None

    def _query(self, module, args, output):
        cache = self.cache() if self.cache is not None else None
        if cache is not None:
            given = args[0]
            if given.dim() == 4 and given.stride(1) < given.stride(2):  # q_norm after the heads transpose (Gemma 3)
                output = output.transpose(1, 2)  # [B, T, heads, D], as the other models' queries
            cache.captured[self.layer] = (output, self.rotary)

    def _leave(self, module, args, output):
        self.cache = self.rotary = None


def _attach(model, layers) -> list[QueryTap]:
    taps = []
    modules = attention_modules(model)
    for attention in (modules[layer] for layer in layers):
        tap = getattr(attention, "lacache_query_tap", None)
        if tap is None:
            tap = attention.lacache_query_tap = QueryTap(attention)
        tap.users += 1
        taps.append(tap)
    return taps


def _release(taps: list[QueryTap]) -> None:
    for tap in taps:
        tap.users -= 1
        if tap.users == 0:
            for handle in tap.handles:
                handle.remove()
            del tap.attention.lacache_query_tap


def hooked_modules(model) -> int:
    """How many attention modules of ``model`` carry query hooks now (0 when no scored cache is alive)."""
    return sum(hasattr(m, "lacache_query_tap") for m in attention_modules(model))


class ScoredCache(CompactingCache):
    """A compacting cache that sees, in each layer's update, the attention weights of the forward.

    Subclasses say how many of the forward's newest queries they need (:meth:`query_count`) and
    receive them, rotated, with the layer's keys in :meth:`observe`.
    """

    def __init__(self, model, capacity: int):
        super().__init__(model, capacity)
        attention = attention_modules(model)[self.global_layers[0]]
        self.scaling, self.head_dim = attention.scaling, attention.head_dim
        self.captured: list = [None] * self.model_layers  # by model layer (the taps know theirs)
        weakref.finalize(self, _release, _attach(model, self.global_layers))

    def query_count(self, count: int) -> int:
        """How many of the ``count`` queries of this forward :meth:`observe` needs (the newest ones)."""
        return count

    def observe(self, layer: int, start: int, count: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        raise NotImplementedError

    def on_append(self, layer: int, start: int, count: int, keys: torch.Tensor) -> None:
        self.observe(layer, start, count, self.take_query(layer, count, self.query_count(count)), keys)

    def take_query(self, layer: int, count: int, newest: int) -> torch.Tensor:
        """The ``newest`` queries of this forward in ``layer``, rotated as attention uses them: fp32 ``[B, Hq, newest, D]``."""
        model_layer = self.global_layers[layer]
        captured, self.captured[model_layer] = self.captured[model_layer], None
        if captured is None or captured[1] is None or captured[0].shape[1] != count:
            raise RuntimeError(
                f"layer {layer}: no query was captured for this forward; scored cache policies need the model to call "
                "its attention modules with keyword arguments (cache=..., position_embeddings=...)"
            )
        query, (cos, sin) = captured
        batch = query.shape[0]
        query = query.reshape(batch, count, -1, self.head_dim)[:, count - newest :].transpose(1, 2).float()
        if cos.shape[-1] != self.head_dim:
            raise PolicyConfigError(f"scored cache policies need RoPE over the whole head (rotary dim {cos.shape[-1]} != head_dim {self.head_dim})")
        cos, sin = cos[:, None, count - newest :].float(), sin[:, None, count - newest :].float()
        return rotate(query, cos, sin)
