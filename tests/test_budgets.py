"""Budgets and sinks as a user sets them: which settings each policy accepts, which it refuses (before any
forward, with a message naming the value), what a fraction resolves to, and LaCache's ``sink='auto'`` rule.

Expected values are worked out by hand in each test (spec section 1.1 for the ladder's ``a``; spec section 3
for the LongBench sink rule), on tiny random-weight models; a cache is checked by the positions it keeps.
"""

from __future__ import annotations

import pytest
import torch
from conftest import stream, tiny_llama

from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.pyramidkv import PyramidKVPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.baselines.tova import TOVAPolicy
from lacache.compat import cache_kwarg
from lacache.ladder import kept_positions
from lacache.ladder_cache import LaCachePolicy
from lacache.policy import PolicyConfigError

IDS = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=8)  # 8 layers, 2 KV heads of 16 dims, max_position_embeddings 4096


def held(cache) -> list[list[int]]:
    """Original positions each layer holds (batch row 0, KV head 0)."""
    return cache.kept_positions()[:, 0, 0].tolist()


# ---------------------------------------------------------------------------------------------- LaCache
# L=8, S=3, O=1: d = 2, b = 1 + ceil(5/2) = 4, a = min(ceil(3/2), 4) = 2, r = 2. Smallest budget: sink + 8 + 2.
@pytest.mark.parametrize("budget, prompt, sink", [
    (600, 1000, 128),  # min(128, 1000 - 9, 600 - 10): the cap
    (600, 60, 51),  # min(128, 60 - 9, 590): a short prompt
    (600, 5, 1),  # max(1, 5 - 9) = 1: at least one sink
    (100, 1000, 90),  # min(128, 991, 100 - 10): clamped so that a ladder fits
    (100, None, 90),  # no prompt length: the budget stands in for it, min(128, 100 - 9, 100 - 10)
    (10, 1000, 0),  # 10 = 8 + a: no room for any sink, and the budget still fits a ladder
])
def test_lacache_auto_sink_follows_the_longbench_rule(model, budget, prompt, sink):
    policy = LaCachePolicy(budget=budget, span=3, overlap=1, sink="auto")
    policy.check(model.config)  # an auto sink is resolved per sequence: nothing to refuse yet
    cache = policy.make_cache(model, prompt_length=prompt)
    assert cache.state.sink == sink and cache.state.budget == budget


def test_lacache_auto_sink_keeps_that_many_first_tokens(model):
    """budget 22, prompt 16: sink = min(128, 16 - 9, 22 - 10) = 7; 26 tokens fed one at a time keep the
    7 first tokens in every layer and exactly the ladder's positions for sink 7."""
    cache = LaCachePolicy(budget=22, span=3, overlap=1, sink="auto").make_cache(model, prompt_length=16)
    stream(model, cache, IDS[:, :26])
    assert held(cache) == kept_positions(8, 3, 1, 22, 7, 26)
    assert all(layer[:7] == list(range(7)) for layer in held(cache))


def test_lacache_auto_sink_refuses_a_budget_without_room_for_a_ladder(model):
    with pytest.raises(PolicyConfigError, match=r"budget=9 must be >= sink \+ num_layers \+ a = 0 \+ 8 \+ 2 = 10"):
        LaCachePolicy(budget=9, span=3, overlap=1, sink="auto").make_cache(model, prompt_length=1000)


def test_lacache_check_validates_what_it_can_before_the_model_loads(model):
    LaCachePolicy(budget=0.5, span=4, sink=4).check(model.config)  # a fraction: only the ladder is known
    LaCachePolicy(budget=0.01, span=4, sink=4, layout="bands").check(model.config)
    LaCachePolicy(budget=10, span=4, sink="auto").check(model.config)
    LaCachePolicy(budget=13, span=4, sink=4).check(model.config)  # 4 + 8 + 1: the smallest
    with pytest.raises(PolicyConfigError, match=r"budget=12 must be >= sink \+ num_layers \+ a = 4 \+ 8 \+ 1 = 13") as err:
        LaCachePolicy(budget=12, span=4, sink=4).check(model.config)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(PolicyConfigError, match="span=8 must be < num_layers=8"):
        LaCachePolicy(budget=0.5, span=8).check(model.config)
    with pytest.raises(PolicyConfigError, match="span=8 must be < num_layers=8"):
        LaCachePolicy(budget=100, span=8, sink="auto").check(model.config)


