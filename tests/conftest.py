import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def tiny_llama(layers=8, heads=4, kv_heads=2, vocab=128, seed=0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096, **extra,
    )
    return LlamaForCausalLM(config).eval()


def sharpened(model, sharpen: float = 4.0, head_scale: float = 10.0):
    """``model`` with attention logits ``sharpen**2`` times larger than at init (peaked attention: a key
    read at another slot or position shows) and output logits ``head_scale`` times larger (init
    logits are ~0.05). Gemma normalises q and k after the projection (``(1 + w)`` RMSNorms): there the
    norms' scales grow instead."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            if getattr(attention, "q_norm", None) is not None:  # Gemma's norms scale by (1 + w), others' by w
                for norm in (attention.q_norm, attention.k_norm):
                    gemma = type(norm).__name__.startswith("Gemma")
                    norm.weight.copy_(sharpen * (1 + norm.weight) - 1 if gemma else sharpen * norm.weight)
            else:
                attention.q_proj.weight.mul_(sharpen)
                attention.k_proj.weight.mul_(sharpen)
        model.lm_head.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_spec():
    from omegaconf import OmegaConf

    from lacache import models

    return models.ModelSpec(**OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/smollm2-135m.yaml")))


@pytest.fixture(scope="session")
def smollm2(smollm2_spec):
    from lacache import models

    return models.load(smollm2_spec)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A random-weight 2-layer Llama with SmolLM2's tokenizer, saved like a hub checkpoint."""
    _, tokenizer = smollm2
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(layers=4, vocab=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def stream(model, cache, ids, step=1):
    """Feed ``ids`` through ``model`` with ``cache``; return the logits of every position."""
    from lacache.compat import cache_kwarg

    out = []
    with torch.inference_mode():
        for start in range(0, ids.shape[1], step):
            out.append(model(ids[:, start : start + step], **cache_kwarg(model, cache), use_cache=True).logits)
    return torch.cat(out, dim=1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; run on the device machine)")


GEMMA_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "full_attention", "sliding_attention")


def tiny_gemma(window=8, heads=4, kv_heads=2, vocab=128, seed=0, layer_types=GEMMA_LAYER_TYPES, attn_implementation="sdpa",
               **extra):
    """A random-weight Gemma 3 text model (hybrid attention): sliding-window layers of ``window`` tokens
    (rotary base 10K) around three global layers (base 1M), the first and last layers sliding; q/k
    norms, (1 + w) RMSNorms, gelu-tanh MLP, a query scalar other than the head size."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=window, layer_types=list(layer_types), max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}, **extra,
    )
    config._attn_implementation = attn_implementation
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at w = 0, i.e. a scale of 1: give them weights so that (1 + w) shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(0.3 * torch.randn_like(parameter))
    return model
