"""The decode step's device functions, shared by the ring path (:mod:`lacache.decode.fast`), its fused
step (:mod:`lacache.decode.fused`) and the Triton kernels (:mod:`lacache.decode.triton_kernels`): the ring
attention, the step's slot claim, and the elementwise chains that the fused step compiles into one kernel each."""

from __future__ import annotations

import torch

from lacache.kvcache import rotate

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


def rms_norm(x, weight, eps: float):
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def greedy(logits):
    """The next token of each row: on a GPU ATen's argmax reduces a 128K-wide row in one block (36 us on
    an H200); compiled, it is a split reduction."""
    return logits.argmax(dim=-1, keepdim=True)


def silu_mul(gate, up):
    return torch.nn.functional.silu(gate) * up


def add_rms_norm(delta, residual, weight, eps: float):
    """``residual + delta`` (the decoder's skip connection) and its RMSNorm, in one kernel."""
    total = residual + delta
    return rms_norm(total, weight, eps), total


def rope_split(qkv, cos, sin, heads: int, kv_heads: int, raw: bool):
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


def silu_mul_split(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
