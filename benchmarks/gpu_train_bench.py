"""Training throughput and memory on one GPU: the seed's recipe and this repository's, side by side, in one run.

Real-shape Gemma 4 (``helpers.teaching.presets``) with random weights (``benchmarks.realshape``): memory and
speed are real, accuracy is not. Every variant but the ``stream-files*`` ones trains the same synthetic stream
(one 224×224 image per sample at the default 280-soft-token budget -> 256 soft tokens, 2,520 padded patches;
a 12-token prompt; a 1-4 token class name; labels from the model turn on, as the seed's collator sets them).

Variants (see ``variants_for``):
- ``ref``: the seed's recipe with transformers' ``Trainer`` (TRL 1.16's ``SFTTrainer`` computes its loss with
  a fused LM head at labelled positions only, which is not the seed's full-vocabulary loss; it is measured
  separately as ``ref-trl``): NF4 double quant, bf16 compute and storage, transformers' default skip list (the
  vision tower is quantized); LoRA r=64 α=64 dropout 0.05 all-linear, adapters cast to bf16 as TRL does;
  micro-batch 1 × accumulation 16; activation checkpointing (TRL's default); the model's own loss over
  full-vocabulary logits at every position; AdamW (fused), lr 5e-5, weight decay 0.01, linear schedule, 10%
  warm-up, bf16 autocast. Its trainer and LoRA are written out here (``reference_trainer``, ``seed_lora``):
  they reproduce the seed, not this repository.
- ``default``: what a user of the size gets from docs/one-gpu.md's command (LoRA r64 α64, 16 samples a step,
  bf16 LoRA for E2B/E4B and QLoRA for the rest) with every speed switch at ``RunConfig``'s default: layers
  compiled where ``helpers.speed.should_compile_layers`` says, the planner's micro-batch, ``switch_on``'s
  data-loader workers. ``default-nf4-in-graph`` (the 4-bit sizes): the same, with bitsandbytes' NF4 weights
  dequantized by torch ops that inductor fuses into the compiled layers (``benchmarks/nf4_in_graph.py``);
  ``ours-q-compile-nf4-in-graph`` (31B) is ``ours-q-compile`` so, profiled alike with ``--profile``.
  ``default-sync-free-images`` (every size but the 12B, whose model is another class): the defaults with the images
  merged into the text without waiting for the GPU (``benchmarks/sync_free_images.py``);
  ``ours-q-compile-sync-free-images`` (31B) is ``ours-q-compile`` so, profiled alike.
- ``ours-*`` and ``stream-*``: the shipped code, nothing copied, put together as ``helpers.launch`` trains one
  process (``train_ours``): ``helpers.modeling.apply_lora``; ``helpers.training.training_arguments`` for the
  variant's ``RunConfig`` (``ours_config``: its micro-batch, accumulation, rank, quantization, optimizer,
  ``compile_layers``, checkpointing, ``dataloader_workers``); ``helpers.speed.switch_on`` (fast clamps, compiled
  layers, on a GPU the planned micro-batch for ``mb × ga`` samples a step, data-loader workers); transformers'
  ``Trainer`` with ``compute_loss_func=helpers.training.answer_only_loss`` (logits at the answer's positions
  only: the batches carry ``logits_to_keep``) and the ``CompleteCheckpoints`` and ``StopOnNonFiniteLoss``
  callbacks. Only the benchmark's learning rate and step count are its own. The largest micro-batch of a
  candidate list that trains. ``*-liger*`` rows first switch liger-kernel's RMSNorm and GeGLU on
  (``benchmarks/liger.py``).
- ``stream-synthetic`` / ``stream-files-w0`` / ``stream-files`` (E4B bf16 compiled, 31B QLoRA): one model trained
  in turn on the synthetic stream, then on the user's path (``user_data``: JPEG files of varied sizes on disk,
  ``helpers.data.load_examples``, ``VisionChatCollator`` with the released image geometry) with the collator in
  the training process (workers 0) and with ``switch_on``'s default workers: what the data path costs.

Timing: per optimizer step, ``step_s`` from the Trainer's ``on_step_begin`` to ``on_step_end`` (it calls the
first after fetching the step's batches: compute only) and ``period_s`` from one ``on_step_end`` to the next
(everything, the wait for data too); ``data_wait_s`` is the time ``Trainer.get_batch_samples`` took (the main
process waiting for the collator or its workers). ``samples_per_s`` uses ``step_s``; ``wall_samples_per_s``
uses ``period_s`` (the streams' comparison). Medians after the first step.

MFU: useful FLOPs per sample = 2 × (forward FLOPs of the vision tower, the decoder and ``lm_head`` at the
labelled positions), counted on one sample by ``forward_flops``: the frozen base costs one forward and one
input-gradient pass of the same size (the "4·N·T" rule; LoRA's own weight gradients are ignored). HFU adds one
more forward when every layer is checkpointed (the recompute). The ratio is taken against the H200's datasheet
dense bf16 peak, 989 TFLOP/s, and also against the ~790 TFLOP/s that an 8192³ bf16 matmul reaches on the H200
these benchmarks run on.

Run from the repository root: ``python -m benchmarks.gpu_train_bench --sizes E4B,31B --out $OUT``
(``--variants "stream-*"`` for the user's path; ``--shrink --quick --no-compile`` for a CPU smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import statistics
import time
import traceback
from pathlib import Path

import torch

from benchmarks.gpu_gaps import annotate_modules, export_and_analyse
from benchmarks.liger import liger_kernel_count
from benchmarks.realshape import (
    answer_loss,
    build_model,
    reference_nf4_config,
    shrunk_config,
    synthetic_batch,
)

# Sizes (width, height) of the generated image files: phone and camera shapes, landscape and portrait, square,
# panorama-like; what a user's folder holds (Oxford-IIIT Pet's photos are ~500x375).
PHOTO_SIZES = [(500, 375), (375, 500), (640, 480), (480, 640), (1024, 768), (800, 600), (1280, 720), (720, 1280),
               (300, 300), (600, 600), (1600, 1200), (1200, 1600), (1000, 500), (250, 400), (4032, 3024)]
PEAK_DATASHEET = 989e12
PEAK_MEASURED = 790e12
GLOBAL_BATCH = 16
# The weights docs/one-gpu.md gives each size: bf16 LoRA for the E-series, QLoRA for the rest.
DEFAULT_WEIGHTS = {"E2B": "bf16", "E4B": "bf16", "12B": "nf4", "26B-A4B": "nf4", "31B": "nf4"}

# Micro-batch candidates for "the largest that fits", tried in order; first that trains wins.
BEST_MB = {
    ("E2B", "bf16"): (32, 16, 8), ("E2B", "nf4"): (32, 16, 8), ("E4B", "bf16"): (32, 16, 8), ("E4B", "nf4"): (32, 16, 8),
    ("12B", "bf16"): (16, 8, 4), ("12B", "nf4"): (32, 16, 8),
    ("26B-A4B", "bf16"): (16, 8, 4), ("26B-A4B", "nf4"): (16, 8, 4),
    ("31B", "bf16"): (8, 4, 2), ("31B", "nf4"): (16, 8, 4),
}


def variants_for(size: str, quick: bool = False) -> list[dict]:
    """The variants of one size, most important first (a deadline skips the tail)."""
    def ours(name, quant, mb, **kw):
        v = {"name": name, "quant": quant, "mb": mb, "ga": None, "ckpt": 0, "dropout": 0.0, "loss": "labelled",
             "lora_dtype": "bf16", "trainer": "trainer", "r": 64, "steps": 3}
        v.update(kw)
        return v

    ref = {"name": "ref", "quant": "ref4", "mb": (1,), "ga": 16, "ckpt": 1, "dropout": 0.05, "loss": "full",
           "lora_dtype": "bf16", "trainer": "trainer", "r": 64, "steps": 2}
    # The user's path beside the synthetic stream, one model trained in turn by the three (see user_data):
    # ready tensors, image files with the collator in the main process, and with switch_on's default workers.
    streams = [
        {"name": "stream-synthetic", "stream": "synthetic", "workers": 0},
        {"name": "stream-files-w0", "stream": "files", "workers": 0},
        {"name": "stream-files", "stream": "files", "workers": None},
    ]
    if size in ("E4B", "E2B"):
        out = [ours(s["name"], "bf16", BEST_MB[(size, "bf16")][:2], lora_dtype="fp32", steps=10, compile=True,
                    reuse=True, stream=s["stream"], workers=s["workers"]) for s in streams]
    elif size == "31B":
        out = [ours(s["name"], "nf4", (8,), ga=2, steps=8, reuse=True, stream=s["stream"], workers=s["workers"])
               for s in streams]
        # compile_layers on the 4-bit model, on ready tensors and on files (varied lengths: the recompile path)
        out += [ours(s["name"] + "-compiled", "nf4", (8,), ga=2, steps=8, reuse=True, compile=True,
                     stream=s["stream"], workers=s["workers"]) for s in streams if s["name"] != "stream-files-w0"]
    else:
        out = []
    if size in ("E4B", "E2B"):  # the compiled run, profiled inside training, and candidates for a higher MFU
        out += [
            ours("compiled-profile", "bf16", (32,), lora_dtype="fp32", steps=8, compile=True, profile_step=5),
            ours("compiled-lora-bf16", "bf16", (32,), lora_dtype="bf16", steps=8, compile=True),
        ]
    if size == "31B":
        out += [
            # the speed-up over the seed: the planner's micro-batch (16 a step -> 8 x 2), then Liger's kernels
            # (benchmarks/liger.py), then compile_layers on the 4-bit model, then the seed itself
            ours("ours-q-planned", "nf4", (16,), ga=1, steps=6),
            ours("ours-q-liger-helper", "nf4", (16,), ga=1, steps=6, liger=True),
            ours("ours-q-compile", "nf4", (16,), ga=1, steps=7, compile=True, profile_step=5),
            # the same with NF4 dequantized inside the compiled layers (benchmarks/nf4_in_graph.py), profiled alike
            ours("ours-q-compile-nf4-in-graph", "nf4", (16,), ga=1, steps=7, compile=True, profile_step=5,
                 nf4_in_graph=True),
            # the same with the images merged without a wait for the GPU (benchmarks/sync_free_images.py)
            ours("ours-q-compile-sync-free-images", "nf4", (16,), ga=1, steps=7, compile=True, profile_step=5,
                 sync_free_images=True),
            dict(ref, steps=3),  # two timed steps (each 16 micro-batches of 1)
            ours("ours-q-compile-liger", "nf4", (16,), ga=1, steps=7, compile=True, liger=True),
            ours("ours-q-mb1-r64", "nf4", (1,), ga=16, ckpt=1, steps=1),
            ours("ours-q", "nf4", BEST_MB[(size, "nf4")], profile=True),
            ours("ours-bf16", "bf16", BEST_MB[(size, "bf16")]),
            ours("ours-q-mb1-r16", "nf4", (1,), ga=16, ckpt=1, steps=1, r=16),
            ours("ours-q-liger", "nf4", (16, 8), liger=True),
            dict(ref, name="ref-trl", loss="trl", trainer="trl"),
            # the memory target (peak at micro-batch 1): 8-bit AdamW states, and/or the vision tower in NF4
            ours("ours-q-mb1-r16-adam8", "nf4", (1,), ga=4, ckpt=1, steps=2, r=16, optim="adamw_bnb_8bit"),
            ours("ours-qv-mb1-r16", "nf4-towers", (1,), ga=4, ckpt=1, steps=2, r=16),
            ours("ours-qv-mb1-r16-adam8", "nf4-towers", (1,), ga=4, ckpt=1, steps=2, r=16, optim="adamw_bnb_8bit"),
            ours("ours-qv-mb1-r64-adam8", "nf4-towers", (1,), ga=4, ckpt=1, steps=2, r=64, optim="adamw_bnb_8bit"),
            ours("ours-q-mb1-r16-2", "nf4", (1,), ga=4, ckpt=1, steps=2, r=16),
            # what might lift the compiled step's CPU-bound forward: CUDA graphs (what torch.compile's
            # mode="reduce-overhead" turns on) and inductor's C++ wrapper, set around training (inductor_settings).
            # Last, so that a deadline skips them first: CUDA graphs fail in the first step (a LoRA output
            # overwritten by a later replay), and the C++ wrapper trains no faster and compiles twice as long.
            ours("ours-q-compile-cudagraphs", "nf4", (16,), ga=1, steps=7, compile=True, profile_step=5,
                 inductor={"triton.cudagraphs": True}),
            ours("ours-q-compile-cppwrap", "nf4", (16,), ga=1, steps=7, compile=True, inductor={"cpp_wrapper": True}),
        ]
    elif size == "12B":  # no Liger variant: its Gemma 4 patches target models/gemma4, not gemma4_unified
        out += [
            ref,
            ours("ours-q-mb1-r16", "nf4", (1,), ga=16, ckpt=1, steps=1, r=16),  # peak at micro-batch 1 (QLoRA)
            ours("ours-q", "nf4", BEST_MB[(size, "nf4")], profile=True),
            ours("ours-bf16", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=4),
            # compiled: 32 first, 16 when 32 does not fit
            ours("ours-bf16-compile", "bf16", (32, 16), lora_dtype="fp32", steps=5, compile=True),
        ]
    elif size == "26B-A4B":
        out += [
            # LoRA on the experts (lora_experts) beside the same rank without, both at rank 16 with checkpointing
            # (the experts' folded copy of every layer does not fit 80 GB without it: helpers.teaching.memory),
            # then the seed's recipe on the same model, then the rest
            ours("ours-q-r16-ckpt", "nf4", (8, 4, 2), ckpt=1, r=16),
            ours("ours-q-experts-r16-ckpt", "nf4", (8, 4, 2), ckpt=1, r=16, experts=True),
            ref,
            ours("ours-q-experts-r16", "nf4", (4, 2, 1), r=16, experts=True),
            ours("ours-q", "nf4", BEST_MB[(size, "nf4")]),
            ours("ours-bf16", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=4),
        ]
    else:
        out += [
            ref,
            ours("ours-bf16", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=4, profile=True),
            ours("ours-bf16-liger", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=4, liger=True),
            ours("ours-q", "nf4", BEST_MB[(size, "nf4")]),
            ours("ours-bf16-ckpt", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", ckpt=1),
            ours("ours-bf16-compile", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=5, compile=True),
            ours("ours-bf16-lora16", "bf16", BEST_MB[(size, "bf16")], steps=4),
        ]
    if size in ("E2B", "E4B", "12B", "26B-A4B"):  # compile_layers on the 4-bit model, beside ours-q
        out.append(ours("ours-q-compile", "nf4", BEST_MB[(size, "nf4")], steps=5, compile=True))
    if size == "31B":  # CUDA graphs again, with each micro-batch's forward marked as a new step
        marked_graphs = {"inductor": {"triton.cudagraphs": True}, "mark_steps": True, "compile": True, "steps": 7,
                         "workers": None}  # the defaults' data-loader workers, as the default variant beside them
        out += [
            ours("ours-q-compile-cudagraphs-marked", "nf4", (16,), ga=1, **marked_graphs),
            # marked, and each LoRA gradient copied out of the graphs' memory before it is accumulated: a
            # parameter's first .grad of a step is a graph output, which the next micro-batch's replay overwrites
            ours("ours-q-compile-cudagraphs-marked-clonegrads", "nf4", (16,), ga=1, clone_grads=True, **marked_graphs),
        ]
    # What a user gets: docs/one-gpu.md's command for the size (rank 64, 16 samples a step, the size's weights)
    # with every speed switch left at RunConfig's default (compiled layers, planned micro-batch, workers).
    default = ours("default", DEFAULT_WEIGHTS[size], (16,), ga=1, steps=6, compile=None, workers=None,
                   lora_dtype="fp32" if DEFAULT_WEIGHTS[size] == "bf16" else "bf16")
    out.insert(0, default)
    if DEFAULT_WEIGHTS[size] == "nf4":  # the defaults with the NF4 weights dequantized inside the compiled layers
        out.insert(1, dict(default, name="default-nf4-in-graph", nf4_in_graph=True))
    if size != "12B":  # the defaults with the images merged into the text without a wait (a Gemma4Model's hook)
        out.insert(1, dict(default, name="default-sync-free-images", sync_free_images=True))
    if quick:
        for v in out:
            v["steps"] = min(v["steps"], 3 if v.get("stream") else 2)
            v["ga"] = min(v["ga"] or 2, 2)
            v["mb"] = tuple(min(m, 2) for m in v["mb"])
    return out


# ----------------------------------------------------------------------------------------------- data
class Rows(torch.utils.data.Dataset):
    """Per-sample tensors (unpadded); ``collate`` right-pads them like the seed's processor call."""

    def __init__(self, batch: dict):
        self.rows = []
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            self.rows.append({k: (v[i, :n] if k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
                                  else v[i]) for k, v in batch.items()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows: list[dict], pad_id: int = 0, logits_to_keep: bool = False) -> dict:
    """Right-pads the per-token tensors, stacks the image tensors. ``logits_to_keep``: the batch also carries
    ``helpers.collator.answer_logit_positions(labels)``, as ``VisionChatCollator(logits_to_keep=True)`` gives it
    (what ``answer_only_loss`` needs)."""
    length = max(r["input_ids"].shape[0] for r in rows)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}
    out = {}
    for key in rows[0]:
        if key in fill:
            t = torch.full((len(rows), length), fill[key], dtype=torch.long)
            for i, r in enumerate(rows):
                t[i, : r[key].shape[0]] = r[key]
            out[key] = t
        else:
            out[key] = torch.stack([r[key] for r in rows])
    if logits_to_keep:
        from helpers.collator import answer_logit_positions

        out["logits_to_keep"] = answer_logit_positions(out["labels"])
    return out


