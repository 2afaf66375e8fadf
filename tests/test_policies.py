"""Cache policies on tiny random-weight Llamas: exactness, kept sets, positions, memory bounds."""

import pytest
import torch
from conftest import stream, tiny_llama
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy, HeavyHitterCache, attention_column_sums
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.compat import cache_kwarg
from lacache.ladder import kept_positions
from lacache.ladder_cache import LaCachePolicy
from lacache.policy import PolicyConfigError

TOKENS = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("policy", [LaCachePolicy(budget=512, span=4), StreamingLLMPolicy(budget=512), H2OPolicy(budget=512), FullCachePolicy()], ids=lambda p: p.name)
def test_budget_above_sequence_equals_full_cache(tiny_model, policy):
    policy.prepare_model(tiny_model)
    expected = tiny_model(TOKENS).logits
    got = stream(tiny_model, policy.make_cache(tiny_model), TOKENS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("span, overlap, budget, sink", [(4, 0, 40, 4), (2, 0, 40, 4), (4, 2, 48, 0), (3, 1, 30, 2)])
def test_lacache_cache_keeps_predicted_positions(tiny_model, span, overlap, budget, sink):
    cache = LaCachePolicy(budget=budget, span=span, overlap=overlap, sink=sink).make_cache(tiny_model)
    stream(tiny_model, cache, TOKENS)
    held = cache.kept_positions()
    assert torch.equal(held, held[:, :1, :1].expand_as(held))  # same for every batch row and head
    assert held[:, 0, 0].tolist() == kept_positions(8, span, overlap, budget, sink, TOKENS.shape[1])


class SlotRotaryReferenceCache(DynamicCache):
    """The plainest position-shift design, written independently: store un-rotated keys, apply the
    ladder with plain lists after every forward, rotate every key at its slot on every step."""

    def __init__(self, model, ladder_kept):
        super().__init__(config=model.config)
        self.model, self.kept = model, ladder_kept
        self.raw = [[] for _ in range(model.config.num_hidden_layers)]
        self.vals = [[] for _ in range(model.config.num_hidden_layers)]
        self.seen = 0

    def _cos_sin(self, positions):
        probe = torch.zeros(1, dtype=torch.float32)
        return self.model.model.rotary_emb(probe, torch.tensor([positions]))

    def get_seq_length(self, layer_idx=0):
        return len(self.raw[0])

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.get_seq_length() + query_length, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = len(self.raw[layer_idx])
        cos, sin = self._cos_sin([n])
        scale = self.model.model.rotary_emb.attention_scaling  # the tables carry it: keys are scale * R(n) k
        raw, _ = apply_rotary_pos_emb(key_states, key_states, cos, -sin)  # rotate back by -n
        raw = raw / scale**2
        self.raw[layer_idx].append((raw[0, :, 0], self.seen))
        self.vals[layer_idx].append(value_states[0, :, 0])
        keys = torch.stack([k for k, _ in self.raw[layer_idx]], dim=1)[None]
        cos, sin = self._cos_sin(list(range(keys.shape[2])))
        keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
        values = torch.stack(self.vals[layer_idx], dim=1)[None]
        if layer_idx == len(self.raw) - 1:
            self.seen += 1
            kept = self.kept(self.seen)
            for layer in range(len(self.raw)):
                index = {pos: j for j, (_, pos) in enumerate(self.raw[layer])}
                order = [index[pos] for pos in kept[layer]]
                self.raw[layer] = [self.raw[layer][j] for j in order]
                self.vals[layer] = [self.vals[layer][j] for j in order]
        return keys, values


YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}  # attention_scaling 1.069


@pytest.mark.parametrize("span, overlap, budget, rope", [(4, 0, 24, None), (2, 0, 28, None), (4, 0, 24, YARN)],
                         ids=["S4", "S2", "S4-yarn"])
def test_position_shift_matches_rotate_everything_reference(span, overlap, budget, rope):
    """Over a stream with many compactions and cursor wraps, logits equal the reference scheme
    (also for a RoPE whose tables carry an attention scaling, as YaRN's do)."""
    model = tiny_llama(seed=3, **({"rope_scaling": rope} if rope else {}))
    ids = torch.randint(0, 128, (1, 220), generator=torch.Generator().manual_seed(1))
    ours = stream(model, LaCachePolicy(budget=budget, span=span, overlap=overlap).make_cache(model), ids)
    oracle = SlotRotaryReferenceCache(model, lambda t: kept_positions(8, span, overlap, budget, 4, t))
    reference = stream(model, oracle, ids)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_streamingllm_keeps_sinks_and_newest_at_every_step(tiny_model):
    cache = StreamingLLMPolicy(budget=20, sink=4).make_cache(tiny_model)
    with torch.inference_mode():
        for t in range(60):
            tiny_model(TOKENS[:, t : t + 1], **cache_kwarg(tiny_model, cache))
            held = cache.kept_positions()[0, 0, 0].tolist()
            newest = list(range(max(4, t + 1 - 16), t + 1))
            assert held == list(range(min(4, t + 1))) + newest


