"""What this repository adds to transformers' ``Trainer``, each handed to it by name. Taught in notebook 04.

Notebook 04 writes the recipe in plain transformers code (``TrainingArguments``, ``Trainer``, ``trainer.train``);
each addition then comes in a cell of its own:

- ``answer_only_loss``, the ``Trainer``'s ``compute_loss_func``: cross-entropy on the answer's tokens, from logits
  computed at those positions only (the collator's ``logits_to_keep``, transformers' own argument). Gemma 4's vocabulary has 262,144 entries:
  the model's own loss materialises logits for every position (one 31B sample of ~300 tokens: ~315 MB in float32,
  and as much again for their gradient), where the answer is a few tokens.
- ``CompleteCheckpoints``, a callback: each checkpoint is marked complete once transformers has written all of it,
  and a rerun resumes only from a marked one whose files still match the marker
  (``helpers.run.folder.last_complete_checkpoint``), so a run killed while saving resumes from the checkpoint before.
- ``StopOnNonFiniteLoss``, a callback: a NaN or infinite loss stops training in the step that produced it,
  before the optimizer changes the weights, with the step named.

``training_arguments`` builds the ``TrainingArguments`` notebook 04 writes and ``build_trainer`` the ``Trainer`` it
ends with, for the launcher and the tests (``tests/test_recipe.py`` keeps them equal to the notebook's);
``TrainResult`` is what a run did, for ``train_result.json`` and ``metrics.json``.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers.collator import IGNORE_INDEX, answer_order
from helpers.run.folder import CHECKPOINT_PREFIX, mark_complete, unmark


def answer_only_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of the answer's tokens, for ``Trainer(compute_loss_func=...)``.

    ``outputs.logits`` must hold the logits of the answer's positions only, ``[batch, K, vocabulary]``: what the
    model returns when the batch carries the collator's ``logits_to_keep`` (``answer_logit_positions``). The
    targets are found in ``labels`` in the same order, with no device sync (K is the logits' own width). With
    ``num_items_in_batch`` (the labelled tokens of the whole accumulated batch, over every process; the Trainer
    passes it) the sum is divided by it, so gradient accumulation and several GPUs give exactly the mean over
    the step's batch."""
    logits = outputs.logits
    if logits.dim() != 3 or logits.shape[1] >= labels.shape[1]:
        raise ValueError(f"answer_only_loss takes the logits of the answer's positions only, got shape "
                         f"{tuple(logits.shape)} for labels {tuple(labels.shape)}: build the collator with "
                         "logits_to_keep=True")
    following = labels[:, 1:]  # the token each position predicts
    # IGNORE_INDEX where a row has fewer labelled tokens than K
    targets = following.gather(1, answer_order(labels)[:, :logits.shape[1]])
    logits, targets = logits.flatten(0, 1).float(), targets.flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


