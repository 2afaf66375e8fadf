"""The ladder pattern and iterative compaction of LaCache, as pure functions.

Notation follows ``docs/LACACHE.md`` (and the reference code): ``L`` layers, span ``S``, overlap ``O``,
budget ``C`` slots per layer, ``s`` sink slots. One compaction step ("merging a ladder") at cursor
``c`` takes the block of ``b`` slots ``[c, c+b)`` and keeps, in layer ``i``, the ``a`` slots
``[c+off_i, c+off_i+a)``; the tail moves left by ``r = b - a``. The layout picks ``off_i``:
``reference`` (the reference code) ``off_i = i mod P``; ``bands`` (the paper's text) the window
that holds the tokens whose band of ``S`` consecutive layers reaches layer ``i``
(:meth:`Ladder.offset`).

Everything here is host-side integer arithmetic. The cache (``lacache.lacache_cache``) turns a
:class:`Compaction` into one gather on the device; :func:`kept_positions` replays the same rules on
plain Python lists and is what the tests compare against the reference traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LAYOUTS = ("reference", "bands")


class LadderConfigError(ValueError):
    """A LaCache configuration the reference code would divide by zero on or silently misbehave."""


@dataclass(frozen=True)
class Ladder:
    """Derived constants of one (layers, span, overlap) triple (spec section 1.1) and its layout."""

    num_layers: int
    span: int
    overlap: int
    layout: str = "reference"

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
        """Start of the ``a`` slots layer ``layer`` keeps inside each merged block (``0 .. b - a``).

        ``reference``: ``layer mod P``, the reference code's interleaved "stacked ladder".
        ``bands``: token ``j`` of a block is kept by the ``S`` layers ``[j*d, j*d + S)``, as the
        paper describes, so layer ``i`` needs the tokens from ``ceil((i - S + 1)/d)`` to
        ``floor(i/d)`` (at most ``a`` of them). It keeps the ``a`` tokens starting at the first
        one, shifted back inside the block where that runs past its end; a layer whose band
        holds fewer than ``a`` tokens (the first and last layers when ``O > 0``, and every layer
        when ``d`` does not divide ``S``) so also keeps the next (or, at the end, the previous)
        tokens, and every layer keeps ``a`` slots per block: equal lengths in all layers.
        """
        if self.layout == "bands":
            first = -((self.span - 1 - layer) // self.stride)  # ceil((layer - S + 1) / d)
            return min(max(first, 0), self.freed)
        return layer % self.patterns

    def problems(self) -> list[str]:
        """Violated structural constraints, each with the nearest valid values."""
        L, S, O = self.num_layers, self.span, self.overlap
        if self.layout not in LAYOUTS:
            return [f"layout={self.layout!r} is not one of {LAYOUTS}"]
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


def validate(num_layers: int, span: int, overlap: int, budget: int | None = None, sink: int = 0,
             layout: str = "reference") -> Ladder:
    """Return the :class:`Ladder` or raise :class:`LadderConfigError` naming every failed constraint."""
    ladder = Ladder(num_layers, span, overlap, layout)
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
    num_layers: int, span: int, overlap: int, budget: int, sink: int, num_tokens: int, compact_every: int = 1,
    layout: str = "reference",
) -> list[list[int]]:
    """Original token positions each layer holds after ``num_tokens`` tokens fed one at a time.

    Starts from an empty cache and compacts after every token, as the reference's ppl loop does
    (after every ``compact_every`` tokens past the budget, if given).
    """
    ladder = validate(num_layers, span, overlap, budget, sink, layout)
    state = LadderState(ladder, budget, sink, compact_every)
    first_layer = {}  # layers with equal offsets hold equal caches: replay the first layer of each offset
    for layer in range(num_layers):
        first_layer.setdefault(ladder.offset(layer), layer)
    held = {offset: [] for offset in first_layer}
    for token in range(num_tokens):
        for cache in held.values():
            cache.append(token)
        compaction = state.plan(len(held[0]))  # offset 0 (layer 0) exists in every layout
        if compaction is None:
            continue
        for offset, cache in held.items():
            for seg in compaction.segments:
                cache[:] = [cache[j] for j in state.kept_sources(first_layer[offset], seg, len(cache))]
    return [list(held[ladder.offset(i)]) for i in range(num_layers)]
