"""Execute a lesson notebook as the runner does, and read what a learner would see in it.

    from notebooks import assert_clean, execute, output_text

    notebook = execute("01_architecture.ipynb", tmp_path, {"model_id": "tiny"})
    assert_clean(notebook)
    assert "within 18-20 GB: True" in output_text(notebook)

``execute`` goes through ``helpers.runner.execute_notebook`` (text progress only, a kernel on local sockets),
so a test sees the notebook as the main job leaves it. pytest puts ``tests/`` on ``sys.path``, hence the bare
``from notebooks import``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

from helpers.runner import execute_notebook

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPOSITORY / "notebooks"
WIDGET = "application/vnd.jupyter.widget-view+json"
# What an executed lesson must never show: a progress bar saved as a widget or as its text, a deprecation
# warning, or the kernel's warning about its transport.
NOT_IN_OUTPUT = ("FutureWarning", "IPKernelApp", "Loading weights", "Writing model shards")


def execute(name: str, tmp_path: Path, parameters: dict | None = None, cwd: Path | None = None):
    """Run ``notebooks/<name>`` with ``parameters`` into ``tmp_path / name`` (working directory ``cwd``,
    ``notebooks/`` by default, as in JupyterLab); the executed notebook (``nbformat.NotebookNode``). A failing
    cell raises papermill's ``PapermillExecutionError``, naming the cell."""
    executed = Path(tmp_path) / name
    executed.parent.mkdir(parents=True, exist_ok=True)
    execute_notebook(NOTEBOOK_DIR / name, executed, parameters or {}, cwd or NOTEBOOK_DIR)
    return nbformat.read(executed, as_version=4)


def output_text(notebook, mime: str = "text/plain") -> str:
    """Everything the code cells of ``notebook`` (or one cell) printed (stdout, stderr), raised, or displayed as
    ``mime``. A stream's pieces are joined as written (the kernel may send one line in several); every other
    output gets lines of its own."""
    parts = []
    for cell in notebook.get("cells", [notebook]):
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                parts.append(output["text"])
            elif output["output_type"] == "error":
                parts.append(f"\n{output['ename']}: {output['evalue']}\n")
            elif mime in output.get("data", {}):
                parts.append(f"\n{output['data'][mime]}\n")
    return "".join(parts)


def assert_clean(notebook) -> None:
    """No widget output and none of ``NOT_IN_OUTPUT`` in any output (text or HTML)."""
    widgets = [i for i, cell in enumerate(notebook["cells"])
               for output in cell.get("outputs", []) if WIDGET in output.get("data", {})]
    assert not widgets, f"widget output in cells {widgets}"
    text = output_text(notebook) + output_text(notebook, "text/html")
    found = [phrase for phrase in NOT_IN_OUTPUT if phrase in text]
    assert not found, f"executed notebook shows {found}"
