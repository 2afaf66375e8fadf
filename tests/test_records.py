"""Run records as a user relies on them: one key per configuration (what identifies a result, nothing else),
files that are never half-written, never lost and never taken for another configuration's, merges of
runs/ folders from several machines, and the provenance a record carries. No model: plain files."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lacache.harness import records

CONFIG = {"model": {"name": "tiny"}, "cache": {"policy": "lacache", "budget": 64}, "task": {"name": "ppl", "num_tokens": 128},
          "seed": 0, "runs_dir": "runs", "threads": 2}


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def ok(key="k1", **extra):
    return {"key": key, "status": "ok", "finished": "2025-01-01T00:00:00", **extra}


# ---------------------------------------------------------------------------------------------- identity and keys
def test_the_key_is_a_hash_of_model_cache_task_and_seed_only():
    ident = records.identity(CONFIG)
    assert ident == {"model": {"name": "tiny"}, "cache": {"policy": "lacache", "budget": 64},
                     "task": {"name": "ppl", "num_tokens": 128}, "seed": 0}
    blob = json.dumps(ident, sort_keys=True)
    assert records.config_key(ident) == hashlib.sha256(blob.encode()).hexdigest()[:20]
    moved = {**CONFIG, "runs_dir": "elsewhere", "threads": 8}  # where and how fast it runs: the same result
    assert records.config_key(records.identity(moved)) == records.config_key(ident)
    for change in ({"seed": 1}, {"cache": {"policy": "lacache", "budget": 32}}, {"model": {"name": "other"}},
                   {"task": {"name": "ppl", "num_tokens": 256}}):
        assert records.config_key(records.identity({**CONFIG, **change})) != records.config_key(ident)


def test_output_folders_and_later_defaults_leave_the_key_alone():
    """A task's artifacts_dir is where it writes, and batch_size=1 is what records written before batch_size
    existed ran with: neither changes the key; batch_size=8 does."""
    base = records.config_key(records.identity(CONFIG))
    task = {"name": "ppl", "num_tokens": 128}
    for extra in ({"artifacts_dir": "/tmp/a"}, {"batch_size": 1}, {"artifacts_dir": "x", "batch_size": 1}):
        assert records.config_key(records.identity({**CONFIG, "task": {**task, **extra}})) == base
    eight = records.identity({**CONFIG, "task": {**task, "batch_size": 8, "artifacts_dir": "x"}})
    assert eight["task"] == {**task, "batch_size": 8} and records.config_key(eight) != base
    legacy = {**CONFIG, "task": {**task, "artifacts_dir": "x"}}  # records from before: the folder was in the key
    assert records.legacy_key(legacy) == records.config_key({k: legacy[k] for k in ("model", "cache", "task", "seed")})
    assert records.legacy_key(legacy) != base


def test_a_stored_identity_equals_a_freshly_composed_one():
    """JSON-normalised: tuples become lists, paths strings, so a record read back matches its configuration."""
    fresh = records.identity({**CONFIG, "cache": {"budgets": (1, 2), "path": Path("/a/b")}, "seed": None})
    assert fresh["cache"] == {"budgets": [1, 2], "path": "/a/b"} and fresh["seed"] is None
    assert records.identity(json.loads(json.dumps(fresh))) == fresh
    assert records.identity({"model": "m"}) == {"model": "m", "cache": None, "task": None, "seed": None}


# ---------------------------------------------------------------------------------------------- writing and reading
def test_records_are_written_whole_with_the_users_permissions(tmp_path):
    umask = os.umask(0o027)
    try:
        path = records.write_record(tmp_path, ok("abc", metrics={"ppl": np.float32(2.5), "n": torch.tensor(3)},
                                                 path=Path("/x/y")))
    finally:
        os.umask(umask)
    assert path == tmp_path / "records" / "abc.json" == records.record_path(tmp_path, "abc")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert json.loads(path.read_text())["metrics"] == {"ppl": 2.5, "n": 3} and json.loads(path.read_text())["path"] == "/x/y"
    assert os.listdir(path.parent) == ["abc.json"]
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        records.write_record(tmp_path, ok("bad", metrics={"x": object()}))
    assert os.listdir(path.parent) == ["abc.json"]  # no half-written or temporary file left
    failure = records.write_record(tmp_path, ok("abc"), records.failure_path(tmp_path, "abc"))
    assert failure == tmp_path / "records" / "failures" / "abc.json" and failure.is_file()


def test_an_unwritable_records_folder_is_named(tmp_path):
    records.check_writable(tmp_path / "new")
    assert (tmp_path / "new" / "records").is_dir() and not os.listdir(tmp_path / "new" / "records")
    records.check_writable(tmp_path / "new")  # a folder that exists already (every run after the first)
    assert not os.listdir(tmp_path / "new" / "records")
    write(tmp_path / "blocked" / "records", "a file")
    with pytest.raises(OSError, match=f"the records folder {tmp_path / 'blocked' / 'records'} is not writable"):
        records.check_writable(tmp_path / "blocked")


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not a readable JSON record \(JSONDecodeError"),
    ("[1, 2]", "not a lacache record"),
    (json.dumps({"key": "k1"}), "not a lacache record"),
    (json.dumps({"key": "k1", "status": "done"}), "not a lacache record"),
    (json.dumps({"key": "../k1", "status": "ok"}), "not a lacache record"),
    (json.dumps({"key": 7, "status": "ok"}), "not a lacache record"),
    (json.dumps({"key": "k2", "status": "ok"}), "holds the record 'k2' under another name"),
])
def test_a_file_that_is_not_its_record_is_refused_naming_it(tmp_path, content, message):
    path = write(tmp_path / "k1.json", content)
    with pytest.raises(records.BadRecord, match=message) as err:
        records.read_file(path)
    assert str(err.value).startswith(f"{path}: ")


def test_records_are_read_plain_or_gzipped(tmp_path):
    for status in records.STATUSES:
        assert records.read_file(write(tmp_path / f"{status}.json", {"key": status, "status": status}))["status"] == status
    (tmp_path / "z.json.gz").write_bytes(gzip.compress(json.dumps({"key": "z", "status": "ok"}).encode()))
    assert records.read_file(tmp_path / "z.json.gz") == {"key": "z", "status": "ok"}
    assert records.read_file(write(tmp_path / "other.json", ok("k9")), named=False)["key"] == "k9"
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(records.BadRecord, match="not a readable JSON record"):
        records.read_file(tmp_path / "bad.json.gz")


def test_the_record_of_a_point_is_trusted_only_if_it_is_that_points(tmp_path, capsys):
    ident = records.identity(CONFIG)
    key = records.config_key(ident)
    assert records.trusted_record(tmp_path, key, ident) is None and records.read_record(tmp_path, key) is None
    mine = ok(key, identity=ident)
    records.write_record(tmp_path, mine)
    assert records.trusted_record(tmp_path, key, ident) == mine == records.read_record(tmp_path, key)
    assert records.trusted_record(tmp_path, key, {**ident, "seed": 0}) == mine
    other = records.identity({**CONFIG, "seed": 5})
    records.write_record(tmp_path, ok(key, identity=other))
    assert records.trusted_record(tmp_path, key, ident) is None  # another configuration's: moved away, not used
    assert json.loads((tmp_path / "records" / "quarantine" / f"{key}.json").read_text())["identity"] == other
    write(records.record_path(tmp_path, key), "trunc")
    assert records.trusted_record(tmp_path, key, ident) is None
    quarantined = sorted(p.name for p in (tmp_path / "records" / "quarantine").iterdir())
    assert len(quarantined) == 2 and quarantined[1] == f"{key}.json" and quarantined[0].startswith(f"{key}.2")
    err = capsys.readouterr().err
    assert "its stored identity" in err and "not a readable JSON record" in err
    assert not records.record_path(tmp_path, key).exists()


def test_a_failed_rerun_never_replaces_an_ok_record(tmp_path):
    ident = records.identity(CONFIG)
    key = records.config_key(ident)
    first = ok(key, identity=ident, metrics={"ppl": 3.0})
    assert records.save(tmp_path, first) == records.record_path(tmp_path, key)
    failed = {"key": key, "status": "failed", "identity": ident, "reason": "OOM"}
    assert records.save(tmp_path, failed) == records.failure_path(tmp_path, key)
    assert records.read_record(tmp_path, key) == first
    skipped = {**failed, "status": "skipped"}
    records.save(tmp_path, skipped)
    assert records.read_record(tmp_path, key) == first and json.loads(records.failure_path(tmp_path, key).read_text()) == skipped
    again = ok(key, identity=ident, metrics={"ppl": 2.0})
    assert records.save(tmp_path, again) == records.record_path(tmp_path, key)  # an ok re-run (rerun=true) replaces it
    assert records.read_record(tmp_path, key) == again
    other = records.identity({**CONFIG, "seed": 3})
    key3 = records.config_key(other)
    records.save(tmp_path, {"key": key3, "status": "failed", "identity": other})
    records.save(tmp_path, {"key": key3, "status": "skipped", "identity": other})  # no ok record: the latest stands
    assert records.read_record(tmp_path, key3)["status"] == "skipped" and not records.failure_path(tmp_path, key3).exists()


def test_record_files_and_frames(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="runs folder .*missing does not exist"):
        list(records.iter_records(tmp_path / "missing"))
    write(tmp_path / "records" / "b.json", ok("b", ids={"policy": "h2o", "budget": 8}, metrics={"ppl": 4.0},
                                                stats={"tokens_per_s": 10}, env={"git_commit": "abc"}, seed=1))
    write(tmp_path / "records" / "a.json", {"key": "a", "status": "failed", "reason": "OOM", "ids": {"policy": "tova"}})
    (tmp_path / "records" / "c.json.gz").write_bytes(gzip.compress(json.dumps(ok("c")).encode()))
    write(tmp_path / "records" / ".tmp-x.json", ok("x"))
    write(tmp_path / "records" / "notes.txt", "text")
    write(tmp_path / "records" / "failures" / "b.json", {"key": "b", "status": "failed"})
    assert [p.name for p in records.record_files(tmp_path)] == ["a.json", "b.json", "c.json.gz"]
    assert [r["key"] for r in records.iter_records(tmp_path)] == ["a", "b", "c"]
    assert [r["key"] for r in records.iter_records(tmp_path, failures=True)] == ["a", "b", "c", "b"]
    frame = records.load_records(tmp_path)
    assert list(frame["key"]) == ["b", "c"]
    row = frame.iloc[0]
    assert (row["policy"], row["budget"], row["metrics.ppl"], row["stats.tokens_per_s"], row["git_commit"], row["seed"]) == \
        ("h2o", 8, 4.0, 10, "abc", 1)
    assert row["curves"] == {} and row["samples"] == [] and row["finished"] == "2025-01-01T00:00:00"
    everything = records.load_records(tmp_path, status=None, failures=True)
    assert list(everything["key"]) == ["a", "b", "c", "b"] and list(everything["reason"])[0] == "OOM"
    assert list(records.load_records(tmp_path, status="failed")["key"]) == ["a"]
    assert records.to_frame([]).empty


# ---------------------------------------------------------------------------------------------- provenance
def git(repo, *args):
    return subprocess.run(["git", "-c", "user.email=t@example.org", "-c", "user.name=t", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_record_names_the_code_that_produced_it(tmp_path):
    for folder in ("lacache", "baselines", "tasks", "lacache/harness", "lacache/report"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.py").write_text(f"x = {folder!r}\n")
    (tmp_path / "lacache" / "harness" / "__init__.py").write_text("")
    (tmp_path / "lacache" / "plain").mkdir()  # no __init__.py: not a package of the harness
    (tmp_path / "lacache" / "baselines").symlink_to("../baselines")  # the package's link: read once, as baselines/
    assert records.code_folders(tmp_path) == ["lacache", "baselines", "tasks", "lacache/harness"]
    assert records.code_folders(tmp_path / "nothing") == list(records.CODE_FOLDERS)
    digest = records.code_digest(tmp_path)
    assert len(digest) == 16 and digest == records.code_digest(tmp_path)
    (tmp_path / "lacache" / "report" / "a.py").write_text("edited\n")  # not a package: not part of the digest
    assert records.code_digest(tmp_path) == digest
    (tmp_path / "lacache" / "harness" / "a.py").write_text("edited\n")
    assert records.code_digest(tmp_path) != digest

    env = records.environment(tmp_path)  # not a git repository: no commit, but the digest still names the code
    assert env["git_commit"] is None and env["code_digest"] == records.code_digest(tmp_path)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "code")
    env = records.environment(tmp_path)
    assert env["git_commit"] == git(tmp_path, "rev-parse", "HEAD") and len(env["git_commit"]) == 40
    assert env["git_dirty"] is False
    (tmp_path / "tasks" / "a.py").write_text("changed\n")
    assert records.environment(tmp_path)["git_dirty"] is True
    assert env["packages"]["torch"] == torch.__version__ and "nonexistent" not in env["packages"]
    assert env["cpu_count"] == os.cpu_count() and env["torch_threads"] == torch.get_num_threads()
    assert env["cuda_device"] is None or isinstance(env["cuda_device"], str)
    assert set(env) == {"git_commit", "git_dirty", "code_digest", "packages", "python", "platform", "machine", "cpu_count",
                        "torch_threads", "cuda_device"}


def test_an_uninstalled_package_is_recorded_as_missing(monkeypatch):
    monkeypatch.setattr(records, "PACKAGES", ("torch", "no-such-package-here"))
    assert records.environment()["packages"] == {"torch": torch.__version__, "no-such-package-here": None}


# ---------------------------------------------------------------------------------------------- merging runs/ folders
@pytest.mark.parametrize("new, old, replaces", [
    ({"status": "ok"}, {"status": "failed"}, True),
    ({"status": "ok"}, {"status": "skipped"}, True),
    ({"status": "failed"}, {"status": "skipped"}, True),
    ({"status": "failed"}, {"status": "ok"}, False),
    ({"status": "skipped"}, {"status": "failed"}, False),
    ({"status": "ok", "finished": "2026"}, {"status": "ok", "finished": "2025"}, False),  # an ok record stays
    ({"status": "failed", "finished": "2026"}, {"status": "failed", "finished": "2025"}, True),  # the later attempt
    ({"status": "failed", "finished": "2025"}, {"status": "failed", "finished": "2026"}, False),
    ({"status": "failed"}, {"status": "failed", "finished": "2025"}, False),
    ({"status": "failed", "finished": "2025"}, {"status": "failed"}, True),
    ({"status": "skipped"}, {"status": "bogus"}, True),
])
def test_merging_prefers_ok_then_failed_then_skipped_then_the_later(new, old, replaces):
    assert records._prefer(new, old) is replaces


def test_merge_copies_files_and_keeps_what_differs(tmp_path, capsys):
    a, b, dst = tmp_path / "a", tmp_path / "b", tmp_path / "dst"
    write(a / "records" / "k1.json", ok("k1"))
    write(b / "records" / "k1.json", {"key": "k1", "status": "failed", "finished": "2026"})
    write(b / "records" / "k2.json", {"key": "k2", "status": "failed", "finished": "2025"})
    write(dst / "records" / "k2.json", {"key": "k2", "status": "skipped", "finished": "2024"})
    write(a / "artifacts" / "x.txt", "same")
    write(b / "artifacts" / "x.txt", "same")
    write(b / "artifacts" / "y.txt", "theirs")
    write(dst / "artifacts" / "y.txt", "ours")
    write(a / "records" / ".tmp-abc.partial", "half")
    write(a / "records" / "sub" / "k5.json", ok("k5"))  # not directly under records/: copied as a file
    (a / "latest-run").symlink_to(a / "artifacts")
    counts = records.merge([a, b, dst], into=dst)
    assert counts == {"records_added": 1, "records_replaced": 1, "records_kept": 1, "bad_records": 0, "files_copied": 2,
                      "files_same": 1, "clashes": 1}
    assert json.loads((dst / "records" / "k1.json").read_text()) == ok("k1")
    assert json.loads(records.failure_path(dst, "k1").read_text())["status"] == "failed"  # the loser, kept beside
    assert json.loads((dst / "records" / "k2.json").read_text())["status"] == "failed"
    assert (dst / "artifacts" / "y.txt").read_text() == "ours" and (dst / "artifacts" / "x.txt").read_text() == "same"
    assert (dst / "records" / "sub" / "k5.json").is_file()
    assert not (dst / "records" / ".tmp-abc.partial").exists() and not (dst / "latest-run").exists()
    out = capsys.readouterr().out
    assert f"[merge] kept {dst / 'artifacts' / 'y.txt'}; differs from {b / 'artifacts' / 'y.txt'}" in out
    assert "[merge] 1 records added, 1 records replaced, 1 records kept, 0 bad records, 2 files copied, 1 files same, 1 clashes" in out
    again = records.merge([a], into=dst)
    assert again["records_kept"] == 1 and again["files_copied"] == 0 and again["files_same"] == 2
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        records.merge([tmp_path / "missing"], into=dst)


def test_merge_from_the_command_line(tmp_path, capsys):
    write(tmp_path / "a" / "records" / "k1.json", ok("k1"))
    records.main(["merge", str(tmp_path / "a"), "--into", str(tmp_path / "dst")])
    assert json.loads((tmp_path / "dst" / "records" / "k1.json").read_text()) == ok("k1")
    assert "1 records added" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        records.main(["merge", str(tmp_path / "missing"), "--into", str(tmp_path / "dst")])
    assert stop.value.code == 2 and "missing is not a directory" in capsys.readouterr().err


def test_the_merge_command_line_says_what_it_takes(tmp_path, capsys):
    def says(out, text):  # the whole phrase, as its own words
        return re.search(r"(^|\s)" + re.escape(text) + r"(\s|$)", " ".join(out.split())) is not None

    with pytest.raises(SystemExit) as stop:
        records.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: python -m lacache.harness.records [-h] {merge} ...")
    assert says(out, "merge merge runs/ folders from several machines") and "One JSON record per run" in out
    with pytest.raises(SystemExit):
        records.main(["merge", "--help"])
    out = capsys.readouterr().out
    assert says(out, "usage: python -m lacache.harness.records merge [-h] --into DST SRC [SRC ...]")
    assert says(out, "SRC runs/ folders to merge") and says(out, "--into DST the runs/ folder to merge into (created if absent)")
    for argv, missing in (([], "command"), (["merge", str(tmp_path)], "--into"), (["merge", "--into", str(tmp_path)], "SRC")):
        with pytest.raises(SystemExit) as stop:
            records.main(argv)
        assert stop.value.code == 2 and f"the following arguments are required: {missing}" in capsys.readouterr().err
