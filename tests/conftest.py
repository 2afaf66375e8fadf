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
    logits are ~0.05)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
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
