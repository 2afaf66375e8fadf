"""The ladder math against the reference: golden traces, a literal transcription, validation."""

import json
import random
from pathlib import Path

import pytest
from spec_reference import SpecLaCache

from lacache.compat import cache_kwarg
from lacache.ladder import Ladder, LadderConfigError, LadderState, Segment, kept_positions, validate

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


# ---------------------------------------------------------------------------------------------- layout=bands
# The paper's text: token j of a ladder (block) is kept by the S consecutive layers [j*d, j*d + S), d = S - O,
# the next token's band shifted by d. Written here from that description, independently of Ladder.offset.
def _band(L, S, O, layer):
    """Tokens of a block whose band of S layers reaches ``layer``."""
    lad = Ladder(L, S, O)
    return [j for j in range(lad.block) if j * (S - O) <= layer < j * (S - O) + S]


def _bands_window(L, S, O, layer):
    """The a tokens a layer keeps per block: its band, padded with the following tokens (the preceding
    ones at the block's end) where the band holds fewer than a (docs/LACACHE.md)."""
    lad = Ladder(L, S, O)
    start = min(_band(L, S, O, layer)[0], lad.block - lad.kept)
    return list(range(start, start + lad.kept))


def _first_sweep(L, S, O, sink, length, tokens):
    """What each layer holds after ``tokens`` tokens when the ladders merged so far (all in the first
    sweep, from the sink on) left ``length`` slots: sink, a window per merged block, then the tail."""
    lad = Ladder(L, S, O)
    merged = (tokens - length) // lad.freed
    return [list(range(sink)) + [sink + m * lad.block + k for m in range(merged) for k in _bands_window(L, S, O, i)]
            + list(range(sink + merged * lad.block, tokens)) for i in range(L)]


BANDS_CONFIGS = [(8, 4, 0), (8, 4, 2), (8, 4, 1), (8, 3, 1), (8, 2, 0), (30, 16, 0), (30, 8, 4), (32, 9, 3), (24, 9, 7)]


@pytest.mark.parametrize("L, S, O", BANDS_CONFIGS + [c[:3] for c in _random_valid_configs(30, seed=4)])
def test_bands_keep_every_token_in_its_band_of_span_layers(L, S, O):
    lad = Ladder(L, S, O, "bands")
    windows = [list(range(lad.offset(i), lad.offset(i) + lad.kept)) for i in range(L)]
    for layer, window in enumerate(windows):
        assert window == _bands_window(L, S, O, layer)
        assert set(_band(L, S, O, layer)) <= set(window) and window[-1] < lad.block
    for j in range(lad.block):  # each token: kept by one run of consecutive layers covering its band
        layers = [i for i, window in enumerate(windows) if j in window]
        assert layers == list(range(layers[0], layers[-1] + 1))
        assert set(range(j * (S - O), min(j * (S - O) + S, L))) <= set(layers)


def test_bands_hand_checked_positions():
    # L=8 S=4 O=0: d=4, b=2, a=1; token 0 of a block -> layers 0-3, token 1 -> layers 4-7. C=32, s=4, r=1.
    # t=33 (33 slots > 32): cursor 4 merges slots 4,5 = tokens 4,5; layers 0-3 keep 4, layers 4-7 keep 5.
    # t=34: cursor 5 merges slots 5,6 = tokens 6,7 in every layer; layers 0-3 keep 6, layers 4-7 keep 7.
    # So layers 0-3 hold 0 1 2 3 4 6 | 8..33 and layers 4-7 hold 0 1 2 3 5 7 | 8..33.
    held = kept_positions(8, 4, 0, 32, 4, 34, layout="bands")
    assert held[:4] == [[0, 1, 2, 3, 4, 6] + list(range(8, 34))] * 4
    assert held[4:] == [[0, 1, 2, 3, 5] + list(range(7, 34))] * 4
    # reference layout, same ladder: even layers keep the first token of each pair, odd layers the second
    assert kept_positions(8, 4, 0, 32, 4, 34)[:2] == [held[0], held[4]]
    # L=8 S=4 O=2: d=2, b=3, a=2; bands 0-3, 2-5, 4-7. Layers 0,1 hold token 0 only -> padded with token 1;
    # layers 6,7 hold token 2 only -> padded with token 1. So layers 0-3 keep tokens {0,1}, layers 4-7 {1,2}.
    # t=33: block = tokens 4,5,6: layers 0-3 keep 4,5 (drop 6), layers 4-7 keep 5,6 (drop 4).
    held = kept_positions(8, 4, 2, 32, 4, 33, layout="bands")
    assert held[:4] == [[0, 1, 2, 3, 4, 5] + list(range(7, 33))] * 4
    assert held[4:] == [[0, 1, 2, 3] + list(range(5, 33))] * 4