def test_h2o_keeps_planted_heavy_hitters(tiny_model):
    """Queries that align with a few planted keys give those keys the top accumulated scores."""
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 40, 16) * 0.1
    planted = [3, 11, 17, 25]
    keys[:, :, planted] = torch.ones(16) * 3
    query = torch.ones(1, 4, 40, 16)
    sums = attention_column_sums(query, keys, 0.25)
    assert set(sums[0, 0, :30].topk(4).indices.tolist()) == set(planted)

    cache = HeavyHitterCache(tiny_model, budget=12, heavy=4)
    with torch.inference_mode():
        for t in range(40):
            tiny_model(TOKENS[:, t : t + 1], **cache_kwarg(tiny_model, cache))
            cache.scores[:, :, :, : cache.length] = 0  # replace the model's scores with a planted pattern
            for p in planted:
                slot = (cache.positions[0, 0, 0, : cache.length] == p).nonzero()
                if len(slot):
                    cache.scores[:, :, :, slot[0, 0]] = 10.0
            cache.pending = cache.plan(cache.length)
    held = cache.kept_positions()[0, 0, 0].tolist()
    assert held == planted + list(range(32, 40))


@pytest.mark.parametrize("policy", [LaCachePolicy(budget=40, span=4, prefill="chunked", prefill_chunk=16),
                                    StreamingLLMPolicy(budget=40, prefill="chunked", prefill_chunk=16),
                                    H2OPolicy(budget=40, prefill="chunked", prefill_chunk=16)], ids=lambda p: p.name)
def test_chunked_prefill_bounds_memory(tiny_model, policy):
    policy.prepare_model(tiny_model)
    cache = policy.make_cache(tiny_model, prompt_length=TOKENS.shape[1])
    with torch.inference_mode():
        for size in policy.prefill_chunks(TOKENS.shape[1]):
            start = cache.seen
            tiny_model(TOKENS[:, start : start + size], **cache_kwarg(tiny_model, cache))
    assert cache.peak_slots <= 40 + 16 + 2  # budget (+ LaCache compensation) + one chunk
    held = cache.kept_positions()
    assert held[..., -1].eq(TOKENS.shape[1] - 1).all()  # the newest token is never dropped
    assert all(len(set(row.tolist())) == len(row) for row in held.reshape(-1, held.shape[-1]))


def test_full_prefill_then_compact_keeps_the_newest_and_no_duplicates(tiny_model):
    cache = LaCachePolicy(budget=30, span=3, overlap=1, sink=2).make_cache(tiny_model)
    with torch.inference_mode():
        tiny_model(TOKENS[:, :150], **cache_kwarg(tiny_model, cache))
        tiny_model(TOKENS[:, 150:151], **cache_kwarg(tiny_model, cache))
    held = cache.kept_positions()[:, 0, 0]
    assert held.shape[-1] <= 31 + 1
    for row in held.tolist():
        assert row == sorted(set(row)) and row[:2] == [0, 1] and row[-1] == 150


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LaCachePolicy(budget=0.0), r"must be in \(0, 1\]"),
        (lambda: LaCachePolicy(budget=256, prefill="lazy"), "prefill='lazy' is not one of"),
        (lambda: StreamingLLMPolicy(budget=4, sink=4), "must exceed sink=4"),
        (lambda: H2OPolicy(budget=1), "at least one of each"),
        (lambda: LaCachePolicy(budget=256, compact_every=0), "compact_every=0"),
    ],
)
def test_bad_policy_settings_fail_early(make, message):
    with pytest.raises(PolicyConfigError, match=message):
        make()


def test_lacache_validates_against_the_model_before_loading(tiny_model):
    with pytest.raises(PolicyConfigError, match="span=8 must be < num_layers=8"):
        LaCachePolicy(budget=256, span=8).check(tiny_model.config)
    with pytest.raises(PolicyConfigError, match="budget=10 must be >="):
        LaCachePolicy(budget=10, span=4).check(tiny_model.config)


def test_fraction_budget_resolves_against_the_prompt(tiny_model):
    cache = LaCachePolicy(budget=0.5, span=4, sink=4).make_cache(tiny_model, prompt_length=100)
    assert cache.state.budget == 50
    assert StreamingLLMPolicy(budget=0.25).make_cache(tiny_model, prompt_length=100).budget == 25


