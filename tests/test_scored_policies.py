"""The attention-scored policies (H2O, SnapKV, TOVA, PyramidKV): selection rules, scores against the
model's own attention weights, no side effects on the model, and runs through run.py."""

import gc
import itertools
import json

import oracle_rules as rules
import pytest
import torch
from conftest import stream, tiny_llama
from test_harness import run_cli
from test_oracle import assert_matches, oracle_logits, peaked_llama, tokens

from lacache.baselines.attention_scores import attention_column_sums, hooked_modules
from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.lacache_reference import ReferenceLaCachePolicy
from lacache.baselines.pyramidkv import PyramidKVPolicy, pyramid_budgets
from lacache.baselines.snapkv import SnapKVPolicy, snap_select
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.baselines.tova import TOVAPolicy, tova_select
from lacache.compat import cache_kwarg
from lacache.ladder_cache import LaCachePolicy
from lacache.policy import PolicyConfigError

PROMPT = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))


def model_pair(kv_heads):
    """The same peaked-attention weights twice: sdpa (what the caches serve) and eager (whose weights we read)."""
    model, twin = (peaked_llama(kv_heads, seed=3) for _ in range(2))
    twin.set_attn_implementation("eager")
    return model, twin


def prefill_attentions(twin, ids):
    """Per layer ``[q_heads, T, T]`` softmax weights of a plain full-cache forward (float64)."""
    with torch.inference_mode():
        return [a[0].double() for a in twin(ids, output_attentions=True).attentions]


