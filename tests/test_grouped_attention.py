"""Masked grouped-query attention without repeat_kv (lacache.decode.grouped_attention): against a softmax
written out per query head, and a chunked prefill of a peaked tiny Llama against transformers' SDPA."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import sharpened, tiny_llama
from torch.nn.attention.bias import CausalBias

from lacache.baselines.full import FullCachePolicy
from lacache.baselines.streamingllm import StreamingLLMPolicy
from lacache.compat import cache_kwarg
from lacache.decode.grouped_attention import ATTENTION_NAME, grouped_attention, grouped_sdpa_attention, lower_right_or_sdpa_mask
from lacache.ladder_cache import LaCachePolicy


def per_head_reference(query, key, value, mask, scaling):
    """Attention of every query head alone: head h reads key/value head h // groups (Llama's grouping)."""
    batch, heads, rows, _ = query.shape
    groups = heads // key.shape[1]
    out = torch.empty(batch, rows, heads, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            logits = query[b, h].double() @ key[b, h // groups].double().T * scaling
            head_mask = mask[min(b, mask.shape[0] - 1), min(h, mask.shape[1] - 1)]
            logits = logits.masked_fill(~head_mask, -math.inf) if head_mask.dtype == torch.bool else logits + head_mask.double()
            out[b, :, h] = torch.softmax(logits, -1) @ value[b, h // groups].double()
    return out


def random_case(mask_batch, mask_heads, float_mask=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, rows, keys, dim = 2, 6, 2, 5, 9, 8
    query = torch.randn(batch, rows, heads, dim, generator=generator).transpose(1, 2) * 3  # strided, as the model passes it
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator) * 3
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    mask = torch.rand(mask_batch, mask_heads, rows, keys, generator=generator) < 0.6
    mask[..., 0] = True  # every row sees a key
    if float_mask:
        mask = torch.zeros(mask.shape).masked_fill(~mask, -1e4) + torch.rand(mask.shape, generator=generator)
    return query, key, value, mask


@pytest.mark.parametrize("mask_batch,mask_heads,float_mask", [(1, 1, False), (2, 1, False), (2, 6, False), (1, 1, True), (2, 6, True)])
def test_packed_grouped_heads_match_each_head_attending_alone(mask_batch, mask_heads, float_mask):
    query, key, value, mask = random_case(mask_batch, mask_heads, float_mask)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    got, weights = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.4)
    assert weights is None and got.shape == (2, 5, 6, 8)
    torch.testing.assert_close(got.double(), per_head_reference(query, key, value, mask, 0.4), rtol=1e-5, atol=1e-5)


def test_the_reference_sees_a_mask_tiled_in_the_wrong_order():
    """repeat_interleave gives packed row j*rows+i the mask row of query i // groups: every head then
    sees another query's mask, which the per-head reference must catch."""
    query, key, value, mask = random_case(1, 1)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    batch, heads, rows, dim = query.shape
    wrong = mask.repeat_interleave(3, dim=2)
    packed = query.reshape(batch, 2, 3 * rows, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=wrong, scale=0.4)
    out = out.reshape(batch, heads, rows, dim).transpose(1, 2)
    assert not torch.allclose(out.double(), per_head_reference(query, key, value, mask, 0.4), atol=1e-3)
    right, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.4)
    assert torch.allclose(right.double(), per_head_reference(query, key, value, mask, 0.4), atol=1e-5)


def test_calls_it_does_not_pack_go_to_transformers_sdpa_unchanged(monkeypatch):
    from transformers.integrations import sdpa_attention

    calls = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[4]) or ("stock", None))
    query, key, value, mask = random_case(1, 1)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    assert grouped_sdpa_attention(module, query, key, value, None)[0] == "stock"  # no mask: SDPA's own grouped path
    assert grouped_sdpa_attention(module, query[:, :, :1], key, value, mask[:, :, :1])[0] == "stock"  # one row
    assert grouped_sdpa_attention(module, query, key, value, mask, position_bias=torch.zeros(1))[0] == "stock"
    assert grouped_sdpa_attention(module, query[:, :2], key[:, :2], value[:, :2], mask)[0] == "stock"  # no grouping
    assert len(calls) == 4


def mask_arguments(**changes):
    """create_causal_mask's call for a 6-token chunk after 10 held slots, batch 2."""
    from transformers.masking_utils import causal_mask_function

    return {"batch_size": 2, "q_length": 6, "kv_length": 16, "q_offset": 10, "kv_offset": 0, "mask_function": causal_mask_function,
            "attention_mask": None, "allow_is_causal_skip": True, "dtype": torch.float32, "device": "cpu", **changes}