def test_every_policy_reports_entries_and_bytes(tiny_model):
    for policy in (FullCachePolicy(), LaCachePolicy(budget=40, span=4), StreamingLLMPolicy(budget=40), H2OPolicy(budget=40)):
        policy.prepare_model(tiny_model)
        cache = policy.make_cache(tiny_model)
        stream(tiny_model, cache, TOKENS[:, :80])
        stats = cache.stats()
        assert len(cache.entries_per_layer()) == 8
        assert stats["kv_entries_per_layer_max"] == (80 if policy.name == "full" else 41)
        assert stats["kv_bytes_max"] > 0 and stats["kv_bytes_mean"] <= stats["kv_bytes_max"]


@pytest.mark.slow
def test_smollm2_decoding_keeps_exactly_the_predicted_positions(smollm2):
    """Through the real cache on the real model (30 layers, 3 KV heads): a compacting budget with wraps."""
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt").input_ids[:, :260]
    for span, overlap, budget in [(16, 0, 64), (8, 4, 80)]:
        cache = LaCachePolicy(budget=budget, span=span, overlap=overlap, sink=4).make_cache(model)
        logits = stream(model, cache, ids)
        assert torch.isfinite(logits).all()
        held = cache.kept_positions()
        assert held[:, 0, 0].tolist() == kept_positions(30, span, overlap, budget, 4, ids.shape[1])
        assert torch.equal(held, held[:, :1, :1].expand_as(held))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_rotations_equal_rotate_half_written_out_bit_for_bit(dtype):
    """The exact caches rotate with a halves swap and a sign-folded sin table (fewer kernels per layer):
    the same products and sums as RoFormer's rotate_half form, so every bit equal, in bf16 too; also
    the fp32 un-rotation of new keys and the rotation at per-slot positions."""
    from lacache.kvcache import RotaryTable

    model = tiny_llama(seed=5)
    rope = RotaryTable(model.model.rotary_emb, torch.device("cpu"), dtype)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 2, 40, 16, generator=gen) * 3).to(dtype)

    def reference(v, cos, sin):
        half = v.shape[-1] // 2
        return v * cos + torch.cat((-v[..., half:], v[..., :half]), dim=-1) * sin

    assert torch.equal(rope.rotate(x, 40), reference(x, rope.cos[:40], rope.sin[:40]))
    undone = reference(x.float(), rope.ucos32[7:47], -rope.usin32[7:47]).to(dtype)
    assert torch.equal(rope.unrotate(x, 7), undone)
    assert torch.equal(rope.unrotate(x, 7, out=torch.empty_like(x)), undone)
    positions = torch.randint(0, 300, (2, 2, 40), generator=gen, dtype=torch.int32)
    at = rope.rotate_at(x, positions, 300)
    assert torch.equal(at, reference(x, rope.cos[positions.long()], rope.sin[positions.long()]))
    assert not torch.equal(at, reference(x, rope.cos[positions.long()], -rope.sin[positions.long()]))


def test_bulk_compaction_keeps_exact_entries_rotated_at_their_slots():
    """After an exact 150-token prefill and the bulk compaction, every kept entry equals the full
    cache's entry for its original position, with the key rotated to its new slot index."""
    from lacache.kvcache import RotaryTable

    model = tiny_llama(seed=5)
    ids = torch.randint(0, 128, (1, 151), generator=torch.Generator().manual_seed(2))
    full = DynamicCache(config=model.config)
    cache = LaCachePolicy(budget=60, span=4, overlap=0, sink=4).make_cache(model)
    with torch.inference_mode():
        model(ids[:, :150], **cache_kwarg(model, full))
        model(ids[:, :150], **cache_kwarg(model, cache))
        model(ids[:, 150:151], **cache_kwarg(model, cache))  # applies the pending bulk compaction
    rope = RotaryTable(model.model.rotary_emb, torch.device("cpu"), torch.float32)
    held = cache.length - 1
    for layer in range(8):
        kept = cache.positions[layer, 0, 0, :held]
        full_keys = full.layers[layer].keys[0]
        raw = torch.stack([rope.unrotate(full_keys[:, j : j + 1], j)[:, 0] for j in range(150)], dim=1)[:, kept]
        torch.testing.assert_close(cache.values[layer, 0, :, :held], full.layers[layer].values[0][:, kept])
        expected = torch.empty_like(raw)
        rope.rotate_into(expected, raw, 0)
        torch.testing.assert_close(cache.rotated_keys(layer)[0, :, :held], expected, rtol=1e-5, atol=1e-5)
