"""Paper tables and figures from run records: ``python -m lacache.report --runs runs --out reports``.

Reads every record under ``<runs>/records`` (``ok``, ``skipped`` and ``failed``) and writes, for each
paper result that has records, ``<out>/<result>.md`` and ``<out>/<result>.tex`` (tables) and PNG
figures, plus ``<out>/index.md`` with all of them on one page:

* ``ruler``: RULER score per task and average, one row per policy; paired differences LaCache − each
  baseline (same budget, or the full cache).
* ``longbench``: LongBench score per dataset and average, the same way.
* ``ablation``: LaCache span x overlap grids (RULER retrieval tasks, and RULER's QA tasks ``qa_*``),
  tables and a heatmap.
* ``niah``: pass-key accuracy per context length and average, paired differences, heatmaps
  (depth x context length) per policy.
* ``ppl``: streaming perplexity, overall (with a CI over windows) and per window, paired differences
  over the windows both runs streamed, and the PPL-vs-tokens figure.
* ``bench``: ``python -m lacache.harness.bench`` records: the speed/memory table and KV memory and decode
  tokens/s against context length.
* ``lm_eval``: ``task=lm_eval`` records: per group of runs of the same lm-eval tasks, one table per
  lm-eval task with its metrics and lm-eval's own stderrs (not bootstrapped here).

Which result a record belongs to: ``config.paper.experiment`` (set by ``configs/experiment/paper_*``)
or, for a record made without an experiment config, its task. Within a result there is one table per
model (and per context length / budget where a result has several).

Uncertainty: scores are means of per-sample scores (``samples``), shown with a 95% percentile
bootstrap confidence interval (``RESAMPLES`` resamples, fixed ``SEED``), resampling within each task
(dataset, NIAH cell), since the averages weight tasks equally. A difference between two runs is
paired: per sample id both runs hold, the difference of their scores, bootstrapped the same way. A CI
needs at least two samples in every task it covers (otherwise only the value is shown). Perplexity
has no samples: its CI resamples the windows of the stream (a block bootstrap).

Missing results show as ``—``, never as 0: a ``skipped``/``failed`` record is a row of ``—`` with its
reason in a numbered note; a setting nobody ran is ``—`` without a note.

Rendering is a pure function of the records: the same records give byte-identical files (no
timestamps or paths in the outputs, fixed orderings, PNGs without a software stamp).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lacache.harness.records import iter_records, to_frame
from lacache.report import figures

MISSING = "—"
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
POLICY_ORDER = ("full", "streamingllm", "h2o", "snapkv", "tova", "pyramidkv", "lacache")
POLICY_NAMES = {"FullCachePolicy": "full", "StreamingLLMPolicy": "streamingllm", "H2OPolicy": "h2o", "LaCachePolicy": "lacache"}
TASK_NAMES = {"RulerTask": "ruler", "LongBenchTask": "longbench", "NeedleTask": "niah", "PerplexityTask": "ppl",
              "LmEvalTask": "lm_eval"}
POLICY_FIELDS = ("budget", "span", "overlap", "sink", "heavy_ratio", "layout")
RESULTS = ("ruler", "longbench", "ablation", "niah", "ppl", "bench", "throughput", "lm_eval")
TITLES = {"ruler": "RULER", "longbench": "LongBench", "ablation": "LaCache span × overlap ablation",
          "niah": "Needle in a haystack", "ppl": "Streaming perplexity", "bench": "Speed and memory",
          "throughput": "Evaluation throughput", "lm_eval": "lm-evaluation-harness tasks"}
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


# ============================================================================================ loading
def _class_name(target) -> str:
    return str(target or "").rsplit(".", 1)[-1]


def _names(value, groups: dict[str, Sequence[str]] | None = None) -> list[str]:
    """A task's list setting (``tasks``/``datasets``) as names: a list, a comma string or a group name."""
    if value is None:
        return []
    if isinstance(value, str):
        if groups and value in groups:
            return list(groups[value])
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def ids_from_identity(record: dict) -> dict:
    """What ``ids`` would have held, for a record that stopped before its run started (``skipped``, or
    ``failed`` while loading): model, policy and task settings read from its identifying config."""
    identity = record.get("identity") or record.get("config") or {}
    model, cache, task = ((identity.get(k) or {}) for k in ("model", "cache", "task"))
    cls = _class_name(cache.get("_target_"))
    ids: dict[str, Any] = {"model": model.get("name"), "policy": POLICY_NAMES.get(cls, cls.lower().removesuffix("policy") or None)}
    ids.update({k: cache[k] for k in POLICY_FIELDS if k in cache})
    ids.setdefault("budget", None)
    if cache.get("decode", "exact") != "exact":
        ids["decode"] = cache["decode"]
    name = TASK_NAMES.get(_class_name(task.get("_target_")), _class_name(task.get("_target_")).lower() or None)
    ids["task"] = name
    if name == "ruler":
        from lacache.tasks.ruler_data import RULER_TASKS

        ids.update(context_length=task.get("context_length"), num_samples=task.get("num_samples"),
                   subtasks=",".join(_names(task.get("tasks"), {"all": RULER_TASKS})), fill=task.get("fill", "max"))
    elif name == "longbench":
        from lacache.tasks.longbench_data import ENGLISH_DATASETS, LONGBENCH_DATASETS

        ids.update(datasets=",".join(_names(task.get("datasets"), {"english": ENGLISH_DATASETS, "all": LONGBENCH_DATASETS})),
                   limit=task.get("limit"), max_length=task.get("max_length"))
    elif name == "niah":
        lengths = task.get("context_lengths")
        lengths = lengths if isinstance(lengths, (list, tuple)) else [lengths]
        ids.update(context_lengths=",".join(map(str, lengths)), num_samples=task.get("num_samples"))
    elif name == "ppl":
        ids.update(dataset=task.get("dataset"), num_tokens=task.get("num_tokens"))
    elif name == "lm_eval":
        ids.update(tasks=",".join(_names(task.get("tasks"))), limit=task.get("limit"), num_fewshot=task.get("num_fewshot"))
    if name in ("ruler", "longbench", "niah"):
        ids["compress"] = task.get("compress", "prompt")
    if (task.get("batch_size") or 1) > 1:
        ids["batch_size"] = task["batch_size"]
    return ids