def collate_answer_only(rows: list[dict]) -> dict:
    """``collate`` for the shipped loss: the batch carries ``logits_to_keep``."""
    return collate(rows, logits_to_keep=True)


# ----------------------------------------------------------------------------------------------- model
def build(size: str, quant: str, shrink: bool, device, config=None):
    """The real-shape model with random weights: bf16, our NF4 (``nf4``; ``nf4-towers`` quantizes the vision
    tower too) or the seed's NF4 (``ref4``), with transformers' own clamps (``helpers.speed.switch_on`` gives
    ours the fast ones)."""
    from helpers.teaching.presets import preset_config

    if config is None:
        config = shrunk_config(size) if shrink else preset_config(size)
    if quant == "bf16":  # float32 on a CPU (smoke tests), where bf16 matmuls are slow
        model = build_model(config, "none", device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    elif quant == "ref4":
        model = build_model(config, "4bit", quantization_config=reference_nf4_config(), device=device)
    elif quant == "nf4-towers":  # ours, with the vision tower in NF4 as well (the seed's choice)
        from helpers.modeling import nf4_config

        model = build_model(config, "4bit", quantization_config=nf4_config(quantize_towers=True), device=device)
    else:
        model = build_model(config, "4bit", device=device)
    if device == "cpu" and quant != "bf16":  # see keep_cpu_weights_as_quantized
        keep_cpu_weights_as_quantized(model)
    from helpers.teaching.clippable import set_clip_bounds

    # Released E2B/E4B carry finite learned bounds; random init leaves ±inf. Finite (and wide, so they
    # do not change the numbers) keeps every clamp's cost in the measurement, stock or fast.
    set_clip_bounds(model, 1e4, 1e4)
    return model


def keep_cpu_weights_as_quantized(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place for its own kernel at the first
    forward in eval mode without gradients (here ``forward_flops``); training then runs on the repacked bytes, and
    ``benchmarks/nf4_in_graph.py`` would misread them. The smoke runs keep the layout weights were quantized in,
    as on a GPU."""
    from benchmarks.nf4_in_graph import four_bit_linears

    for module in four_bit_linears(model):
        module.support_avx512bf16_for_cpu = False


def seed_lora(model, v: dict):
    """The seed's LoRA (``ref``): all-linear on a frozen base, adapters cast to bf16 as TRL does, activation
    checkpointing turned on by the Trainer (``activation_checkpointing=True``), inputs made to require grads
    as TRL does. Kept apart from ours on purpose: it reproduces the seed, not this project."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    if v["ckpt"]:
        model.enable_input_require_grads()
    config = LoraConfig(r=v["r"], lora_alpha=v["r"], lora_dropout=v["dropout"], target_modules="all-linear",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def ours_lora(model, v: dict):
    """Our LoRA: ``helpers.modeling.apply_lora``, what the launcher calls (notebook 04's ``get_peft_model``);
    activation checkpointing is a training argument (``ours_config``)."""
    from helpers.modeling import apply_lora

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[v["lora_dtype"]]
    return apply_lora(model, r=v["r"], alpha=v["r"], dropout=v["dropout"], lora_dtype=dtype,
                      experts=bool(v.get("experts")))


def ours_config(v: dict, mb: int, ga: int, out_dir: str):
    """The variant's ``RunConfig``, from which ``train_ours`` builds the training (the benchmark's lr and steps)."""
    from helpers.run.config import RunConfig

    return RunConfig(
        model_id="real-shape random weights", batch_size=mb, gradient_accumulation=ga, max_steps=v["steps"],
        learning_rate=5e-5, warmup_steps=0, lora_r=v["r"], lora_alpha=v["r"], lora_dropout=v["dropout"],
        quantization="none" if v["quant"] == "bf16" else "4bit", quantize_towers=v["quant"] == "nf4-towers",
        optimizer="adamw_8bit" if v.get("optim") == "adamw_bnb_8bit" else "adamw_torch",
        compile_layers=v.get("compile", False), gradient_checkpointing=bool(v["ckpt"]),
        save_steps=10**6, output_dir=out_dir, dataloader_workers=v.get("workers", 0),
        lora_experts=bool(v.get("experts")),
    )


def reference_args(v: dict, mb: int, ga: int, out_dir: str, cpu: bool):
    """The seed's TrainingArguments (``ref``): lr 5e-5, weight decay 0.01, linear schedule, 10% warm-up,
    fused AdamW, bf16, checkpointing by the Trainer."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=mb, gradient_accumulation_steps=ga,
        max_steps=v["steps"], learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="linear",
        warmup_steps=0.1, logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none",
        bf16=not cpu, use_cpu=cpu, remove_unused_columns=False, dataloader_num_workers=0,
        activation_checkpointing=bool(v["ckpt"]),
        optim=v.get("optim") or ("adamw_torch_fused" if not cpu else "adamw_torch"), seed=0, disable_tqdm=True,
    )


def reference_trainer(model, v, rows, mb, ga, out_dir, cpu, timer):
    """The seed's trainer: transformers' Trainer with the model's own loss (``ref``), or TRL's SFTTrainer."""
    from transformers import Trainer

    if v["trainer"] == "trl":
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=mb, gradient_accumulation_steps=ga,
            max_steps=v["steps"], learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="linear",
            warmup_steps=0.1, logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none",
            bf16=not cpu, use_cpu=cpu, max_length=1024, dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
        )
        peft_config = LoraConfig(r=v["r"], lora_alpha=v["r"], lora_dropout=v["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        from datasets import Dataset

        from helpers.tiny import build_tokenizer

        # SFTTrainer wants a datasets.Dataset: an index column, and a collator that looks the rows up
        # (the seed's collator runs the processor; ours hands over the same pre-built tensors)
        index = Dataset.from_dict({"idx": list(range(len(rows)))})
        return SFTTrainer(model=model, args=args, train_dataset=index, peft_config=peft_config,
                          processing_class=build_tokenizer(),
                          data_collator=lambda items: collate([rows[it["idx"]] for it in items]),
                          callbacks=[timer])

    class FullLogitsTrainer(Trainer):
        """The model's own loss: logits over the whole vocabulary at every position (the seed's)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs, use_cache=False)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return FullLogitsTrainer(model=model, args=reference_args(v, mb, ga, out_dir, cpu), train_dataset=rows,
                             data_collator=collate, callbacks=[timer])


def make_timer():
    """Per optimizer step: ``times`` from ``on_step_begin`` to ``on_step_end`` (forward, backward, optimizer:
    the Trainer calls ``on_step_begin`` after it has fetched the step's batches) and ``periods`` from one
    ``on_step_end`` to the next (everything, the wait for data included). Synchronised at both ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.periods, self.t0, self.t_end = [], [], None, None

        def _now(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = self._now()

        def on_step_end(self, args, state, control, **kw):
            now = self._now()
            self.times.append(now - self.t0)
            if self.t_end is not None:
                self.periods.append(now - self.t_end)
            self.t_end = now

    return StepTimer()


def timed_data_fetch(get_batch_samples, waits: list):
    """``trainer.get_batch_samples`` timed into ``waits``: the fetch of one optimizer step's micro-batches from
    the data loader, where the main process waits for the collator, or for its workers. Set on the one trainer
    instance; transformers' class is left as it is."""
    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = get_batch_samples(*args, **kwargs)
        waits.append(time.perf_counter() - t)
        return out

    return timed


# ----------------------------------------------------------------------------------------------- user's data
def write_image_folder(root: Path, per_class: int, classes, seed: int = 0) -> dict:
    """JPEG files of varied sizes and aspect ratios, one sub-folder per class (the layout ``load_examples``
    reads): smooth random colour fields with noise, so they decode and compress like photos, not like flat
    colour. Returns how many of each size were written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = PHOTO_SIZES[(c * per_class + i) % len(PHOTO_SIZES)]
            coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
            noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"{i:03d}.jpg", quality=88)
            written[f"{w}x{h}"] = written.get(f"{w}x{h}", 0) + 1
    return written


def user_data(size: str, config, root: Path, per_class: int, shrink: bool):
    """The user's path for ``size``: image files on disk -> ``helpers.data.load_examples`` (decoded, validated)
    -> ``VisionChatCollator`` over a Gemma 4 processor with the released geometry (patch 16, pooling 3,
    budget 280; 70 when shrunk) and the chat template of the size's family.

    The vocabulary is the tiny checkpoint's (``helpers.tiny.build_tokenizer``: Gemma's special tokens, a
    small BPE), not the released 262,144 pieces, which are not available offline: the model's special-token
    ids are moved to it (``config`` is changed in place). Its text runs a few tokens per sample longer or
    shorter than the released tokenizer's would; the image work is the released processor's.
    """
    from helpers.chat import E_SERIES, LARGE, NAMED_SPECIAL_TOKENS, VIDEO_TOKEN
    from helpers.collator import VisionChatCollator
    from helpers.data import PET_BREEDS, load_examples
    from helpers.tiny import build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    family = E_SERIES if size.startswith("E") else LARGE
    processor = build_processor(tokenizer, family, max_soft_tokens=70 if shrink else 280, patch_size=16)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in NAMED_SPECIAL_TOKENS.items()}
    for attr, name in (("image_token_id", "image_token"), ("boi_token_id", "boi_token"), ("eoi_token_id", "eoi_token"),
                       ("audio_token_id", "audio_token"), ("boa_token_id", "boa_token"), ("eoa_token_index", "eoa_token")):
        if hasattr(config, attr):
            setattr(config, attr, ids[name])
    if hasattr(config, "video_token_id"):
        config.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    info = {}
    if not (root / "done").exists():
        t = time.perf_counter()
        info["written"] = write_image_folder(root, per_class, [n.replace(" ", "_") for n in PET_BREEDS])
        info["write_s"] = round(time.perf_counter() - t, 1)
        (root / "done").write_text("ok\n")
    t = time.perf_counter()
    examples = load_examples(str(root), "train", None, 0, test_fraction=0.05)
    info.update(load_s=round(time.perf_counter() - t, 1), examples=len(examples), skipped=examples.skipped,
                classes=len(examples.class_names))
    collator = VisionChatCollator(processor, examples.class_names, logits_to_keep=True)  # for answer_only_loss
    probe = collator(examples.examples[:8])
    info["tokens_per_sample"] = round(float(probe["attention_mask"].sum(1).float().mean()), 1)
    info["image_tokens_per_sample"] = round(float((probe["input_ids"] == config.image_token_id).sum(1).float().mean()), 1)
    info["patches"] = int(probe["pixel_values"].shape[1])
    return examples.examples, collator, info


# ----------------------------------------------------------------------------------------------- one variant
@contextlib.contextmanager
def inductor_settings(settings: dict | None):
    """Inductor's config patched with ``settings`` for one variant; dynamo's caches are cleared before and
    after, so that neither this variant nor the next reuses a graph compiled under other settings."""
    if not settings:
        yield
        return
    import torch._inductor.config

    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(settings):
            yield
    finally:
        torch._dynamo.reset()


def compiled_layer_count(model) -> int:
    """Modules that ``torch.compile`` compiled in place (``helpers.speed.compile_layers``'s layers)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def train_ours(model, v, examples, collator, mb, ga, run_dir: str, callbacks, waits, planned: dict):
    """The variant trained as ``helpers.launch.train_on_this_rank`` trains one process, from the shipped pieces:
    ``training_arguments`` for its ``RunConfig``, ``speed.switch_on`` (on a GPU it plans the micro-batch for
    ``mb x ga`` samples a step), the adapters image training never runs frozen, ``helpers.training.build_trainer``
    (``answer_only_loss`` and the two callbacks), ``trainer.train()``, ``speed.switch_off``. ``callbacks``: the
    benchmark's timer and profiler; ``waits`` gets each step's data fetch time; ``planned`` gets the micro-batch
    and accumulation ``switch_on`` chose (a failed variant's row keeps them). No adapter is saved.
    Returns (``TrainResult``, the config, how many layers ran compiled)."""
    from helpers import speed
    from helpers.launch import freeze_unused_adapters
    from helpers.training import TrainResult, build_trainer, training_arguments

    shutil.rmtree(run_dir, ignore_errors=True)
    config = ours_config(v, mb, ga, run_dir)
    args, switched = speed.switch_on(model, training_arguments(config, run_dir), config,
                                     liger=liger_kernel_count(model) > 0)
    print(switched, flush=True)
    planned.update(mb=args.per_device_train_batch_size, ga=args.gradient_accumulation_steps)  # kept if training fails
    freeze_unused_adapters(model)
    trainer = build_trainer(model, args, examples, collator, callbacks)
    trainer.get_batch_samples = timed_data_fetch(trainer.get_batch_samples, waits)
    compiled = compiled_layer_count(model)
    # CUDA graphs need each replay's outputs dead before the next one: a new step at every micro-batch's forward
    hooks = [model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())] if (
        v.get("mark_steps")) else []
    if v.get("clone_grads"):  # .grad then lives outside the graphs' memory pool (gradient accumulation reads it)
        hooks += [p.register_hook(torch.Tensor.clone) for p in model.parameters() if p.requires_grad]
    if v.get("sync_free_images"):  # a forward pre-hook on the Gemma4Model (benchmarks/sync_free_images.py)
        from benchmarks.sync_free_images import merge_images_without_sync

        hooks.append(merge_images_without_sync(model))
    settings = contextlib.nullcontext()
    if v.get("nf4_in_graph"):
        from benchmarks import nf4_in_graph

        settings = nf4_in_graph.keep_packed_for_backward()
    try:
        if v.get("nf4_in_graph"):
            print(f"NF4 dequantized in the graph: {nf4_in_graph.dequantize_in_graph(model)} layers", flush=True)
        with settings:  # the layers compile at the first step, inside trainer.train()
            trainer.train()
    finally:
        speed.switch_off(model)  # the next variant, or reuse of this model, starts eager
        for hook in hooks:
            hook.remove()
        if v.get("nf4_in_graph"):
            nf4_in_graph.dequantize_in_kernels(model)
    return TrainResult.of(trainer), config, compiled


