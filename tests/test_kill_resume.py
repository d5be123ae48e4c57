"""Killed runs and numerical faults.

The runner (notebook 04) is SIGKILLed twice during training, with its notebook kernel, as a machine failure
would: once just after checkpoint-2 is marked complete, once while checkpoint-4 is fully written but not yet
marked (a hook holds the marker's write). The same command then finishes the run: it must resume from
checkpoint-2 (the unmarked checkpoint-4 is ignored) and end with optimizer steps 1..max_steps, each once, as an
uninterrupted run's. On a simulated bucket mount the run is killed while its adapter is half copied into place,
after its last checkpoint: the rerun must take no step more and publish the adapter. ``benchmarks/kill_resume.py``
(whose functions these tests use) tries random kill points for humans. The Cloud Run entrypoint's own
kill-and-retry is in tests/test_cloudrun.py.
"""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kill_resume", REPO / "benchmarks" / "kill_resume.py")
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

MAX_STEPS, SAVE_STEPS = 6, 2  # 24 examples of 6: 4 steps an epoch, so the run ends mid-epoch


def kill_when(command: list[str], env: dict, log: Path, condition, what: str) -> None:
    """Start the run, wait until ``condition()`` holds while it still runs, then SIGKILL it with its kernel."""
    run = kr.start(command, env, log)
    reached = kr.wait_for(run, condition, timeout=600, poll=0.002)
    assert reached and run.poll() is None, f"the run never reached {what}:\n{log.read_text()[-3000:]}"
    kr.kill_tree(run)