def experiment_of(record: dict) -> str | None:
    paper = (record.get("config") or {}).get("paper")
    if isinstance(paper, dict) and paper.get("experiment"):
        return str(paper["experiment"])
    ids = record.get("ids") or ids_from_identity(record)
    return ids.get("task")


def load(runs: str | Path = "runs"):
    """Every record (any status) as one DataFrame, like :func:`lacache.harness.records.load_records` plus the
    columns ``experiment`` (which paper result it belongs to) and, for records that never ran, the ids
    read from their config (so a skipped point still has its policy, budget, task settings)."""
    import pandas as pd

    raw = {record["key"]: record for record in iter_records(runs)}  # damaged/foreign files: reported, skipped
    frame = to_frame(raw.values(), status=None)
    rows = []
    for row in frame.to_dict("records"):
        record = raw.get(row["key"], {})
        if not record.get("ids"):
            for column, value in ids_from_identity(record).items():
                if _value(row.get(column)) is None:
                    row[column] = value
        row["experiment"] = experiment_of(record)
        rows.append(row)
    if not rows:
        return frame.assign(experiment=[])
    return pd.DataFrame(rows)


# ============================================================================================ statistics
@dataclass(frozen=True)
class Estimate:
    value: float
    ci: tuple[float, float] | None = None
    n: int = 0


def _quantiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(strata: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean of the strata's means (strata weighted equally), resampling
    with replacement within each stratum. ``None`` when a stratum has fewer than 2 values (no spread
    to resample)."""
    groups = [np.asarray(g, dtype=float) for g in strata]
    if not groups or any(len(g) < 2 for g in groups):
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for values in groups:
        total += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return _quantiles(total / len(groups), level)


def stratified_mean(strata: Sequence[Sequence[float]]) -> float:
    return float(np.mean([np.mean(g) for g in strata]))


def _sorted(keys):
    try:
        return sorted(keys)
    except TypeError:  # mixed types: any fixed order will do
        return sorted(keys, key=repr)


def estimate(strata: dict[Any, Sequence[float]], scale: float = 1.0, **kw) -> Estimate | None:
    """Mean of the stratum means and its bootstrap CI, times ``scale``."""
    if not strata:
        return None
    groups = [strata[k] for k in _sorted(strata)]
    ci = bootstrap_ci(groups, **kw)
    return Estimate(scale * stratified_mean(groups), None if ci is None else (scale * ci[0], scale * ci[1]),
                    sum(map(len, groups)))


def paired_difference(a: dict, b: dict, stratum: Callable[[Any], Any] = lambda key: None, scale: float = 1.0,
                      **kw) -> Estimate | None:
    """``a − b`` over the sample ids both hold (``a``/``b``: id -> score): the mean of the per-id
    differences (strata weighted equally) and its paired bootstrap CI; ``None`` without shared ids."""
    shared = _sorted(set(a) & set(b))
    if not shared:
        return None
    strata: dict[Any, list[float]] = {}
    for key in shared:
        strata.setdefault(stratum(key), []).append(a[key] - b[key])
    return estimate(strata, scale, **kw)


def ppl_estimate(windows: Sequence[tuple[int, float]], other: Sequence[tuple[int, float]] | None = None,
                 resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate | None:
    """Perplexity of a stream from its windows (``(tokens, ppl)`` each), with a bootstrap CI over the
    windows; with ``other`` (the same windows of another run), the paired difference PPL − PPL_other."""
    if not windows:
        return None
    sizes = np.array([w for w, _ in windows], dtype=float)
    nll = np.log([p for _, p in windows])
    nll_other = None if other is None else np.log([p for _, p in other])

    def ppl(idx_nll, idx_sizes):
        return np.exp((idx_nll * idx_sizes).sum(-1) / idx_sizes.sum(-1))

    value = float(ppl(nll, sizes) - (0 if nll_other is None else ppl(nll_other, sizes)))
    if len(windows) < 2:
        return Estimate(value, None, len(windows))
    idx = np.random.default_rng(seed).integers(0, len(windows), size=(resamples, len(windows)))
    stats = ppl(nll[idx], sizes[idx]) - (0 if nll_other is None else ppl(nll_other[idx], sizes[idx]))
    return Estimate(value, _quantiles(stats, level), len(windows))


# ============================================================================================ tables
@dataclass
class Cell:
    """One table cell: a number (optionally with a CI, signed for differences), missing (``value``
    None, optionally with a note number), or plain ``text``."""

    value: float | None = None
    ci: tuple[float, float] | None = None
    note: int | None = None
    signed: bool = False
    digits: int = 1
    text: str | None = None

    def _number(self, x: float) -> str:
        x = round(x, self.digits) + 0.0  # no "-0.0"
        return f"{x:+.{self.digits}f}" if self.signed else f"{x:.{self.digits}f}"

    def markdown(self) -> str:
        if self.text is not None:
            return self.text
        if self.value is None:
            return MISSING + ("" if self.note is None else str(self.note).translate(SUPERSCRIPT))
        return self._number(self.value) + ("" if self.ci is None else f" [{self._number(self.ci[0])}, {self._number(self.ci[1])}]")

    def latex(self) -> str:
        if self.text is not None:
            return latex_escape(self.text)
        if self.value is None:
            return "---" + ("" if self.note is None else f"\\textsuperscript{{{self.note}}}")

        def num(x):
            return self._number(x).replace("-", "$-$")

        return num(self.value) + ("" if self.ci is None else f" {{\\scriptsize [{num(self.ci[0])}, {num(self.ci[1])}]}}")


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "---", "−": "$-$", "–": "--",
                 "≤": r"$\leq$", "×": r"$\times$", "Δ": r"$\Delta$", "·": r"$\cdot$", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    label: str = ""

    def note(self, text: str) -> int:
        """The number of the note ``text`` (added on first use)."""
        if text not in self.notes:
            self.notes.append(text)
        return self.notes.index(text) + 1

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join(["---"] + ["--:"] * (len(self.header) - 1)) + "|")
        lines += ["| " + " | ".join(c.markdown().replace("|", "\\|") for c in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"{str(i).translate(SUPERSCRIPT)} {text}  " for i, text in enumerate(self.notes, 1)]
            lines[-1] = lines[-1].rstrip()
        return "\n".join(lines)

    def latex(self) -> str:
        columns = "l" + "r" * (len(self.header) - 1)
        body = [r"\begin{tabular}{" + columns + "}", r"\toprule",
                " & ".join(latex_escape(h) for h in self.header) + r" \\", r"\midrule"]
        body += [" & ".join(c.latex() for c in row) + r" \\" for row in self.rows]
        body += [r"\bottomrule", r"\end{tabular}"]
        if len(self.header) > 6:
            body = [r"\resizebox{\linewidth}{!}{%"] + body + ["}"]
        lines = [r"\begin{table}[t]", r"\centering", r"\small",
                 r"\caption{" + latex_escape(self.title) + ("." if self.caption else "")
                 + (" " + latex_escape(self.caption) if self.caption else "") + "}"]
        if self.label:
            lines.append(r"\label{tab:" + self.label + "}")
        lines += body
        if self.notes:
            lines.append(r"\par\smallskip\footnotesize")
            lines += [f"\\textsuperscript{{{i}}}{latex_escape(text)}\\par" for i, text in enumerate(self.notes, 1)]
        lines.append(r"\end{table}")
        return "\n".join(lines)


# ============================================================================================ rows
def _value(x):
    """None for missing (None/NaN), ints for integral floats, else the value."""
    if x is None:
        return None
    if isinstance(x, float):
        if x != x:
            return None
        return int(x) if x.is_integer() else x
    return x


def _budget_key(budget) -> tuple:
    budget = _value(budget)
    return (0, 0.0) if budget is None else (1, -float(budget))


def _sort_key(row: dict) -> tuple:
    policy = str(row.get("policy"))
    order = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)

    return (order, policy, _budget_key(row.get("budget")), *(_order(row.get(k)) for k in ("span", "overlap", "sink", "heavy_ratio")),
            str(row.get("key")))


def label(row: dict) -> str:
    return figures.label({k: _value(v) for k, v in row.items()})


def compress_of(row: dict) -> str:
    """What a generation run compressed (``task.compress``): records made before the setting existed
    compressed the whole prompt."""
    return _value(row.get("compress")) or "prompt"


def status_note(row: dict) -> str | None:
    """The note of a row that has no results: its status and reason (whitespace collapsed, capped)."""
    if row.get("status") == "ok":
        return None
    reason = " ".join(str(row.get("reason") or "no reason recorded").split())
    if len(reason) > 400:
        reason = reason[:399] + "…"
    return f"{row.get('status')}: {reason}"


def _rows(frame, experiment: str) -> list[dict]:
    if frame is None or len(frame) == 0 or "experiment" not in frame:
        return []
    rows = [{k: (v if not isinstance(v, float) or v == v else None) for k, v in r.items()}
            for r in frame[frame["experiment"] == experiment].to_dict("records")]
    return sorted(rows, key=_sort_key)


def _groups(rows: list[dict], keys: Sequence[str]) -> list[tuple[tuple, list[dict]]]:
    """Rows grouped by ``model`` and ``keys`` (missing values group together), in sorted order."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault((str(row.get("model")),) + tuple(_value(row.get(k)) for k in keys), []).append(row)
    return [(k, out[k]) for k in sorted(out, key=lambda k: tuple(map(_order, k)))]


def _order(value) -> tuple:
    """A sort key for a setting's value: missing first, then numbers, then text."""
    value = _value(value)
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _describe(key: tuple, keys: Sequence[str]) -> str:
    parts = [str(key[0])] + [f"{k.replace('_', ' ')} {v}" for k, v in zip(keys, key[1:]) if v is not None]
    return " · ".join(parts)


def _labels(rows: list[dict], settings: Sequence[str]) -> list[str]:
    """Row labels: the policy label, plus the settings that differ between the rows (and a key prefix
    where two rows would still read the same)."""
    varying = [s for s in settings if len({json.dumps(_value(r.get(s)), default=str) for r in rows}) > 1]
    labels = [label(r) + "".join(f" · {s.replace('_', ' ')} {_value(r.get(s))}" for s in varying) for r in rows]
    shown = [(x, compress_of(r)) for x, r in zip(labels, rows)]  # score tables show compress in a column of its own
    return [f"{x} #{r['key'][:6]}" if shown.count(k) > 1 else x for x, r, k in zip(labels, rows, shown)]


def slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(str(p) for p in parts if p is not None)).strip("-").lower()


