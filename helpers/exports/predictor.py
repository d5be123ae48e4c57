"""Predict on your own images with a trained run: the class, its probability and the top 3. Taught in notebook 06.

The model is asked exactly as it was trained: the base and the run's adapter (or a merged folder written by
``helpers.export``), the run's prompt (question, system prompt, thinking; saved beside the adapter), its class
names and its image budget (``helpers.run.folder.read_run``). Each image gets constrained scoring
(``helpers.evaluation``, the path evaluation uses): the log-likelihood of every class name as the answer, turned
into probabilities by a softmax over the classes; ``generate`` adds the free-generation answer. A file that
cannot be used (missing, corrupt, truncated, not an image) gets the training path's validation
(``helpers.validation.to_rgb_image``): it is reported with the reason and skipped, and the others are predicted.
``python -m helpers.predict`` is the command.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from helpers.data import image_files
from helpers.evaluation import constrained_scores, generate_answers
from helpers.modeling import load_model, load_processor, nf4_config
from helpers.run.folder import RunFolderError, SavedRun, read_merged, read_run
from helpers.validation import MISSING_IMAGE, BadExampleError, to_rgb_image

OUTPUT_SUFFIXES = (".csv", ".jsonl")
TOP_K = 3


class PredictError(ValueError):
    """The inputs or the output cannot be used as given; the message names which."""


@dataclass
class Predictor:
    """A loaded model with everything needed to ask it as it was trained."""

    saved: SavedRun
    model: object
    processor: object


# The file of a saved model read before its weights: the config each loader parses first.
ADAPTER_CONFIG, MERGED_CONFIG = "adapter_config.json", "config.json"
LOAD_ERRORS = (json.JSONDecodeError, SafetensorError)  # what PEFT and transformers raise on a damaged file


def how_to_replace(saved: SavedRun) -> str:
    """What makes a damaged model folder whole again: training publishes an adapter, the export a merged folder."""
    if saved.adapter is not None:
        return (f"remove {saved.adapter} and rerun the training command (or notebook 04) with output_dir "
                f"{saved.folder}: it publishes the adapter again from the last checkpoint")
    return "export it again (python -m helpers.export --run RUN_DIR --merged DIR)"


def unreadable(path: Path) -> str | None:
    """Why a config file (a JSON object) or a safetensors file cannot be read, or None when it can. safetensors
    reads only the header and checks that the file covers every tensor it lists."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt"):
                return None
        return None if isinstance(json.loads(path.read_text()), dict) else "not a JSON object"
    except (OSError, ValueError, SafetensorError) as err:
        return " ".join(str(err).split())


def check_readable(saved: SavedRun) -> None:
    """The adapter (or merged folder) can be read: its config file is a JSON object and every safetensors file
    opens. ``RunFolderError`` names the file and what makes it whole, before any model loads; without this a
    damaged file ends in PEFT's or transformers' traceback after the base model has loaded."""
    folder = saved.adapter if saved.adapter is not None else Path(saved.folder)
    config_file = folder / (ADAPTER_CONFIG if saved.adapter is not None else MERGED_CONFIG)
    for path in (config_file, *sorted(folder.glob("*.safetensors"))):
        problem = unreadable(path)
        if problem:
            raise RunFolderError(f"{path} cannot be read ({problem}): {how_to_replace(saved)}")


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def read_saved(run_dir=None, merged_dir=None) -> SavedRun:
    """A run folder (``read_run``) or a merged folder (``read_merged``), checked readable (``check_readable``):
    ``RunFolderError`` naming the folder or the damaged file, before any model loads."""
    folder = Path(merged_dir or run_dir).expanduser()
    try:
        saved = read_merged(folder) if merged_dir else read_run(folder)
    except json.JSONDecodeError as err:  # a record of the folder (manifest, class names, prompt) is damaged
        damaged = [str(p) for p in sorted(folder.rglob("*.json")) if not _parses(p)] or [str(folder)]
        raise RunFolderError(f"{', '.join(damaged)} cannot be read ({err}): "
                             + ("export it again" if merged_dir else "rerun the training command with this "
                                "output_dir, or restore the file")) from None
    check_readable(saved)
    return saved


def load_predictor(saved: SavedRun, quantization: str | None = None) -> Predictor:
    """The base + adapter (a run) or the merged model, and the processor at the run's image budget.

    ``quantization`` defaults to the run's own (a QLoRA adapter is asked on the 4-bit base it was trained on)."""
    check_readable(saved)
    processor = load_processor(saved.model_path, saved.image_soft_tokens)
    if saved.adapter is None:
        return Predictor(saved, load_model(saved.model_path).eval(), processor)
    four_bit = (quantization or saved.config.quantization) == "4bit"
    base = load_model(saved.model_path, nf4_config(quantize_towers=saved.config.quantize_towers) if four_bit else None)
    return Predictor(saved, PeftModel.from_pretrained(base, saved.adapter).eval(), processor)


