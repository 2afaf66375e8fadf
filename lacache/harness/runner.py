"""One run: compose model + cache policy + task from the Hydra config, run, record, log.

Invalid settings (wrong types, unknown keys, impossible values, unreadable inputs, an unwritable
records folder) fail before the model loads. Inside a sweep (``-m``) an invalid point is recorded as
``skipped`` and a crashing one as ``failed`` (with the error), and the sweep goes on; a point whose
record is already ``ok`` is not recomputed unless ``rerun=true``, and is never replaced by a failure.
Each point of a sweep also leaves its outcome in its Hydra job folder, from which ``SweepSummary``
(a Hydra callback, ``hydra.callbacks`` in ``configs/config.yaml``) prints the sweep's totals and sets
the exit code to the number of failed points. It reads files, so it works with any launcher (basic,
joblib, SLURM).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
import typing
import uuid
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lacache import CONFIGS, models
from lacache.harness import records
from lacache.harness.tracking import NoLogger
from lacache.ladder import LadderConfigError
from lacache.policy import PolicyConfigError
from lacache.tasks.base import RunContext, Task, TaskConfigError

CONFIG_ERRORS = (PolicyConfigError, TaskConfigError, LadderConfigError, models.ModelUnavailableError, ValueError, FileNotFoundError)
IDENTITY = records.IDENTITY
OUTCOME_FILE = "lacache-outcome-{}.json"  # one per sweep point and sweep invocation, in its Hydra job folder
OUTCOMES = ("ok", "skipped", "failed", "already done")
SWEEP_ID = "LACACHE_SWEEP_ID"  # set by SweepSummary in the sweep's process; inherited by joblib/SLURM workers
SWEEP_PID = "LACACHE_SWEEP_PID"  # <host>:<pid> of the sweep's process


class ConfigError(ValueError):
    """An invalid setting or input, found before the model loads: exit 2 in a single run, ``skipped`` in a sweep."""


@dataclasses.dataclass
class Settings:
    """The top-level settings of ``configs/config.yaml``, type-checked like a policy's."""

    seed: int = 0
    runs_dir: str = "runs"
    rerun: bool = False
    progress: bool = True
    threads: int | None = None
    workers_per_gpu: int = 1

    def __post_init__(self) -> None:
        if self.workers_per_gpu < 1:
            raise ConfigError(f"workers_per_gpu={self.workers_per_gpu} must be >= 1 (joblib_gpus workers sharing one GPU)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be >= 1 (torch CPU threads), or null for torch's default")


@functools.lru_cache(maxsize=None)
def _schema(cls) -> DictConfig:
    """An OmegaConf schema of ``cls``'s fields (all MISSING), so OmegaConf checks and converts their types;
    a field whose type OmegaConf cannot express (e.g. a union with a list) is left to the class."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints.get(f.name, Any)
        try:
            OmegaConf.structured(dataclasses.make_dataclass("Probe", [(f.name, hint, dataclasses.field(default=MISSING))]))
        except OmegaConfBaseException:
            hint = Any
        fields.append((f.name, hint, dataclasses.field(default=MISSING)))
    return OmegaConf.structured(dataclasses.make_dataclass(cls.__name__, fields))


def typed(params: dict, cls, group: str) -> dict:
    """``params`` checked against the dataclass ``cls``: an unknown key or a value of the wrong type is a
    ``ConfigError`` naming the setting, the value and what is allowed; values OmegaConf converts ("8" for
    an int) come back converted. A scalar for a list field is passed through for the class to handle."""
    prefix = f"{group}." if group else ""
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"unknown setting(s) {[prefix + k for k in unknown]} for {cls.__module__}.{cls.__qualname__}; "
                          f"valid: {valid}")
    hints = typing.get_type_hints(cls)
    checked = {k: v for k, v in params.items() if isinstance(v, (list, tuple)) or typing.get_origin(hints.get(k)) is not list}
    try:
        merged = OmegaConf.merge(_schema(cls), checked)
    except OmegaConfBaseException as err:
        key = re.split(r"[.\[]", str(getattr(err, "full_key", "") or ""))[0]
        hint = hints.get(key, Any)
        allowed = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise ConfigError(f"{prefix}{key}={params.get(key)!r} is not a valid {allowed}: "
                          f"{str(err).splitlines()[0]}") from None
    converted = OmegaConf.to_container(merged)
    return {k: converted[k] if k in checked else v for k, v in params.items()}


def build(node, group: str):
    """Instantiate ``_target_`` with the node's other keys, type-checked against the class's fields."""
    from hydra.utils import get_class

    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = params.pop("_target_", None)
    if target is None:
        raise ConfigError(f"configs/{group}/*.yaml must name a class in `_target_`")
    try:
        cls = get_class(target)
    except ImportError as err:
        raise ConfigError(f"{group}._target_={target!r} cannot be imported: {err}") from None
    if dataclasses.is_dataclass(cls):
        params = typed(params, cls, group)
    return cls(**params)


def identity(cfg: DictConfig) -> dict:
    return records.identity(_identity_config(cfg))


def _identity_config(cfg: DictConfig) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k] for k in IDENTITY}


def in_sweep() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def launcher() -> str | None:
    """The sweep's ``hydra/launcher`` choice (None outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("hydra/launcher")
    except ValueError:
        return None


