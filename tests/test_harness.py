"""The harness end to end: streaming PPL, records, the CLI, tracking, errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lacache.baselines.full import FullCachePolicy
from lacache.harness.records import load_records
from lacache.tasks.base import RunContext
from lacache.tasks.ppl import PerplexityTask

ROOT = Path(__file__).resolve().parent.parent


class ByteTokenizer:
    """Bytes as token ids: enough for a random-weight model."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[b % self.vocab for b in text.encode()]])
        return type("Encoding", (), {"input_ids": ids})()


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_streaming_full_cache_ppl_equals_one_forward_pass(tiny_model, tmp_path, chunk):
    text = tmp_path / "text.txt"
    text.write_text("The ladder cache keeps a few tokens per layer. " * 20)
    task = PerplexityTask(dataset="text_file", path=str(text), num_tokens=300, window=64, chunk=chunk)
    tokenizer = ByteTokenizer(128)
    result = task.run(RunContext(tiny_model, tokenizer, FullCachePolicy(), tiny_model.config, 4096, progress=False))
    ids = tokenizer(text.read_text()).input_ids[:, :300]
    with torch.inference_mode():
        loss = tiny_model(ids, labels=ids).loss.item()
    assert result.metrics["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert [w["end"] for w in result.curves["ppl_window"]] == [64, 128, 192, 256, 299]


def run_cli(*args, env=None, timeout=900):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "run.py", "progress=false", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=environment)


@pytest.mark.slow
def test_cli_ppl_on_smollm2_writes_a_record(tmp_path):
    result = run_cli("task=ppl", "cache=full", "task.num_tokens=512", f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (record_file,) = (tmp_path / "records").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "ok" and record["ids"]["model"] == "smollm2-135m"
    assert 5 < record["metrics"]["ppl"] < 60
    assert record["curves"]["ppl_window"][0]["end"] == 511
    assert record["stats"]["tokens_per_s"] > 0 and record["stats"]["peak_rss_bytes"] > 0
    assert record["env"]["packages"]["torch"] and record["seed"] == 0
    assert "ppl=" in result.stdout
    frame = load_records(tmp_path)
    assert len(frame) == 1 and frame.loc[0, "policy"] == "full" and frame.loc[0, "metrics.ppl"] == record["metrics"]["ppl"]
    again = run_cli("task=ppl", "cache=full", "task.num_tokens=512", f"runs_dir={tmp_path}")
    assert "already done" in again.stdout


@pytest.mark.parametrize("group, valid", [("cache", ["full", "lacache", "streamingllm", "h2o"]), ("task", ["ppl", "ruler", "longbench", "niah"])])
def test_unknown_group_choice_names_the_valid_ones(group, valid, tmp_path):
    result = run_cli(f"{group}=nonexistent", f"runs_dir={tmp_path}")
    assert result.returncode != 0
    for name in valid:
        assert name in result.stderr


def test_invalid_lacache_fails_before_loading_the_model(tmp_path):
    result = run_cli("cache=lacache", "cache.span=16", "cache.overlap=16", f"runs_dir={tmp_path}",
                     env={"LACACHE_CACHE": str(tmp_path / "empty-cache")})
    assert result.returncode == 2
    assert "overlap=16 must be < span=16" in result.stderr and "nearest valid: overlap=15" in result.stderr
    assert not (tmp_path / "empty-cache" / "models").exists()  # nothing was converted or loaded


def test_offline_hub_model_names_the_model(tmp_path):
    result = run_cli("model=llama3-8b", f"runs_dir={tmp_path}", env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert "meta-llama/Meta-Llama-3-8B" in result.stderr and "hub is unreachable" in result.stderr


def test_wandb_logger_leaves_an_offline_run_with_metrics(tiny_model_dir, tmp_path):
    result = run_cli("model=llama3-8b", f"model.id={tiny_model_dir}", "model.name=tiny", "model.dtype=float32",
                     "model.device=cpu", "task.num_tokens=64",
                     "task.window=32", "logger=wandb", f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    (record_file,) = (tmp_path / "records").glob("*.json")
    ppl = json.loads(record_file.read_text())["metrics"]["ppl"]
    logged = run_file.read_bytes()  # W&B's offline log: protobuf records holding JSON-encoded values
    assert b"metrics/ppl" in logged and json.dumps(ppl).encode() in logged and b"stats/tokens_per_s" in logged
