"""Several GPUs: notebook 04's training, then sharded constrained scoring, in one command per process.

    python -m helpers.launch --output-dir runs/offline                      # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 -m helpers.launch --output-dir runs/pets \\
        --model-id google/gemma-4-31B-it -p dataset timm/oxford-iiit-pet -p quantization 4bit   # DDP QLoRA
    accelerate launch --config_file configs/fsdp_bf16_lora.yaml -m helpers.launch ...           # FSDP bf16

The parameters are notebook 04's (``RunConfig`` fields, ``-p NAME VALUE``, validated once), and training is built
from the functions notebook 04 calls, in its order: ``load_model`` and ``apply_lora`` (the notebook's plain
``from_pretrained`` and ``get_peft_model``), ``VisionChatCollator``, ``training_arguments``, ``speed.switch_on``,
``build_trainer`` (the ``Trainer`` with ``answer_only_loss`` and the two callbacks), ``trainer.train``. What is the launcher's own: one copy
of the model per process (``device_map={"": local_rank}`` for QLoRA; on the CPU for FSDP, which shards it), the
audio adapters frozen (DDP then needs no search for unused parameters), and the adapter gathered and written once.
Distribution is left to transformers' Trainer and accelerate. Evaluation is split across the processes
(``helpers.run.shards.shard_indices``), the predictions gathered, and rank 0 writes ``metrics.json`` once.
Rerunning the command resumes training from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from peft import PeftModel

from helpers import speed
from helpers.collator import VisionChatCollator
from helpers.data import load_examples
from helpers.evaluation import adapter_disabled, constrained_scores, metrics_by_system
from helpers.modeling import apply_lora, load_model, load_processor, lora_config, quantization_config
from helpers.run.command_line import parameters_from_command_line
from helpers.run.config import ConfigError, RunConfig, resolve_model_id
from helpers.run.folder import (
    adapter_folder,
    adapter_staging,
    last_complete_checkpoint,
    metrics_file,
    prompt_for_adapter,
    publish_adapter,
    read_train_result,
    record_training,
)
from helpers.run.report import SYSTEMS, write_metrics
from helpers.run.shards import shard_indices
from helpers.training import TrainResult, build_trainer, training_arguments
from helpers.validation import skipped_summary

# Modules that "all-linear" LoRA wraps but image + text training never runs (E2B/E4B's audio tower and its
# projector): their adapters would get no gradient, so the launcher freezes them (freeze_unused_adapters).
NOT_RUN_IN_IMAGE_TRAINING = ("audio_tower", "embed_audio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="run folder (default: RunConfig.output_dir)")
    parser.add_argument("--model-id", default=None, help="hub id or local path (default: the tiny offline model)")
    parser.add_argument("--train-size", type=int, default=None, help="number of training examples")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a run parameter (a RunConfig field), e.g. -p max_steps 20")
    parser.add_argument("--skip-eval", action="store_true", help="train only (no sharded evaluation)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate output_dir's adapter without training (e.g. after an FSDP run, in 4-bit)")
    parser.add_argument("--dump-rank-weights", action="store_true",
                        help="each rank saves its LoRA weights to output_dir/rank{r}_lora.pt (tests compare them)")
    return parser


def fsdp_launch() -> bool:
    """True under ``accelerate launch`` with an FSDP config on GPUs (accelerate sets the variable for every
    process; without a GPU it falls back to DDP on gloo, and so does this)."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    return requested and torch.cuda.is_available()


def device_map_for(local_rank: int, quantization: str):
    """Where this process's copy of the model goes: its own GPU for DDP; CPU for FSDP (which shards it)
    and on a machine without a GPU."""
    if not torch.cuda.is_available() or (fsdp_launch() and quantization == "none"):
        return None
    torch.cuda.set_device(local_rank)
    return {"": local_rank}