def per_kv_head(weights, kv_heads):
    """``[q_heads, ...]`` summed over the query heads of each KV head."""
    return weights.reshape(kv_heads, weights.shape[0] // kv_heads, *weights.shape[1:]).sum(1)


def pool(row, kernel, how):
    """Hand-written stride-1 pooling with zero (avg, padding counted) / -inf (max) padding."""
    half, out = kernel // 2, []
    for i in range(len(row)):
        cells = [row[j] if 0 <= j < len(row) else None for j in range(i - half, i + half + 1)]
        out.append(max(c for c in cells if c is not None) if how == "max" else sum(c or 0.0 for c in cells) / kernel)
    return out


def top_sorted(values, k):
    return sorted(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def assert_snap_selection(kept, window_sums, window, keep, kernel, how):
    """``kept`` = the window + prefix positions whose pooled scores are the top ``keep - window``
    (compared as values: max pooling makes plateaus of equal scores, any of which may be chosen)."""
    prefix = len(window_sums) - window
    pooled = pool(window_sums[:prefix], kernel, how)
    assert kept[-window:] == list(range(prefix, len(window_sums))) and kept == sorted(set(kept))
    chosen = sorted(pooled[i] for i in kept[:-window])
    assert chosen == pytest.approx(sorted(pooled[i] for i in top_sorted(pooled, keep - window)), rel=1e-6)


def held(cache, layer, head=0):
    row = cache.kept_positions()[layer, 0, head].tolist()
    return [p for p in row if p >= 0]


# ---------------------------------------------------------------------------------------- selection rules
def test_snap_select_pools_and_keeps_the_window():
    scores = torch.tensor([[[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 9.0, 9.0]]])
    # window 2 -> a prefix of 9; max over 3: [5, 5, 5, 0, 0, 1, 1, 2, 2] -> top 3 = 0, 1, 2
    assert snap_select(scores, 2, 5, 3, "max")[0, 0].tolist() == [0, 1, 2, 9, 10]
    # avg over 3 (padding counted): [5/3, 5/3, 5/3, 0, 0, 1/3, 1/3, 1, 2/3] -> top 4 = 0, 1, 2, 7
    assert snap_select(scores, 2, 6, 3, "avg")[0, 0].tolist() == [0, 1, 2, 7, 9, 10]
    # kernel 1 = no pooling: top 2 of the prefix = 1 (5.0) and 8 (2.0)
    assert snap_select(scores, 2, 4, 1, "avg")[0, 0].tolist() == [1, 8, 9, 10]


def test_tova_select_keeps_the_largest_weights_in_order():
    weights = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    assert tova_select(weights, 3).tolist() == [[1, 3, 4]]


def test_pyramid_budgets_follow_kvcache_factory_with_the_uniform_total():
    # budget 256, window 32: B = 224, bottom = 224/20 = 11.2, top = 448 - 11.2 = 436.8, 32 layers
    counts = pyramid_budgets(256, 32, 32, 10_000, 20)
    assert sum(counts) == 32 * 256 and counts == sorted(counts, reverse=True)
    assert counts[0] == 32 + 437 and counts[-1] == 32 + 11
    # a short prompt clips the top to seen - window and raises the bottom: B = 32, 4 layers, seen 70:
    # top = 64 - 1.6 > 70 - 16 -> top = 54, bottom = 10; exact 54, 39.33, 24.67, 10 -> the .67 rounds up
    assert pyramid_budgets(48, 16, 4, 70, 20) == [16 + 54, 16 + 39, 16 + 25, 16 + 10]
    assert pyramid_budgets(48, 16, 4, 63, 20) == [48] * 4  # seen < 2B: the reference's uniform branch
    assert pyramid_budgets(48, 16, 1, 500, 20) == [48]


def test_attention_column_sums_match_a_direct_softmax():
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8)
    logits = torch.einsum("bhqd,bhkd->bhqk", query, keys.repeat_interleave(2, dim=1)) * 0.3
    logits = logits.masked_fill(torch.ones(5, 9, dtype=torch.bool).triu(9 - 5 + 1), float("-inf"))
    expected = torch.softmax(logits, -1).sum(2).reshape(1, 2, 2, 9).sum(2)
    torch.testing.assert_close(attention_column_sums(query, keys, 0.3), expected)
    # bf16: the logits are the bf16 product (the H2O reference's), softmax and sums in fp32
    query16, keys16 = query.bfloat16(), keys.bfloat16()
    logits16 = torch.einsum("bhqd,bhkd->bhqk", query16, keys16.repeat_interleave(2, dim=1)).float() * 0.3
    logits16 = logits16.masked_fill(torch.ones(5, 9, dtype=torch.bool).triu(9 - 5 + 1), float("-inf"))
    expected16 = torch.softmax(logits16, -1).sum(2).reshape(1, 2, 2, 9).sum(2)
    got16 = attention_column_sums(query16, keys16, 0.3)
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16, expected16, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- against the model's weights
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_h2o_scores_every_layer_with_the_current_forward(kv_heads):
    """After a full prefill every layer, the last included, keeps the heavy hitters of the prompt's
    own attention (the old code planned before the last layer's attention: arbitrary tokens there)."""
    model, twin = model_pair(kv_heads)
    budget, heavy = 20, 10
    cache = H2OPolicy(budget=budget, heavy_ratio=0.5).make_cache(model)
    with torch.inference_mode():
        model(PROMPT, **cache_kwarg(model, cache))
    n = PROMPT.shape[1]
    for layer, weights in enumerate(prefill_attentions(twin, PROMPT)):
        sums = per_kv_head(weights, kv_heads).sum(1)  # [kv_heads, T]
        for head in range(kv_heads):
            expected = top_sorted(sums[head, : n - (budget - heavy)].tolist(), heavy) + list(range(n - budget + heavy, n))
            assert held(cache, layer, head) == expected, f"layer {layer} head {head}"


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_and_pyramidkv_select_from_the_window_attention(kv_heads, pooling):
    model, twin = model_pair(kv_heads)
    window, kernel, budget = 6, 3, 20
    attentions = prefill_attentions(twin, PROMPT)
    n = PROMPT.shape[1]
    pyramid = pyramid_budgets(budget, window, 4, n, 20)
    assert len(set(pyramid)) == 4  # layers really differ
    for policy, keeps in [(SnapKVPolicy(budget=budget, window=window, kernel=kernel, pooling=pooling), [budget] * 4),
                          (PyramidKVPolicy(budget=budget, window=window, kernel=kernel, pooling=pooling), pyramid)]:
        cache = policy.make_cache(model, prompt_length=n)
        with torch.inference_mode():
            model(PROMPT, **cache_kwarg(model, cache))
        assert cache.entries_per_layer() == keeps
        for layer, weights in enumerate(attentions):
            sums = per_kv_head(weights[:, -window:], kv_heads).sum(1)
            for head in range(kv_heads):
                kept = held(cache, layer, head)
                assert len(kept) == keeps[layer], f"{policy.name} layer {layer}"
                assert_snap_selection(kept, sums[head].tolist(), window, keeps[layer], kernel, pooling)


def test_tova_drops_by_the_last_query_through_prefill_and_decode():
    """Full prefill over budget, then decode steps: each forward keeps the top ``budget`` of its last
    query's weights averaged over all query heads, recomputed here with a plain cache over the kept tokens."""
    model, twin = model_pair(2)
    budget = 16
    cache = TOVAPolicy(budget=budget).make_cache(model)
    stream = torch.cat([PROMPT, torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))], dim=1)
    with torch.inference_mode():
        model(PROMPT, **cache_kwarg(model, cache))
        expected = top_sorted(prefill_attentions(twin, PROMPT)[-1][:, -1].mean(0).tolist(), budget)
        assert held(cache, 3) == expected and held(cache, 3, 1) == expected
        for t in range(PROMPT.shape[1], stream.shape[1]):
            model(stream[:, t : t + 1], **cache_kwarg(model, cache))
    assert cache.entries_per_layer() == [budget] * 4
    assert all(len(held(cache, layer)) == budget for layer in range(4))
    assert all(max(held(cache, layer)) < stream.shape[1] for layer in range(4))  # original positions


