"""``decode=fast`` for H2O, TOVA, SnapKV and PyramidKV (lacache.decode.eviction), run eagerly on the CPU:
logits against the float64 oracle with each policy's rule written from its reference
(tests/oracle_rules.py), the entries kept against the exact cache, and whole generations."""

import oracle_rules as rules
import pytest
import torch
from test_oracle import assert_matches, oracle_logits, peaked_llama, tokens

from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.pyramidkv import PyramidKVPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.tova import TOVAPolicy
from lacache.compat import cache_kwarg
from lacache.decode.fast import GraphDecoder
from lacache.kvcache import EvictionRule
from lacache.policy import PolicyConfigError

PROMPT, LENGTH = 40, 110
CASES = {  # name: (kv_heads, policy, oracle rule, position mode)
    "h2o-gqa": (2, lambda: H2OPolicy(budget=16), rules.h2o(16, 8), "shift"),
    "h2o-mha": (4, lambda: H2OPolicy(budget=16, heavy_ratio=0.25), rules.h2o(16, 4), "shift"),
    "tova": (2, lambda: TOVAPolicy(budget=16), rules.tova(16), "original"),
    "snapkv": (2, lambda: SnapKVPolicy(budget=16, window=4, kernel=3, pooling="avg"), rules.snapkv(16, 4, 3, "avg", PROMPT), "original"),
    "pyramidkv": (4, lambda: PyramidKVPolicy(budget=16, window=4, kernel=3, pooling="avg"),
                  rules.snapkv(16, 4, 3, "avg", PROMPT, beta=20, layers=4), "original"),
}


def fast_logits(model, policy, ids, prompt=PROMPT):
    """Prefill on the exact path, then teacher-forced decode through the fast path; the decoder is returned closed."""
    got = []
    with torch.inference_mode():
        cache = policy.make_cache(model, prompt_length=prompt)
        model(ids[:, :prompt], **cache_kwarg(model, cache))
        decoder = GraphDecoder(model, cache, ids[:, prompt : prompt + 1], max_new_tokens=ids.shape[1], graphs=False)
        try:
            for t in range(prompt, ids.shape[1]):
                decoder.ids.copy_(ids[:, t : t + 1])
                got.append(decoder.step()[0].double().clone())
        finally:
            decoder.close()
    return torch.stack(got), decoder


def exact_cache(model, policy, ids, prompt=PROMPT):
    with torch.inference_mode():
        cache = policy.make_cache(model, prompt_length=prompt)
        model(ids[:, :prompt], **cache_kwarg(model, cache))
        for t in range(prompt, ids.shape[1]):
            model(ids[:, t : t + 1], **cache_kwarg(model, cache))
    return cache


@pytest.mark.parametrize("name", CASES)
def test_fast_decode_of_scored_policies_matches_the_oracle(name):
    """Peaked attention: a wrong eviction or position moves the logits far beyond the 1e-4 tolerance."""
    kv_heads, make, rule, mode = CASES[name]
    model, ids = peaked_llama(kv_heads), tokens(LENGTH)
    got, decoder = fast_logits(model, make(), ids)
    expected = oracle_logits(model, rule, ids, [PROMPT] + [1] * (LENGTH - PROMPT), position_mode=mode)[PROMPT:]
    assert_matches(got, expected)
    kept = exact_cache(model, make(), ids).kept_positions()
    assert torch.equal(decoder.ring.kept_positions(), kept)
    if name.startswith(("h2o", "tova")):
        assert decoder.ring.evictions == 4 * (LENGTH - PROMPT)  # one per layer and step once full
        assert decoder.ring.host_lengths == [16] * 4


