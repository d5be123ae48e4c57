"""Problems in a user's data fail before any model loads, naming the split or class, or are fixed and counted:
held-out images that training also has, an empty held-out split, a single class, class names holding the
model's control tokens, and images written into a table as base64 text."""

import base64
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_data import class_folders, write_photo

from helpers.data import DataError, describe_source, load_examples
from helpers.run.command_line import check_data
from helpers.run.config import ConfigError, RunConfig
from helpers.validation import skip_report, skipped_summary


def table(path, rows: dict):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def held_out_keys(source):
    return set(source.held_out.content)


# --------------------------------------------------------------------------- images shared between splits


def test_a_table_listing_every_row_three_times_holds_out_each_image_once_and_never_a_trained_one(tmp_path):
    files = sorted(class_folders(tmp_path / "photos", per_class=4).rglob("*.jpg"))  # 3 classes x 4 images
    csv = table(tmp_path / "thrice.csv", {"image": [str(p.relative_to(tmp_path)) for p in files] * 3,
                                          "label": [p.parent.name for p in files] * 3})
    source = describe_source(csv)
    assert not held_out_keys(source) & set(source.train.content)  # a repeated image goes to one side only
    assert (len(source.train), source.train.repeats, len(source.held_out)) == (27, 18, 3)
    assert "'train' 27 rows (18 repeat an image of another row)" in source.summary()
    assert "'held_out' 3 rows (left out: 6 repeated_image)" in source.summary()
    held = load_examples(csv, "test")
    assert (len(held), held.skipped) == (3, {"repeated_image": 6})
    assert skipped_summary(held) == {"held_out": {"kept": 3, "skipped": {"repeated_image": 6}, "n_skipped": 6}}


def test_held_out_rows_showing_a_training_image_by_any_name_are_left_out_and_counted(tmp_path):
    files = sorted(class_folders(tmp_path / "photos", per_class=3).rglob("*.jpg"))
    shutil.copy(files[0], tmp_path / "renamed.jpg")  # the same image under another name
    write_photo(tmp_path / "new.jpg", (200, 40, 30), seed=99)
    test_rows = {"image": [str(files[1].relative_to(tmp_path)), "renamed.jpg", "new.jpg", "new.jpg"],
                 "label": [files[1].parent.name, files[0].parent.name, "red_fox", "red_fox"]}
    csv = table(tmp_path / "rows.csv", {
        "image": [str(p.relative_to(tmp_path)) for p in files] + test_rows["image"],
        "label": [p.parent.name for p in files] + test_rows["label"],
        "split": ["train"] * len(files) + ["test"] * 4})
    held = load_examples(csv, "test")
    assert (len(held), held.skipped) == (1, {"also_in_training": 2, "repeated_image": 1})
    assert skip_report(held).endswith("test: kept 1, skipped 3 (2 also_in_training, 1 repeated_image)")
    # the same with folders: a test/ image that is a copy of a train/ image
    root = tmp_path / "split-folders"
    class_folders(root / "train", per_class=3)
    class_folders(root / "test", per_class=2, first_seed=3)
    shutil.copy(root / "train" / "red_fox" / "0.jpg", root / "test" / "red_fox" / "copy.jpg")
    source = describe_source(str(root))
    assert (len(source.held_out), source.held_out.dropped) == (6, {"also_in_training": 1})


def test_a_held_out_split_of_training_images_only_is_refused_before_the_model_loads(tmp_path):
    files = sorted(class_folders(tmp_path / "photos", per_class=2).rglob("*.jpg"))
    names = [str(p.relative_to(tmp_path)) for p in files]
    csv = table(tmp_path / "leak.csv", {"image": names + names[:3], "label": [p.parent.name for p in files * 2][:9],
                                        "split": ["train"] * 6 + ["test"] * 3})
    message = "the held-out split 'test' of '.*leak.csv' has no row left \\(3 also_in_training\\)"
    with pytest.raises(DataError, match=message):
        describe_source(csv)
    with pytest.raises(ConfigError, match="dataset: " + message):  # the runner's check, before the model loads
        check_data(RunConfig.from_params({"dataset": csv}))


def test_the_fingerprint_changes_when_an_image_changes_under_the_same_name(tmp_path):
    root = class_folders(tmp_path / "photos", per_class=4)
    source = describe_source(str(root))
    before = source.fingerprint()["splits"]
    write_photo(root / source.train.identity(0), (10, 200, 10), seed=7)  # a training image, rewritten
    after = describe_source(str(root)).fingerprint()["splits"]
    assert after["train"]["rows_sha256"] == before["train"]["rows_sha256"]  # same names, same labels
    assert after["train"]["content_sha256"] != before["train"]["content_sha256"]


def test_digits_have_no_repeated_image_and_keep_their_rows():
    source = describe_source("digits")
    assert (len(source.train), len(source.held_out)) == (1347, 450)
    assert (source.train.repeats, source.train.dropped, source.held_out.dropped) == (0, {}, {})
    assert len(set(source.train.content)) == 1347 and not held_out_keys(source) & set(source.train.content)
    assert source.summary() == ("digits (digits): 10 classes; training split 'train' 1347 rows, held-out split "
                                "'test' 450 rows")


# --------------------------------------------------------------------------- splits and classes


