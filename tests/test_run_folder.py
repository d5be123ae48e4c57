"""Run folders you can trust: the manifest, the refusal of a rerun with other settings or data,
``--fresh``, the lock, and the checks on ``--output-dir`` and on parameters, all before anything loads.

The end-to-end runs (each data source through the runner, then a refused rerun in the finished folder) are
in tests/test_runner.py.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers.run import folder as run_folder
from helpers.run.command_line import check_data
from helpers.run.config import RunConfig
from helpers.run.folder import (
    LOCK,
    MANIFEST,
    RunFolderError,
    acquire_lock,
    holding_lock,
    manifest_differences,
    run_manifest,
    saved_class_names,
    start_run,
    write_class_names,
)
from helpers.runner import main


def manifest_of(**params) -> dict:
    config = RunConfig(**params)
    return run_manifest(config, check_data(config))


def test_the_manifest_holds_config_data_fingerprint_model_and_versions(tmp_path):
    manifest = manifest_of(train_size=40)
    assert start_run(tmp_path, manifest) == "new run: manifest written"
    saved = json.loads((tmp_path / MANIFEST).read_text())
    assert saved["config"]["train_size"] == 40 and saved["model"] == {"model_id": "tiny"}
    assert saved["data"]["source"] == "digits" and saved["data"]["splits"]["train"]["rows"] == 1347
    assert len(saved["data"]["splits"]["test"]["rows_sha256"]) == 64
    assert {"torch", "transformers", "peft", "datasets", "python"} <= set(saved["versions"])


def test_the_same_settings_resume_and_evaluation_only_settings_may_change(tmp_path):
    start_run(tmp_path, manifest_of())
    assert "resuming" in start_run(tmp_path, manifest_of())
    assert "resuming" in start_run(tmp_path, manifest_of(eval_size=100, shard_count=2, save_steps=5))


def test_other_settings_or_data_are_refused_with_what_differs_and_how_to_start_fresh(tmp_path):
    start_run(tmp_path, manifest_of())
    (tmp_path / "adapter").mkdir()
    with pytest.raises(RunFolderError) as err:
        start_run(tmp_path, manifest_of(learning_rate=3e-3, test_fraction=0.5))
    message = str(err.value)
    assert "learning_rate: 0.0015 in the folder, 0.003 now" in message
    assert "test_fraction: 0.25 in the folder, 0.5 now" in message
    assert "data.splits.test.rows: 450 in the folder, 899 now" in message  # the data changed too
    assert "--fresh" in message and "another --output-dir" in message
    assert (tmp_path / "adapter").exists()  # nothing was touched


def test_fresh_clears_the_run_files_only(tmp_path):
    start_run(tmp_path, manifest_of())
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "my_notes.txt").write_text("keep me")
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint: not the run's
    outcome = start_run(tmp_path, manifest_of(learning_rate=2e-3), fresh=True)
    assert "metrics.json" in outcome and "checkpoint-4" in outcome
    assert not (tmp_path / "checkpoint-4").exists() and (tmp_path / "my_notes.txt").exists()
    assert (tmp_path / "checkpoint-notes").exists()
    assert json.loads((tmp_path / MANIFEST).read_text())["config"]["learning_rate"] == 2e-3


def test_checkpoints_without_a_manifest_are_not_trusted_but_may_be_evaluated(tmp_path):
    (tmp_path / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(RunFolderError, match="no manifest.json"):
        start_run(tmp_path, manifest_of())
    assert "evaluating" in start_run(tmp_path, manifest_of(), trains=False)  # e.g. a copied adapter


def test_manifest_differences_ignore_versions_and_evaluation_settings():
    old = {"config": {"eval_size": 1, "seed": 0}, "data": {"rows": 3}, "versions": {"torch": "1"}}
    new = {"config": {"eval_size": 2, "seed": 1}, "data": {"rows": 3}, "versions": {"torch": "2"}}
    assert manifest_differences(old, new) == ["seed: 0 in the folder, 1 now"]


LOCK_HOLDER = """
import sys, time
from helpers.run.folder import holding_lock
with holding_lock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_second_runner_on_a_folder_in_use_stops_at_once_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.perf_counter()
        assert main(["--output-dir", str(tmp_path), "-p", "max_steps", "2"]) == 1
        assert time.perf_counter() - start < 30  # no model, no notebook: at once
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and "another --output-dir" in err
        assert not (tmp_path / MANIFEST).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_from_a_killed_run_does_not_block(tmp_path, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has ended, as a killed runner's
    (tmp_path / LOCK).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "started": "then"}))
    with holding_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()  # released
    # A holder on another machine (a shared bucket) counts as gone once its heartbeat stops.
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunFolderError, match="in use by process 1 on elsewhere"):
        acquire_lock(tmp_path)
    old = time.time() - run_folder.STALE_AFTER_SECONDS - 5
    os.utime(tmp_path / LOCK, (old, old))
    assert acquire_lock(tmp_path).exists()


def test_evaluation_uses_the_class_names_training_saved(tmp_path):
    write_class_names(tmp_path, ["Cat", "Dog"])
    assert saved_class_names(tmp_path, ["Cat", "Dog"]) == ["Cat", "Dog"]
    with pytest.raises(RunFolderError, match="only in training \\['Dog'\\], only in this data \\['Fox'\\]"):
        saved_class_names(tmp_path, ["Cat", "Fox"])


@pytest.mark.parametrize("name, value", [("learning_rate", "Infinity"), ("epochs", "Infinity"),
                                         ("learning_rate", "NaN"), ("lora_dropout", "NaN"),
                                         ("test_fraction", "1.5")])
def test_non_finite_numbers_are_refused_naming_the_parameter(name, value, tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "-p", name, value]) == 2
    err = capsys.readouterr().err
    assert name in err and (value in ("1.5",) or "finite" in err)
    assert not any(tmp_path.iterdir())


def test_an_output_dir_that_is_a_file_or_cannot_be_written_is_refused_before_anything_loads(tmp_path, capsys,
                                                                                            monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["--output-dir", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["--output-dir", str(a_file / "run")]) == 2  # under a file: cannot be created
    assert "cannot be written" in capsys.readouterr().err

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(run_folder.tempfile, "NamedTemporaryFile", read_only)
    assert main(["--output-dir", str(tmp_path / "run")]) == 2
    assert "Read-only file system" in capsys.readouterr().err


def test_the_runner_refuses_data_problems_before_any_notebook(tmp_path, capsys):
    for name in ("golden_retriever", "Golden Retriever"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        (tmp_path / "photos" / name / "0.png").write_bytes(b"")
    assert main(["--output-dir", str(tmp_path / "run"), "-p", "dataset", str(tmp_path / "photos")]) == 2
    assert "'Golden Retriever' and 'golden_retriever' both become" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "run"), "-p", "dataset", "./no/such/photos"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / MANIFEST).exists()


def test_a_relative_output_dir_is_relative_to_the_repository_not_the_working_directory(tmp_path, monkeypatch):
    from helpers.run.folder import REPOSITORY, resolve_output_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_output_dir("runs/offline") == REPOSITORY / "runs" / "offline"
    assert (REPOSITORY / "helpers" / "run" / "folder.py").is_file()
    assert resolve_output_dir(tmp_path / "x") == tmp_path / "x"


def test_gpu_only_settings_are_refused_on_a_cpu_before_anything_loads(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "run"), "-p", "optimizer", "adamw_8bit"]) == 2
    assert "optimizer='adamw_8bit' needs a CUDA GPU" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "run"), "-p", "quantization", "4bit"]) == 2
    assert "quantization='4bit' needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run" / MANIFEST).exists()
