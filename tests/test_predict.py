"""python -m helpers.predict on unlabelled image files: predictions with probabilities, bad files reported and skipped."""

import csv
import json

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
