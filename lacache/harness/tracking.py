"""Experiment trackers: ``logger=none`` or ``logger=wandb`` (offline by default, no account needed).

The runs of one sweep (``-m``) share a W&B group: ``logger.group``, or when it is null a name taken
from the sweep's folder (``sweep-<date>_<time>`` for the default ``hydra.sweep.dir``, else the
folder's last component, e.g. ``hydra.sweep.dir=runs/sweeps/ruler-grid`` gives ``ruler-grid``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WANDB_MODES = ("offline", "online", "disabled")
GROUP_MAX = 128  # W&B's limit on a group name


def sweep_group(sweep_dir: str | None, runs_dir: str | None = None) -> str | None:
    """The default W&B group of a sweep's runs: a name for its folder (``None`` outside a sweep)."""
    if not sweep_dir:
        return None
    path = Path(sweep_dir)
    try:
        name = "sweep-" + "_".join(path.relative_to(Path(runs_dir or "runs") / ".hydra" / "multirun").parts)
    except ValueError:
        name = path.name or str(path)
    return name[-GROUP_MAX:]


class NoLogger:
    def log_run(self, record: dict, artifacts: dict[str, str]) -> None:
        pass


@dataclass
class WandbLogger:
    """Logs a run's config, metrics, curves and figures. Offline runs land in ``dir``; sync them
    later with ``wandb sync <dir>/wandb/offline-run-*``. ``group: null`` groups a sweep's runs by
    the sweep (``sweep_group``)."""

    project: str = "lacache"
    mode: str = "offline"
    dir: str = "runs/wandb"
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={self.mode!r} is not one of {WANDB_MODES}")

    def log_run(self, record: dict, artifacts: dict[str, str]) -> None:
        import wandb

        Path(self.dir).mkdir(parents=True, exist_ok=True)
        ids = record.get("ids", {})
        name = "-".join(str(ids.get(k)) for k in ("model", "policy", "task") if ids.get(k) is not None)
        group = self.group or sweep_group(record.get("sweep"), record.get("config", {}).get("runs_dir"))
        run = wandb.init(
            project=self.project, mode=self.mode, dir=self.dir, group=group, tags=list(self.tags),
            name=f"{name}-{record['key'][:8]}", config={"key": record["key"], **record["config"]}, reinit="finish_previous",
        )
        try:
            for curve, points in record.get("curves", {}).items():
                if points:
                    columns = list(points[0])
                    run.log({curve: wandb.Table(columns=columns, data=[[p.get(c) for c in columns] for p in points])})
            for name_, path in artifacts.items():
                if str(path).endswith(".png"):
                    run.log({name_: wandb.Image(str(path))})
            summary = {f"metrics/{k}": v for k, v in record.get("metrics", {}).items()}
            summary.update({f"stats/{k}": v for k, v in record.get("stats", {}).items() if v is not None})
            run.log(summary)
            run.summary.update(summary)
        finally:
            run.finish()
