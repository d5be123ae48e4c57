"""The notebooks' parameters cells hold the knobs a learner turns, with RunConfig's defaults; the runner passes
every other RunConfig field in their ``settings`` dict."""

import ast
from pathlib import Path

import nbformat
import pytest

from helpers.run.config import RunConfig
from helpers.runner import SETTINGS, notebook_parameters

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def parameters_cell(name: str):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters'"
    return cells[0].source


def parameters_of(name: str) -> dict:
    values = {}
    for node in ast.parse(parameters_cell(name)).body:
        assert isinstance(node, ast.Assign), f"{name}: the parameters cell holds plain assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("name", ["04_training", "05_evaluation"])
def test_parameters_are_run_config_fields_with_its_defaults(name):
    values = parameters_of(name)
    assert len(parameters_cell(name).splitlines()) <= 15  # the knobs a learner turns, not every field
    assert values.pop(SETTINGS) == {}
    assert set(values) <= set(RunConfig.field_names())
    defaults = RunConfig().to_dict()
    different = {k: (values[k], defaults[k]) for k in values if values[k] != defaults[k]}
    assert not different, f"{name}: parameters differ from RunConfig defaults: {different}"


def test_the_runner_passes_the_cells_names_and_the_rest_in_settings():
    params = RunConfig(lora_r=8, optimizer="adamw_torch", gradient_checkpointing=True).to_dict()
    passed = notebook_parameters(NOTEBOOKS / "04_training.ipynb", params)
    assert passed["lora_r"] == 8 and passed[SETTINGS]["gradient_checkpointing"] is True
    assert set(passed) - {SETTINGS} == set(parameters_of("04_training")) - {SETTINGS}
    assert set(passed) | set(passed[SETTINGS]) == set(params) | {SETTINGS}  # every field reaches the notebook
    assert RunConfig(**{k: v for k, v in passed.items() if k != SETTINGS}, **passed[SETTINGS]) == RunConfig(**params)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} carries outputs"
