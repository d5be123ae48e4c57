"""Secrets: with HF_TOKEN set to a known dummy value, the runner (notebooks 04 and 05) leaves it in no
file it produces (executed notebooks, which record papermill's parameters; metrics; checkpoints; the adapter;
the data-set cache) and prints it nowhere; it refuses parameters that look like, or carry, a token; and it
never prints the environment. The Cloud Run entrypoint's scan (same idea, through cloudrun/entrypoint.sh) is
tests/test_cloudrun.py::test_entrypoint_end_to_end_killed_then_resumed_then_sharded and
::test_hf_token_stays_in_the_environment.

To keep CI short, the same run also serves the bad-input report: its local data set (hub-shaped parquet) has
corrupt, truncated and out-of-range rows, and the skip counts must reach both notebooks and metrics.json.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_validation import EXPECTED_SKIPS, bad_rows_dataset

from helpers.run.command_line import parameters_from_command_line
from helpers.run.config import ConfigError, RunConfig
from helpers.runner import main

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_DUMMYsecretTOKENforTESTS0123456789"
# Other values the run must not print or store: a second token variable and an unrelated variable.
CANARIES = {"HUGGING_FACE_HUB_TOKEN": "hf_DUMMYsecondTOKEN9876543210", "GEMMA4_TEST_CANARY": "canary-5f3a9c0e7d"}


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    data = root / "bad-digits" / "data"
    data.mkdir(parents=True)
    # 19 + 5 = 24 and 7 + 5 = 12 rows: the sizes below take every row, so the counts are known.
    bad_rows_dataset(n_good=19).to_parquet(str(data / "train-00000.parquet"))
    bad_rows_dataset(n_good=7, offset=100).to_parquet(str(data / "test-00000.parquet"))
    out, hf_home = root / "run", root / "hf-home"
    env = {**os.environ, "HF_TOKEN": TOKEN, **CANARIES, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "helpers.runner", "--output-dir", str(out),
                           "-p", "dataset", str(data.parent), "-p", "train_size", "24", "-p", "eval_size", "12",
                           "-p", "max_steps", "4", "-p", "save_steps", "2", "-p", "batch_size", "6"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"out": out, "hf_home": hf_home, "stdout": proc.stdout, "stderr": proc.stderr, "data": data.parent}


def occurrences(root: Path, needle: str) -> tuple[int, int, list[str]]:
    """(files scanned, occurrences, files that hold it) under ``root``, every file read as bytes."""
    files = [p for p in root.rglob("*") if p.is_file()]
    hits = {str(p): p.read_bytes().count(needle.encode()) for p in files}
    return len(files), sum(hits.values()), [p for p, n in hits.items() if n]


def test_the_token_is_in_no_produced_file_and_no_output(token_run):
    out = token_run["out"]
    for name in ("04_training.ipynb", "05_evaluation.ipynb", "metrics.json", "train_result.json",
                 "adapter/adapter_model.safetensors", "checkpoint-4/optimizer.pt"):
        assert (out / name).exists(), name  # the scan below covers real outputs, not an empty folder
    for value in (TOKEN, *CANARIES.values()):
        for root in (out, token_run["hf_home"]):
            scanned, found, where = occurrences(root, value)
            assert found == 0, f"{value[:6]}... found in {where}"
        assert value not in token_run["stdout"] and value not in token_run["stderr"]
    scanned, _, _ = occurrences(out, TOKEN)
    print(f"scanned {scanned} files in the run folder: 0 occurrences of HF_TOKEN")


def test_papermill_parameters_carry_no_secret(token_run):
    for name in ("04_training.ipynb", "05_evaluation.ipynb"):
        notebook = nbformat.read(token_run["out"] / name, as_version=4)
        injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1
        assert "HF_TOKEN" not in injected[0].source and TOKEN not in injected[0].source
        parameters = dict(notebook.metadata["papermill"]["parameters"])
        names = set(parameters) - {"settings"} | set(parameters.get("settings", {}))
        assert names <= set(RunConfig.field_names())  # RunConfig's fields only: no token has a name among them


def test_skip_counts_reach_both_notebooks_and_metrics(token_run):
    metrics = json.loads((token_run["out"] / "metrics.json").read_text())
    expected = {split: {"kept": kept, "skipped": EXPECTED_SKIPS, "n_skipped": 3} for split, kept in
                (("train", 21), ("test", 9))}
    assert metrics["skipped"] == expected
    assert metrics["summary"]["n_skipped"] == 6
    assert metrics["eval_size"] == 9 and metrics["metrics"]["finetuned"]["constrained"]["n"] == 9
    for name, splits in (("04_training.ipynb", ("train", "test")), ("05_evaluation.ipynb", ("test",))):
        text = json.dumps(nbformat.read(token_run["out"] / name, as_version=4).cells)
        for split in splits:
            kept = expected[split]["kept"]
            assert f"{split}: kept {kept}, skipped 3 (1 label_out_of_range, 2 unreadable_image)" in text, name


@pytest.mark.parametrize("name", ["hf_token", "HF_TOKEN", "api_key", "db_password", "client_secret"])
def test_parameters_that_look_like_secrets_are_refused(name, tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "-p", name, "x"]) == 2
    assert "environment" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["-p", "dataset", TOKEN], ["--model-id", TOKEN], ["-p", "train_size", TOKEN],
                                  ["-p", "output_dir", f"runs/{TOKEN}"], ["--output-dir", f"runs/{TOKEN}"]])
def test_a_parameter_carrying_the_token_is_refused_without_echoing_it(args, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "carry the value of HF_TOKEN" in captured.err
    assert TOKEN not in captured.err + captured.out


# -- the guard itself (helpers.run.command_line), shared by the runner and the launcher -------------------------

def test_run_config_fields_with_secret_words_in_their_names_pass(tmp_path):
    """The guard refuses unknown names that look like secrets; RunConfig's own fields (image_soft_tokens holds
    "token") are parameters like any other."""
    params = parameters_from_command_line([("image_soft_tokens", "280")], str(tmp_path))
    assert params["image_soft_tokens"] == 280


def test_a_secret_looking_name_is_refused_by_the_guard(tmp_path):
    with pytest.raises(ConfigError, match=r"\['hf_token'\] look like secrets"):
        parameters_from_command_line([("hf_token", "x")], str(tmp_path))


def test_a_value_equal_to_hf_token_is_refused_without_echoing_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match=r"\['question'\] carry the value of HF_TOKEN") as raised:
        parameters_from_command_line([("question", TOKEN)], str(tmp_path))
    assert TOKEN not in str(raised.value)


@pytest.mark.parametrize("args, message", [(["-p", "hf_token", "x"], "look like secrets"),
                                           (["-p", "question", TOKEN], "carry the value of HF_TOKEN")])
def test_the_launcher_shares_the_guard(args, message, tmp_path, capsys, monkeypatch):
    from helpers.launch import main as launch_main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert launch_main(["--output-dir", str(tmp_path), *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and TOKEN not in captured.err + captured.out
