"""lacache as a library: the public names, model.generate with every policy's cache (same tokens as
the harness's loop; padded batches and second turns refused or continued correctly), the library
examples of the README and docs/USAGE.md, and the wheel (installed without -e, its `lacache` command on a tiny ppl job)."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_tasks import LetterTokenizer
from transformers import DynamicCache

import lacache
from lacache import UnsupportedInputError, cache_kwarg, make_policy
from lacache.tasks import generation as gen

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted(p.stem for p in (ROOT / "configs" / "cache").glob("*.yaml"))
SETTINGS = {"lacache": {"span": 2, "overlap": 0}, "lacache_reference": {"span": 2, "overlap": 0}, "snapkv": {"window": 8},
            "pyramidkv": {"window": 8}}
PROMPT, NEW = 60, 16


@pytest.fixture(scope="module")
def model():
    """Sharp attention and a short RoPE period: unlike a default tiny model, its tokens change when a
    position is off by a few, so a wrong position in generate() shows."""
    return tiny_llama(layers=4, initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 50.0})


def policy(name, **extra):
    return make_policy(name, **{"budget": 24, **SETTINGS.get(name, {}), **extra})


def prompt(rows=1, length=PROMPT, seed=1):
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def hf_generate(model, ids, cache, steps=NEW, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=steps, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1] :]


def test_public_names_are_the_policy_classes():
    for path in (ROOT / "configs" / "cache").glob("*.yaml"):
        target = re.search(r"_target_:\s*(\S+)", path.read_text()).group(1)
        module, _, cls = target.rpartition(".")
        assert getattr(lacache, cls.removesuffix("Policy")) is getattr(__import__(module, fromlist=[cls]), cls)
    from lacache import H2O, FullCache, LaCache, StreamingLLM  # noqa: F401 - the names the README uses
    assert isinstance(make_policy("lacache", budget=64), LaCache)
    with pytest.raises(ValueError, match=r"unknown cache config 'nope'; valid: \[.*'streamingllm'"):
        make_policy("nope")
    with pytest.raises(AttributeError):
        lacache.NoSuchPolicy  # noqa: B018


@pytest.mark.parametrize("name", POLICIES)
def test_model_generate_gives_the_harness_tokens(model, name):
    ids = prompt()
    cache = policy(name).make_cache(model, prompt_length=PROMPT)
    got = hf_generate(model, ids, cache)[0].tolist()
    want = gen.generate(model, LetterTokenizer(), policy(name), ids[0], NEW, eos_ids=()).token_ids
    assert got == want


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_model_generate_gives_the_harness_tokens_on_other_architectures(arch):
    import transformers

    config = getattr(transformers, f"{arch}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 50.0})
    torch.manual_seed(0)
    other = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    ids = prompt()
    for name in ("streamingllm", "lacache"):
        got = hf_generate(other, ids, policy(name).make_cache(other, prompt_length=PROMPT))[0].tolist()
        assert got == gen.generate(other, LetterTokenizer(), policy(name), ids[0], NEW, eos_ids=()).token_ids, name


@pytest.mark.parametrize("name", POLICIES)
def test_padded_batch_is_refused_by_compressing_caches(model, name):
    ids = prompt(rows=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # the second prompt is left-padded
    cache = policy(name).make_cache(model, prompt_length=PROMPT)
    if isinstance(cache, DynamicCache):  # the full cache (transformers' own) handles padding
        assert hf_generate(model, ids, cache, steps=2, mask=mask).shape == (2, 2)
        return
    with pytest.raises(UnsupportedInputError, match="padded batch"):
        hf_generate(model, ids, cache, steps=2, mask=mask)


@pytest.mark.parametrize("name", POLICIES)
def test_second_turn_continues_correctly_or_is_refused(model, name):
    """A second generate() on the same cache either gives the tokens of one uninterrupted stream
    (turn 1, its answer, turn 2) or raises; never other tokens."""
    first, more = prompt(), prompt(length=8, seed=2)
    cache = policy(name).make_cache(model, prompt_length=PROMPT)
    answer = hf_generate(model, first, cache, steps=4)
    conversation = torch.cat([first, answer, more], dim=1)
    try:
        got = hf_generate(model, conversation, cache, steps=4)[0].tolist()
    except UnsupportedInputError as err:  # position-shift caches: generate() would re-feed tokens
        assert "second generate() turn" in str(err)
        assert getattr(cache, "position_mode", "shift") == "shift"
        return
    except ValueError as err:  # the cache's own refusal (layers of different lengths)
        assert "one causal mask cannot serve a multi-token forward" in str(err)
        return
    stream = policy(name).make_cache(model, prompt_length=PROMPT)  # the same tokens, fed as the harness would
    want = []
    with torch.inference_mode():
        model(first, **cache_kwarg(model, stream))
        for token in answer[0, :-1]:
            model(token.view(1, 1), **cache_kwarg(model, stream))
        logits = model(torch.cat([answer[:, -1:], more], dim=1), **cache_kwarg(model, stream)).logits
        for _ in range(4):
            want.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[want[-1]]]), **cache_kwarg(model, stream)).logits
    assert got == want


def test_foreign_positions_are_refused(model):
    cache = policy("streamingllm").make_cache(model, prompt_length=PROMPT)
    with pytest.raises(UnsupportedInputError, match="places positions itself"):
        model(prompt(), position_ids=torch.arange(PROMPT)[None] * 2, **cache_kwarg(model, cache))
    with pytest.raises(UnsupportedInputError, match="continues from token 7, but SinkWindowCache has been fed 0"):
        model(prompt(), position_ids=torch.arange(PROMPT)[None] + 7, **cache_kwarg(model, cache))


def test_api_generate_compresses_the_context_or_the_prompt(model):
    context, question = prompt()[0], prompt(length=10, seed=3)[0]
    for compress in ("prompt", "context"):
        out = lacache.generate(model, LetterTokenizer(), policy("streamingllm"), context, question, max_new_tokens=6,
                               compress=compress, eos_ids=())
        want = gen.generate(model, LetterTokenizer(), policy("streamingllm"), torch.cat([context, question]), 6, eos_ids=(),
                            context_tokens=PROMPT if compress == "context" else None)
        assert out.token_ids == want.token_ids and out.context_tokens == want.context_tokens
    with pytest.raises(ValueError, match=r"compress='question' is not one of \('prompt', 'context'\)"):
        lacache.generate(model, LetterTokenizer(), policy("full"), context, question, compress="question")


def python_block(document: str, heading: str) -> str:
    """The first ```python block under the Markdown heading line ``heading`` of ``document``."""
    section = (ROOT / document).read_text().split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_usage_library_example_runs_and_matches_the_harness():
    scope: dict = {}
    exec(compile(python_block("docs/USAGE.md", "## Library"), "docs/USAGE.md", "exec"), scope)
    answer, generated, looped = scope["answer"], scope["generated"], scope["looped"]
    assert answer.token_ids and generated[: len(answer.token_ids)] == answer.token_ids
    assert looped == generated[: len(looped)]
    assert scope["ids"].shape[1] > 600 and scope["cache"].get_seq_length() <= scope["policy"].budget  # it compressed


@pytest.mark.slow
def test_readme_library_example_generates_the_harness_answer():
    from lacache.assets import essays_text

    scope: dict = {}
    exec(compile(python_block("README.md", "### As a library"), "README.md", "exec"), scope)
    ids, cache, policy = scope["ids"], scope["cache"], scope["policy"]
    assert ids.shape[1] > 600 and cache.get_seq_length() <= policy.budget  # it compressed
    answer = lacache.generate(scope["model"], scope["tokenizer"], policy, essays_text()[:3000],
                              "\n\nIn short, the essay argues that", max_new_tokens=24, chat_template=False)
    generated = scope["out"][0, ids.shape[1]:].tolist()
    assert answer.token_ids and generated[: len(answer.token_ids)] == answer.token_ids


def test_wheel_installs_only_lacache_and_its_command_runs(tiny_model_dir, tmp_path):
    """Build the wheel from a copy of the tree, install it (no -e) into a fresh venv that sees this
    venv's packages (torch, transformers, ...) through a .pth line, run `lacache` outside the repo."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "reports", "notebooks", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lacache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"lacache", "hydra_plugins", wheel.name.split("-py3")[0] + ".dist-info"}
    assert {name.split("/")[1] for name in names if name.startswith("hydra_plugins/")} == {"lacache_slurm"}  # the launcher
    assert "lacache/configs/cache/lacache.yaml" in names and "lacache/tasks/ppl.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    linked = [p for p in sys.path if p.endswith("site-packages")]  # this venv's (and those it links, e.g. make test-compat's)
    Path(site, "project-venv.pth").write_text("\n".join(linked) + "\n")  # plain paths: their .pth files (the -e lacache) stay off
    subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONPATH": ""}
    where = subprocess.run([python, "-c", "import lacache, lacache.tasks.ppl as p; print(lacache.__file__, p.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env=env)
    assert where.stdout.split() == [f"{site}/lacache/__init__.py", f"{site}/lacache/tasks/ppl.py"], where.stderr
    text = tmp_path / "text.txt"
    text.write_text("A ladder keeps a few tokens per layer. " * 30)
    run = subprocess.run([venv / "bin" / "lacache", "model=llama3-8b", f"model.id={tiny_model_dir}", "model.name=tiny",
                          "model.dtype=float32", "model.device=cpu", "cache=lacache", "cache.budget=16", "cache.span=2",
                          "task=ppl", "task.dataset=text_file", f"task.path={text}", "task.num_tokens=32", "task.window=16",
                          "progress=false", "threads=1", f"runs_dir={tmp_path / 'runs'}"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "policy=lacache" in run.stdout and "ppl=" in run.stdout
    assert len(list((tmp_path / "runs" / "records").glob("*.json"))) == 1
    no_slurm = {**env, "PATH": os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])}  # hydra/launcher=slurm, installed
    slurm = subprocess.run([venv / "bin" / "lacache", "-m", "hydra/launcher=slurm", "cache=full,lacache",
                            f"runs_dir={tmp_path / 'runs'}"], cwd=tmp_path, capture_output=True, text=True, env=no_slurm,
                           timeout=300)
    assert slurm.returncode == 2 and "hydra/launcher=slurm could not submit the sweep" in slurm.stderr, slurm.stderr[-3000:]


def test_ppl_progress_bar_shows_the_current_ppl(tiny_model, tmp_path, capsys):
    from test_harness import ByteTokenizer

    from lacache.tasks.base import RunContext
    from lacache.tasks.ppl import PerplexityTask

    text = tmp_path / "text.txt"
    text.write_text("The ladder cache keeps a few tokens per layer. " * 5)
    task = PerplexityTask(dataset="text_file", path=str(text), num_tokens=120, window=64)
    result = task.run(RunContext(tiny_model, ByteTokenizer(128), policy("streamingllm"), tiny_model.config, 4096, progress=True))
    shown = re.findall(r"ppl=([0-9.]+)", capsys.readouterr().err)
    assert shown and shown[-1] == f"{result.metrics['ppl']:.2f}"  # the last value drawn is the final PPL, not a stale one


class RecordingLogger:
    """A tracker that remembers what it was given (``logger._target_=test_library.RecordingLogger``)."""

    logged: list = []

    def log_run(self, record, artifacts):
        RecordingLogger.logged.append(record["key"])


def test_a_logger_added_on_a_finished_point_logs_its_record(tiny_model_dir, tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from lacache.harness import runner

    text = tmp_path / "text.txt"
    text.write_text("A ladder keeps a few tokens per layer. " * 30)
    overrides = ["model=llama3-8b", f"model.id={tiny_model_dir}", "model.name=tiny", "model.dtype=float32", "model.device=cpu",
                 "task.dataset=text_file", f"task.path={text}", "task.num_tokens=32", "progress=false", f"runs_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        first = runner.run(compose("config", overrides=overrides))
        again = runner.run(compose("config", overrides=[*overrides, "+logger._target_=test_library.RecordingLogger"]))
    assert again["key"] == first["key"] and "already done" in capsys.readouterr().out
    assert RecordingLogger.logged == [first["key"]]
