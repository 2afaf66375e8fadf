"""Figures, tables, the paper report (lacache.report), the experiment configs, the ladder picture, the
bench entry point and the analysis notebook."""

import os
from pathlib import Path

import numpy as np
import pytest

from lacache.harness import bench
from lacache.harness.records import load_records
from lacache.report import tables as report
from lacache.report.figures import bench_table, ppl_curves, ppl_table
from lacache.report.ladder_plot import draw_ladder

ROOT = Path(__file__).resolve().parent.parent
RECORDS = Path(__file__).parent / "fixtures" / "records"
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("paper_*.yaml") if not p.stem.endswith("_smoke"))


def test_ladder_picture_is_a_png(tmp_path):
    path = draw_ladder(8, 4, 0, 32, 4, 120, tmp_path / "ladder.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_and_curves_from_records(tmp_path):
    frame = load_records(RECORDS)
    table = ppl_table(frame)
    assert "| lacache (budget 256, S=16, O=0) | 16384 | 24.29 |" in table
    assert "| full | 20480 | 95.41 |" in table and "2851.2" in table
    assert "–" in table.splitlines()[2 + 1]  # 16K runs show missing 17K-20K windows as missing, not zero
    assert ppl_curves(frame, tmp_path / "ppl.png").stat().st_size > 1000
    assert bench_table(frame[frame["model"] == "llama3-8b-shape"]).count("\n") == 2


def test_bench_records_every_policy_and_decode_path(tmp_path):
    bench.main(["--model", "tiny-shape", "--span", "4", "--contexts", "96", "--budgets", "40", "--steps", "8",
                "--policies", "full", "streamingllm", "h2o", "lacache", "lacache_reference", "--decode", "eager", "graph",
                "--batch", "1", "2", "--runs-dir", str(tmp_path), "--plot", str(tmp_path / "bench.png")])
    frame = load_records(tmp_path)
    eager, graph = frame[frame["decode"] == "eager"], frame[frame["decode"] == "graph"]
    assert sorted(eager["policy"]) == sorted(["full", "h2o", "lacache", "lacache_reference", "streamingllm"] * 2)
    assert sorted(graph["policy"]) == sorted(["full", "h2o", "lacache", "streamingllm"] * 2)  # the paths with a fast decode
    assert sorted(set(frame["batch"])) == [1, 2]
    compacting = frame[(frame["policy"] != "full") & ~((frame["policy"] == "h2o") & (frame["decode"] == "graph"))]
    assert (compacting["stats.compaction_ms_per_step"] > 0).all()
    evicting = graph[graph["policy"] == "h2o"]  # its eviction is inside the step: no separate compaction time
    assert evicting["stats.compaction_ms_per_step"].isna().all()
    assert (frame["stats.decode_ms_per_token"] > 0).all()
    assert (graph["stats.kv_bytes_decode"] > 0).all()
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_rejects_an_unknown_policy_before_loading_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--model", "tiny-shape", "--policies", "nope", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown ['nope']; valid:" in err and "lacache_reference" in err


# ---------------------------------------------------------------------------------------------- statistics
def test_bootstrap_ci_matches_the_normal_approximation_and_is_seeded():
    values = [0.0, 1.0] * 50  # mean 0.5, standard error 0.05: a 95% CI of about 0.5 -/+ 0.098
    lo, hi = report.bootstrap_ci([values])
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert report.bootstrap_ci([values]) == (lo, hi)  # fixed seed: the same interval every time
    smooth = list(np.random.default_rng(3).uniform(0, 1, 30))
    assert report.bootstrap_ci([smooth], seed=1) != report.bootstrap_ci([smooth])  # the seed is what fixes it
    assert report.bootstrap_ci([[0.3] * 5]) == pytest.approx((0.3, 0.3))  # no spread, no width
    assert report.bootstrap_ci([[1.0]]) is None  # one sample: nothing to resample
    assert report.bootstrap_ci([[0.0, 1.0], [1.0]]) is None  # every stratum needs two


def test_bootstrap_resamples_within_strata():
    # two tasks, each perfectly consistent: the task-weighted mean is 0.5 in every resample, whereas
    # pooling the 20 samples would give a wide interval
    assert report.bootstrap_ci([[0.0] * 10, [1.0] * 10]) == pytest.approx((0.5, 0.5))
    assert report.bootstrap_ci([[0.0] * 10 + [1.0] * 10])[1] - report.bootstrap_ci([[0.0] * 10 + [1.0] * 10])[0] > 0.3
    # strata weigh equally whatever their size
    est = report.estimate({"a": [1.0, 1.0], "b": [0.0, 0.0, 0.0, 0.0]}, scale=100)
    assert est.value == pytest.approx(50.0) and est.n == 6


def test_paired_difference_on_shared_ids():
    rng = np.random.default_rng(7)
    base = rng.uniform(0, 1, 40)
    a = {("t", i): float(x + 0.1) for i, x in enumerate(base)}
    b = {("t", i): float(x) for i, x in enumerate(base)}
    a[("t", 99)] = 50.0  # an id only one run holds must not count
    diff = report.paired_difference(a, b, scale=100)
    assert diff.value == pytest.approx(10.0) and diff.ci == pytest.approx((10.0, 10.0)) and diff.n == 40
    # unpaired, the same two runs could not be told apart: their CIs overlap widely
    ca = report.estimate({"t": [a[k] for k in b]}, scale=100).ci
    cb = report.estimate({"t": list(b.values())}, scale=100).ci
    assert ca[0] < cb[1]
    # a noisy difference: a real interval around the true mean, centred on the sample mean
    noisy = {k: v + float(rng.normal(0.05, 0.2)) for k, v in b.items()}
    est = report.paired_difference(noisy, b)
    d = np.array([noisy[k] - b[k] for k in b])
    assert est.value == pytest.approx(d.mean())
    assert est.ci[0] < d.mean() < est.ci[1]
    assert est.ci[1] - est.ci[0] == pytest.approx(2 * 1.96 * d.std() / np.sqrt(len(d)), rel=0.2)
    # strata: task-weighted mean of the differences (1.0 on two ids of t1, 0.0 on four of t2)
    a2 = {("t1", 0): 1.0, ("t1", 1): 1.0, **{("t2", i): 0.0 for i in range(4)}}
    b2 = {k: 0.0 for k in a2}
    assert report.paired_difference(a2, b2, stratum=lambda k: k[0]).value == pytest.approx(0.5)
    assert report.paired_difference({"x": 1.0}, {"y": 1.0}) is None


def test_ppl_estimate_over_windows():
    est = report.ppl_estimate([(100, 20.0), (100, 20.0), (50, 20.0)])
    assert est.value == pytest.approx(20.0) and est.ci == pytest.approx((20.0, 20.0))
    windows = [(100, p) for p in (10.0, 40.0, 10.0, 40.0)]  # exp(mean log) = 20
    est = report.ppl_estimate(windows)
    assert est.value == pytest.approx(20.0) and est.ci[0] < 20.0 < est.ci[1]
    same = report.ppl_estimate(windows, windows)
    assert same.value == pytest.approx(0.0) and same.ci == pytest.approx((0.0, 0.0))


# ---------------------------------------------------------------------------------------------- tables
def test_missing_cells_render_as_missing_never_zero():
    table = report.Table("t", ["run", "a", "b"], [])
    note = table.note("skipped: no data")
    table.rows.append([report.Cell(text="x"), report.Cell(), report.Cell(note=note)])
    table.rows.append([report.Cell(text="y"), report.Cell(0.0, (0.0, 0.0)), report.Cell(-0.04, signed=True)])
    md, tex = table.markdown(), table.latex()
    assert "| x | — | —¹ |" in md and "¹ skipped: no data" in md
    assert "| y | 0.0 [0.0, 0.0] | +0.0 |" in md  # a measured zero is a zero; rounding never prints -0.0
    assert r"x & --- & ---\textsuperscript{1} \\" in tex and r"\toprule" in tex and r"\textsuperscript{1}skipped: no data" in tex


def test_report_from_fixture_records(tmp_path):
    frame = report.load(RECORDS)
    assert set(frame["experiment"]) == {"ruler", "longbench", "ablation", "niah", "ppl", "bench"}
    skipped = frame[frame["status"] == "skipped"]
    assert len(skipped) and skipped["policy"].notna().all() and skipped["task"].notna().all()
    files = report.render(RECORDS, tmp_path)
    names = {p.name for p in files}
    for name in sorted(set(frame["experiment"])):  # every result the records hold (none here for lm_eval)
        assert {f"{name}.md", f"{name}.tex"} <= names
        assert (tmp_path / f"{name}.tex").read_text().count(r"\begin{tabular}") >= 1
    assert "index.md" in names
    pngs = [p for p in files if p.suffix == ".png"]
    assert {p.name.split("_")[0] for p in pngs} == {"ppl", "ablation", "niah", "bench"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    ruler = (tmp_path / "ruler.md").read_text()
    assert "| run | compress | niah_single_1 | niah_single_2 | niah_multikey_1 | vt | qa_1 | qa_2 | avg |" in ruler
    assert "lacache (budget 0.5, S=16, O=0) − streamingllm (budget 0.5) |" in ruler  # a paired difference
    longbench = (tmp_path / "longbench.md").read_text()
    assert "| full | prompt | —¹ | —¹ | —¹ | —¹ |" in longbench and "¹ skipped: TaskConfigError: could not load LongBench" in longbench
    ablation = (tmp_path / "ablation.md").read_text()
    assert "| S=4 |" in ablation and "—¹" in ablation and "overlap=4 must be < span=4" in ablation
    ppl = (tmp_path / "ppl.md").read_text()
    assert "| full | 20480 | 95.41 [" in ppl and "| 15360 |" in ppl  # 16K runs pair with the full cache on 15 windows
    assert "0.0 [" not in (tmp_path / "longbench.md").read_text()


def test_rendering_twice_is_byte_identical(tmp_path):
    first = report.render(RECORDS, tmp_path / "a")
    second = report.render(RECORDS, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    again = report.render(RECORDS, tmp_path / "a")  # over its own output: nothing changes
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(again, second))


def test_report_cli_on_an_empty_runs_folder(tmp_path):
    (tmp_path / "runs").mkdir()  # a missing folder is an error (tests/test_robustness.py)
    report.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert "No records" in (tmp_path / "out" / "index.md").read_text()


# ---------------------------------------------------------------------------------------------- experiments
def _sweep_points(name: str):
    """(config, overrides) of every point of ``python run.py -m +experiment=<name>``, composed but not run."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
        params = OmegaConf.to_container(base.hydra.sweeper.params)
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        (batch,) = BasicSweeper.split_arguments(parsed, None)
        return [(compose("config", overrides=[f"+experiment={name}", *point]), point) for point in batch]


# Layer counts of the full variants' hub models (checked offline: their configs are not downloaded here).
HUB_LAYERS = {"smollm2-1.7b-instruct": 24}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_and_its_smoke_variant_compose(name):
    from omegaconf import OmegaConf

    from lacache import models
    from lacache.harness.runner import build
    from lacache.ladder import LadderConfigError, validate
    from lacache.policy import PolicyConfigError

    for variant in (name, f"{name}_smoke"):
        points = _sweep_points(variant)
        assert len(points) >= 2, variant
        skipped = []
        for cfg, point in points:
            assert cfg.paper.experiment in report.RESULTS
            spec = models.ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
            policy, task = build(cfg.cache, "cache"), build(cfg.task, "task")  # settings valid for their classes
            if variant.endswith("_smoke"):
                assert spec.name == "smollm2-135m" and spec.source == "package" and cfg.progress is False
                config = models.load_config(spec)
                try:
                    policy.check(config)
                    if task.name != "longbench":  # LongBench's check loads the data (the hub): skipped offline
                        task.check(config, policy, models.max_length(spec, config))
                except (PolicyConfigError, LadderConfigError) as err:
                    skipped.append((point, str(err)))
            else:
                assert spec.source == "hub"
                if policy.name == "lacache":
                    try:
                        validate(HUB_LAYERS[spec.name], policy.span, policy.overlap)
                    except LadderConfigError as err:
                        skipped.append((point, str(err)))
        if name == "paper_ablation":  # grids may hold impossible ladders (recorded as skipped), but few
            assert len(skipped) <= len(points) // 2, (variant, skipped)
            if variant.endswith("_smoke"):
                assert [p for p, _ in skipped] == [["cache.span=4", "cache.overlap=4", "cache.layout=reference"]]
        else:
            assert not skipped, (variant, skipped)


def test_experiments_sweep_the_paper_settings():
    def ids(name):
        points = [(cfg.cache.get("_target_").rsplit(".", 1)[-1], cfg.cache.get("budget")) for cfg, _ in _sweep_points(name)]
        return list(dict.fromkeys(points))  # paper_ruler runs each once per task.compress mode (test_compress.py)

    policies = ["FullCachePolicy", "StreamingLLMPolicy", "H2OPolicy", "SnapKVPolicy", "TOVAPolicy", "PyramidKVPolicy", "LaCachePolicy"]
    for name in ("paper_ruler", "paper_niah", "paper_ruler_smoke", "paper_niah_smoke"):
        assert ids(name) == list(zip(policies, [None] + [0.5] * 6))
    assert ids("paper_ppl") == list(zip(policies, [None] + [256] * 6))
    longbench = ids("paper_longbench")
    assert sorted({b for _, b in longbench} - {None}) == [0.25, 0.5] and ("FullCachePolicy", None) in longbench
    ppl = _sweep_points("paper_ppl")[0][0]
    assert ppl.task.num_tokens == 16384 and ppl.task.dataset == "pg_essays"
    ablation = {tuple(point) for _, point in _sweep_points("paper_ablation_smoke")}
    assert len(ablation) == 6 and all(cfg.cache.budget == 0.5 for cfg, _ in _sweep_points("paper_ablation_smoke"))


# ---------------------------------------------------------------------------------------------- notebook
def test_analysis_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["LACACHE_RUNS"], os.environ["LACACHE_ROOT"] = str(RECORDS), str(ROOT)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["LACACHE_RUNS"], os.environ["LACACHE_ROOT"]
    outputs = "".join(str(o) for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    total = len(list((RECORDS / "records").glob("*.json")))
    assert f"{total} records" in outputs and "lacache (budget 256" in outputs
    for title in ("RULER", "LongBench", "span × overlap", "Needle in a haystack", "Streaming perplexity", "Speed and memory"):
        assert title in outputs, title
    assert "paired differences" in outputs and "shared samples" in outputs and "image/png" in outputs
    # the fixtures' six 1K ladders (a/b 1/8, 1/4, 2/7, 1/2 twice, 2/3): Spearman by hand from their ranks, -10 / sqrt(17 * 16.5)
    assert "0.5, 1024.0, 'prompt'): 6 ladders, Spearman(RULER avg, a/b) = -0.60" in outputs


def test_splice_rewrites_only_the_generated_blocks(tmp_path, monkeypatch):
    """A document's tables come from records: its lacache.report blocks are re-rendered, the prose is kept,
    figures land beside the document, and a second splice changes nothing."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(RECORDS, tmp_path / "data")  # a runs folder: data/records/<key>.json
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nProse before.\n\n<!-- lacache.report runs=data section=ruler -->\nstale table\n"
                   "<!-- /lacache.report -->\n\nProse between.\n\n<!-- lacache.report runs=data section=ppl level=2 -->\n"
                   "<!-- /lacache.report -->\n\nProse after.\n")
    assert report.splice(doc) == 2
    text = doc.read_text()
    assert "stale table" not in text and "Prose before." in text and "Prose between." in text and "Prose after." in text
    assert "lacache (budget 0.5, S=16, O=0) − streamingllm (budget 0.5) |" in text and "## Streaming perplexity" in text
    figures = [line for line in text.splitlines() if line.startswith("![")]
    assert figures and all("](img/data/" in line for line in figures)
    assert all((doc.parent / line.split("](")[1].rstrip(")")).is_file() for line in figures)
    first = doc.read_bytes()
    report.splice(doc)
    assert doc.read_bytes() == first
    doc.write_text("<!-- lacache.report runs=data section=nope -->\n<!-- /lacache.report -->\n")
    with pytest.raises(ValueError, match="section=<one of"):
        report.splice(doc)


def _ruler_record(key, experiment, policy, scores, **ids):
    """A minimal RULER record: per-sample scores of niah_single_1 (sample ids 0..n-1)."""
    samples = [{"task": "niah_single_1", "index": i, "score": s} for i, s in enumerate(scores)]
    return {"schema": 1, "key": key, "status": "ok", "config": {"paper": {"experiment": experiment}},
            "ids": {"model": "m", "policy": policy, "budget": 0.5, "task": "ruler", "context_length": 2048,
                    "compress": "prompt", **ids},
            "metrics": {"ruler/niah_single_1": 100 * sum(scores) / len(scores)}, "samples": samples}


def test_ablation_grids_split_by_sink_take_other_sweeps_ladders_and_pair_with_streamingllm(tmp_path):
    """Grids per (layout, sink); a LaCache point another sweep ran fills its cell; each cell minus
    StreamingLLM is the mean of the per-sample differences (checked by hand); gzipped records read alike."""
    import gzip
    import json

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 40).tolist()
    ladders = {("ab4", 4, 0, 4): rng.integers(0, 2, 40).tolist(), ("aba", 4, 0, "auto"): rng.integers(0, 2, 40).tolist(),
               ("ab8", 8, 4, 4): rng.integers(0, 2, 40).tolist()}
    records = [_ruler_record("stream", "ruler", "streamingllm", base, sink=4),
               _ruler_record("ru16", "ruler", "lacache", [1] * 40, span=16, overlap=0, sink=4, layout="reference")]
    records += [_ruler_record(k, "ablation", "lacache", s, span=span, overlap=o, sink=sink, layout="reference")
                for (k, span, o, sink), s in ladders.items()]
    folder = tmp_path / "runs" / "records"
    folder.mkdir(parents=True)
    for record in records:
        (folder / f"{record['key']}.json.gz").write_bytes(gzip.compress(json.dumps(record).encode()))
    (tmp_path / "runs" / "records" / "wrong.json.gz").write_bytes(gzip.compress(json.dumps(records[0]).encode()))
    frame = report.load(tmp_path / "runs")
    assert sorted(frame["key"]) == sorted(r["key"] for r in records)  # the misnamed file is reported and skipped
    section = report.ablation_section(frame, tmp_path)
    titles = [t.title for t in section.tables]
    assert sum("sink 4" in t for t in titles) == 2 and sum("sink auto" in t for t in titles) == 2
    grid = section.tables[titles.index(next(t for t in titles if t.startswith("LaCache S × O, RULER") and "sink 4" in t))]
    text = grid.markdown()
    assert "| S=16 | 100.0 [100.0, 100.0] | — |" in text  # columns O=0, O=4: the ruler sweep's S=16 O=0 point
    diff = section.tables[titles.index(next(t for t in titles if "− streamingllm" in t and "sink 4" in t))].markdown()
    want = 100 * (np.mean(ladders[("ab4", 4, 0, 4)]) - np.mean(base))
    assert f"| S=4 | {want:+.1f} [" in diff
    assert f"| S=16 | {100 * (1 - np.mean(base)):+.1f} [" in diff


