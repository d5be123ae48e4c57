"""helpers.teaching.memory.plan against every peak measured on the H200 (benchmarks/measured_memory.py); CPU only."""

import importlib.util
from pathlib import Path

import pytest

from helpers.teaching.memory import GB, fits, largest_micro_batch, plan

spec = importlib.util.spec_from_file_location(
    "measured_memory", Path(__file__).resolve().parent.parent / "benchmarks" / "measured_memory.py")
measured = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measured)


@pytest.mark.parametrize("name,size,kwargs,peak", measured.MEASURED, ids=[m[0] for m in measured.MEASURED])
def test_plan_within_10_percent_of_measured_peak(name, size, kwargs, peak):
    predicted = plan(size, image_tokens=256, **kwargs)["total"]
    assert abs(predicted - peak) / peak < 0.10, f"{name}: predicted {predicted / GB:.2f} GB, measured {peak / GB:.2f} GB"


def test_terms_add_up_and_grow_with_micro_batch():
    one = plan("31B", micro_batch=1)
    four = plan("31B", micro_batch=4)
    assert one["total"] == sum(v for k, v in one.items() if k != "total")
    assert four["activations"] == pytest.approx(4 * one["activations"], rel=1e-6)
    assert four["weights"] == one["weights"]


def test_checkpointing_and_labelled_loss_save_memory():
    base = {"quantization": "4bit", "lora_r": 64, "micro_batch": 4}
    assert plan("31B", gradient_checkpointing=True, **base)["activations"] < plan("31B", **base)["activations"] / 5
    assert plan("31B", loss="full", **base)["logits"] > 5 * GB
    assert plan("31B", **base)["logits"] == 0


def test_fits_answers_the_notebook_question():
    assert fits("31B", 24, quantization="4bit", lora_r=16, gradient_checkpointing=True)
    assert not fits("31B", 48, quantization="none")
    assert fits("E4B", 80, quantization="none", lora_r=16, micro_batch=8)


def test_largest_micro_batch_is_the_largest_that_fits():
    kwargs = {"quantization": "4bit", "lora_r": 16}
    best = largest_micro_batch("31B", 96, **kwargs)
    assert best is not None and fits("31B", 96, micro_batch=best, **kwargs)
    assert best == 64 or not fits("31B", 96, micro_batch=2 * best, **kwargs)
    assert largest_micro_batch("31B", 96, gradient_checkpointing=True, **kwargs) >= best
    assert largest_micro_batch("31B", 16, quantization="none") is None  # 62 GB of bf16 weights