@pytest.mark.parametrize("config", _random_valid_configs(20, seed=5))
def test_layouts_hold_the_same_caches_in_other_layers_at_equal_lengths(config):
    """Only the layer -> offset assignment differs: bands layer i holds what reference layer offset_i
    (< P, so offset_i mod P = offset_i) holds, cursor and lengths are shared, every layer has one length."""
    L, S, O, C, s = config
    bands_ladder = Ladder(L, S, O, "bands")
    for tokens in (C + 1, 2 * C + 3, 3 * C + 7):
        bands = kept_positions(L, S, O, C, s, tokens, layout="bands")
        reference = kept_positions(L, S, O, C, s, tokens)
        assert len({len(layer) for layer in bands}) == 1 and len(bands[0]) == len(reference[0])
        assert [reference[bands_ladder.offset(i)] for i in range(L)] == bands
        lad = Ladder(L, S, O)
        if (tokens - len(bands[0])) // lad.freed <= (C + lad.freed // 2 - s - L) // lad.kept:  # no wrap yet
            assert bands == _first_sweep(L, S, O, s, len(bands[0]), tokens)


@pytest.mark.parametrize("L", [4, 8, 30])
def test_layouts_agree_when_every_layer_is_its_own_band(L):
    """S=1, O=0: each token of a block is kept by one layer (b = L, a = 1), in both layouts."""
    assert [Ladder(L, 1, 0, "bands").offset(i) for i in range(L)] == list(range(L))
    assert kept_positions(L, 1, 0, 3 * L, 4, 7 * L, layout="bands") == kept_positions(L, 1, 0, 3 * L, 4, 7 * L)


def test_layouts_differ_for_the_default_ladder():
    """L=32 S=16 O=0: reference = even/odd layers; bands = layers 0-15 and 16-31 (the paper's picture)."""
    bands, reference = (kept_positions(32, 16, 0, 256, 4, 700, layout=x) for x in ("bands", "reference"))
    assert bands[0] != bands[16] and all(bands[i] == bands[0] for i in range(16)) and all(bands[i] == bands[16] for i in range(16, 32))
    assert reference[0] != reference[1] and all(reference[i] == reference[i % 2] for i in range(32))
    assert bands[1] != reference[1] and bands[16] == reference[1]


def test_layout_is_validated_and_recorded():
    from lacache.ladder_cache import LaCachePolicy
    from lacache.policy import PolicyConfigError

    with pytest.raises(PolicyConfigError, match=r"layout='paper' is not one of \('reference', 'bands'\)"):
        LaCachePolicy(layout="paper")
    with pytest.raises(LadderConfigError, match="layout='paper'"):
        validate(8, 4, 0, layout="paper")
    assert LaCachePolicy(layout="bands").describe()["layout"] == "bands"
    assert LaCachePolicy().describe()["layout"] == "reference"


