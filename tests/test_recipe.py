"""Notebook 04 shows the Hugging Face recipe as plain code; the functions the launcher calls build the same objects.

The notebook's own cells are executed here (their source, no kernel) next to ``helpers.modeling``,
``helpers.training`` and ``helpers.speed``, so an edit to one side that the other does not follow fails.
"""

import copy
import inspect
from pathlib import Path

import nbformat
import pytest
import torch
from transformers import AutoModelForMultimodalLM

from helpers import launch, speed
from helpers.collator import VisionChatCollator
from helpers.modeling import apply_lora, lora_config, nf4_config, quantization_config
from helpers.run.config import RunConfig
from helpers.training import (
    CompleteCheckpoints,
    StopOnNonFiniteLoss,
    answer_only_loss,
    build_trainer,
    training_arguments,
)

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def cell(notebook: str, marker: str) -> str:
    cells = [c.source for c in nbformat.read(NOTEBOOKS / notebook, as_version=4).cells
             if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"expected one cell of {notebook} with {marker!r}"
    return cells[0]


def run_cell(marker: str, notebook: str = "04_training.ipynb", **namespace) -> dict:
    namespace = {"torch": torch, "Path": Path, **namespace}
    exec(compile(cell(notebook, marker), f"{notebook}<{marker}>", "exec"), namespace)  # noqa: S102 (our own cell)
    return namespace


@pytest.mark.parametrize("quantize_towers", [False, True])
def test_the_notebooks_bitsandbytes_config_is_nf4_config(quantize_towers):
    config = RunConfig(quantization="4bit", quantize_towers=quantize_towers)
    shown = run_cell("BitsAndBytesConfig(", config=config)["nf4"]
    assert shown.to_dict() == nf4_config(quantize_towers=quantize_towers).to_dict()
    assert shown.to_dict() == quantization_config(config).to_dict()  # what the launcher and notebook 05 load with
    assert quantization_config(RunConfig()) is None


@pytest.mark.parametrize("settings", [{}, {"optimizer": "adamw_torch", "max_steps": 7, "gradient_accumulation": 2,
                                           "seed": 3, "learning_rate": 2e-4, "warmup_steps": 0,
                                           "gradient_checkpointing": True}])
def test_the_notebooks_training_arguments_are_training_arguments(tmp_path, settings):
    config = RunConfig(**settings)
    shown = run_cell("TrainingArguments(", config=config, run_dir=str(tmp_path), on_gpu=False)["training_args"]
    assert shown.to_dict() == training_arguments(config, tmp_path).to_dict()


@pytest.mark.parametrize("settings", [{}, {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
                                      {"model_id": "tiny-moe", "lora_experts": True}])
def test_the_notebooks_lora_steps_are_apply_lora(tiny_model, tiny_moe_path, settings):
    config = RunConfig(**settings)
    base = AutoModelForMultimodalLM.from_pretrained(tiny_moe_path) if config.lora_experts else tiny_model
    shown = run_cell("get_peft_model(model, lora_config)", config=config, model=copy.deepcopy(base))["model"]
    helper = apply_lora(copy.deepcopy(base), lora_config(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                         config.lora_targets, experts=config.lora_experts))
    assert shown.peft_config["default"].to_dict() == helper.peft_config["default"].to_dict()

    def trainable(model):
        return {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}

    assert trainable(shown) == trainable(helper) and trainable(helper)


def test_the_notebooks_trainer_has_build_trainers_loss_and_callbacks(tmp_path, tiny_model, tiny_processor):
    """Notebook 04 hands the additions over in cells of their own; build_trainer (the launcher's) does it in one."""
    from helpers.data import load_examples

    config = RunConfig(train_size=8, max_steps=1)
    data = load_examples("digits", "train", size=8)
    model = apply_lora(tiny_model)
    args = training_arguments(config, tmp_path)
    namespace = {"config": config, "run_dir": str(tmp_path), "model": model, "training_args": args,
                 "train_examples": data.examples, "collator": VisionChatCollator(tiny_processor, data.class_names)}
    for marker in ("trainer = Trainer(", "trainer.compute_loss_func", "trainer.add_callback(CompleteCheckpoints())"):
        namespace = run_cell(marker, **namespace)
    shown = namespace["trainer"]
    helper = build_trainer(model, args, data.examples, VisionChatCollator(tiny_processor, data.class_names))

    def additions(trainer):
        callbacks = [type(c) for c in trainer.callback_handler.callbacks if type(c) in (CompleteCheckpoints,
                                                                                          StopOnNonFiniteLoss)]
        return trainer.compute_loss_func, sorted(callbacks, key=str), trainer.data_collator.logits_to_keep

    assert additions(shown) == additions(helper) == (answer_only_loss, sorted([CompleteCheckpoints,
                                                                              StopOnNonFiniteLoss], key=str), True)
    assert namespace["resume_from"] is None  # nothing to resume in an empty folder


def test_the_launcher_builds_training_from_the_notebooks_functions():
    source = inspect.getsource(launch.load_lora_model) + inspect.getsource(launch.train_on_this_rank)
    for call in ("load_model(", "quantization_config(config)", "lora_config(", "apply_lora(", "VisionChatCollator(",
                 "training_arguments(config", "speed.switch_on(", "build_trainer(", "last_complete_checkpoint(",
                 "trainer.train(resume_from_checkpoint=", "speed.switch_off(", "publish_adapter(",
                 "record_training("):
        assert call in source, call


def test_the_notebooks_speed_cell_is_switch_on():
    assert "speed.switch_on(model, training_args, config)" in cell("04_training.ipynb", "switch_on")
    assert "speed.switch_off(model)" in cell("04_training.ipynb", "switch_off")
    assert callable(speed.switch_on) and callable(speed.switch_off)
