"""Gemma 3 (sliding-window layers around global ones) against the float64 oracle, every policy, every step.

The oracle (tests/oracle.py, ``GemmaOracle``) is Gemma 3's forward written from its definition; the
policies' rules (tests/oracle.py, tests/oracle_rules.py) run over the global layers only, while the
sliding-window layers keep the model's own window at true distances. The tiny models have peaked
attention (q/k norm scales x1.5: attention logits ~2.25x) and a window of 8 tokens, so a key read one
slot off, a window one token too long or short, a sliding layer cut by the policy or one rotary base
for both layer kinds each move the logits by far more than the tolerance (checked below).
"""

from __future__ import annotations

import functools

import oracle as ref
import oracle_rules as rules
import pytest
import torch
from conftest import sharpened, stream, tiny_gemma
from test_oracle import assert_matches, harness_logits, tokens

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.lacache_reference import ReferenceLaCachePolicy
from lacache.baselines.pyramidkv import PyramidKVPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.baselines.tova import TOVAPolicy
from lacache.compat import cache_kwarg
from lacache.ladder_cache import LaCachePolicy
from lacache.policy import PolicyConfigError

GLOBAL_LAYERS = 3  # tiny_gemma: layers 1, 4, 6 of 8


@functools.lru_cache(maxsize=None)
def peaked_gemma(kv_heads: int = 2, window: int = 8, **extra):
    """A tiny Gemma 3 with peaked attention, built once per shape (building one takes seconds; tests only read it)."""
    return sharpened(tiny_gemma(window=window, kv_heads=kv_heads, **extra), sharpen=1.5, head_scale=10.0)


def oracle_logits(model, rule, ids, chunks, **kwargs) -> torch.Tensor:
    return ref.run(ref.GemmaOracle(model, rule, **kwargs), ids[0], chunks)


# ---------------------------------------------------------------------------------------- the oracle is Gemma 3
@pytest.mark.parametrize("variant", ["sdpa", "eager-softcap"])
def test_the_oracle_is_transformers_gemma3(variant):
    """The oracle's full-cache logits equal transformers' (its own cache, one forward and prefill + decode);
    with final-logit soft-capping on (and the attention soft-capping field set, which Gemma 3 ignores)."""
    extra = {} if variant == "sdpa" else {"final_logit_softcapping": 3.0, "attn_logit_softcapping": 1.0,
                                          "attn_implementation": "eager"}
    model, ids = peaked_gemma(**extra), tokens(40)
    with torch.inference_mode():
        whole = model(ids).logits[0].double()
    assert_matches(whole, oracle_logits(model, ref.keep_all, ids, [40]))
    chunks = [24] + [1] * 16
    assert_matches(harness_logits(model, FullCachePolicy(), ids, chunks), oracle_logits(model, ref.keep_all, ids, chunks))
    if variant != "sdpa":  # the cap binds: without it the logits differ
        model.config.final_logit_softcapping = None
        try:
            with torch.inference_mode():
                assert (model(ids).logits[0].double() - whole).abs().max().item() > 0.1
        finally:
            model.config.final_logit_softcapping = extra["final_logit_softcapping"]


BROKEN = {  # a deliberate error in the oracle: what a harness with that error would compute
    "window - 1": (ref.keep_all, {"window": 7}),
    "window + 1": (ref.keep_all, {"window": 9}),
    "one rotary base": (ref.keep_all, {"one_base": True}),
    "global budget on sliding layers": (rules.h2o(12, 6), {"rule_everywhere": True}),
    "query one slot off": (ref.sink_window(20, 4), {"query_shift": 1}),
}


@pytest.mark.parametrize("name", BROKEN)
def test_each_deliberate_error_moves_the_logits_far_beyond_the_tolerance(name):
    """The premise of the tests below: each of these errors moves the logits by more than 0.1 (tolerance 1e-4)."""
    rule, broken = BROKEN[name]
    model, ids = peaked_gemma(), tokens(60)
    chunks = [30] + [1] * 30
    right = oracle_logits(model, rule, ids, chunks)
    assert (oracle_logits(model, rule, ids, chunks, **broken) - right).abs().max().item() > 0.1


