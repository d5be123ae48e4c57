"""The main job's training and its fine-tuned accuracy, without the notebooks: a faster trial for a recipe search.

    python benchmarks/recipe_trial.py 1 learning_rate 2e-3     # SEED, then any RunConfig NAME VALUE pairs

It runs notebook 04's cells in their order (seeded load, LoRA, data, ``train()``) and then notebook 05's
constrained scoring on all 450 held-out digits, and skips what cannot change the fine-tuned accuracy: the
kernels, plots, before/after samples, the baseline and free generation (about 80 s of the main job's 305 s).
With the same parameters it should give the main job's fine-tuned constrained accuracy (the global RNG is
consumed in the same order before LoRA is initialised); that equality has not been checked against a main-job
run yet, so confirm a chosen recipe with ``python benchmarks/main_job.py -p seed N``.
Prints one JSON line: seed, parameters, optimizer steps, accuracy, training seconds, the last logged losses.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch

from helpers.chat import prompt_settings
from helpers.collator import VisionChatCollator
from helpers.config import RunConfig, resolve_model_id
from helpers.data import load_examples
from helpers.evaluation import constrained_scores
from helpers.modeling import apply_lora, load_model, load_processor
from helpers.runner import parse_value
from helpers.training import train


def trial(seed: int, params: dict) -> dict:
    config = RunConfig.from_params({"seed": seed, "output_dir": tempfile.mkdtemp(prefix="recipe-trial-"), **params})
    path = resolve_model_id(config.model_id)
    torch.manual_seed(config.seed)  # notebook 04, "Load the processor and the model"
    processor = load_processor(path, config.image_soft_tokens)
    model = load_model(path, quantization=config.quantization, fast_clamps=config.fast_clamps,
                       quantize_towers=config.quantize_towers)
    model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       target_modules=config.lora_targets, gradient_checkpointing=config.gradient_checkpointing)
    train_set = load_examples(config.dataset, "train", config.train_size, config.seed, **config.data_options())
    eval_set = load_examples(config.dataset, "test", config.eval_size, config.seed, **config.data_options())
    names, prompt = train_set.class_names, prompt_settings(config)
    collator = VisionChatCollator(processor, names, max_length=config.max_length, **prompt)
    start = time.perf_counter()
    result = train(model, collator, train_set.examples, config, config.output_dir)
    seconds = time.perf_counter() - start
    model.eval()
    batch = max(config.batch_size, 16)  # notebook 05's scoring batch
    scores = constrained_scores(model, processor, eval_set.examples, names, batch_size=batch, progress=False, **prompt)
    labels = torch.tensor([e["label"] for e in eval_set.examples])
    return {"seed": seed, "params": params, "steps": result.global_step,
            "accuracy": round((scores.argmax(1) == labels).float().mean().item(), 4),
            "train_seconds": round(seconds, 1), "last_losses": result.loss_history[-3:]}


def main(argv: list[str]) -> None:
    seed, rest = int(argv[0]), argv[1:]
    params = {name: parse_value(value) for name, value in zip(rest[::2], rest[1::2])}  # as -p reads them
    print(json.dumps(trial(seed, params)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
