"""Sweeps (Hydra multirun) on a tiny random-weight Llama: resuming a killed sweep, skipped and failed
points and the exit code, the joblib launcher, W&B groups, merging runs/ folders, device_map."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lacache.harness import records
from lacache.harness.tracking import sweep_group

ROOT = Path(__file__).resolve().parent.parent
TEST_TASK = "task._target_=sweep_tasks.ExplodingPerplexity"  # tests/sweep_tasks.py, importable via PYTHONPATH


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The ladder cache keeps a few tokens per layer and compacts them as it goes. " * 40)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, text_file):
    """Overrides that run the tiny hub-style checkpoint on a short local text, fast."""
    return ["progress=false", "threads=1", "model=llama3-8b", f"model.id={tiny_model_dir}", "model.name=tiny",
            "model.dtype=float32", "model.device=cpu", "task=ppl", "task.dataset=text_file", f"task.path={text_file}",
            "task.num_tokens=32", "task.window=16"]


def cli_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


def sweep(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def read_all(runs_dir) -> dict[str, dict]:
    return {rec["key"]: rec for rec in records.iter_records(runs_dir)}


def summary_line(stdout: str) -> str:
    (line,) = re.findall(r"\[lacache\] sweep .*: \d+ ok, \d+ skipped, \d+ failed, \d+ already done", stdout)
    return line.split(": ", 1)[1]


def test_killed_sweep_resumes_only_the_missing_points(tiny, tmp_path):
    # 4 points; each pauses 1 s before its work, so a kill right after the first record lands between points
    args = [*tiny, f"runs_dir={tmp_path}", TEST_TASK, "+task.pause_s=1.0", "seed=0,1,2,3"]
    log = tmp_path / "killed-sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "run.py", "-m", *args], cwd=ROOT, env=cli_env(), start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not records.record_files(tmp_path):
            assert proc.poll() is None, f"the sweep ended before writing a record: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no record within 120 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {path.name: path.read_bytes() for path in records.record_files(tmp_path)}
    assert 1 <= len(before) < 4, "the kill did not land inside the sweep"

    again = sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("[lacache] already done") == len(before)
    assert summary_line(again.stdout) == f"{4 - len(before)} ok, 0 skipped, 0 failed, {len(before)} already done"
    for name, content in before.items():  # finished points untouched: same bytes, same `finished` time
        assert (tmp_path / "records" / name).read_bytes() == content
    done = read_all(tmp_path)
    assert len(done) == 4 and {r["status"] for r in done.values()} == {"ok"}
    assert sorted(r["seed"] for r in done.values()) == [0, 1, 2, 3]


def test_skipped_and_failed_points_are_recorded_and_the_exit_code_counts_failures(tiny, tmp_path):
    # lacache span=2 on the 4-layer model: overlap=2 is invalid (overlap >= span) -> skipped;
    # explode=true raises RuntimeError inside the task -> failed; the sweep goes on either way
    result = sweep(*tiny, f"runs_dir={tmp_path}", "cache=lacache", "cache.budget=24", "cache.span=2",
                   "cache.overlap=0,1,2", TEST_TASK, "+task.explode=false,true")
    assert result.returncode == 2, result.stderr[-3000:]  # two failed points
    assert summary_line(result.stdout) == "2 ok, 2 skipped, 2 failed, 0 already done"
    done = read_all(tmp_path).values()
    by_status = {s: [r for r in done if r["status"] == s] for s in ("ok", "skipped", "failed")}
    assert [len(by_status[s]) for s in ("ok", "skipped", "failed")] == [2, 2, 2]
    assert all(r["config"]["cache"]["overlap"] == 2 and "overlap=2 must be < span=2" in r["reason"] for r in by_status["skipped"])
    assert sorted(r["config"]["cache"]["overlap"] for r in by_status["failed"]) == [0, 1]
    assert all(r["reason"] == "RuntimeError: exploded on purpose (test task)" and "Traceback" in r["traceback"]
               for r in by_status["failed"])
    assert all(not r["config"]["task"]["explode"] and r["metrics"]["ppl"] > 0 for r in by_status["ok"])
    assert len({r["sweep"] for r in done}) == 1
    assert "failed: cache.overlap=0 +task.explode=True: RuntimeError" in result.stderr  # names the failed points


def wandb_run_groups(path: Path) -> list[str]:
    """The group of each run record in a W&B offline ``.wandb`` file (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, groups = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "run":
                groups.append(record.run.run_group)
    return groups


def test_joblib_sweep_runs_points_in_parallel_and_wandb_groups_them(tiny, tmp_path):
    result = sweep(*tiny, f"runs_dir={tmp_path}", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "logger=wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel" in result.stdout
    assert summary_line(result.stdout) == "2 ok, 0 skipped, 0 failed, 0 already done"  # counted across processes
    done = read_all(tmp_path)
    assert len(done) == 2 and {r["status"] for r in done.values()} == {"ok"}
    (sweep_dir,) = {r["sweep"] for r in done.values()}
    run_files = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    expected = "sweep-" + "_".join(Path(sweep_dir).relative_to(tmp_path / ".hydra" / "multirun").parts)
    assert [wandb_run_groups(path) for path in run_files] == [[expected], [expected]]


def test_a_setting_of_a_swept_cache_reaches_every_point(tiny, tmp_path):
    """``cache=streamingllm,h2o cache.budget=12``: Hydra sets a sweep up on the default cache (the full
    cache, which has no budget) and would reject the line; the command line passes it as ++cache.budget."""
    result = sweep(*tiny, f"runs_dir={tmp_path}", "cache=streamingllm,h2o", "cache.budget=12", "cache.decode=exact")
    assert result.returncode == 0, result.stderr[-3000:]
    done = read_all(tmp_path)
    assert sorted((r["identity"]["cache"]["_target_"].rpartition(".")[2], r["identity"]["cache"]["budget"])
                  for r in done.values()) == [("H2OPolicy", 12), ("StreamingLLMPolicy", 12)]


def test_only_settings_of_swept_groups_are_rewritten():
    from lacache.harness.cli import swept_group_settings

    assert swept_group_settings(["-m", "cache=h2o,tova", "cache.budget=256", "task.context_length=8192", "seed=0,1"]) == \
        ["-m", "cache=h2o,tova", "++cache.budget=256", "task.context_length=8192", "seed=0,1"]
    unchanged = [["cache=h2o", "cache.budget=256"],  # not a sweep
                 ["-m", "cache=h2o", "cache.budget=128,256"],  # the group is not swept
                 ["-m", "cache=h2o,tova", "+cache.foo=1", "~cache.sink"]]  # explicit prefixes stay as written
    assert all(swept_group_settings(argv) == argv for argv in unchanged)


def test_sweep_group_names():
    assert sweep_group(None) is None  # a single run: no group
    assert sweep_group("runs/.hydra/multirun/2025-06-01/12-00-00", "runs") == "sweep-2025-06-01_12-00-00"
    assert sweep_group("/scratch/me/runs/sweeps/ruler-grid", "runs") == "ruler-grid"
    assert len(sweep_group("x/" + "a" * 300, "runs")) == 128


def test_rerun_true_recomputes_a_finished_point(tiny, tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from lacache.harness.runner import run

    overrides = [o for o in tiny if not o.startswith("threads=")] + [f"runs_dir={tmp_path}"]  # keep pytest's threads
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg, rerun = compose("config", overrides=overrides), compose("config", overrides=[*overrides, "rerun=true"])
    first = run(cfg)
    assert run(cfg) == first and "already done" in capsys.readouterr().out
    third = run(rerun)
    assert "already done" not in capsys.readouterr().out
    assert third["key"] == first["key"] and third["stats"]["total_s"] != first["stats"]["total_s"]
    assert records.read_record(tmp_path, first["key"])["stats"] == third["stats"]


def write(path: Path, record: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def test_merge_prefers_ok_records_and_never_overwrites_other_files(tmp_path, capsys):
    a, b, dst = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    ok = {"key": "k1", "status": "ok", "finished": "2025-01-01T00:00:00+00:00", "metrics": {"ppl": 9.0}}
    failed = {"key": "k1", "status": "failed", "finished": "2025-02-01T00:00:00+00:00", "reason": "OOM"}
    write(a / "records" / "k1.json", ok)
    write(b / "records" / "k1.json", failed)  # same config failed later on machine b: must not replace a's ok
    write(b / "records" / "k2.json", {**failed, "key": "k2"})
    write(b / "records" / ".tmp-x.partial", "{trunc")  # a write killed half-way
    write(a / "artifacts" / "niah.png", "A")
    write(b / "artifacts" / "niah.png", "B")  # same name, different content: kept as is and reported
    write(b / "wandb" / "wandb" / "offline-run-1-abc" / "run-abc.wandb", "run")
    (b / "wandb" / "wandb" / "latest-run").symlink_to("offline-run-1-abc")
    counts = records.merge([a, b], into=dst)
    assert read_all(dst) == {"k1": ok, "k2": {**failed, "key": "k2"}}
    assert (dst / "artifacts" / "niah.png").read_text() == "A" and counts["clashes"] == 1
    assert (dst / "wandb" / "wandb" / "offline-run-1-abc" / "run-abc.wandb").exists()
    assert not (dst / "wandb" / "wandb" / "latest-run").exists() and not list((dst / "records").glob(".tmp*"))
    write(b / "records" / "k2.json", {**ok, "key": "k2"})  # b later finished k2: ok replaces failed
    again = records.merge([b], into=dst)
    assert read_all(dst)["k2"]["status"] == "ok" and again["records_replaced"] == 1
    assert "1 clashes" in capsys.readouterr().out
    cli = subprocess.run([sys.executable, "-m", "lacache.harness.records", "merge", str(a), str(b), "--into", str(dst)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "3 records kept" in cli.stdout, cli.stderr[-2000:]


def test_device_map_is_validated_and_passed_to_from_pretrained(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lacache import models

    with pytest.raises(ValueError, match="device_map='everywhere'"):
        models.ModelSpec(name="tiny", id=str(tiny_model_dir), device_map="everywhere")
    seen, original = [], AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    for spec, expected in [({}, None), ({"device_map": {"": "cpu"}}, {"": "cpu"}), ({"device": "auto"}, "auto")]:
        model, _ = models.load(models.ModelSpec(name="tiny", id=str(tiny_model_dir), **spec))
        assert seen.pop() == expected and models.input_device(model).type == "cpu"


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0 and launcher.mem_gb > 0
