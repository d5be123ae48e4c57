"""Killed runs and numerical faults.

The runner (notebook 04) is SIGKILLed twice during training, with its notebook kernel, as a machine failure
would: once just after checkpoint-2 is in place, once while checkpoint-4 is fully written under
``.staging`` but not yet renamed (a hook holds that rename). The same command then finishes the run: it must
resume from checkpoint-2 (the half-written checkpoint-4 is ignored) and end with optimizer steps 1..max_steps,
each once, as an uninterrupted run's. ``benchmarks/kill_resume.py`` (whose functions this test uses) tries
random kill points for humans. The Cloud Run entrypoint's own kill-and-retry is in tests/test_cloudrun.py.
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

MAX_STEPS, SAVE_STEPS = 6, 2


def test_killed_twice_then_rerun_resumes_from_the_last_complete_checkpoint(tmp_path):
    out, hook, log = tmp_path / "run", tmp_path / "hook", tmp_path / "runner.log"
    hook.mkdir()
    command = kr.runner_command(out, train_size=24, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, batch_size=6)

    # Kill 1: during training, just after the first checkpoint is in place.
    first = kr.start(command, kr.run_env(hook), log)
    reached = kr.wait_for(first, lambda: 2 in kr.complete_checkpoints(out), timeout=600, poll=0.002)
    assert reached and first.poll() is None, f"run 1 ended before checkpoint-2:\n{log.read_text()[-3000:]}"
    kr.kill_tree(first)
    after_first = kr.snapshot(out)
    assert after_first["complete"] == [2], after_first
    assert not after_first["adapter"] and not after_first["train_result"]

    # Kill 2: during the save of checkpoint-4, when every file is written under .staging but not renamed.
    marker = tmp_path / "held"
    second = kr.start(command, kr.run_env(hook, hold_marker=marker, hold_step=4), log)
    reached = kr.wait_for(second, marker.exists, timeout=600)
    assert reached and second.poll() is None, f"run 2 never reached the save of checkpoint-4:\n{log.read_text()[-3000:]}"
    kr.kill_tree(second)
    after_second = kr.snapshot(out)
    assert after_second["complete"] == [2], after_second  # checkpoint-4 is not in place...
    assert "checkpoint-4/trainer_state.json" in after_second["staging"]  # ...though it is written under .staging

    # The same command, uninterrupted: resumes from checkpoint-2 and finishes with exactly MAX_STEPS steps.
    final = subprocess.run(command, env=kr.run_env(hook), cwd=REPO, capture_output=True, text=True, timeout=900,
                           check=False)
    assert final.returncode == 0, (final.stdout + final.stderr)[-3000:]
    assert kr.verify(out, MAX_STEPS, expected_resume=2) == []
    state = json.loads((out / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert max(row["step"] for row in state["log_history"]) == MAX_STEPS  # no step beyond max_steps
    assert (out / "04_training.ipynb").exists()


def test_on_a_bucket_mount_killed_mid_copy_then_rerun_resumes_from_the_last_marked_checkpoint(tmp_path):
    """The run folder on a simulated Cloud Storage FUSE mount (flat bucket, no rename-dir-limit): directory
    renames fail and file locks are refused, as gcsfuse's semantics say. Checkpoints and the adapter are then
    copied into place file by file with the completion marker last; the run is killed while checkpoint-4 is
    half copied (one file in place, no marker), and the rerun must ignore that folder and resume from
    checkpoint-2."""
    bucket, hook, log = tmp_path / "bucket", tmp_path / "hook", tmp_path / "runner.log"
    out = bucket / "runs" / "exec-1"
    bucket.mkdir()
    hook.mkdir()
    command = kr.runner_command(out, train_size=24, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, batch_size=6)

    marker = tmp_path / "held"
    first = kr.start(command, kr.run_env(hook, hold_step=4, gcsfuse_root=bucket, hold_copy=marker), log)
    reached = kr.wait_for(first, marker.exists, timeout=600)
    assert reached and first.poll() is None, f"run 1 never reached the copy of checkpoint-4:\n{log.read_text()[-3000:]}"
    kr.kill_tree(first)
    after = kr.snapshot(out)
    assert after["complete"] == [2], after  # checkpoint-2 was copied and marked...
    half = out / "checkpoints" / "checkpoint-4"
    assert half.is_dir() and len([p for p in half.rglob("*") if p.is_file()]) == 1  # ...checkpoint-4 half copied

    final = subprocess.run(command, env=kr.run_env(hook, gcsfuse_root=bucket), cwd=REPO, capture_output=True,
                           text=True, timeout=900, check=False)
    assert final.returncode == 0, (final.stdout + final.stderr)[-3000:]
    assert kr.verify(out, MAX_STEPS, expected_resume=2) == []


def test_rerun_of_a_run_killed_after_its_last_checkpoint_takes_no_extra_step(tmp_path, tiny_path, tiny_processor):
    """Killed after checkpoint-max_steps is in place (before the adapter is saved), or simply rerun when finished:
    max_steps=2 ends inside the first epoch (12 examples, batch 4: 3 steps per epoch)."""
    from transformers import AutoModelForMultimodalLM

    from helpers.collator import VisionChatCollator
    from helpers.data import load_examples
    from helpers.modeling import apply_lora
    from helpers.run.config import RunConfig
    from helpers.training import train

    config = RunConfig(train_size=12, batch_size=4, max_steps=2, save_steps=2, learning_rate=1e-3)
    data = load_examples("digits", "train", size=12)
    collator = VisionChatCollator(tiny_processor, data.class_names)
    first = train(apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path)), collator, data.examples, config,
                  tmp_path)
    assert first.global_step == 2
    again = train(apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path)), collator, data.examples, config,
                  tmp_path)
    assert again.resumed_from.endswith("checkpoint-2")
    assert again.global_step == 2 and [step for step, _ in again.loss_history] == [1, 2]


# ---------------------------------------------------------------------------------------- numerical faults
# NaN at step 3 is tests/test_training.py::test_non_finite_loss_stops_with_the_step_named; here inf, and the
# message as the runner prints it.


def test_inf_loss_stops_with_the_step_named_and_keeps_the_last_checkpoint(tmp_path, tiny_path, tiny_processor,
                                                                          monkeypatch):
    from transformers import AutoModelForMultimodalLM

    from helpers import training
    from helpers.collator import VisionChatCollator
    from helpers.data import load_examples
    from helpers.modeling import apply_lora
    from helpers.run.config import RunConfig

    config = RunConfig(train_size=16, batch_size=4, max_steps=6, save_steps=2, learning_rate=1e-3)
    data = load_examples("digits", "train", size=16)
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    real, calls = training.labelled_positions_loss, {"n": 0}

    def overflowing(model, batch, num_items_in_batch=None):
        calls["n"] += 1
        loss = real(model, batch, num_items_in_batch)
        return loss + float("inf") if calls["n"] == 5 else loss

    monkeypatch.setattr(training, "labelled_positions_loss", overflowing)
    with pytest.raises(training.NonFiniteLossError, match=r"non-finite training loss \(inf\) at step 5"):
        training.train(model, VisionChatCollator(tiny_processor, data.class_names), data.examples, config, tmp_path)
    assert training.last_complete_checkpoint(tmp_path).endswith("checkpoint-4")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoints" / ".staging").exists()


def test_the_runner_reports_a_non_finite_loss_with_the_step(tmp_path, monkeypatch, capsys):
    """A failing notebook cell reaches the runner's error output with the exception and its message."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from helpers.runner import main

    def failing(source, executed, **kwargs):
        raise PapermillExecutionError(cell_index=17, exec_count=9, source="train(...)", ename="NonFiniteLossError",
                                      evalue="non-finite training loss (nan) at step 3; stopping.", traceback=[])

    monkeypatch.setattr(papermill, "execute_notebook", failing)
    assert main(["--output-dir", str(tmp_path), "--notebook", "04_training"]) == 1
    err = capsys.readouterr().err
    assert "04_training.ipynb failed in cell 9: NonFiniteLossError: non-finite training loss (nan) at step 3" in err