@pytest.mark.parametrize("span, overlap, budget, sink", [(4, 2, 32, 4), (3, 1, 30, 2), (2, 0, 24, 4)])
def test_bands_cache_keeps_the_predicted_positions(span, overlap, budget, sink):
    """A tiny 8-layer model: decode-by-decode from empty, and one bulk prefill then decode."""
    import torch
    from conftest import stream, tiny_llama

    from lacache.ladder_cache import LaCachePolicy

    model = tiny_llama(layers=8)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(6))
    policy = LaCachePolicy(budget=budget, span=span, overlap=overlap, sink=sink, layout="bands")
    lad = Ladder(8, span, overlap, "bands")
    cache, fed = policy.make_cache(model), 0
    for tokens in (budget + 5, 120):  # the first in the first sweep, the second after wraps
        stream(model, cache, ids[:, fed:tokens])
        fed = tokens
        held = cache.kept_positions()[:, 0, 0].tolist()
        assert held == kept_positions(8, span, overlap, budget, sink, tokens, layout="bands")
        if tokens == budget + 5:
            assert held == _first_sweep(8, span, overlap, sink, len(held[0]), tokens)
    for prompt in (budget + 6, 100):  # bulk: prefill the prompt, one compaction (one sweep; several), then decode
        cache = policy.make_cache(model, prompt_length=prompt)
        with torch.inference_mode():
            model(ids[:, :prompt], **cache_kwarg(model, cache))
        if prompt == budget + 6:
            held = cache.kept_positions()[:, 0, 0].tolist()
            assert held == _first_sweep(8, span, overlap, sink, len(held[0]), prompt)
        stream(model, cache, ids[:, prompt : prompt + 3])
        state = LadderState(lad, budget, sink)
        expected = _bulk(state, 8, [list(range(prompt)) for _ in range(8)])
        for t in range(prompt, prompt + 3):
            expected = _bulk(state, 8, [layer + [t] for layer in expected])
        assert cache.kept_positions()[:, 0, 0].tolist() == expected


def test_fast_decode_keeps_the_bands_positions_and_logits():
    """decode=fast takes per-layer offsets from ring_rule(): bands need no other change there."""
    import torch
    from conftest import tiny_llama
    from test_fast_decode import exact_and_fast

    from lacache.ladder_cache import LaCachePolicy

    model = tiny_llama(layers=8)
    ids = torch.randint(0, 128, (1, 140), generator=torch.Generator().manual_seed(7))
    make = lambda: LaCachePolicy(budget=32, span=4, overlap=2, sink=4, layout="bands")  # noqa: E731
    exact, decoder, want, got = exact_and_fast(model, make, ids, prompt=40)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert decoder.ring.wraps >= 2
    held = decoder.ring.kept_positions()
    assert torch.equal(held, exact.kept_positions()[:, 0, 0])
    assert torch.equal(held[0], held[3]) and not torch.equal(held[3], held[4]) and torch.equal(held[4], held[7])  # bands 0-3, 4-7


