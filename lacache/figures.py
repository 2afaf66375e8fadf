"""Figures drawn from run records (pure functions of ``load_records`` frames)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (creating folders) and release it."""
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _number(value):
    if value is None or value != value:  # None or NaN (missing in this row)
        return None
    return int(value) if float(value).is_integer() else value


def label(row) -> str:
    budget = _number(row.get("budget"))
    if row.get("policy") == "lacache":
        return f"lacache (budget {budget}, S={_number(row.get('span'))}, O={_number(row.get('overlap'))})"
    return f"{row.get('policy')}" + (f" (budget {budget})" if budget is not None else "")


def ppl_curves(frame, path: str | Path, title: str = "Streaming perplexity per window") -> Path:
    """PPL per window against tokens seen, one line per run of ``task=ppl``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for _, row in frame[frame["task"] == "ppl"].sort_values("policy").iterrows():
        points = row["curves"].get("ppl_window", [])
        ax.plot([p["end"] for p in points], [p["ppl"] for p in points], marker="o", markersize=3, label=label(row))
    ax.set_yscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("PPL of the window (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def ppl_table(frame) -> str:
    """Markdown table: PPL per 1K window (columns) for each ``task=ppl`` run (rows)."""
    runs = frame[frame["task"] == "ppl"].sort_values("policy")
    def kilo(end):  # windows are labelled by the 1K boundary they end at (the last ends one token short)
        return -(-end // 1024)

    ends = sorted({kilo(p["end"]) for curves in runs["curves"] for p in curves.get("ppl_window", [])})
    head = "| run | tokens | overall | " + " | ".join(f"≤{e}K" for e in ends) + " |"
    lines = [head, "|" + "---|" * (3 + len(ends))]
    for _, row in runs.iterrows():
        by_end = {kilo(p["end"]): p["ppl"] for p in row["curves"].get("ppl_window", [])}
        cells = [f"{by_end[e]:.1f}" if e in by_end else "–" for e in ends]
        lines.append(f"| {label(row)} | {_number(row['num_tokens'])} | {row['metrics.ppl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_table(frame) -> str:
    """Markdown table of ``lacache.bench`` records: speed, compaction share of the step, memory."""
    rows = frame[frame["task"] == "bench"].copy()
    rows["budget_sort"] = rows["budget"].fillna(0)
    lines = ["| policy | budget | context | prefill | prefill tok/s | decode ms/token | compaction ms/step | compaction / step | KV MiB (max) | peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in rows.sort_values(["context", "budget_sort", "policy"]).iterrows():
        compact = row.get("stats.compaction_ms_per_step")
        share = f"{100 * compact / row['stats.decode_ms_per_token']:.1f}%" if compact == compact and compact is not None else "–"
        peak = row.get("stats.peak_device_bytes")
        lines.append(
            f"| {row['policy']} | {_number(row['budget']) or '–'} | {_number(row['context'])} | {row.get('prefill', 'full')} | "
            f"{row['stats.prefill_tokens_per_s']:.0f} | {row['stats.decode_ms_per_token']:.2f} | "
            f"{'–' if share == '–' else f'{compact:.2f}'} | {share} | {row['stats.kv_bytes_max'] / 2**20:.0f} | "
            f"{'–' if peak != peak or peak is None else f'{peak / 2**30:.1f}'} |"
        )
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
