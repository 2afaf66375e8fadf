"""Figures, tables, the ladder picture, the bench entry point and the analysis notebook."""

import os
from pathlib import Path


from lacache import bench
from lacache.figures import bench_table, ppl_curves, ppl_table
from lacache.ladder_plot import draw_ladder
from lacache.records import load_records

ROOT = Path(__file__).resolve().parent.parent
RECORDS = Path(__file__).parent / "fixtures" / "records"


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
    assert bench_table(frame).count("\n") == 2


def test_bench_records_every_policy(tmp_path):
    bench.main(["--model", "tiny-shape", "--span", "4", "--contexts", "96", "--budgets", "40", "--steps", "8",
                "--runs-dir", str(tmp_path)])
    frame = load_records(tmp_path)
    assert sorted(frame["policy"]) == ["full", "h2o", "lacache", "streamingllm"]
    compacting = frame[frame["policy"] != "full"]
    assert (compacting["stats.compaction_ms_per_step"] > 0).all()
    assert (frame["stats.decode_ms_per_token"] > 0).all()


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
    assert "5 records" in outputs and "lacache (budget 256" in outputs
