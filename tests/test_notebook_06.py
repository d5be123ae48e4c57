"""Notebook 06 (predict, merge, export, parity) executes on the offline default. Without a finished main run it
trains a 5-step run itself and says the model is barely trained; given a finished run it uses it. Either way it
predicts on files it writes (one not an image), merges by hand and with the helper, and the two agree."""

import json
import os
import re
from pathlib import Path

import nbformat

from helpers.run.folder import EXPORT_RECORD
from notebooks import NOTEBOOK_DIR, REPOSITORY, assert_clean, execute, output_text

NOTEBOOK = NOTEBOOK_DIR / "06_predict_export.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    parameters = next(cell for cell in code if "parameters" in cell.metadata.get("tags", []))
    assert "run_dir" in parameters.source and "main_run" in parameters.source
    assert notebook.cells[-1].source.startswith("## Summary and takeaways")
    # the merge is shown as plain PEFT code before the helper that does it
    source = "\n".join(cell.source for cell in code)
    assert source.index("merge_and_unload()") < source.index("export_merged(")
    assert "barely trained" in "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")


def check_predictions_and_exports(text: str, work) -> None:
    assert len(re.findall(r"photo_\d\.png: \w+ \(\d\.\d{3}\) \| top 3:", text)) == 4
    assert re.search(r"skipped: \S+notes\.png -> unreadable_image", text)
    assert "Gemma4ForConditionalGeneration | LoRA layers left: 0" in text
    assert "same tensor names as the merge by hand: True | largest difference: 0.0" in text
    assert len(re.findall(r"photo_\d\.png: adapter (\w+) \(([\d.]+)\) \| merged \1 \(\2\)", text)) == 4
    assert re.search(r"transformers \+ merged +constrained +\d\.\d{3} +1\.000", text)
    record = json.loads((work / "merged" / EXPORT_RECORD).read_text())
    assert record["check"]["agreement"] == 1.0


def test_notebook_06_trains_a_short_run_or_uses_a_finished_one(tmp_path):
    # No finished main run: a 5-step run, and the notebook says what its numbers mean.
    notebook = execute(NOTEBOOK.name, tmp_path, {"work_dir": str(tmp_path / "work"),
                                                 "main_run": str(tmp_path / "no-main-run")})
    assert_clean(notebook)
    text = output_text(notebook)
    assert "no finished run in" in text and "training 5 steps here" in text
    assert "(5 optimizer steps)" in text and "A barely trained model (5 steps)" in text
    assert "A 5-step model has not learnt the classes" in text
    check_predictions_and_exports(text, tmp_path / "work")

    # A finished run as the main run, both folders given relative to the repository (the kernel runs in notebooks/).
    relative = {"work_dir": os.path.relpath(tmp_path / "again", REPOSITORY),
                "main_run": os.path.relpath(tmp_path / "work" / "run", REPOSITORY)}
    notebook = execute(NOTEBOOK.name, tmp_path / "again", relative)
    assert_clean(notebook)
    text = output_text(notebook)
    used = re.search(r"run folder: (\S+) \(\d+ optimizer steps\)", text).group(1)
    assert Path(used).resolve() == (tmp_path / "work" / "run").resolve()
    assert "training" not in text and "barely trained" not in text and "has not learnt" not in text
    check_predictions_and_exports(text, tmp_path / "again")
