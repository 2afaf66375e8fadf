"""Records and sweeps that never lose, hide or fake a result: damaged and foreign record
files, failed re-runs of finished points, type-checked settings, checks before the model loads,
merges, reports, sweep workers and bench arguments. Tiny random-weight models or none."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweeps import ROOT, cli_env, read_all, summary_line, sweep, text_file, tiny, write  # noqa: F401 (fixtures)

from lacache.harness import bench, records, runner
from lacache.report import tables as report
from lacache.tasks.ppl import PerplexityTask


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture
def point(tiny, tmp_path):
    """The overrides of one tiny ppl point writing into tmp_path (pytest's torch threads kept)."""
    return [o for o in tiny if not o.startswith("threads=")] + [f"runs_dir={tmp_path}"]


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a model's weights load: the errors under test must come before."""
    def load(*args, **kwargs):
        raise AssertionError("the model loaded before the error")

    monkeypatch.setattr(runner.models, "load", load)


def key_of(cfg) -> str:
    return records.config_key(runner.identity(cfg))


# ------------------------------------------------------------------------------------ items 1, 5, 9, 10
def test_sweep_survives_a_corrupt_record_and_skips_bad_types_and_impossible_ladders(tiny, tmp_path):
    # the point (budget 24, span 2) has a truncated record under its key; a garbage file sits beside it;
    # span=abc is a wrong type; budget 0.01 of a 32-token prompt leaves a 1-entry ladder: both skipped
    base = [*tiny, f"runs_dir={tmp_path}", "cache=lacache", "cache.overlap=0"]
    key = key_of(compose(*[o for o in base if not o.startswith("threads=")], "cache.budget=24", "cache.span=2"))
    corrupt = write(tmp_path / "records" / f"{key}.json", '{"key": "' + key + '", "status": "ok", "metr')
    write(tmp_path / "records" / "notes.json", "[1, 2, 3]")
    result = sweep(*base, "cache.budget=24,0.01", "cache.span=2,abc")
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_line(result.stdout) == "1 ok, 3 skipped, 0 failed, 0 already done"
    assert str(corrupt) in result.stderr and (tmp_path / "records" / "quarantine" / f"{key}.json").exists()
    done = read_all(tmp_path)
    assert done[key]["status"] == "ok" and done[key]["metrics"]["ppl"] > 0
    skipped = [r for r in done.values() if r["status"] == "skipped"]
    assert len(skipped) == 3
    assert sum("cache.span='abc' is not a valid int" in r["reason"] for r in skipped) == 2
    (ladder,) = [r for r in skipped if r["config"]["cache"]["span"] == 2]
    assert "budget" in ladder["reason"] and ladder["config"]["cache"]["budget"] == 0.01
    mode = stat.S_IMODE(os.stat(records.record_path(tmp_path, key)).st_mode)  # item 10: not 0600
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_records_are_written_with_the_users_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = records.write_record(tmp_path, {"key": "k", "status": "ok"})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------ items 3, 4
def test_a_failed_rerun_keeps_the_ok_record_and_rerun_no_is_false(point, tmp_path, monkeypatch, capsys):
    cfg = compose(*point)
    first = runner.run(cfg)
    path = records.record_path(tmp_path, first["key"])
    content = path.read_bytes()
    assert runner.run(compose(*point, "rerun=no"))["stats"] == first["stats"]  # "no" is false: already done
    assert "already done" in capsys.readouterr().out

    def crash(self, ctx):
        raise RuntimeError("out of memory (test)")

    monkeypatch.setattr(PerplexityTask, "run", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.run(compose(*point, "rerun=true"))
    assert path.read_bytes() == content  # the metrics are still there
    failure = json.loads(records.failure_path(tmp_path, first["key"]).read_text())
    assert failure["status"] == "failed" and "out of memory" in failure["reason"]
    assert list(records.load_records(tmp_path)["key"]) == [first["key"]]  # failures/ is not a result
    assert len(records.load_records(tmp_path, status=None, failures=True)) == 2


def test_a_record_of_another_config_under_the_points_name_is_not_taken_as_done(point, tmp_path):
    cfg = compose(*point)
    key = key_of(cfg)
    other = runner.identity(compose(*point, "seed=7"))
    write(records.record_path(tmp_path, key), {"key": key, "status": "ok", "identity": other, "metrics": {"ppl": 1.0}})
    record = runner.run(cfg)
    assert record["metrics"]["ppl"] != 1.0 and records.read_record(tmp_path, key)["identity"] == runner.identity(cfg)
    assert json.loads((tmp_path / "records" / "quarantine" / f"{key}.json").read_text())["identity"] == other


# ---------------------------------------------------------------------------------------- items 5, 11
@pytest.mark.parametrize("override, message", [
    ("cache.span=2.5", "cache.span=2.5 is not a valid int"),
    ("cache.span=abc", "cache.span='abc' is not a valid int"),
    ("cache.compact_every=1.5", "cache.compact_every=1.5 is not a valid int"),
    ("task.num_tokens=130.5", "task.num_tokens=130.5 is not a valid int"),
    ("threads=-1", "threads=-1 must be >= 1"),
    ("threads=0", "threads=0 must be >= 1"),
    ("seed=abc", "seed='abc' is not a valid int"),
    ("rerun=maybe", "rerun='maybe' is not a valid bool"),
    ("+cache.foo=1", "unknown setting(s) ['cache.foo']"),
])
def test_wrong_types_and_ranges_are_config_errors_before_the_model_loads(point, no_weights, override, message):
    overrides = [*point, "cache=lacache", "cache.budget=24", "cache.span=2", "cache.overlap=0", override]
    with pytest.raises(runner.ConfigError) as err:
        runner.run(compose(*overrides))
    assert message in str(err.value)
    if "unknown" in message:
        assert "'span'" in str(err.value)  # names the valid keys


def test_an_unknown_key_names_the_valid_ones_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "cache=lacache", "cache.foo=1", f"runs_dir={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cache.foo is not a setting of cache; valid:" in result.stderr and "'span'" in result.stderr


# --------------------------------------------------------------------------------------------- item 6
def test_an_unwritable_records_folder_is_found_before_the_model_loads(point, tmp_path, no_weights):
    write(tmp_path / "blocked" / "records", "a file where the records folder should be")
    with pytest.raises(runner.ConfigError, match="runs_dir=.*blocked.*not writable"):
        runner.run(compose(*point, f"runs_dir={tmp_path / 'blocked'}"))


def test_a_result_that_cannot_be_stored_is_printed(point, monkeypatch, capsys):
    def full_disk(runs_dir, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records, "save", full_disk)
    with pytest.raises(OSError):
        runner.run(compose(*point))
    out = capsys.readouterr()
    assert "ppl=" in out.out and "NOT WRITTEN" in out.out and '"metrics"' in out.err


# --------------------------------------------------------------------------------------- items 2, 7
def test_merge_load_and_report_survive_garbage_and_misnamed_records(tmp_path, capsys):
    a, b, dst = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    ok = {"key": "k1", "status": "ok", "finished": "2025-01-01T00:00:00+00:00", "metrics": {"ppl": 9.0}}
    failed = {"key": "k1", "status": "failed", "finished": "2025-02-01T00:00:00+00:00", "reason": "OOM"}
    write(a / "records" / "k1.json", ok)
    write(b / "records" / "copy-of-k1.json", failed)  # the failed k1 under another name: must not beat a's ok
    garbage = write(b / "records" / "garbage.json", "{not json")
    write(b / "records" / "stray.json", {"hello": "world"})
    write(dst / "records" / "k2.json", "trunc")  # a damaged file in the destination
    write(b / "records" / "k2.json", {**ok, "key": "k2"})
    counts = records.merge([a, b], into=dst)
    out = capsys.readouterr().out
    assert str(garbage) in out and counts["bad_records"] == 2
    assert read_all(dst) == {"k1": ok, "k2": {**ok, "key": "k2"}}
    assert json.loads(records.failure_path(dst, "k1").read_text()) == failed  # kept beside, not instead
    assert (dst / "records" / "quarantine" / "k2.json").read_text() == "trunc"

    frame = records.load_records(b, status=None)
    err = capsys.readouterr().err
    assert str(garbage) in err and str(b / "records" / "copy-of-k1.json") in err  # named, not raised
    assert list(frame["key"]) == ["k2"]
    files = report.render(b, tmp_path / "reports")
    assert (tmp_path / "reports" / "index.md") in files
    cli = subprocess.run([sys.executable, "-m", "lacache.report", "--runs", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "r2")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "missing" in cli.stderr and "Traceback" not in cli.stderr


# --------------------------------------------------------------------------------------------- item 8
def test_niah_keys_do_not_depend_on_runs_dir_and_old_records_still_count(tmp_path, no_weights, capsys):
    niah = ["task=niah", "task.context_lengths=[256]", "task.num_samples=1"]
    here, there = compose(*niah, f"runs_dir={tmp_path}"), compose(*niah, f"runs_dir={tmp_path / 'moved'}")
    assert here.task.artifacts_dir != there.task.artifacts_dir and key_of(here) == key_of(there)
    # a record written before artifacts_dir left the identity: found under its old key, not recomputed
    full = runner._identity_config(here)
    old = {"key": records.legacy_key(full), "status": "ok", "identity": full, "metrics": {"acc": 1.0}}
    write(records.record_path(tmp_path, old["key"]), old)
    assert runner.run(here) == old and "already done" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"too short", "has only"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
    ("caf\u00e9 au lait ".encode("latin-1") * 20, "not UTF-8 text"),
    (b"text\x00with a NUL " * 20, "binary file"),
])
def test_bad_text_files_are_config_errors_naming_the_file_before_the_model_loads(point, tmp_path, no_weights, content,
                                                                              message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(runner.ConfigError) as err:
        runner.run(compose(*point, f"task.path={bad}"))
    assert message in str(err.value) and f"task.path='{bad}'" in str(err.value)


def test_an_impossible_ladder_for_a_fractional_budget_fails_before_the_model_loads(point, no_weights):
    with pytest.raises(runner.ConfigError, match="budget"):  # 1% of 32 tokens: 1 entry per layer
        runner.run(compose(*point, "cache=lacache", "cache.budget=0.01", "cache.span=2", "cache.overlap=0"))


# -------------------------------------------------------------------------------------------- item 10
def children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_joblib_workers_stop_when_the_sweeps_process_is_killed(tiny, tmp_path):
    args = [*tiny, f"runs_dir={tmp_path}", "task._target_=sweep_tasks.ExplodingPerplexity", "+task.pause_s=60",
            "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "run.py", "-m", *args], cwd=ROOT, env=cli_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    workers = []
    try:
        deadline = time.monotonic() + 240
        while log.read_text().count("[sweep_tasks] pausing") < 2:  # both workers are inside their points
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), f"workers {workers} outlived the sweep"
        assert not records.record_files(tmp_path)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_sweeps_in_one_folder_count_only_their_own_points(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {}, "overrides": {"task": []},  # all the
                                      "runtime": {"choices": {"hydra/launcher": "slurm"}}}})  # callback reads
    monkeypatch.setenv(runner.SWEEP_ID, "")  # restored afterwards: on_multirun_start sets both
    monkeypatch.setenv(runner.SWEEP_PID, "")
    ours, theirs = runner.SweepSummary(), runner.SweepSummary()
    ours.on_multirun_start(cfg)
    mine = os.environ[runner.SWEEP_ID]
    runner.write_note(tmp_path / "0", {"outcome": "ok", "key": "a", "reason": None, "overrides": ["seed=0"]})
    theirs.on_multirun_start(cfg)  # a second sweep into the same folder: its point 0 lands in the same job folder
    runner.write_note(tmp_path / "0", {"outcome": "failed", "key": "b", "reason": "boom", "overrides": ["seed=1"]})
    monkeypatch.setenv(runner.SWEEP_ID, mine)
    ours.on_multirun_end(cfg)  # no SystemExit: the other sweep's failure is not ours
    assert summary_line(capsys.readouterr().out) == "1 ok, 0 skipped, 0 failed, 0 already done"


