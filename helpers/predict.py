"""Predict on your own images with a trained run: the class, its probability and the top 3. Taught in notebook 06.

    python -m helpers.predict --run runs/offline photo.jpg more_photos/
    python -m helpers.predict --model runs/offline/merged photo.jpg --generate --output predictions.csv

The model is asked exactly as it was trained: the base and the run's adapter (or a merged folder written
by ``helpers.export``), the run's prompt (question, system prompt, thinking; saved beside the adapter),
its class names and its image budget. Each image gets constrained scoring (``helpers.evaluation``, the
same path evaluation uses): the log-likelihood of every class name as the answer, turned into
probabilities by a softmax over the classes. ``--generate`` adds the free-generation answer.

Unlabelled images are the normal case. A file that cannot be used (missing, corrupt, truncated, not an
image) gets the training path's validation (``helpers.validation.to_rgb_image``): it is reported with
the reason and skipped, and the others are predicted.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from helpers.run_folder import ADAPTER, CLASS_NAMES, EXPORT_RECORD, MANIFEST, read_manifest

OUTPUT_SUFFIXES = (".csv", ".jsonl")
TOP_K = 3


class PredictError(ValueError):
    """The run folder, model folder, inputs or output cannot be used as given; the message names which."""


@dataclass
class SavedRun:
    """How a trained model is to be asked: what its run folder (or merged folder) recorded.

    ``model_path`` is the base model (with ``adapter``) or a merged folder (``adapter`` None)."""

    folder: Path
    config: object  # helpers.config.RunConfig
    class_names: list[str]
    prompt: dict  # question, system_prompt, enable_thinking (helpers.chat.PROMPT_FIELDS)
    model_path: str
    adapter: Path | None = None

    @property
    def image_soft_tokens(self) -> int | None:
        return self.config.image_soft_tokens


def _config_from(params: dict):
    from helpers.config import RunConfig

    return RunConfig.from_params({k: v for k, v in params.items() if k in RunConfig.field_names()})


def _class_names(folder: Path, fallback: list[str] | None) -> list[str]:
    path = folder / CLASS_NAMES
    if path.exists():
        return json.loads(path.read_text())
    if fallback:
        return list(fallback)
    raise PredictError(f"{folder} has no {CLASS_NAMES}: the class names the model was trained on are unknown")


def read_run(run_dir) -> SavedRun:
    """A run folder's adapter, base model, prompt and class names; ``PredictError`` naming what is missing."""
    from helpers.chat import load_prompt, prompt_settings
    from helpers.config import resolve_model_id

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise PredictError(f"run folder {str(run_dir)!r} does not exist")
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise PredictError(f"{run_dir} has no {MANIFEST}: not a run folder written by helpers.runner")
    adapter = run_dir / ADAPTER
    if not (adapter / "adapter_config.json").exists():
        raise PredictError(f"{run_dir} has no trained adapter ({adapter}): let the run finish first")
    config = _config_from(manifest["config"])
    prompt = load_prompt(adapter) or prompt_settings(config)
    class_names = _class_names(run_dir, manifest.get("data", {}).get("class_names"))
    return SavedRun(run_dir, config, class_names, prompt, resolve_model_id(config.model_id), adapter)


def read_merged(model_dir) -> SavedRun:
    """A merged folder written by ``helpers.export``: its record carries the run's settings."""
    from helpers.chat import load_prompt

    model_dir = Path(model_dir).expanduser()
    record_path = model_dir / EXPORT_RECORD
    if not record_path.exists():
        raise PredictError(f"{model_dir} has no {EXPORT_RECORD}: not a merged folder written by helpers.export "
                           "(give --run RUN_DIR for a run folder)")
    record = json.loads(record_path.read_text())
    prompt = load_prompt(model_dir) or record["prompt"]
    return SavedRun(model_dir, _config_from(record["config"]), _class_names(model_dir, None), prompt,
                    str(model_dir))


@dataclass
class Predictor:
    """A loaded model with everything needed to ask it as it was trained."""

    saved: SavedRun
    model: object
    processor: object


def load_predictor(saved: SavedRun, quantization: str | None = None) -> Predictor:
    """The base + adapter (a run) or the merged model, and the processor at the run's image budget.

    ``quantization`` defaults to the run's own (a QLoRA adapter is asked on the 4-bit base it was trained on)."""
    from peft import PeftModel

    from helpers.modeling import load_model, load_processor

    processor = load_processor(saved.model_path, saved.image_soft_tokens)
    if saved.adapter is None:
        return Predictor(saved, load_model(saved.model_path).eval(), processor)
    config = saved.config
    base = load_model(saved.model_path, quantization=quantization or config.quantization,
                      quantize_towers=config.quantize_towers)
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
    from helpers.data import _image_files
    from helpers.validation import MISSING_IMAGE

    paths, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = _image_files(item)
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
    from helpers.validation import BadExampleError, to_rgb_image

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
    from helpers.evaluation import constrained_scores, generate_answers

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files and folders of images")
    parser.add_argument("--run", help="a run folder (helpers.runner --output-dir): its base model + adapter")
    parser.add_argument("--model", help="a merged folder written by helpers.export --merged (no adapter, no PEFT)")
    parser.add_argument("--generate", action="store_true", help="also print the free-generation answer")
    parser.add_argument("--output", help="write the predictions to FILE.csv or FILE.jsonl")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantization", choices=("none", "4bit"), default=None,
                        help="load the base this way instead of as the run did (e.g. a QLoRA run on a CPU: none)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.run and not args.model:
            raise PredictError("give --run RUN_DIR (base + adapter) or --model MERGED_DIR")
        output = check_output_path(args.output) if args.output else None
        saved = read_merged(args.model) if args.model else read_run(args.run)
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: {saved.model_path}" + (f" + adapter {saved.adapter}" if saved.adapter else "")
          + f" | {len(saved.class_names)} classes | prompt {saved.prompt}")
    report = predict_images(load_predictor(saved, args.quantization), args.images, args.generate, args.batch_size)
    for prediction in report.predictions:
        print(describe(prediction))
    for skipped in report.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}: {skipped.message}")
    print(f"{len(report.predictions)} predicted, {len(report.skipped)} skipped")
    if output:
        print("wrote", write_predictions(report, output))
    return 0 if report.predictions else 1


if __name__ == "__main__":
    sys.exit(main())