def load_lora_model(config: RunConfig, model_path: str, local_rank: int, adapter_dir: Path | None = None):
    """Processor and LoRA model for this process: a new adapter, or a trained one from ``adapter_dir``."""
    torch.manual_seed(config.seed)  # the same initial adapter on every rank (DDP also broadcasts rank 0's)
    processor = load_processor(model_path, config.image_soft_tokens)
    model = load_model(model_path, quantization_config(config), device_map=device_map_for(local_rank, config.quantization))
    if adapter_dir is not None:
        return processor, PeftModel.from_pretrained(model, adapter_dir)
    lora = lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets,
                       experts=config.lora_experts)
    return processor, apply_lora(model, lora)


def freeze_unused_adapters(model) -> int:
    """Freeze the LoRA weights of modules image training never runs; returns how many tensors.

    They would get no gradient anyway (AdamW skips them), so training is unchanged; but while they ask for one,
    DDP must search the autograd graph for unused parameters on every step (``find_unused_parameters``). They
    stay in the saved adapter, still at their initial value (B = 0: no effect)."""
    frozen = 0
    for name, param in model.named_parameters():
        if param.requires_grad and any(part in name for part in NOT_RUN_IN_IMAGE_TRAINING):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def gathered_lora_state(model) -> dict:
    """The full LoRA tensors of an FSDP2-sharded model, on the CPU; a collective: call it on every rank.

    Only the adapter is gathered, not the frozen base model (accelerator.get_state_dict would gather all 62 GB
    of a bf16 31B to rank 0), in the state dict's own order, which is the same on every rank."""
    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu()
            for name, value in model.state_dict().items() if "lora_" in name}


def lora_state(model) -> dict[str, torch.Tensor]:
    """This rank's LoRA weights, on the CPU (what ``--dump-rank-weights`` saves)."""
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if "lora_" in name}


def train_on_this_rank(config: RunConfig, model, processor, state, model_path: str) -> dict:
    """Notebook 04's training, built from the same functions; rank 0 writes the adapter and the training record."""
    run_dir = Path(config.output_dir)
    train_set = load_examples(config.dataset, "train", config.train_size, config.seed, **config.data_options())
    collator = VisionChatCollator(processor, train_set.class_names, max_length=config.max_length, **config.prompt())
    args, switched = speed.switch_on(model, training_arguments(config, run_dir), config)
    args.ddp_find_unused_parameters = False  # freeze_unused_adapters leaves no trainable weight without a gradient
    freeze_unused_adapters(model)
    if state.is_main_process:
        print(switched, flush=True)
    trainer = build_trainer(model, args, train_set.examples, collator)
    resume_from = last_complete_checkpoint(run_dir, report=print if state.is_main_process else lambda line: None)
    trainer.train(resume_from_checkpoint=resume_from)
    speed.switch_off(model)
    lora = gathered_lora_state(trainer.model_wrapped) if trainer.is_fsdp_enabled else None  # every rank gathers
    result = TrainResult.of(trainer, resume_from)
    if state.is_main_process:
        staging = adapter_staging(run_dir)
        model.save_pretrained(staging, state_dict=lora)
        publish_adapter(run_dir, staging, collator.chat.settings())
        print(record_training(run_dir, result, config, model_path), flush=True)
    state.wait_for_everyone()
    return read_train_result(run_dir)


def score_shard(model, processor, examples, class_names, batch_size: int, progress: bool,
                prompt: dict | None = None) -> dict[str, list]:
    """Constrained-scoring predictions of the base model (adapter off) and of the fine-tuned model, both
    with ``prompt`` (``helpers.chat``: the question, system prompt and thinking setting)."""
    if not examples:  # more processes than examples: this rank has nothing to score
        return {system: [] for system in SYSTEMS}
    model.eval()
    prompt = prompt or {}
    with adapter_disabled(model):
        baseline = constrained_scores(model, processor, examples, class_names, batch_size,
                                      "baseline" if progress else False, **prompt)
    finetuned = constrained_scores(model, processor, examples, class_names, batch_size,
                                   "fine-tuned" if progress else False, **prompt)
    return {system: [class_names[i] for i in scores.argmax(dim=1).tolist()]
            for system, scores in zip(SYSTEMS, (baseline, finetuned))}


