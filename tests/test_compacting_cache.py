"""The compacting cache as transformers and the harness see it: the lengths and positions it reports, the
memory it allocates and reports, and what it refuses. Exact numbers, worked out by hand, on a tiny model.

The model: 2 layers, 1 KV head of 32 dims, fp32. One slot of the cache costs, over both layers, a raw key
and a value (2 x 32 x 4 bytes) and an int32 original position (4 bytes): 2 x 260 = 520 bytes; H2O adds a
fp32 score (4 bytes a layer): 528. A cache is allocated for its budget plus 8 spare slots, plus one forward's
tokens (room for the next forward of that size).
"""

from __future__ import annotations

import pytest
import torch
from conftest import stream, tiny_llama

from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.baselines.tova import TOVAPolicy
from lacache.compat import cache_kwarg
from lacache.kvcache import Plan
from lacache.ladder_cache import LaCachePolicy

SLOT = 520  # bytes per slot (both layers): key + value + position
IDS = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, heads=2, kv_heads=1)


def feed(model, cache, ids):
    with torch.inference_mode():
        return model(ids, **cache_kwarg(model, cache)).logits


def test_token_by_token_the_cache_is_allocated_once_for_budget_and_spare_slots(model):
    """StreamingLLM, budget 16, 40 tokens one at a time: 16 + 8 + 1 = 25 slots allocated at the first token
    and never again; 17 held at most (the budget and the token just added), the mean over the 40 forwards."""
    cache = StreamingLLMPolicy(budget=16, sink=4).make_cache(model)
    buffers = set()
    for t in range(40):
        feed(model, cache, IDS[:, t : t + 1])
        buffers.add(cache.raw_keys.data_ptr())
    assert len(buffers) == 1 and cache.capacity == 25
    mean = (sum(range(1, 17)) + 17 * 24) / 40
    assert cache.stats() == {
        "kv_entries_per_layer_mean": mean, "kv_entries_per_layer_max": 17,
        "kv_bytes_mean": mean * SLOT, "kv_bytes_max": 17 * SLOT, "kv_bytes_allocated": 25 * SLOT,
        "kv_bytes_prefill": 0, "kv_bytes_decode": 25 * SLOT, "kv_bytes_peak": 25 * SLOT,
    }
    assert cache.entries_per_layer() == [16, 16] and cache.bytes_per_slot() == SLOT


def test_a_prefill_holds_the_prompt_once_then_decode_gives_the_memory_back(model):
    """A 40-token prompt in one forward: 48 slots (prompt + 8 spare); the first decode step compacts to the
    budget and shrinks to 16 + 1 + 8 = 25 slots, one buffer at a time (the transient is the key buffer's
    25 new slots: 256 bytes a slot, never a second copy of the cache)."""
    cache = StreamingLLMPolicy(budget=16, sink=4).make_cache(model, prompt_length=40)
    feed(model, cache, IDS[:, :40])
    assert cache.capacity == 48 and cache.stats()["kv_bytes_prefill"] == 48 * SLOT
    assert cache.entries_per_layer() == [16, 16]  # the compaction is planned at the question, applied by the next forward
    for t in range(40, 44):
        feed(model, cache, IDS[:, t : t + 1])
    stats = cache.stats()
    assert cache.capacity == 25
    assert (stats["kv_bytes_prefill"], stats["kv_bytes_decode"], stats["kv_bytes_allocated"]) == (48 * SLOT, 25 * SLOT, 25 * SLOT)
    assert stats["kv_bytes_peak"] == 48 * SLOT + 25 * 256 and stats["kv_entries_per_layer_max"] == 40


def test_a_chunked_prefill_is_allocated_for_two_chunks_once(model):
    """Chunks of 16 with a budget of 16: 24 + 16 = 40 slots at the first chunk, enough for every later one."""
    policy = StreamingLLMPolicy(budget=16, sink=4, prefill="chunked", prefill_chunk=16)
    cache = policy.make_cache(model, prompt_length=64)
    buffers = set()
    for size in policy.prefill_chunks(64):
        feed(model, cache, IDS[:, cache.seen : cache.seen + size])
        buffers.add(cache.raw_keys.data_ptr())
    assert len(buffers) == 1 and cache.capacity == 40
    stats = cache.stats()
    assert stats["kv_bytes_prefill"] == stats["kv_bytes_peak"] == 40 * SLOT and stats["kv_entries_per_layer_max"] == 32
    assert cache.kept_positions()[:, 0, 0].tolist() == [[0, 1, 2, 3] + list(range(52, 64))] * 2