# ============================================================================================ score tables
@dataclass(frozen=True)
class ScoreSpec:
    """How a task's records become a table: ``columns_field`` lists a run's columns (ids), each sample
    names its ``column``, ``stratum`` (resampled within) and ``sample_id`` (paired on)."""

    columns_field: str
    column: Callable[[dict], Any]
    stratum: Callable[[dict], Any]
    sample_id: Callable[[dict], Any]
    metric: Callable[[Any], tuple[str, float] | None]  # column -> (frame column, factor to 0-100)
    avg_metric: tuple[str, float] | None
    column_name: Callable[[Any], str] = str
    parse_column: Callable[[str], Any] = str
    group_keys: tuple[str, ...] = ()
    settings: tuple[str, ...] = ("num_samples", "seed")
    unit: str = "score"


RULER = ScoreSpec(
    columns_field="subtasks", column=lambda s: s["task"], stratum=lambda s: s["task"],
    sample_id=lambda s: (s["task"], s["index"]), metric=lambda c: (f"metrics.ruler/{c}", 1.0),
    avg_metric=("metrics.ruler/avg", 1.0), group_keys=("context_length",), unit="RULER score (0-100)")
LONGBENCH = ScoreSpec(
    columns_field="datasets", column=lambda s: s["dataset"], stratum=lambda s: s["dataset"],
    sample_id=lambda s: (s["dataset"], s["index"]), metric=lambda c: (f"metrics.longbench/{c}", 1.0),
    avg_metric=("metrics.longbench/avg", 1.0), group_keys=("max_length",), settings=("limit", "seed"),
    unit="LongBench score (0-100)")