def test_a_chunk_after_held_slots_gets_a_lower_right_causal_bias_and_anything_else_the_sdpa_mask():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    bias = lower_right_or_sdpa_mask(**mask_arguments())
    assert isinstance(bias, CausalBias) and (bias.seq_len_q, bias.seq_len_kv) == (6, 16)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(2, 6, 6, 8, generator=generator).transpose(1, 2) * 3
    key, value = (torch.randn(2, 2, 16, 8, generator=generator) * 3 for _ in range(2))
    stock_mask = sdpa_mask(**mask_arguments(allow_is_causal_skip=False))  # the tensor transformers would build: query i sees 0..10+i
    assert stock_mask.shape[-2:] == (6, 16) and stock_mask[0, 0, 0].sum() == 11 and stock_mask[0, 0, 5].all()
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    got, _ = grouped_sdpa_attention(module, query, key, value, bias, scaling=0.4)
    torch.testing.assert_close(got.double(), per_head_reference(query, key, value, stock_mask, 0.4), rtol=1e-5, atol=1e-5)
    padding = torch.ones(2, 16, dtype=torch.bool)
    padding[1, :3] = False
    for changes in ({"attention_mask": padding}, {"local_size": 4}, {"q_offset": 0, "kv_length": 6},
                    {"mask_function": sliding_window_causal_mask_function(4)}, {"q_offset": 9}, {"allow_is_causal_skip": False}):
        mask = lower_right_or_sdpa_mask(**mask_arguments(**changes))
        want = sdpa_mask(**mask_arguments(**changes))
        assert not isinstance(mask, CausalBias) and (mask is None and want is None or torch.equal(mask, want)), changes


def peaked_llama():
    return sharpened(tiny_llama(layers=8, heads=8, kv_heads=2))


def chunked_logits(model, cache, ids, chunk):
    with torch.inference_mode():
        return torch.cat([model(ids[:, s : s + chunk], **cache_kwarg(model, cache), use_cache=True).logits
                          for s in range(0, ids.shape[1], chunk)], 1)


@pytest.mark.parametrize("policy", [LaCachePolicy(budget=40, span=4, sink=4), StreamingLLMPolicy(budget=40), FullCachePolicy()],
                         ids=["lacache", "streamingllm", "full"])
def test_a_chunked_prefill_through_grouped_attention_gives_transformers_logits(policy):
    model = peaked_llama()
    ids = torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(1))
    want = chunked_logits(model, policy.make_cache(model, prompt_length=120), ids, 16)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(query, *args, **kwargs):
        calls.append(query.shape)
        return original(query, *args, **kwargs)

    from lacache.decode import grouped_attention as module

    biases = []

    def recorded(*lengths):
        biases.append(lengths)
        return torch.nn.attention.bias.causal_lower_right(*lengths)

    with pytest.MonkeyPatch.context() as patch, grouped_attention(model):
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        patch.setattr(module, "causal_lower_right", recorded)
        assert model.config._attn_implementation == ATTENTION_NAME
        got = chunked_logits(model, policy.make_cache(model, prompt_length=120), ids, 16)
    assert model.config._attn_implementation == "sdpa"
    assert len(biases) == 120 // 16 - 1 + 1 and biases[0] == (16, 32)  # every chunk after the first, the short last one too
    assert (2, 2, 4 * 16, 8) in calls  # on a CPU the bias runs packed: 4 query heads per KV head, 16 rows each
    assert (got - want).abs().max() < 1e-4 and (want.std() > 1)  # fp32 rounding only, on logits that tell slots apart


def test_other_attention_implementations_are_left_alone():
    model = peaked_llama()
    model.set_attn_implementation("eager")
    with grouped_attention(model):
        assert model.config._attn_implementation == "eager"
    model = peaked_llama()
    with grouped_attention(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_in_bf16_packed_heads_err_no_more_than_transformers_sdpa():
    """The 8B model's grouping (32 query heads on 8 KV heads, dim 128), a chunk's causal mask over held
    slots: the packed kernel's error and flash attention's (the lower-right bias) against the fp64
    per-head softmax are within twice the stock path's."""
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator("cuda").manual_seed(0)
    rows, held = 64, 256
    query = torch.randn(1, rows, 32, 128, device="cuda", generator=generator).transpose(1, 2).bfloat16()
    key = torch.randn(1, 8, held + rows, 128, device="cuda", generator=generator).bfloat16() * 2
    value = torch.randn(1, 8, held + rows, 128, device="cuda", generator=generator).bfloat16()
    mask = torch.ones(rows, held + rows, dtype=torch.bool, device="cuda").tril(held)[None, None]
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    want = per_head_reference(query.cpu().float(), key.cpu().float(), value.cpu().float(), mask.cpu(), 128 ** -0.5)
    from lacache.decode.grouped_attention import _flash_reads_groups

    assert _flash_reads_groups(query, key, value, 0.0)  # the bias runs on flash attention, not as a mask
    packed, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=128 ** -0.5)
    flash, _ = grouped_sdpa_attention(module, query, key, value, causal_lower_right(rows, held + rows), scaling=128 ** -0.5)
    stock, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=128 ** -0.5)
    stock_error = (stock.cpu().double() - want).abs().max().item()
    for out in (packed, flash):
        error = (out.cpu().double() - want).abs().max().item()
        assert error <= 2 * stock_error + 1e-3, (error, stock_error)
