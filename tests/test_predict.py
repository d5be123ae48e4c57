"""python -m helpers.predict on unlabelled image files: predictions with probabilities, bad files reported and skipped."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers import predict
from helpers.collator import VisionChatCollator
from helpers.data import DIGIT_NAMES, load_digits_examples
from helpers.exports import predictor as predictions
from helpers.run.folder import RunFolderError, read_run


def write_images(folder, n=3):
    """``n`` held-out digits as PNG files (no labels anywhere), a broken file and a truncated JPEG."""
    folder.mkdir()
    for i, example in enumerate(load_digits_examples("test", n).examples):
        example["image"].save(folder / f"digit_{i}.png")
    (folder / "broken.png").write_bytes(b"this is not an image")
    jpeg = folder / "truncated.jpg"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    return folder


def test_eval_collator_needs_no_label(tiny_processor):
    """An unlabelled example in eval mode: the prompt alone (no 'label None is not an index' error)."""
    image = load_digits_examples("test", 1).examples[0]["image"]
    batch = VisionChatCollator(tiny_processor, list(DIGIT_NAMES), mode="eval", padding_side="left")([{"image": image}])
    assert "labels" not in batch and batch["input_ids"].shape[0] == 1


def test_predict_on_unlabelled_files_with_broken_ones(random_adapter_run, tmp_path, capsys):
    images = write_images(tmp_path / "photos")
    output = tmp_path / "predictions.jsonl"
    code = predict.main(["--run", str(random_adapter_run), str(images), str(tmp_path / "missing.png"),
                         "--output", str(output), "--generate"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "3 predicted, 3 skipped" in printed
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    predicted = [r for r in rows if r["error"] is None]
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in rows if r["error"]}
    assert len(predicted) == 3 and all(r["prediction"] in DIGIT_NAMES for r in predicted)
    for row in predicted:
        probabilities = [p for _, p in row["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert row["top"][0] == [row["prediction"], row["probability"]] and sum(probabilities) <= 1 + 1e-6
        assert isinstance(row["generated"], str)
    assert errors["broken.png"].startswith("unreadable_image") and errors["truncated.jpg"].startswith("unreadable_image")
    assert errors["missing.png"].startswith("missing_image")


def test_csv_output_and_the_function(random_adapter_run, tmp_path):
    images = write_images(tmp_path / "photos", n=2)
    predictor = predictions.load_predictor(read_run(random_adapter_run))
    report = predictions.predict_images(predictor, [images], progress=False)
    assert [p.path.rsplit("/", 1)[-1] for p in report.predictions] == ["digit_0.png", "digit_1.png"]
    path = predictions.write_predictions(report, tmp_path / "out.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 4 and rows[0]["top"].count(":") == 3 and rows[-1]["error"]


@pytest.mark.parametrize("args, message", [
    (["--run", "no/such/run", "x.png"], "does not exist"),
    (["--run", ".", "x.png", "--output", "out.txt"], ".csv or .jsonl"),
    (["x.png"], "--run RUN_DIR"),
])
def test_mistakes_are_named_before_loading(args, message, capsys):
    assert predict.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_adapter_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(RunFolderError, match="no trained adapter"):
        read_run(tmp_path)


# -- a damaged run: one line naming the file, exit code 2, before any model loads ---------------------------------

def damaged_copy(run_dir, tmp_path, file: str, damage: str, vouched: bool):
    """A copy of ``run_dir`` whose adapter ``file`` is truncated or not JSON. ``vouched``: the completion marker is
    written again over the damaged file, as when a file was cut before the adapter was marked (the marker's
    signatures then match it, and only reading the file finds the damage)."""
    from helpers.run.folder import mark_complete

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "adapter" / file
    path.write_bytes(path.read_bytes()[:100] if damage == "truncated" else b"{not json")
    if vouched:
        mark_complete(copy / "adapter")
    return copy, path


DAMAGES = [("adapter_model.safetensors", "truncated"), ("adapter_config.json", "not json")]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    return lines[-1]


@pytest.mark.parametrize("vouched", [False, True])
@pytest.mark.parametrize("file, damage", DAMAGES)
def test_a_damaged_adapter_is_one_line_naming_it(random_adapter_run, tmp_path, capsys, file, damage, vouched):
    run, path = damaged_copy(random_adapter_run, tmp_path, file, damage, vouched)
    assert predict.main(["--run", str(run), "x.png"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert str(path.parent) in line and "rerun the training command" in line
    assert file in line or not vouched  # a marker that vouches for the file: the file's own reading names it
    assert captured.out == ""  # nothing loaded, nothing predicted


@pytest.mark.parametrize("file, damage", DAMAGES)
def test_loading_errors_the_check_misses_are_one_line_too(random_adapter_run, tmp_path, capsys, monkeypatch, file,
                                                          damage):
    """The last guard: PEFT's own error while loading, turned into one line."""
    run, path = damaged_copy(random_adapter_run, tmp_path, file, damage, vouched=True)
    monkeypatch.setattr(predictions, "check_readable", lambda saved: None)
    assert predict.main(["--run", str(run), "x.png"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path.parent} cannot be loaded" in line and "rerun the training command" in line
