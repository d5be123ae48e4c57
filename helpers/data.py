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
collide or hold one of Gemma 4's control tokens, fewer than two classes, a class with no training row, an
evaluation label training never saw, a held-out split with no rows); the runner calls it before the model
loads, and its ``fingerprint()`` goes into the run folder's manifest.

Images are told apart by content (a hash of their stored bytes), so one file listed twice, or one image
under two names, is one image: a held-out share is carved by image, not by row, and a held-out row whose
image training also has, or that an earlier held-out row already shows, is left out and counted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from helpers.chat import ALL_SPECIAL_TOKENS
from helpers.validation import ALSO_IN_TRAINING, REPEATED_IMAGE, validate_examples

log = logging.getLogger(__name__)

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
    the class list, a held-out image that training also has...); notebooks 04 and 05 print it and
    ``metrics.json`` records it.
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
    per row, how to read its image as stored, a short identity (a path, or a hash of the bytes) and its
    content key (``content_key``: ``None`` where nothing can be read, a missing file counted when loaded).

    ``dropped``: rows left out of this split, by skip reason (``drop_shared_images``); ``load_examples``
    adds them to the split's skip counts. ``repeats``: rows kept that show an image an earlier row shows.
    """

    name: str
    labels: list
    read: Callable[[int], object]
    identity: Callable[[int], str]
    content: list
    dropped: dict[str, int] = field(default_factory=dict)
    repeats: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices, name: str) -> SplitRows:
        indices = [int(i) for i in indices]
        return SplitRows(name, [self.labels[i] for i in indices], lambda k: self.read(indices[k]),
                         lambda k: self.identity(indices[k]), [self.content[i] for i in indices])

    def fingerprint(self) -> dict:
        """Name, row count, a hash of the rows' identities and labels, and one of their images' content keys
        (a difference there says an image changed under the same name)."""
        rows, content = hashlib.sha256(), hashlib.sha256()
        for i, label in enumerate(self.labels):
            rows.update(f"{self.identity(i)}\t{label}\n".encode())
            content.update(f"{self.content[i]}\n".encode())
        return {"name": self.name, "rows": len(self), "rows_sha256": rows.hexdigest(),
                "content_sha256": content.hexdigest()}

    def summary(self) -> str:
        notes = [f"{self.repeats} repeat an image of another row"] if self.repeats else []
        if self.dropped:
            notes.append("left out: " + ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()))
        return f"{self.name!r} {len(self)} row{'s' * (len(self) != 1)}" + (f" ({'; '.join(notes)})" if notes else "")


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
                f"{self.train.summary()}, held-out split {self.held_out.summary()}")


TRAIN, HELD_OUT = "train", "test"  # the two roles a run loads; "test" is the held-out rows, whatever their split
EVAL_SPLITS = ("test", "validation")  # looked for, in this order, when eval_split is None
CARVED_SPLIT = "held_out"  # the name of a held-out share carved from the training rows
SPLIT_SEED = 0  # the held-out share does not move with the training seed: runs stay comparable
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TABLE_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
SPLIT_COLUMN = "split"  # in a table file: each row's split, when the file holds more than one


def stratified_held_out(labels: list, test_fraction: float, seed: int = SPLIT_SEED,
                        groups: list | None = None) -> tuple[list, list]:
    """(training indices, held-out indices): ``test_fraction`` of each class held out, at least one image of
    each class kept for training (a class with one image is trained on, not held out).

    ``groups``: a key per row (``content_key``); rows with one key are one image and go to the same side, so
    a repeated image is never both trained on and scored. ``None`` keys are rows of their own. A group is
    stratified under its first row's label; with every key distinct this is a split of rows.
    """
    members: dict[int, list[int]] = {}  # first row of each image -> its rows
    first_row: dict = {}
    for i, key in enumerate(groups if groups is not None else [None] * len(labels)):
        members.setdefault(i if key is None else first_row.setdefault(key, i), []).append(i)
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for first in members:
        by_class.setdefault(labels[first], []).append(first)
    held = []
    for label in sorted(by_class, key=str):
        images = rng.permutation(by_class[label])
        for first in images[: min(round(len(images) * test_fraction), len(images) - 1)].tolist():
            held += members[first]
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def drop_shared_images(train: SplitRows, held: SplitRows) -> tuple[SplitRows, SplitRows]:
    """(training rows, held-out rows) with every held-out row left out whose image training also has
    (``also_in_training``) or an earlier held-out row already shows (``repeated_image``), counted in the
    held-out rows' ``dropped``; the training rows' repeats are counted in ``repeats`` and kept.

    A score on images the model was trained on measures memory, not learning, and an image scored twice
    weighs twice in accuracy: both leave the held-out split. Repeats stay in training, where repeating rows is
    a way to weight an image or a class; they are reported (``DataSource.summary``) in case they are a mistake.
    """
    trained, repeats = set(), 0
    for key in train.content:
        if key is not None:
            repeats += key in trained
            trained.add(key)
    train.repeats = repeats
    kept, scored, dropped = [], set(), Counter()
    for i, key in enumerate(held.content):
        if key is not None and key in trained:
            dropped[ALSO_IN_TRAINING] += 1
        elif key is not None and key in scored:
            dropped[REPEATED_IMAGE] += 1
        else:
            kept.append(i)
            scored.add(key)
    if dropped:
        held = held.subset(kept, held.name)
        held.dropped = dict(sorted(dropped.items()))
    return train, held


def _checked_source(name: str, kind: str, class_names: list[str], train: SplitRows, held: SplitRows,
                    carved: bool, test_fraction: float) -> DataSource:
    """The ``DataSource``, or ``DataError`` naming the held-out split when it has no row to score."""
    if not len(held):
        where = f"the held-out split {held.name!r} of {name!r}"
        if held.dropped:  # the first row of each image stays unless training has the image: all of them did
            reasons = ", ".join(f"{n} {reason}" for reason, n in held.dropped.items())
            raise DataError(f"{where} has no row left ({reasons}): every image in it is also in the training split "
                            f"{train.name!r} (the same file, or the same bytes under another name), and a score "
                            "on trained images measures memory, not learning; give it images of its own")
        if carved:
            raise DataError(f"{where} is empty: with test_fraction {test_fraction}, no class has enough distinct "
                            "images to hold one out (a class's last image is kept for training); add images or "
                            "give the data a test split")
        raise DataError(f"{where} has no rows: add images to it, or name another split in eval_split")
    return DataSource(name, kind, class_names, train, held)


def _digits_source(test_fraction: float = 0.25) -> DataSource:
    digits = load_digits()
    train_idx, test_idx = _stratified_split(digits.target, test_fraction, seed=0)
    every = SplitRows("all", [int(t) for t in digits.target], lambda i: digit_image(digits.data[i]), str,
                      [content_key(row) for row in digits.data])
    train, held = drop_shared_images(every.subset(train_idx, TRAIN), every.subset(test_idx, "test"))
    return _checked_source(DIGITS, "digits", list(DIGIT_NAMES), train, held, True, test_fraction)


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


# Text a class name must not hold: it is the answer the model learns to write. Gemma 4's special tokens
# (helpers.chat) are cut out of a generated answer before it is matched, and in a training answer they would
# be read as control tokens (a "<turn|>" ends the turn). Every Gemma 4 control token has the shape "<|name>",
# "<name|>" or "<|name|>", and checkpoints add new ones of it (tool calls, video), so "<|" and "|>" are refused
# as such; so are the "<start_of_...>"/"<end_of_...>" markers of the Gemma 3 chat format.
CONTROL_TEXT = re.compile("|".join([*(re.escape(t) for t in ALL_SPECIAL_TOKENS), r"<(?:start|end)_of_\w+>",
                                    r"<\|[^<>|]*\|?>", r"<[^<>|]*\|>", r"<\|", r"\|>"]))


def class_names_for(raw_names: list[str], class_map: dict[str, str], what: str) -> list[str]:
    """Each raw name renamed by ``class_map`` or tidied (``readable_class_name``); ``DataError`` when a map
    key names no class, when two classes end up with one name (case and spacing ignored, as matching is), or
    when a name holds a control token of the model (``CONTROL_TEXT``)."""
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
    for raw, name in zip(raw_names, names):
        token = CONTROL_TEXT.search(name)
        if token:
            raise DataError(f"class name {name!r}" + (f" ({what} {raw!r})" if raw != name else "")
                            + f" holds {token.group()!r}, which Gemma 4 reads as (part of) a control token, not "
                            "text: the model could not learn to write that answer; rename the class in a "
                            "class_map_file")
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
    if len(names) < 2:
        found = f"only {names[0]!r}" + (f" ({what} {declared[0]!r})" if declared[0] != names[0] else "") \
            if names else "none"
        raise DataError(f"a classifier needs at least two classes; this data has {found}: with one class every "
                        "answer is right and the accuracy says nothing. Add images of another class")
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
    """(training rows, held-out rows) carved from one split: ``test_fraction`` of each class's images, seeded."""
    train_idx, held_idx = stratified_held_out(rows.labels, test_fraction, groups=rows.content)
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
    rows = SplitRows(name, labels, lambda i: str(paths[i]), lambda i: paths[i].relative_to(root).as_posix(),
                     [content_key(p) for p in paths])
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
    carved = held is None
    if carved:
        train, held = held_out_rows(train, None, test_fraction)
    train, held = drop_shared_images(train, held)
    names, train.labels, held.labels = resolve_labels(train.labels, held.labels, class_map or {},
                                                      "class folder", declared)
    return _checked_source(str(root), "image folder", names, train, held, carved, test_fraction)


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


