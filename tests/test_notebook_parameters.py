"""The notebooks' parameters cells stay in step with RunConfig (the runner validates through it)."""

import ast
from pathlib import Path

import nbformat
import pytest

from helpers.config import RunConfig

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def parameters_of(name: str) -> dict:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters'"
    values = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), f"{name}: the parameters cell holds plain assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("name", ["04_training", "05_evaluation"])
def test_parameters_are_the_run_config_fields_with_its_defaults(name):
    values = parameters_of(name)
    defaults = RunConfig().to_dict()
    assert set(values) == set(RunConfig.field_names())
    different = {k: (values[k], defaults[k]) for k in values if k != "output_dir" and values[k] != defaults[k]}
    assert not different, f"{name}: parameters differ from RunConfig defaults: {different}"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} carries outputs"
