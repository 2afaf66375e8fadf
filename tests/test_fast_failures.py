"""Predictable faults end in one line and exit 2 before anything heavy runs: no GPU, a hub that does not answer
(no retry storm), a SLURM submission that is refused or impossible; sweeps announce how many points they run
(and stop at once when none can run here); ``LACACHE_RUNS_DIR`` moves the records; the bench announces its
points; a perplexity stream tokenizes only the head of its text, to the same tokens."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_robustness import compose, no_weights  # noqa: F401 (fixtures)

from lacache.harness import bench, runner
from lacache.tasks.ppl import PerplexityTask

ROOT = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last)"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once, as a hub behind no network is


def cli(*args, env=None, path=None, timeout=300):
    """``run.py args`` in a subprocess, offline unless ``env`` says otherwise; stdout + stderr in ``.output``."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    if path is not None:
        environment["PATH"] = path
    result = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=environment)
    result.output = result.stdout + result.stderr
    return result


def one_line_exit_2(result, text):
    assert result.returncode == 2, result.output[-3000:]
    assert TRACEBACK not in result.output, result.output[-3000:]
    (line,) = [line for line in result.output.splitlines() if text in line]
    assert line.startswith("error: "), line
    return line


no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


# ------------------------------------------------------------------------------------------------ no GPU
def test_no_gpu_is_a_config_error_before_the_model_or_the_hub(no_weights, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def load_config(spec):
        raise AssertionError("the model's config was looked up (the hub contacted) before the GPU check")

    monkeypatch.setattr(runner.models, "load_config", load_config)
    with pytest.raises(runner.ConfigError, match="model.device=cuda but no CUDA GPU is visible here"):
        runner.run(compose("model.device=cuda", f"runs_dir={tmp_path}"))


@no_gpu_here
def test_a_gpu_sweep_without_a_gpu_stops_before_launching(tmp_path):
    result = cli("-m", "hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=2", "model.device=cuda", "cache=full,lacache",
                 f"runs_dir={tmp_path}")
    line = one_line_exit_2(result, "no CUDA GPU")
    assert "hydra/launcher=joblib_gpus" in line and "none of the sweep's 2 points can run" in line
    assert not (tmp_path / "records").exists() and not list(tmp_path.rglob("lacache-outcome-*.json"))  # nothing ran


# -------------------------------------------------------------------------------------- unreachable hub
@pytest.mark.parametrize("args, text", [
    (["model=llama3-8b"], "model 'llama3-8b' (meta-llama/Meta-Llama-3-8B) is not in the local Hugging Face cache and the hub is unreachable"),
    (["task.dataset=wikitext2", "task.num_tokens=64"], "dataset 'wikitext2' (wikitext/wikitext-2-raw-v1, split test) is not in the local Hugging Face cache and the hub is unreachable"),
    (["-m", "+experiment=paper_ruler"], "none of the sweep's 14 points can run"),
])
def test_a_hub_that_does_not_answer_fails_at_once_without_retries(args, text, tmp_path):
    """HF_HUB_OFFLINE unset and the hub's address refusing connections: one probe, then offline mode, so the
    lookup answers from the (empty) cache instead of retrying five times (~25 s)."""
    result = cli(*args, f"runs_dir={tmp_path}", env={"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
                                                      "HF_ENDPOINT": UNREACHABLE, "HF_HOME": str(tmp_path / "hf")})
    line = one_line_exit_2(result, text)
    assert f"the hub is unreachable ({UNREACHABLE} does not answer" in line
    assert "Retrying in" not in result.output


# ---------------------------------------------------------------------------------------------- SLURM
@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH whose ``sbatch`` refuses every job as a cluster without GPUs does (and an ``srun``, which submitit
    looks for), in front of the directories that hold bash and python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Invalid generic resource (gres) specification' >&2\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    return os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), "/usr/bin", "/bin"])


def test_a_refused_slurm_submission_is_one_line(fake_slurm, tmp_path):
    result = cli("-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=2", "cache=full,lacache", f"runs_dir={tmp_path}",
                 path=fake_slurm)
    line = one_line_exit_2(result, "could not submit")
    assert "hydra/launcher=slurm could not submit the sweep: sbatch: error: Invalid generic resource" in line
    assert "gpus_per_node" in line  # what to check


# ---------------------------------------------------------------------------------- counts and runs_dir
@pytest.mark.parametrize("args, points", [
    (["cache=lacache", "cache.span=4,8", "cache.overlap=0,2"], 4),
    (["+experiment=paper_ruler_smoke"], 14),  # hydra.sweeper.params: 7 policies x 2 compress modes
])
def test_a_sweep_announces_the_points_it_then_runs(args, points, tmp_path):
    """Every point is skipped at once (threads=0 is invalid), so the summary counts them all without a model."""
    result = cli("-m", *args, "threads=0", env={"LACACHE_RUNS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.output[-3000:]
    assert f"[lacache] sweep of {points} points" in result.stdout
    assert f": 0 ok, {points} skipped, 0 failed, 0 already done" in result.stdout
    assert len(list((tmp_path / "records").glob("*.json"))) == points  # LACACHE_RUNS_DIR took the records


def test_the_bench_announces_its_points_and_runs_every_policy(tmp_path, capsys):
    bench.main(["--model", "tiny-shape", "--contexts", "64", "--budgets", "40", "--span", "4", "--steps", "2", "--decode", "eager", "graph",
                "--runs-dir", str(tmp_path), "--plot", ""])
    out = capsys.readouterr().out
    policies = sorted(path.stem for path in (ROOT / "configs" / "cache").glob("*.yaml"))
    announced = next(line for line in out.splitlines() if line.startswith("[lacache] bench of"))
    rows = [line.split()[:5] for line in out.splitlines() if line.split() and line.split()[0] in policies]
    assert announced.startswith(f"[lacache] bench of {len(rows)} points: {len(policies)} policies")
    assert sorted({row[0] for row in rows}) == policies
    assert len(list((tmp_path / "records").glob("*.json"))) == len(rows)


# ------------------------------------------------------------------------------------------ ppl's head
@pytest.mark.slow
def test_ppl_tokenizes_the_head_of_its_text_to_the_tokens_of_the_whole(smollm2_spec, tmp_path):
    from lacache.assets import essays_text

    tokenizer = runner.load_tokenizer(smollm2_spec)
    texts = {"essays": (essays_text()[:120_000], (2, 100, 1024, 4096)),  # prose: ~4 characters a token
             "digits": ("".join(f"{i * 7919 % 100_003}|" for i in range(6000)), (2, 100, 4096)),  # one character a token
             "rule": ("=" * 20_000, range(2, 400))}  # ~64 characters a token: the head must grow, and is cut inside one
    for name, (text, sizes) in texts.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        whole = tokenizer(text, return_tensors="pt").input_ids[0]
        for n in [n for n in sizes if n < len(whole)] + [len(whole) - 1, len(whole)]:
            ids = PerplexityTask(dataset="text_file", path=str(path), num_tokens=n).tokens(tokenizer)
            assert torch.equal(ids, whole[:n]), (name, n)
        with pytest.raises(Exception, match=f"has only {len(whole)} tokens"):
            PerplexityTask(dataset="text_file", path=str(path), num_tokens=len(whole) + 1).tokens(tokenizer)
