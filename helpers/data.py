"""Data sets as one schema: examples ``{"image": PIL.Image (RGB), "label": int}`` plus class names.

Two sources, one shape (taught in notebooks 03 and 04):
- ``"digits"``: the offline default, scikit-learn's bundled handwritten digits (1,797 8×8 images,
  10 classes) rendered as RGB images, with a seeded stratified train/test split;
- ``"timm/oxford-iiit-pet"``: Oxford-IIIT Pet from the Hugging Face hub (3,680 train / 3,669 test,
  37 breeds), loaded with ``datasets.load_dataset``. Any local folder or hub id with ``image`` and
  ``label`` columns loads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from helpers.validation import validate_examples

DIGITS = "digits"
OXFORD_PET = "timm/oxford-iiit-pet"

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The 37 Oxford-IIIT Pet breeds in the data set's label order (alphabetical, case-insensitive).
PET_BREEDS = (
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle", "Bengal",
    "Birman", "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau", "English Cocker Spaniel",
    "English Setter", "German Shorthaired", "Great Pyrenees", "Havanese", "Japanese Chin", "Keeshond",
    "Leonberger", "Maine Coon", "Miniature Pinscher", "Newfoundland", "Persian", "Pomeranian", "Pug",
    "Ragdoll", "Russian Blue", "Saint Bernard", "Samoyed", "Scottish Terrier", "Shiba Inu", "Siamese",
    "Sphynx", "Staffordshire Bull Terrier", "Wheaten Terrier", "Yorkshire Terrier",
)  # fmt: skip

DIGIT_IMAGE_SIZE = 32  # 8x8 digits upscaled (nearest) so the strokes stay crisp


@dataclass
class ExampleSet:
    """One split of one data set: examples in the shared schema and the class names.

    ``skipped`` counts the rows left out, by reason (``helpers.validation``: corrupt image, label outside
    the class list...); notebooks 04 and 05 print it and ``metrics.json`` records it.
    """

    name: str
    split: str
    examples: list[dict]
    class_names: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def readable_class_name(raw: str) -> str:
    """``"american_bulldog"`` -> ``"American Bulldog"``; names that already read well are kept."""
    if "_" not in raw and raw[:1].isupper():
        return raw
    return " ".join(w.capitalize() for w in raw.replace("_", " ").split())


def digit_image(pixels: np.ndarray, size: int = DIGIT_IMAGE_SIZE) -> Image.Image:
    """An 8×8 digit (values 0..16) as a white-on-black RGB image of ``size``×``size``."""
    gray = np.clip(pixels.reshape(8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.NEAREST).convert("RGB")


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(test_idx)


def _take(indices: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A seeded subset of ``size`` indices (all of them when size is None)."""
    if size is None or size >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=size, replace=False))


ONE_PIXEL_SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def shift_digit(pixels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The 8×8 digit moved by (dy, dx) pixels, blank where it moved away from (no wrap-around)."""
    grid = pixels.reshape(8, 8)
    out = np.zeros_like(grid)
    ys, yd = (slice(0, 8 - dy), slice(dy, 8)) if dy >= 0 else (slice(-dy, 8), slice(0, 8 + dy))
    xs, xd = (slice(0, 8 - dx), slice(dx, 8)) if dx >= 0 else (slice(-dx, 8), slice(0, 8 + dx))
    out[yd, xd] = grid[ys, xs]
    return out.reshape(-1)


def load_digits_examples(split: str = "train", size: int | None = None, seed: int = 0,
                         test_fraction: float = 0.25, augment: bool = False) -> ExampleSet:
    """The offline data set: scikit-learn's digits as RGB images, a stratified seeded split.

    ``augment`` (training split only) adds four copies of each digit moved by one pixel; the held-out
    split is never augmented.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_idx, test_idx = _stratified_split(digits.target, test_fraction, seed=0)
    indices = _take(train_idx if split == "train" else test_idx, size, seed)
    examples = [{"image": digit_image(digits.data[i]), "label": int(digits.target[i])} for i in indices]
    if augment and split == "train":
        examples += [{"image": digit_image(shift_digit(digits.data[i], dy, dx)), "label": int(digits.target[i])}
                     for dy, dx in ONE_PIXEL_SHIFTS for i in indices]
    examples, skipped = validate_examples(examples, DIGIT_NAMES, DIGITS, split)
    return ExampleSet(DIGITS, split, examples, list(DIGIT_NAMES), skipped)


def hf_examples(dataset, name: str, split: str, class_names=None) -> ExampleSet:
    """Convert a ``datasets.Dataset`` with ``image`` and ``label`` columns into the shared schema.

    Images are read undecoded and made RGB by ``helpers.validation.to_rgb_image`` (huge ones shrunk while
    decoding); rows with a corrupt image or a label outside the class list are skipped and counted in
    ``ExampleSet.skipped``; a split with no usable row is an ``EmptySplitError``.
    """
    missing = {"image", "label"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"data set {name!r} split {split!r} lacks column(s) {sorted(missing)}; "
                         f"it has {dataset.column_names}")
    if class_names is None:
        label_feature = dataset.features["label"]
        raw = getattr(label_feature, "names", None)
        if raw:
            class_names = [readable_class_name(n) for n in raw]
        else:  # "0".."max": labels that are not non-negative integers are skipped below, not counted here
            labels = [v for v in dataset["label"] if isinstance(v, int) and v >= 0]
            class_names = [str(i) for i in range(max(labels, default=-1) + 1)]
    if getattr(dataset.features["image"], "decode", False):  # decode ourselves: bad bytes become a counted skip
        from datasets import Image as ImageFeature

        dataset = dataset.cast_column("image", ImageFeature(decode=False))
    rows = ({"image": row["image"], "label": row["label"]} for row in dataset)
    examples, skipped = validate_examples(rows, class_names, name, split)
    return ExampleSet(name, split, examples, list(class_names), skipped)


def load_hf_examples(name: str, split: str = "train", size: int | None = None, seed: int = 0,
                     **load_kwargs) -> ExampleSet:
    """A hub id or local data set folder via ``datasets.load_dataset`` (e.g. Oxford-IIIT Pet)."""
    from datasets import load_dataset

    dataset = load_dataset(name, split=split, **load_kwargs)
    if size is not None and size < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(size))
    return hf_examples(dataset, name, split)


def load_examples(name: str = DIGITS, split: str = "train", size: int | None = None, seed: int = 0) -> ExampleSet:
    """One entry point for every data set; taught in notebook 04. A ``size`` above the split's usable rows
    (the seed's ``--train-size 4000`` on Pet's 3,680) takes all of them, and says so."""
    if name == DIGITS:
        examples = load_digits_examples(split, size, seed)
    else:
        examples = load_hf_examples(name, split, size, seed)
    if size is not None and len(examples) < size:
        print(f"{name} {split}: {size} examples asked for, the split has {len(examples)} usable rows: using all of them")
    return examples