def test_lacache_fraction_budgets_resolve_then_are_checked(model):
    cache = LaCachePolicy(budget=0.5, span=4, sink=4).make_cache(model, prompt_length=32)
    stream(model, cache, IDS[:, :20])
    assert held(cache) == kept_positions(8, 4, 0, 16, 4, 20)  # 0.5 of 32
    cache = LaCachePolicy(budget=0.01, budget_of="max_length", span=4, sink=4).make_cache(model)
    assert cache.state.budget == 40  # 0.01 of max_position_embeddings 4096
    with pytest.raises(PolicyConfigError, match=r"budget=6 must be >= sink \+ num_layers \+ a = 4 \+ 8 \+ 1 = 13"):
        LaCachePolicy(budget=0.1, span=4, sink=4).make_cache(model, prompt_length=60)
    with pytest.raises(PolicyConfigError, match="fraction of the prompt, which this task does not provide"):
        LaCachePolicy(budget=0.5, span=4).make_cache(model)


@pytest.mark.parametrize("make, message", [
    (lambda: LaCachePolicy(budget=None), "lacache needs a budget"),
    (lambda: LaCachePolicy(sink="many"), "sink='many' must be an int or 'auto'"),
    (lambda: LaCachePolicy(compact_every=0), "compact_every=0 must be >= 1"),
    (lambda: LaCachePolicy(layout="paper"), "layout='paper' is not one of"),
    (lambda: LaCachePolicy(budget=1.5), r"must be in \(0, 1\]"),
])
def test_lacache_refuses_bad_settings_when_built(make, message):
    with pytest.raises(PolicyConfigError, match=message):
        make()


def test_lacache_accepts_its_documented_settings():
    LaCachePolicy(sink="auto", compact_every=1, layout="bands")
    assert LaCachePolicy(budget=64, span=4, overlap=2, sink=0).describe() == {
        "policy": "lacache", "budget": 64, "span": 4, "overlap": 2, "sink": 0, "layout": "reference"}
    assert LaCachePolicy(budget=0.25, sink="auto", decode="fast").describe() == {
        "policy": "lacache", "budget": 0.25, "decode": "fast", "span": 16, "overlap": 0, "sink": "auto", "layout": "reference"}


# ---------------------------------------------------------------------------------------------- StreamingLLM
def test_streamingllm_budget_must_exceed_the_sink(model):
    with pytest.raises(PolicyConfigError, match="budget=4 must exceed sink=4"):
        StreamingLLMPolicy(budget=4, sink=4)
    StreamingLLMPolicy(budget=5, sink=4)
    with pytest.raises(PolicyConfigError, match="budget=0.04 resolves to 4 entries, which must exceed sink=4"):
        StreamingLLMPolicy(budget=0.04, sink=4).make_cache(model, prompt_length=100)
    cache = StreamingLLMPolicy(budget=0.05, sink=4).make_cache(model, prompt_length=100)  # 5 entries: 4 sinks + 1
    stream(model, cache, IDS[:, :12])
    assert held(cache) == [[0, 1, 2, 3, 11]] * 8  # the newest token is kept
    assert StreamingLLMPolicy(budget=0.005, budget_of="max_length").make_cache(model).budget == 20  # of 4096


@pytest.mark.parametrize("make, message", [
    (lambda: StreamingLLMPolicy(budget=None), "streamingllm needs a budget"),
    (lambda: StreamingLLMPolicy(budget=8, sink=-1), "sink=-1 must be >= 0"),
])
def test_streamingllm_refuses_bad_settings(make, message):
    with pytest.raises(PolicyConfigError, match=message):
        make()


def test_streamingllm_without_sinks_is_a_sliding_window(model):
    cache = StreamingLLMPolicy(budget=8, sink=0).make_cache(model)
    stream(model, cache, IDS[:, :20])
    assert held(cache) == [list(range(12, 20))] * 8
    assert StreamingLLMPolicy(budget=8, sink=0).describe() == {"policy": "streamingllm", "budget": 8, "sink": 0}