# ---------------------------------------------------------------------------------------- against the float64 oracle
ORACLE_CASES = {  # name: (kv_heads, policy, rule, position mode, forward sizes; the prompt is the first 40 tokens)
    "h2o-mha-token": (4, H2OPolicy(budget=16), rules.h2o(16, 8), "shift", [1] * 60),
    "h2o-gqa-prefill": (2, H2OPolicy(budget=16), rules.h2o(16, 8), "shift", [40] + [1] * 20),
    "tova-token": (2, TOVAPolicy(budget=16), rules.tova(16), "original", [1] * 60),
    "tova-chunked": (2, TOVAPolicy(budget=16), rules.tova(16), "original", [12, 12, 12, 4] + [1] * 20),
    "snapkv-prefill": (2, SnapKVPolicy(budget=16, window=4, kernel=3, pooling="avg", decode_budget=3),
                       rules.snapkv(16, 4, 3, "avg", 40, 3), "original", [40] + [1] * 20),
    "snapkv-chunked": (4, SnapKVPolicy(budget=16, window=6, kernel=3, pooling="avg"),
                       rules.snapkv(16, 6, 3, "avg", 40), "original", [10] * 4 + [1] * 20),
    "pyramidkv-prefill": (2, PyramidKVPolicy(budget=16, window=4, kernel=3, pooling="avg", decode_budget=3),
                          rules.snapkv(16, 4, 3, "avg", 40, 3, beta=20, layers=4), "original", [40] + [1] * 20),
    "pyramidkv-chunked": (4, PyramidKVPolicy(budget=16, window=4, kernel=5, pooling="avg", decode_budget=2),
                          rules.snapkv(16, 4, 5, "avg", 40, 2, beta=20, layers=4), "original", [10] * 4 + [1] * 20),
}


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_scored_policies_match_the_oracle(name):
    """Logits at every step against tests/oracle.py with the policy's rule from tests/oracle_rules.py
    (peaked attention: a wrong choice of tokens or positions moves the logits far beyond 1e-4)."""
    kv_heads, policy, rule, mode, chunks = ORACLE_CASES[name]
    model, ids = peaked_llama(kv_heads), tokens(sum(chunks))
    cache = policy.make_cache(model, prompt_length=40)
    ours, start = [], 0
    for size in chunks:
        ours.append(stream(model, cache, ids[:, start : start + size], step=size)[0])
        start += size
    assert_matches(torch.cat(ours).double(), oracle_logits(model, rule, ids, chunks, position_mode=mode))


# ---------------------------------------------------------------------------------------- no side effects
def pair_policies():
    return [
        FullCachePolicy(), StreamingLLMPolicy(budget=20), LaCachePolicy(budget=20, span=2, sink=2),
        ReferenceLaCachePolicy(budget=20, span=2, sink=2), H2OPolicy(budget=20),
        SnapKVPolicy(budget=20, window=4, decode_budget=2), TOVAPolicy(budget=20), PyramidKVPolicy(budget=20, window=4, decode_budget=2),
    ]


