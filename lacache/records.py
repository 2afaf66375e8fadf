"""One JSON record per run under ``runs/records/``, keyed by the run's resolved config.

The key is a hash of what identifies a result (model, cache policy, task, seed), not of the output
folder, so a re-run of a sweep finds finished points, and ``runs/`` folders from several machines
merge by copying: equal configs share a file name, different ones never clash.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
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


def iter_records(runs_dir: str | Path = "runs"):
    for path in sorted(records_dir(runs_dir).glob("*.json")):
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