KERNEL_KINDS = [  # (kind, substrings of CUDA kernel names), first match wins
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "splitk", "sm90_", "sm80_")),
    ("4-bit dequantize", ("dequantize", "kdequant", "rshift")),  # rshift: inductor's (benchmarks/nf4_in_graph.py)
    ("optimizer", ("multi_tensor", "adam")),
    ("inductor-fused (triton)", ("triton_",)),  # before liger: inductor's names say "gelu" too
    ("liger", ("_rms_norm", "geglu", "_gelu")),
    ("copy / cast", ("copy", "memcpy", "memset", "cast")),
    ("reduction", ("reduce",)),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def step_profiler(step: int, out_path: Path):
    """A callback that profiles optimizer step ``step`` (counting from 0) inside training: compiled layers,
    optimizer and all, as the user's run does it. ``summary``: device time per kernel kind (``KERNEL_KINDS``),
    the kernels' total against the step's wall time (the rest: the GPU waiting for the CPU), the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.prof, self.t0, self.summary = None, None, {}

        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == step and self.prof is None:
                self.handles = annotate_modules(model) if model is not None else []
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None or self.summary:
                return
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            for handle in self.handles:
                handle.remove()
            averages = self.prof.key_averages()
            out_path.write_text(averages.table(sort_by="self_cuda_time_total", row_limit=60))
            idle = export_and_analyse(self.prof, out_path.with_suffix(".trace.json.gz"), kind_of=kernel_kind)
            # kernel time by kind from the trace, where each kernel appears once (key_averages also gives the
            # annotate_modules ranges their kernels' time)
            kinds = {kind: ms / 1e3 for kind, ms in idle.get("kernel_ms_by_kind", {}).items()}
            total = sum(kinds.values())
            kernels = [e for e in averages if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
                       and not e.key.startswith("## ")]
            top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
            self.summary = {
                "step": step, "wall_s": round(wall, 4), "kernel_s": round(total, 4),
                "gpu_busy_share": round(total / wall, 3) if wall else None,
                "by_kind_s": {k: round(t, 4) for k, t in kinds.items()},
                "by_kind_share": {k: round(t / total, 3) for k, t in kinds.items()} if total else {},
                "top_kernels": [(e.key[:90], round(e.self_device_time_total / 1e6, 4), e.count) for e in top],
                "idle": idle,
            }
            print("idle:", json.dumps(self.summary["idle"]), flush=True)

    return StepProfiler()


# ----------------------------------------------------------------------------------------------- FLOPs
def forward_flops(model, batch) -> int:
    """FLOPs of one forward through vision tower, decoder and lm_head at the labelled positions.

    Every matmul of the model goes through ``F.linear`` (``nn.Linear``, LoRA, the MoE experts), a
    bitsandbytes ``Linear4bit`` (one custom op: counted with a hook) or SDPA (4·B·H·Lq·Lk·D, the whole
    square, masks ignored): all three are counted; elementwise work is not.
    """
    import torch.nn.functional as F

    total = [0]
    linear, sdpa = F.linear, F.scaled_dot_product_attention

    inside_4bit = [0]

    def counting_linear(x, weight, bias=None):
        if not inside_4bit[0]:  # a 4-bit layer's own dequantize + F.linear is counted by its hook
            total[0] += 2 * (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1]
        return linear(x, weight, bias)

    def pre_hook(mod, args):
        inside_4bit[0] += 1

    def counting_sdpa(q, k, v, *args, **kwargs):
        total[0] += 4 * q.numel() // q.shape[-1] * k.shape[-2] * q.shape[-1]
        return sdpa(q, k, v, *args, **kwargs)

    def hook(mod, args, _out):
        inside_4bit[0] -= 1
        total[0] += 2 * (args[0].numel() // mod.in_features) * mod.in_features * mod.out_features

    dev = next(p.device for p in model.parameters() if not p.is_meta)
    batch = {k: v.to(dev) for k, v in batch.items()}
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    hooks = []
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            hooks += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook)]
    F.linear, F.scaled_dot_product_attention = counting_linear, counting_sdpa
    try:
        with torch.no_grad(), ctx:
            answer_loss(model, batch)
    finally:
        F.linear, F.scaled_dot_product_attention = linear, sdpa
        for h in hooks:
            h.remove()
    return total[0]


def profile_step(model, v, rows, mb, out_path: Path, top: int = 12) -> list[tuple[str, float]]:
    """One forward+backward of the variant under torch.profiler; the top ops by self device time."""
    from torch.profiler import ProfilerActivity, profile

    batch = {k: t.cuda() for k, t in collate([rows[i] for i in range(mb)]).items()}
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = answer_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    out_path.write_text(table)
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    return [(e.key[:60], round(100 * getattr(e, "self_device_time_total", 0) / total, 1)) for e in events[:top]]


# ----------------------------------------------------------------------------------------------- run
def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_key(size, v):
    return (size, v["quant"], v["r"], v["dropout"], v["ckpt"], v["lora_dtype"], bool(v.get("liger")),
            bool(v.get("experts")))


def median_after_warmup(values: list, skip: int = 1):
    """Median of ``values`` after the first ``skip`` (compilation, allocator warm-up), or of all if too few."""
    kept = values[skip:] or values
    return statistics.median(kept) if kept else None


def failed_sizes(planned: dict, mb: int, ga: int) -> dict:
    """A failed variant's micro-batch and accumulation: as ``switch_on`` planned them if it got that far, and as
    asked."""
    return {"mb": planned.get("mb", mb), "ga": planned.get("ga", ga), "mb_asked": mb, "ga_asked": ga}


def run_variant(size, v, rows, args, flops_cache, out_dir: Path, kept: dict, streams: dict, config=None) -> dict:
    """One variant: ``ref`` through the seed's trainer, every ``ours-*`` / ``stream-*`` through ``train_ours``.

    ``kept`` holds a LoRA-wrapped model between variants marked ``reuse`` with the same model settings (the
    streams of one size train one model in turn: same weights, fewer builds and compilations)."""
    cpu = not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    result = {"size": size, "variant": v["name"], "quant": v["quant"], "r": v["r"], "ckpt": v["ckpt"], "loss": v["loss"],
              "dropout": v["dropout"], "liger": bool(v.get("liger")), "stream": v.get("stream", "synthetic"),
              "workers": v.get("workers", 0), "compile": bool(v.get("compile")), "inductor": v.get("inductor"),
              "experts": bool(v.get("experts")), "nf4_in_graph": bool(v.get("nf4_in_graph")),
              "sync_free_images": bool(v.get("sync_free_images"))}
    key = model_key(size, v)
    if kept and kept.get("key") != key or not v.get("reuse"):
        kept.clear()
    for mb in v["mb"]:
        ga = v["ga"] if v["ga"] else max(1, GLOBAL_BATCH // mb)
        model, planned = None, {}
        cleanup()
        try:
            if kept:
                model = kept["model"]
            else:
                t_build = time.perf_counter()
                model = build(size, v["quant"], args.shrink, device,
                              config=copy.deepcopy(config) if config is not None else None)
                result["build_s"] = round(time.perf_counter() - t_build, 1)
                result["weights_bytes"] = torch.cuda.memory_allocated() if not cpu else None
                if v.get("nf4_in_graph"):  # bitsandbytes' bytes, dequantized by torch ops (benchmarks/nf4_in_graph.py)
                    from benchmarks.nf4_in_graph import largest_difference

                    result["nf4_max_difference"] = largest_difference(model)
                    cleanup()  # its eager temporaries (int64 positions per weight) are not this variant's training peak
                if v.get("liger"):  # this model only: the text decoder's norms and MLPs
                    from benchmarks.liger import use_liger_kernels

                    result["liger_modules"] = use_liger_kernels(model)
                if size not in flops_cache:
                    flops_cache[size] = forward_flops(model, collate([rows[0]]))
                if v["trainer"] != "trl":
                    model = seed_lora(model, v) if v["name"] == "ref" else ours_lora(model, v)
                if v.get("reuse"):
                    kept.update(key=key, model=model)
            examples, collator = rows, collate_answer_only
            if v.get("stream") == "files":
                examples, collator, result["data"] = streams[size]
            timer, waits = make_timer(), []
            if not cpu:
                torch.cuda.reset_peak_memory_stats()
            run_dir = "/tmp/gpu_train_bench_trainer"
            t0 = time.perf_counter()
            if v["name"] == "ref" or v["trainer"] == "trl":
                trainer = reference_trainer(model, v, rows, mb, ga, run_dir, cpu, timer)
                if v["trainer"] == "trl":
                    model = trainer.model
                    result["lora_dtype"] = next(str(p.dtype) for p in model.parameters() if p.requires_grad)
                trainer.train()
                del trainer
            else:
                profiler = step_profiler(v["profile_step"], out_dir / f"profile_{size}_{v['name']}.txt") if (
                    v.get("profile_step") and not cpu and args.profile) else None
                with inductor_settings(v.get("inductor")):
                    trained, config, compiled = train_ours(model, v, examples, collator, mb, ga, run_dir,
                                                           [timer] + ([profiler] if profiler else []), waits, planned)
                if profiler is not None:
                    result["profile"] = profiler.summary
                from helpers.speed import dataloader_worker_count

                result.update(workers=dataloader_worker_count(config), compiled_layers=compiled,
                              compile=compiled > 0, steps_done=trained.global_step, mb_asked=mb, ga_asked=ga)
                mb, ga = trained.micro_batch, trained.gradient_accumulation  # as trained (switch_on's plan)
                if compiled:  # graphs and recompiles so far in this process (lengths vary on real data)
                    from torch._dynamo.utils import counters

                    result["dynamo"] = {name: dict(counters[name]) for name in ("stats", "recompiles")
                                        if name in counters}
                    result["dynamo"]["graph_breaks"] = sum(counters["graph_break"].values())
            result["train_s"] = round(time.perf_counter() - t0, 1)
            step_s = median_after_warmup(timer.times)
            period_s = median_after_warmup(timer.periods)
            result.update(mb=mb, ga=ga, status="ok", step_s=round(step_s, 3),
                          step_times=[round(t, 3) for t in timer.times],
                          periods=[round(t, 3) for t in timer.periods],
                          samples_per_s=round(mb * ga / step_s, 3))
            if period_s:
                result.update(period_s=round(period_s, 3), wall_samples_per_s=round(mb * ga / period_s, 3))
            if waits:
                result.update(data_waits=[round(t, 3) for t in waits], data_wait_s=round(median_after_warmup(waits), 3))
            if not cpu:
                result["peak_alloc"] = torch.cuda.max_memory_allocated()
                result["peak_reserved"] = torch.cuda.max_memory_reserved()
            result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if v["name"] != "ref" and v["trainer"] != "trl" and not args.shrink:  # the planner, asked as trained
                from helpers.teaching.memory import plan

                # image_tokens=256: the synthetic stream's 224x224 images (benchmarks/README.md's memory table)
                result["planned_peak"] = plan(size, "none" if v["quant"] == "bf16" else "4bit", v["r"], mb, image_tokens=256,
                                              gradient_checkpointing=bool(v["ckpt"]), lora_dtype=v["lora_dtype"],
                                              quantize_towers=v["quant"] == "nf4-towers", compiled=result["compile"],
                                              liger=bool(v.get("liger")), lora_experts=bool(v.get("experts")))["total"]
            if v.get("profile") and not cpu and args.profile:
                try:
                    result["profile_top"] = profile_step(model, v, rows, mb, out_dir / f"profile_{size}_{v['name']}.txt")
                except Exception as err:  # noqa: BLE001
                    result["profile_error"] = repr(err)[:200]
            break
        except torch.OutOfMemoryError as err:
            result.update(failed_sizes(planned, mb, ga), status="OOM", error=str(err)[:160])
            print(f"  {size} {v['name']} micro-batch {result['mb']} (asked {mb}): out of memory, trying a smaller one",
                  flush=True)
            if model is not None:
                model.zero_grad(set_to_none=True)
        except Exception as err:  # noqa: BLE001
            result.update(failed_sizes(planned, mb, ga), status="error", error=repr(err)[:300])
            traceback.print_exc()
            kept.clear()
            break
        finally:
            del model
            cleanup()
    if not v.get("reuse"):
        kept.clear()
    flops = flops_cache.get(size)
    if flops and result.get("status") == "ok":
        useful = 2 * flops
        result["fwd_flops_per_sample"] = flops
        result["useful_tflops_per_s"] = round(useful * result["samples_per_s"] / 1e12, 1)
        result["mfu_989"] = round(useful * result["samples_per_s"] / PEAK_DATASHEET, 4)
        result["mfu_790"] = round(useful * result["samples_per_s"] / PEAK_MEASURED, 4)
        hardware = useful + (flops if v["ckpt"] == 1 else 0)
        result["hfu_989"] = round(hardware * result["samples_per_s"] / PEAK_DATASHEET, 4)
    return result


def gib(x):
    return f"{x / 2**30:.1f}" if x else "-"


def millions(x):
    return f"{x / 1e6:.1f}" if x else "-"


def print_table(results: list[dict]) -> str:
    width = max([len("variant")] + [len(r["variant"]) for r in results])
    header = (f"size     {'variant':<{width}} q    r  mb×ga  ckpt  samp/s  ×ref   alloc GiB  resv GiB  plan GiB  trainable M  "
              "MFU%989  MFU%790  status")
    lines = [header]
    ref = {r["size"]: r.get("samples_per_s") for r in results if r["variant"] == "ref"}
    for r in results:
        sps = r.get("samples_per_s")
        ratio = f"{sps / ref[r['size']]:.2f}" if sps and ref.get(r["size"]) else "-"
        lines.append(
            f"{r['size']:<8} {r['variant']:<{width}} {r['quant']:<4} {r['r']:>2} {str(r.get('mb'))+'×'+str(r.get('ga')):>6} "
            f"{r['ckpt']:>4}  {sps if sps else '-':>6}  {ratio:>4}   {gib(r.get('peak_alloc')):>8}  "
            f"{gib(r.get('peak_reserved')):>8}  {gib(r.get('planned_peak')):>8}  "
            f"{millions(r.get('trainable')):>11}  "
            f"{100 * r.get('mfu_989', 0):>7.1f}  {100 * r.get('mfu_790', 0):>7.1f}  "
            f"{r.get('status')}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def print_streams(results: list[dict]) -> str:
    """The user's path beside the synthetic stream: samples/s over whole steps (data wait included)."""
    rows = [r for r in results if r["variant"].startswith("stream-") and r.get("status") == "ok"]
    if not rows:
        return ""
    synthetic = {r["size"]: r.get("wall_samples_per_s") for r in rows if r["variant"] == "stream-synthetic"}
    lines = [("size     stream            workers  mb×ga  samp/s (whole step)  × synthetic  data wait s/step  "
              "step s (compute)  period s")]
    for r in rows:
        sps, base = r.get("wall_samples_per_s"), synthetic.get(r["size"])
        ratio = f"{sps / base:.3f}" if sps and base else "-"
        lines.append(f"{r['size']:<8} {r['variant']:<17} {r.get('workers')!s:>7}  {str(r.get('mb')) + '×' + str(r.get('ga')):>5}"
                     f"  {sps!s:>19}  {ratio:>11}  {r.get('data_wait_s')!s:>16}  {r.get('step_s')!s:>16}  "
                     f"{r.get('period_s')!s:>8}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="E4B,31B")
    parser.add_argument("--variants", default="", help="comma-separated names to keep (default all)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--shrink", action="store_true", help="shrunk configs (CPU smoke test)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts and micro-batches")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="skip variants once this is passed")
    parser.add_argument("--given-order", action="store_true",
                        help="run the variants in --variants' order (default: the bench's, most important first)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--flops-sizes", default="", help="also count forward FLOPs of these sizes")
    parser.add_argument("--no-compile", action="store_true", help="no compile_layers variant (CPU smoke test)")
    parser.add_argument("--compile-dynamic", choices=["default", "true"],
                        default=os.environ.get("COMPILE_DYNAMIC", "default"),
                        help="compile_layers as helpers.speed.switch_on calls it (dynamic=None), or dynamic=True")
    parser.add_argument("--images", default="/tmp/gpu_bench_images", help="where the image files are written")
    parser.add_argument("--images-per-class", type=int, default=12, help="files per class (37 classes)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.compile_dynamic == "true":  # the comparison: switch_on's compile_layers, dynamic from the start
        import functools

        from helpers import speed

        speed.compile_layers = functools.partial(speed.compile_layers, dynamic=True)
    from helpers.teaching.presets import preset_config

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    import peft
    import transformers
    env.update(transformers=transformers.__version__, peft=peft.__version__)
    try:
        import bitsandbytes
        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    env["compile_dynamic"] = args.compile_dynamic
    print(json.dumps(env), flush=True)
    results, flops_cache = [], {}
    keep = list(filter(None, args.variants.split(",")))

    def first_match(size, v) -> int | None:
        """The position in ``--variants`` of the first name or pattern that selects ``v``; None if none does."""
        names = (v["name"], f"{size}:{v['name']}")
        return next((i for i, k in enumerate(keep)
                     if k in names or k.endswith("*") and any(n.startswith(k[:-1]) for n in names)), None)

    def selected(size, v):
        return not keep or first_match(size, v) is not None

    for size in args.sizes.split(","):
        config = shrunk_config(size) if args.shrink else preset_config(size)
        variants = [v for v in variants_for(size, args.quick) if selected(size, v)]
        if args.given_order and keep:  # sorted is stable: a pattern's variants keep the bench's order among them
            variants.sort(key=lambda v: first_match(size, v))
        for v in variants if args.no_compile else []:
            v["compile"] = False
        streams = {}
        if any(v.get("stream") == "files" for v in variants):  # image files -> load_examples -> the collator
            per_class = 2 if args.shrink else args.images_per_class
            streams[size] = user_data(size, config, Path(args.images), per_class, args.shrink)
            print(json.dumps({"size": size, "user_data": streams[size][2]}), flush=True)
        rows = Rows(synthetic_batch(config, args.samples))
        kept = {}
        for v in variants:
            if time.perf_counter() - start > args.deadline_s:
                results.append({"size": size, "variant": v["name"], "quant": v["quant"], "r": v["r"], "ckpt": v["ckpt"],
                                "status": "skipped (deadline)"})
                continue
            t = time.perf_counter()
            r = run_variant(size, v, rows, args, flops_cache, out_dir, kept, streams, config)
            r["wall_s"] = round(time.perf_counter() - t, 1)
            results.append(r)
            shown = ("size", "variant", "mb", "ga", "status", "samples_per_s", "wall_samples_per_s", "data_wait_s",
                     "workers", "peak_alloc", "planned_peak", "trainable", "mfu_989", "wall_s", "error")
            shown += ("nf4_max_difference",) if "nf4_max_difference" in r else ()
            print(json.dumps({k: r.get(k) for k in shown}), flush=True)
            (out_dir / "train_results.json").write_text(json.dumps({"env": env, "results": results,
                                                                     "fwd_flops_per_sample": flops_cache}, indent=1))
        kept.clear()
        cleanup()
    for size in filter(None, args.flops_sizes.split(",")):
        if size not in flops_cache:  # FLOPs only (no training): to put MFU on rows measured in another run
            config = shrunk_config(size) if args.shrink else preset_config(size)
            model = build(size, "nf4", args.shrink, "cuda" if torch.cuda.is_available() else "cpu")
            flops_cache[size] = forward_flops(model, collate([Rows(synthetic_batch(config, 1))[0]]))
            del model
            cleanup()
    print("forward FLOPs per sample:", json.dumps(flops_cache), flush=True)
    (out_dir / "train_results.json").write_text(json.dumps({"env": env, "results": results,
                                                             "fwd_flops_per_sample": flops_cache}, indent=1))
    print_table(results)
    print_streams(results)
    return results


if __name__ == "__main__":
    main()
