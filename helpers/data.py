"""Data sets as one schema: examples ``{"image": PIL.Image (RGB), "label": int}`` plus class names.

One entry point, ``load_examples`` (taught in notebooks 03 and 04, and in the README's "Train on your own
images"), for every source:
- ``"digits"``: the offline default, scikit-learn's bundled handwritten digits (1,797 8×8 images,
  10 classes) rendered as RGB images, with a seeded stratified train/test split;
- an **image folder**: one sub-folder per class (a seeded, stratified held-out share, ``test_fraction``),
  or ``train/`` + ``test/`` (or ``validation/``) each with one sub-folder per class;
- a **CSV, JSONL or Parquet file** with an image column (a path relative to the file, or bytes) and a
  label column (class names or indices); an optional ``split`` column names each row's split;
- any **hub or local** ``datasets`` data set, e.g. ``"timm/oxford-iiit-pet"`` (3,680 train / 3,669 test,
  37 breeds), with ``image_column``, ``label_column``, ``train_split`` and ``eval_split``.

Class names come from the data (ClassLabel names, folder names, label strings, or the indices), tidied by
``readable_class_name`` or renamed by a ``class_map_file`` (JSON: ``{"raw label": "class name"}``).
``describe_source`` reads a source without decoding any image and raises ``DataError`` naming the path,
split, column or class for what would make the run meaningless (a missing or empty path, class names that
collide, a class with no training row, an evaluation label training never saw); the runner calls it
before the model loads, and its ``fingerprint()`` goes into the run folder's manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from helpers.validation import validate_examples

DIGITS = "digits"

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
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(test_idx)


def _take(indices: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A seeded subset of ``size`` indices (all of them when size is None)."""
    if size is None or size >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=size, replace=False))


class DataError(ValueError):
    """The data cannot be used as given; the message names the path, split, column or class."""


@dataclass
class SplitRows:
    """One split's rows before any image is decoded: labels (class indices, ``None`` where missing) and,
    per row, how to read its image as stored and a short identity (a path, or a hash of the bytes)."""

    name: str
    labels: list
    read: Callable[[int], object]
    identity: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices, name: str) -> SplitRows:
        indices = [int(i) for i in indices]
        return SplitRows(name, [self.labels[i] for i in indices], lambda k: self.read(indices[k]),
                         lambda k: self.identity(indices[k]))

    def fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for i, label in enumerate(self.labels):
            digest.update(f"{self.identity(i)}\t{label}\n".encode())
        return {"name": self.name, "rows": len(self), "rows_sha256": digest.hexdigest()}


@dataclass
class DataSource:
    """A data set as a run sees it: its kind, class names, training rows and held-out rows."""

    name: str
    kind: str  # "digits", "image folder", "table file" or "datasets"
    class_names: list[str]
    train: SplitRows
    held_out: SplitRows

    def rows(self, split: str) -> SplitRows:
        """``"train"``: the training rows; ``"test"``: the held-out rows (whatever the source calls them)."""
        if split not in (TRAIN, HELD_OUT):
            raise ValueError(f"split must be {TRAIN!r} or {HELD_OUT!r} (the held-out rows), got {split!r}")
        return self.train if split == TRAIN else self.held_out

    def fingerprint(self) -> dict:
        """Source, kind, class names, and per split its name, row count and a hash of its rows' identities."""
        return {"source": self.name, "kind": self.kind, "class_names": list(self.class_names),
                "splits": {TRAIN: self.train.fingerprint(), HELD_OUT: self.held_out.fingerprint()}}

    def summary(self) -> str:
        return (f"{self.name} ({self.kind}): {len(self.class_names)} classes; training split "
                f"{self.train.name!r} {len(self.train)} rows, held-out split {self.held_out.name!r} "
                f"{len(self.held_out)} rows")


TRAIN, HELD_OUT = "train", "test"  # the two roles a run loads; "test" is the held-out rows, whatever their split
EVAL_SPLITS = ("test", "validation")  # looked for, in this order, when eval_split is None
CARVED_SPLIT = "held_out"  # the name of a held-out share carved from the training rows
SPLIT_SEED = 0  # the held-out share does not move with the training seed: runs stay comparable
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TABLE_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
SPLIT_COLUMN = "split"  # in a table file: each row's split, when the file holds more than one