# ---------------------------------------------------------------------------------------- every policy
TOKEN, PREFILL = [1] * 70, [40] + [1] * 30
CASES = {  # name: (policy, rule, position mode, forward sizes, kv heads, window)
    "full-token": (FullCachePolicy(), ref.keep_all, "shift", TOKEN, 2, 8),
    "full-prefill-mha": (FullCachePolicy(), ref.keep_all, "shift", PREFILL, 4, 8),
    "streamingllm-token": (StreamingLLMPolicy(budget=20, sink=4), ref.sink_window(20, 4), "shift", TOKEN, 2, 8),
    "streamingllm-prefill": (StreamingLLMPolicy(budget=20, sink=4), ref.sink_window(20, 4), "shift", PREFILL, 2, 8),
    # the window longer than the budget: sliding keys sit before the query's shifted frame (negative positions)
    "streamingllm-window>budget": (StreamingLLMPolicy(budget=12, sink=2), ref.sink_window(12, 2), "shift", PREFILL, 2, 24),
    "lacache-S1-token": (LaCachePolicy(budget=16, span=1, overlap=0, sink=2),
                         ref.spec_ladder(GLOBAL_LAYERS, 1, 0, 16, 2), "shift", TOKEN, 2, 8),
    "lacache-S2-prefill": (LaCachePolicy(budget=20, span=2, overlap=0, sink=4),
                           ref.spec_ladder(GLOBAL_LAYERS, 2, 0, 20, 4), "shift", [22] + [1] * 48, 2, 8),
    "lacache-S2-window>budget": (LaCachePolicy(budget=16, span=2, overlap=0, sink=2),
                                 ref.spec_ladder(GLOBAL_LAYERS, 2, 0, 16, 2), "shift", TOKEN, 2, 24),
    "h2o-token": (H2OPolicy(budget=12), rules.h2o(12, 6), "shift", TOKEN, 4, 8),
    "h2o-prefill": (H2OPolicy(budget=12), rules.h2o(12, 6), "shift", PREFILL, 2, 8),
    "tova-token": (TOVAPolicy(budget=12), rules.tova(12), "original", TOKEN, 2, 8),
    "tova-chunked": (TOVAPolicy(budget=12), rules.tova(12), "original", [12, 12, 12, 4] + [1] * 30, 2, 8),
    "snapkv-prefill": (SnapKVPolicy(budget=14, window=4, kernel=3, pooling="avg", decode_budget=3),
                       rules.snapkv(14, 4, 3, "avg", 40, 3), "original", PREFILL, 2, 8),
    "snapkv-chunked": (SnapKVPolicy(budget=14, window=6, kernel=3, pooling="avg"),
                       rules.snapkv(14, 6, 3, "avg", 40), "original", [10] * 4 + [1] * 30, 4, 8),
    "pyramidkv-prefill": (PyramidKVPolicy(budget=14, window=4, kernel=3, pooling="avg", decode_budget=3),
                          rules.snapkv(14, 4, 3, "avg", 40, 3, beta=20, layers=GLOBAL_LAYERS), "original", PREFILL, 2, 8),
    "pyramidkv-chunked": (PyramidKVPolicy(budget=14, window=4, kernel=5, pooling="avg", decode_budget=2),
                          rules.snapkv(14, 4, 5, "avg", 40, 2, beta=20, layers=GLOBAL_LAYERS), "original",
                          [10] * 4 + [1] * 30, 2, 8),
}


@pytest.mark.parametrize("name", CASES)
def test_policy_on_gemma3_matches_the_oracle(name):
    """Logits at every step: the policy's rule on the global layers, the model's window on the others."""
    policy, rule, mode, chunks, kv_heads, window = CASES[name]
    model, ids = peaked_gemma(kv_heads, window), tokens(sum(chunks))
    cache = policy.make_cache(model, prompt_length=40)
    ours, start = [], 0
    for size in chunks:
        ours.append(stream(model, cache, ids[:, start : start + size], step=size)[0])
        start += size
    expected = oracle_logits(model, rule, ids, chunks, position_mode=mode)
    assert_matches(torch.cat(ours).double(), expected)