def test_the_throughput_table_sets_each_row_against_hf_generate_at_its_batch_size(tmp_path):
    import pandas as pd

    def row(key, policy, decode, batch, rate=None, status="ok", reason=None):
        return {"key": key, "status": status, "reason": reason, "model": "llama3-8b-shape", "policy": policy,
                "budget": None if policy == "full" else 0.5, "decode": decode, "batch_size": batch, "task": "ruler",
                "context_length": 4096, "fill": "exact", "compress": "prompt", "experiment": "throughput",
                "stats.samples_per_min": rate, "stats.batch_rows_mean": None if rate is None else float(batch),
                "stats.generated_tokens_mean": None if rate is None else 89.0, "stats.peak_device_bytes": 20 * 2**30}

    frame = pd.DataFrame([
        row("a", "full", "hf-generate", 8, 100.0), row("b", "full", "hf-generate", 32, 150.0),
        row("c", "lacache", "fast", 8, 400.0), row("d", "lacache", "triton", 32, 600.0),
        row("e", "h2o", "triton", 32, status="skipped", reason="decode=triton is not available for h2o; use decode=fast"),
        row("f", "tova", "fast", 32, status="failed", reason="CUDA out of memory"),
    ])
    (table,) = report.throughput_section(frame, tmp_path).tables
    cells = {(r[0].text.split(" ")[0], r[1].text, r[2].text): [c.markdown() for c in r[3:]] for r in table.rows}
    assert cells[("lacache", "fast", "8")][:2] == ["400", "4.00"]  # against the anchor at batch 8, not 32
    assert cells[("lacache", "triton", "32")][:2] == ["600", "4.00"]
    assert cells[("full", "hf-generate", "32")][:2] == ["150", "1.00"]
    assert ("h2o", "triton", "32") not in cells  # a path the policy does not have: left out, not "missing"
    assert cells[("tova", "fast", "32")][0] == "—¹" and table.notes == ["failed: CUDA out of memory"]
    assert cells[("lacache", "fast", "8")][2:] == ["8.0", "89", "20.0"]