def test_a_wrong_eviction_score_is_caught():
    """The oracle comparison can fail: H2O decoding with TOVA's score (the step's own attention) disagrees."""
    model, ids = peaked_llama(2), tokens(LENGTH)
    _, make, rule, mode = CASES["h2o-gqa"]
    policy = make()
    build = policy.make_cache

    def wrong_rule(model, prompt_length=None):
        cache = build(model, prompt_length)
        cache.eviction_rule = lambda: EvictionRule(budget=16, score="last", protected=8)
        return cache

    object.__setattr__(policy, "make_cache", wrong_rule)
    got, _ = fast_logits(model, policy, ids)
    expected = oracle_logits(model, rule, ids, [PROMPT] + [1] * (LENGTH - PROMPT), position_mode=mode)[PROMPT:]
    assert (got - expected).abs().max().item() > 0.1


@pytest.mark.parametrize("make", [lambda d: H2OPolicy(budget=20, decode=d), lambda d: TOVAPolicy(budget=20, decode=d),
                                  lambda d: SnapKVPolicy(budget=20, window=4, decode=d),
                                  lambda d: PyramidKVPolicy(budget=20, window=4, decode=d)],
                         ids=["h2o", "tova", "snapkv", "pyramidkv"])
@pytest.mark.parametrize("context", [None, 30], ids=["prompt", "context"])
def test_generation_with_decode_fast_equals_exact_for_scored_policies(make, context):
    from test_tasks import LetterTokenizer

    from lacache.tasks import generation

    model = peaked_llama(2, seed=4)
    prompt = [int(t) for t in torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(5))]
    exact = generation.generate(model, LetterTokenizer(), make("exact"), prompt, 50, eos_ids=(), context_tokens=context)
    fast = generation.generate(model, LetterTokenizer(), make("fast"), prompt, 50, eos_ids=(), context_tokens=context)
    assert fast.token_ids == exact.token_ids and len(fast.token_ids) == 50


def test_decode_fast_needs_a_prompt_only_snapkv():
    with pytest.raises(PolicyConfigError, match="decode=fast needs decode_budget=null"):
        SnapKVPolicy(budget=64, decode_budget=8, decode="fast")
    model, ids = peaked_llama(2), tokens(60)
    with torch.inference_mode():
        cache = SnapKVPolicy(budget=16, window=4).make_cache(model)  # no prompt: a stream, compressed as it goes
        model(ids[:, :40], **cache_kwarg(model, cache))
        with pytest.raises(ValueError, match="no fast decode path"):
            GraphDecoder(model, cache, ids[:, 40:41], graphs=False)
        scored = H2OPolicy(budget=16).make_cache(model, prompt_length=40)
        model(ids[:, :40], **cache_kwarg(model, scored))
        with pytest.raises(ValueError, match="fuse=True and triton=True are for the ring path"):
            GraphDecoder(model, scored, ids[:, 40:41], graphs=False, fuse=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "pyramidkv"])
def test_cuda_graph_eviction_path_matches_exact_over_300_steps(name):
    """CUDA graphs in fp32 on a mid-sized model: the same logits (to 1e-3) and the same entries kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to("cuda").eval()
    make = {"h2o": lambda: H2OPolicy(budget=64), "tova": lambda: TOVAPolicy(budget=64),
            "snapkv": lambda: SnapKVPolicy(budget=64, window=8), "pyramidkv": lambda: PyramidKVPolicy(budget=64, window=8)}[name]
    ids = torch.randint(0, 512, (1, 128 + 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        exact = make().make_cache(model, prompt_length=128)
        model(ids[:, :128], **cache_kwarg(model, exact))
        source = make().make_cache(model, prompt_length=128)
        model(ids[:, :128], **cache_kwarg(model, source))
        decoder = GraphDecoder(model, source, ids[:, 128:129], max_new_tokens=300, graphs=True)
        error = 0.0
        try:
            for t in range(128, ids.shape[1]):
                want = model(ids[:, t : t + 1], **cache_kwarg(model, exact)).logits[:, -1].float()
                decoder.ids.copy_(ids[:, t : t + 1])
                error = max(error, (decoder.step().float() - want).abs().max().item())
        finally:
            decoder.close()
    print(f"{name}: max|fast-exact| {error:.2e}, evictions {decoder.ring.evictions}")
    assert error < 1e-3
    assert torch.equal(decoder.ring.kept_positions(), exact.kept_positions())
