"""One run: compose model + cache policy + task from the Hydra config, run, record, log.

Invalid settings fail before the model loads. Inside a sweep (``-m``) an invalid point is
recorded as ``skipped`` and a crashing one as ``failed`` (with the error), and the sweep goes on;
a point whose record is already ``ok`` is not recomputed unless ``rerun=true``. Each point of a sweep
also leaves its outcome in its Hydra job folder, from which ``SweepSummary`` (a Hydra callback,
``hydra.callbacks`` in ``configs/config.yaml``) prints the sweep's totals and sets the exit code to
the number of failed points. It reads files, so it works with any launcher (basic, joblib, SLURM).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lacache import models, records
from lacache.ladder import LadderConfigError
from lacache.policy import PolicyConfigError
from lacache.tracking import NoLogger
from lacache.tasks.base import RunContext, TaskConfigError

CONFIG_ERRORS = (PolicyConfigError, TaskConfigError, LadderConfigError, models.ModelUnavailableError, ValueError, FileNotFoundError)
IDENTITY = ("model", "cache", "task", "seed")
OUTCOME_FILE = "lacache-outcome.json"  # one per sweep point, in its Hydra job folder
OUTCOMES = ("ok", "skipped", "failed", "already done")


def build(node, group: str):
    """Instantiate ``_target_`` with the node's other keys; unknown keys name the valid ones."""
    from hydra.utils import get_class

    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = params.pop("_target_", None)
    if target is None:
        raise ValueError(f"configs/{group}/*.yaml must name a class in `_target_`")
    cls = get_class(target)
    if dataclasses.is_dataclass(cls):
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ValueError(f"{group}: unknown setting(s) {unknown} for {target}; valid: {sorted(valid)}")
    return cls(**params)


def identity(cfg: DictConfig) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k] for k in IDENTITY}


def in_sweep() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def sweep_id() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().sweep.dir if in_sweep() else None
    except ValueError:
        return None


