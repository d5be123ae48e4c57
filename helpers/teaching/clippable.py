"""Inspecting ``Gemma4ClippableLinear`` and what LoRA does around it. Taught in notebook 02.

``Gemma4ClippableLinear`` (transformers ``models/gemma4/modeling_gemma4.py``) is an ``nn.Module`` that holds
an ``nn.Linear`` called ``.linear`` and, when its config has ``use_clipped_linears``, four scalar buffers
``input_min``, ``input_max``, ``output_min``, ``output_max``: forward clamps the input, applies ``.linear``,
and clamps the output. It is used in the vision and audio towers only.
"""

from __future__ import annotations

import copy
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

from helpers.modeling import CLIP_BUFFERS, apply_lora, trainable_parameters
from helpers.teaching.presets import TOWERS, tower_of

PEFT_PREFIX = "base_model.model."

# The target list many LoRA recipes use: it names the ClippableLinear wrappers, which PEFT rejects.
NAIVE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LM_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
# The alternatives notebook 02 compares (PEFT matches a string as a full regex, a list as name suffixes).
TARGET_ALTERNATIVES = {
    "all-linear": "all-linear",
    "language model only (regex)": rf".*language_model.*\.({LM_PROJECTIONS})",
    "vision + audio attention .linear (list)": [f"{name}.linear" for name in NAIVE_TARGETS],
    "language model + every .linear (regex)": rf".*language_model.*\.({LM_PROJECTIONS})|.*\.linear",
}


def find_clippable_linears(model) -> dict:
    """``{module name: Gemma4ClippableLinear}`` for every clippable linear (PEFT-wrapped or not)."""
    return {strip_peft_prefix(name): module for name, module in model.named_modules()
            if isinstance(module, Gemma4ClippableLinear)}


def strip_peft_prefix(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def tower_of_module(module_name: str) -> str:
    """The tower (see ``helpers.teaching.presets.TOWERS``) of a module name, with or without PEFT's prefix."""
    return tower_of(f"{strip_peft_prefix(module_name)}.weight")


def clippable_linears_by_tower(model) -> dict[str, int]:
    """How many ``Gemma4ClippableLinear`` each tower has, and how many of them clip."""
    counts: dict[str, dict[str, int]] = {}
    for name, module in find_clippable_linears(model).items():
        row = counts.setdefault(tower_of_module(name), {"clippable linears": 0, "clipping on": 0})
        row["clippable linears"] += 1
        row["clipping on"] += int(module.use_clipped_linears)
    return counts


def clip_bounds(module) -> dict[str, float]:
    """The four bounds of one ``Gemma4ClippableLinear`` (empty when clipping is off: no buffers exist)."""
    if not module.use_clipped_linears:
        return {}
    return {name: getattr(module, name).item() for name in CLIP_BUFFERS}


@torch.no_grad()
def set_clip_bounds(model, input_bound: float = float("inf"), output_bound: float = float("inf")) -> int:
    """Give every clipping ``Gemma4ClippableLinear`` symmetric bounds ``[-bound, bound]``; returns how many.

    The released checkpoints carry their own bounds; the tiny model starts at ``±inf`` (no clipping).
    """
    changed = 0
    for module in find_clippable_linears(model).values():
        if module.use_clipped_linears:
            module.input_min.fill_(-input_bound)
            module.input_max.fill_(input_bound)
            module.output_min.fill_(-output_bound)
            module.output_max.fill_(output_bound)
            changed += 1
    return changed


def naive_lora_error(model, target_modules=None) -> str | None:
    """The ``ValueError`` PEFT raises for ``target_modules=NAIVE_TARGETS`` (``None`` if it does not raise).

    Tried on a deep copy: a failed ``get_peft_model`` may leave the model half wrapped.
    """
    try:
        apply_lora(copy.deepcopy(model), target_modules=target_modules or NAIVE_TARGETS)
    except ValueError as error:
        return str(error)
    return None


def lora_wrapped_modules(peft_model) -> dict[str, list[str]]:
    """``{tower: [module names]}`` of the modules that received a LoRA adapter (PEFT prefix stripped)."""
    wrapped: dict[str, list[str]] = OrderedDict((tower, []) for tower in TOWERS)
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            wrapped[tower_of_module(name)].append(strip_peft_prefix(name))
    return {tower: names for tower, names in wrapped.items() if names}


def trainable_by_target(model, alternatives: dict | None = None, r: int = 16) -> dict[str, dict]:
    """For each target choice: wrapped modules per tower and trainable parameters (or the error it raises)."""
    results = {}
    for label, targets in (alternatives or TARGET_ALTERNATIVES).items():
        try:
            peft_model = apply_lora(copy.deepcopy(model), r=r, alpha=r, target_modules=targets)
        except ValueError as error:
            results[label] = {"error": str(error).splitlines()[0]}
            continue
        wrapped = lora_wrapped_modules(peft_model)
        results[label] = {"trainable": trainable_parameters(peft_model)[0],
                          "wrapped per tower": {tower: len(names) for tower, names in wrapped.items()}}
    return results


@torch.no_grad()
def enlarge_lora_update(peft_model, value: float = 1.0) -> int:
    """Fill every ``lora_B`` (PEFT starts them at zero) with ``value`` so the LoRA update is large."""
    filled = 0
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.fill_(value)
            filled += 1
    return filled


@torch.no_grad()
def clamp_check(clippable, inputs: torch.Tensor) -> dict[str, float]:
    """Output range of a (LoRA-wrapped) ``Gemma4ClippableLinear`` next to its unclamped inner ``.linear``.

    ``.linear`` is the LoRA layer after wrapping, so its output includes the LoRA update; the wrapper's
    forward still clamps around it.
    """
    clamped = clippable(inputs)
    unclamped = clippable.linear(torch.clamp(inputs, clippable.input_min, clippable.input_max))
    return {
        "output_min": clippable.output_min.item(),
        "output_max": clippable.output_max.item(),
        "wrapped module min": clamped.min().item(),
        "wrapped module max": clamped.max().item(),
        "inner .linear min": unclamped.min().item(),
        "inner .linear max": unclamped.max().item(),
    }


def saved_adapter_keys(peft_model, directory: str | Path | None = None) -> list[str]:
    """The tensor names in ``adapter_model.safetensors`` after ``save_pretrained``."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(directory or scratch)
        peft_model.save_pretrained(folder)
        with safe_open(folder / "adapter_model.safetensors", framework="pt") as adapter_file:
            return sorted(adapter_file.keys())


def merged_layout_matches(original_state_dict_keys, merged_model) -> bool:
    """True when ``merge_and_unload`` gave back exactly the original checkpoint's tensor names."""
    return set(original_state_dict_keys) == set(merged_model.state_dict().keys())