def test_a_cache_that_only_grows_grows_by_a_quarter(model):
    """SnapKV compresses the prompt only; decoding then appends. After the prompt (20 + 8 slots) the cache
    shrinks to the budget's 12 + 1 + 8 = 21; then each reallocation makes room for 8 more tokens, or 5/4 of
    the slots once that is more (amortised growth), never one slot at a time."""
    cache = SnapKVPolicy(budget=12, window=4).make_cache(model, prompt_length=20)
    feed(model, cache, IDS[:, :20])
    capacities = [cache.capacity]
    for t in range(20, 80):
        feed(model, cache, IDS[:, t : t + 1])
        if cache.capacity != capacities[-1]:
            capacities.append(cache.capacity)
    assert capacities == [28, 21, 30, 39, 48, 60, 75]  # 21 + 9, 30 + 9, 39 + 9, then 48 * 5 // 4, 60 * 5 // 4
    assert cache.entries_per_layer() == [72, 72] and cache.length == 72


def test_scores_are_part_of_the_reported_bytes(model):
    cache = H2OPolicy(budget=16).make_cache(model)
    stream(model, cache, IDS[:, :20])
    assert cache.bytes_per_slot() == SLOT + 2 * 4 and cache.stats()["kv_bytes_allocated"] == 25 * (SLOT + 8)
    assert H2OPolicy(budget=16).make_cache(model).stats()["kv_bytes_allocated"] == 0  # nothing allocated before a token


@pytest.mark.parametrize("policy, length, position", [
    (StreamingLLMPolicy(budget=16, sink=4), 16, 16),  # position shift: the next token sits at the slot count
    (LaCachePolicy(budget=16, span=1, overlap=0, sink=2), 16, 16),
    (TOVAPolicy(budget=16), 16, 30),  # original positions: the next token sits at the tokens seen
])
def test_the_cache_reports_its_length_and_the_next_position(model, policy, length, position):
    """What transformers asks a cache for: the query's position (``get_seq_length``) and the mask's key
    length and offset (``get_mask_sizes``), after 30 tokens with the budget's compaction pending."""
    cache = policy.make_cache(model)
    stream(model, cache, IDS[:, :30])
    assert cache.get_seq_length() == position and cache.get_query_offset() == position
    assert cache.get_mask_sizes(3) == (length + 3, 30 - length if position == 30 else 0)
    assert cache.layers[1].get_seq_length() == position and cache.layers[1].get_mask_sizes(1) == cache.get_mask_sizes(1)
    assert cache.held() == length and cache.seen == 30
    assert cache.get_max_length() == -1 and cache.layers[0].get_max_length() == -1 and not cache.is_compileable
    assert cache.layers[0].keys.shape[-2] == cache.layers[0].values.shape[-2] == length + (cache.pending is not None)


def test_the_layers_show_the_held_entries_as_attention_reads_them(model):
    """A layer's keys are the raw keys rotated at their slots: the model's own keys for a cache that never
    compacted (every token at its own position)."""
    cache = StreamingLLMPolicy(budget=64, sink=4).make_cache(model)
    stream(model, cache, IDS[:, :10])
    from transformers import DynamicCache

    plain = DynamicCache(config=model.config)
    feed(model, plain, IDS[:, :10])
    for layer in range(2):
        torch.testing.assert_close(cache.layers[layer].keys, plain.layers[layer].keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.layers[layer].values, plain.layers[layer].values)
        assert torch.equal(cache.positions[layer, 0, 0, :10], torch.arange(10, dtype=torch.int32))


def test_apply_pending_makes_the_buffers_hold_the_plan(model):
    cache = StreamingLLMPolicy(budget=16, sink=4).make_cache(model)
    stream(model, cache, IDS[:, :20])
    with torch.inference_mode():
        assert cache.length == 17 and cache.apply_pending() and cache.length == 16
        assert not cache.apply_pending()  # nothing left to apply
    assert cache.positions[0, 0, 0, :16].tolist() == [0, 1, 2, 3] + list(range(8, 20))


class NoRope(torch.nn.Module):
    """A model without a rotary embedding (e.g. GPT-2's learned positions)."""

    def __init__(self, config):
        super().__init__()
        self.config = config


def test_a_compacting_cache_refuses_what_it_cannot_do(model):
    cache = StreamingLLMPolicy(budget=16, sink=4).make_cache(model)
    stream(model, cache, IDS[:, :4])
    with pytest.raises(NotImplementedError, match="build a new one per sequence"):
        cache.layers[0].reset()
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.layers[0].crop(1)
    with pytest.raises(ValueError, match="per-layer lengths need position_mode='original'"), torch.inference_mode():
        cache._apply(Plan(start=0, index=torch.arange(2)[None, None, None], new_length=2, lengths=[2, 1]))
    with pytest.raises(ValueError, match="has no `model.rotary_emb`"):
        StreamingLLMPolicy(budget=16).make_cache(NoRope(model.config))


def test_uneven_layers_take_one_token_at_a_time(model):
    """PyramidKV-like per-layer lengths (an original-position cache): the shorter layer reads -1 beyond its
    length, the counts are per layer, and a multi-token forward is refused with the reason."""
    cache = TOVAPolicy(budget=16).make_cache(model)
    stream(model, cache, IDS[:, :10])
    with torch.inference_mode():
        cache.apply_pending()
        cache._apply(Plan(start=0, index=torch.tensor([[[[0, 2, 4, 6, 8]]], [[[1, 3, 5, 5, 5]]]]), new_length=5, lengths=[5, 3]))
    assert cache.entries_per_layer() == [5, 3]
    assert cache.kept_positions()[:, 0, 0].tolist() == [[0, 2, 4, 6, 8], [1, 3, 5, -1, -1]]
    feed(model, cache, IDS[:, 10:11])
    assert cache.entries_per_layer() == [6, 4] and cache.kept_positions()[1, 0, 0].tolist() == [1, 3, 5, 10, -1, -1]
    with pytest.raises(ValueError, match="feed the following tokens one at a time"):
        feed(model, cache, IDS[:, 11:13])