NIAH = ScoreSpec(
    columns_field="context_lengths", column=lambda s: int(s["context_length"]),
    stratum=lambda s: (int(s["context_length"]), float(s["depth"])),
    sample_id=lambda s: (int(s["context_length"]), float(s["depth"]), s["index"]), metric=lambda c: None,
    avg_metric=("metrics.niah/acc", 100.0), column_name=lambda c: f"{c} tok", parse_column=int,
    unit="pass-key accuracy (%)")


def _columns(rows: list[dict], spec: ScoreSpec) -> list:
    seen: list = []
    for row in rows:
        for name in str(row.get(spec.columns_field) or "").split(","):
            if name.strip() and spec.parse_column(name.strip()) not in seen:
                seen.append(spec.parse_column(name.strip()))
    for row in rows:  # columns only samples name (records without the ids field)
        for sample in row.get("samples") or []:
            if spec.column(sample) not in seen:
                seen.append(spec.column(sample))
    return sorted(seen) if spec.parse_column is int else seen


def sample_scores(row: dict, spec: ScoreSpec) -> dict:
    """sample id -> (column, stratum, score in [0, 1]) of one run."""
    return {spec.sample_id(s): (spec.column(s), spec.stratum(s), float(s["score"]))
            for s in row.get("samples") or [] if s.get("score") is not None}


def _cell(row: dict, scores: dict, columns: list, metric: tuple[str, float] | None, table: Table) -> Cell:
    """The score of ``row`` over ``columns`` (its metric if recorded, else the sample mean) and its CI."""
    if row.get("status") != "ok":
        return Cell(note=table.note(status_note(row)))
    strata: dict[Any, list[float]] = {}
    for column, stratum, score in scores.values():
        if column in columns:
            strata.setdefault(stratum, []).append(score)
    est = estimate(strata, scale=100.0)
    recorded = None if metric is None else _value(row.get(metric[0]))
    if recorded is not None:
        return Cell(float(recorded) * metric[1], est.ci if est else None)
    return Cell() if est is None else Cell(est.value, est.ci)


def _pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(LaCache run, baseline run) pairs compared in a table: every LaCache run against each other
    policy's run at the same budget, and against the full cache."""
    pairs = []
    for a in rows:
        if a.get("policy") != "lacache":
            continue
        for b in rows:
            if b.get("policy") == "lacache" or compress_of(a) != compress_of(b):
                continue
            if b.get("policy") == "full" or _value(b.get("budget")) == _value(a.get("budget")):
                pairs.append((a, b))
    return pairs


def score_tables(frame, experiment: str, spec: ScoreSpec, name: str) -> list[Table]:
    """Per model (and ``spec.group_keys``): the score table (per column and average, 95% CIs) and the
    paired differences LaCache − baseline."""
    tables = []
    for key, rows in _groups(_rows(frame, experiment), spec.group_keys):
        rows = sorted(rows, key=lambda r: (compress_of(r) != "prompt", compress_of(r)))  # the paper's setting first
        columns = _columns(rows, spec)
        header = ["run", "compress"] + [spec.column_name(c) for c in columns] + ["avg"]
        where = _describe(key, spec.group_keys)
        table = Table(f"{name}: {where}", header, [], label=slug(experiment, *key),
                      caption=f"{spec.unit}; 95% bootstrap CI over samples in brackets; — missing.")
        scores = {r["key"]: sample_scores(r, spec) for r in rows}
        for row, text in zip(rows, _labels(rows, spec.settings)):
            cells = [Cell(text=text), Cell(text=compress_of(row))]
            cells += [_cell(row, scores[row["key"]], [c], spec.metric(c), table) for c in columns]
            cells.append(_cell(row, scores[row["key"]], columns, spec.avg_metric, table))
            table.rows.append(cells)
        tables.append(table)
        pairs = _pairs(rows)
        if not pairs:
            continue
        diff = Table(f"{name}, paired differences: {where}", header, [], label=slug(experiment, "diff", *key),
                     caption=f"{spec.unit} of the first run minus the second, over the samples both ran; "
                             "95% paired bootstrap CI in brackets.")
        labels = dict(zip((r["key"] for r in rows), _labels(rows, spec.settings)))
        for a, b in pairs:
            cells = [Cell(text=f"{labels[a['key']]} − {labels[b['key']]}"), Cell(text=compress_of(a))]
            for cols in [[c] for c in columns] + [columns]:
                if a.get("status") != "ok" or b.get("status") != "ok":
                    bad = a if a.get("status") != "ok" else b
                    cells.append(Cell(note=diff.note(status_note(bad))))
                    continue
                sa = {k: v[2] for k, v in scores[a["key"]].items() if v[0] in cols}
                sb = {k: v[2] for k, v in scores[b["key"]].items() if v[0] in cols}
                strata = {k: v[1] for k, v in scores[a["key"]].items()}
                est = paired_difference(sa, sb, stratum=strata.get, scale=100.0)
                cells.append(Cell(signed=True) if est is None else Cell(est.value, est.ci, signed=True))
            diff.rows.append(cells)
        tables.append(diff)
    return tables


# ============================================================================================ sections
@dataclass
class Section:
    """One paper result: its tables and figures (paths relative to the output folder)."""

    name: str
    title: str
    intro: str
    blocks: list = field(default_factory=list)  # Table | (figure path, alt text)

    @property
    def tables(self) -> list[Table]:
        return [b for b in self.blocks if isinstance(b, Table)]

    @property
    def figures(self) -> list[str]:
        return [b[0] for b in self.blocks if not isinstance(b, Table)]

    def markdown(self, level: int = 1) -> str:
        parts = [f"{'#' * level} {self.title}", self.intro]
        for block in self.blocks:
            parts.append(block.markdown() if isinstance(block, Table) else f"![{block[1]}]({block[0]})")
        return "\n\n".join(parts) + "\n"

    def latex(self) -> str:
        head = [f"% {self.title}: generated by `python -m lacache.report` from run records; do not edit.",
                r"% needs \usepackage{booktabs,graphicx}"]
        return "\n\n".join(["\n".join(head)] + [t.latex() for t in self.tables]) + "\n"


CI_NOTE = (f"Brackets: 95% percentile bootstrap CI ({RESAMPLES} resamples, seed {SEED}) over the samples, resampled "
           "within each task/dataset/cell; differences are paired over the sample ids both runs hold. "
           "— marks a missing result (a numbered note gives the reason where a run was skipped or failed).")


