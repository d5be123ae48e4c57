"""Bad inputs: every image made a safe RGB picture, every row checked; bad rows skipped and counted.

Taught in notebook 04 (the data section prints what was skipped) and reported in ``metrics.json``.
Data sets in the wild carry corrupt or truncated files, CMYK/RGBA/palette/16-bit/greyscale images,
huge scans and labels that are not in the class list. The rule here: an image that can be read is
converted to 8-bit RGB and, when huge, shrunk while it is decoded (a JPEG is decoded at 1/2, 1/4 or
1/8 scale, so a 12,000 × 12,000 photo never occupies 400 MB); a row that cannot be used is skipped,
counted under a reason, and the first of each reason is logged with the row named. Nothing bad is
trained on silently, and a split with nothing left is an error naming the data set and split.

This module imports only Pillow and NumPy, so the loaders stay light. Notebook 04 writes the counts into the run
folder (``helpers.run.folder.write_skipped``), for notebook 05's metrics.json.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Gemma 4's largest image budget (1,120 soft tokens × 3² pooled patches × 16² pixels) is about 2.6 M
# pixels, 1,606² for a square: a longest side of 2,048 loses nothing the processor would keep.
MAX_SIDE = 2048
# Refuse to decode more pixels than this (after JPEG draft scaling): Pillow's own decompression-bomb
# threshold (89.5 M pixels, ~270 MB as RGB). Images beyond it that cannot be decoded at a reduced
# scale (PNG, TIFF...) are skipped as "too_large".
MAX_DECODE_PIXELS = 89_478_485

# Skip reasons, as counted in ExampleSet.skipped and metrics.json.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"  # corrupt bytes, truncated file, not an image
EMPTY_IMAGE = "empty_image"  # zero width or height
TOO_LARGE = "too_large"  # more than MAX_DECODE_PIXELS even at the smallest decoding scale
UNSUPPORTED_IMAGE = "unsupported_image"  # a mode or type that cannot be made RGB
MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"  # not an integer
LABEL_OUT_OF_RANGE = "label_out_of_range"  # not an index into the class list
EMPTY_ANSWER = "empty_answer"  # an explicit "answer" that is not a non-empty string
# Held-out rows left out before loading (helpers.data.drop_shared_images), by content, not by name:
ALSO_IN_TRAINING = "also_in_training"  # its image is also a training image
REPEATED_IMAGE = "repeated_image"  # an earlier held-out row shows the same image

EXIF_ORIENTATION = 0x0112  # 1: upright; 6: a phone held upright (rotate 90° clockwise to view)


class BadExampleError(ValueError):
    """One example cannot be used; ``reason`` is the skip counter's key, the message names the sample."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class EmptySplitError(ValueError):
    """A split has no usable example (empty, or every row was skipped)."""