def test_an_empty_held_out_split_is_refused_naming_it(tmp_path):
    root = tmp_path / "photos"
    class_folders(root / "train", per_class=2)
    for name in ("red_fox", "blue_jay"):
        (root / "test" / name).mkdir(parents=True)  # class folders, but no image in them
    with pytest.raises(DataError, match="the held-out split 'test' of '.*photos' has no rows"):
        describe_source(str(root))
    one_each = class_folders(tmp_path / "one-each", per_class=1)  # nothing to hold out: each image is trained on
    with pytest.raises(DataError, match="the held-out split 'held_out' of '.*one-each' is empty: with test_fraction"):
        describe_source(str(one_each))


def test_a_single_class_is_refused_naming_it(tmp_path):
    root = class_folders(tmp_path / "photos", per_class=4, classes={"red_fox": (200, 40, 30)})
    with pytest.raises(DataError, match="needs at least two classes; this data has only 'Red Fox' "
                                        "\\(class folder 'red_fox'\\)"):
        describe_source(str(root))
    files = sorted(root.rglob("*.jpg"))
    csv = table(tmp_path / "one.csv", {"image": [str(p) for p in files], "label": ["fox"] * len(files)})
    with pytest.raises(DataError, match="needs at least two classes; this data has only 'Fox' \\('label' value 'fox'\\)"):
        describe_source(csv)


def test_a_label_holding_a_control_token_is_refused_naming_class_and_token(tmp_path):
    files = sorted(class_folders(tmp_path / "photos", per_class=4).rglob("*.jpg"))
    csv = table(tmp_path / "rows.csv", {"image": [str(p) for p in files],
                                        "label": ["Fox<turn|>" if p.parent.name == "red_fox" else p.parent.name
                                                  for p in files]})
    with pytest.raises(DataError, match="class name 'Fox<turn\\|>' holds '<turn\\|>', which Gemma 4 reads as"):
        describe_source(csv)


@pytest.mark.parametrize("token", ["<turn|>", "<|turn>", "<bos>", "<eos>", "<pad>", "<|image|>", "<channel|>",
                                   "<|video|>", "<start_of_image>", "<|new_token|>"])
def test_a_class_map_name_holding_a_control_token_is_refused_naming_class_and_token(tmp_path, token):
    root = class_folders(tmp_path / "photos", per_class=4)
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"red_fox": f"fox {token}"}))
    message = f"class name 'fox {token}' \\(class folder 'red_fox'\\) holds '{token}'"
    with pytest.raises(DataError, match=message.replace("|", "\\|")):
        describe_source(str(root), class_map_file=str(mapping))


def test_class_names_with_angle_brackets_or_bars_that_are_no_token_are_kept(tmp_path):
    classes = {"<3 Hearts": (200, 40, 30), "A|B": (30, 60, 200), "x<y>z": (40, 180, 60)}
    assert describe_source(str(class_folders(tmp_path / "photos", per_class=4, classes=classes))).class_names == [
        "<3 Hearts", "A|B", "X<y>z"]


# --------------------------------------------------------------------------- images as base64 text


def encoded(colour, fmt, width=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, 12), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def test_base64_images_in_a_table_are_decoded_and_paths_stay_paths(tmp_path):
    def cells(shade):
        red, blue = encoded((220, 20, 20), "PNG", 16 + shade), encoded((20, 20, 220), "JPEG", 16 + shade)
        write_photo(tmp_path / f"green{shade}.jpg", (40, 180, 60), seed=shade)
        return ["data:image/png;base64," + base64.b64encode(red).decode(),  # a data URI
                base64.encodebytes(blue).decode(),  # bare base64, wrapped at 76 characters
                f"green{shade}.jpg"]  # a path, relative to the table

    base64_name = base64.b64encode(b"Beagle photographs").decode()  # a file name that happens to be base64
    rows = {"image": [*cells(0), "gone.jpg", base64_name, *cells(1)],
            "label": ["red", "blue", "green", "green", "green", "red", "blue", "green"],
            "split": ["train"] * 5 + ["test"] * 3}
    csv = table(tmp_path / "rows.csv", rows)
    train, held = load_examples(csv, "train"), load_examples(csv, "test")
    assert train.skipped == {"missing_image": 2}  # paths that do not exist are still missing images
    assert (len(held), held.skipped) == (3, {})
    for examples in (train, held):
        colours = {examples.class_names[e["label"]]: e["image"].getpixel((3, 3)) for e in examples.examples}
        assert colours["Red"][0] > 200 and colours["Blue"][2] > 200 and colours["Green"][1] > 150


def test_a_jsonl_bytes_object_holding_base64_is_decoded(tmp_path):
    lines = [{"image": {"bytes": base64.b64encode(encoded((200 + i, 10, 10), "PNG")).decode()}, "label": "red"}
              for i in range(3)]
    lines += [{"image": {"bytes": base64.b64encode(encoded((10, 10, 200 + i), "PNG")).decode()}, "label": "blue"}
              for i in range(3)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    train = load_examples(str(tmp_path / "rows.jsonl"), "train")
    held = load_examples(str(tmp_path / "rows.jsonl"), "test")
    assert train.skipped == held.skipped == {} and len(train) + len(held) == 6
    assert all(np.asarray(e["image"]).max() >= 200 for e in train.examples + held.examples)
