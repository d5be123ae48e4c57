"""Training: transformers' Trainer with our collator and the labelled-positions loss. Taught in notebook 04.

One ``train()`` serves notebook 04, the papermill runner and the multi-GPU launcher. What it adds to
a plain ``Trainer``:
- the loss only at labelled positions (``helpers.losses``), normalised over the whole accumulated batch;
- checkpoints that are never half-written: each is saved under a staging folder, moved into place, and
  marked complete last (``COMPLETE_MARKER``), so a run killed mid-save resumes from the last complete one.
  The move is a directory rename where the file system allows one (local disks: atomic) and a file-by-file
  copy where it refuses one (a Cloud Storage FUSE mount of a flat bucket without ``rename-dir-limit``);
  resume trusts only the marker, which also covers a bucket's non-atomic rename;
- resume: when ``output_dir/checkpoints`` holds a checkpoint, training continues from it, so rerunning
  the same command finishes the run;
- a non-finite loss stops training in the step that produced it, with the step named (the last checkpoint stays good);
- wall time, peak memory, and the adapter saved with ``save_pretrained`` (atomically, too);
- several processes (``python -m helpers.launch`` under ``torchrun`` / ``accelerate launch``): the loss is the
  mean over the labelled tokens of *all* ranks, checkpoints and the adapter are written once (rank 0)
  behind barriers, and DDP is told whether some adapters get no gradient.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from helpers.chat import save_prompt
from helpers.losses import labelled_positions_loss, unwrap_gemma4
from helpers.modeling import compile_layers, liger_kernel_count, should_compile_layers, uncompile_layers
from helpers.run_folder import (  # a folder without COMPLETE_MARKER is ignored by resume: a bucket mount
    ADAPTER,  # has neither atomic directory renames nor locks to guarantee that a folder is whole
    ADAPTER_STAGING,
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    COMPLETE_MARKER,
    STAGING,
)

# Modules that "all-linear" LoRA wraps but image + text training never runs (E2B/E4B's audio tower and its
# projector): their adapters would get no gradient, so train() freezes them (see freeze_unused_adapters).
NOT_RUN_IN_IMAGE_TRAINING = ("audio_tower", "embed_audio")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


@dataclass
class TrainResult:
    """What a run produced; ``loss_history`` is ``[(step, loss), ...]`` as logged."""

    global_step: int
    resumed_from: str | None
    wall_seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    adapter_dir: str
    loss_history: list = field(default_factory=list)
    train_samples: int = 0
    already_finished: bool = False  # the folder's last checkpoint was at the planned steps: nothing trained
    compiled_layers: int = 0  # layers compile_layers compiled for this run (0: eager)
    micro_batch: int = 0  # per device, as trained (planned_batch on a GPU)
    gradient_accumulation: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class FiniteLossCheck(TrainerCallback):
    """Stops training on a NaN or infinite loss, without making the CPU wait for the GPU on every micro-batch.

    ``record`` copies whether a loss is finite to the host asynchronously; the flags that have arrived are read at
    the next micro-batch, and all of them just before every optimizer step (after the backward passes and gradient
    clipping), so a non-finite loss stops the run in the step that produced it, before the weights in memory are
    updated and before any checkpoint is saved: the last checkpoint stays good. (Checking
    ``torch.isfinite(loss)`` at once, as a ``bool``, is a device sync on every micro-batch: the GPU then idles
    while the CPU queues the backward pass.)"""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.pending: list = []

    def record(self, loss: torch.Tensor, step: int) -> None:
        self.check(wait=False)
        loss = loss.detach()
        finite = torch.isfinite(loss)
        if finite.is_cuda:
            finite = finite.to("cpu", non_blocking=True)  # into pinned memory, from the caching host allocator
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(loss.device))  # the stream the copy was queued on
        else:
            done = None
        self.pending.append((finite, done, loss, step))

    def check(self, wait: bool = True) -> None:
        pending, self.pending = self.pending, []
        for i, (finite, done, loss, step) in enumerate(pending):
            if done is not None and not wait and not done.query():
                self.pending = pending[i:]  # not arrived yet: read later, in order
                return
            if done is not None:
                done.synchronize()  # recorded before that micro-batch's backward
            if not bool(finite):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss.item()}) at step {step}; "
                    f"stopping. The last complete checkpoint in {self.output_dir} is kept.")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.check()  # every step has one, after its last micro-batch: nothing is recorded between it and the save

    def on_train_end(self, args, state, control, **kwargs):
        self.check()  # micro-batches a callback's stop left behind


class LabelledPositionsTrainer(Trainer):
    """A Trainer whose loss is computed at labelled positions only, with atomic checkpoints."""

    _staging_dir: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Gemma 4 declares accepts_loss_kwargs = False, so the Trainer would pass no token count: each
        # micro-batch (and each rank) would be averaged on its own, a mean of means. Our compute_loss takes
        # the count, so ask the Trainer for it: labelled tokens over the accumulated batch, summed over ranks.
        self.model_accepts_loss_kwargs = True
        self.finite_loss = FiniteLossCheck(self.args.output_dir)
        self.callback_handler.callbacks.insert(0, self.finite_loss)  # first: before other callbacks see the step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = labelled_positions_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if model.training:  # the Trainer's own evaluation calls compute_loss too: that is no training loss
            self.finite_loss.record(loss, self.state.global_step + 1)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the count is global, but DDP/FSDP average gradients over ranks: undo that average (as
            # Trainer.compute_loss does) so the gradient is that of the global labelled-token mean
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _get_output_dir(self, trial):
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        final_root = self.args.output_dir
        self._staging_dir = os.path.join(final_root, STAGING)
        if self.args.should_save:
            shutil.rmtree(self._staging_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # every rank writes into staging (its RNG state, FSDP shards)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staging, self._staging_dir = self._staging_dir, None
        self.accelerator.wait_for_everyone()  # rank 0 moves the folder only once every rank has written
        if self.args.should_save:
            name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            publish_folder(Path(staging) / name, Path(final_root) / name)  # complete once marked, never half
            shutil.rmtree(staging, ignore_errors=True)
            _rotate_checkpoints(final_root, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def publish_folder(staging: Path, target: Path) -> None:
    """Put the fully written ``staging`` folder at ``target``, then write the completion marker last.

    A directory rename where the file system allows one; where it refuses (gcsfuse on a flat bucket without
    ``rename-dir-limit``), a copy of every file, then the staging folder is removed. Either way a kill
    before the marker leaves a folder that resume ignores."""
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)  # a refused or half-done rename may leave part of one
        _copy_files(staging, target)
        shutil.rmtree(staging, ignore_errors=True)
    (target / COMPLETE_MARKER).write_text("complete\n")


def _copy_files(source: Path, target: Path) -> None:
    """Every file under ``source`` to the same place under ``target``: contents only, because a bucket mount
    may refuse the permission and time changes that ``shutil.copytree`` also makes."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def _checkpoint_folders(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders (complete or not), oldest step first."""
    found = [p for p in folder.glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    return sorted(found, key=_step)


def _rotate_checkpoints(folder: str, keep: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints; older folders, finished or not, are removed."""
    folders = _checkpoint_folders(Path(folder))
    kept = [p for p in folders if is_complete(p)][-keep:] if keep else []
    for path in folders:
        if kept and path not in kept and _step(path) < _step(kept[-1]):
            shutil.rmtree(path, ignore_errors=True)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir/checkpoints`` that carries the completion marker
    (staging folders, and folders a kill left unmarked, are ignored)."""
    complete = [p for p in _checkpoint_folders(Path(output_dir) / CHECKPOINTS) if is_complete(p)]
    return str(complete[-1]) if complete else None


AUTO_DATALOADER_WORKERS = 4  # at most, on a GPU; measured on an H200 host of 16 cores (benchmarks/README.md)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as containers set it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def dataloader_worker_count(config) -> int:
    """How many processes run the collator (the image processor, the tokenizer) beside training.

    ``config.dataloader_workers`` when set; otherwise, on a GPU, up to ``AUTO_DATALOADER_WORKERS``, leaving two
    CPUs per training process on the host, and on a CPU 0 (training already uses every core there). With 0 the
    collator runs in the training process between steps, and the GPU waits for it: on an H200 (16 cores),
    E4B bf16 LoRA (compiled, micro-batch 32) trained JPEG files at 24.0 samples/s with 0 workers (0.52 s a step
    waiting for data) and at 39.6 with 4 (0.006 s), against 37.9 on ready tensors (whole steps; benchmarks/README.md,
    runs G-H)."""
    if config.dataloader_workers is not None:
        return config.dataloader_workers
    if not torch.cuda.is_available():
        return 0
    per_process = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(AUTO_DATALOADER_WORKERS, per_process - 2))


def gpu_memory_bytes() -> int:
    """The current GPU's memory (what ``helpers.memory`` plans against)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def planned_batch(model, config) -> tuple[int, int, str]:
    """(micro-batch, gradient accumulation, how chosen) for ``train()``: on a GPU ``helpers.memory.run_batch``
    (the largest micro-batch the memory plan fits, the step's batch as configured); on a CPU the config's."""
    if not torch.cuda.is_available():
        return config.batch_size, config.gradient_accumulation, "as configured (CPU)"
    from helpers.memory import run_batch

    trainable = next((p for p in model.parameters() if p.requires_grad), None)
    lora_dtype = "fp32" if trainable is not None and trainable.dtype == torch.float32 else "bf16"
    return run_batch(unwrap_gemma4(model).config, config, gpu_memory_bytes(), lora_dtype=lora_dtype,
                     compiled=should_compile_layers(config), liger=liger_kernel_count(model) > 0)


def training_arguments(config, output_dir: str | Path, micro_batch: int | None = None,
                       gradient_accumulation: int | None = None) -> TrainingArguments:
    """TrainingArguments from a ``RunConfig``: exactly the ones notebook 04 shows as plain code (a test
    checks the two agree). ``micro_batch`` / ``gradient_accumulation``: in place of the config's
    ``batch_size`` / ``gradient_accumulation`` (``train()`` passes ``planned_batch``'s)."""
    on_gpu = torch.cuda.is_available()
    workers = dataloader_worker_count(config)
    if config.optimizer == "adamw_8bit" and not on_gpu:
        raise ValueError("optimizer='adamw_8bit' (bitsandbytes) needs a CUDA GPU; use 'adamw_torch' on the CPU")
    return TrainingArguments(
        output_dir=str(Path(output_dir) / CHECKPOINTS),
        per_device_train_batch_size=micro_batch or config.batch_size,
        gradient_accumulation_steps=gradient_accumulation or config.gradient_accumulation,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_nan_inf_filter=False,  # a non-finite loss stops the run (FiniteLossCheck); the filter's test syncs
        optim="adamw_bnb_8bit" if config.optimizer == "adamw_8bit" else "adamw_torch_fused",
        logging_steps=0.02,  # a fraction: about 50 loss points per run, whatever its length
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=on_gpu and (config.quantization != "none" or torch.cuda.is_bf16_supported()),
        use_cpu=not on_gpu,
        dataloader_num_workers=workers,  # the collator in worker processes, batches ready before the step
        dataloader_persistent_workers=workers > 0,  # kept across epochs, not started again for each
        remove_unused_columns=False,  # the collator takes raw {"image", "label"} examples
        ddp_find_unused_parameters=False,  # see train(): nothing trainable is left without a gradient
        report_to="none",
        disable_tqdm=False,
    )  # gradient checkpointing is applied with LoRA (helpers.modeling.apply_lora), not here


def peak_memory() -> tuple[int, str]:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def loss_history(trainer: Trainer) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]


def save_adapter(model, output_dir: str | Path, state_dict: dict | None = None, prompt: dict | None = None) -> Path:
    """``save_pretrained`` into a staging folder, then ``publish_folder``: the adapter is whole once marked.
    ``prompt`` (``helpers.chat``: the question, system prompt and thinking setting it was trained with) goes in
    with it."""
    final = Path(output_dir) / ADAPTER
    staging = Path(output_dir) / ADAPTER_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=state_dict)
    if prompt is not None:
        save_prompt(staging, prompt)
    publish_folder(staging, final)
    return final


def gathered_lora_state(model) -> dict:
    """The full LoRA tensors of an FSDP2-sharded model, on the CPU; a collective: call it on every rank.

    Only the adapter is gathered, not the frozen base model (accelerator.get_state_dict would gather all
    62 GB of a bf16 31B to rank 0), in the state dict's own order, which is the same on every rank."""
    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu()
            for name, value in model.state_dict().items() if "lora_" in name}


