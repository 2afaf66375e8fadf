"""The ladder pattern and iterative compaction of LaCache, as pure functions.

Notation follows ``docs/LACACHE.md`` (and the reference code): ``L`` layers, span ``S``, overlap ``O``,
budget ``C`` slots per layer, ``s`` sink slots. One compaction step ("merging a ladder") at cursor
``c`` takes the block of ``b`` slots ``[c, c+b)`` and keeps, in layer ``i``, the ``a`` slots
``[c+off_i, c+off_i+a)`` with ``off_i = i mod P``; the tail moves left by ``r = b - a``.

Everything here is host-side integer arithmetic. The cache (``lacache.lacache_cache``) turns a
:class:`Compaction` into one gather on the device; :func:`kept_positions` replays the same rules on
plain Python lists and is what the tests compare against the reference traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class LadderConfigError(ValueError):
    """A LaCache configuration the reference code would divide by zero on or silently misbehave."""


@dataclass(frozen=True)
class Ladder:
    """Derived constants of one (layers, span, overlap) triple (spec section 1.1)."""

    num_layers: int
    span: int
    overlap: int

    @property
    def stride(self) -> int:  # d = S - O
        return self.span - self.overlap

    @property
    def block(self) -> int:  # b: slots one ladder covers before compaction
        return 1 + math.ceil((self.num_layers - self.span) / self.stride)

    @property
    def kept(self) -> int:  # a: slots each layer keeps out of b
        return min(math.ceil(self.span / self.stride), self.block)

    @property
    def freed(self) -> int:  # r: slots freed per ladder
        return self.block - self.kept

    @property
    def patterns(self) -> int:  # P: distinct layer patterns
        return self.freed + 1

    def offset(self, layer: int) -> int:
        return layer % self.patterns

    def problems(self) -> list[str]:
        """Violated structural constraints, each with the nearest valid values."""
        L, S, O = self.num_layers, self.span, self.overlap
        if S < 1 or O < 0:
            return [f"span must be >= 1 and overlap >= 0 (got span={S}, overlap={O})"]
        if O >= S:
            return [f"overlap={O} must be < span={S} (stride span-overlap >= 1); nearest valid: overlap={S - 1}"]
        if S >= L:
            return [f"span={S} must be < num_layers={L}; nearest valid: {_nearest(L, S, O)}"]
        if self.freed < 1:
            return [
                f"(span={S}, overlap={O}) with {L} layers gives a ladder that frees no slot "
                f"(block b={self.block} == kept a={self.kept}); nearest valid: {_nearest(L, S, O)}"
            ]
        return []


def _valid(L: int, S: int, O: int) -> bool:
    return 0 <= O < S < L and Ladder(L, S, O).freed >= 1


def _nearest(L: int, S: int, O: int) -> str:
    candidates = [(abs(s - S) + abs(o - O), s, o) for s in range(1, L) for o in range(0, s) if _valid(L, s, o)]
    if not candidates:
        return "none (too few layers for any ladder)"
    best = min(candidates)[0]
    return ", ".join(f"span={s} overlap={o}" for d, s, o in sorted(candidates) if d == best)


def min_budget(ladder: Ladder, sink: int) -> int:
    """Smallest budget whose sweep has room for one ladder: C - s - L >= a (spec section 5.4)."""
    return sink + ladder.num_layers + ladder.kept


def validate(num_layers: int, span: int, overlap: int, budget: int | None = None, sink: int = 0) -> Ladder:
    """Return the :class:`Ladder` or raise :class:`LadderConfigError` naming every failed constraint."""
    ladder = Ladder(num_layers, span, overlap)
    problems = ladder.problems()
    if not problems and budget is not None:
        if sink < 0:
            problems.append(f"sink={sink} must be >= 0")
        elif budget < min_budget(ladder, sink):
            problems.append(
                f"budget={budget} must be >= sink + num_layers + a = {sink} + {num_layers} + {ladder.kept} "
                f"= {min_budget(ladder, sink)} (otherwise a sweep has no room for a ladder); "
                f"nearest valid: budget={min_budget(ladder, sink)}"
                + (f" or sink={budget - num_layers - ladder.kept}" if budget - num_layers - ladder.kept >= 0 else "")
            )
    if problems:
        raise LadderConfigError("invalid LaCache configuration: " + "; ".join(problems))
    return ladder


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive ladders merged starting at ``cursor`` (one closed-form index map)."""

    cursor: int
    count: int


