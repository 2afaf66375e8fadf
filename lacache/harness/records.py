"""One JSON record per run under ``runs/records/``, keyed by the run's resolved config.

The key is a hash of what identifies a result (model, cache policy, task, seed), not of the output
folder, so a re-run of a sweep finds finished points, and ``runs/`` folders from several machines
merge with ``python -m lacache.harness.records merge SRC... --into DST``: equal configs share a file name,
different ones never clash, and where two folders hold the same config an ``ok`` record wins over a
``failed``/``skipped`` one (plain ``cp -r`` would let whichever is copied last win).

An ``ok`` record is never replaced by a worse one: a failed or skipped re-run of a finished point is
kept beside it in ``records/failures/<key>.json``. A file under ``records/`` that is damaged, not a
record, or a record of another configuration than its name says is reported with its path and
skipped; where a run needs that name it is moved to ``records/quarantine/`` (never deleted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import filecmp
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

SCHEMA = 1
PACKAGES = ("lacache", "torch", "transformers", "hydra-core", "datasets", "wandb", "numpy", "pandas")
STATUSES = ("ok", "failed", "skipped")
IDENTITY = ("model", "cache", "task", "seed")
# Where a run puts its outputs, not what it computes: left out of the key, so a moved runs/ folder
# keeps its keys (records written before this list existed are still found, see ``legacy_key``).
NON_IDENTIFYING = {"task": ("artifacts_dir",)}
# Settings added after records existed, left out of the key at their default value, so those records keep their keys.
LATER_DEFAULTS = {"task": {"batch_size": 1}}
FAILURES = "failures"  # records/failures/<key>.json: a failed/skipped re-run of a point whose ok record is kept
QUARANTINE = "quarantine"  # records/quarantine/: damaged or foreign files found where a point's record belongs
GZIP = ".gz"
KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")


class BadRecord(ValueError):
    """A file under records/ that is not a readable lacache record; the message names the file."""


def config_key(identity: dict) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def identity(config: dict) -> dict:
    """What identifies a result: the resolved model, cache, task and seed settings, less ``NON_IDENTIFYING``
    (JSON-normalised, so a stored identity compares equal to a freshly composed one)."""
    ident = {name: config.get(name) for name in IDENTITY}
    for group, keys in NON_IDENTIFYING.items():
        if isinstance(ident.get(group), dict):
            ident[group] = {k: v for k, v in ident[group].items() if k not in keys}
    for group, defaults in LATER_DEFAULTS.items():
        if isinstance(ident.get(group), dict):
            ident[group] = {k: v for k, v in ident[group].items() if k not in defaults or v != defaults[k]}
    return json.loads(json.dumps(ident, sort_keys=True, default=str))


def legacy_key(config: dict) -> str:
    """The key of records written while output paths were still part of the identity."""
    return config_key({name: config.get(name) for name in IDENTITY})


def records_dir(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / "records"


def record_path(runs_dir: str | Path, key: str) -> Path:
    return records_dir(runs_dir) / f"{key}.json"


def failure_path(runs_dir: str | Path, key: str) -> Path:
    return records_dir(runs_dir) / FAILURES / f"{key}.json"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_record(runs_dir: str | Path, record: dict, path: Path | None = None) -> Path:
    """Write atomically (a crash mid-write never leaves a truncated record), readable like any file the
    user writes (0666 minus the umask; ``mkstemp`` alone would make it 0600)."""
    path = path or record_path(runs_dir, record["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")  # never matches *.json
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            json.dump(record, f, indent=1, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(runs_dir: str | Path) -> None:
    """Raise ``OSError`` naming the folder now, before a run computes a result it could not store."""
    folder = records_dir(runs_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-", suffix=".partial")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(f"the records folder {folder} is not writable ({type(err).__name__}: {err.strerror or err})") from None


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_file(path: Path, named: bool = True) -> dict:
    """A record file's content; ``BadRecord`` (naming the file) if it is not a record (or, with ``named``,
    not a record named by its key)."""
    try:
        data = path.read_bytes()
        record = json.loads((gzip.decompress(data) if path.name.endswith(GZIP) else data).decode("utf-8"))
    except (OSError, EOFError, ValueError) as err:  # OSError: also a bad gzip file; ValueError: bad JSON or UTF-8
        raise BadRecord(f"{path}: not a readable JSON record ({type(err).__name__}: {err})") from None
    if not (isinstance(record, dict) and isinstance(record.get("key"), str) and KEY.fullmatch(record["key"])
            and record.get("status") in STATUSES):
        raise BadRecord(f"{path}: not a lacache record (a JSON object with a `key` and a `status` in {STATUSES})")
    if named and path.name.removesuffix(GZIP).removesuffix(".json") != record["key"]:
        raise BadRecord(f"{path}: holds the record {record['key']!r} under another name "
                        "(`python -m lacache.harness.records merge` files a record under its key)")
    return record


def report_bad(err: BadRecord, out=None) -> None:
    print(f"[lacache] skipped {err}", file=out or sys.stderr, flush=True)


def quarantine(path: Path, why: str) -> Path:
    """Move a damaged or foreign file out of the way into records/quarantine/ (never deleted), and say so."""
    folder = path.parent / QUARANTINE
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    if target.exists():
        target = folder / f"{path.stem}.{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}{path.suffix}"
    os.replace(path, target)
    print(f"[lacache] moved {path} to {target}: {why}", file=sys.stderr, flush=True)
    return target


def read_record(runs_dir: str | Path, key: str) -> dict | None:
    """The record under ``key``; ``BadRecord`` if the file is damaged or foreign."""
    path = record_path(runs_dir, key)
    return read_file(path) if path.exists() else None


def trusted_record(runs_dir: str | Path, key: str, ident: dict) -> dict | None:
    """The record under ``key`` if it is one of the point identified by ``ident``. A damaged file, or a
    record of another configuration under this name, is quarantined (reported with its path)."""
    path = record_path(runs_dir, key)
    if not path.exists():
        return None
    try:
        record = read_file(path)
    except BadRecord as err:
        quarantine(path, str(err).split(": ", 1)[1])
        return None
    if identity(record.get("identity") or {}) != identity(ident):
        quarantine(path, "its stored identity (model, cache, task, seed) is not the one its name stands for")
        return None
    return record


def save(runs_dir: str | Path, record: dict) -> Path:
    """Store a run's record under its key, but never replace an ``ok`` record by a worse one: a failed or
    skipped re-run of a finished point goes to records/failures/<key>.json and the ok record stays."""
    old = trusted_record(runs_dir, record["key"], record["identity"])
    if old is not None and old.get("status") == "ok" and record["status"] != "ok":
        path = write_record(runs_dir, record, failure_path(runs_dir, record["key"]))
        print(f"[lacache] kept the ok record {record_path(runs_dir, record['key'])}; this {record['status']} "
              f"attempt is stored in {path}", file=sys.stderr, flush=True)
        return path
    return write_record(runs_dir, record)


def record_files(runs_dir: str | Path = "runs") -> list[Path]:
    """The record files of a runs/ folder: ``<key>.json``, or ``<key>.json.gz`` (records archived gzipped,
    as in docs/data/: ``gzip -9n records/*.json``; read alike, never written so)."""
    return sorted(p for pattern in ("*.json", "*.json" + GZIP) for p in records_dir(runs_dir).glob(pattern)
                  if not p.name.startswith("."))


def iter_records(runs_dir: str | Path = "runs", failures: bool = False):
    """Every record under ``runs_dir``/records (with ``failures``: also the failed/skipped re-runs kept
    beside ok records). Damaged or foreign files are reported with their path and skipped."""
    if not Path(runs_dir).is_dir():
        raise FileNotFoundError(f"runs folder {runs_dir} does not exist")
    paths = record_files(runs_dir)
    if failures:
        paths += sorted((records_dir(runs_dir) / FAILURES).glob("*.json"))
    for path in paths:
        try:
            yield read_file(path)
        except BadRecord as err:
            report_bad(err)


def load_records(runs_dir: str | Path = "runs", status: str | None = "ok", failures: bool = False):
    """All records as one pandas DataFrame: one row per run, ids/metrics/stats flattened into columns
    (``policy``, ``budget``, ``task``, ``metrics.ppl``, ``stats.tokens_per_s`` ...); ``curves`` and
    ``samples`` stay as Python objects in their columns. ``failures=True`` adds the failed/skipped
    re-runs kept beside ok records (records/failures/)."""
    return to_frame(iter_records(runs_dir, failures), status)


def to_frame(recs, status: str | None = "ok"):
    """Records (dicts) as the DataFrame of :func:`load_records`."""
    import pandas as pd

    rows = []
    for rec in recs:
        if status is not None and rec.get("status") != status:
            continue
        row = {"key": rec["key"], "status": rec.get("status"), "reason": rec.get("reason"), "seed": rec.get("seed")}
        row.update(rec.get("ids", {}))
        for section in ("metrics", "stats"):
            row.update({f"{section}.{k}": v for k, v in (rec.get(section) or {}).items()})
        row["curves"] = rec.get("curves", {})
        row["samples"] = rec.get("samples", [])
        row["finished"] = rec.get("finished")
        row["git_commit"] = (rec.get("env") or {}).get("git_commit")
        rows.append(row)
    return pd.DataFrame(rows)


CODE_FOLDERS = ("lacache", "baselines", "tasks")


def code_folders(repo: Path) -> list[str]:
    """The folders whose sources make up the harness: ``CODE_FOLDERS`` and the packages inside ``lacache/``
    (its links to ``baselines/``, ``tasks/`` and ``configs/`` excluded: they are read once, as themselves)."""
    inner = repo / "lacache"
    subpackages = sorted(p.relative_to(repo).as_posix() for p in inner.iterdir()
                         if p.is_dir() and not p.is_symlink() and (p / "__init__.py").is_file()) if inner.is_dir() else []
    return [*CODE_FOLDERS, *subpackages]


def code_digest(repo: Path) -> str:
    """sha256 (first 16 hex digits) of the harness's Python sources as they are on disk: it names the
    code that ran even where ``git_commit`` cannot (a copy with a stale or missing ``.git``, edits)."""
    digest = hashlib.sha256()
    for folder in code_folders(repo):
        root = repo / folder
        for path in sorted(root.glob("*.py")) if root.is_dir() else ():
            digest.update(f"{folder}/{path.name}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def environment(repo: Path | None = None) -> dict:
    """What produced a record: code version, packages, machine."""
    repo = repo or Path(__file__).resolve().parents[2]
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "code_digest": code_digest(repo),
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ---------------------------------------------------------------------------- merging runs/ folders
RANK = {"ok": 2, "failed": 1, "skipped": 0}


def _prefer(new: dict, old: dict) -> bool:
    """Whether ``new`` should replace ``old`` (same config key): ok beats failed beats skipped; an ok
    record is never replaced by another; between two non-ok records the later one wins."""
    a, b = RANK.get(new.get("status"), -1), RANK.get(old.get("status"), -1)
    if a != b:
        return a > b
    return old.get("status") != "ok" and str(new.get("finished") or "") > str(old.get("finished") or "")


def merge(sources: list[str | Path], into: str | Path, out=None) -> dict:
    """Copy the ``runs/`` folders ``sources`` into ``into``. Records merge by the key they hold, whatever
    their file name (see ``_prefer``; an ok record's losing failed/skipped rival goes to records/failures/);
    damaged or foreign files under records/ are reported and skipped (in ``into``: quarantined). Every
    other file (artifacts, W&B offline runs, Hydra logs) is copied if absent, skipped if identical, and
    kept as it is in ``into`` (and reported) if a different file has the same name. Symlinks (W&B's
    ``latest-run``) and half-written temporary files are skipped. Never deletes anything."""
    into, out = Path(into), out or sys.stdout
    counts = dict.fromkeys(("records_added", "records_replaced", "records_kept", "bad_records", "files_copied",
                            "files_same", "clashes"), 0)
    for source in map(Path, sources):
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is not a directory")
        if source.resolve() == into.resolve():
            continue
        for path in sorted(source.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.name.startswith(".tmp-"):
                continue
            rel = path.relative_to(source)
            if rel.parent == Path("records") and path.name.endswith((".json", ".json" + GZIP)):
                _merge_record(path, into, counts, out)
                continue
            target = into / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                counts["files_copied"] += 1
            elif filecmp.cmp(path, target, shallow=False):
                counts["files_same"] += 1
            else:
                counts["clashes"] += 1
                print(f"[merge] kept {target}; differs from {path}", file=out)
    print("[merge] " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()), file=out)
    return counts


def _merge_record(path: Path, into: Path, counts: dict, out) -> None:
    try:
        new = read_file(path, named=False)  # a record under another name is filed under its key
    except BadRecord as err:
        counts["bad_records"] += 1
        report_bad(err, out)
        return
    target = record_path(into, new["key"])
    old = None
    if target.exists():
        try:
            old = read_file(target)
        except BadRecord as err:
            quarantine(target, str(err).split(": ", 1)[1])
    if old is not None and not _prefer(new, old):
        counts["records_kept"] += 1
        losing = failure_path(into, new["key"])
        if old["status"] == "ok" and new["status"] != "ok" and not losing.exists():
            write_record(into, new, losing)
        return
    write_record(into, new)
    counts["records_replaced" if old is not None else "records_added"] += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lacache.harness.records", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge_args = sub.add_parser("merge", help="merge runs/ folders from several machines")
    merge_args.add_argument("sources", nargs="+", metavar="SRC", help="runs/ folders to merge")
    merge_args.add_argument("--into", required=True, metavar="DST", help="the runs/ folder to merge into (created if absent)")
    args = parser.parse_args(argv)
    try:
        merge(args.sources, args.into)
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
