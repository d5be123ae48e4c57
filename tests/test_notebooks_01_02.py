"""Notebooks 01 and 02 run top to bottom on the offline default, and show the numbers they claim."""

import json
import re

import pytest

from notebooks import NOTEBOOK_DIR, assert_clean, execute, output_text

NOTEBOOKS = ["01_architecture.ipynb", "02_clippable_linear.ipynb"]
SIZES = ["E2B", "E4B", "12B", "26B-A4B", "31B"]


def markdown_of(name: str) -> list[str]:
    notebook = json.loads((NOTEBOOK_DIR / name).read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "markdown"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_with_parameters_cell(name):
    notebook = json.loads((NOTEBOOK_DIR / name).read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code_cells)
    assert "parameters" in code_cells[0]["metadata"].get("tags", [])
    assert "metadata.version" in "".join(code_cells[1]["source"])
    markdown = markdown_of(name)
    assert "What you will learn" in markdown[0] and markdown[-1].startswith("## Summary and takeaways")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_prose_counts_the_five_sizes(name):
    """The tables show five sizes; no heading or sentence may say four."""
    prose = "\n".join(markdown_of(name))
    assert not re.search(r"\bfour (published )?sizes\b", prose, re.IGNORECASE)
    assert re.search(r"\bfive (published )?sizes\b", prose)


def test_notebook_01_runs_and_shows_the_31b_estimate(tmp_path):
    notebook = execute("01_architecture.ipynb", tmp_path, {"model_id": "tiny"})
    assert_clean(notebook)
    text = output_text(notebook)
    assert "within 18-20 GB: True" in text
    assert "26B-A4B active parameters per token (8 of 128 experts): 3.82 B" in text
    assert "31.273" in text and "25.806" in text  # totals in billions, per-tower table
    assert "Gemma4TextExperts is nn.Linear: False" in text
    assert "does not fit" in text and "NaN" not in text  # the planner says so instead of printing NaN
    facts_table = next(cell for cell in notebook.cells if "describe_preset(name)" in cell.source)
    assert all(size in output_text(facts_table) for size in SIZES)
    # the soft-token plot draws the 224x224 line and names the image that shares it
    assert "one line for several images (equal counts at every budget): [['224x224', '1024x1024']]" in text
    # the 12B: its image path, its soft tokens, its miniature
    assert "12B soft tokens equal the others' for every size and budget: True" in text
    assert "for a flat patch of each shade: {0.1: 0.0, 0.5: 0.0, 0.9: 0.0}" in text
    assert "none (Gemma4UnifiedVisionEmbedder)" in text and "35176704" in text
    assert "Gemma4UnifiedForConditionalGeneration | patch embedder: Linear(in_features=1728, out_features=64" in text


def test_notebook_02_runs_and_shows_the_clamps_hold(tmp_path):
    notebook = execute("02_clippable_linear.ipynb", tmp_path, {"model_id": "tiny-e-series", "output_bound": 0.25})
    assert_clean(notebook)
    text = output_text(notebook)
    assert "is not supported" in text and "Gemma4ClippableLinear" in text
    assert "lm_head wrapped: False" in text
    assert "wrapped module output within [output_min, output_max]: True" in text
    assert "inner .linear (base + LoRA) output outside it:          True" in text
    # training's fast clamp forward (helpers.speed) gives the same output, and is switched off again
    assert "fast clamp forwards switched on: 7" in text and "transformers' forward back on: 7" in text
    assert "same output: True" in text
    assert "q_proj.linear.lora_A.weight" in text
    assert "same tensor names as the original checkpoint: True" in text
    assert "merged equals LoRA model's output: True" in text
    # the .linear suffix list reaches E2B's audio attention too, not the vision tower alone
    assert "E2B modules the .linear list targets, per tower: {'vision': 64, 'audio': 36}" in text
    assert "kernels-community" not in text and "is_gradient_checkpointing" not in text  # no stray messages
    # the 12B: no ClippableLinear; all-linear adapts the patch embedder and the projector
    assert "Gemma4UnifiedForConditionalGeneration | clippable linears: 0" in text
    assert "naive target list error: None" in text
    assert "image path: ['model.embed_vision.patch_dense'] ['model.embed_vision.multimodal_embedder.embedding_projection']" in text