def ruler_section(frame, out: Path) -> Section:
    return Section("ruler", TITLES["ruler"], "RULER score per task and average (tasks weighted equally). " + CI_NOTE,
                   score_tables(frame, "ruler", RULER, "RULER"))


def longbench_section(frame, out: Path) -> Section:
    return Section("longbench", TITLES["longbench"],
                   "LongBench score per dataset and average (datasets weighted equally). " + CI_NOTE,
                   score_tables(frame, "longbench", LONGBENCH, "LongBench"))


def niah_section(frame, out: Path) -> Section:
    blocks: list = score_tables(frame, "niah", NIAH, "NIAH")
    for key, rows in _groups(_rows(frame, "niah"), ()):
        panels = []
        modes = len({compress_of(r) for r in rows}) > 1
        for row, text in zip(rows, _labels(rows, NIAH.settings)):
            text += f" · compress {compress_of(row)}" if modes else ""
            grid = (row.get("curves") or {}).get("niah_grid") if row.get("status") == "ok" else None
            if not grid:
                panels.append({"title": text, "message": f"{MISSING} {row.get('status')}" if row.get("status") != "ok"
                               else f"{MISSING} no grid"})
                continue
            lengths = sorted({int(p["context_length"]) for p in grid})
            depths = sorted({float(p["depth"]) for p in grid})
            acc = {(int(p["context_length"]), float(p["depth"])): 100 * p["acc"] for p in grid}
            panels.append({"title": text, "columns": [str(n) for n in lengths], "rows": [f"{100 * d:.0f}%" for d in depths],
                           "values": [[acc.get((n, d)) for n in lengths] for d in depths],
                           "xlabel": "context length (tokens)", "ylabel": "depth of the pass key"})
        path = f"niah_{slug(*key)}.png"
        figures.grid_heatmaps(panels, out / path, f"NIAH pass-key accuracy (%): {_describe(key, ())}")
        blocks.append((path, f"NIAH heatmaps, {key[0]}"))
    return Section("niah", TITLES["niah"], "Pass-key accuracy per context length (depths weighted equally) and "
                   "average over the (length, depth) cells. " + CI_NOTE, blocks)


def _qa(task: str) -> bool:
    return task.startswith("qa_")


ABLATION_GROUPS = (("RULER", lambda t: not _qa(t)), ("QA", _qa))
ABLATION_BASELINES = ("streamingllm",)  # each grid also as LaCache minus this policy at the same budget, paired


def _grid_rows(frame, key: tuple, keys: Sequence[str], rows: list[dict]) -> list[dict]:
    """The grid's LaCache runs: the ablation's, plus a LaCache run of the same setting made by another
    experiment (a sweep skips a point another sweep already ran, e.g. RULER's default ladder)."""
    held = {(_value(r.get("span")), _value(r.get("overlap"))) for r in rows}
    for row in _rows(frame, "ruler"):
        if row.get("policy") != "lacache" or _group_key(row, keys) != key:
            continue
        if (_value(row.get("span")), _value(row.get("overlap"))) not in held and compress_of(row) == compress_of(rows[0]):
            rows.append(row)
    return rows


def _group_key(row: dict, keys: Sequence[str]) -> tuple:
    return (str(row.get("model")),) + tuple(_value(row.get(k)) for k in keys)


def _ablation_baselines(frame, model: str, budget, context_length, compress: str) -> list[dict]:
    """Runs of :data:`ABLATION_BASELINES` at the grid's model, budget, context length and compress mode (any experiment)."""
    rows = [r for name in ("ablation", "ruler") for r in _rows(frame, name)]
    return [r for r in rows if r.get("policy") in ABLATION_BASELINES and compress_of(r) == compress
            and _group_key(r, ("budget", "context_length")) == (model, budget, context_length)]


def ablation_section(frame, out: Path) -> Section:
    """Span x overlap grids of LaCache runs (``paper.experiment=ablation``): retrieval tasks and QA tasks,
    one grid per ladder layout (``cache.layout``) and sink; and each grid minus StreamingLLM, paired."""
    blocks: list = []
    keys = ("budget", "context_length", "layout", "sink")
    for key, rows in _groups(_rows(frame, "ablation"), keys):
        rows = [r for r in rows if r.get("policy") == "lacache"]
        if not rows:
            continue
        rows = _grid_rows(frame, key, keys, rows)
        baselines = _ablation_baselines(frame, *key[:3], compress_of(rows[0]))  # key: model, budget, context length, ...
        spans = _sorted({_value(r.get("span")) for r in rows} - {None})
        overlaps = _sorted({_value(r.get("overlap")) for r in rows} - {None})
        tasks = _columns(rows, RULER)
        panels = []
        for group, member in ABLATION_GROUPS:
            chosen = [t for t in tasks if member(t)]
            if not chosen:
                continue
            where = _describe(key, keys)
            header = ["S \\ O"] + [f"O={o}" for o in overlaps]
            table = Table(f"LaCache S × O, {group} ({', '.join(chosen)}): {where}", header, [], label=slug("ablation", group, *key),
                          caption="Mean RULER score over these tasks (0-100); 95% bootstrap CI in brackets; — missing.")
            diffs = [Table(f"LaCache S × O − {label(b)}, {group}: {where}", header, [], label=slug("ablation", "diff", b.get("policy"), group, *key),
                           caption="Mean RULER score of each ladder minus the baseline's, over the samples both ran; "
                                   "95% paired bootstrap CI in brackets; — missing.") for b in baselines]
            values, texts = [], []
            for span in spans:
                cells, line, marks = [Cell(text=f"S={span}")], [], []
                gaps = [[Cell(text=f"S={span}")] for _ in baselines]
                for overlap in overlaps:
                    match = [r for r in rows if _value(r.get("span")) == span and _value(r.get("overlap")) == overlap]
                    marks.append(None if not match or match[0].get("status") == "ok" else str(match[0].get("status")))
                    if not match:
                        cells.append(Cell())
                        line.append(None)
                        for gap in gaps:
                            gap.append(Cell(signed=True))
                        continue
                    row = match[0]
                    scores = sample_scores(row, RULER)
                    metrics = [_value(row.get(f"metrics.ruler/{t}")) for t in chosen]
                    cell = _cell(row, scores, chosen, None, table)
                    if row.get("status") == "ok" and all(m is not None for m in metrics):
                        cell.value = float(np.mean(metrics))
                    cells.append(cell)
                    line.append(cell.value)
                    for gap, base, diff in zip(gaps, baselines, diffs):
                        gap.append(_paired_cell(row, scores, base, chosen, diff))
                table.rows.append(cells)
                for gap, diff in zip(gaps, diffs):
                    diff.rows.append(gap)
                values.append(line)
                texts.append(marks)
            blocks.append(table)
            blocks.extend(diffs)
            panels.append({"title": f"{group}: {', '.join(chosen)}", "columns": [str(o) for o in overlaps],
                           "rows": [str(s) for s in spans], "values": values, "texts": texts, "xlabel": "overlap O",
                           "ylabel": "span S"})
        if panels:
            path = f"ablation_{slug(*key)}.png"
            figures.grid_heatmaps(panels, out / path, f"LaCache span × overlap (score 0-100): {_describe(key, keys)}")
            blocks.append((path, f"ablation heatmap, {key[0]}"))
    return Section("ablation", TITLES["ablation"], "LaCache's ladder span S and overlap O at a fixed budget: mean "
                   "score over RULER's retrieval tasks and over its QA tasks (qa_1 SQuAD, qa_2 HotpotQA), and its "
                   "paired difference to StreamingLLM where the records hold a StreamingLLM run of the same budget. "
                   "A ladder that cannot exist for the model's layer count is a skipped run (— with its reason). "
                   + CI_NOTE, blocks)