@dataclass(frozen=True)
class Compaction:
    """What one call of the compaction does to a cache of ``length`` slots."""

    length: int  # slots before
    new_length: int  # slots after
    segments: tuple[Segment, ...]  # applied in order, each on the result of the previous

    @property
    def first_changed(self) -> int:
        return min((seg.cursor for seg in self.segments), default=self.new_length)


class LadderState:
    """Cursor and compensated budget of one sequence (spec sections 1.2, 1.3, 1.5).

    ``plan(n)`` is the reference's ``compact(n)`` decision. With ``every = k > 1`` the cache grows
    ``k`` slots past the budget and then compacts them at once (spec section 4.2.3). Where the reference's bulk "startover"
    path needs more than one sweep (``t >= 2``), it uses an approximate stretched block that can
    duplicate tokens or drop the newest one (spec section 5.1-5.2); here the ladders are merged one
    sweep after another instead, exactly as if they had been merged one at a time. For ``t = 1``
    (every decode step, and every bulk call that fits in one sweep) both are identical.
    """

    def __init__(self, ladder: Ladder, budget: int, sink: int, every: int = 1):
        self.ladder, self.budget, self.sink, self.every = ladder, budget, sink, every
        self.cursor = sink
        self.compensated_budget = budget
        self.compensated = False

    def plan(self, n: int) -> Compaction | None:
        if n <= self.compensated_budget:
            return None
        lad = self.ladder
        if not self.compensated:
            self.compensated_budget += lad.freed // 2
            self.compensated = True
        excess = n - self.compensated_budget
        if excess < self.every:  # amortized compaction: let the cache grow by `every` slots first
            return None
        merges = -(-excess // lad.freed)
        segments = []
        limit = self.compensated_budget - lad.num_layers  # the newest L slots are never merged in a sweep
        while merges > 0:
            room = (limit - self.cursor) // lad.kept
            if room <= 0:
                self.cursor = self.sink  # start over: the next sweep thins already-compacted history
                continue
            count = min(room, merges)
            segments.append(Segment(self.cursor, count))
            self.cursor += count * lad.kept
            merges -= count
        new_length = n - sum(seg.count for seg in segments) * lad.freed
        return Compaction(n, new_length, tuple(segments)) if segments else None

    def kept_sources(self, layer: int, segment: Segment, length: int) -> list[int]:
        """Source slot of every output slot of one segment, for one layer (list form of the map)."""
        lad, c, m = self.ladder, segment.cursor, segment.count
        off = lad.offset(layer)
        merged = [c + j * lad.block + off + k for j in range(m) for k in range(lad.kept)]
        return list(range(c)) + merged + list(range(c + m * lad.block, length))


def kept_positions(
    num_layers: int, span: int, overlap: int, budget: int, sink: int, num_tokens: int, compact_every: int = 1
) -> list[list[int]]:
    """Original token positions each layer holds after ``num_tokens`` tokens fed one at a time.

    Starts from an empty cache and compacts after every token, as the reference's ppl loop does
    (after every ``compact_every`` tokens past the budget, if given).
    """
    ladder = validate(num_layers, span, overlap, budget, sink)
    state = LadderState(ladder, budget, sink, compact_every)
    patterns = [[] for _ in range(ladder.patterns)]  # layers with equal offsets hold equal caches
    for token in range(num_tokens):
        for held in patterns:
            held.append(token)
        compaction = state.plan(len(patterns[0]))
        if compaction is None:
            continue
        for p, held in enumerate(patterns):
            for seg in compaction.segments:
                held[:] = [held[j] for j in state.kept_sources(p, seg, len(held))]
    return [list(patterns[ladder.offset(i)]) for i in range(num_layers)]
