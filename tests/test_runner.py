"""The main job end to end on the offline default (tiny sizes), and the runner's refusals."""

import json
import subprocess
import sys
import time

import nbformat
import pytest

from helpers.runner import main
from notebooks import assert_clean, output_text

# Short enough for CI, long enough to learn: 86 steps of 32 (the samples of a quarter of the default recipe's 595
# steps of 16, in fewer steps): 2 epochs of 43 steps, so the run ends at an epoch's end.
RUN = ["-p", "eval_size", "90", "-p", "max_steps", "86", "-p", "save_steps", "43", "-p", "batch_size", "32"]
EVAL_SIZE, STEPS = 90, 86
# Fine-tuned minus baseline accuracy (constrained scoring) that the run must beat. MEASURED_MARGIN is what these
# exact settings gave (seed 0, printed with pytest -s); the bound leaves room for another CPU's rounding.
# Re-measure with these settings when the miniature or the recipe changes.
MEASURED_MARGIN = 0.489
MARGIN = 0.2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "-m", "helpers.runner", "--output-dir", str(out), *RUN],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2] 04_training" in proc.stdout and "[2/2] 05_evaluation done" in proc.stdout
    assert "IPKernelApp" not in proc.stdout + proc.stderr  # the kernels talk over local sockets
    return out


def test_run_folder_has_notebooks_metrics_adapter_and_plots(run_dir):
    for name in ["04_training.ipynb", "05_evaluation.ipynb", "metrics.json", "train_result.json",
                 "adapter/adapter_config.json", "adapter/COMPLETE", f"checkpoint-{STEPS}/COMPLETE", "loss.png",
                 "accuracy.png", "confusion_matrix.png", "samples.png"]:
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
    assert gain >= MARGIN, f"fine-tuning gained {gain:.3f} over the baseline; these settings gave {MEASURED_MARGIN}"


def test_the_executed_notebooks_are_clean_and_say_what_ran(run_dir):
    training = nbformat.read(run_dir / "04_training.ipynb", as_version=4)
    evaluation = nbformat.read(run_dir / "05_evaluation.ipynb", as_version=4)
    for notebook in (training, evaluation):
        assert_clean(notebook)
    training_text, evaluation_text = output_text(training), output_text(evaluation)
    assert f"run folder: {run_dir}" in training_text
    assert "fast clamps: off (0 Gemma4ClippableLinear forwards patched" in training_text  # large family: no clipping
    assert "compiled layers: off" in training_text and "micro-batch: 32 x gradient accumulation 1" in training_text
    assert "resuming from the start" in training_text and f"{STEPS} optimizer steps" in training_text
    assert "same log-likelihoods as the batched scoring: True" in evaluation_text
    for bar in ("baseline: constrained scoring: 100%", "baseline: generation: 100%",
                "fine-tuned: constrained scoring: 100%", "fine-tuned: generation: 100%"):
        assert bar in evaluation_text  # text bars, finished, named by system and method


def test_rerun_does_not_train_a_finished_run_again(run_dir, capsys):
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["--output-dir", str(run_dir), "--notebook", "04_training", *RUN]) == 0
    assert "04_training: already trained in this folder" in capsys.readouterr().out
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_notebook_04_on_a_finished_run_loads_it_instead_of_training(run_dir, tmp_path):
    """A learner opening notebook 04 after the main job: the Trainer resumes from the last checkpoint, which
    ends the run, so no step is taken, the trained weights are in memory, and the main job's record stays."""
    from helpers.run.command_line import parameters_from_command_line
    from helpers.runner import notebook_parameters, notebook_path
    from notebooks import execute

    params = parameters_from_command_line([tuple(RUN[i + 1:i + 3]) for i in range(0, len(RUN), 3)], str(run_dir))
    notebook = execute("04_training.ipynb", tmp_path, notebook_parameters(notebook_path("04_training"), params))
    text = output_text(notebook)
    assert f"resuming from {run_dir / f'checkpoint-{STEPS}'}" in text
    assert f"trained no step (the run had finished at step {STEPS}): its training record is kept" in text
    assert "this call trained 0 s" in text and "same settings and data as the folder's manifest" in text
    train = json.loads((run_dir / "train_result.json").read_text())["train"]
    assert train["global_step"] == STEPS and train["resumed_from"] is None  # the runner's record, kept


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


# --------------------------------------------------------------------------- your own images

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
