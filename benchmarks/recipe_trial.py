"""The main job's training and its fine-tuned accuracy, without the notebooks: a faster trial for a recipe search.

    python -m benchmarks.recipe_trial 1 learning_rate 2e-3     # SEED, then any RunConfig NAME VALUE pairs

Training is the launcher's for one process (``helpers.launch.load_lora_model`` and ``train_on_this_rank``: the
functions notebook 04 calls, in its order), into a fresh temporary run folder; then notebook 05's constrained
scoring on the held-out digits (all 450 by default). It skips what cannot change the fine-tuned accuracy: plots,
before/after samples, the baseline and free generation, which is why it is faster than the main job. LoRA's
initial weights are drawn as the launcher draws them (``torch.manual_seed(seed)`` before loading), not from the
notebook kernel's generator state, so a seed's accuracy may differ from the main job's: confirm a chosen recipe
with ``python -m benchmarks.main_job -p seed N``.
Prints one JSON line: seed, parameters, optimizer steps, accuracy, training seconds, the last logged losses.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from accelerate import PartialState

from helpers.data import load_examples
from helpers.evaluation import constrained_scores
from helpers.launch import load_lora_model, train_on_this_rank
from helpers.run.command_line import parse_value
from helpers.run.config import RunConfig, resolve_model_id


def trial(seed: int, params: dict) -> dict:
    config = RunConfig.from_params({"seed": seed, "output_dir": tempfile.mkdtemp(prefix="recipe-trial-"), **params})
    path = resolve_model_id(config.model_id)
    state = PartialState(cpu=not torch.cuda.is_available())
    processor, model = load_lora_model(config, path, state.local_process_index)
    start = time.perf_counter()
    trained = train_on_this_rank(config, model, processor, state, path)["train"]
    seconds = time.perf_counter() - start
    eval_set = load_examples(config.dataset, "test", config.eval_size, config.seed, **config.data_options())
    model.eval()
    batch = max(config.batch_size, 16)  # notebook 05's scoring batch
    scores = constrained_scores(model, processor, eval_set.examples, eval_set.class_names, batch_size=batch,
                                progress=False, **config.prompt())
    labels = torch.tensor([e["label"] for e in eval_set.examples])
    return {"seed": seed, "params": params, "steps": trained["global_step"],
            "accuracy": round((scores.argmax(1).cpu() == labels).float().mean().item(), 4),
            "train_seconds": round(seconds, 1), "last_losses": trained["loss_history"][-3:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_trial", description=__doc__.split("\n")[0])
    parser.add_argument("seed", type=int, help="RunConfig's seed")
    parser.add_argument("pairs", nargs="*", metavar="NAME VALUE", help="RunConfig fields, as -p NAME VALUE reads them")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error(f"NAME VALUE pairs expected, got {args.pairs}")
    params = {name: parse_value(value) for name, value in zip(args.pairs[::2], args.pairs[1::2])}
    print(json.dumps(trial(args.seed, params)), flush=True)


if __name__ == "__main__":
    main()
