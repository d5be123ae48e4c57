"""Notebook 03 (collator masking) executes with papermill on the offline default and shows what it claims."""

import json
from pathlib import Path

import nbformat
import papermill

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "03_collator_masking.ipynb"


def tagged_cell(notebook, tag):
    return next(cell for cell in notebook.cells if tag in cell.metadata.get("tags", []))


def printed_json(cell) -> dict:
    text = "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")
    return json.loads(text.strip().splitlines()[-1])


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "model_id" in tagged_cell(notebook, "parameters").source


def test_notebook_03_executes_and_shows_the_masking(tmp_path):
    executed = tmp_path / NOTEBOOK.name
    papermill.execute_notebook(str(NOTEBOOK), str(executed), parameters={"model_id": "tiny", "batch_size": 4},
                               kernel_name="python3", cwd=str(REPO), progress_bar=False)
    summary = printed_json(tagged_cell(nbformat.read(executed, as_version=4), "summary"))
    assert summary["trained_text"] == summary["answer"] + "<turn|>"
    # The naive mask starts N + 1 tokens early and trains on image tokens.
    assert summary["naive_offset"] == summary["soft_tokens"] + 1
    assert "<|image|>" in summary["naive_trained_text"]
    assert summary["mask_follows"] and summary["prompt_is_training_prefix"] and summary["prompt_is_served_prompt"]
    assert summary["families"] == ["e-series", "large"]
    # N grows with the budget; 500×375 at the default 280 is 266, as measured on Google's released processor.
    by_budget = summary["soft_tokens_by_budget"]
    assert by_budget["280"] == 266
    assert [by_budget[b] for b in ("70", "140", "280", "560", "1120")] == sorted(by_budget.values())