def _base_record(cfg: DictConfig, key: str, status: str) -> dict:
    return {
        "schema": records.SCHEMA,
        "key": key,
        "status": status,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "identity": identity(cfg),
        "seed": cfg.seed,
        "sweep": sweep_id(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run(cfg: DictConfig) -> dict:
    """Run one configuration and return its record (also written to ``runs/records``)."""
    record, outcome = _run(cfg)
    if in_sweep():
        _note_outcome(record, outcome)
    return record


def _note_outcome(record: dict, outcome: str) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    note = {"outcome": outcome, "key": record.get("key"), "reason": record.get("reason") if outcome in ("skipped", "failed") else None,
            "overrides": list(hydra_cfg.overrides.task)}
    folder = Path(hydra_cfg.runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTCOME_FILE).write_text(json.dumps(note, indent=1))


def _run(cfg: DictConfig) -> tuple[dict, str]:
    key = records.config_key(identity(cfg))
    done = records.read_record(cfg.runs_dir, key)
    if done is not None and done.get("status") == "ok" and not cfg.rerun:
        print(f"[lacache] already done ({records.record_path(cfg.runs_dir, key)}); rerun=true recomputes", flush=True)
        return done, "already done"
    try:
        spec = models.ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
        policy = build(cfg.cache, "cache")
        task = build(cfg.task, "task")
        model_config = models.load_config(spec)
        max_length = models.max_length(spec, model_config)
        policy.check(model_config)
        task.check(model_config, policy, max_length)
        logger = build(cfg.logger, "logger") if cfg.logger.get("_target_") else NoLogger()
    except CONFIG_ERRORS as err:
        if in_sweep():
            record = {**_base_record(cfg, key, "skipped"), "reason": f"{type(err).__name__}: {err}"}
            records.write_record(cfg.runs_dir, record)
            print(f"[lacache] skipped: {err}", flush=True)
            return record, "skipped"
        raise
    ids = {"model": spec.name, **policy.describe(), **task.describe()}
    try:
        torch.manual_seed(cfg.seed)
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        started = time.perf_counter()
        model, tokenizer = models.load(spec, reuse=in_sweep())  # a sweep's points in one process share one load
        load_s = time.perf_counter() - started
        policy.prepare_model(model)
        ctx = RunContext(model, tokenizer, policy, model_config, max_length, seed=cfg.seed, progress=cfg.progress)
        result = task.run(ctx)
    except Exception as err:  # recorded, so a sweep goes on and the failure stays visible
        record = {**_base_record(cfg, key, "failed"), "ids": ids, "reason": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
        records.write_record(cfg.runs_dir, record)
        if in_sweep():
            print(f"[lacache] failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return record, "failed"
        raise
    record = {
        **_base_record(cfg, key, "ok"),
        "ids": ids,
        "metrics": result.metrics,
        "curves": result.curves,
        "samples": result.samples,
        "stats": {**result.stats, "model_load_s": load_s, "total_s": time.perf_counter() - started},
        "artifacts": result.artifacts,
        "env": records.environment(),
    }
    path = records.write_record(cfg.runs_dir, record)
    try:
        logger.log_run(record, result.artifacts)
    except Exception as err:  # the result is recorded; in a sweep a tracker outage must not stop the others
        if not in_sweep():
            raise
        print(f"[lacache] logging failed (the record is kept): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    print(summary(record, path), flush=True)
    return record, "ok"


def summary(record: dict, path) -> str:
    ids = record["ids"]
    head = " ".join(f"{k}={v}" for k, v in ids.items() if v is not None)
    metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["metrics"].items())
    stats = record["stats"]
    speed = f"{stats['tokens_per_s']:.1f} tok/s" if stats.get("tokens_per_s") else ""
    lines = [f"[lacache] {head}", f"[lacache] {metrics}  ({speed}, {stats.get('wall_s', 0):.1f} s)"]
    for name, points in record["curves"].items():
        if points and "ppl" in points[0]:
            lines.append(f"[lacache] {name}: " + " ".join(f"{p['end']}:{p['ppl']:.1f}" for p in points))
    lines.extend(f"[lacache] {name}: {file}" for name, file in record.get("artifacts", {}).items())
    lines.append(f"[lacache] record: {path}")
    return "\n".join(lines)


def main(cfg: DictConfig) -> None:
    """Entry point used by ``run.py``: clear one-line errors instead of tracebacks for bad settings."""
    try:
        run(cfg)
    except CONFIG_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class SweepSummary(Callback):
    """Hydra callback: after a sweep (``-m``), print how many points were ok, skipped, failed or
    already done, list the failures, and exit with ``min(failed, 255)`` when any point failed.

    It reads the outcome file each point leaves in its job folder under ``hydra.sweep.dir``, so it
    counts points run in other processes or on other machines (joblib, SLURM) as well."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        for stale in Path(str(config.hydra.sweep.dir)).rglob(OUTCOME_FILE):  # a re-run into the same folder
            stale.unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        notes = [json.loads(path.read_text()) for path in sorted(sweep_dir.rglob(OUTCOME_FILE))]
        counts = {name: sum(note["outcome"] == name for note in notes) for name in OUTCOMES}
        shared = set.intersection(*(set(note["overrides"]) for note in notes)) if len(notes) > 1 else set()
        for note in notes:
            if note["outcome"] == "failed":  # named by the overrides that vary across the sweep
                point = " ".join(o for o in note["overrides"] if o not in shared) or " ".join(note["overrides"])
                print(f"[lacache] failed: {point}: {note['reason']}", file=sys.stderr)
        print(f"[lacache] sweep {sweep_dir}: " + ", ".join(f"{counts[name]} {name}" for name in OUTCOMES), flush=True)
        if counts["failed"]:
            sys.exit(min(counts["failed"], 255))