def test_ladder_plot_draws_the_bands_layout(tmp_path):
    from lacache.report.ladder_plot import main

    main(["--layers", "8", "--span", "4", "--overlap", "2", "--budget", "32", "--tokens", "80", "--layout", "bands",
          "--out", str(tmp_path / "bands.png")])
    assert (tmp_path / "bands.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["--layout", "paper"])


# ---------------------------------------------------------------------------------------------- what a user is told
@pytest.mark.parametrize("args, nearest", [
    ((8, 5, 1), "frees no slot (block b=2 == kept a=2); nearest valid: span=4 overlap=1, span=5 overlap=0"),
    ((6, 4, 1), "nearest valid: span=3 overlap=1, span=4 overlap=0"),
    ((8, 8, 0), "span=8 must be < num_layers=8; nearest valid: span=7 overlap=0"),
    ((32, 40, 0), "nearest valid: span=31 overlap=0"),
    ((1, 1, 0), "nearest valid: none (too few layers for any ladder)"),
    ((2, 2, 0), "span=2 must be < num_layers=2; nearest valid: span=1 overlap=0"),
    ((8, 4, 4), "overlap=4 must be < span=4 (stride span-overlap >= 1); nearest valid: overlap=3"),
    ((8, 3, 5), "nearest valid: overlap=2"),
    ((8, 0, 0), "span must be >= 1 and overlap >= 0 (got span=0, overlap=0)"),
    ((8, 4, -1), "span must be >= 1 and overlap >= 0 (got span=4, overlap=-1)"),
])
def test_invalid_ladders_suggest_the_nearest_valid_settings(args, nearest):
    """The suggestions, worked out by hand from spec section 1.1 (b = 1 + ceil((L-S)/d), a = min(ceil(S/d), b),
    valid when 0 <= O < S < L and b > a), at the smallest |dS| + |dO|; e.g. L=8 S=5 O=1 frees nothing
    (b = a = 2), and of its neighbours only S=4 O=1 (b=3, a=2) and S=5 O=0 (b=2, a=1) free a slot."""
    with pytest.raises(LadderConfigError) as err:
        validate(*args)
    assert str(err.value).endswith(nearest)
    assert str(err.value).startswith("invalid LaCache configuration: ")


@pytest.mark.parametrize("budget, sink, message", [
    (10, 4, "budget=10 must be >= sink + num_layers + a = 4 + 8 + 1 = 13 (otherwise a sweep has no room for a ladder); "
            "nearest valid: budget=13 or sink=1"),
    (7, 0, "budget=7 must be >= sink + num_layers + a = 0 + 8 + 1 = 9 (otherwise a sweep has no room for a ladder); "
           "nearest valid: budget=9"),  # no sink makes room: 7 - 8 - 1 < 0
    (9, 4, "budget=9 must be >= sink + num_layers + a = 4 + 8 + 1 = 13 (otherwise a sweep has no room for a ladder); "
           "nearest valid: budget=13 or sink=0"),
    (9, 0, None),  # exactly the smallest budget: accepted
    (13, 4, None),
    (40, -1, "sink=-1 must be >= 0"),
])
def test_budget_and_sink_are_checked_against_the_ladder(budget, sink, message):
    """L=8 S=4 O=0 keeps a=1 slot per ladder: a budget needs the sink, one slot per layer and a."""
    if message is None:
        assert validate(8, 4, 0, budget=budget, sink=sink).kept == 1
        assert len(kept_positions(8, 4, 0, budget, sink, budget + 3)[0]) == budget  # and it runs
        return
    with pytest.raises(LadderConfigError) as err:
        validate(8, 4, 0, budget=budget, sink=sink)
    assert str(err.value) == "invalid LaCache configuration: " + message
    with pytest.raises(LadderConfigError):
        kept_positions(8, 4, 0, budget, sink, 50)  # the replay refuses it too


def test_without_a_sink_the_smallest_budget_is_layers_plus_a():
    assert validate(8, 4, 0, budget=9).kept == 1  # sink defaults to 0
    with pytest.raises(LadderConfigError, match="budget=8 must be >="):
        validate(8, 4, 0, budget=8)


def test_a_compaction_says_what_it_merges():
    """L=8 S=4 O=0 (b=2, a=1, r=1), budget 16, sink 4: the newest 8 slots are never merged, so a sweep runs over
    slots 4..7. At 17 slots one ladder merges at the cursor (slot 4), then at slot 5; 20 slots then need 4
    merges: 2 at slots 6-7, then the cursor starts over at the sink for the other 2."""
    state = LadderState(Ladder(8, 4, 0), 16, 4)
    assert state.plan(16) is None
    first = state.plan(17)
    assert (first.length, first.new_length, first.segments, first.first_changed) == (17, 16, (Segment(4, 1),), 4)
    assert state.plan(17).segments == (Segment(5, 1),)
    bulk = state.plan(20)
    assert (bulk.length, bulk.new_length, bulk.segments, bulk.first_changed) == (20, 16, (Segment(6, 2), Segment(4, 2)), 4)


def test_a_bad_ladder_is_reported_before_its_budget():
    with pytest.raises(LadderConfigError) as err:
        validate(8, 8, 0, budget=1, sink=0)
    assert "span=8 must be < num_layers=8" in str(err.value) and "budget" not in str(err.value)


def test_amortized_compaction_lets_the_cache_grow_first():
    """compact_every=3, L=8 S=4 O=0 (r=1), budget 32: nothing is merged until the cache is 3 slots over the
    budget (tokens 33 and 34 are simply appended), then three ladders at once bring it back to 32."""
    for tokens in (33, 34):
        assert kept_positions(8, 4, 0, 32, 4, tokens, compact_every=3) == [list(range(tokens))] * 8
    held = kept_positions(8, 4, 0, 32, 4, 35, compact_every=3)
    assert [len(layer) for layer in held] == [32] * 8
    # the cursor starts after the 4 sinks: ladders (4,5), (6,7), (8,9); even layers keep the first of each pair
    assert held[0] == [0, 1, 2, 3, 4, 6, 8] + list(range(10, 35)) and held[1] == [0, 1, 2, 3, 5, 7, 9] + list(range(10, 35))