def stratified_held_out(labels: list, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """(training indices, held-out indices): ``test_fraction`` of each class held out, at least one row of
    each class kept for training (a class with one row is trained on, not held out)."""
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    held = []
    for label in sorted(by_class, key=str):
        rows = rng.permutation(by_class[label])
        held += rows[: min(round(len(rows) * test_fraction), len(rows) - 1)].tolist()
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def _digits_source(test_fraction: float = 0.25) -> DataSource:
    digits = load_digits()
    train_idx, test_idx = _stratified_split(digits.target, test_fraction, seed=0)
    every = SplitRows("all", [int(t) for t in digits.target], lambda i: digit_image(digits.data[i]), str)
    return DataSource(DIGITS, "digits", list(DIGIT_NAMES), every.subset(train_idx, TRAIN),
                      every.subset(test_idx, "test"))


def load_digits_examples(split: str = "train", size: int | None = None, seed: int = 0,
                         test_fraction: float = 0.25) -> ExampleSet:
    """The offline data set: scikit-learn's digits as RGB images, a stratified seeded split."""
    digits = load_digits()
    train_idx, test_idx = _stratified_split(digits.target, test_fraction, seed=0)
    indices = _take(train_idx if split == "train" else test_idx, size, seed)
    examples = [{"image": digit_image(digits.data[i]), "label": int(digits.target[i])} for i in indices]
    examples, skipped = validate_examples(examples, DIGIT_NAMES, DIGITS, split)
    return ExampleSet(DIGITS, split, examples, list(DIGIT_NAMES), skipped)


# --------------------------------------------------------------------------- labels and class names

def _raw_label(value):
    """A label as read from a file or column: an ``int`` index, a ``str`` name, or ``None`` (missing)."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return None  # pandas reads an empty cell as NaN
        return int(value) if float(value).is_integer() else str(value)
    text = str(value).strip()
    return text or None


def read_class_map(path) -> dict[str, str]:
    """A class-map file: JSON ``{"raw label": "class name"}``; ``DataError`` naming the file otherwise."""
    if path is None:
        return {}
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"class_map_file {str(path)!r} cannot be read as JSON ({type(err).__name__}: {err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
        raise DataError(f"class_map_file {str(path)!r} must be a JSON object {{\"raw label\": \"class name\"}}")
    return {str(k): v.strip() for k, v in mapping.items()}


def class_names_for(raw_names: list[str], class_map: dict[str, str], what: str) -> list[str]:
    """Each raw name renamed by ``class_map`` or tidied (``readable_class_name``); ``DataError`` when a map
    key names no class or when two classes end up with one name (case and spacing ignored, as matching is)."""
    unknown = sorted(set(class_map) - set(raw_names))
    if unknown:
        raise DataError(f"class_map_file names {unknown}, which are not {what}s of this data; they are "
                        f"{raw_names[:20]}{' ...' if len(raw_names) > 20 else ''}")
    names = [class_map.get(raw, readable_class_name(raw)) for raw in raw_names]
    seen: dict[str, str] = {}
    for raw, name in zip(raw_names, names):
        key = " ".join(name.casefold().split())
        if key in seen:
            raise DataError(f"{what}s {seen[key]!r} and {raw!r} both become the class name {name!r}: rename one, "
                            "or give them distinct names in a class_map_file")
        seen[key] = raw
    return names


def resolve_labels(train_raw: list, held_raw: list, class_map: dict, what: str = "label",
                   declared: list[str] | None = None) -> tuple[list[str], list, list]:
    """(class names, training label indices, held-out label indices) from raw labels (``_raw_label``).

    ``declared``: the class list the data declares (ClassLabel names, class folders). Without it, integer
    labels are indices into "0".."max" of the training labels and text labels are class names (sorted).
    A held-out label that training never saw, or a class with no training row, is a ``DataError``;
    an index outside a declared list is left for ``validate_examples`` to count as a bad row.
    """
    if all(isinstance(v, int) for v in [*train_raw, *held_raw] if v is not None):
        if declared is None:
            declared = [str(i) for i in range(max((v for v in train_raw if v is not None), default=-1) + 1)]
            _refuse_unseen([v for v in held_raw if v is not None and v >= len(declared)], declared, what)
        train, held = list(train_raw), list(held_raw)
    else:
        if declared is None:
            declared = sorted({str(v) for v in train_raw if v is not None})
        position = {name: i for i, name in enumerate(declared)}
        _refuse_unseen([str(v) for v in held_raw if v is not None and str(v) not in position], declared, what)
        train, held = ([None if v is None else position.get(str(v)) for v in raw] for raw in (train_raw, held_raw))
    names = class_names_for(declared, class_map, what)
    _check_every_class_trained(names, declared, train, what)
    return names, train, held


def _refuse_unseen(unseen: list, declared: list[str], what: str) -> None:
    if unseen:
        counts = ", ".join(f"{label!r} ({n} row{'s' * (n != 1)})" for label, n in sorted(Counter(unseen).items(), key=str))
        raise DataError(f"held-out {what}(s) {counts} never appear in training, so the model could not learn "
                        f"them; training has {declared[:20]}{' ...' if len(declared) > 20 else ''}")


def _check_every_class_trained(names: list[str], raw_names: list[str], train: list, what: str) -> None:
    counts = Counter(v for v in train if isinstance(v, int))
    empty = [f"{name!r}" + (f" ({what} {raw!r})" if raw != name else "")
             for i, (name, raw) in enumerate(zip(names, raw_names)) if not counts[i]]
    if empty:
        raise DataError(f"class(es) {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''} have no training "
                        "row: add images of them to the training data, or remove the class")


def held_out_rows(rows: SplitRows, eval_split: str | None, test_fraction: float) -> tuple[SplitRows, SplitRows]:
    """(training rows, held-out rows) carved from one split: ``test_fraction`` of each class, seeded."""
    train_idx, held_idx = stratified_held_out(rows.labels, test_fraction)
    return rows.subset(train_idx, rows.name), rows.subset(held_idx, eval_split or CARVED_SPLIT)


def pick_eval_split(available, eval_split: str | None, train_split: str, where: str) -> str | None:
    """The held-out split's name: ``eval_split`` (which must exist), else the first of ``EVAL_SPLITS``
    present, else ``None`` (a share of the training rows is held out)."""
    available = [str(name) for name in available]
    if eval_split is not None:
        if eval_split not in available:
            raise DataError(f"{where} has no split {eval_split!r} (eval_split); it has {sorted(available)}")
        return eval_split
    return next((name for name in EVAL_SPLITS if name in available and name != train_split), None)


def _require_split(available, train_split: str, where: str) -> None:
    if train_split not in [str(name) for name in available]:
        raise DataError(f"{where} has no split {train_split!r} (train_split); it has {sorted(map(str, available))}")


# --------------------------------------------------------------------------- image folders

def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth), hidden files and folders left out, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _subfolders(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _class_folder_rows(folder: Path, root: Path, name: str) -> tuple[SplitRows, list[str]]:
    """The rows of ``folder``'s class sub-folders (label: the folder name) and the class folders' names."""
    classes = _subfolders(folder)
    loose = [p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose and not classes:
        raise DataError(f"{folder} holds images but no class folders: put each class's images in a sub-folder "
                        f"named after the class ({folder}/<class>/{loose[0]})")
    paths, labels = [], []
    for class_name, class_dir in classes.items():
        files = image_files(class_dir)
        paths += files
        labels += [class_name] * len(files)
    rows = SplitRows(name, labels, lambda i: str(paths[i]), lambda i: paths[i].relative_to(root).as_posix())
    return rows, list(classes)


def is_image_folder(path: Path) -> bool:
    """A folder of images (not a ``datasets`` folder of Parquet or Arrow files)."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return (any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files)
            and not any(p.suffix.lower() in (".parquet", ".arrow") for p in files))