def test_policies_compress_only_the_global_layers():
    """What each layer holds after a long prompt: the budget in the global layers, the window - 1 newest
    tokens in the sliding ones, and the model's positions in the latter whatever the global layers' shift."""
    model, ids = peaked_gemma(), tokens(50)
    cache = StreamingLLMPolicy(budget=20, sink=4).make_cache(model, prompt_length=50)
    stream(model, cache, ids, step=50)
    stream(model, cache, ids[:, :1], step=1)
    assert cache.entries_per_layer() == [20] * GLOBAL_LAYERS
    assert cache.kept_positions()[0, 0, 0].tolist() == [0, 1, 2, 3] + list(range(35, 51))
    for layer in (0, 2, 3, 5, 7):
        assert cache.layers[layer].values.shape[-2] == 7
    assert cache.get_mask_sizes(1, 0) == (8, 20 - 7)  # the sliding keys sit just before the query's slot (20)


# ---------------------------------------------------------------------------------------- settings that cannot work
def test_fast_decode_and_the_reference_cost_model_are_refused_on_gemma3():
    model = peaked_gemma()
    for policy in (LaCachePolicy(budget=20, span=2, sink=2, decode="fast"), FullCachePolicy(decode="triton"),
                   H2OPolicy(budget=20, decode="fast")):
        with pytest.raises(PolicyConfigError, match="sliding-window layers.*decode=exact"):
            policy.check(model.config)
        with pytest.raises(PolicyConfigError, match="sliding-window layers.*decode=exact"):
            policy.make_cache(model, prompt_length=30)
    with pytest.raises(PolicyConfigError, match="lacache_reference.*use cache=lacache"):
        ReferenceLaCachePolicy(budget=20, span=2, sink=2).check(model.config)


def test_a_ladder_longer_than_the_global_layers_names_them():
    model = peaked_gemma()
    with pytest.raises(PolicyConfigError, match="spans its 3 global layers.*span=16 must be < num_layers=3"):
        LaCachePolicy(budget=0.5, span=16, overlap=0).check(model.config)
    LaCachePolicy(budget=0.5, span=2, overlap=0, layout="bands").check(model.config)


# ---------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("context_tokens", [None, 30], ids=["prompt", "context"])
@pytest.mark.parametrize("policy", [FullCachePolicy(), StreamingLLMPolicy(budget=16, sink=2),
                                    LaCachePolicy(budget=16, span=2, sink=2), H2OPolicy(budget=16),
                                    SnapKVPolicy(budget=16, window=4), TOVAPolicy(budget=16),
                                    PyramidKVPolicy(budget=16, window=4)], ids=lambda p: p.name)
def test_a_batch_gives_each_row_its_own_answer(policy, context_tokens):
    """Rows of one cache are independent (``task.batch_size > 1``): equal-length prompts decoded together give
    the tokens each gets alone, in both compress modes."""
    from test_tasks import LetterTokenizer

    from lacache.tasks.generation import generate, generate_batch

    model, tok = peaked_gemma(), LetterTokenizer()
    prompts = [tokens(40, seed=s)[0].tolist() for s in (1, 2, 3)]
    together = generate_batch(model, tok, policy, prompts, 16, eos_ids=(), context_tokens=context_tokens)
    alone = [generate(model, tok, policy, p, 16, eos_ids=(), context_tokens=context_tokens) for p in prompts]
    assert len({tuple(g.token_ids) for g in alone}) == 3  # the rows differ, so equal answers are not trivially equal
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_generate_matches_the_harness_loop():
    """``model.generate`` on a Gemma 3 with a compressing cache gives the harness's tokens."""
    model, ids = peaked_gemma(), tokens(30)
    policy = StreamingLLMPolicy(budget=16, sink=2)
    cache = policy.make_cache(model, prompt_length=30)
    with torch.inference_mode():
        out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=10, do_sample=False)[0, 30:].tolist()
        cache, token, mine = policy.make_cache(model, prompt_length=30), ids, []
        for _ in range(10):
            token = model(token, **cache_kwarg(model, cache)).logits[:, -1:].argmax(-1)
            mine.append(token.item())
    assert out == mine
