"""The ladder math against the reference: golden traces, a literal transcription, validation."""

import json
import random
from pathlib import Path

import pytest

from lacache.ladder import Ladder, LadderConfigError, LadderState, kept_positions, validate
from spec_reference import SpecLaCache

GOLDEN = json.loads((Path(__file__).parent / "data" / "lacache_decode_traces.json").read_text())


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"L{c['num_layers']}-S{c['span']}-O{c['overlap']}-C{c['budget']}")
def test_kept_positions_equal_reference_traces(case):
    args = {k: case[k] for k in ("num_layers", "span", "overlap", "budget", "sink")}
    for tokens, expected in case["kept_positions"].items():
        assert kept_positions(**args, num_tokens=int(tokens)) == expected, f"after {tokens} tokens"


def _random_valid_configs(count, seed):
    rng = random.Random(seed)
    found = []
    while len(found) < count:
        L = rng.choice([4, 6, 8, 12, 16, 24, 30, 32])
        S, O = rng.randint(1, L), rng.randint(0, L)
        if not (0 <= O < S < L) or Ladder(L, S, O).freed < 1:
            continue
        lad = Ladder(L, S, O)
        sink = rng.randint(0, 16)
        budget = sink + L + lad.kept + rng.randint(0, 80)
        found.append((L, S, O, budget, sink))
    return found


@pytest.mark.parametrize("config", _random_valid_configs(60, seed=1))
def test_decode_equals_literal_reference(config):
    L, S, O, C, s = config
    spec = SpecLaCache(L, S, O, C, s)
    caches = [[] for _ in range(L)]
    checkpoints = {C, C + 1, 2 * C, 3 * C + 7}
    for t in range(3 * C + 8):
        caches = [cache + [t] for cache in caches]
        caches = spec.compact(caches)
        if t + 1 in checkpoints:
            assert kept_positions(L, S, O, C, s, t + 1) == caches


def _bulk(state, L, held):
    compaction = state.plan(len(held[0]))
    if compaction is None:
        return held
    for seg in compaction.segments:
        held = [[h[j] for j in state.kept_sources(i, seg, len(h))] for i, h in enumerate(held)]
    return held


@pytest.mark.parametrize("config", _random_valid_configs(40, seed=2))
def test_single_sweep_bulk_equals_reference_and_multi_sweep_is_clean(config):
    """One bulk call (prefill then compact): identical to the reference when it fits one sweep
    (t = 1); where the reference's t >= 2 branch runs, ours still keeps sorted unique tokens,
    the sink and the newest token, at the same length."""
    L, S, O, C, s = config
    lad = Ladder(L, S, O)
    for n in (C + 1, C + 5, 2 * C, 4 * C + 3):
        ours = _bulk(LadderState(lad, C, s), L, [list(range(n)) for _ in range(L)])
        spec = SpecLaCache(L, S, O, C, s)
        compensated = C + lad.freed // 2
        W = ((compensated - s - L) // lad.kept) * lad.freed
        excess = n - compensated
        fits_one_sweep = excess <= W
        for layer in ours:
            assert layer == sorted(set(layer)) and layer[:s] == list(range(s)) and layer[-1] == n - 1
            assert len(layer) == len(ours[0]) <= (n if n <= C else compensated)
        if fits_one_sweep:
            assert ours == spec.compact([list(range(n)) for _ in range(L)])


def test_reference_multi_sweep_bulk_duplicates_tokens():
    """The bug we avoid (spec section 5.1): LongBench Llama-2, S=9 O=3 budget 0.25 of 3500, T=3100."""
    spec = SpecLaCache(32, 9, 3, 875, 128)
    layers = spec.compact([list(range(3100)) for _ in range(32)])
    assert any(len(set(layer)) < len(layer) for layer in layers)
    ours = _bulk(LadderState(Ladder(32, 9, 3), 875, 128), 32, [list(range(3100)) for _ in range(32)])
    assert all(len(set(layer)) == len(layer) and layer[-1] == 3099 for layer in ours)


@pytest.mark.parametrize("config", _random_valid_configs(25, seed=3))
@pytest.mark.parametrize("every", [2, 7, 64])
def test_amortized_compaction_keeps_the_same_sets(config, every):
    """compact_every=k: at each of its compaction instants the kept sets equal per-step compaction."""
    L, S, O, C, s = config
    state, n, instants = LadderState(Ladder(L, S, O), C, s, every), 0, []
    for t in range(1, 3 * C + every + 2):
        n += 1
        compaction = state.plan(n)
        if compaction is not None:
            n = compaction.new_length
            instants.append(t)
    for t in instants[-2:]:
        assert kept_positions(L, S, O, C, s, t, compact_every=every) == kept_positions(L, S, O, C, s, t)


@pytest.mark.parametrize(
    "args, message",
    [
        ((32, 16, 16), "overlap=16 must be < span=16"),
        ((32, 8, 9), "overlap=9 must be < span=8"),
        ((8, 8, 0), "span=8 must be < num_layers=8"),
        ((8, 5, 1), "frees no slot"),
        ((32, 40, 0), "must be < num_layers"),
    ],
)
def test_invalid_ladders_name_the_constraint_and_nearest_values(args, message):
    with pytest.raises(LadderConfigError, match=message) as err:
        validate(*args)
    assert "nearest valid" in str(err.value)


def test_budget_below_sink_plus_layers_plus_a_is_rejected():
    with pytest.raises(LadderConfigError, match=r"budget=30 must be >= sink \+ num_layers \+ a = 4 \+ 30 \+ 1 = 35"):
        validate(30, 16, 0, budget=30, sink=4)
    assert validate(30, 16, 0, budget=35, sink=4).freed == 1


def test_ladder_constants_match_spec_examples():
    assert (Ladder(32, 16, 0).block, Ladder(32, 16, 0).kept, Ladder(32, 16, 0).patterns) == (2, 1, 2)
    assert (Ladder(32, 8, 4).block, Ladder(32, 8, 4).kept, Ladder(32, 8, 4).freed) == (7, 2, 5)
    assert (Ladder(32, 9, 3).block, Ladder(32, 9, 3).kept) == (5, 2)
    assert (Ladder(24, 9, 7).block, Ladder(24, 9, 7).kept) == (9, 5)