def steps(model, policy, prompt, count=5):
    """A cache fed the prompt in one forward, then greedy decode: a generator of logits, one per forward."""
    cache = policy.make_cache(model, prompt_length=prompt.shape[1])
    with torch.inference_mode():
        logits = model(prompt, **cache_kwarg(model, cache)).logits[:, -1]
        yield logits
        for _ in range(count):
            logits = model(logits.argmax(-1, keepdim=True), **cache_kwarg(model, cache)).logits[:, -1]
            yield logits


def test_two_caches_in_turn_give_what_each_gives_alone():
    """Every pair of policies (a policy with itself included): two live caches fed alternately on one model
    produce exactly the logits each produces alone, and the model is left as it was."""
    model = peaked_llama(2, seed=5)
    prompts = [torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.inference_mode():
        before = model(prompts[0]).logits
    implementation = model.config._attn_implementation
    policies = pair_policies()
    alone = {(p.name, i): list(steps(model, p, prompts[i])) for p in policies for i in (0, 1)}
    for a, b in itertools.combinations_with_replacement(policies, 2):
        turns = zip(steps(model, a, prompts[0]), steps(model, b, prompts[1]))
        for step, (got_a, got_b) in enumerate(turns):
            assert torch.equal(got_a, alone[(a.name, 0)][step]), f"{a.name} beside {b.name}, step {step}"
            assert torch.equal(got_b, alone[(b.name, 1)][step]), f"{b.name} beside {a.name}, step {step}"
    del turns  # the last pair's caches
    gc.collect()
    assert hooked_modules(model) == 0 and model.config._attn_implementation == implementation
    with torch.inference_mode():
        assert torch.equal(model(prompts[0]).logits, before)


def test_hooks_live_exactly_as_long_as_a_scored_cache():
    model = tiny_llama(layers=2)
    first, second = H2OPolicy(budget=20).make_cache(model), TOVAPolicy(budget=20).make_cache(model)
    assert hooked_modules(model) == 2
    del first
    gc.collect()
    assert hooked_modules(model) == 2
    del second
    gc.collect()
    assert hooked_modules(model) == 0


# ---------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SnapKVPolicy(budget=32, window=32), "must exceed window=32"),
        (lambda: SnapKVPolicy(budget=64, kernel=4), "kernel=4 must be an odd number"),
        (lambda: SnapKVPolicy(budget=64, pooling="mean"), r"pooling='mean' is not one of \('max', 'avg'\)"),
        (lambda: SnapKVPolicy(budget=64, decode_budget=0), "decode_budget=0 must be >= 1"),
        (lambda: PyramidKVPolicy(budget=64, beta=1), "beta=1 must be > 1"),
        (lambda: TOVAPolicy(budget=None), "tova needs a budget"),
        (lambda: SnapKVPolicy(budget=64, decode_budget=8, decode="fast"), "decode=fast needs decode_budget=null"),
        (lambda: PyramidKVPolicy(budget=64, decode_budget=8, decode="fast"), "decode=fast needs decode_budget=null"),
    ],
)
def test_bad_settings_fail_early(make, message):
    with pytest.raises(PolicyConfigError, match=message):
        make()


def test_pyramidkv_refuses_eager_attention():
    model = tiny_llama(layers=2)
    model.set_attn_implementation("eager")
    with pytest.raises(PolicyConfigError, match="pyramidkv needs attn_implementation sdpa or flash_attention_2, not eager"):
        PyramidKVPolicy(budget=64).make_cache(model)


def test_fraction_budget_below_the_window_fails_clearly():
    with pytest.raises(PolicyConfigError, match="budget=0.1 gives 10 entries per layer, which must exceed window=32"):
        SnapKVPolicy(budget=0.1).make_cache(tiny_llama(layers=2), prompt_length=100)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "pyramidkv"])
def test_run_py_ppl_with_each_scored_policy(tmp_path, name):
    result = run_cli("task=ppl", f"cache={name}", "cache.budget=64", "task.num_tokens=160", "threads=1", f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")]
    assert record["status"] == "ok" and record["ids"]["policy"] == name
    longest = 2 * 64 if name == "pyramidkv" else 64 + 1  # PyramidKV: the first layer keeps up to 2x the mean
    assert 5 < record["metrics"]["ppl"] < 200 and record["stats"]["kv_entries_per_layer_max"] <= longest