def _paired_cell(row: dict, scores: dict, base: dict, columns: list, table: Table) -> Cell:
    """``row − base`` over ``columns``, paired over the samples both hold."""
    if row.get("status") != "ok" or base.get("status") != "ok":
        return Cell(note=table.note(status_note(row if row.get("status") != "ok" else base)))
    other = sample_scores(base, RULER)
    a = {k: v[2] for k, v in scores.items() if v[0] in columns}
    b = {k: v[2] for k, v in other.items() if v[0] in columns}
    est = paired_difference(a, b, stratum={k: v[1] for k, v in scores.items()}.get, scale=100.0)
    return Cell(signed=True) if est is None else Cell(est.value, est.ci, signed=True)


def _windows(row: dict) -> dict[int, tuple[int, float]]:
    """end -> (tokens in the window, PPL) of a ppl run's ``ppl_window`` curve."""
    points = (row.get("curves") or {}).get("ppl_window") or []
    out, previous = {}, 0
    for p in points:
        out[int(p["end"])] = (int(p["end"]) - previous, float(p["ppl"]))
        previous = int(p["end"])
    return out


def ppl_section(frame, out: Path) -> Section:
    import pandas as pd

    blocks: list = []
    keys = ("dataset",)
    for key, rows in _groups(_rows(frame, "ppl"), keys):
        where = _describe(key, keys)
        labels = _labels(rows, ("seed",))
        summary = Table(f"Streaming PPL: {where}", ["run", "tokens", "PPL", "last window"], [], label=slug("ppl", *key),
                        caption="PPL of the whole stream; 95% bootstrap CI over its windows in brackets; — missing.")
        for row, text in zip(rows, labels):
            windows = _windows(row)
            if row.get("status") != "ok" or not windows:
                note = status_note(row)
                summary.rows.append([Cell(text=text)] + [Cell(note=None if note is None else summary.note(note))] * 3)
                continue
            est = ppl_estimate(list(windows.values()))
            recorded = _value(row.get("metrics.ppl"))
            last = windows[max(windows)][1]
            summary.rows.append([Cell(text=text), Cell(text=str(_value(row.get("num_tokens")) or MISSING)),
                                 Cell(recorded if recorded is not None else est.value, est.ci, digits=2), Cell(last, digits=1)])
        blocks.append(summary)
        ok = [r for r in rows if r.get("status") == "ok" and _windows(r)]
        if ok:
            ends, per_run = figures.ppl_windows(pd.DataFrame({"curves": [r["curves"] for r in ok]}))
            per = Table(f"Streaming PPL per window: {where}", ["run"] + [figures.window_name(e) for e in ends], [],
                        label=slug("ppl", "windows", *key), caption="PPL of each window of the stream; — not streamed.")
            ok_labels = dict(zip((r["key"] for r in rows), labels))
            for row, by_end in zip(ok, per_run):
                per.rows.append([Cell(text=ok_labels[row["key"]])] + [Cell(by_end.get(e)) for e in ends])
            blocks.append(per)
        pairs = _pairs(rows)
        if pairs:
            diff = Table(f"Streaming PPL, paired differences: {where}", ["run", "shared tokens", "ΔPPL"], [],
                         label=slug("ppl", "diff", *key),
                         caption="PPL of the first run minus the second over the windows both streamed; 95% paired "
                                 "bootstrap CI over those windows in brackets.")
            labels_by_key = dict(zip((r["key"] for r in rows), labels))
            for a, b in pairs:
                text = Cell(text=f"{labels_by_key[a['key']]} − {labels_by_key[b['key']]}")
                bad = next((r for r in (a, b) if r.get("status") != "ok"), None)
                if bad is not None:
                    n = diff.note(status_note(bad))
                    diff.rows.append([text, Cell(note=n), Cell(note=n)])
                    continue
                wa, wb = _windows(a), _windows(b)
                shared = sorted(set(wa) & set(wb))
                if not shared or any(wa[e][0] != wb[e][0] for e in shared):
                    diff.rows.append([text, Cell(), Cell(signed=True)])
                    continue
                est = ppl_estimate([wa[e] for e in shared], [wb[e] for e in shared])
                diff.rows.append([text, Cell(text=str(sum(wa[e][0] for e in shared))), Cell(est.value, est.ci, signed=True, digits=2)])
            blocks.append(diff)
        if ok:
            path = f"ppl_{slug(*key)}.png"
            ok_frame = pd.DataFrame([{k: _value(v) if not isinstance(v, (dict, list)) else v for k, v in r.items()} for r in ok])
            figures.ppl_curves(ok_frame, out / path, f"Streaming perplexity per window: {where}")
            blocks.append((path, f"PPL vs tokens, {key[0]}"))
    return Section("ppl", TITLES["ppl"], "Perplexity of one long text streamed token by token through each policy "
                   "(the full cache in exact chunks). Perplexity has no per-sample results: its CI resamples the "
                   "stream's windows (block bootstrap), and a paired difference resamples the windows both runs "
                   "streamed.", blocks)