def save_final_adapter(trainer: Trainer, model, output_dir: str | Path, prompt: dict | None = None) -> Path:
    """The adapter (with its prompt), written once (by rank 0); the other ranks wait until it is there."""
    state_dict = None
    if trainer.is_fsdp_enabled:  # the weights are sharded: gather the LoRA ones (every rank takes part)
        state_dict = gathered_lora_state(trainer.model_wrapped)
    if trainer.args.should_save:
        save_adapter(model, output_dir, state_dict, prompt)
    trainer.accelerator.wait_for_everyone()
    return Path(output_dir) / ADAPTER


def freeze_unused_adapters(model) -> int:
    """Freeze the LoRA weights of modules image training never runs; returns how many tensors.

    They would get no gradient anyway (AdamW skips them), so training is unchanged; but while they ask for
    one, DDP must search the autograd graph for unused parameters on every step (``find_unused_parameters``).
    They stay in the saved adapter, still at their initial value (B = 0: no effect)."""
    frozen = 0
    for name, param in model.named_parameters():
        if param.requires_grad and any(part in name for part in NOT_RUN_IN_IMAGE_TRAINING):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def train(model, collator, train_examples, config, output_dir: str | Path, callbacks=None,
          args: TrainingArguments | None = None) -> TrainResult:
    """Fine-tune ``model`` (already wrapped with LoRA) on ``train_examples``; resumes when it can.

    Taught in notebook 04. ``args``: the ``TrainingArguments`` (default: ``training_arguments(config,
    output_dir)``, what notebook 04 shows). Returns a ``TrainResult`` with steps, wall time, peak memory and
    losses; ``already_finished`` says that the folder's checkpoint was finished and nothing was trained.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args is None:
        micro, accumulation, how = planned_batch(model, config)
        if torch.cuda.is_available():  # the chosen micro-batch, said (CPU runs print nothing new)
            print(f"train(): micro-batch {micro} x gradient accumulation {accumulation} ({how})", flush=True)
        args = training_arguments(config, output_dir, micro, accumulation)
    freeze_unused_adapters(model)
    # Nothing trainable is left without a gradient. Said explicitly: left None, the Trainer turns DDP's
    # search for unused parameters on for any model that is not a PreTrainedModel, a PeftModel included.
    args.ddp_find_unused_parameters = False
    trainer = LabelledPositionsTrainer(model=model, args=args, train_dataset=list(train_examples),
                                       data_collator=collator, callbacks=callbacks)
    resume = last_complete_checkpoint(output_dir)
    start = time.perf_counter()
    finished = resume is not None and checkpoint_step(resume) >= planned_steps(trainer)
    compiled = 0
    if finished:
        # A run killed after its last checkpoint (or simply rerun): resumed mid-epoch, the Trainer would
        # take one more optimizer step before checking max_steps. Load the finished weights instead.
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
    else:
        compiled = compile_layers(model) if should_compile_layers(config) else 0  # in place, lazily on first call
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            if compiled:
                uncompile_layers(model)  # evaluation and generation run eager (no recompiles per length)
    wall = time.perf_counter() - start
    chat = getattr(collator, "chat", None)  # the prompt the collator trained with, saved with the adapter
    adapter = save_final_adapter(trainer, model, output_dir, chat.settings() if chat is not None else None)
    peak, kind = peak_memory()
    return TrainResult(global_step=trainer.state.global_step, resumed_from=resume, wall_seconds=wall,
                       peak_memory_bytes=peak, peak_memory_kind=kind, adapter_dir=str(adapter),
                       loss_history=loss_history(trainer), train_samples=len(train_examples),
                       already_finished=finished, compiled_layers=compiled,
                       micro_batch=args.per_device_train_batch_size,
                       gradient_accumulation=args.gradient_accumulation_steps)


def planned_steps(trainer: Trainer) -> int:
    """The optimizer steps the run will take in all, computed as the Trainer itself computes them."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def checkpoint_step(checkpoint: str) -> int:
    return TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
