"""Models loaded once per sweep process (models.load(reuse=True)) and random-weight models (source=random)."""

import pytest
import torch

from lacache import models

SHAPE = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024)


def random_spec(tokenizer_dir, name="random", **extra):
    return models.ModelSpec(name=name, source="random", tokenizer=str(tokenizer_dir), config=dict(SHAPE, **extra))


def test_random_source_builds_the_configured_shape_with_the_given_tokenizer(tiny_model_dir):
    first, tokenizer = models.load(random_spec(tiny_model_dir))
    second, _ = models.load(random_spec(tiny_model_dir))
    assert first is not second and first.config.num_hidden_layers == 2 and first.config.vocab_size == 300
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))  # weights: a function of the spec
    assert tokenizer.encode("hello") and models.load_config(random_spec(tiny_model_dir)).hidden_size == 64
    with pytest.raises(ValueError, match="source=random needs `config`"):
        models.ModelSpec(name="random", source="random", tokenizer=str(tiny_model_dir))


def test_reuse_loads_each_spec_once_and_holds_one_model(tiny_model_dir, monkeypatch):
    loads = []
    real = models._load
    monkeypatch.setattr(models, "_load", lambda spec: loads.append(spec.name) or real(spec))
    a, b = random_spec(tiny_model_dir, "a"), random_spec(tiny_model_dir, "b")
    model, _ = models.load(a, reuse=True)
    model.config._attn_implementation = "eager"  # a point may switch it; the next one gets the model as loaded
    again, _ = models.load(a, reuse=True)
    assert again is model and again.config._attn_implementation == "sdpa"
    models.load(b, reuse=True)
    held, _ = models.load(a, reuse=True)
    assert loads == ["a", "b", "a"] and len(models._LOADED) == 1
    assert models.load(a)[0] is not held  # reuse=False always loads
    assert loads == ["a", "b", "a", "a"]


def test_each_worker_claims_its_own_gpu(tmp_path):
    """Lock files per GPU: a second claimant (another worker's open file) gets the next GPU, and when
    every GPU is held the claim fails naming n_jobs; a released claim is taken again."""
    first, second = models._claim(tmp_path, 2), models._claim(tmp_path, 2)
    assert (first[0], second[0]) == (0, 1)
    with pytest.raises(RuntimeError, match="n_jobs <= 2"):
        models._claim(tmp_path, 2)
    first[1].close()  # the worker exited
    assert models._claim(tmp_path, 2)[0] == 0


def test_joblib_gpus_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parent.parent / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=4"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 4
    assert str(cfg.hydra.launcher.batch_size) == "1"  # the plugin turns it into an int


def test_several_workers_share_each_gpu_in_turn(tmp_path):
    """workers_per_gpu=2 on 2 GPUs: claims go 0, 1, 0, 1, then the fifth fails naming n_jobs <= 4."""
    held = [models._claim(tmp_path, 2, per_gpu=2) for _ in range(4)]
    assert [gpu for gpu, _ in held] == [0, 1, 0, 1]
    with pytest.raises(RuntimeError, match="n_jobs <= 4"):
        models._claim(tmp_path, 2, per_gpu=2)
