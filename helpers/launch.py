"""Several GPUs: notebook 04's training, then sharded constrained scoring, in one command per process.

    python -m helpers.launch --output-dir runs/offline                      # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 -m helpers.launch --output-dir runs/pets \\
        --model-id google/gemma-4-31b-it -p dataset timm/oxford-iiit-pet -p quantization 4bit   # DDP QLoRA
    accelerate launch --config_file configs/fsdp_bf16_lora.yaml -m helpers.launch ...           # FSDP bf16

The parameters are notebook 04's (``RunConfig`` fields, ``-p NAME VALUE``, validated once), and training is
the same ``helpers.training.train()`` the notebook calls: the launcher only loads one copy of the model per
process (``device_map={"": local_rank}`` for QLoRA; on the CPU for FSDP, which shards it) and leaves the
distribution to transformers' Trainer and accelerate (DDP, or FSDP under ``accelerate launch`` with an FSDP
config). Evaluation is split across the processes (``helpers.shards.shard_indices``), the per-example
predictions are gathered, and rank 0 writes ``metrics.json`` once (``helpers.report.write_metrics``, as notebook
05 and the shard merge do). Rerunning the command resumes training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from helpers.config import ConfigError, RunConfig, resolve_model_id
from helpers.report import SYSTEMS
from helpers.run_folder import ADAPTER, METRICS, TRAIN_RESULT
from helpers.runner import collect_parameters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="run folder (default: RunConfig.output_dir)")
    parser.add_argument("--model-id", default=None, help="hub id or local path (default: the tiny offline model)")
    parser.add_argument("--train-size", type=int, default=None, help="number of training examples")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook 04 parameter (a RunConfig field), e.g. -p max_steps 20")
    parser.add_argument("--skip-eval", action="store_true", help="train only (no sharded evaluation)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate output_dir/adapter without training (e.g. after an FSDP run, in 4-bit)")
    parser.add_argument("--dump-rank-weights", action="store_true",
                        help="each rank saves its LoRA weights to output_dir/rank{r}_lora.pt (tests compare them)")
    return parser


def fsdp_launch() -> bool:
    """True under ``accelerate launch`` with an FSDP config on GPUs (accelerate sets the variable for every
    process; without a GPU it falls back to DDP on gloo, and so does this)."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    return requested and torch.cuda.is_available()


def distributed_state():
    """accelerate's process state (rank, world size, barriers); the Trainer reuses the same one."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def device_map_for(local_rank: int, quantization: str):
    """Where this process's copy of the model goes: its own GPU for DDP; CPU for FSDP (which shards it)
    and on a machine without a GPU."""
    if not torch.cuda.is_available() or (fsdp_launch() and quantization == "none"):
        return None
    torch.cuda.set_device(local_rank)
    return {"": local_rank}


def load_lora_model(config: RunConfig, model_path: str, local_rank: int, adapter_dir: Path | None = None):
    """Processor and LoRA model for this process: a new adapter, or a trained one from ``adapter_dir``.

    Notebook 04's calls with notebook 04's objects: ``quantization_config`` and ``lora_config`` build the
    ``BitsAndBytesConfig`` and ``LoraConfig`` that the notebook shows (``tests/test_recipe.py`` checks it)."""
    from helpers.modeling import apply_lora, load_model, load_processor, lora_config, quantization_config

    torch.manual_seed(config.seed)  # the same initial adapter on every rank (DDP also broadcasts rank 0's)
    processor = load_processor(model_path, config.image_soft_tokens)
    model = load_model(model_path, quantization=config.quantization, quantization_config=quantization_config(config),
                       device_map=device_map_for(local_rank, config.quantization), fast_clamps=config.fast_clamps)
    if adapter_dir is not None:
        from peft import PeftModel

        return processor, PeftModel.from_pretrained(model, adapter_dir)
    lora = lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    return processor, apply_lora(model, config=lora, gradient_checkpointing=config.gradient_checkpointing)


def lora_state(model) -> dict[str, torch.Tensor]:
    """This rank's LoRA weights, on the CPU (what ``--dump-rank-weights`` saves)."""
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if "lora_" in name}


def train_on_this_rank(config, model, processor, state) -> dict:
    """Notebook 04's training call, unchanged; rank 0 writes ``train_result.json`` as the notebook does."""
    from helpers.chat import prompt_settings
    from helpers.collator import VisionChatCollator
    from helpers.data import load_examples
    from helpers.io import atomic_write_json
    from helpers.training import train

    train_set = load_examples(config.dataset, "train", config.train_size, config.seed, **config.data_options())
    collator = VisionChatCollator(processor, train_set.class_names, max_length=config.max_length,
                                  **prompt_settings(config))
    result = train(model, collator, train_set.examples, config, config.output_dir)
    summary = {"config": config.to_dict(), "train": result.to_dict(), "processes": state.num_processes}
    if state.is_main_process:
        atomic_write_json(Path(config.output_dir) / TRAIN_RESULT, summary)
    return summary


