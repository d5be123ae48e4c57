"""Notebook 03 (collator masking) executes on the offline default and shows what it claims."""

import re

import nbformat

from notebooks import NOTEBOOK_DIR, assert_clean, execute, output_text

NOTEBOOK = NOTEBOOK_DIR / "03_collator_masking.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    parameters = next(cell for cell in code if "parameters" in cell.metadata.get("tags", []))
    assert "model_id" in parameters.source


def test_notebook_03_executes_and_shows_the_masking(tmp_path):
    notebook = execute(NOTEBOOK.name, tmp_path, {"model_id": "tiny", "batch_size": 4})
    assert_clean(notebook)
    text = output_text(notebook)
    # The backward search trains on the answer and <turn|> alone, for every sample and image budget.
    assert "backward search:    four <turn|>\n" in text
    assert "every trained text is the answer + <turn|>: True" in text
    # The naive mask starts N + 1 tokens early and trains on image tokens.
    early, n_plus_one = map(int, re.search(r"naive mask starts (\d+) tokens early \(N \+ 1 = (\d+)\)", text).groups())
    assert early == n_plus_one
    assert re.search(r"naive trains on: +<\|image\|> × \d+", text)
    # The evaluation prompt is the training prefix and the served prompt, for both families.
    assert "in every case the evaluation prompt is the training prefix and the served prompt: True" in text
    checks = next(cell for cell in notebook.cells if "prompt is the served prompt" in cell.source)
    assert "large" in output_text(checks) and "e-series" in output_text(checks)
    # N grows with the budget; 500×375 at the default 280 is 266, as measured on Google's released processor.
    row = re.search(r"500×375 +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)", text)
    assert [int(n) for n in row.groups()] == [63, 130, 266, 540, 1064]
    # The prompt tables show the special tokens: escaped, so a browser prints <bos> instead of swallowing it.
    html = "".join(output.data["text/html"] for cell in notebook.cells for output in cell.get("outputs", [])
                   if "text/html" in output.get("data", {}))
    assert "&lt;bos&gt;" in html and "&lt;channel|&gt;" in html and "&lt;turn|&gt;" in html
    assert "<bos>" not in html and "<channel|>" not in html