BENCH_GROUP = ("device", "dtype")


def bench_section(frame, out: Path) -> Section:
    import pandas as pd

    blocks: list = []
    rows = _rows(frame, "bench")
    for key, group in _groups(rows, BENCH_GROUP):
        group_frame = pd.DataFrame(group)
        where = _describe(key, BENCH_GROUP)
        extra = [c for c in ("batch", "decode") if c in group_frame and group_frame[c].nunique(dropna=True) > 0]
        table = Table(f"Speed and memory: {where}", figures.BENCH_COLUMNS + extra, [], label=slug("bench", *key),
                      caption="python -m lacache.harness.bench: prefill a random prompt, then greedy decode steps; decode "
                              "ms/token is a median; — not applicable or not measured.")
        table.rows = [[Cell(text=c) for c in cells] for cells in figures.bench_rows(group_frame, MISSING, extra)]
        blocks.append(table)
        path = f"bench_{slug(*key)}.png"
        figures.bench_vs_context(group_frame, out / path, f"KV memory and decode speed vs context: {where}")
        blocks.append((path, f"bench, {key[0]}"))
    return Section("bench", TITLES["bench"], "Records of `python -m lacache.harness.bench` (one process, every policy side by "
                   "side): KV-cache memory and decode speed against the context length.", blocks)


THROUGHPUT_GROUP = ("context_length", "fill", "compress")
ANCHOR = "hf-generate"  # cache.decode of the full cache that runs transformers' own generate


def _lacks_decode(row: dict) -> bool:
    """A sweep point skipped because its policy has no such decode path (the sweep crosses every policy with
    every path): not a result that is missing, so the table leaves it out."""
    return row.get("status") == "skipped" and " is not available for " in str(row.get("reason"))


def throughput_section(frame, out: Path) -> Section:
    """Per model and context length: samples per minute of a whole evaluation (prefill, decode, scoring),
    every policy, decode path and batch size, beside transformers' ``generate`` on the same prompts."""
    blocks: list = []
    runs = [r for r in _rows(frame, "throughput") if not _lacks_decode(r)]
    for key, rows in _groups(runs, THROUGHPUT_GROUP):
        anchors = {_value(r.get("batch_size")) or 1: _value(r.get("stats.samples_per_min")) for r in rows
                   if r.get("decode") == ANCHOR and r.get("status") == "ok"}
        header = ["policy", "decode", "batch", "samples/min", f"× {ANCHOR}", "rows/batch", "new tokens/sample",
                  "peak GPU GiB"]
        table = Table(f"Throughput: {_describe(key, THROUGHPUT_GROUP)}", header, [], label=slug("throughput", *key),
                      caption=f"A whole RULER evaluation per row (prompts drawn once, then prefill, decode and scoring), "
                              f"samples per minute of wall time; × {ANCHOR}: against transformers' generate with its "
                              "dynamic cache over the same prompts at the same batch size; — not run.")
        ordered = sorted(rows, key=lambda r: (_sort_key(r)[:2], str(r.get("decode")), _value(r.get("batch_size")) or 1))
        for row in ordered:
            batch = _value(row.get("batch_size")) or 1
            note = status_note(row)
            if note is not None:
                table.rows.append([Cell(text=label(row)), Cell(text=str(row.get("decode") or "exact")), Cell(text=str(batch))]
                                  + [Cell(note=table.note(note))] + [Cell(text=MISSING)] * 4)
                continue
            rate, anchor = _value(row.get("stats.samples_per_min")), anchors.get(batch)
            peak = _value(row.get("stats.peak_device_bytes"))
            cells = [label(row), str(row.get("decode") or "exact"), str(batch),
                     MISSING if rate is None else f"{rate:.0f}",
                     MISSING if rate is None or not anchor else f"{rate / anchor:.2f}",
                     MISSING if _value(row.get("stats.batch_rows_mean")) is None else f"{row['stats.batch_rows_mean']:.1f}",
                     f"{row['stats.generated_tokens_mean']:.0f}",
                     MISSING if peak is None else f"{peak / 2**30:.1f}"]
            table.rows.append([Cell(text=c) for c in cells])
        blocks.append(table)
    return Section("throughput", TITLES["throughput"], "Runs of `+experiment=throughput_ruler`: how many RULER samples "
                   "a whole evaluation gets through per minute, for each policy, decode path and batch size, in one "
                   "process with transformers' own `generate` as the anchor.", blocks)


LM_EVAL_GROUP = ("tasks", "limit", "num_fewshot")
LM_EVAL_PREFIX = "metrics.lm_eval/"


def lm_eval_metrics(rows: list[dict]) -> dict[str, list[str]]:
    """lm-eval task -> its metrics (stderrs aside), in a fixed order, from ``metrics.lm_eval/<task>/<metric>`` columns."""
    found: dict[str, list[str]] = {}
    for column in sorted({c for r in rows for c in r if c.startswith(LM_EVAL_PREFIX)}):
        task, metric = column[len(LM_EVAL_PREFIX):].rsplit("/", 1)
        if "_stderr" not in metric.split(",")[0]:
            found.setdefault(task, []).append(metric)
    return found


def _stderr_name(metric: str) -> str:
    name, comma, filter_name = metric.partition(",")
    return f"{name}_stderr{comma}{filter_name}"


