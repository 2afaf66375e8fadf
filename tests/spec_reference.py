"""A literal, list-based transcription of the reference's ``compact(n)`` (spec section 1.3), bugs included.

Test oracle only: it is slow and reproduces the reference's bulk ``t >= 2`` approximation, which
the real implementation deliberately replaces.
"""

from __future__ import annotations

import math


class SpecLaCache:
    def __init__(self, layers: int, span: int, overlap: int, budget: int, sink: int):
        d = span - overlap
        self.L, self.s = layers, sink
        self.b = 1 + math.ceil((layers - span) / d)
        self.a = min(math.ceil(span / d), self.b)
        self.r = self.b - self.a
        self.cursor, self.budget, self.compensated = sink, budget, False

    def compact(self, caches: list[list[int]]) -> list[list[int]]:
        L, s, a, b, r = self.L, self.s, self.a, self.b, self.r
        n = len(caches[0])
        if n <= self.budget:
            return caches
        if not self.compensated:
            self.budget += r // 2
            self.compensated = True
        R = n - self.budget
        c = self.cursor
        m0 = (self.budget - c - L) // a
        out = []
        if R <= m0 * r:
            m = -(-R // r)
            for i, cache in enumerate(caches):
                off = i % (r + 1)
                keep = list(range(c)) + [c + j * b + off + k for j in range(max(m, 0)) for k in range(a)]
                keep += list(range(c + max(m, 0) * b, n))
                out.append([cache[x] for x in keep])
            self.cursor = c + max(m, 0) * a
            return out
        W = ((self.budget - s - L) // a) * r
        R2 = R - m0 * r
        t = -(-R2 // W)
        bt = b + (t - 1) * (b - 1)
        rt = bt - a
        m2 = -(-R2 // rt)
        for i, cache in enumerate(caches):
            off = i % (r + 1)
            pass1 = list(range(c)) + [c + j * b + off + k for j in range(m0) for k in range(a)] + list(range(c + m0 * b, n))
            off2 = i % (rt + 1)
            pass2 = list(range(s)) + [s + off2 + j * bt + t * k for j in range(m2) for k in range(a)]
            pass2 += list(range(s + m2 * bt, len(pass1)))
            out.append([cache[pass1[x]] for x in pass2])
        self.cursor = s + m2 * a
        return out
