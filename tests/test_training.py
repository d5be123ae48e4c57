"""What the repository adds to the Trainer: the answer-only loss, checkpoints marked complete, the stop on a NaN
loss; and a whole run through build_trainer: steps, resume, a loadable adapter."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from reference import full_logits_loss
from transformers import AutoModelForMultimodalLM

from helpers import speed
from helpers.collator import VisionChatCollator
from helpers.data import load_examples
from helpers.modeling import apply_lora
from helpers.run.config import RunConfig
from helpers.run.folder import (
    COMPLETE_MARKER,
    adapter_staging,
    last_complete_checkpoint,
    mark_complete,
    publish_adapter,
)
from helpers.training import (
    NonFiniteLossError,
    TrainResult,
    answer_only_loss,
    build_trainer,
    training_arguments,
)

# -- the loss --------------------------------------------------------------------------------------------------

@pytest.fixture(params=["large", "e-series"])
def model_and_batch(request, tiny_path, tiny_e_series_path, tiny_processor, tiny_e_series_processor):
    path, processor = ((tiny_path, tiny_processor) if request.param == "large"
                       else (tiny_e_series_path, tiny_e_series_processor))
    examples = load_examples("digits", "train", size=6, seed=3)
    answers = ["zero", "one two", "three four five", "six", "seven eight", "nine"]  # answers of unequal length
    rows = [{**example, "answer": answer} for example, answer in zip(examples.examples, answers)]
    batch = VisionChatCollator(processor, examples.class_names, logits_to_keep=True)(rows)
    return AutoModelForMultimodalLM.from_pretrained(path), batch


def answer_loss(model, batch, num_items_in_batch=None):
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    return answer_only_loss(outputs, batch["labels"], num_items_in_batch)


def test_logits_are_computed_at_the_answers_positions_only(model_and_batch):
    model, batch = model_and_batch
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    per_row = (batch["labels"] != -100).sum(dim=1)
    assert logits.shape == (len(per_row), int(per_row.max()), model.config.get_text_config().vocab_size)
    assert batch["labels"].shape[1] > 10 * int(per_row.max())  # the prompt and the image are most of the sequence
    assert int(per_row.min()) < int(per_row.max())  # rows of unequal answers: the padded columns are ignored


def test_the_answer_only_loss_and_its_gradient_equal_the_models_own(model_and_batch):
    model, batch = model_and_batch
    ours, reference = answer_loss(model, batch), full_logits_loss(model, batch)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    weight = model.lm_head.weight
    ours_grad = torch.autograd.grad(answer_loss(model, batch), weight)[0]
    reference_grad = torch.autograd.grad(full_logits_loss(model, batch), weight)[0]
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-4, atol=1e-7)


def test_a_sum_over_the_accumulated_count_gives_the_accumulated_mean(model_and_batch):
    model, batch = model_and_batch
    n = int((batch["labels"][:, 1:] != -100).sum())  # what the Trainer passes as num_items_in_batch
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 3), slice(3, 6))]
    summed = sum(answer_loss(model, half, num_items_in_batch=n) for half in halves)
    torch.testing.assert_close(summed, answer_loss(model, batch), rtol=1e-5, atol=1e-6)


def test_the_softcap_is_kept(tiny_model, tiny_processor):
    examples = load_examples("digits", "train", size=4, seed=3)
    batch = VisionChatCollator(tiny_processor, examples.class_names, logits_to_keep=True)(examples.examples)
    tiny_model.config.get_text_config().final_logit_softcapping = 0.5  # a tight cap changes the loss
    capped = answer_loss(tiny_model, batch)
    torch.testing.assert_close(capped, full_logits_loss(tiny_model, batch), rtol=1e-5, atol=1e-6)
    assert capped > 1.5  # with logits capped at 0.5 nothing is confident


def test_the_positions_are_those_of_the_labels_in_order():
    from helpers.collator import answer_logit_positions

    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    # row 0: positions 1 and 2 predict 7 and 8; row 1: position 0 predicts 5, then one it ignores
    positions = answer_logit_positions(labels)
    assert positions.tolist() == [[1, 2], [0, 1]]
    assert labels[:, 1:].gather(1, positions).tolist() == [[7, 8], [5, -100]]


def test_full_logits_are_refused_with_the_fix_named(tiny_model, tiny_processor):
    examples = load_examples("digits", "train", size=2)
    batch = VisionChatCollator(tiny_processor, examples.class_names)(examples.examples)  # no logits_to_keep
    outputs = tiny_model(**{k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="logits_to_keep=True"):
        answer_only_loss(outputs, batch["labels"])


# -- a whole run -----------------------------------------------------------------------------------------------

def _trainer(run_dir, tiny_path, tiny_processor, **overrides):
    """What notebook 04 and the launcher build: training_arguments, the speed switches, build_trainer."""
    params = {"train_size": 16, "eval_size": 8, "batch_size": 4, "max_steps": 4, "save_steps": 2, "learning_rate": 1e-3}
    config = RunConfig(**{**params, **overrides})
    data = load_examples("digits", "train", size=config.train_size)
    torch.manual_seed(0)
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    args, _ = speed.switch_on(model, training_arguments(config, run_dir), config)
    collator = VisionChatCollator(tiny_processor, data.class_names)
    return build_trainer(model, args, data.examples, collator), model, collator


def test_trains_marks_checkpoints_saves_and_resumes(tmp_path, tiny_path, tiny_processor):
    trainer, model, collator = _trainer(tmp_path, tiny_path, tiny_processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(tmp_path))
    result = TrainResult.of(trainer)
    assert result.global_step == 4 and result.loss_history and result.wall_seconds > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((tmp_path / name / COMPLETE_MARKER).exists() for name in ("checkpoint-2", "checkpoint-4"))
    staging = adapter_staging(tmp_path)
    model.save_pretrained(staging)
    adapter = publish_adapter(tmp_path, staging, collator.chat.settings())
    assert (adapter / COMPLETE_MARKER).exists() and not staging.exists()
    loaded = PeftModel.from_pretrained(AutoModelForMultimodalLM.from_pretrained(tiny_path), adapter)
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters() if "lora_" in n)
    # a rerun with more steps continues from checkpoint-4 instead of starting over
    again, _, _ = _trainer(tmp_path, tiny_path, tiny_processor, max_steps=6)
    resume = last_complete_checkpoint(tmp_path)
    assert resume.endswith("checkpoint-4")
    again.train(resume_from_checkpoint=resume)
    assert TrainResult.of(again, resume).global_step == 6
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (tmp_path / "checkpoint-6" / COMPLETE_MARKER).exists()


def test_an_unmarked_checkpoint_is_never_resumed_from(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    mark_complete(tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-5").mkdir()  # written in place but not marked: a kill while it was saved
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()  # not a step
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-3")


@pytest.mark.parametrize("max_steps", [4, 3])  # 16 examples of 4: the last step ends the epoch, or not
def test_a_finished_run_resumed_takes_no_step(tmp_path, tiny_path, tiny_processor, max_steps):
    trainer, _, _ = _trainer(tmp_path, tiny_path, tiny_processor, max_steps=max_steps, save_steps=max_steps)
    trainer.train()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    history = TrainResult.of(trainer).loss_history
    again, model, _ = _trainer(tmp_path, tiny_path, tiny_processor, max_steps=max_steps, save_steps=max_steps)
    again.train(resume_from_checkpoint=last_complete_checkpoint(tmp_path))
    assert again.state.global_step == max_steps and TrainResult.of(again).loss_history == history
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{max_steps}"]
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_one_kept_checkpoint_is_refused(tmp_path, tiny_path, tiny_processor):
    trainer, _, _ = _trainer(tmp_path, tiny_path, tiny_processor)
    trainer.args.save_total_limit = 1
    with pytest.raises(ValueError, match="save_total_limit=1"):
        trainer.train()


@pytest.mark.parametrize("accumulation,poisoned_call,step,last_checkpoint", [
    (1, 4, 4, "checkpoint-2"),  # a save step: the stop comes before the optimizer step and the save
    (2, 3, 2, "checkpoint-1"),  # the first micro-batch of step 2: stopped before step 2's optimizer step
])
def test_a_non_finite_loss_stops_before_its_optimizer_step(tmp_path, tiny_path, tiny_processor, accumulation,
                                                             poisoned_call, step, last_checkpoint):
    trainer, model, _ = _trainer(tmp_path, tiny_path, tiny_processor, max_steps=6, batch_size=2,
                                 gradient_accumulation=accumulation, save_steps=2 // accumulation)
    calls = {"n": 0}

    def poisoned(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        loss = answer_only_loss(outputs, labels, num_items_in_batch)
        return loss * float("nan") if calls["n"] == poisoned_call else loss

    trainer.compute_loss_func = poisoned
    with pytest.raises(NonFiniteLossError, match=f"at step {step}:"):
        trainer.train()
    assert last_complete_checkpoint(tmp_path).endswith(last_checkpoint)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_worker_processes_collate_the_same_batches(tmp_path, tiny_path, tiny_processor):
    """The collator in a worker process (dataloader_workers) gives the same run as in the training process."""
    losses = {}
    for workers in (0, 1):
        trainer, _, _ = _trainer(tmp_path / str(workers), tiny_path, tiny_processor, train_size=4, batch_size=2,
                                 max_steps=3, save_steps=100, dataloader_workers=workers)
        assert trainer.args.dataloader_num_workers == workers
        assert trainer.args.dataloader_persistent_workers == (workers > 0)
        trainer.train()
        losses[workers] = [loss for _, loss in TrainResult.of(trainer).loss_history]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_the_arguments_are_the_configs(tmp_path):
    config = RunConfig(batch_size=6, gradient_accumulation=2, max_steps=7, learning_rate=2e-4, seed=3,
                       gradient_checkpointing=True, save_total_limit=3)
    args = training_arguments(config, tmp_path)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (6, 2, 7)
    assert args.learning_rate == 2e-4 and args.seed == 3 and args.activation_checkpointing
    assert args.output_dir == str(tmp_path) and args.save_total_limit == 3 and not args.remove_unused_columns
    assert Path(args.output_dir).name == tmp_path.name  # checkpoints go straight into the run folder
