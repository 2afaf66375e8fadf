"""Figures drawn from run records (pure functions of ``load_records`` frames)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG (creating folders) and release it."""
    plt = pyplot()
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: same records, same bytes
    plt.close(fig)
    return path


def _number(value):
    if value is None or value != value:  # None or NaN (missing in this row)
        return None
    return int(value) if float(value).is_integer() else value


def label(row) -> str:
    budget = _number(row.get("budget"))
    if row.get("policy") == "lacache":
        layout = ", bands" if row.get("layout") == "bands" else ""  # the reference layout is the default
        return f"lacache (budget {budget}, S={_number(row.get('span'))}, O={_number(row.get('overlap'))}{layout})"
    return f"{row.get('policy')}" + (f" (budget {budget})" if budget is not None else "")


def ppl_curves(frame, path: str | Path, title: str = "Streaming perplexity per window") -> Path:
    """PPL per window against tokens seen, one line per run of ``task=ppl``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for _, row in frame[frame["task"] == "ppl"].sort_values("policy", kind="stable").iterrows():
        points = row["curves"].get("ppl_window", [])
        ax.plot([p["end"] for p in points], [p["ppl"] for p in points], marker="o", markersize=3, label=label(row))
    ax.set_yscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("PPL of the window (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def ppl_windows(runs) -> tuple[list[int], list[dict[int, float]]]:
    """Window columns of ``task=ppl`` runs and each run's PPL per column.

    A window is labelled by the multiple of the run's window size it ends at (the last one ends one
    token short of it, at ``num_tokens - 1``), so runs of different lengths line up by position.
    Returns ``(ends, per_run)``: the sorted column ends (in tokens) and one ``{end: ppl}`` per run."""
    per_run = []
    for curves in runs["curves"]:
        points = curves.get("ppl_window", []) if isinstance(curves, dict) else []
        size = points[0]["end"] if len(points) > 1 else None  # the first window ends at the window size
        per_run.append({(-(-p["end"] // size) * size if size else p["end"]): p["ppl"] for p in points})
    return sorted({end for by_end in per_run for end in by_end}), per_run


def window_name(end: int) -> str:
    return f"≤{end // 1024}K" if end % 1024 == 0 else f"≤{end}"


def ppl_table(frame) -> str:
    """Markdown table: PPL per window (columns, e.g. per 1K tokens) for each ``task=ppl`` run (rows)."""
    runs = frame[frame["task"] == "ppl"].sort_values("policy", kind="stable")
    ends, per_run = ppl_windows(runs)
    head = "| run | tokens | overall | " + " | ".join(window_name(e) for e in ends) + " |"
    lines = [head, "|" + "---|" * (3 + len(ends))]
    for (_, row), by_end in zip(runs.iterrows(), per_run):
        cells = [f"{by_end[e]:.1f}" if e in by_end else "–" for e in ends]
        lines.append(f"| {label(row)} | {_number(row['num_tokens'])} | {row['metrics.ppl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BENCH_COLUMNS = ["policy", "budget", "context", "prefill", "prefill tok/s", "decode ms/token", "compaction ms/step",
                 "compaction / step", "KV MiB (max)", "peak GPU GiB"]


def _missing(value) -> bool:
    return value is None or value != value


def bench_rows(frame, missing: str = "–", extra: Sequence[str] = ()) -> list[list[str]]:
    """Cells of the bench table (``BENCH_COLUMNS``, then the id columns ``extra``), one row per
    ``lacache.harness.bench`` record, sorted by context, budget, policy (then ``extra``)."""
    rows = frame[frame["task"] == "bench"].copy()
    rows["budget_sort"] = rows["budget"].fillna(0) if "budget" in rows else 0
    out = []
    for _, row in rows.sort_values(["context", "budget_sort", "policy", *extra], kind="stable").iterrows():
        compact = row.get("stats.compaction_ms_per_step")
        decode = row.get("stats.decode_ms_per_token")
        peak = row.get("stats.peak_device_bytes")
        kv = row.get("stats.kv_bytes_max")
        prefill_speed = row.get("stats.prefill_tokens_per_s")
        out.append([
            str(row["policy"]),
            str(_number(row.get("budget")) or missing),
            str(_number(row["context"])),
            str(row.get("prefill", "full")),
            missing if _missing(prefill_speed) else f"{prefill_speed:.0f}",
            missing if _missing(decode) else f"{decode:.2f}",
            missing if _missing(compact) else f"{compact:.2f}",
            missing if _missing(compact) or _missing(decode) else f"{100 * compact / decode:.1f}%",
            missing if _missing(kv) else f"{kv / 2**20:.0f}",
            missing if _missing(peak) else f"{peak / 2**30:.1f}",
            *(missing if _missing(row.get(c)) else str(_number(row.get(c)) if isinstance(row.get(c), float) else row.get(c))
              for c in extra),
        ])
    return out


def bench_table(frame) -> str:
    """Markdown table of ``lacache.harness.bench`` records: speed, compaction share of the step, memory."""
    lines = ["| " + " | ".join(BENCH_COLUMNS) + " |", "|" + "---|" * len(BENCH_COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in bench_rows(frame)]
    return "\n".join(lines)


def metric_table(frame, task: str, prefix: str) -> str:
    """Markdown table of the ``metrics.<prefix>/<name>`` columns of one task, one row per run."""
    runs = frame[frame["task"] == task]
    names = sorted({c.split("/", 1)[1] for c in runs.columns if c.startswith(f"metrics.{prefix}/")} - {"avg"}) + ["avg"]
    lines = ["| run | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for _, row in runs.sort_values("policy").iterrows():
        cells = []
        for name in names:
            value = row.get(f"metrics.{prefix}/{name}")
            cells.append("–" if value is None or value != value else f"{value:.1f}")
        lines.append(f"| {label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_heatmaps(panels: list[dict], path: str | Path, title: str) -> Path:
    """Annotated heatmaps side by side, one per panel (``title``, ``rows``/``columns`` labels, ``values``:
    a rows x columns list with None where a result is missing, drawn grey and marked "—" or by the
    panel's ``texts`` (same shape, None: the number); or only a ``message`` for a run without
    results). Colours span 0-100."""
    import numpy as np

    plt = pyplot()
    n = max(1, len(panels))
    width = max((len(p.get("columns", [])) for p in panels), default=1)
    height = max((len(p.get("rows", [])) for p in panels), default=1)
    cols = min(n, 4)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * (0.7 * width + 2.4), nrows * (0.45 * height + 1.8)), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d9d9d9")
    image = None
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=8)
        if "values" not in panel:
            ax.text(0.5, 0.5, panel.get("message", "—"), ha="center", va="center", fontsize=9, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        values = np.array([[np.nan if v is None else v for v in row] for row in panel["values"]], dtype=float).reshape(
            len(panel["rows"]), len(panel["columns"]))
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(panel["columns"])), panel["columns"], fontsize=8)
        ax.set_yticks(range(len(panel["rows"])), panel["rows"], fontsize=8)
        ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        texts = panel.get("texts") or [[None] * values.shape[1] for _ in range(values.shape[0])]
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                text = texts[i][j] if texts[i][j] is not None else "—" if v != v else f"{v:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="score (%)")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, tight=False)


def bench_vs_context(frame, path: str | Path, title: str) -> Path:
    """``lacache.harness.bench`` records against context length, one line per policy x budget (x batch/decode
    path where they vary): peak and mean KV-cache MiB, and decode tokens/s."""
    plt = pyplot()
    rows = frame[frame["task"] == "bench"].copy()
    keys = ["policy", "budget"] + [c for c in ("batch", "decode", "prefill") if c in rows and rows[c].nunique(dropna=True) > 1]
    panels = [("stats.kv_bytes_max", "KV cache, peak incl. prefill (MiB)", 2**-20), ("decode_kv", "KV cache in decode (MiB)", 2**-20),
              ("speed", "decode tokens/s", 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    lines = {}
    for _, row in rows.iterrows():
        ident = tuple("" if _missing(row.get(k)) else str(_number(row.get(k)) if isinstance(row.get(k), float) else row.get(k)) for k in keys)
        lines.setdefault(ident, []).append(row)
    order = ("full", "streamingllm", "h2o", "lacache")
    policies = sorted({k[0] for k in lines}, key=lambda p: (order.index(p) if p in order else len(order), p))
    styles = {}  # one colour per policy, one line style per value of the other keys
    for ident in lines:
        styles.setdefault(ident[1:], None)
    dashes = ["-", "--", ":", "-."]
    variants = sorted(styles, key=lambda v: tuple((x == "", float(x) if x.replace(".", "", 1).isdigit() else 0.0, x) for x in v))
    for ident in sorted(lines, key=lambda k: (policies.index(k[0]), variants.index(k[1:]))):
        points = sorted(lines[ident], key=lambda r: r["context"])
        name = " ".join(f"{k}={v}" if k not in ("policy",) else v for k, v in zip(keys, ident) if v != "")
        style = {"color": f"C{policies.index(ident[0]) % 10}", "linestyle": dashes[variants.index(ident[1:]) % len(dashes)],
                 "marker": "os^Dv"[variants.index(ident[1:]) // len(dashes) % 5], "markersize": 4}
        for ax, (column, ylabel, factor) in zip(axes, panels):
            if column == "speed":
                batch = [1 if _missing(r.get("batch")) else r.get("batch") for r in points]
                ys = [None if _missing(r.get("stats.decode_ms_per_token")) else b * 1000 / r["stats.decode_ms_per_token"]
                      for r, b in zip(points, batch)]
            elif column == "decode_kv":  # the fast path's buffers; else the exact cache's mean over forwards
                kv = [r.get("stats.kv_bytes_decode") if not _missing(r.get("stats.kv_bytes_decode")) else r.get("stats.kv_bytes_mean")
                      for r in points]
                ys = [None if _missing(v) else v * factor for v in kv]
            else:
                ys = [None if _missing(r.get(column)) else r[column] * factor for r in points]
            xs = [r["context"] for r, y in zip(points, ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], label=name, **style)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