# The first bytes of the formats an image cell's base64 text may hold (JPEG, PNG, GIF, BMP, TIFF, WebP).
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
DATA_URI = re.compile(r"data:[\w.+/-]*(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")  # no "." nor "-": a file name with an extension never matches


def is_image_signature(data: bytes) -> bool:
    return data.startswith(IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_base64_image(text: str, strict: bool = True) -> bytes | None:
    """The bytes of an image written as text: a data URI (``data:image/png;base64,...``), or, when ``strict``
    is false (the cell says it holds bytes) or the text is base64 of a known image format, bare base64.
    ``None``: not image text (a path, say). A data URI whose payload is not base64 gives ``b""``, which
    reading counts as an unreadable image."""
    text = "".join(text.split())  # base64 is often wrapped at 76 characters
    uri = DATA_URI.match(text)
    if uri:
        text, strict = text[uri.end():], False
    elif strict and not BASE64_TEXT.fullmatch(text):
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None if strict else b""
    return data if not strict or is_image_signature(data) else None


def _table_image(value, folder: Path):
    """An image cell: a path (relative to the table's folder), bytes, base64 text (``decode_base64_image``),
    or ``{"bytes", "path"}`` (with ``bytes`` as bytes, base64 text or a list of byte values)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, str):
            return decode_base64_image(data, strict=False)
        if isinstance(data, list) and all(isinstance(b, int) and 0 <= b < 256 for b in data):
            return bytes(data)  # bytes as a JSON writer without base64 writes them
        if data is None and value.get("path"):
            value = value["path"]
    if isinstance(value, str) and value.strip():
        data = decode_base64_image(value)
        if data is not None and not (len(value) < 256 and (folder / value.strip()).is_file()):
            return data
        return str(folder / value.strip())  # an absolute path stays as it is
    return None if isinstance(value, float) else value  # NaN: an empty cell


def image_identity(value) -> str:
    """What names an image across machines: its path as written, else a hash of its bytes."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(value)).hexdigest()
    return str(value)


def content_key(value) -> str | None:
    """What tells one image from another: a hash of its stored bytes (a file's bytes, encoded bytes, an
    in-memory image's or array's pixels), so one file listed twice, or one image saved under two names, has
    one key. A re-encoded or resized copy has another (catching it would mean decoding every image).
    ``None`` when there is nothing to read (a missing file: counted as such when its row is loaded)."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (str, Path)):
        try:
            value = Path(value).read_bytes()
        except (OSError, ValueError):
            return None
    if isinstance(value, Image.Image):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        value = f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(value)).hexdigest()
    return None


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
    images = [_table_image(cell, path.parent) for cell in table[image_column]]
    # a path as written in the file (relative paths stay the same on another machine); bytes by their hash
    written = [image if isinstance(image, bytes) else None if isinstance(cell, float) else cell
               for cell, image in zip(table[image_column], images)]
    every = SplitRows("all", [_raw_label(v) for v in table[label_column]], images.__getitem__,
                      lambda i: image_identity(written[i]), [content_key(image) for image in images])
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
    carved = held is None
    if carved:
        train, held = held_out_rows(train, None, test_fraction)
    train, held = drop_shared_images(train, held)
    names, train.labels, held.labels = resolve_labels(train.labels, held.labels, class_map or {},
                                                      f"{label_column!r} value")
    return _checked_source(str(path), "table file", names, train, held, carved, test_fraction)


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
    content = [content_key(row[image_column]) for row in images]  # one pass, row by row: bytes stay on disk
    return SplitRows(split, labels, lambda i: images[i][image_column], lambda i: image_identity(images[i][image_column]),
                     content), list(declared) if declared else None


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
    train, held = drop_shared_images(train, held)
    names, train.labels, held.labels = resolve_labels(train.labels, held.labels, class_map or {},
                                                      f"{label_column!r} value", declared)
    return _checked_source(name, "datasets", names, train, held, not eval_name, test_fraction)


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
        skipped = dict(sorted((Counter(skipped) + Counter(rows.dropped)).items()))
        examples = ExampleSet(name, rows.name, sorted(kept, key=lambda e: e["row"]), source.class_names, skipped)
        if rows.repeats:
            log.warning("data set %r split %r: %d rows repeat an image of another row (kept: a repeat weights "
                        "an image more in training)", name, rows.name, rows.repeats)
    if size is not None and len(examples) < size:
        print(f"{name} {split}: {size} examples asked for, the split has {len(examples)} usable rows: using all of them")
    return examples


def _sample_order(n: int, size: int | None, seed: int) -> np.ndarray:
    """The seeded sample of ``size`` rows (``_take``), then every other row in a seeded order (top-ups)."""
    chosen = _take(np.arange(n), size, seed)
    rest = np.setdiff1d(np.arange(n), chosen)
    return np.concatenate([chosen, np.random.default_rng(seed + 1).permutation(rest)]).astype(int)
