"""The main job end to end on the offline default (tiny sizes), and the runner's refusals."""

import json
import subprocess
import sys

import pytest

from helpers.runner import main

RUN = ["-p", "train_size", "24", "-p", "eval_size", "12", "-p", "max_steps", "4", "-p", "save_steps", "2",
       "-p", "batch_size", "6"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "-m", "helpers.runner", "--output-dir", str(out), *RUN],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2] 04_training" in proc.stdout and "[2/2] 05_evaluation done" in proc.stdout
    return out


def test_run_folder_has_notebooks_metrics_adapter_and_plots(run_dir):
    for name in ["04_training.ipynb", "05_evaluation.ipynb", "metrics.json", "train_result.json",
                 "adapter/adapter_config.json", "loss.png", "accuracy.png", "confusion_matrix.png", "samples.png"]:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"] == "digits" and metrics["eval_size"] == 12 and metrics["optimizer_steps"] == 4
    for system in ("baseline", "finetuned"):
        constrained = metrics["metrics"][system]["constrained"]
        assert constrained["n"] == 12 and 0 <= constrained["accuracy"] <= 1
        assert sum(row["support"] for row in constrained["per_class"].values()) == 12
        assert 0 <= metrics["metrics"][system]["generation"]["no_class_named_rate"] <= 1
    assert metrics["wall_seconds"]["train"] > 0


def test_rerun_resumes_instead_of_restarting(run_dir):
    assert main(["--output-dir", str(run_dir), "--notebook", "04_training", *RUN]) == 0
    train = json.loads((run_dir / "train_result.json").read_text())["train"]
    assert train["resumed_from"].endswith("checkpoint-4")
    assert train["global_step"] == 4


def test_unknown_parameter_is_an_error(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "-p", "learning_rte", "1e-3"]) == 2
    assert "learning_rte" in capsys.readouterr().err


def test_bad_value_names_the_parameter(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "-p", "train_size", "0"]) == 2
    assert "train_size" in capsys.readouterr().err


def test_secrets_are_never_parameters(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "-p", "hf_token", "hf_abc"]) == 2
    assert "environment" in capsys.readouterr().err


def test_unknown_notebook_is_an_error(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--notebook", "06_nothing"]) == 1
    assert "06_nothing" in capsys.readouterr().err