def score_shard(model, processor, examples, class_names, batch_size: int, progress: bool,
                prompt: dict | None = None) -> dict[str, list]:
    """Constrained-scoring predictions of the base model (adapter off) and of the fine-tuned model, both
    with ``prompt`` (``helpers.chat``: the question, system prompt and thinking setting)."""
    from helpers.evaluation import adapter_disabled, constrained_scores

    if not examples:  # more processes than examples: this rank has nothing to score
        return {system: [] for system in SYSTEMS}
    model.eval()
    prompt = prompt or {}
    with adapter_disabled(model):
        baseline = constrained_scores(model, processor, examples, class_names, batch_size, progress, **prompt)
    finetuned = constrained_scores(model, processor, examples, class_names, batch_size, progress, **prompt)
    return {system: [class_names[i] for i in scores.argmax(dim=1).tolist()]
            for system, scores in zip(SYSTEMS, (baseline, finetuned))}


def evaluate_on_this_rank(config, model, processor, state) -> list[dict]:
    """This rank's shard of the held-out split as rows ``{index, label, predictions}``."""
    from helpers.chat import prompt_for_adapter
    from helpers.data import load_examples
    from helpers.shards import shard_indices

    eval_set = load_examples(config.dataset, "test", config.eval_size, config.seed, **config.data_options())
    names = eval_set.class_names
    indices = shard_indices(len(eval_set), state.process_index, state.num_processes)
    examples = [eval_set.examples[i] for i in indices]
    prompt, _ = prompt_for_adapter(Path(config.output_dir) / ADAPTER, config)  # the prompt it was trained with
    start = time.perf_counter()
    predictions = score_shard(model, processor, examples, names, max(config.batch_size, 16), state.is_main_process,
                              prompt)
    seconds = time.perf_counter() - start
    return [{"index": i, "label": names[ex["label"]], "rank": state.process_index, "seconds": seconds,
             "predictions": {system: predictions[system][k] for system in SYSTEMS}}
            for k, (i, ex) in enumerate(zip(indices, examples))]


def merge_rows(rows: list[dict], n_total: int, class_names: list[str]) -> dict:
    """Metrics from every rank's rows; each held-out example must appear exactly once."""
    from helpers.shards import metrics_by_system

    seen = sorted(row["index"] for row in rows)
    if seen != list(range(n_total)):
        raise RuntimeError(f"gathered {len(seen)} predictions for {n_total} examples, "
                           f"not each exactly once (first indices: {seen[:10]})")
    rows = sorted(rows, key=lambda row: row["index"])
    labels = [row["label"] for row in rows]
    return metrics_by_system(labels, {system: [r["predictions"][system] for r in rows] for system in SYSTEMS},
                             class_names)


def write_gathered_metrics(config, model_path, rows, train_summary, processes) -> dict:
    """``metrics.json`` (rank 0 only), through ``helpers.report.write_metrics``, with the per-example rows."""
    from helpers.chat import prompt_for_adapter
    from helpers.data import load_examples
    from helpers.report import write_metrics
    from helpers.validation import skipped_summary

    eval_set = load_examples(config.dataset, "test", config.eval_size, config.seed, **config.data_options())
    return write_metrics(Path(config.output_dir) / METRICS, merge_rows(rows, len(eval_set), eval_set.class_names),
                         config=config.to_dict(), model_path=model_path, train=train_summary.get("train"),
                         skipped=skipped_summary(eval_set), shard=(0, 1), processes=processes,
                         prompt=prompt_for_adapter(Path(config.output_dir) / ADAPTER, config)[0],
                         eval_seconds={"eval_per_rank": {r["rank"]: r["seconds"] for r in rows}},
                         predictions=sorted(rows, key=lambda row: row["index"]))


def run(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    config = RunConfig.from_params(collect_parameters(args))  # the runner's checks: names, values, secrets
    state = distributed_state()
    with state.main_process_first():  # rank 0 builds the tiny checkpoint (or fills the hub cache) first
        model_path = resolve_model_id(config.model_id)
    adapter_dir = Path(config.output_dir) / ADAPTER if args.eval_only else None
    processor, model = load_lora_model(config, model_path, state.local_process_index, adapter_dir)
    train_summary = {} if args.eval_only else train_on_this_rank(config, model, processor, state)
    return finish(args, config, model_path, model, processor, state, train_summary)


def finish(args, config, model_path, model, processor, state, train_summary) -> dict | None:
    """Optional weight dump, then the sharded evaluation, gathered; rank 0 writes and returns metrics."""
    from accelerate.utils import gather_object

    if args.dump_rank_weights and not fsdp_launch():  # FSDP ranks hold shards, not whole weights
        torch.save(lora_state(model), Path(config.output_dir) / f"rank{state.process_index}_lora.pt")
    if args.skip_eval:
        return None
    if fsdp_launch():  # scoring outside the Trainer would have to drive FSDP's gathers rank by rank
        if state.is_main_process:
            print("FSDP: training done, adapter saved; evaluate it with a DDP launch: torchrun ... "
                  "-m helpers.launch --eval-only (e.g. -p quantization 4bit)", flush=True)
        return None
    rows = gather_object(evaluate_on_this_rank(config, model, processor, state))
    report = None
    if state.is_main_process:
        report = write_gathered_metrics(config, model_path, rows, train_summary, state.num_processes)
        print("metrics:", json.dumps(report["summary"]), flush=True)
    state.wait_for_everyone()
    return report


def main(argv=None) -> int:
    try:
        run(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
