"""The main job end to end on the offline default (tiny sizes), and the runner's refusals."""

import json
import subprocess
import sys
import time

import nbformat
import pytest

from helpers.runner import main

# Short enough for CI, long enough to learn: 86 steps of 32 (the samples of a quarter of the default recipe's 595
# steps of 16, in fewer steps).
RUN = ["-p", "eval_size", "90", "-p", "max_steps", "86", "-p", "save_steps", "43", "-p", "batch_size", "32"]
EVAL_SIZE, STEPS = 90, 86
# Fine-tuned minus baseline accuracy (constrained scoring) that the run must beat. MEASURED_MARGINS: these
# exact settings at the default lr, on tiny init 4 (seed 0, measured here 2026-12-02; printed with pytest -s) and
# on init 3 (lr 2e-3: 0.433, lr 1.5e-3: 0.311). The margin leaves room for another CPU's rounding; re-measure
# with these settings when the miniature or the recipe changes.
MEASURED_MARGINS = (0.500, 0.433, 0.311)
MARGIN = 0.2


def executed_text(path) -> str:
    """Everything an executed notebook printed or displayed as text (stdout, stderr, text/plain); a widget
    (a progress bar that an executed notebook keeps at 0%) as WIDGET."""
    parts = []
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
            parts.append("WIDGET" if "application/vnd.jupyter.widget-view+json" in output.get("data", {}) else "")
    return "\n".join(parts)


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
    assert metrics["dataset"] == "digits" and metrics["eval_size"] == EVAL_SIZE and metrics["optimizer_steps"] == STEPS
    for system in ("baseline", "finetuned"):
        constrained = metrics["metrics"][system]["constrained"]
        assert constrained["n"] == EVAL_SIZE and 0 <= constrained["accuracy"] <= 1
        assert sum(row["support"] for row in constrained["per_class"].values()) == EVAL_SIZE
        assert 0 <= metrics["metrics"][system]["generation"]["no_class_named_rate"] <= 1
    assert metrics["wall_seconds"]["train"] > 0


def test_fine_tuning_beats_the_baseline_by_the_measured_margin(run_dir):
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    gain = summary["finetuned_accuracy"] - summary["baseline_accuracy"]
    print(f"fine-tuned minus baseline: {gain:.3f}")
    assert gain >= MARGIN, f"fine-tuning gained {gain:.3f} over the baseline; these settings gave {MEASURED_MARGINS}"


def test_the_executed_notebooks_show_no_stuck_bars_or_stray_warnings(run_dir):
    training, evaluation = executed_text(run_dir / "04_training.ipynb"), executed_text(run_dir / "05_evaluation.ipynb")
    for text in (training, evaluation):
        assert "Loading weights" not in text and "WIDGET" not in text  # no bar left drawn at 0%
        assert "is_gradient_checkpointing" not in text and "kernels-community" not in text
    assert f"run folder: {run_dir}" in training
    assert "fast clamps: off (0 Gemma4ClippableLinear forwards patched" in training  # the large family: clipping off
    assert "compile_layers: off" in training
    assert "same log-likelihoods as the batched, cached scoring: True" in evaluation
    assert "constrained scoring: 100%" in evaluation and "generation: 100%" in evaluation  # text bars, finished


def test_rerun_resumes_instead_of_restarting(run_dir):
    assert main(["--output-dir", str(run_dir), "--notebook", "04_training", *RUN]) == 0
    train = json.loads((run_dir / "train_result.json").read_text())["train"]
    assert train["resumed_from"].endswith(f"checkpoint-{STEPS}")
    assert train["global_step"] == STEPS and train["already_finished"]
    assert f"training skipped: {train['resumed_from']} is already at the planned {STEPS} steps" in executed_text(
        run_dir / "04_training.ipynb")


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


# --------------------------------------------------------------------------- your own images (issue 17)

TINY = ["-p", "train_size", "8", "-p", "eval_size", "4", "-p", "max_steps", "1", "-p", "save_steps", "1",
        "-p", "batch_size", "4"]


def own_sources(root):
    """Two sources the tests build: class folders (a sideways phone photo and a corrupt file among them) and a
    CSV of paths relative to it (one file gone). A hub-shaped local data set goes through the runner in
    tests/test_secrets.py (one run serves both, to keep CI short); other column and split names are in
    tests/test_data.py."""
    import pandas as pd
    from test_data import class_folders
    from test_validation import sideways_phone_photo

    folder = class_folders(root / "photos", per_class=6)
    (folder / "red_fox" / "phone.jpg").write_bytes(sideways_phone_photo()[0])
    (folder / "blue_jay" / "broken.jpg").write_bytes(b"not a jpeg")
    files = sorted(folder.rglob("*.jpg"))
    table = pd.DataFrame({"file": [str(p.relative_to(root)) for p in files], "breed": [p.parent.name for p in files]})
    table.loc[len(table)] = ["photos/red_fox/gone.jpg", "red_fox"]
    table.to_csv(root / "labels.csv", index=False)
    return {"image folder": [str(folder)],
            "table file": [str(root / "labels.csv"), "-p", "image_column", "file", "-p", "label_column", "breed"]}


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory):
    """Each source trains and evaluates through the runner; the runs go side by side (CI time)."""
    root = tmp_path_factory.mktemp("own")
    procs = {}
    for kind, (dataset, *options) in own_sources(root).items():
        out = root / f"run-{kind.replace(' ', '-')}"
        command = [sys.executable, "-m", "helpers.runner", "--output-dir", str(out), "-p", "dataset", dataset,
                   *options, *TINY]
        procs[kind] = (out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    runs = {}
    for kind, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{kind}: {stderr[-3000:]}"
        runs[kind] = {"out": out, "stdout": stdout, "dataset": proc.args[proc.args.index("dataset") + 1]}
    return runs


@pytest.mark.parametrize("kind", ["image folder", "table file"])
def test_each_source_trains_and_evaluates_through_the_runner(own_runs, kind):
    run = own_runs[kind]
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    manifest = json.loads((run["out"] / "manifest.json").read_text())
    names = json.loads((run["out"] / "class_names.json").read_text())
    assert names == ["Green Frog", "Blue Jay", "Red Fox"]  # from the data, tidied; saved for evaluation
    assert manifest["data"]["kind"] == kind and manifest["data"]["class_names"] == names
    assert set(metrics["metrics"]["finetuned"]["constrained"]["per_class"]) == set(names)  # one row per class
    assert metrics["eval_size"] == 4 and metrics["optimizer_steps"] == 1
    assert "used: train 8 rows" in run["stdout"] and "held_out 4 rows" in run["stdout"]  # after bad rows dropped
    skipped = json.loads((run["out"] / "skipped.json").read_text())
    assert skipped["train"]["kept"] == 8 and skipped["held_out"]["kept"] == 4
    assert f"data: {run['dataset']} ({kind})" in run["stdout"]


def test_a_finished_folder_refuses_other_data_and_settings(own_runs, capsys):
    run = own_runs["image folder"]
    before = (run["out"] / "metrics.json").read_text()
    other = own_runs["table file"]["dataset"]
    start = time.perf_counter()
    code = main(["--output-dir", str(run["out"]), "-p", "dataset", other, "-p", "image_column", "file",
                 "-p", "label_column", "breed", "-p", "learning_rate", "0.003", *TINY])
    assert code == 1 and time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "dataset: " in err and "learning_rate: 0.0015 in the folder, 0.003 now" in err and "--fresh" in err
    assert (run["out"] / "metrics.json").read_text() == before  # still the adapter it reports