class CompleteCheckpoints(TrainerCallback):
    """Writes the completion marker into each checkpoint once transformers has saved all of it: the name and a
    signature of every file (``helpers.run.folder.mark_complete``).

    ``helpers.run.folder.last_complete_checkpoint`` resumes only from marked ones whose files still match: a folder
    a kill left half written, or written but not yet marked, is never resumed from, and one whose files were
    lost or truncated afterwards is passed over for the one before. Transformers removes old checkpoints (down to
    ``save_total_limit``) before the new one is marked, so at least 2 are kept: with 1, a kill in between would
    leave no complete checkpoint. Works on a bucket mount too: nothing is renamed.

    A finished run resumed from its last checkpoint trains nothing more when that checkpoint ends an epoch. When it
    ends mid-epoch (``max_steps``, or a fraction of an epoch), transformers 5.23 runs one more step before it
    stops; that step's gradients are dropped before the optimizer, and it is neither counted, logged nor saved, so
    the weights stay the checkpoint's (a rerun of a finished run, or one killed before its adapter was saved)."""

    finished = False

    def on_train_begin(self, args, state, control, **kwargs):
        if args.save_total_limit is not None and args.save_total_limit < 2:
            raise ValueError(f"save_total_limit={args.save_total_limit}: keep at least 2 checkpoints, so that one "
                             "is complete while transformers writes the next")
        self.finished = 0 < state.max_steps <= state.global_step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.finished:
            model.zero_grad(set_to_none=True)  # the optimizer skips every weight without a gradient

    def on_step_end(self, args, state, control, **kwargs):
        if self.finished:
            state.global_step -= 1
            control.should_save = control.should_log = control.should_evaluate = False
            control.should_training_stop = True
        elif control.should_save and state.is_world_process_zero:
            # A run resumed from before a damaged checkpoint writes that folder again: its old marker goes first.
            unmark(self.checkpoint(args, state))

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its part of the checkpoint
        if state.is_world_process_zero:
            mark_complete(self.checkpoint(args, state))

    @staticmethod
    def checkpoint(args, state) -> Path:
        return Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training when a step's loss is NaN or infinite, before its optimizer step.

    A NaN, or an overflow, in the model's loss makes the gradients it reaches non-finite, so the gradients are read
    once a step, after the backward passes and clipping and before the optimizer (``on_pre_optimizer_step``): the
    weights in memory and the last checkpoint stay finite, and the step is named. (What it guards is the weights:
    a loss made infinite by adding a constant leaves the gradients, and so the weights, as they were.) One device
    sync a step; transformers' own NaN filter (``logging_nan_inf_filter``) reads every micro-batch's loss instead,
    and hides the step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        if gradients and not bool(torch.nn.utils.get_total_norm(gradients).isfinite()):
            raise NonFiniteLossError(
                f"non-finite gradients at step {state.global_step + 1}: the loss was NaN or infinite. Training "
                f"stopped before this step changed the weights; the last complete checkpoint in {args.output_dir} "
                "is kept.")


def training_arguments(config, run_dir) -> TrainingArguments:
    """The ``TrainingArguments`` notebook 04 writes for a ``RunConfig`` (``tests/test_recipe.py`` checks them equal)."""
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        activation_checkpointing=config.gradient_checkpointing,
        optim="adamw_bnb_8bit" if config.optimizer == "adamw_8bit" else "adamw_torch_fused",
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=0.02,
        seed=config.seed,
        remove_unused_columns=False,
        report_to="none",
    )


def build_trainer(model, args: TrainingArguments, train_examples, collator, callbacks=()) -> Trainer:
    """The ``Trainer`` notebook 04 ends with: the recipe's, with ``answer_only_loss`` (the collator marking the
    answer's positions) and the two callbacks, then ``callbacks`` (a benchmark's timers)."""
    collator.logits_to_keep = True
    return Trainer(model=model, args=args, train_dataset=train_examples, data_collator=collator,
                   compute_loss_func=answer_only_loss,
                   callbacks=[CompleteCheckpoints(), StopOnNonFiniteLoss(), *callbacks])


def peak_memory() -> tuple[int, str]:
    """Peak GPU memory allocated by this process, or its peak resident memory on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


@dataclass
class TrainResult:
    """What a run did; ``loss_history`` is ``[(step, loss), ...]`` as logged (a resumed run's earlier ones too)."""

    global_step: int
    resumed_from: str | None
    wall_seconds: float  # this call of trainer.train() (a finished run reopened: the seconds of a call that trained no step)
    peak_memory_bytes: int
    peak_memory_kind: str
    train_samples: int
    micro_batch: int  # per device, as trained
    gradient_accumulation: int
    loss_history: list = field(default_factory=list)

    @classmethod
    def of(cls, trainer: Trainer, resumed_from: str | None = None) -> TrainResult:
        state = trainer.state
        runtime = next((row["train_runtime"] for row in reversed(state.log_history) if "train_runtime" in row), 0.0)
        peak, kind = peak_memory()
        return cls(global_step=state.global_step, resumed_from=resumed_from, wall_seconds=runtime,
                   peak_memory_bytes=peak, peak_memory_kind=kind, train_samples=len(trainer.train_dataset),
                   micro_batch=trainer.args.per_device_train_batch_size,
                   gradient_accumulation=trainer.args.gradient_accumulation_steps,
                   loss_history=[(row["step"], row["loss"]) for row in state.log_history if "loss" in row])

    def to_dict(self) -> dict:
        return asdict(self)