def folder_source(root: Path, train_split: str = "train", eval_split: str | None = None,
                  test_fraction: float = 0.25, class_map: dict | None = None) -> DataSource:
    """An image folder: ``<class>/<image>``, or ``<train_split>/<class>/<image>`` beside ``test/``
    or ``validation/`` (or ``eval_split``); a missing held-out folder means a held-out share."""
    splits = _subfolders(root)
    if train_split in splits:
        train, declared = _class_folder_rows(splits[train_split], root, train_split)
        eval_name = pick_eval_split(splits, eval_split, train_split, f"image folder {str(root)!r}")
        held = _class_folder_rows(splits[eval_name], root, eval_name)[0] if eval_name else None
    else:
        if eval_split is not None:
            raise DataError(f"image folder {str(root)!r} has no {train_split}/ folder, so eval_split "
                            f"{eval_split!r} names nothing: drop it (a share is held out) or add {train_split}/")
        train, declared = _class_folder_rows(root, root, train_split)
        held = None
    if held is None:
        train, held = held_out_rows(train, None, test_fraction)
    names, train.labels, held.labels = resolve_labels(train.labels, held.labels, class_map or {},
                                                      "class folder", declared)
    return DataSource(str(root), "image folder", names, train, held)


# --------------------------------------------------------------------------- table files

