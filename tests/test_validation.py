"""Bad inputs: each is converted and works, or is a counted skip, or a clear error naming the
sample or parameter. Nothing bad is trained on silently.

The end-to-end check that skip counts reach notebook 04/05 and metrics.json runs in tests/test_secrets.py
(one runner run serves both, to keep CI short). An answer cut by max_length is also covered, at the
collator level, by tests/test_collator.py::test_truncation_may_drop_only_what_follows_end_of_turn.
"""

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.data import DIGIT_NAMES, load_examples
from helpers.runner import main
from helpers.validation import (
    MAX_SIDE,
    BadExampleError,
    EmptySplitError,
    skip_report,
    skipped_summary,
    to_rgb_image,
    validate_examples,
)

REPO = Path(__file__).resolve().parents[1]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(width=60, height=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def sixteen_bit(darkest: int = 0) -> Image.Image:
    ramp = np.linspace(darkest, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)  # dark to bright
    return Image.fromarray(ramp)


def transparent_rgba() -> Image.Image:
    rgba = photo().convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: must come out white, not black
    return rgba


# Formats that should simply work, converted to 8-bit RGB: (name, encoded bytes).
CONVERTIBLE = {
    "cmyk_jpeg": lambda: encode(photo().convert("CMYK"), "JPEG"),
    "cmyk_tiff": lambda: encode(photo().convert("CMYK"), "TIFF"),
    "rgba_png": lambda: encode(transparent_rgba(), "PNG"),
    "palette_png": lambda: encode(photo().convert("P"), "PNG"),
    "palette_transparent_png": lambda: encode(photo().convert("P"), "PNG", transparency=0),
    "sixteen_bit_png": lambda: encode(sixteen_bit(), "PNG"),
    "greyscale_png": lambda: encode(photo().convert("L"), "PNG"),
    "greyscale_alpha_png": lambda: encode(photo().convert("LA"), "PNG"),
    "one_bit_png": lambda: encode(photo().convert("1"), "PNG"),
    "one_by_one_png": lambda: encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
    "rgb_jpeg": lambda: encode(photo(), "JPEG"),
}


@pytest.mark.parametrize("kind", sorted(CONVERTIBLE))
@pytest.mark.parametrize("wrap", ["bytes", "datasets_dict", "pil", "path"])
def test_odd_formats_become_rgb(kind, wrap, tmp_path):
    data = CONVERTIBLE[kind]()
    value = {"bytes": data, "path": None} if wrap == "datasets_dict" else Image.open(io.BytesIO(data)) \
        if wrap == "pil" else data
    if wrap == "path":
        value = tmp_path / "image.bin"
        value.write_bytes(data)
    image = to_rgb_image(value, kind)
    original = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and image.size == original.size
    pixels = np.asarray(image)
    if kind == "sixteen_bit_png":  # scaled, not clipped to white
        assert pixels[0, 0].max() < 10 and pixels[-1, -1].min() > 245 and 100 < pixels.mean() < 155
    if kind == "rgba_png":
        assert tuple(pixels[0, 0]) == (255, 255, 255)


def test_odd_formats_train_in_one_batch(tiny_processor, tiny_model):
    """The converted images go through the collator and the model: a finite loss, nothing special-cased."""
    from helpers.collator import VisionChatCollator

    examples, _ = validate_examples([{"image": {"bytes": make(), "path": None}, "label": i % 10}
                                     for i, make in enumerate(CONVERTIBLE.values())], DIGIT_NAMES, "odd", "train")
    batch = VisionChatCollator(tiny_processor, list(DIGIT_NAMES))(examples)
    assert bool(tiny_model(**batch).loss.isfinite())


def test_corrupt_and_truncated_images_name_the_sample():
    jpeg = encode(photo(), "JPEG")
    with pytest.raises(BadExampleError, match="row 7.*in no image format") as err:
        to_rgb_image(b"\x89PNG this is not really an image", "row 7")
    assert err.value.reason == "unreadable_image"
    with pytest.raises(BadExampleError, match="row 8.*truncated") as err:
        to_rgb_image(jpeg[: len(jpeg) // 2], "row 8")
    assert err.value.reason == "unreadable_image"
    for missing in (None, {"bytes": None, "path": None}):
        with pytest.raises(BadExampleError, match="row 9") as err:
            to_rgb_image(missing, "row 9")
        assert err.value.reason == "missing_image"
    with pytest.raises(BadExampleError, match="does-not-exist.png' does not exist") as err:
        to_rgb_image({"bytes": None, "path": "/does-not-exist.png"}, "row 10")
    assert err.value.reason == "missing_image"  # a missing file: counted and skipped as a corrupt one is
    with pytest.raises(BadExampleError, match="row 11.*0×5"):
        to_rgb_image(Image.new("RGB", (0, 5)), "row 11")


def sideways_phone_photo() -> tuple[bytes, Image.Image]:
    """(JPEG bytes, the upright picture): red above blue, stored as a phone stores it, turned a quarter and
    tagged EXIF orientation 6 ("rotate 90° clockwise to view")."""
    upright = Image.new("RGB", (40, 60), (220, 20, 20))
    upright.paste((20, 20, 220), (0, 30, 40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95), upright


@pytest.mark.parametrize("wrap", ["bytes", "path", "pil"])
def test_a_phone_photo_is_turned_upright_as_datasets_turns_it(wrap, tmp_path):
    from datasets import Image as ImageFeature

    data, upright = sideways_phone_photo()
    assert Image.open(io.BytesIO(data)).size == (60, 40)  # as stored: on its side
    value = {"bytes": data, "path": None}
    if wrap == "path":
        value = tmp_path / "phone.jpg"
        value.write_bytes(data)
    elif wrap == "pil":
        value = Image.open(io.BytesIO(data))
    image = to_rgb_image(value)
    assert image.size == upright.size == (40, 60)
    top, bottom = image.getpixel((20, 5)), image.getpixel((20, 55))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red above blue, as the photo was taken
    by_datasets = ImageFeature().decode_example({"bytes": data, "path": None}).convert("RGB")
    assert np.abs(np.asarray(by_datasets, int) - np.asarray(image, int)).max() == 0


def huge_png(path: Path, side: int) -> Path:
    """A real side × side greyscale PNG, written row by row (never side² bytes in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, parts, row = zlib.compressobj(9), [], b"\x00" + b"\x80" * side
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


PEAK_MEMORY_PROBE = r"""
import json, resource, sys
from helpers.validation import BadExampleError, to_rgb_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for name in sys.argv[1:]:
    try:
        image = to_rgb_image(name, name)
        out[name] = {"size": list(image.size), "mode": image.mode}
    except BadExampleError as err:
        out[name] = {"skipped": err.reason, "message": str(err)}
out["peak_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


def test_a_12000_pixel_image_is_shrunk_or_refused_without_exhausting_memory(tmp_path):
    side = 12_000
    jpeg = tmp_path / "huge.jpg"
    Image.new("L", (side, side), 128).save(jpeg, quality=30)  # 144 MB here, once; never in the probe
    png = huge_png(tmp_path / "huge.png", side)
    probe = subprocess.run([sys.executable, "-c", PEAK_MEMORY_PROBE, str(jpeg), str(png)], capture_output=True,
                           text=True, cwd=REPO, timeout=120, check=True)
    out = json.loads(probe.stdout)
    # The JPEG is decoded at 1/4 scale (3,000²) and shrunk to MAX_SIDE: it works.
    assert out[str(jpeg)] == {"size": [MAX_SIDE, MAX_SIDE], "mode": "RGB"}
    # A PNG cannot be decoded at a reduced scale: 144 M pixels is over the limit, so a counted skip.
    assert out[str(png)]["skipped"] == "too_large" and "12000×12000" in out[str(png)]["message"]
    # A full decode would take 144 MB (greyscale) and 432 MB as RGB; the probe grows by a fraction of that.
    assert out["peak_growth_mb"] < 80, out


def test_an_in_memory_huge_image_is_shrunk_not_modified():
    big = Image.new("RGB", (5000, 100), (1, 2, 3))
    small = to_rgb_image(big, "row 0")
    assert small.size == (MAX_SIDE, 41) and big.size == (5000, 100)


@pytest.mark.parametrize("label, reason", [(10, "label_out_of_range"), (-3, "label_out_of_range"),
                                           (-1, "missing_label"), (None, "missing_label"),
                                           ("three", "bad_label"), (True, "bad_label"), (2.0, "bad_label")])
def test_bad_labels_are_counted_skips(label, reason, caplog):
    good = {"image": photo(), "label": 3}
    rows = [good, {"image": photo(), "label": label}, good, {"image": photo(), "label": label}]
    kept, skipped = validate_examples(rows, DIGIT_NAMES, "my-set", "train")
    assert len(kept) == 2 and skipped == {reason: 2}
    # the first one of each reason is logged with the data set, split and row named
    assert "data set 'my-set' split 'train' row 1" in caplog.text


def test_empty_split_is_an_error_naming_the_data_set_and_split():
    with pytest.raises(EmptySplitError, match="data set 'my-set' split 'test' has no usable example: it has no rows"):
        validate_examples([], DIGIT_NAMES, "my-set", "test")
    rows = [{"image": b"junk", "label": 1}, {"image": photo(), "label": 99}]
    with pytest.raises(EmptySplitError, match="all 2 rows were skipped.*'label_out_of_range': 1.*'unreadable_image': 1"):
        validate_examples(rows, DIGIT_NAMES, "my-set", "test")


def bad_rows_dataset(n_good: int = 6, offset: int = 0):
    """A ``datasets.Dataset`` shaped like the hub's (an Image column, a ClassLabel of the ten digit names) with
    ``n_good`` digit rows and five known odd ones: three bad (counted skips), two converted (kept). The odd
    rows' images depend on ``offset``, so a training and a test split built with two offsets share no image."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature
    from sklearn.datasets import load_digits

    from helpers.data import digit_image

    digits = load_digits()
    good = range(offset, offset + n_good)
    images = [{"bytes": encode(digit_image(digits.data[i]), "PNG"), "path": None} for i in good]
    labels = [int(digits.target[i]) for i in good]
    jpeg = encode(photo(seed=offset), "JPEG")
    odd = [({"bytes": b"corrupt bytes %d" % offset, "path": None}, 1),  # unreadable_image
           ({"bytes": jpeg[: len(jpeg) // 3], "path": None}, 2),  # unreadable_image (truncated JPEG)
           ({"bytes": encode(photo(seed=offset), "PNG"), "path": None}, 12),  # label_out_of_range
           ({"bytes": encode(sixteen_bit(offset), "PNG"), "path": None}, 4),  # converted: kept
           ({"bytes": encode(photo(seed=offset).convert("CMYK"), "JPEG"), "path": None}, 5)]  # converted: kept
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    rows = {"image": images + [o[0] for o in odd], "label": labels + [o[1] for o in odd]}
    # A ClassLabel column as the hub's; the cast does not check ranges, so label 12 survives as in a dirty file.
    return Dataset.from_dict(rows, features=features).cast_column("label", ClassLabel(names=list(DIGIT_NAMES)))


EXPECTED_SKIPS = {"label_out_of_range": 1, "unreadable_image": 2}


def test_hub_shaped_data_set_skips_and_counts_bad_rows(tmp_path):
    from datasets import DatasetDict

    dataset = bad_rows_dataset(n_good=10)  # every digit has a row to train on
    # a data set as datasets keeps one; a test split of its own (a held-out share of one row per digit is empty)
    DatasetDict({"train": dataset, "test": bad_rows_dataset(n_good=4, offset=50)}).save_to_disk(tmp_path / "bad")
    examples = load_examples(str(tmp_path / "bad"), "train")
    assert examples.class_names == [name.capitalize() for name in DIGIT_NAMES]
    assert examples.skipped == EXPECTED_SKIPS
    assert len(examples) == len(dataset) - 3
    assert all(e["image"].mode == "RGB" and 0 <= e["label"] < 10 for e in examples.examples)
    assert skipped_summary(examples) == {"train": {"kept": 12, "skipped": EXPECTED_SKIPS, "n_skipped": 3}}
    assert skip_report(examples) == f"{tmp_path / 'bad'} train: kept 12, skipped 3 (1 label_out_of_range, 2 unreadable_image)"
    with pytest.raises(EmptySplitError, match="'local/bad' split 'test' has no usable example"):
        validate_examples([], list(DIGIT_NAMES), "local/bad", "test")


def test_digits_have_nothing_to_skip():
    assert load_examples("digits", "train", size=20).skipped == {}


# --------------------------------------------------------------------------- model paths and parameters


@pytest.fixture()
def not_gemma(tmp_path):
    folders = {"missing": tmp_path / "nowhere", "no_config": tmp_path / "empty", "llama": tmp_path / "llama",
               "broken_config": tmp_path / "broken"}
    for name in ("no_config", "llama", "broken_config"):
        folders[name].mkdir()
    (folders["llama"] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folders["broken_config"] / "config.json").write_text("{not json")
    return folders


@pytest.mark.parametrize("case, message", [("missing", "does not exist"), ("no_config", "has no config.json"),
                                           ("llama", "'llama' checkpoint, not Gemma 4"),
                                           ("broken_config", "config.json is not a JSON object")])
def test_model_path_that_is_not_gemma4_is_refused_before_any_notebook(not_gemma, case, message, capsys, tmp_path):
    from helpers.modeling import ModelLoadError, load_processor

    path = str(not_gemma[case])
    with pytest.raises(ModelLoadError, match=message):
        load_processor(path)
    assert main(["--output-dir", str(tmp_path / "run"), "--model-id", path]) == 2
    err = capsys.readouterr().err
    assert "model_id" in err and path in err and message in err
    assert not (tmp_path / "run" / "04_training.ipynb").exists()  # refused before papermill started


def test_a_relative_path_with_folders_is_not_mistaken_for_a_hub_id(tmp_path, monkeypatch):
    from helpers.modeling import ModelLoadError, check_model_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="models/gemma/31b' does not exist"):
        check_model_source("models/gemma/31b")
    check_model_source("google/gemma-4-31b-it")  # a hub id: left to from_pretrained


@pytest.mark.parametrize("args, name", [
    (["-p", "train_size", "-5"], "train_size"), (["-p", "eval_size", "0"], "eval_size"),
    (["-p", "batch_size", "0"], "batch_size"), (["-p", "save_steps", "-2"], "save_steps"),
    (["-p", "max_length", "0"], "max_length"), (["-p", "epochs", "0"], "epochs"),
    (["--train-size", "-1"], "train_size"), (["-p", "max_steps", "ten"], "max_steps"),
    (["-p", "learning_rate", "fast"], "learning_rate"), (["-p", "max_steps", "2.5"], "max_steps"),
    (["-p", "gradient_checkpointing", "1"], "gradient_checkpointing"), (["-p", "batchsize", "4"], "batchsize"),
    (["-p", "warmup_steps", "-1"], "warmup_steps"), (["-p", "optimizer", "adam"], "optimizer"),
    (["-p", "compile_layers", "yes"], "compile_layers"), (["-p", "quantize_towers", "1"], "quantize_towers"),
])
def test_bad_runner_parameters_name_the_parameter(args, name, tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), *args]) == 2
    assert name in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_a_parameter_without_a_value_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--output-dir", str(tmp_path), "-p", "train_size"])
    assert exit_.value.code == 2
    assert "-p/--parameter: expected 2 arguments" in capsys.readouterr().err


def test_an_answer_cut_by_max_length_stops_training_before_the_first_step(tmp_path, tiny_path, tiny_processor):
    from transformers import AutoModelForMultimodalLM

    from helpers.collator import CollatorError, VisionChatCollator
    from helpers.modeling import apply_lora
    from helpers.run.config import RunConfig
    from helpers.training import build_trainer, training_arguments

    config = RunConfig(train_size=8, batch_size=4, max_steps=2, save_steps=1, max_length=40)
    data = load_examples("digits", "train", size=8)
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    collator = VisionChatCollator(tiny_processor, data.class_names, max_length=config.max_length)
    trainer = build_trainer(model, training_arguments(config, tmp_path), data.examples, collator)
    with pytest.raises(CollatorError, match=r"sample \d+ \(row \d+ of the data set, '\w+'\): max_length=40 cuts"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))
