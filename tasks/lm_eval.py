"""Any lm-evaluation-harness task through any cache policy (``task=lm_eval``).

lm-eval builds the requests, prompts, few-shot contexts and metrics (``lm_eval.simple_evaluate``
with ``log_samples``); the model it evaluates is :class:`lacache.tasks.lm_eval_model.PolicyLM`, lm-eval's
own ``HFLM`` whose ``generate_until``, ``loglikelihood`` and ``loglikelihood_rolling`` requests run
through the chosen cache policy, a fresh cache per request (see that module for what compression
means for each request type). With ``cache=full`` the scores are plain ``lm_eval --model hf``'s.

Settings use lm-eval's terms: ``tasks`` (registry names, groups, tags or YAML paths),
``include_path`` (a directory of task YAMLs, e.g. local tasks with ``dataset_path: json``),
``include_defaults`` (false: only ``include_path``'s tasks, which indexes much faster), ``limit``,
``num_fewshot``, ``batch_size`` (accepted for lm-eval's sake; requests always run one at a time),
``max_length`` (HFLM's: truncation and rolling-window length; null: the model's max length),
``apply_chat_template``.

Names are checked and the tasks' data loaded before the model loads: an unknown name fails with the
closest valid ones, and data that cannot be fetched (hub offline, not cached) fails like LongBench's,
so a sweep records such a point as skipped.

The whole context is compressed as one sequence (``compress=context`` of the other tasks has no
counterpart: an lm-eval request is one context string, with no question part kept apart), all but
its last token, which then goes through the compressed cache like every later token. Generation
greedy-decodes; a task that asks for sampling is refused.

Record: ``lm_eval/<task>/<metric>`` (lm-eval's metric names, ``,<filter>`` kept unless it is
``none``; stderrs as ``<metric>_stderr``), per-sample logs (lm-eval's, without the documents and
prompt texts, which ``doc_hash`` / ``prompt_hash`` identify, plus what each request measured), and
a ``lm_eval_tasks`` table: version, few-shot count, sample counts and config hash per task.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import ClassVar

from lacache.models import first_line, hub_offline_reason
from lacache.tasks import generation as gen
from lacache.tasks.base import RunContext, Task, TaskConfigError, TaskResult

NOT_METRICS = ("samples", "sample_len")  # counts in lm-eval's results (the lm_eval_tasks table has them)
SAMPLE_FIELDS = ("doc_id", "target", "filter", "resps", "filtered_resps", "doc_hash", "prompt_hash", "target_hash")


def _lm_eval_version() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise TaskConfigError(
            "task=lm_eval needs lm-evaluation-harness: .venv/bin/pip install -e '.[lm-eval]' (or pip install lm-eval)"
        ) from None


def _names(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    names = [str(t) for t in tasks if str(t).strip()]
    if not names:
        raise TaskConfigError('task.tasks is empty; name lm-eval tasks, e.g. "task.tasks=[hellaswag,arc_easy]"')
    if len(set(names)) != len(names):
        raise TaskConfigError(f"task.tasks lists a task twice: {names}")
    return names


def metric_name(task: str, key: str) -> str:
    """``lm_eval/<task>/<metric>`` from lm-eval's ``<metric>,<filter>`` result key."""
    metric, _, filter_name = key.partition(",")
    return f"lm_eval/{task}/{metric}" + (f",{filter_name}" if filter_name not in ("", "none") else "")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LmEvalTask(Task):
    name: ClassVar[str] = "lm_eval"

    tasks: list[str] | str = field(default_factory=list)
    include_path: str | list[str] | None = None
    include_defaults: bool = True
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 1
    max_length: int | None = None
    apply_chat_template: bool = False

    def __post_init__(self) -> None:
        self.tasks = _names(self.tasks)
        if self.limit is not None and (isinstance(self.limit, bool) or not self.limit > 0):
            raise TaskConfigError(f"task.limit={self.limit} must be a positive number of samples (or a fraction < 1), or null")
        if self.num_fewshot is not None and (int(self.num_fewshot) != self.num_fewshot or self.num_fewshot < 0):
            raise TaskConfigError(f"task.num_fewshot={self.num_fewshot} must be an integer >= 0 or null")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise TaskConfigError(f"task.batch_size={self.batch_size} must be a positive integer")
        if self.max_length is not None and (int(self.max_length) != self.max_length or self.max_length < 2):
            raise TaskConfigError(f"task.max_length={self.max_length} must be an integer >= 2 or null")
        paths = [self.include_path] if isinstance(self.include_path, str) else list(self.include_path or [])
        missing = [p for p in paths if not Path(p).is_dir()]
        if missing:
            raise TaskConfigError(f"task.include_path={missing} is not a directory (of lm-eval task YAMLs)")
        if not paths and not self.include_defaults:
            raise TaskConfigError("task.include_defaults=false needs task.include_path (a directory of task YAMLs)")
        self.include_path = paths or None
        self._manager = None

    def manager(self):
        if self._manager is None:
            _lm_eval_version()
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=self.include_path, include_defaults=self.include_defaults)
        return self._manager

    def check(self, model_config, policy, max_length) -> None:
        """Before the model loads: every name known to lm-eval, and every task's data loadable."""
        manager = self.manager()
        known = set(manager.all_tasks)
        unknown = [n for n in self.tasks if n not in known and not manager.match_tasks([n]) and not Path(n).is_file()]
        if unknown:
            hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=5) for n in unknown}
            where = f" (include_path={self.include_path})" if self.include_path else ""
            raise TaskConfigError(
                f"unknown lm-eval task(s) {unknown}{where}; closest valid names: "
                + "; ".join(f"{n}: {', '.join(h) or 'none'}" for n, h in hints.items())
                + ". `lm_eval ls tasks` lists them all"
            )
        offline = hub_offline_reason()
        try:
            manager.load(self.tasks)
        except Exception as err:  # datasets raises many types for "offline" / "not found"
            why = (f"the data is not in the local Hugging Face cache and the hub is unreachable ({offline}), or the "
                   "task config is broken" if offline else "the data cannot be fetched or the task config is broken")
            raise TaskConfigError(
                f"could not load lm-eval task(s) {self.tasks}: {why} ({type(err).__name__}: {first_line(err)}). Run "
                "once where the hub answers to cache it, or point a local task YAML at local files (dataset_path: json, "
                "data_files)"
            ) from None

    def run(self, ctx: RunContext) -> TaskResult:
        import lm_eval

        from lacache.tasks.lm_eval_model import PolicyLM

        if self.batch_size > 1:
            warnings.warn(f"task.batch_size={self.batch_size}: requests run one at a time through the cache policy "
                          "(a compressing cache holds one sequence)", stacklevel=2)
        lm = PolicyLM(ctx.model, ctx.tokenizer, ctx.policy, max_length=self.max_length or ctx.max_length,
                      batch_size=self.batch_size, progress=ctx.progress)
        started = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(self.tasks), limit=self.limit, num_fewshot=self.num_fewshot, log_samples=True,
            apply_chat_template=self.apply_chat_template, task_manager=self.manager(),
        )
        wall = time.perf_counter() - started
        return TaskResult(metrics=self.metrics(out), curves={"lm_eval_tasks": self.task_table(out)},
                          samples=self.samples(out, lm), stats=self.stats(lm, wall))

    # ------------------------------------------------------------------ record
    @staticmethod
    def metrics(out: dict) -> dict[str, float]:
        metrics = {}
        for section in ("results", "groups"):
            for task, values in out.get(section, {}).items():
                for key, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_METRICS:
                        metrics[metric_name(task, key)] = float(value)
        return metrics

    @staticmethod
    def task_table(out: dict) -> list[dict]:
        """One row per task: what identifies the lm-eval task that produced the scores."""
        version = _lm_eval_version()
        rows = []
        for task, config in out.get("configs", {}).items():
            counts = out.get("n-samples", {}).get(task, {})
            rows.append({
                "task": task,
                "version": out.get("versions", {}).get(task),
                "num_fewshot": out.get("n-shot", {}).get(task),
                "output_type": config.get("output_type"),
                "samples_original": counts.get("original"),
                "samples_effective": counts.get("effective"),
                "config_sha256": config_hash(config),
                "lm_eval": version,
            })
        return rows

    @staticmethod
    def samples(out: dict, lm) -> list[dict]:
        measured = lm.by_doc()
        samples = []
        for task, logged in out.get("samples", {}).items():
            for entry in logged:
                row = {"task": task, **{k: entry[k] for k in SAMPLE_FIELDS if k in entry}}
                scores = {m: entry[m] for m in entry.get("metrics", []) if isinstance(entry.get(m), (int, float))}
                row.update(scores)
                if scores:
                    row["score"] = float(next(iter(scores.values())))
                row["requests"] = measured.get((task, entry["doc_id"]), [])
                samples.append(row)
        return samples

    @staticmethod
    def stats(lm, wall: float) -> dict:
        stats = gen.summarize(lm.generations, wall)
        scored = [r for r in lm.requests if r["kind"] != "generate_until"]
        stats["requests"] = len(lm.requests)
        if scored:
            tokens = sum(r["context_tokens"] + r["continuation_tokens"] for r in scored)
            seconds = sum(r["seconds"] for r in scored)
            stats["loglikelihood_requests"] = len(scored)
            stats["loglikelihood_tokens_per_s"] = tokens / seconds if seconds > 0 else None
            stats["kv_entries_read_max"] = max(r["kv_entries_read_max"] for r in scored)
            if stats.get("tokens_per_s") is None:
                stats["tokens_per_s"] = stats["loglikelihood_tokens_per_s"]
        for key in ("kv_entries_per_layer_max", "kv_bytes_max"):
            values = [r[key] for r in lm.requests if isinstance(r.get(key), (int, float))]
            if values:
                stats[key] = max(values)
        return stats

    def describe(self) -> dict:
        return {"task": self.name, "tasks": ",".join(self.tasks), "limit": self.limit, "num_fewshot": self.num_fewshot}
