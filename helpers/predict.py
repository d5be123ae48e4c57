"""Predict on your own images with a trained run: the class, its probability and the top 3.

    python -m helpers.predict --run runs/offline photo.jpg more_photos/
    python -m helpers.predict --model runs/offline/merged photo.jpg --generate --output predictions.csv

``--run``: a run folder (its base model + adapter); ``--model``: a merged folder written by ``helpers.export``.
The model is asked as it was trained (``helpers.exports.predictor``); unusable files are reported and skipped.
A run or merged folder that cannot be used (missing, or a damaged adapter) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from helpers.exports.predictor import (
    LOAD_ERRORS,
    PredictError,
    check_output_path,
    describe,
    how_to_replace,
    load_predictor,
    predict_images,
    read_saved,
    write_predictions,
)
from helpers.run.folder import RunFolderError


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
        saved = read_saved(args.run, args.model)
    except (PredictError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: {saved.model_path}" + (f" + adapter {saved.adapter}" if saved.adapter else "")
          + f" | {len(saved.class_names)} classes | prompt {saved.prompt}")
    try:
        predictor = load_predictor(saved, args.quantization)
    except LOAD_ERRORS as err:  # a file damaged in a way check_readable does not see
        print(f"error: {saved.adapter or saved.folder} cannot be loaded ({type(err).__name__}: "
              f"{' '.join(str(err).split())}): {how_to_replace(saved)}", file=sys.stderr)
        return 2
    report = predict_images(predictor, args.images, args.generate, args.batch_size)
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