def test_streamingllm_prefill_keeps_the_sinks_and_the_newest(model):
    """One forward of 30 tokens, budget 10, sink 2: the sinks and the 8 newest, then each step shifts the window."""
    cache = StreamingLLMPolicy(budget=10, sink=2).make_cache(model, prompt_length=30)
    with torch.inference_mode():
        model(IDS[:, :30], **cache_kwarg(model, cache))
    assert held(cache) == [[0, 1] + list(range(22, 30))] * 8
    stream(model, cache, IDS[:, 30:33])
    assert held(cache) == [[0, 1] + list(range(25, 33))] * 8


# ---------------------------------------------------------------------------------------------- H2O
@pytest.mark.parametrize("budget, ratio, heavy", [(2, 0.5, 1), (10, 0.5, 5), (10, 0.95, 9), (10, 0.1, 1), (7, 0.5, 3)])
def test_h2o_splits_the_budget_into_heavy_hitters_and_recent_tokens(model, budget, ratio, heavy):
    """heavy = int(budget * heavy_ratio) heavy hitters, the rest recent tokens; at least one of each."""
    cache = H2OPolicy(budget=budget, heavy_ratio=ratio).make_cache(model)
    assert (cache.budget, cache.heavy) == (budget, heavy)
    stream(model, cache, IDS[:, :budget + 6])
    for layer in cache.kept_positions()[:, 0].tolist():
        for row in layer:  # every KV head: budget entries, the newest budget - heavy of them consecutive
            assert len(row) == budget and row[heavy:] == list(range(6 + heavy, budget + 6))


@pytest.mark.parametrize("make, message", [
    (lambda: H2OPolicy(budget=1), "budget=1 with heavy_ratio=0.5 leaves 0 heavy hitters and 1 recent tokens"),
    (lambda: H2OPolicy(budget=10, heavy_ratio=0.05), "leaves 0 heavy hitters and 10 recent tokens"),
    (lambda: H2OPolicy(budget=10, heavy_ratio=0.0), r"heavy_ratio=0.0 must be in \(0, 1\)"),
    (lambda: H2OPolicy(budget=10, heavy_ratio=1.0), r"heavy_ratio=1.0 must be in \(0, 1\)"),
    (lambda: H2OPolicy(budget=None), "h2o needs a budget"),
])
def test_h2o_refuses_bad_settings(make, message):
    with pytest.raises(PolicyConfigError, match=message):
        make()


def test_h2o_fraction_budgets_resolve_then_split(model):
    H2OPolicy(budget=0.01)  # a fraction is split once it is resolved
    cache = H2OPolicy(budget=0.25).make_cache(model, prompt_length=40)
    assert (cache.budget, cache.heavy) == (10, 5)
    cache = H2OPolicy(budget=0.005, budget_of="max_length").make_cache(model)
    assert (cache.budget, cache.heavy) == (20, 10)  # of max_position_embeddings 4096
    with pytest.raises(PolicyConfigError, match="budget=1 with heavy_ratio=0.5 leaves 0 heavy hitters"):
        H2OPolicy(budget=0.01).make_cache(model, prompt_length=100)
    assert H2OPolicy(budget=64, heavy_ratio=0.25).describe() == {"policy": "h2o", "budget": 64, "heavy_ratio": 0.25}


# ---------------------------------------------------------------------------------------------- SnapKV, PyramidKV, TOVA
def test_snapkv_budget_must_exceed_the_window(model):
    with pytest.raises(PolicyConfigError, match="budget=32 gives 32 entries per layer, which must exceed window=32"):
        SnapKVPolicy(budget=32, window=32)
    SnapKVPolicy(budget=33, window=32)
    with pytest.raises(PolicyConfigError, match="budget=0.5 gives 8 entries per layer, which must exceed window=8"):
        SnapKVPolicy(budget=0.5, window=8).make_cache(model, prompt_length=16)
    cache = SnapKVPolicy(budget=0.5, window=8).make_cache(model, prompt_length=18)  # 9 entries: the window + 1
    with torch.inference_mode():
        model(IDS[:, :18], **cache_kwarg(model, cache))
    assert cache.entries_per_layer() == [9] * 8
    assert all(row[1:] == list(range(10, 18)) for row in held(cache))
    cache = SnapKVPolicy(budget=0.01, window=8, budget_of="max_length").make_cache(model, prompt_length=18)
    assert cache.budget == 40


