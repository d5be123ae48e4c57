"""Notebook 06 (predict, merge, export, parity) executes with papermill on the offline default: it trains a
5-step run itself, predicts on files it writes (one not an image), and the merged model matches the adapter."""

import json
from pathlib import Path

import nbformat
import papermill
from test_notebook_03 import printed_json, tagged_cell

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "06_predict_export.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "run_dir" in tagged_cell(notebook, "parameters").source
    assert notebook.cells[-1].source.startswith("## Summary and takeaways")


def test_notebook_06_executes(tmp_path):
    executed = tmp_path / NOTEBOOK.name
    papermill.execute_notebook(str(NOTEBOOK), str(executed), parameters={"work_dir": str(tmp_path / "work")},
                               kernel_name="python3", cwd=str(REPO / "notebooks"), progress_bar=False)
    summary = printed_json(tagged_cell(nbformat.read(executed, as_version=4), "summary"))
    assert summary["predicted"] == 4 and summary["skipped"] == ["unreadable_image"]
    assert summary["merged_equals_adapter"]
    merged = next(r for r in summary["parity"] if r["engine"] == "transformers + merged" and r["method"] == "constrained")
    assert merged["agreement"] == 1.0
    record = json.loads((tmp_path / "work" / "merged" / "export.json").read_text())
    assert record["check"]["agreement"] == 1.0