def test_lacache_is_allocated_for_its_compensated_budget_and_its_amortised_merges():
    """6 layers, S=1 O=0 (r = 5), budget 16, compact_every=2: it holds at most 16 + 5 // 2 + 2 = 20 slots, so it
    is allocated 20 + 8 spare slots (+ 1, the first forward's room, given back at the first compaction)."""
    model = tiny_llama(layers=6, heads=2, kv_heads=1)
    cache = LaCachePolicy(budget=16, span=1, overlap=0, sink=2, compact_every=2).make_cache(model)
    capacities = []
    for t in range(40):
        feed(model, cache, IDS[:, t : t + 1])
        capacities.append(cache.capacity)
    stats = cache.stats()
    assert sorted(set(capacities)) == [28, 29] and capacities.index(28) == 20  # the first merge: after 20 tokens
    assert stats["kv_entries_per_layer_max"] == 20
    assert (stats["kv_bytes_allocated"], stats["kv_bytes_decode"]) == (28 * 3 * SLOT, 29 * 3 * SLOT)


def test_layers_of_different_lengths_read_their_own_entries(model):
    """PyramidKV after a prompt (2 layers, budget 12, window 4, 40 tokens): the selected 2 x 8 entries split
    15.6 : 0.4 -> 16 : 0, so the layers keep 20 and 4 entries. Before the next forward (the plan pending) and
    after it, each layer reports and reads its own count; a shorter layer's positions end in -1."""
    from lacache.baselines.pyramidkv import PyramidKVPolicy

    cache = PyramidKVPolicy(budget=12, window=4).make_cache(model, prompt_length=40)
    feed(model, cache, IDS[:, :40])
    assert cache.entries_per_layer() == [20, 4]
    held = cache.kept_positions()[:, 0, 0].tolist()
    assert held[1][:4] == [36, 37, 38, 39] and held[1][4:] == [-1] * 16 and held[0][-4:] == [36, 37, 38, 39]
    feed(model, cache, IDS[:, 40:41])
    assert cache.entries_per_layer() == [21, 5] and cache.kept_positions()[1, 0, 0].tolist()[:6] == [36, 37, 38, 39, 40, -1]
    assert [cache.layers[i].values.shape[-2] for i in range(2)] == [21, 5]
    assert [cache.layers[i].keys.shape[-2] for i in range(2)] == [21, 5]


def test_keys_are_rotated_at_any_position():
    """Rotation tables grow on demand: positions past the first 256 rotate like the model's own RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from lacache.kvcache import RotaryTable

    rotary = tiny_llama(layers=2).model.rotary_emb
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = rotary(x, torch.arange(300, 340)[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    for rotate in (lambda rope, out: rope.rotate_into(out, x, 300),
                   lambda rope, out: rope.rotate_at(x, torch.arange(300, 340).expand(1, 2, 40), 340, out=out)):
        rope, out = RotaryTable(rotary, torch.device("cpu"), torch.float32), torch.empty_like(x)
        rotate(rope, out)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    rope = RotaryTable(rotary, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(rope.unrotate(expected, 300), x, rtol=1e-5, atol=1e-5)


def test_a_cache_before_its_first_token_reports_nothing(model):
    cache = StreamingLLMPolicy(budget=16, sink=4).make_cache(model)
    assert cache.bytes_per_slot() == 0 and cache.capacity == 0
    assert cache.stats() == dict.fromkeys(("kv_entries_per_layer_mean", "kv_entries_per_layer_max", "kv_bytes_mean",
                                           "kv_bytes_max", "kv_bytes_allocated", "kv_bytes_prefill", "kv_bytes_decode",
                                           "kv_bytes_peak"), 0)
    stream(model, cache, IDS[:, :3])
    assert all(type(v) is int for k, v in cache.stats().items() if k != "kv_entries_per_layer_mean" and k != "kv_bytes_mean")


def test_a_base_model_without_its_head_works_too(model):
    """The cache finds the rotary embedding on a decoder with an LM head (``model.model.rotary_emb``) or on
    the bare decoder (``LlamaModel``: its own ``rotary_emb``)."""
    cache = StreamingLLMPolicy(budget=8, sink=2).make_cache(model.model)
    with torch.inference_mode():
        for t in range(12):
            model.model(IDS[:, t : t + 1], **cache_kwarg(model.model, cache))
    assert cache.kept_positions()[:, 0, 0].tolist() == [[0, 1, 6, 7, 8, 9, 10, 11]] * 2