def _open(value, where: str) -> Image.Image:
    """An ``Image`` from what data sets hold: a PIL image, bytes, a path, ``{"bytes", "path"}``, an array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise BadExampleError(MISSING_IMAGE, f"{where}: the image has neither bytes nor a path")
        value = data if data is not None else path
    if value is None:
        raise BadExampleError(MISSING_IMAGE, f"{where}: no image")
    if isinstance(value, np.ndarray):
        try:
            return Image.fromarray(value)
        except (TypeError, ValueError) as err:
            raise BadExampleError(UNSUPPORTED_IMAGE, f"{where}: an array of shape {value.shape} and dtype "
                                                     f"{value.dtype} is not an image ({err})") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        source, what = io.BytesIO(bytes(value)), f"its {len(value)} bytes"
    elif isinstance(value, (str, Path)):
        source, what = str(value), f"the file {str(value)!r}"
    else:
        raise BadExampleError(UNSUPPORTED_IMAGE, f"{where}: a {type(value).__name__} is not an image")
    try:
        with warnings.catch_warnings():  # our own pixel limit applies below, after draft scaling
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as err:
        raise BadExampleError(TOO_LARGE, f"{where}: {what}: {err}") from None
    except FileNotFoundError:
        raise BadExampleError(MISSING_IMAGE, f"{where}: {what} does not exist") from None
    except UnidentifiedImageError:
        raise BadExampleError(UNREADABLE_IMAGE, f"{where}: {what}: in no image format Pillow reads "
                                                "(corrupt or not an image)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadExampleError(UNREADABLE_IMAGE, f"{where}: {what} cannot be read as an image "
                                                f"({type(err).__name__}: {err})") from None


def _eight_bit_grey(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) greyscale as 8-bit ``L``.

    ``convert("L")`` would clip a 16-bit image to white; scale it instead (65,535 -> 255). ``I`` and ``F``
    carry no declared range: 0..1, 0..255 or 0..65,535, whichever holds the data, else the image's maximum.
    """
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max(initial=0))
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        top = next((t for t in ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0) if peak <= t), peak)
    return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels onto white (what a viewer shows), not onto whatever colour they happen to hold."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def to_rgb_image(value, where: str = "sample", max_side: int = MAX_SIDE,
                 max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """A loaded 8-bit RGB ``PIL.Image`` no larger than ``max_side`` on its longest side.

    Accepts a PIL image, encoded bytes, a file path, a ``{"bytes", "path"}`` dict (what ``datasets``
    gives with ``decode=False``) or a NumPy array. Raises ``BadExampleError`` naming ``where`` when the
    value is missing, corrupt, truncated, empty, too large to decode safely, or not an image.
    CMYK, RGBA/LA (flattened onto white), palette, 1-bit, 16-bit and greyscale images are converted.
    """
    image = _open(value, where)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadExampleError(EMPTY_IMAGE, f"{where}: the image is {width}×{height}")
    if max(width, height) > max_side:
        image.draft(None, (max_side, max_side))  # JPEG: decode at 1/2..1/8 scale; a no-op otherwise
    # An image still to be decoded is refused above max_pixels; one already in memory is only shrunk.
    still_encoded = image is not value or bool(getattr(image, "tile", None))
    if still_encoded and image.size[0] * image.size[1] > max_pixels:
        raise BadExampleError(TOO_LARGE, f"{where}: {width}×{height} pixels is more than {max_pixels:,} to "
                                         f"decode (only JPEGs can be decoded at a reduced scale)")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:  # "image file is truncated", broken data stream...
        raise BadExampleError(UNREADABLE_IMAGE, f"{where}: the {image.format or ''} image cannot be decoded "
                                                f"({type(err).__name__}: {err})") from None
    if max(image.size) > max_side:
        image = image.copy() if image is value else image  # never shrink the caller's own image in place
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    image = upright(image)
    try:
        if image.mode == "RGB":
            return image
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            return _eight_bit_grey(image).convert("RGB")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
            return _flatten_alpha(image)
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except (OSError, ValueError) as err:
        raise BadExampleError(UNSUPPORTED_IMAGE, f"{where}: a {image.mode} image cannot be converted to RGB "
                                                 f"({err})") from None


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: a phone photo's EXIF orientation applied, as ``datasets``' own
    decoding does (``ImageOps.exif_transpose``); an image without the tag is returned as it is."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def check_label(label, n_classes: int, where: str) -> int:
    """The label as an ``int`` index into the class list, or ``BadExampleError``."""
    if label is None:
        raise BadExampleError(MISSING_LABEL, f"{where}: no label")
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise BadExampleError(BAD_LABEL, f"{where}: label {label!r} is not an integer class index")
    if int(label) == -1:  # the datasets convention for an unlabelled row
        raise BadExampleError(MISSING_LABEL, f"{where}: label -1 (no label)")
    if not 0 <= int(label) < n_classes:
        raise BadExampleError(LABEL_OUT_OF_RANGE, f"{where}: label {int(label)} is outside the class list "
                                                  f"(0..{n_classes - 1}, {n_classes} classes)")
    return int(label)


def check_example(example: dict, n_classes: int, where: str) -> dict:
    """One row as ``{"image": RGB image, "label": int, ...}`` (other keys kept), or ``BadExampleError``."""
    label = check_label(example.get("label"), n_classes, where)
    if "answer" in example and (not isinstance(example["answer"], str) or not example["answer"].strip()):
        raise BadExampleError(EMPTY_ANSWER, f"{where}: the answer {example['answer']!r} is empty")
    return {**example, "image": to_rgb_image(example.get("image"), where), "label": label}


def validate_examples(examples, class_names, name: str, split: str,
                      limit: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """(good examples, skipped counts by reason). Taught in notebook 04.

    Each good example gains ``"row"``, its index in ``examples`` (unless it has one: its row in the
    source), so a later error can name it. Each bad row is skipped and counted; the first row of each
    reason is logged (a warning naming the data set, split and row). With ``limit``, reading stops once
    that many good rows are kept. Raises ``EmptySplitError`` when no row is left.
    """
    good, skipped = [], Counter()
    n = 0
    for n, example in enumerate(examples, 1):
        if limit is not None and len(good) >= limit:
            break
        row = example.get("row", n - 1) if isinstance(example, dict) else n - 1
        where = f"data set {name!r} split {split!r} row {row}"
        try:
            if not isinstance(example, dict):
                raise BadExampleError(MISSING_IMAGE, f"{where}: a {type(example).__name__}, not a row")
            # "row": its place in the loaded split, which errors at training time name (helpers.collator)
            good.append({**check_example(example, len(class_names), where), "row": row})
        except BadExampleError as err:
            if not skipped[err.reason]:
                log.warning("skipping %s (the first %r row; all are counted)", err, err.reason)
            skipped[err.reason] += 1
    if not good:
        detail = f"all {n} rows were skipped: {dict(sorted(skipped.items()))}" if n else "it has no rows"
        raise EmptySplitError(f"data set {name!r} split {split!r} has no usable example: {detail}")
    return good, dict(sorted(skipped.items()))


def skipped_summary(*example_sets) -> dict:
    """``{split: {"kept": n, "skipped": {reason: count}, "n_skipped": total}}`` for metrics.json."""
    return {s.split: {"kept": len(s), "skipped": dict(s.skipped), "n_skipped": sum(s.skipped.values())}
            for s in example_sets}


def skip_report(*example_sets) -> str:
    """One line per split: how many examples were kept and what was skipped, and why."""
    lines = []
    for s in example_sets:
        what = ", ".join(f"{count} {reason}" for reason, count in s.skipped.items()) or "none"
        lines.append(f"{s.name} {s.split}: kept {len(s)}, skipped {sum(s.skipped.values())} ({what})")
    return "\n".join(lines)