def sweep_id() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().sweep.dir if in_sweep() else None
    except ValueError:
        return None


def _base_record(cfg: DictConfig, key: str, status: str) -> dict:
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # an interpolation that does not resolve: keep the raw text
        config = OmegaConf.to_container(cfg, resolve=False)
    return {
        "schema": records.SCHEMA,
        "key": key,
        "status": status,
        "config": config,
        "identity": identity(cfg),
        "seed": cfg.get("seed"),
        "sweep": sweep_id(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run(cfg: DictConfig) -> dict:
    """Run one configuration and return its record (also written to ``runs/records``)."""
    if not in_sweep():
        return _run(cfg)[0]
    _watch_sweep_process()
    try:
        record, outcome = _run(cfg)
    except Exception as err:  # e.g. a records folder that cannot be written: counted, and the sweep goes on
        traceback.print_exc()
        record, outcome = {"key": None, "reason": f"{type(err).__name__}: {err}"}, "failed"
    _note_outcome(record, outcome)
    return record


def _watch_sweep_process() -> None:
    """In a joblib worker: exit as soon as the sweep's process is gone (e.g. SIGKILLed), instead of going
    on computing and writing records for a sweep nobody waits for."""
    host, _, pid = os.environ.get(SWEEP_PID, "").rpartition(":")
    if not pid or host != socket.gethostname() or int(pid) == os.getpid():
        return  # no sweep process known, another machine's job (SLURM), or the sweep's own process
    if any(t.name == "lacache-sweep-watch" for t in threading.enumerate()):
        return
    sweep_pid, child = int(pid), os.getppid() == int(pid)

    def gone() -> bool:  # a child sees its parent change; otherwise ask whether the pid still exists
        if child:
            return os.getppid() != sweep_pid
        try:
            os.kill(sweep_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def watch() -> None:
        while not gone():
            time.sleep(0.5)
        print(f"[lacache] the sweep's process {sweep_pid} is gone; worker {os.getpid()} stops", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="lacache-sweep-watch", daemon=True).start()


def _note_outcome(record: dict, outcome: str) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    note = {"outcome": outcome, "key": record.get("key"), "reason": record.get("reason") if outcome in ("skipped", "failed") else None,
            "overrides": list(hydra_cfg.overrides.task)}
    write_note(Path(hydra_cfg.runtime.output_dir), note)


def write_note(folder: Path, note: dict) -> None:
    """A point's outcome, in a file named by the sweep invocation (``SweepSummary`` reads only its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTCOME_FILE.format(os.environ.get(SWEEP_ID, "none"))).write_text(json.dumps(note, indent=1))


def prepare(cfg: DictConfig):
    """Everything a run needs before the weights load, checked: ``(settings, spec, policy, task,
    model_config, max_length, logger)``; any invalid setting or input raises ``ConfigError``."""
    try:
        top = {f.name: cfg.get(f.name) for f in dataclasses.fields(Settings) if f.name in cfg}
        settings = Settings(**typed(top, Settings, ""))
        spec = models.ModelSpec(**typed(OmegaConf.to_container(cfg.model, resolve=True), models.ModelSpec, "model"))
        models.check_device(spec)
        policy = build(cfg.cache, "cache")
        task = build(cfg.task, "task")
        logger = build(cfg.logger, "logger") if cfg.logger.get("_target_") else NoLogger()
        try:
            records.check_writable(settings.runs_dir)
        except OSError as err:
            raise ConfigError(f"runs_dir={settings.runs_dir!r}: {err}") from None
        model_config = models.load_config(spec)
        max_length = models.max_length(spec, model_config)
        policy.check(model_config)
        if policy.decode == "triton":
            check_triton_decode(spec, model_config)
        task.check(model_config, policy, max_length)
        if type(task).prompt_length is not Task.prompt_length:  # the task knows its prompt length from the tokenizer
            prompt_length = task.prompt_length(load_tokenizer(spec))
            if policy.is_fraction and policy.budget_of == "prompt":  # the ladder for the budget it resolves to
                dataclasses.replace(policy, budget=policy.resolve_budget(prompt_length, max_length)).check(model_config)
    except ConfigError:
        raise
    except (*CONFIG_ERRORS, OmegaConfBaseException) as err:
        raise ConfigError(str(err)) from err
    return settings, spec, policy, task, model_config, max_length, logger


def check_triton_decode(spec: models.ModelSpec, model_config) -> None:
    """``cache.decode=triton`` runs Triton kernels on one GPU over a Llama-family model's own weights."""
    from lacache.decode.fused import fusable_config

    if spec.device != "cuda" or spec.device_map is not None:
        raise ConfigError(f"cache.decode=triton runs Triton kernels on one GPU: set model.device=cuda (not "
                          f"device={spec.device!r}, device_map={spec.device_map!r}); elsewhere use cache.decode=fast or exact")
    why = fusable_config(model_config)
    if why is not None:
        raise ConfigError(f"cache.decode=triton cannot run model {spec.name!r}: {why}; use cache.decode=fast")


def load_tokenizer(spec: models.ModelSpec):
    """The model's tokenizer alone (cheap next to the weights), for checks that need token counts."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(models._location(spec))
    except (OSError, ValueError) as err:
        raise models.ModelUnavailableError(f"model {spec.name!r}: its tokenizer cannot be loaded "
                                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _run(cfg: DictConfig) -> tuple[dict, str]:
    key = records.config_key(identity(cfg))
    runs_dir = cfg.runs_dir
    try:
        rerun = typed({"rerun": cfg.get("rerun", False)}, Settings, "")["rerun"]
    except ConfigError:
        rerun = False  # prepare() reports it
    done = records.trusted_record(runs_dir, key, identity(cfg))
    legacy = records.legacy_key(_identity_config(cfg))
    if done is None and legacy != key:
        done = records.trusted_record(runs_dir, legacy, identity(cfg))
    if done is not None and done.get("status") == "ok" and not rerun:
        print(f"[lacache] already done ({records.record_path(runs_dir, done['key'])}); rerun=true recomputes", flush=True)
        if cfg.logger.get("_target_"):  # e.g. logger=wandb added after the run: log the finished record, not nothing
            build(cfg.logger, "logger").log_run(done, done.get("artifacts") or {})
            print(f"[lacache] logged the finished record with logger={cfg.logger._target_.rpartition('.')[2]}", flush=True)
        return done, "already done"
    try:
        settings, spec, policy, task, model_config, max_length, logger = prepare(cfg)
    except ConfigError as err:
        if in_sweep():
            record = {**_base_record(cfg, key, "skipped"), "reason": f"{type(err.__cause__ or err).__name__}: {err}"}
            print(f"[lacache] skipped: {err}", flush=True)
            try:
                records.save(runs_dir, record)
            except OSError as write_err:  # e.g. the records folder is what is wrong: the sweep summary still counts it
                print(f"[lacache] the skipped record was not written: {write_err}", file=sys.stderr, flush=True)
            return record, "skipped"
        raise
    ids = {"model": spec.name, **policy.describe(), **task.describe()}
    try:
        torch.manual_seed(settings.seed)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        started = time.perf_counter()
        if launcher() == "joblib_gpus":
            if spec.device != "cuda" or spec.device_map is not None:
                raise ValueError(f"hydra/launcher=joblib_gpus runs one model per GPU: set model.device=cuda (not "
                                 f"device={spec.device!r}, device_map={spec.device_map!r})")
            models.claim_gpu(Path(sweep_id()), settings.workers_per_gpu)
        model, tokenizer = models.load(spec, reuse=in_sweep())  # a sweep's points in one process share one load
        load_s = time.perf_counter() - started
        policy.prepare_model(model)
        ctx = RunContext(model, tokenizer, policy, model_config, max_length, seed=settings.seed, progress=settings.progress)
        result = task.run(ctx)
    except Exception as err:  # recorded, so a sweep goes on and the failure stays visible
        record = {**_base_record(cfg, key, "failed"), "ids": ids, "reason": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
        records.save(runs_dir, record)
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
    try:
        path = records.save(runs_dir, record)
    except OSError as err:  # the folder went away during the run: the result is printed, not lost silently
        print(summary(record, f"NOT WRITTEN ({type(err).__name__}: {err})"), flush=True)
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        raise
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
    global STARTED
    STARTED = True
    try:
        run(cfg)
    except ConfigError as err:
        fail(str(err))


STARTED = False  # set once Hydra has composed a config and called main(): see run.py


def fail(message: str) -> typing.NoReturn:
    """An invalid setting or an unavailable resource, found before anything runs: one line, exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


LOCAL_LAUNCHERS = ("basic", "joblib", "joblib_gpus")  # the points run on this machine (SLURM's run on its nodes)


def sweep_points(config: DictConfig) -> tuple[int | None, set[str]]:
    """How many points a sweep has (the product of its swept values, from the command line and from
    ``hydra.sweeper.params``, as Hydra's basic sweeper expands them) and the keys it sweeps."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(lines)
    swept = {o.get_key_element().lstrip("+~") for o in overrides if o.is_sweep_override()}
    if not all(o.is_discrete_sweep() for o in overrides if o.is_sweep_override()):
        return None, swept  # a range or interval: another sweeper (e.g. Optuna) decides how many points
    return len(BasicSweeper.split_arguments(overrides, None)[0]), swept


def unavailable_here(config: DictConfig, swept: set[str]) -> str | None:
    """Why none of a sweep's points can run on this machine, found once before launching (no GPU for a GPU
    sweep, a model neither cached nor downloadable); None when the points may run (each still checks itself).
    Sweeps whose points run elsewhere (SLURM) or sweep the model are left to their points."""
    launcher = config.hydra.runtime.choices.get("hydra/launcher")
    if launcher not in LOCAL_LAUNCHERS:
        return None
    if launcher == "joblib_gpus" and not torch.cuda.is_available():
        return models.no_gpu("hydra/launcher=joblib_gpus pins each worker to a GPU", "use hydra/launcher=joblib")
    if any(key == "model" or key.startswith("model.") for key in swept):
        return None
    try:
        spec = models.ModelSpec(**typed(OmegaConf.to_container(config.model, resolve=True), models.ModelSpec, "model"))
        models.check_device(spec)
        if spec.source == "hub":
            models.load_config(spec)
    except models.ModelUnavailableError as err:
        return str(err)
    except (ConfigError, ValueError, OmegaConfBaseException):
        return None  # an invalid model setting: every point reports it
    return None


def explain_overrides(argv: list[str]) -> None:
    """After Hydra rejected a command line: for an override of a setting that does not exist
    (``cache.foo=1``), print the valid settings of that node (Hydra's message names none)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
        base = [o.input_line for o in overrides if "." not in o.key_or_group and not o.is_sweep_override()]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("config", overrides=base)
    except Exception:  # noqa: BLE001 - only a hint on top of Hydra's own message
        return
    for o in overrides:
        name = o.key_or_group
        if "." not in name or o.is_add() or o.is_force_add() or o.is_delete() or name.startswith("hydra."):
            continue
        parent, _, key = name.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and key not in node:
            print(f"error: {name} is not a setting of {parent}; valid: {sorted(node.keys())} "
                  f"(+{name}=... adds a new key)", file=sys.stderr)


class SweepSummary(Callback):
    """Hydra callback: after a sweep (``-m``), print how many points were ok, skipped, failed or
    already done, list the failures, and exit with ``min(failed, 255)`` when any point failed.

    It reads the outcome file each point leaves in its job folder under ``hydra.sweep.dir``, so it
    counts points run in other processes or on other machines (joblib, SLURM) as well."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # an id per invocation, inherited by the workers: two sweeps into one folder keep their own notes
        os.environ[SWEEP_ID] = uuid.uuid4().hex[:12]
        os.environ[SWEEP_PID] = f"{socket.gethostname()}:{os.getpid()}"
        points, swept = sweep_points(config)
        count = "points" if points is None else f"{points} point{'s' * (points != 1)}"
        if points is not None:
            print(f"[lacache] sweep of {count}", flush=True)
        why = unavailable_here(config, swept)
        if why:
            fail(f"{why} (none of the sweep's {count} can run)")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        notes = [json.loads(path.read_text()) for path in sorted(sweep_dir.rglob(OUTCOME_FILE.format(os.environ[SWEEP_ID])))]
        counts = {name: sum(note["outcome"] == name for note in notes) for name in OUTCOMES}
        shared = set.intersection(*(set(note["overrides"]) for note in notes)) if len(notes) > 1 else set()
        for note in notes:
            if note["outcome"] == "failed":  # named by the overrides that vary across the sweep
                point = " ".join(o for o in note["overrides"] if o not in shared) or " ".join(note["overrides"])
                print(f"[lacache] failed: {point}: {note['reason']}", file=sys.stderr)
        print(f"[lacache] sweep {sweep_dir}: " + ", ".join(f"{counts[name]} {name}" for name in OUTCOMES), flush=True)
        if counts["failed"]:
            sys.exit(min(counts["failed"], 255))
