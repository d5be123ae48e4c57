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
