"""A run folder under faults: a damaged checkpoint or adapter, ``--fresh`` where it would delete an adapter that
nothing retrains, and many processes racing for one stale lock. Killed runs are in tests/test_kill_resume.py."""

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from helpers.run import folder as run_folder
from helpers.run.command_line import check_data
from helpers.run.config import RunConfig
from helpers.run.folder import (
    ADAPTER,
    LOCK,
    RunFolderError,
    acquire_lock,
    adapter_folder,
    folder_problems,
    is_trained,
    last_complete_checkpoint,
    mark_complete,
    run_manifest,
    start_run,
)

_spec = importlib.util.spec_from_file_location("kill_resume", Path(__file__).parents[1] / "benchmarks" / "kill_resume.py")
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)  # the lock race is the benchmark's own, run here at a fixed size


def manifest_of(**params) -> dict:
    config = RunConfig(**params)
    return run_manifest(config, check_data(config))


def checkpoint(run_dir, step: int, weights: bytes = b"w" * 3_000_000):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name, content in (("adapter_model.safetensors", weights), ("optimizer.pt", b"o" * 5000),
                          ("scheduler.pt", b"s"), ("trainer_state.json", b"{}")):
        (folder / name).write_bytes(content)
    mark_complete(folder)
    return folder


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("damage", ["optimizer and scheduler deleted", "weights truncated", "state deleted",
                                    "weights rewritten"])
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_with_a_line_saying_why(tmp_path, damage):
    checkpoint(tmp_path, 2)
    newest = checkpoint(tmp_path, 4)
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-4")
    if damage == "optimizer and scheduler deleted":
        (newest / "optimizer.pt").unlink()
        (newest / "scheduler.pt").unlink()
    elif damage == "weights truncated":
        with open(newest / "adapter_model.safetensors", "r+b") as handle:
            handle.truncate(1000)
    elif damage == "state deleted":
        (newest / "trainer_state.json").unlink()
    else:  # same size, other bytes at its end
        (newest / "adapter_model.safetensors").write_bytes(b"w" * 2_999_999 + b"x")
    lines = []
    assert last_complete_checkpoint(tmp_path, report=lines.append).endswith("checkpoint-2")
    assert lines[0].startswith(f"{newest} is damaged (") and lines[-1] == "resuming from checkpoint-2 instead"


def test_with_every_complete_checkpoint_damaged_the_run_stops_before_the_model_loads(tmp_path):
    start_run(tmp_path, manifest_of())
    (checkpoint(tmp_path, 2) / "optimizer.pt").unlink()
    with pytest.raises(RunFolderError, match="every complete checkpoint of .* is damaged \\(checkpoint-2\\)"):
        start_run(tmp_path, manifest_of())  # the runner and notebook 04 call it before anything loads


def test_start_run_names_the_checkpoint_it_resumes_from(tmp_path):
    start_run(tmp_path, manifest_of())
    assert start_run(tmp_path, manifest_of()).endswith("resuming from the start (no complete checkpoint yet)")
    checkpoint(tmp_path, 2)
    assert start_run(tmp_path, manifest_of()).endswith("resuming from checkpoint-2")


def test_a_marker_lists_every_file_and_an_unmarked_folder_is_not_whole(tmp_path):
    folder = checkpoint(tmp_path, 2)
    listed = json.loads((folder / "COMPLETE").read_text())["files"]
    assert sorted(listed) == ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"]
    assert folder_problems(folder) == []
    (folder / "COMPLETE").unlink()
    assert folder_problems(folder) == ["no COMPLETE marker"]


def test_a_damaged_adapter_is_an_error_naming_the_file_and_the_run_is_not_trained(tmp_path):
    adapter = tmp_path / ADAPTER
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"a" * 4096)
    mark_complete(adapter)
    (tmp_path / "train_result.json").write_text("{}")
    assert adapter_folder(tmp_path) == adapter and is_trained(tmp_path)
    with open(adapter / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(RunFolderError, match="adapter_model.safetensors differs .*rerun the training command"):
        adapter_folder(tmp_path)
    assert not is_trained(tmp_path)  # the runner runs notebook 04 again, which publishes it from the checkpoint


# ----------------------------------------------------------------------------------------------- --fresh

def test_fresh_is_refused_where_no_notebook_asked_for_would_train_a_new_adapter(tmp_path, capsys):
    from helpers.runner import main

    start_run(tmp_path, manifest_of())
    (tmp_path / ADAPTER).mkdir()
    (tmp_path / ADAPTER / "adapter_model.safetensors").write_bytes(b"trained")
    assert main(["--output-dir", str(tmp_path), "--notebook", "05_evaluation", "--fresh"]) == 1
    assert "--fresh would delete the adapter, checkpoints and results" in capsys.readouterr().err
    assert (tmp_path / ADAPTER / "adapter_model.safetensors").read_bytes() == b"trained"
    assert "started fresh" in start_run(tmp_path, manifest_of(), trains=True, fresh=True)  # training replaces it
    assert not (tmp_path / ADAPTER).exists()


# -------------------------------------------------------------------------------------------------- lock

@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "guard file (gcsfuse)"])
def test_many_processes_racing_for_one_stale_lock_leave_exactly_one_holder(tmp_path, no_flock):
    for round_ in range(15):
        run_dir = tmp_path / f"round-{round_}"
        run_dir.mkdir()
        holders = kr.race_for_stale_lock(run_dir, racers=8, no_flock=no_flock)
        assert holders == 1, f"round {round_}: {holders} processes hold the lock"
        assert not (run_dir / (LOCK + ".guard")).exists()


def test_a_guard_file_left_by_a_killed_process_is_taken_over_once_old(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise OSError(37, "no locks")

    monkeypatch.setattr(run_folder.fcntl, "flock", refused)
    guard = tmp_path / (LOCK + ".guard")
    guard.write_text("")
    old = time.time() - run_folder.GUARD_STALE_SECONDS - 1
    os.utime(guard, (old, old))
    assert acquire_lock(tmp_path).exists() and not guard.exists()


# ------------------------------------------------------------------------------------------ older manifests

def test_a_manifest_without_a_newer_fact_or_setting_is_the_same_run_unless_the_setting_is_asked_for(tmp_path):
    """A folder whose manifest an earlier version of this package wrote lacks the facts and settings added since
    (the data's content hash, lora_experts): resuming it with those at their defaults is the same run."""
    from helpers.run.folder import manifest_differences

    new = manifest_of()
    old = json.loads(json.dumps(new))
    del old["config"]["lora_experts"]
    for split in old["data"]["splits"].values():
        del split["content_sha256"]
    assert manifest_differences(old, new) == []
    asked = manifest_of(lora_experts=True, model_id="tiny-moe")
    assert "lora_experts: '(absent)' in the folder, True now" in manifest_differences(old, asked)