# -- inputs ----------------------------------------------------------------------------------------------

@dataclass
class Skipped:
    """An input that was not predicted, and why (a ``helpers.validation`` reason)."""

    path: str
    reason: str
    message: str


def image_paths(inputs) -> tuple[list[Path], list[Skipped]]:
    """Files as given and the image files inside folders (any depth, sorted); a missing path or an empty
    folder is reported, not fatal."""
    paths, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = image_files(item)
            paths += found
            if not found:
                skipped.append(Skipped(str(item), MISSING_IMAGE, f"the folder {str(item)!r} holds no image files"))
        elif item.exists():
            paths.append(item)
        else:
            skipped.append(Skipped(str(item), MISSING_IMAGE, f"{str(item)!r} does not exist"))
    return paths, skipped


def read_images(paths, progress: bool = True) -> tuple[list[dict], list[Skipped]]:
    """``[{"image": RGB image, "path": str}]`` for the usable files, and the others with their reason."""
    examples, skipped = [], []
    for path in tqdm(paths, desc="reading images", disable=not progress or len(paths) < 50):
        try:
            examples.append({"image": to_rgb_image(path, str(path)), "path": str(path)})
        except BadExampleError as err:
            skipped.append(Skipped(str(path), err.reason, str(err)))
    return examples, skipped


# -- predictions -----------------------------------------------------------------------------------------

@dataclass
class ImagePrediction:
    path: str
    prediction: str
    probability: float
    top: list[tuple[str, float]]  # the TOP_K most likely classes, with their probabilities
    generated: str | None = None  # the free-generation answer, with --generate


@dataclass
class PredictionReport:
    predictions: list[ImagePrediction]
    skipped: list[Skipped] = field(default_factory=list)


def class_probabilities(scores):
    """Softmax over the classes' log-likelihoods: how the model splits its belief among the class names."""
    return scores.float().softmax(dim=-1)


def predict_examples(predictor: Predictor, examples: list[dict], generate: bool = False, batch_size: int = 16,
                     top_k: int = TOP_K, progress: bool = True) -> list[ImagePrediction]:
    """Constrained scoring of ``examples`` (``{"image", "path"}``; no label needed), and optionally generation."""
    if not examples:
        return []
    saved = predictor.saved
    scores = constrained_scores(predictor.model, predictor.processor, examples, saved.class_names, batch_size,
                                progress, **saved.prompt)
    probabilities = class_probabilities(scores)
    best = probabilities.topk(min(top_k, len(saved.class_names)), dim=-1)
    texts = (generate_answers(predictor.model, predictor.processor, examples, saved.class_names, batch_size,
                              progress=progress, **saved.prompt) if generate else [None] * len(examples))
    predictions = []
    for example, values, indices, text in zip(examples, best.values.tolist(), best.indices.tolist(), texts):
        top = [(saved.class_names[i], p) for i, p in zip(indices, values)]
        predictions.append(ImagePrediction(example.get("path", ""), top[0][0], top[0][1], top, text))
    return predictions


def predict_images(predictor: Predictor, inputs, generate: bool = False, batch_size: int = 16,
                   progress: bool = True) -> PredictionReport:
    """Predict every image among ``inputs`` (files and folders); unusable files are skipped with their reason."""
    paths, missing = image_paths(inputs)
    examples, unreadable = read_images(paths, progress)
    return PredictionReport(predict_examples(predictor, examples, generate, batch_size, progress=progress),
                            missing + unreadable)


# -- output ----------------------------------------------------------------------------------------------

def describe(prediction: ImagePrediction) -> str:
    top = ", ".join(f"{name} {p:.3f}" for name, p in prediction.top)
    generated = f" | generated {prediction.generated!r}" if prediction.generated is not None else ""
    return f"{prediction.path}: {prediction.prediction} ({prediction.probability:.3f}) | top {len(prediction.top)}: {top}{generated}"


def output_rows(report: PredictionReport) -> list[dict]:
    """One row per input: predictions, then the skipped files with their reason (prediction left empty)."""
    rows = [{"path": p.path, "prediction": p.prediction, "probability": round(p.probability, 6),
             "top": [[name, round(prob, 6)] for name, prob in p.top], "generated": p.generated, "error": None}
            for p in report.predictions]
    rows += [{"path": s.path, "prediction": None, "probability": None, "top": [], "generated": None,
              "error": f"{s.reason}: {s.message}"} for s in report.skipped]
    return rows


def check_output_path(path) -> Path:
    """The output file, checked before anything loads: a .csv or .jsonl in a folder that exists."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise PredictError(f"--output {str(path)!r}: the file must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise PredictError(f"--output {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    return path


def write_predictions(report: PredictionReport, path) -> Path:
    """``.jsonl``: one JSON object per input; ``.csv``: the same, the top classes as ``name:p;name:p``."""
    path = check_output_path(path)
    rows = output_rows(report)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "top": ";".join(f"{name}:{p}" for name, p in row["top"])})
    return path
