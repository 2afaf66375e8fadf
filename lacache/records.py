"""One JSON record per run under ``runs/records/``, keyed by the run's resolved config.

The key is a hash of what identifies a result (model, cache policy, task, seed), not of the output
folder, so a re-run of a sweep finds finished points, and ``runs/`` folders from several machines
merge with ``python -m lacache.records merge SRC... --into DST``: equal configs share a file name,
different ones never clash, and where two folders hold the same config an ``ok`` record wins over a
``failed``/``skipped`` one (plain ``cp -r`` would let whichever is copied last win).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

SCHEMA = 1
PACKAGES = ("lacache", "torch", "transformers", "hydra-core", "datasets", "wandb", "numpy", "pandas")


def config_key(identity: dict) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def records_dir(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / "records"


def record_path(runs_dir: str | Path, key: str) -> Path:
    return records_dir(runs_dir) / f"{key}.json"


def write_record(runs_dir: str | Path, record: dict) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated record."""
    path = record_path(runs_dir, record["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")  # never matches *.json
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_record(runs_dir: str | Path, key: str) -> dict | None:
    path = record_path(runs_dir, key)
    return json.loads(path.read_text()) if path.exists() else None


def record_files(runs_dir: str | Path = "runs") -> list[Path]:
    return sorted(p for p in records_dir(runs_dir).glob("*.json") if not p.name.startswith("."))


def iter_records(runs_dir: str | Path = "runs"):
    for path in record_files(runs_dir):
        yield json.loads(path.read_text())


def load_records(runs_dir: str | Path = "runs", status: str | None = "ok"):
    """All records as one pandas DataFrame: one row per run, ids/metrics/stats flattened into columns
    (``policy``, ``budget``, ``task``, ``metrics.ppl``, ``stats.tokens_per_s`` ...); ``curves`` and
    ``samples`` stay as Python objects in their columns."""
    import pandas as pd

    rows = []
    for rec in iter_records(runs_dir):
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


def environment(repo: Path | None = None) -> dict:
    """What produced a record: code version, packages, machine."""
    repo = repo or Path(__file__).resolve().parent.parent
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
    """Copy the ``runs/`` folders ``sources`` into ``into``. Records merge by config key (see ``_prefer``);
    every other file (artifacts, W&B offline runs, Hydra logs) is copied if absent, skipped if identical,
    and kept as it is in ``into`` (and reported) if a different file has the same name. Symlinks (W&B's
    ``latest-run``) and half-written temporary files are skipped. Never deletes anything."""
    into, out = Path(into), out or sys.stdout
    counts = dict.fromkeys(("records_added", "records_replaced", "records_kept", "files_copied", "files_same", "clashes"), 0)
    for source in map(Path, sources):
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is not a directory")
        if source.resolve() == into.resolve():
            continue
        for path in sorted(source.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.name.startswith(".tmp-"):
                continue
            rel = path.relative_to(source)
            target = into / rel
            if rel.parent == Path("records") and path.suffix == ".json":
                new = json.loads(path.read_text())
                old = json.loads(target.read_text()) if target.exists() else None
                if old is not None and not _prefer(new, old):
                    counts["records_kept"] += 1
                    continue
                write_record(into, new)
                counts["records_replaced" if old is not None else "records_added"] += 1
            elif not target.exists():
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lacache.records", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge_args = sub.add_parser("merge", help="merge runs/ folders from several machines")
    merge_args.add_argument("sources", nargs="+", metavar="SRC", help="runs/ folders to merge")
    merge_args.add_argument("--into", required=True, metavar="DST", help="the runs/ folder to merge into (created if absent)")
    args = parser.parse_args(argv)
    merge(args.sources, args.into)


if __name__ == "__main__":
    main()
