"""Triton kernels of the fused decode step (``GraphDecoder(..., fuse=True, triton=True)``, CUDA only).

Why: in the fused step cuBLAS streams the big weight products at the copy bandwidth; what kept the
step at 1.28x of the weight-streaming bound on an H200 was 12 kernels per layer and the time between
them (docs/PERFORMANCE.md). Here a layer is 7:

* :func:`matvec`: each weight product as a matrix-vector kernel that first applies what precedes
  it in the decoder: the skip connection's sum and the RMSNorm before q/k/v and gate/up, SiLU(gate)
  x up before down. This replaces cuBLAS's products, their split-K reduce kernels, the two
  RMSNorm kernels and the SiLU kernel.
* :func:`ring_attention`: the ring attention of :func:`lacache.decode.kernels.ring_scores` as
  flash-decoding: one kernel scores a 128-slot split of the ring for every query head of a KV head
  (query rotated at ``n`` for compacted slots, at ``T`` for tail slots), masks free slots, and
  writes that split's softmax numerator, maximum and sum; a second kernel merges the splits.
  This replaces the query rotation, two batched matrix products, the softmax and the split sum.
* :func:`rope_write`: the fused q/k/v product's output split into heads, the query and key
  rotated, and the new token's rotated key, raw key and value written into its ring slot; this
  replaces the rotary kernel and the cache write.

Scores and the softmax are fp32; the probabilities meet the values in the cache's dtype, as in the
stock path. Equal to the stock fused step up to bf16 rounding (``tests/test_fast_decode.py``,
``-m cuda``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lacache.decode.kernels import SPLIT  # slots per split program: ring capacities are multiples of it

# The split kernel runs 8 warps: on an H200 (8B shape, 4,224 slots) 8.4 us against 9.4 with 4, 2 warps
# slower still; 64-slot splits 9.1 us plus a slower merge (docs/PERFORMANCE.md).
REDUCE_BLOCK = 64  # splits merged per loop iteration


@triton.jit
def _rotate(x, partner, d, cos, sin, D: tl.constexpr):
    """``x`` (fp32, last axis ``d``) rotated by ``cos``/``sin``; ``partner`` is ``x`` at ``(d + D/2) % D``."""
    return x * cos + tl.where(d < D // 2, -1.0, 1.0) * partner * sin


@triton.jit
def _attention_split(Q, K, V, IS_TAIL, VALID, COS, SIN, PART_O, PART_M, PART_L, scaling,
                     stride_kb, stride_kh, stride_kn, kv_heads, splits,
                     GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                     PRECISION: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // kv_heads, bh % kv_heads
    g, d = tl.arange(0, G_PAD), tl.arange(0, D)
    row = tl.minimum(g, GROUPS - 1)  # padded rows repeat the last head; their results are never read
    q_rows = Q + ((b * kv_heads + h) * GROUPS + row)[:, None] * D
    q_tail = tl.load(q_rows + d[None, :]).to(tl.float32)
    partner = tl.load(q_rows + ((d + D // 2) % D)[None, :]).to(tl.float32)
    cos, sin = tl.load(COS + d).to(tl.float32), tl.load(SIN + d).to(tl.float32)
    q_compact = _rotate(q_tail, partner, d, cos, sin, D)
    n = split * BLOCK + tl.arange(0, BLOCK)
    kv_offsets = b * stride_kb + h * stride_kh + n[:, None] * stride_kn + d[None, :]
    k = tl.load(K + kv_offsets)
    v = tl.load(V + kv_offsets)  # issued with the keys: both reads in flight at once
    s_tail = tl.dot(q_tail.to(k.dtype), tl.trans(k), input_precision=PRECISION)
    s_compact = tl.dot(q_compact.to(k.dtype), tl.trans(k), input_precision=PRECISION)
    tail = tl.load(IS_TAIL + n) != 0
    valid = tl.load(VALID + n) != 0
    s = tl.where(tail[None, :], s_tail, s_compact) * scaling
    s = tl.where(valid[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # a split with no valid slot: p = 0
    acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    part = (bh * splits + split) * G_PAD + g
    tl.store(PART_O + part[:, None] * D + d[None, :], acc)
    tl.store(PART_M + part, m)
    tl.store(PART_L + part, tl.sum(p, axis=1))


@triton.jit
def _attention_merge(PART_O, PART_M, PART_L, OUT, splits,
                     GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the splits, ``BLOCK`` at a time, rescaling the running sums as the maximum grows
    (a ring of up to ``BLOCK * 128`` slots: one iteration, every read in flight at once)."""
    bh, g = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, BLOCK), tl.arange(0, D)
    top = tl.full((1,), float("-inf"), tl.float32)  # [1] tensors: loop-carried values keep one type
    total = tl.zeros((D,), tl.float32)
    norm = tl.zeros((1,), tl.float32)
    for start in range(0, splits, BLOCK):
        inside = start + s < splits
        rows = (bh * splits + start + s) * G_PAD + g
        m = tl.load(PART_M + rows, mask=inside, other=float("-inf"))
        l = tl.load(PART_L + rows, mask=inside, other=0.0)
        o = tl.load(PART_O + rows[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        new_top = tl.maximum(top, tl.max(m, axis=0))
        base = tl.where(new_top == float("-inf"), 0.0, new_top)  # only empty splits so far: weights 0
        weight = tl.exp(m - base)
        scale = tl.exp(top - base)
        total = total * scale + tl.sum(o * weight[:, None], axis=0)
        norm = norm * scale + tl.sum(weight * l, axis=0)
        top = new_top
    tl.store(OUT + (bh * GROUPS + g) * D + d, (total / norm).to(OUT.dtype.element_ty))


def ring_attention(query, keys, values, is_tail, valid, shift_cos, shift_sin, scaling: float) -> torch.Tensor:
    """:func:`lacache.decode.kernels.ring_scores` for a contiguous ``query`` ``[B, H, D]``; ``[B, 1, H * D]`` out."""
    batch, heads, dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    if capacity % SPLIT or keys.stride(-1) != 1 or keys.stride() != values.stride() or not query.is_contiguous():
        raise ValueError(f"ring_attention: capacity {capacity} must be a multiple of {SPLIT}, with contiguous rows")
    groups, splits = heads // kv_heads, capacity // SPLIT
    g_pad = max(16, triton.next_power_of_2(groups))  # tl.dot needs 16 rows
    part_o = query.new_empty((batch * kv_heads * splits * g_pad, dim), dtype=torch.float32)
    part_m = query.new_empty(batch * kv_heads * splits * g_pad, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    _attention_split[(batch * kv_heads, splits)](
        query, keys, values, is_tail.view(torch.uint8), valid.view(torch.uint8), shift_cos, shift_sin, part_o, part_m,
        part_l, scaling, keys.stride(0), keys.stride(1), keys.stride(2), kv_heads, splits,
        GROUPS=groups, G_PAD=g_pad, D=dim, BLOCK=SPLIT, num_warps=8, PRECISION="ieee" if keys.dtype == torch.float32 else "tf32")
    out = torch.empty_like(query)
    _attention_merge[(batch * kv_heads, groups)](part_o, part_m, part_l, out, splits, GROUPS=groups, G_PAD=g_pad,
                                                  D=dim, BLOCK=REDUCE_BLOCK)
    return out.view(batch, 1, heads * dim)


@triton.jit
def _rope_write(QKV, COS, SIN, SLOT, QUERY, KEYS, RAW, VALUES, stride_qkv, stride_cos,
                stride_kb, stride_kh, stride_kn, heads, kv_heads, HAS_RAW: tl.constexpr, D: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    cos = tl.load(COS + b * stride_cos + d).to(tl.float32)
    sin = tl.load(SIN + b * stride_cos + d).to(tl.float32)
    row = QKV + b * stride_qkv + h * D
    x = tl.load(row + d).to(tl.float32)
    rotated = _rotate(x, tl.load(row + (d + D // 2) % D).to(tl.float32), d, cos, sin, D)
    if h < heads:
        tl.store(QUERY + (b * heads + h) * D + d, rotated.to(QUERY.dtype.element_ty))
    else:
        slot = tl.load(SLOT)
        j = (h - heads) % kv_heads
        at = b * stride_kb + j * stride_kh + slot * stride_kn + d
        if h < heads + kv_heads:
            tl.store(KEYS + at, rotated.to(KEYS.dtype.element_ty))
            if HAS_RAW:
                tl.store(RAW + at, x.to(RAW.dtype.element_ty))
        else:
            tl.store(VALUES + at, x.to(VALUES.dtype.element_ty))


def rope_write(qkv, cos, sin, slot, keys, raw, values, heads: int, kv_heads: int) -> torch.Tensor:
    """Split ``qkv`` ``[B, 1, (H + 2 H_kv) D]`` into heads, rotate q and k by ``cos``/``sin`` ``[B, 1, D]``,
    write the rotated key (and the raw key into ``raw`` if given) and the value into physical slot
    ``slot`` (a one-element device tensor) of ``keys``/``values`` ``[B, H_kv, capacity, D]``;
    return the rotated query ``[B, H, D]``."""
    batch = qkv.shape[0]
    dim = qkv.shape[-1] // (heads + 2 * kv_heads)
    if not (qkv.is_contiguous() and cos.stride(-1) == 1 and sin.stride() == cos.stride() and keys.stride() == values.stride()):
        raise ValueError("rope_write: qkv must be contiguous, cos/sin alike, keys/values alike")
    query = qkv.new_empty((batch, heads, dim))
    _rope_write[(batch, heads + 2 * kv_heads)](
        qkv, cos, sin, slot, query, keys, raw if raw is not None else keys, values, qkv.stride(0), cos.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), heads, kv_heads, HAS_RAW=raw is not None, D=dim)
    return query


NONE, NORM, SILU = 0, 1, 2  # what a product does to its input vector first (_matvec's PROLOGUE)


@triton.jit
def _skip_sum(r_row, x_row, k, k_in, ADD: tl.constexpr, dtype: tl.constexpr):
    """The residual at ``k``, plus ``x`` with ADD, rounded to ``dtype`` as the stock skip connection is."""
    t = tl.load(r_row + k, mask=k_in, other=0.0)
    if ADD:
        t = (t.to(tl.float32) + tl.load(x_row + k, mask=k_in, other=0.0).to(tl.float32)).to(dtype)
    return t


@triton.jit
def _matvec(X, W, BIAS, OUT, RESIDUAL, NORM_W, RESIDUAL_OUT, N, K, stride_x, stride_w, stride_r, eps,
            PROLOGUE: tl.constexpr, ADD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, K_PAD: tl.constexpr):
    """``OUT[b] = W @ x[b] (+ BIAS)`` for one batch row ``b`` (axis 0, fastest, so rows share the weight tiles in
    L2) and ``BLOCK_N`` output rows (axis 1), where ``x`` is ``X`` (NONE), ``silu(X[:K]) * X[K:]`` (SILU),
    or the RMSNorm of ``RESIDUAL + X`` (NORM with ADD; program 0 of each row stores that sum in
    ``RESIDUAL_OUT``) or of ``RESIDUAL`` (NORM), rounded to the model's dtype where the stock modules round."""
    b, block = tl.program_id(0), tl.program_id(1)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < N
    k0 = tl.arange(0, BLOCK_K)
    dtype = W.dtype.element_ty
    x_row, r_row = X + b * stride_x, RESIDUAL + b * stride_r
    if PROLOGUE == 1:
        whole = tl.arange(0, K_PAD)
        total = _skip_sum(r_row, x_row, whole, whole < K, ADD, dtype).to(tl.float32)
        inverse_rms = 1.0 / tl.sqrt(tl.sum(total * total, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + k0
        k_in = k < K
        if PROLOGUE == 1:
            t = _skip_sum(r_row, x_row, k, k_in, ADD, dtype)
            if ADD and block == 0:
                tl.store(RESIDUAL_OUT + b * stride_r + k, t, mask=k_in)
            normed = (t.to(tl.float32) * inverse_rms).to(dtype)
            x = (tl.load(NORM_W + k, mask=k_in, other=0.0).to(tl.float32) * normed.to(tl.float32)).to(dtype)
        elif PROLOGUE == 2:
            gate = tl.load(x_row + k, mask=k_in, other=0.0).to(tl.float32)
            up = tl.load(x_row + K + k, mask=k_in, other=0.0).to(tl.float32)
            x = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
        else:
            x = tl.load(x_row + k, mask=k_in, other=0.0)
        w = tl.load(W + n[:, None] * stride_w + k[None, :], mask=n_in[:, None] & k_in[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(BIAS + n, mask=n_in, other=0.0).to(tl.float32)
    tl.store(OUT + b * N + n, out.to(OUT.dtype.element_ty), mask=n_in)


def matvec_config(rows: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for a product with ``rows`` output rows. From a grid
    on an H200 (Llama-3-8B's four products, docs/data/gpu_h200_matvec/): 16-row blocks throughout; wide
    products (gate/up: 1,792 programs, many per SM) stream best with 256-wide tiles and 4 warps, the
    narrower ones (q/k/v, output, down: 256-384 programs) with 512-wide tiles and 8 warps."""
    return (16, 256, 4, 2) if rows >= 16384 else (16, 512, 8, 2)


def matvec(x, weight, bias=None, prologue: int = NONE, residual=None, norm_weight=None, eps: float = 0.0,
           add: bool = False, config: tuple[int, int, int, int] | None = None):
    """``weight @ x (+ bias)`` for ``x`` ``[B, 1, K]`` (``[B, 1, 2K]`` for SILU) and ``weight`` ``[N, K]``;
    with NORM, ``x`` is the RMSNorm (``norm_weight``, ``eps``) of ``residual + x`` (``add``) or of
    ``residual``. Returns ``[B, 1, N]`` and, with ``add``, the new residual ``residual + x``. ``config``:
    see :func:`matvec_config`."""
    n_out, k = weight.shape
    batch = x.shape[0]
    if weight.stride(-1) != 1 or x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("matvec: weight, x and residual need contiguous rows")
    block_n, block_k, warps, stages = config or matvec_config(n_out)
    out = x.new_empty((batch, 1, n_out))
    residual_out = torch.empty_like(residual) if add else None
    _matvec[(batch, triton.cdiv(n_out, block_n))](
        x, weight, bias if bias is not None else weight, out, residual if residual is not None else x,
        norm_weight if norm_weight is not None else weight, residual_out if add else out, n_out, k, x.stride(0),
        weight.stride(0), residual.stride(0) if residual is not None else 0, eps, PROLOGUE=prologue, ADD=add,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, K_PAD=triton.next_power_of_2(k),
        num_warps=warps, num_stages=stages)
    return (out, residual_out) if add else out