# -------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("argv, message", [
    (["--span", "40"], "span=40 must be < num_layers"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--contexts", "0"], "--contexts 0: every value must be >= 1"),
    (["--budgets", "0"], "--budgets 0: every value must be >= 1"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--model", "nonexistent"], "--model='nonexistent' is not a config"),
    (["--policies", "nope"], "unknown ['nope']"),
])
def test_bench_validates_its_arguments_before_anything_loads(argv, message, tmp_path, monkeypatch, capsys):
    def load(args):
        raise AssertionError("the model loaded before the error")

    monkeypatch.setattr(bench, "load_model", load)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--model", "tiny-shape", "--runs-dir", str(tmp_path), *argv])  # the later --model wins
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_gzipped_records_are_read_and_merged_like_plain_ones(tmp_path, capsys):
    """docs/data keeps records gzipped (<key>.json.gz): they load, merge into plain files, and a damaged
    or misnamed one is reported like a damaged plain file."""
    import gzip

    src, dst = tmp_path / "src", tmp_path / "dst"
    ok = {"key": "k1", "status": "ok", "finished": "2025-01-01T00:00:00+00:00", "metrics": {"ppl": 9.0}}
    (src / "records").mkdir(parents=True)
    (src / "records" / "k1.json.gz").write_bytes(gzip.compress(json.dumps(ok).encode()))
    (src / "records" / "k9.json.gz").write_bytes(gzip.compress(json.dumps(ok).encode()))  # k1 under k9's name
    (src / "records" / "k3.json.gz").write_bytes(b"not gzip")
    frame = records.load_records(src, status=None)
    err = capsys.readouterr().err
    assert list(frame["key"]) == ["k1"] and "k3.json.gz: not a readable JSON record" in err and "k9.json.gz" in err
    records.merge([src], into=dst)
    assert read_all(dst) == {"k1": ok} and (dst / "records" / "k1.json").is_file()


def test_code_digest_names_the_sources_that_ran(tmp_path):
    """A record's env carries a digest of the harness's sources, which changes with any edit (git_commit alone
    did not: a device machine's copy kept a stale .git)."""
    for folder in records.CODE_FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text(f"x = '{folder}'\n")
    first = records.code_digest(tmp_path)
    assert first == records.code_digest(tmp_path) and len(first) == 16
    (tmp_path / "tasks" / "a.py").write_text("x = 'edited'\n")
    assert records.code_digest(tmp_path) != first
    assert records.environment()["code_digest"] == records.code_digest(ROOT)
