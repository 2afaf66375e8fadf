"""Eviction rules of the attention-scored policies in the terms of tests/oracle.py, written from the
papers' reference code with plain Python lists (independent of lacache's implementation).

A rule is ``rule(layer, kept, weights, seen, state) -> kept'``: ``kept`` ``[kv_heads, n]`` original
positions held after the forward's tokens were appended, ``weights`` ``[q_heads, T, n]`` the
forward's attention over them, ``seen`` the tokens seen after the forward. Returned positions are
ascending. Ties in a top-k (max pooling makes plateaus) may be broken differently from torch.topk:
compare logits with ``pooling="avg"``.
"""

from __future__ import annotations

import math

import torch


def _top(values: list[float], k: int) -> list[int]:
    """Indices of the ``k`` largest values, ascending."""
    return sorted(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def h2o(budget: int, heavy: int):
    """H2O (FMInference/H2O, ``H2OKVCache_LayerWise``): every forward adds its attention (summed over
    queries, and over the query heads of a KV head) to each held token's score, then, over budget,
    keeps the ``heavy`` best-scored tokens before the ``budget - heavy`` most recent, plus those."""
    recent = budget - heavy

    def rule(layer, kept, weights, seen, state):
        kv_heads, n = kept.shape
        group = weights.shape[0] // kv_heads
        scores = state.setdefault(("h2o", layer), [{} for _ in range(kv_heads)])
        out = []
        for h in range(kv_heads):
            positions = kept[h].tolist()
            for j, p in enumerate(positions):
                scores[h][p] = scores[h].get(p, 0.0) + float(weights[h * group : (h + 1) * group, :, j].sum())
            if n <= budget:
                out.append(positions)
                continue
            older = positions[: n - recent]
            chosen = [older[i] for i in _top([scores[h][p] for p in older], heavy)] + positions[n - recent :]
            scores[h] = {p: scores[h][p] for p in chosen}
            out.append(chosen)
        return torch.tensor(out, dtype=torch.long)

    return rule


def tova(budget: int):
    """TOVA (schwartz-lab-NLP/TOVA, ``TOVACache.reduce``): over budget, keep the ``budget`` tokens with
    the largest weight of the forward's last query, averaged over all query heads (one choice per layer)."""

    def rule(layer, kept, weights, seen, state):
        n = kept.shape[1]
        if n <= budget:
            return kept
        mean = weights[:, -1, :].mean(0).tolist()
        return kept[:, _top(mean, budget)]

    return rule


def _pool(values: list[float], kernel: int, pooling: str) -> list[float]:
    """Stride-1 pooling keeping the length: max ignores the padding, avg counts it as zeros (torch's defaults)."""
    half, out = kernel // 2, []
    for i in range(len(values)):
        cells = values[max(0, i - half) : i + half + 1]
        out.append(max(cells) if pooling == "max" else sum(cells) / kernel)
    return out


def pyramid_entries(budget: int, window: int, layers: int, seen: int, beta: float) -> list[int]:
    """KVCache-Factory's ``PyramidKVCluster`` schedule for ``seen`` tokens with exact arithmetic: the selected
    counts fall linearly from ``2B - B/beta`` to ``B/beta`` (``B = budget - window``; the top clipped to
    ``seen - window``, the bottom raised to match), uniform when ``seen < 2B``; rounded (largest remainder)
    to add up to ``layers * B``; each layer also keeps the window."""
    b = budget - window
    if layers == 1 or seen < 2 * b:
        return [budget] * layers
    low = b / beta
    high = 2 * b - low
    if high > seen - window:
        high, low = seen - window, 2 * b - (seen - window)
    step = (high - low) / (layers - 1)
    exact = [high - i * step for i in range(layers)]
    base = [int(math.floor(x)) for x in exact]
    short = layers * b - sum(base)
    for i in sorted(range(layers), key=lambda i: -(exact[i] - base[i]))[:short]:
        base[i] += 1
    return [window + c for c in base]


def snapkv(budget: int, window: int = 32, kernel: int = 7, pooling: str = "max", prompt_length: int | None = None,
           decode_budget: int | None = None, beta: float | None = None, layers: int | None = None):
    """SnapKV (FasterDecoding/SnapKV, ``SnapKVCluster.update_kv``), or PyramidKV with ``beta`` and ``layers``.

    Each held token's score is the attention the newest ``window`` queries pay it (a query's weights
    renormalised over the tokens still held, i.e. recomputed over them), summed over the query heads of
    the KV head; the scores of all but the newest ``window`` held tokens are pooled; the top
    ``entries - window`` of them and the newest ``window`` are kept. Compresses after any forward of the
    prompt that leaves a layer over its entries, and in decode every ``decode_budget`` entries over."""

    def entries(layer, seen, count):
        if beta is None or (count > 1 and prompt_length is not None and seen < prompt_length):
            return budget
        return pyramid_entries(budget, window, layers, seen, beta)[layer]

    def rule(layer, kept, weights, seen, state):
        kv_heads, n = kept.shape
        q_heads, count, _ = weights.shape
        group = q_heads // kv_heads
        rows = state.setdefault(("rows", layer), [])  # per query: per query head, {position: weight}
        for t in range(count):
            rows.append([{int(p): float(weights[q, t, j]) for j, p in enumerate(kept[q // group].tolist())}
                         for q in range(q_heads)])
        del rows[:-window]
        target = entries(layer, seen, count)
        if n <= target:
            return kept
        if prompt_length is not None and seen > prompt_length and (decode_budget is None or n < target + decode_budget):
            return kept
        out = []
        for h in range(kv_heads):
            positions = kept[h].tolist()
            prefix = positions[: n - window]
            scores = [0.0] * len(prefix)
            for row in rows:
                for q in range(h * group, (h + 1) * group):
                    total = sum(row[q].get(p, 0.0) for p in positions)
                    for i, p in enumerate(prefix):
                        scores[i] += row[q].get(p, 0.0) / total
            chosen = _top(_pool(scores, kernel, pooling), target - window)
            out.append([prefix[i] for i in chosen] + positions[n - window :])
        return torch.tensor(out, dtype=torch.long)

    return rule