def lm_eval_section(frame, out: Path) -> Section:
    """Per model and group of runs of the same lm-eval tasks (limit, few-shot): a table per lm-eval task,
    one row per run, each metric as lm-eval reported it with its stderr."""
    blocks: list = []
    for key, rows in _groups(_rows(frame, "lm_eval"), LM_EVAL_GROUP):
        where = _describe(key, LM_EVAL_GROUP)
        labels = _labels(rows, ("seed",))
        for task, metrics in (lm_eval_metrics(rows) or {str(key[1]): ["result"]}).items():  # no run has results: notes only
            table = Table(f"lm-eval {task}: {where}", ["run"] + metrics, [], label=slug("lm_eval", task, *key),
                          caption="lm-eval's metrics ± its stderr; — missing.")
            for row, text in zip(rows, labels):
                note = status_note(row)
                cells = [Cell(text=text)]
                for metric in metrics:
                    value = _value(row.get(f"{LM_EVAL_PREFIX}{task}/{metric}"))
                    stderr = _value(row.get(f"{LM_EVAL_PREFIX}{task}/{_stderr_name(metric)}"))
                    if value is None:
                        cells.append(Cell(note=None if note is None else table.note(note)))
                    else:
                        cells.append(Cell(text=f"{value:.4g}" + ("" if stderr is None else f" ± {stderr:.2g}")))
                table.rows.append(cells)
            blocks.append(table)
    return Section("lm_eval", TITLES["lm_eval"], "Runs of `task=lm_eval`: lm-evaluation-harness tasks with every "
                   "request through the cache policy (a fresh cache per request). Values and stderrs are lm-eval's "
                   "own; its per-task versions and config hashes are in each record's `lm_eval_tasks` curve.", blocks)


BUILDERS = {"ruler": ruler_section, "longbench": longbench_section, "ablation": ablation_section,
            "niah": niah_section, "ppl": ppl_section, "bench": bench_section, "throughput": throughput_section,
            "lm_eval": lm_eval_section}


def build(frame, out: str | Path) -> list[Section]:
    """The sections of every paper result with records in ``frame`` (figures are drawn into ``out``)."""
    out = Path(out)
    present = set(frame["experiment"].dropna()) if len(frame) and "experiment" in frame else set()
    return [BUILDERS[name](frame, out) for name in RESULTS if name in present]


def summary_line(frame) -> str:
    if not len(frame):
        return "No records."
    counts = frame["status"].value_counts()
    return f"{len(frame)} records: " + ", ".join(f"{int(counts[s])} {s}" for s in sorted(counts.index))


def write(sections: list[Section], out: str | Path, frame=None) -> list[Path]:
    """Write ``<name>.md``/``<name>.tex`` per section and ``index.md`` (all sections)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for section in sections:
        for suffix, text in ((".md", section.markdown()), (".tex", section.latex())):
            path = out / f"{section.name}{suffix}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
    head = ["# Paper tables", "", "Generated by `python -m lacache.report` from the run records; every number below "
            "comes from a record" + (f" ({summary_line(frame)})." if frame is not None else ".")]
    if not sections:
        head += ["", ("No records of a paper result yet: run `python run.py -m +experiment=paper_ruler` (or "
                      "`make paper-table-smoke`).")]
    index = "\n".join(head) + "\n\n" + "\n".join(s.markdown(level=2) for s in sections)
    path = out / "index.md"
    path.write_text(index, encoding="utf-8")
    written.append(path)
    return written + [out / f for s in sections for f in s.figures]


BLOCK = re.compile(r"(?P<head><!-- lacache\.report (?P<args>[^>]*?) -->\n)(?P<body>.*?)(?P<tail><!-- /lacache\.report -->)", re.S)


def splice(document: str | Path) -> int:
    """Re-render, in place, the generated blocks of a Markdown document (docs/RESULTS.md): each block
    ``<!-- lacache.report runs=<folder> section=<result> [level=<n>] -->`` ... ``<!-- /lacache.report -->``
    becomes that result's section built from the records under ``<folder>/records`` (a path relative
    to the working directory), with its figures in ``img/<folder name>/`` beside the document. So the
    document's tables are the records', and only the prose around them is written by hand. Returns the
    number of blocks."""
    path = Path(document)
    frames: dict[str, Any] = {}

    def block(match: re.Match) -> str:
        args = dict(part.split("=", 1) for part in match["args"].split())
        runs, name = args.get("runs"), args.get("section")
        if runs is None or name not in BUILDERS:
            raise ValueError(f"{path}: a lacache.report block needs runs=<folder> and section=<one of {sorted(BUILDERS)}>, "
                             f"got {match['args']!r}")
        if runs not in frames:
            if not Path(runs).is_dir():
                raise ValueError(f"{path}: runs={runs!r} is not a folder (relative to {Path.cwd()})")
            frames[runs] = load(runs)
        frame, out = frames[runs], path.parent / "img" / Path(runs).name
        if not len(frame) or name not in set(frame["experiment"].dropna()):
            return f"{match['head']}No {name} records in {runs}.\n{match['tail']}"
        section = BUILDERS[name](frame, out)
        text = section.markdown(level=int(args.get("level", 3)))
        prefix = Path("img") / Path(runs).name
        for figure in section.figures:
            text = text.replace(f"]({figure})", f"]({(prefix / figure).as_posix()})")
        return f"{match['head']}{text}{match['tail']}"

    text, count = BLOCK.subn(block, path.read_text(encoding="utf-8"))
    path.write_text(text, encoding="utf-8")
    return count


def render(runs: str | Path = "runs", out: str | Path = "reports") -> list[Path]:
    """Load ``runs`` and write every table and figure into ``out``; returns the files written."""
    frame = load(runs)
    return write(build(frame, out), out, frame)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Paper tables (Markdown, LaTeX) and figures from run records.")
    parser.add_argument("--runs", default="runs", help="a runs/ folder (records under <runs>/records)")
    parser.add_argument("--out", default="reports", help="output folder")
    parser.add_argument("--splice", metavar="DOCUMENT", help="instead: re-render the lacache.report blocks of a Markdown "
                        "document from the records they name (e.g. docs/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.splice:
        try:
            print(f"[report] {args.splice}: {splice(args.splice)} generated blocks")
        except (OSError, ValueError) as err:
            parser.exit(2, f"error: {err}\n")
        return
    if not Path(args.runs).is_dir():
        parser.exit(2, f"error: --runs={args.runs!r} is not a folder (a runs/ folder holds records/<key>.json)\n")
    files = render(args.runs, args.out)
    for path in files:
        print(f"[report] {path}")


if __name__ == "__main__":
    main()
