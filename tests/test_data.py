"""Both data sets yield the same schema; the Pet loader is tested on a local fixture of the hub's shape."""

import io

import numpy as np
import pytest
from PIL import Image

from helpers.chat import QUESTION, to_messages
from helpers.data import DIGIT_NAMES, PET_BREEDS, load_examples, readable_class_name


def _check_schema(example_set, n_classes):
    assert len(example_set.class_names) == n_classes
    for example in example_set.examples[:20]:
        assert set(example) >= {"image", "label"}
        assert isinstance(example["label"], int) and 0 <= example["label"] < n_classes
        assert example["image"].mode == "RGB"


def test_digits_split_is_stratified_seeded_and_disjoint():
    train = load_examples("digits", "train")
    test = load_examples("digits", "test")
    assert len(train) + len(test) == 1797
    _check_schema(train, 10)
    assert train.class_names == list(DIGIT_NAMES)
    counts = np.bincount([e["label"] for e in test.examples], minlength=10)
    assert counts.min() >= 40  # stratified: every class in the held-out split
    train_bytes = {e["image"].tobytes() + bytes([e["label"]]) for e in train.examples}
    again = load_examples("digits", "test")
    assert [e["label"] for e in again.examples] == [e["label"] for e in test.examples]
    assert sum(e["image"].tobytes() + bytes([e["label"]]) in train_bytes for e in test.examples) < len(test) * 0.1


def test_digits_subset_size_is_seeded():
    a = load_examples("digits", "train", size=50, seed=1)
    b = load_examples("digits", "train", size=50, seed=1)
    c = load_examples("digits", "train", size=50, seed=2)
    assert len(a) == 50
    assert [e["label"] for e in a.examples] == [e["label"] for e in b.examples]
    assert [e["image"].tobytes() for e in a.examples] != [e["image"].tobytes() for e in c.examples]


