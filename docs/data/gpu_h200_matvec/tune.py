"""Batch-1 products of the Llama-3-8B shape on one GPU: cuBLAS (with the elementwise kernel each
Triton prologue replaces) against lacache.decode.triton_kernels.matvec over a grid of configs.

Each timing replays a CUDA graph of 8 back-to-back products on 8 different weight copies (more than
L2 holds), as in a decode step. Prints one line per (shape, variant) and, last, the best config per
shape as a Python dict. Usage: python tune.py [OUT.json]
"""

import itertools
import json
import sys

import torch

from lacache.decode import triton_kernels as td
from lacache.decode.kernels import add_rms_norm, silu_mul_split

HIDDEN, INTER, LAYERS = 4096, 14336, 8
SHAPES = {  # name: (N, K, prologue)
    "qkv": (6144, HIDDEN, td.NORM),
    "o": (HIDDEN, HIDDEN, td.NONE),
    "gate_up": (2 * INTER, HIDDEN, td.NORM),
    "down": (HIDDEN, INTER, td.SILU),
}
dev, dt = "cuda", torch.bfloat16


def timed(fn, replays=20):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / LAYERS  # us per product


def main():
    results, best = [], {}
    compiled_norm = torch.compile(add_rms_norm, fullgraph=True, dynamic=False)
    compiled_silu = torch.compile(silu_mul_split, fullgraph=True, dynamic=False)
    for name, (n, k, prologue) in SHAPES.items():
        weights = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)]
        width = 2 * k if prologue == td.SILU else k
        x = torch.randn(1, 1, width, device=dev, dtype=dt)
        residual = torch.randn(1, 1, k, device=dev, dtype=dt)
        norm_w = torch.rand(k, device=dev, dtype=dt) + 0.5
        gbytes = n * k * 2 / 1e9

        def cublas(with_prologue):
            for w in weights:
                v = x
                if with_prologue and prologue == td.NORM:
                    v, _ = compiled_norm(x, residual, norm_w, 1e-5)
                elif prologue == td.SILU:
                    v = compiled_silu(x) if with_prologue else x[..., :k]
                torch.nn.functional.linear(v, w)

        for label, fn in (("cublas", lambda: cublas(False)), ("cublas+prologue", lambda: cublas(True))):
            us = timed(fn)
            print(f"{name:8s} {label:32s} {us:8.2f} us  {gbytes / us * 1e6 / 1e3:5.2f} TB/s", flush=True)
            results.append({"shape": name, "variant": label, "us": us})
        # reference for correctness of the chosen config
        if prologue == td.NORM:
            v, _ = add_rms_norm(x, residual, norm_w, 1e-5)
        elif prologue == td.SILU:
            v = silu_mul_split(x)
        else:
            v = x
        want = torch.nn.functional.linear(v, weights[0]).float()
        for block_n, block_k, warps, stages in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (2, 4)):
            if not 4096 <= block_n * block_k <= 16384:
                continue
            config = (block_n, block_k, warps, stages)
            kwargs = dict(config=config, prologue=prologue, residual=residual, norm_weight=norm_w, eps=1e-5, add=True) if prologue == td.NORM \
                else dict(config=config, prologue=prologue)
            try:
                got = td.matvec(x, weights[0], **kwargs)
                got = (got[0] if isinstance(got, tuple) else got).float()
                error = (got - want).abs().max().item()
                us = timed(lambda: [td.matvec(x, w, **kwargs) for w in weights])
            except Exception as err:  # a config the compiler refuses (registers, shared memory)
                print(f"{name:8s} {str((block_n, block_k, warps, stages)):32s} failed: {type(err).__name__}", flush=True)
                continue
            print(f"{name:8s} {str((block_n, block_k, warps, stages)):32s} {us:8.2f} us  {gbytes / us * 1e6 / 1e3:5.2f} TB/s  max err {error:.4f}", flush=True)
            results.append({"shape": name, "variant": [block_n, block_k, warps, stages], "us": us, "error": error})
            if error < 0.05 and us < best.get((n, k), (None, float("inf")))[1]:
                best[(n, k)] = ((block_n, block_k, warps, stages), us)
        del weights
        torch.cuda.empty_cache()
    chosen = {key: cfg for key, (cfg, _) in best.items()}
    print("BEST", chosen)
    if len(sys.argv) > 1:
        json.dump({"results": results, "best": [[list(key), list(cfg)] for key, cfg in chosen.items()]}, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
