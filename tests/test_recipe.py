"""Notebook 04 shows the Hugging Face recipe as plain code; the helpers the launcher calls build exactly the same.

The notebook's own cells are executed here (no papermill: just their source) next to ``helpers.modeling`` and
``helpers.training``, so an edit to one side that the other does not follow fails.
"""

import copy
from pathlib import Path

import nbformat
import pytest
import torch

from helpers.config import RunConfig

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_training.ipynb"


def notebook_cell(marker: str) -> str:
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"expected one cell of notebook 04 with {marker!r}"
    return cells[0]


def run_cell(marker: str, **namespace) -> dict:
    namespace = {"torch": torch, "Path": Path, **namespace}
    exec(compile(notebook_cell(marker), f"04_training.ipynb<{marker}>", "exec"), namespace)  # noqa: S102 (our own cell)
    return namespace


@pytest.mark.parametrize("quantize_towers", [False, True])
def test_the_notebooks_bitsandbytes_config_is_nf4_config(quantize_towers):
    from helpers.modeling import nf4_config, quantization_config

    config = RunConfig(quantization="4bit", quantize_towers=quantize_towers)
    shown = run_cell("BitsAndBytesConfig(", config=config)["bnb_config"]
    assert shown.to_dict() == nf4_config(quantize_towers=quantize_towers).to_dict()
    assert shown.to_dict() == quantization_config(config).to_dict()  # what the launcher passes to load_model
    assert quantization_config(RunConfig()) is None


@pytest.mark.parametrize("settings", [{}, {"optimizer": "adamw_torch", "max_steps": 7, "gradient_accumulation": 2,
                                           "seed": 3, "learning_rate": 2e-4, "warmup_steps": 0}])
def test_the_notebooks_training_arguments_are_training_arguments(tmp_path, settings, tiny_model):
    from helpers.training import planned_batch, training_arguments

    config = RunConfig(output_dir=str(tmp_path), **settings)
    shown = run_cell("TrainingArguments(", config=config, model=tiny_model)["training_args"]
    micro_batch, accumulation, _ = planned_batch(tiny_model, config)
    assert shown.to_dict() == training_arguments(config, tmp_path, micro_batch, accumulation).to_dict()


@pytest.mark.parametrize("settings", [{}, {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                           "gradient_checkpointing": True}])
def test_the_notebooks_lora_steps_are_apply_lora(tiny_model, settings):
    from helpers.modeling import apply_lora, lora_config

    config = RunConfig(**settings)
    shown = run_cell("get_peft_model(model, lora_config)", config=config, model=copy.deepcopy(tiny_model))
    helper = apply_lora(copy.deepcopy(tiny_model), config=lora_config(config.lora_r, config.lora_alpha,
                                                                      config.lora_dropout, config.lora_targets),
                        gradient_checkpointing=config.gradient_checkpointing)
    notebook_model = shown["model"]
    assert notebook_model.peft_config["default"].to_dict() == helper.peft_config["default"].to_dict()

    def trainable(model):
        return {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}

    assert trainable(notebook_model) == trainable(helper) and trainable(helper)
    assert (notebook_model.get_base_model().is_activation_checkpointing
            == helper.get_base_model().is_activation_checkpointing == config.gradient_checkpointing)


def test_the_launcher_loads_and_wraps_with_the_same_functions():
    import inspect

    from helpers import launch

    source = inspect.getsource(launch.load_lora_model)
    for call in ("load_model(", "quantization_config(config)", "lora_config(", "apply_lora("):
        assert call in source


def test_fast_clamps_are_switched_reported_and_reversible(tiny_e_series_path):
    from helpers.fast_clamps import fast_clamp_count, use_stock_clamps
    from helpers.modeling import describe_patches, load_model

    fast = load_model(str(tiny_e_series_path))
    assert fast_clamp_count(fast) > 0
    assert describe_patches(fast, False).startswith(f"fast clamps: on ({fast_clamp_count(fast)} ")
    assert "compile_layers: off" in describe_patches(fast, False)
    use_stock_clamps(fast)
    assert fast_clamp_count(fast) == 0
    stock = load_model(str(tiny_e_series_path), fast_clamps=False)
    assert fast_clamp_count(stock) == 0 and describe_patches(stock).startswith("fast clamps: off (0 ")