@pytest.mark.parametrize("make, message", [
    (lambda: SnapKVPolicy(budget=None), "snapkv needs a budget"),
    (lambda: PyramidKVPolicy(budget=None), "pyramidkv needs a budget"),
    (lambda: SnapKVPolicy(budget=64, window=0), "window=0 must be >= 1"),
    (lambda: SnapKVPolicy(budget=64, kernel=0), "kernel=0 must be an odd number >= 1"),
    (lambda: SnapKVPolicy(budget=64, kernel=4), "kernel=4 must be an odd number >= 1"),
    (lambda: SnapKVPolicy(budget=64, pooling="min"), "pooling='min' is not one of"),
    (lambda: SnapKVPolicy(budget=64, decode_budget=0), "decode_budget=0 must be >= 1"),
    (lambda: SnapKVPolicy(budget=64, decode_budget=4, decode="fast"), "decode=fast needs decode_budget=null"),
    (lambda: PyramidKVPolicy(budget=32, window=32), "must exceed window=32"),
    (lambda: PyramidKVPolicy(budget=64, beta=1.0), "beta=1.0 must be > 1"),
    (lambda: TOVAPolicy(budget=None), "tova needs a budget"),
])
def test_scored_policies_refuse_bad_settings(make, message):
    with pytest.raises(PolicyConfigError, match=message):
        make()


def test_scored_policies_accept_their_documented_settings(model):
    SnapKVPolicy(budget=64, window=1, kernel=1, pooling="avg", decode_budget=1)
    SnapKVPolicy(budget=64, decode="fast")
    PyramidKVPolicy(budget=64, beta=1.5)
    assert SnapKVPolicy(budget=64).describe() == {"policy": "snapkv", "budget": 64, "window": 32, "kernel": 7, "pooling": "max"}
    assert SnapKVPolicy(budget=64, decode_budget=4).describe()["decode_budget"] == 4
    assert PyramidKVPolicy(budget=64, beta=5).describe() == {
        "policy": "pyramidkv", "budget": 64, "window": 32, "kernel": 7, "pooling": "max", "beta": 5}
    assert TOVAPolicy(budget=64).describe() == {"policy": "tova", "budget": 64}
    assert TOVAPolicy(budget=0.25).make_cache(model, prompt_length=40).budget == 10
    assert TOVAPolicy(budget=0.005, budget_of="max_length").make_cache(model).budget == 20
    assert PyramidKVPolicy(budget=0.5, window=4).make_cache(model, prompt_length=40).budget == 20


def test_a_lacache_policy_changed_after_it_was_built_is_checked_again(model):
    """check() validates the policy as it is when the run starts (a notebook may change a field in place)."""
    for budget in (64, 0.5):
        policy = LaCachePolicy(budget=budget, span=4, sink=4)
        policy.check(model.config)
        policy.layout = "paper"
        with pytest.raises(PolicyConfigError, match="layout='paper' is not one of"):
            policy.check(model.config)
        with pytest.raises(PolicyConfigError, match="layout='paper' is not one of"):
            policy.make_cache(model, prompt_length=100)


def test_a_ladder_cache_built_directly_compacts_at_every_token(model):
    """LadderCache(model, ladder, budget, sink): compact_every defaults to 1, as the policy's."""
    from lacache.ladder import Ladder
    from lacache.ladder_cache import LadderCache

    cache = LadderCache(model, Ladder(8, 4, 0), budget=16, sink=4)
    stream(model, cache, IDS[:, :20])
    assert held(cache) == kept_positions(8, 4, 0, 16, 4, 20) and cache.peak_slots == 17


def test_tova_keeps_its_budget_on_a_one_layer_model():
    model = tiny_llama(layers=1)
    cache = TOVAPolicy(budget=6).make_cache(model)
    stream(model, cache, IDS[:, :10])
    assert cache.entries_per_layer() == [6] and len(set(held(cache)[0])) == 6 and max(held(cache)[0]) <= 9