def read_table(path: Path):
    """A CSV, JSONL/JSON-lines or Parquet file as a pandas DataFrame."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read as {suffix[1:].upper()} ({type(err).__name__}: {err})") from None


def _table_image(value, folder: Path):
    """An image cell: a path (relative to the table's folder), bytes, or ``{"bytes", "path"}``."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value.strip():
        return str(folder / value.strip())  # an absolute path stays as it is
    return None if isinstance(value, float) else value  # NaN: an empty cell


def image_identity(value) -> str:
    """What names an image across machines: its path as written, else a hash of its bytes."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(value)).hexdigest()
    return str(value)


def table_source(path: Path, image_column: str = "image", label_column: str = "label", train_split: str = "train",
                 eval_split: str | None = None, test_fraction: float = 0.25,
                 class_map: dict | None = None) -> DataSource:
    """A table of images and labels; with a ``split`` column, its values name the splits."""
    table = read_table(path)
    missing = [c for c in (image_column, label_column) if c not in table.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (image_column / label_column); "
                        f"its columns are {list(table.columns)}")
    if table.empty:
        raise DataError(f"{path} has no rows")
    cells = list(table[image_column])
    written = [None if isinstance(c, float) else c for c in cells]
    every = SplitRows("all", [_raw_label(v) for v in table[label_column]],
                      lambda i: _table_image(cells[i], path.parent), lambda i: image_identity(written[i]))
    if SPLIT_COLUMN in table.columns:
        split_of = [str(v) for v in table[SPLIT_COLUMN]]
        _require_split(set(split_of), train_split, f"{path} ({SPLIT_COLUMN!r} column)")
        eval_name = pick_eval_split(set(split_of), eval_split, train_split, f"{path} ({SPLIT_COLUMN!r} column)")
        train = every.subset([i for i, s in enumerate(split_of) if s == train_split], train_split)
        held = every.subset([i for i, s in enumerate(split_of) if s == eval_name], eval_name) if eval_name else None
    elif eval_split is not None:
        raise DataError(f"{path} has no {SPLIT_COLUMN!r} column, so eval_split {eval_split!r} names nothing: "
                        "drop it (a share is held out) or add the column")
    else:
        train, held = every.subset(range(len(every)), train_split), None
    if held is None:
        train, held = held_out_rows(train, None, test_fraction)
    names, train.labels, held.labels = resolve_labels(train.labels, held.labels, class_map or {},
                                                      f"{label_column!r} value")
    return DataSource(str(path), "table file", names, train, held)


# --------------------------------------------------------------------------- datasets (hub or local)

def _undecoded(dataset, image_column: str):
    """The data set with its image column left as stored: decoding (and a bad image) is ours to handle."""
    if getattr(dataset.features[image_column], "decode", False):
        from datasets import Image as ImageFeature

        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def dataset_rows(dataset, split: str, image_column: str = "image",
                 label_column: str = "label") -> tuple[SplitRows, list[str] | None]:
    """(rows, the ClassLabel names or None) of one ``datasets.Dataset`` split."""
    missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
    if missing:
        raise DataError(f"split {split!r} lacks column(s) {missing} (image_column / label_column); "
                        f"it has {dataset.column_names}")
    declared = getattr(dataset.features[label_column], "names", None)
    images = _undecoded(dataset.select_columns([image_column]), image_column)
    labels = [_raw_label(v) for v in dataset[label_column]]
    return SplitRows(split, labels, lambda i: images[i][image_column],
                     lambda i: image_identity(images[i][image_column])), list(declared) if declared else None


def _load_dataset_dict(name: str):
    """Every split of ``name``: a folder written by ``save_to_disk``, else whatever ``load_dataset`` loads."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    saved = any((Path(name) / marker).is_file() for marker in ("dataset_dict.json", "state.json"))
    try:
        loaded = load_from_disk(name) if saved else load_dataset(name)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; each is "cannot load this name"
        raise DataError(f"dataset {name!r} is neither digits, an image folder, a table file, nor a data set "
                        f"that datasets.load_dataset can load ({type(err).__name__}: {err})") from None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def datasets_source(name: str, image_column: str = "image", label_column: str = "label", train_split: str = "train",
                    eval_split: str | None = None, test_fraction: float = 0.25,
                    class_map: dict | None = None) -> DataSource:
    """A hub id or local data set via ``datasets.load_dataset`` (e.g. Oxford-IIIT Pet)."""
    splits = _load_dataset_dict(name)
    _require_split(splits, train_split, f"data set {name!r}")
    eval_name = pick_eval_split(splits, eval_split, train_split, f"data set {name!r}")
    where = f"data set {name!r} "
    try:
        train, declared = dataset_rows(splits[train_split], train_split, image_column, label_column)
        if eval_name:
            held = dataset_rows(splits[eval_name], eval_name, image_column, label_column)[0]
        else:
            train, held = held_out_rows(train, None, test_fraction)
    except DataError as err:
        raise DataError(where + str(err)) from None
    names, train.labels, held.labels = resolve_labels(train.labels, held.labels, class_map or {},
                                                      f"{label_column!r} value", declared)
    return DataSource(name, "datasets", names, train, held)


# --------------------------------------------------------------------------- one entry point

def looks_like_path(name: str) -> bool:
    """A name meant as a local path (a hub id is ``owner/name``, with no leading ``.``, ``/`` or ``~``)."""
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in TABLE_EXTENSIONS or name.count("/") > 1


def describe_source(name: str = DIGITS, image_column: str = "image", label_column: str = "label",
                    train_split: str = "train", eval_split: str | None = None, test_fraction: float = 0.25,
                    class_map_file: str | None = None) -> DataSource:
    """The data set ``name`` read without decoding images: rows, class names, checks (``DataError``)."""
    class_map = read_class_map(class_map_file)
    if name == DIGITS:
        return _digits_source(test_fraction)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in TABLE_EXTENSIONS:
            raise DataError(f"{path} is a file but not a table: give a {'/'.join(TABLE_EXTENSIONS)} file or a folder")
        return table_source(path, image_column, label_column, train_split, eval_split, test_fraction, class_map)
    if path.is_dir():
        if not any(path.iterdir()):
            raise DataError(f"the data folder {str(path)!r} is empty")
        if is_image_folder(path):
            return folder_source(path, train_split, eval_split, test_fraction, class_map)
    elif looks_like_path(name):
        raise DataError(f"the data path {name!r} does not exist (from {Path.cwd()})")
    return datasets_source(name, image_column, label_column, train_split, eval_split, test_fraction, class_map)


def load_examples(name: str = DIGITS, split: str = TRAIN, size: int | None = None, seed: int = 0,
                  **source_options) -> ExampleSet:
    """One entry point for every data set; taught in notebook 04.

    ``split``: ``"train"`` or ``"test"`` (the held-out rows: ``eval_split``, a ``test``/``validation`` split,
    or a held-out share). ``size`` rows are used: a seeded sample, topped up in seeded order when rows of it
    are skipped as bad, so ``size`` good rows come out whenever the split has them. ``source_options`` are
    ``describe_source``'s (``RunConfig.data_options()`` gives them). A ``size`` above the split's usable rows
    (the seed's ``--train-size 4000`` on Pet's 3,680) takes all of them, and says so.
    """
    if name == DIGITS:
        examples = load_digits_examples(split, size, seed, source_options.get("test_fraction", 0.25))
    else:
        source = describe_source(name, **source_options)
        rows = source.rows(split)
        order = _sample_order(len(rows), size, seed)
        candidates = ({"image": rows.read(i), "label": rows.labels[i], "row": int(i)} for i in order)
        kept, skipped = validate_examples(candidates, source.class_names, name, rows.name, limit=size)
        examples = ExampleSet(name, rows.name, sorted(kept, key=lambda e: e["row"]), source.class_names, skipped)
    if size is not None and len(examples) < size:
        print(f"{name} {split}: {size} examples asked for, the split has {len(examples)} usable rows: using all of them")
    return examples


def _sample_order(n: int, size: int | None, seed: int) -> np.ndarray:
    """The seeded sample of ``size`` rows (``_take``), then every other row in a seeded order (top-ups)."""
    chosen = _take(np.arange(n), size, seed)
    rest = np.setdiff1d(np.arange(n), chosen)
    return np.concatenate([chosen, np.random.default_rng(seed + 1).permutation(rest)]).astype(int)