def evaluate_on_this_rank(config: RunConfig, model, processor, state, eval_set, prompt: dict) -> list[dict]:
    """This rank's shard of the held-out split as rows ``{index, label, predictions}``."""
    names = eval_set.class_names
    indices = shard_indices(len(eval_set), state.process_index, state.num_processes)
    examples = [eval_set.examples[i] for i in indices]
    start = time.perf_counter()
    predictions = score_shard(model, processor, examples, names, max(config.batch_size, 16), state.is_main_process,
                              prompt)
    seconds = time.perf_counter() - start
    return [{"index": i, "label": names[ex["label"]], "rank": state.process_index, "seconds": seconds,
             "predictions": {system: predictions[system][k] for system in SYSTEMS}}
            for k, (i, ex) in enumerate(zip(indices, examples))]


def merge_rows(rows: list[dict], n_total: int, class_names: list[str]) -> dict:
    """Metrics from every rank's rows; each held-out example must appear exactly once."""
    seen = sorted(row["index"] for row in rows)
    if seen != list(range(n_total)):
        raise RuntimeError(f"gathered {len(seen)} predictions for {n_total} examples, "
                           f"not each exactly once (first indices: {seen[:10]})")
    rows = sorted(rows, key=lambda row: row["index"])
    labels = [row["label"] for row in rows]
    return metrics_by_system(labels, {system: [r["predictions"][system] for r in rows] for system in SYSTEMS},
                             class_names)


def run(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    config = RunConfig.from_params(parameters_from_command_line(args.parameter, args.output_dir, args.model_id,
                                                                args.train_size))
    state = PartialState(cpu=not torch.cuda.is_available())  # the Trainer reuses this process state
    with state.main_process_first():  # rank 0 builds the tiny checkpoint (or fills the hub cache) first
        model_path = resolve_model_id(config.model_id)
    adapter_dir = adapter_folder(config.output_dir) if args.eval_only else None
    processor, model = load_lora_model(config, model_path, state.local_process_index, adapter_dir)
    if args.eval_only:
        train_summary = read_train_result(config.output_dir)
    else:
        train_summary = train_on_this_rank(config, model, processor, state, model_path)
    return finish(args, config, model_path, model, processor, state, train_summary)


def finish(args, config, model_path, model, processor, state, train_summary) -> dict | None:
    """Optional weight dump, then the sharded evaluation, gathered; rank 0 writes and returns metrics."""
    if args.dump_rank_weights and not fsdp_launch():  # FSDP ranks hold shards, not whole weights
        torch.save(lora_state(model), Path(config.output_dir) / f"rank{state.process_index}_lora.pt")
    if args.skip_eval:
        return None
    if fsdp_launch():  # scoring outside the Trainer would have to drive FSDP's gathers rank by rank
        if state.is_main_process:
            print("FSDP: training done, adapter saved; evaluate it with a DDP launch: torchrun ... "
                  "-m helpers.launch --eval-only (e.g. -p quantization 4bit)", flush=True)
        return None
    eval_set = load_examples(config.dataset, "test", config.eval_size, config.seed, **config.data_options())
    prompt, _ = prompt_for_adapter(adapter_folder(config.output_dir), config.prompt())  # as it was trained
    rows = gather_object(evaluate_on_this_rank(config, model, processor, state, eval_set, prompt))
    report = None
    if state.is_main_process:
        report = write_metrics(metrics_file(config.output_dir), merge_rows(rows, len(eval_set), eval_set.class_names),
                               config=config.to_dict(), model_path=model_path, train=train_summary.get("train"),
                               skipped=skipped_summary(eval_set), shard=(0, 1), processes=state.num_processes,
                               prompt=prompt, eval_seconds={"eval_per_rank": {r["rank"]: r["seconds"] for r in rows}},
                               predictions=sorted(rows, key=lambda row: row["index"]))
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
