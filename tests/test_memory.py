"""A compressing cache really holds less: allocated bytes against ``budget`` plain K + V entries.

Every compressing policy of ``configs/cache/`` is checked (a policy added later is covered without
editing this file). Bytes are what the cache allocates, every tensor included (raw keys, values,
positions, scores), not a count of entries.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import stream, tiny_llama
from omegaconf import OmegaConf

from lacache.harness.runner import build

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "cache"
UNCOMPRESSED = {"full", "lacache_reference"}  # the ceiling, and the reference's per-step method (grows by concatenation)
COMPRESSING = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in UNCOMPRESSED)
BUDGET, PROMPT, DECODE, CHUNK = 256, 1024, 24, 128
DECODE_LIMIT = 1.1  # x the bytes of `budget` plain K + V entries
PREFILL_LIMIT = 1.05  # x the bytes of the whole prompt's plain K + V entries


# Ladders that fit the tiny model's 4 layers; SnapKV and PyramidKV compress the prompt only (their references):
# with `decode_budget` they compress again every 8 decoded tokens, the bound checked here (budget + 8).
TINY = {"lacache": {"span": 2, "overlap": 0}, "snapkv": {"decode_budget": 8}, "pyramidkv": {"decode_budget": 8}}


def policy(name: str, **overrides):
    node = OmegaConf.load(CONFIGS / f"{name}.yaml")
    node.budget = BUDGET
    for key, value in {**TINY.get(name, {}), **overrides}.items():
        node[key] = value
    return build(node, "cache")


@pytest.fixture(scope="module")
def model():
    """Head dim 32: per-slot bookkeeping (a position, a score: 4 bytes each) weighs as on real models (<= 3%)."""
    return tiny_llama(layers=4, heads=2, kv_heads=1)


def plain_bytes(model, entries: int) -> int:
    """Bytes of ``entries`` K + V entries per layer in the model's dtype, no overhead (a full cache's cost)."""
    config = model.config
    dim = config.hidden_size // config.num_attention_heads
    return entries * config.num_hidden_layers * config.num_key_value_heads * 2 * dim * model.dtype.itemsize


@pytest.mark.parametrize("name", COMPRESSING)
def test_full_prefill_holds_the_prompt_once_then_shrinks_to_the_budget(model, name):
    ids = torch.randint(0, 128, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(0))
    cache = policy(name, prefill="full").make_cache(model, prompt_length=PROMPT)
    stream(model, cache, ids[:, :PROMPT], step=PROMPT)
    stream(model, cache, ids[:, PROMPT:])
    stats = cache.stats()
    entries = cache.entries_per_layer()  # PyramidKV's layers differ; every policy's total is the uniform one
    assert sum(entries) <= len(entries) * (BUDGET + 16), entries  # budget + documented slack
    # The stacked buffers give every layer the longest layer's slots (PyramidKV: its first layer's; README)
    assert stats["kv_bytes_decode"] <= DECODE_LIMIT * plain_bytes(model, max(BUDGET, max(entries))), stats
    assert stats["kv_bytes_prefill"] <= PREFILL_LIMIT * plain_bytes(model, PROMPT), stats


@pytest.mark.parametrize("name", COMPRESSING)
def test_chunked_prefill_never_holds_more_than_budget_plus_a_chunk(model, name):
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    chosen = policy(name, prefill="chunked", prefill_chunk=CHUNK)
    cache = chosen.make_cache(model, prompt_length=PROMPT)
    for size in chosen.prefill_chunks(PROMPT):
        stream(model, cache, ids[:, cache.seen : cache.seen + size], step=size)
    assert cache.stats()["kv_bytes_peak"] <= DECODE_LIMIT * plain_bytes(model, BUDGET + CHUNK), cache.stats()


def test_the_full_cache_is_the_yardstick(model):
    """The full cache's decode bytes are the plain bytes of every token: the ratio above is against it."""
    from lacache.baselines.full import FullCachePolicy

    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    cache = FullCachePolicy().make_cache(model)
    stream(model, cache, ids[:, :48], step=48)
    stream(model, cache, ids[:, 48:])
    assert cache.stats()["kv_bytes_decode"] == plain_bytes(model, 64)