def rerun(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """The same command again, uninterrupted; it must succeed."""
    final = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert final.returncode == 0, (final.stdout + final.stderr)[-3000:]
    return final


def test_killed_twice_then_rerun_resumes_from_the_last_complete_checkpoint(tmp_path):
    out, hook, log = tmp_path / "run", tmp_path / "hook", tmp_path / "runner.log"
    hook.mkdir()
    command = kr.runner_command(out, train_size=24, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, batch_size=6)

    # Kill 1: during training, just after the first checkpoint is marked.
    kill_when(command, kr.run_env(hook), log, lambda: 2 in kr.complete_checkpoints(out), "checkpoint-2")
    after_first = kr.snapshot(out)
    assert after_first["complete"][:1] == [2] and not after_first["adapter"] and not after_first["train_result"]

    # Kill 2: checkpoint-4 fully written in place, its completion marker not yet (the hook holds that write).
    marker = tmp_path / "held"
    kill_when(command, kr.run_env(hook, hold_marker=marker, hold_step=4), log, marker.exists, "checkpoint-4's marker")
    after_second = kr.snapshot(out)
    assert after_second["complete"] == [2], after_second  # checkpoint-4 is not marked...
    assert "checkpoint-4/trainer_state.json" in after_second["unmarked"]  # ...though all of it is written

    # The same command, uninterrupted: resumes from checkpoint-2 and finishes with exactly MAX_STEPS steps.
    rerun(command, kr.run_env(hook))
    assert kr.verify(out, MAX_STEPS, expected_resume=2) == []
    assert (out / "04_training.ipynb").exists()


def test_a_checkpoint_damaged_after_a_kill_is_passed_over_and_the_steps_after_it_are_trained_again(tmp_path):
    """Killed just after checkpoint-4 is marked; then checkpoint-4 loses its optimizer and scheduler state. The
    rerun says so, resumes from checkpoint-2, and trains steps 3 and 4 again with the losses of the first run:
    the optimizer state it resumed with is the one those steps started from."""
    out, hook, log = tmp_path / "run", tmp_path / "hook", tmp_path / "runner.log"
    hook.mkdir()
    command = kr.runner_command(out, train_size=24, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, batch_size=6)
    kill_when(command, kr.run_env(hook), log, lambda: 4 in kr.complete_checkpoints(out), "checkpoint-4")
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    first_losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
    kr.damage_checkpoint(out / "checkpoint-4", "optimizer")

    final = rerun(command, kr.run_env(hook))
    assert f"{out / 'checkpoint-4'} is damaged (optimizer.pt is missing" in final.stdout
    assert "resuming from checkpoint-2 instead" in final.stdout
    assert kr.verify(out, MAX_STEPS, expected_resume=2) == []
    losses = dict(map(tuple, json.loads((out / "train_result.json").read_text())["train"]["loss_history"]))
    assert [losses[step] for step in (3, 4)] == pytest.approx([first_losses[3], first_losses[4]], rel=1e-6)


def test_on_a_bucket_mount_killed_mid_copy_of_the_adapter_then_rerun_publishes_it_without_a_step_more(tmp_path):
    """The run folder on a simulated Cloud Storage FUSE mount (flat bucket, no rename-dir-limit): directory
    renames fail and file locks are refused, as gcsfuse's semantics say. Checkpoints are written in place and
    marked; the adapter is copied into place file by file, its marker last. The run is killed after its last
    checkpoint, with the adapter half copied (one file, no marker): the rerun resumes from checkpoint-6, which
    ends the run mid-epoch, takes no step more, and publishes the adapter whole."""
    bucket, hook, log = tmp_path / "bucket", tmp_path / "hook", tmp_path / "runner.log"
    out = bucket / "runs" / "exec-1"
    bucket.mkdir()
    hook.mkdir()
    command = kr.runner_command(out, train_size=24, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, batch_size=6)

    marker = tmp_path / "held"
    kill_when(command, kr.run_env(hook, gcsfuse_root=bucket, hold_copy=marker), log, marker.exists, "the adapter's copy")
    after = kr.snapshot(out)
    assert after["complete"] == [4, 6] and not after["adapter"] and not after["train_result"], after
    assert len([p for p in (out / "adapter").rglob("*") if p.is_file()]) == 1  # half copied, not marked

    rerun(command, kr.run_env(hook, gcsfuse_root=bucket))
    assert kr.verify(out, MAX_STEPS, expected_resume=MAX_STEPS) == []


# ---------------------------------------------------------------------------------------- numerical faults
# NaN is tests/test_training.py::test_a_non_finite_loss_stops_before_its_optimizer_step; here an overflow to
# inf, and the message as the runner prints it.


def test_an_infinite_loss_stops_with_the_step_named_and_keeps_the_last_checkpoint(tmp_path, tiny_path,
                                                                                  tiny_processor):
    from transformers import AutoModelForMultimodalLM

    from helpers.collator import VisionChatCollator
    from helpers.data import load_examples
    from helpers.modeling import apply_lora
    from helpers.run.config import RunConfig
    from helpers.run.folder import last_complete_checkpoint
    from helpers.training import NonFiniteLossError, answer_only_loss, build_trainer, training_arguments

    config = RunConfig(train_size=16, batch_size=4, max_steps=6, save_steps=2, learning_rate=1e-3)
    data = load_examples("digits", "train", size=16)
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    trainer = build_trainer(model, training_arguments(config, tmp_path), data.examples,
                            VisionChatCollator(tiny_processor, data.class_names))
    calls = {"n": 0}

    def overflowing(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        loss = answer_only_loss(outputs, labels, num_items_in_batch)
        return loss * float("inf") if calls["n"] == 5 else loss  # as a loss that overflows does

    trainer.compute_loss_func = overflowing
    with pytest.raises(NonFiniteLossError, match="non-finite gradients at step 5: the loss was NaN or infinite"):
        trainer.train()
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-4")
    assert not (tmp_path / "adapter").exists()


def test_the_runner_reports_a_non_finite_loss_with_the_step(tmp_path, monkeypatch, capsys):
    """A failing notebook cell reaches the runner's error output with the exception and its message."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from helpers.runner import main

    def failing(source, executed, **kwargs):
        raise PapermillExecutionError(cell_index=17, exec_count=9, source="trainer.train(...)",
                                      ename="NonFiniteLossError", traceback=[],
                                      evalue="non-finite gradients at step 3: the loss was NaN or infinite.")

    monkeypatch.setattr(papermill, "execute_notebook", failing)
    assert main(["--output-dir", str(tmp_path), "--notebook", "04_training"]) == 1
    err = capsys.readouterr().err
    assert "04_training.ipynb failed in cell 9: NonFiniteLossError: non-finite gradients at step 3" in err