@pytest.fixture(scope="module")
def local_pet_folder(tmp_path_factory):
    """A folder shaped like timm/oxford-iiit-pet: parquet files with an Image and a ClassLabel column."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    raw_names = [n.lower().replace(" ", "_") for n in PET_BREEDS]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=raw_names)})
    root = tmp_path_factory.mktemp("oxford-iiit-pet")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 8)):
        images = []
        for _ in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        every_breed = list(range(37)) if split == "train" else []  # a breed with no training row is an error
        rows = {"image": images, "label": every_breed + [int(i) for i in rng.integers(0, 37, n - len(every_breed))]}
        Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / f"{split}-00000.parquet"))
    return root


def test_pet_loader_reads_the_hub_schema(local_pet_folder):
    train = load_examples(str(local_pet_folder), "train")
    test = load_examples(str(local_pet_folder), "test", size=5)
    assert len(train) == 40 and len(test) == 5
    _check_schema(train, 37)
    assert train.class_names == list(PET_BREEDS)


def test_readable_class_names():
    assert readable_class_name("american_pit_bull_terrier") == "American Pit Bull Terrier"
    assert readable_class_name("Abyssinian") == "Abyssinian"


def test_messages_put_the_image_first():
    messages = to_messages(answer="Beagle", system="Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[1]["content"][1] == {"type": "text", "text": QUESTION}
    assert messages[2]["content"] == "Beagle"
    assert messages[0]["content"] == "Be brief."  # a string: the released templates print a list as its repr


# --------------------------------------------------------------------------- your own images

COLOURS = {"red_fox": (200, 40, 30), "blue_jay": (30, 60, 200), "Green Frog": (40, 180, 60)}


def write_photo(path, colour, seed=0):
    """A small JPEG of one colour with some noise (so that every file differs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(-20, 20, (24, 32, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path, format="JPEG")
    return path


def class_folders(root, per_class=8, classes=COLOURS, first_seed=0):
    """``root/<class>/<n>.jpg``: the most common layout there is. Photos of one seed are the same image, so
    a held-out folder beside a training one takes seeds of its own (``first_seed``)."""
    for name, colour in classes.items():
        for i in range(per_class):
            write_photo(root / name / f"{i}.jpg", colour, seed=first_seed + i)
    return root


def test_class_folders_only_get_a_seeded_stratified_held_out_share(tmp_path):
    from helpers.data import describe_source

    root = class_folders(tmp_path / "photos")
    (root / ".DS_Store").write_bytes(b"not an image")
    source = describe_source(str(root), test_fraction=0.25)
    assert source.class_names == ["Green Frog", "Blue Jay", "Red Fox"]  # folder order, names tidied
    assert len(source.train) == 18 and len(source.held_out) == 6
    assert sorted(source.held_out.labels) == [0, 0, 1, 1, 2, 2]  # 2 of each class's 8
    train_files = {source.train.identity(i) for i in range(len(source.train))}
    held_files = {source.held_out.identity(i) for i in range(len(source.held_out))}
    assert not train_files & held_files
    assert held_files == {describe_source(str(root)).held_out.identity(i) for i in range(6)}  # seeded
    assert len(describe_source(str(root), test_fraction=0.5).held_out) == 12
    held = load_examples(str(root), "test")
    assert held.split == "held_out" and len(held) == 6 and held.examples[0]["image"].mode == "RGB"


@pytest.mark.parametrize("held_out", ["test", "validation"])
def test_train_and_test_or_validation_folders(tmp_path, held_out):
    root = tmp_path / "photos"
    class_folders(root / "train", per_class=4)
    class_folders(root / held_out, per_class=2, first_seed=4)
    train, held = load_examples(str(root), "train"), load_examples(str(root), "test")
    assert (len(train), len(held), held.split) == (12, 6, held_out)
    assert train.class_names == held.class_names == ["Green Frog", "Blue Jay", "Red Fox"]
    reds = [e["image"].getpixel((5, 5))[0] for e in held.examples if held.class_names[e["label"]] == "Red Fox"]
    assert len(reds) == 2 and min(reds) > 150  # each image under the label of its folder


def test_a_table_file_with_paths_or_bytes_and_names_or_indices(tmp_path):
    import pandas as pd

    root = class_folders(tmp_path / "photos", per_class=4)
    files = sorted(root.rglob("*.jpg"))
    names = [p.parent.name for p in files]
    rows = pd.DataFrame({"file": [str(p.relative_to(tmp_path)) for p in files], "breed": names})
    rows.to_csv(tmp_path / "labels.csv", index=False)
    rows.to_json(tmp_path / "labels.jsonl", orient="records", lines=True)
    order = sorted(set(names))
    pd.DataFrame({"image": [p.read_bytes() for p in files], "label": [order.index(n) for n in names]}).to_parquet(
        tmp_path / "bytes.parquet")
    for table, columns in (("labels.csv", {"image_column": "file", "label_column": "breed"}),
                           ("labels.jsonl", {"image_column": "file", "label_column": "breed"}), ("bytes.parquet", {})):
        train = load_examples(str(tmp_path / table), "train", **columns)
        held = load_examples(str(tmp_path / table), "test", **columns)
        assert len(train) + len(held) == 12 and len(held) == 3, table
        expected = ["Green Frog", "Blue Jay", "Red Fox"] if columns else ["0", "1", "2"]
        assert train.class_names == expected, table
    reds = [e for e in train.examples if e["label"] == order.index("red_fox")]
    assert reds and all(e["image"].getpixel((5, 5))[0] > 150 for e in reds)  # bytes decoded, labels kept


def test_a_split_column_names_the_splits(tmp_path):
    import pandas as pd

    root = class_folders(tmp_path / "photos", per_class=3)
    files = sorted(root.rglob("*.jpg"))
    split = ["validation" if p.stem == "0" else "train" for p in files]
    pd.DataFrame({"image": [str(p) for p in files], "label": [p.parent.name for p in files], "split": split}).to_csv(
        tmp_path / "rows.csv", index=False)
    held = load_examples(str(tmp_path / "rows.csv"), "test")
    assert (held.split, len(held)) == ("validation", 3)


def test_a_datasets_set_with_its_own_columns_and_splits(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    features = Features({"picture": ImageFeature(), "kind": ClassLabel(names=["red_fox", "blue_jay"])})

    def split(n, first=0):
        return Dataset.from_dict({"picture": [{"bytes": write_photo(tmp_path / f"{i}.jpg", (200, 40, 30), seed=i)
                                               .read_bytes(), "path": None} for i in range(first, first + n)],
                                  "kind": [i % 2 for i in range(n)]}, features=features)
    saved = tmp_path / "saved"  # save_to_disk keeps any split names
    DatasetDict({"training": split(6), "dev": split(4, first=6)}).save_to_disk(str(saved))
    options = {"image_column": "picture", "label_column": "kind", "train_split": "training", "eval_split": "dev"}
    train, held = load_examples(str(saved), "train", **options), load_examples(str(saved), "test", **options)
    assert (len(train), len(held), held.split, train.class_names) == (6, 4, "dev", ["Red Fox", "Blue Jay"])
    parquet = tmp_path / "parquet" / "data"  # a hub-shaped folder: train and validation, no test split
    parquet.mkdir(parents=True)
    split(6).to_parquet(str(parquet / "train-00000.parquet"))
    split(4, first=6).to_parquet(str(parquet / "validation-00000.parquet"))
    held = load_examples(str(parquet.parent), "test", image_column="picture", label_column="kind")
    assert (held.split, len(held)) == ("validation", 4)  # eval_split None: "test", else "validation"
    folder = saved
    from helpers.data import DataError, describe_source

    with pytest.raises(DataError, match="no split 'test' \\(eval_split\\); it has \\['dev', 'training'\\]"):
        describe_source(str(folder), **{**options, "eval_split": "test"})
    with pytest.raises(DataError, match="lacks column\\(s\\) \\['image'\\]"):
        describe_source(str(folder), **{**options, "image_column": "image"})


def test_a_class_map_file_renames_classes_and_must_name_real_ones(tmp_path):
    from helpers.data import DataError

    root = class_folders(tmp_path / "photos", per_class=4)
    mapping = tmp_path / "names.json"
    mapping.write_text('{"red_fox": "fox", "blue_jay": "jay"}')
    assert load_examples(str(root), "train", class_map_file=str(mapping)).class_names == ["Green Frog", "jay", "fox"]
    mapping.write_text('{"red_fx": "fox"}')
    with pytest.raises(DataError, match="class_map_file names \\['red_fx'\\]"):
        load_examples(str(root), "train", class_map_file=str(mapping))


@pytest.mark.parametrize("case, message", [
    ("collision", "'Golden Retriever' and 'golden_retriever' both become the class name 'Golden Retriever'"),
    ("no_training_row", "'Owl' \\(class folder 'owl'\\) have no training row"),
    ("unseen_eval_label", "held-out class folder\\(s\\) 'lion' \\(1 row\\) never appear in training"),
    ("missing_path", "the data path '.*no-such-folder' does not exist"),
    ("empty_folder", "the data folder '.*empty' is empty"),
    ("loose_images", "holds images but no class folders"),
])
def test_data_that_would_make_the_run_meaningless_is_refused_naming_it(tmp_path, case, message):
    from helpers.data import DataError, describe_source

    root = tmp_path / "photos"
    if case == "collision":
        class_folders(root, per_class=2, classes={"golden_retriever": (200, 150, 50), "Golden Retriever": (190, 140, 40)})
    elif case in ("no_training_row", "unseen_eval_label"):
        class_folders(root / "train", per_class=2)
        class_folders(root / "test", per_class=1, first_seed=2)
        (root / "train" / "owl").mkdir() if case == "no_training_row" else write_photo(root / "test" / "lion" / "0.jpg",
                                                                                      (90, 90, 0))
    elif case == "missing_path":
        root = tmp_path / "no-such-folder"
    elif case == "empty_folder":
        root = tmp_path / "empty"
        root.mkdir()
    else:
        write_photo(root / "0.jpg", (1, 2, 3))
    with pytest.raises(DataError, match=message):
        describe_source(str(root))


def test_missing_files_are_counted_skips_and_replaced_so_size_rows_are_used(tmp_path):
    import pandas as pd

    root = class_folders(tmp_path / "photos", per_class=5)
    files = sorted(root.rglob("*.jpg"))
    rows = pd.DataFrame({"image": [str(p.relative_to(tmp_path)) for p in files], "label": [p.parent.name for p in files],
                         "split": ["test" if p.stem == "0" else "train" for p in files]})
    rows.loc[len(rows)] = ["photos/red_fox/gone.jpg", "red_fox", "train"]
    rows.loc[len(rows)] = ["photos/blue_jay/gone.jpg", "blue_jay", "train"]
    (root / "red_fox" / "1.jpg").write_bytes(b"corrupt")
    rows.to_csv(tmp_path / "rows.csv", index=False)
    every = load_examples(str(tmp_path / "rows.csv"), "train")  # 14 rows: 12 files, 2 of them gone, 1 corrupt
    assert (len(every), every.skipped) == (11, {"missing_image": 2, "unreadable_image": 1})
    for size in (8, 11):
        assert len(load_examples(str(tmp_path / "rows.csv"), "train", size=size, seed=3)) == size
    assert len(load_examples(str(tmp_path / "rows.csv"), "train", size=13)) == 11  # all there is
