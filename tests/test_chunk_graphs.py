"""CUDA graphs of a chunked prefill's middle layers (lacache.decode.chunk_graphs): which caches qualify, and
on a GPU, every logit and every cache slot bit-equal to the eager chunked prefill."""

import contextlib

import pytest
import torch
from conftest import sharpened, tiny_llama

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.h2o import H2OPolicy
from lacache.baselines.snapkv import SnapKVPolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.baselines.tova import TOVAPolicy
from lacache.compat import cache_kwarg
from lacache.decode.chunk_graphs import ChunkGraphs, graphed_prefill, why_not_graphed
from lacache.decode.grouped_attention import grouped_attention
from lacache.ladder_cache import LaCachePolicy


def peaked_llama(layers=8):
    """A tiny Llama with q/k scaled 4x (peaked attention: a key read at another slot or position shows)."""
    return sharpened(tiny_llama(layers=layers))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_only_caches_whose_layers_run_kernels_alone_are_graphed():
    model = peaked_llama()
    assert "not on one CUDA device" in why_not_graphed(model, LaCachePolicy(budget=32, span=4, sink=4).make_cache(model))
    assert isinstance(graphed_prefill(model, StreamingLLMPolicy(budget=32).make_cache(model)), contextlib.nullcontext)
    for policy in (H2OPolicy(budget=48), SnapKVPolicy(budget=48), TOVAPolicy(budget=48)):
        assert "overrides ['on_append']" in why_not_graphed(model, policy.make_cache(model, prompt_length=64))
    assert "not a compacting cache" in why_not_graphed(model, FullCachePolicy().make_cache(model))
    with pytest.raises(ValueError, match="cannot graph this prefill"):
        ChunkGraphs(model, LaCachePolicy(budget=32, span=4, sink=4).make_cache(model))


def chunked(model, policy, ids, chunk, graphs, grouped=False):
    """Every position's logits over a chunked prefill, then 4 one-token steps; the cache; the context."""
    cache = policy.make_cache(model, prompt_length=ids.shape[1])
    logits = []
    context = ChunkGraphs(model, cache) if graphs else None
    with torch.inference_mode(), grouped_attention(model, enabled=grouped):
        with context or contextlib.nullcontext():
            for start in range(0, ids.shape[1] - 4, chunk):
                end = min(start + chunk, ids.shape[1] - 4)
                logits.append(model(ids[:, start:end], **cache_kwarg(model, cache), use_cache=True).logits)
            for t in range(ids.shape[1] - 4, ids.shape[1]):
                logits.append(model(ids[:, t : t + 1], **cache_kwarg(model, cache), use_cache=True).logits)
    return torch.cat(logits, 1), cache, context


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lacache", "streamingllm"])
@pytest.mark.parametrize("grouped", [False, True], ids=["sdpa", "grouped"])
def test_graphed_chunked_prefill_equals_the_eager_one_bit_for_bit(name, dtype, grouped):
    model = peaked_llama().to("cuda", dtype)
    make = {"lacache": lambda: LaCachePolicy(budget=48, span=4, overlap=2, sink=4),
            "streamingllm": lambda: StreamingLLMPolicy(budget=48, sink=4)}[name]
    ids = torch.randint(0, 128, (2, 16 * 24 + 7 + 4), generator=torch.Generator().manual_seed(3)).cuda()  # a 7-token last chunk
    want, eager, _ = chunked(model, make(), ids, 16, graphs=False, grouped=grouped)
    got, graphed, context = chunked(model, make(), ids, 16, graphs=True, grouped=grouped)
    assert context.captures == 1 and context.replays >= 18, (context.captures, context.replays)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    for buffer in ("raw_keys", "values", "positions"):
        assert torch.equal(getattr(graphed, buffer)[:, :, :, : graphed.length], getattr(eager, buffer)[:, :, :, : eager.length]), buffer
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # the context gave the layers back


@cuda
@pytest.mark.cuda
def test_a_task_generation_replays_graphs_and_answers_the_same(monkeypatch):
    """``cache.decode=fast`` with ``prefill=chunked`` replays graphs in a task's generation loop (counted in
    its record), with the tokens of the same loop without them."""
    from test_tasks import LetterTokenizer

    from lacache.tasks import generation

    model = peaked_llama().cuda()
    policy = LaCachePolicy(budget=16, span=4, overlap=2, sink=2, prefill="chunked", prefill_chunk=8, decode="fast")
    prompt = [int(t) for t in torch.randint(3, 128, (120,), generator=torch.Generator().manual_seed(5))]
    graphed = generation.generate(model, LetterTokenizer(), policy, prompt, 40, eos_ids=())
    monkeypatch.setattr(generation, "graphed_prefill", lambda model, cache, enabled: contextlib.nullcontext())
    eager = generation.generate(model, LetterTokenizer(), policy, prompt, 40, eos_ids=())
    assert graphed.record()["prefill_graph_replays"] >= 10 and eager.record()["prefill_graph_replays"] == 0
    assert graphed.token_ids == eager.token_ids and len(graphed.token_ids) == 40
