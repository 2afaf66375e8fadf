"""The ring attention's split kernel on one GPU: lacache.decode.triton_kernels's (one 128-slot tile per program)
against a variant that walks its slots in sub-blocks with an online softmax (fewer registers, loads
pipelined), at the Llama-3-8B shape's ring capacities (LaCache 4096: 4,224 slots; full cache at 8K:
8,320; at 32K: 32,896). Each timing replays a CUDA graph of 32 layers' attention (32 different
caches, as in a step). Usage: python split_variants.py
"""

import itertools

import torch
import triton
import triton.language as tl

from lacache.decode import triton_kernels as td


@triton.jit
def _split_walk(Q, K, V, IS_TAIL, VALID, COS, SIN, PART_O, PART_M, PART_L, scaling,
                stride_kb, stride_kh, stride_kn, kv_heads, splits,
                GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr, SUB: tl.constexpr,
                STAGES: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // kv_heads, bh % kv_heads
    g, d = tl.arange(0, G_PAD), tl.arange(0, D)
    row = tl.minimum(g, GROUPS - 1)
    q_rows = Q + ((b * kv_heads + h) * GROUPS + row)[:, None] * D
    q_tail = tl.load(q_rows + d[None, :]).to(tl.float32)
    partner = tl.load(q_rows + ((d + D // 2) % D)[None, :]).to(tl.float32)
    cos, sin = tl.load(COS + d).to(tl.float32), tl.load(SIN + d).to(tl.float32)
    q_compact = (q_tail * cos + tl.where(d < D // 2, -1.0, 1.0) * partner * sin).to(K.dtype.element_ty)
    q_tail = q_tail.to(K.dtype.element_ty)
    top = tl.full((G_PAD,), float("-inf"), tl.float32)
    norm = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for start in tl.range(0, SLOTS, SUB, num_stages=STAGES):
        n = split * SLOTS + start + tl.arange(0, SUB)
        offsets = b * stride_kb + h * stride_kh + n[:, None] * stride_kn + d[None, :]
        k = tl.load(K + offsets)
        v = tl.load(V + offsets)
        s_tail = tl.dot(q_tail, tl.trans(k))
        s_compact = tl.dot(q_compact, tl.trans(k))
        tail = tl.load(IS_TAIL + n) != 0
        valid = tl.load(VALID + n) != 0
        s = tl.where(tail[None, :], s_tail, s_compact) * scaling
        s = tl.where(valid[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        base = tl.where(new_top == float("-inf"), 0.0, new_top)
        scale = tl.exp(top - base)
        p = tl.exp(s - base[:, None])
        norm = norm * scale + tl.sum(p, axis=1)
        acc = acc * scale[:, None] + tl.dot(p.to(v.dtype), v)
        top = new_top
    part = (bh * splits + split) * G_PAD + g
    tl.store(PART_O + part[:, None] * D + d[None, :], acc)
    tl.store(PART_M + part, top)
    tl.store(PART_L + part, norm)


def walk_attention(query, keys, values, is_tail, valid, shift_cos, shift_sin, scaling, slots, sub, stages, warps):
    batch, heads, dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    groups, splits = heads // kv_heads, capacity // slots
    g_pad = max(16, triton.next_power_of_2(groups))
    part_o = query.new_empty((batch * kv_heads * splits * g_pad, dim), dtype=torch.float32)
    part_m = query.new_empty(batch * kv_heads * splits * g_pad, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    _split_walk[(batch * kv_heads, splits)](
        query, keys, values, is_tail.view(torch.uint8), valid.view(torch.uint8), shift_cos, shift_sin, part_o, part_m,
        part_l, scaling, keys.stride(0), keys.stride(1), keys.stride(2), kv_heads, splits,
        GROUPS=groups, G_PAD=g_pad, D=dim, SLOTS=slots, SUB=sub, STAGES=stages, num_warps=warps)
    out = torch.empty_like(query)
    td._attention_merge[(batch * kv_heads, groups)](part_o, part_m, part_l, out, splits, GROUPS=groups, G_PAD=g_pad,
                                                     D=dim, BLOCK=td.REDUCE_BLOCK)
    return out.view(batch, 1, heads * dim)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layers = 32 if device == "cuda" else 1
    for capacity in (4224, 8320, 32896) if device == "cuda" else (384,):
        gen = torch.Generator(device).manual_seed(0)
        caches = [(torch.randn(1, 8, capacity, 128, device=device, generator=gen).to(dtype),
                   torch.randn(1, 8, capacity, 128, device=device, generator=gen).to(dtype)) for _ in range(layers)]
        query = (torch.randn(1, 32, 128, device=device, generator=gen) * 4).to(dtype)
        valid = torch.rand(capacity, device=device, generator=gen) < 0.97
        is_tail = torch.rand(capacity, device=device, generator=gen) < 0.5
        angle = torch.rand(64, device=device, generator=gen) * 6
        cos, sin = torch.cat((angle, angle)).cos().to(dtype), torch.cat((angle, angle)).sin().to(dtype)
        args = (is_tail, valid, cos, sin, 128**-0.5)
        want = td.ring_attention(query, *caches[0], *args).float()
        gbytes = layers * 2 * caches[0][0].numel() * caches[0][0].element_size() / 1e9

        def report(label, fn):
            from tune import LAYERS, timed  # noqa: E402  (same directory; timed divides by its LAYERS)
            us = timed(lambda: [fn(k, v) for k, v in caches], replays=20) * LAYERS / layers if device == "cuda" else float("nan")
            err = (fn(*caches[0]).float() - want).abs().max().item()
            print(f"capacity {capacity:6d} {label:34s} {us:8.2f} us/layer  {gbytes / layers / us * 1e6 / 1e3 if us == us else 0:5.2f} TB/s  max err {err:.4f}", flush=True)

        report("current (128-slot tile, 8 warps)", lambda k, v: td.ring_attention(query, k, v, *args))
        grid = itertools.product((128,), (16, 32, 64), (2, 3), (4, 8)) if device == "cuda" else [(128, 32, 2, 4)]
        for slots, sub, stages, warps in grid:
            if capacity % slots:
                continue
            report(f"walk slots={slots} sub={sub} st={stages} w={warps}",
                   lambda k, v: walk_attention(query, k, v, *args, slots, sub, stages, warps))


if __name__ == "__main__":
    main()
