"""Parity of exported models: do they still predict what the adapter predicted? Taught in notebook 06.

Each engine predicts the run's held-out rows; ``parity_table`` compares them method by method with
(1) transformers + adapter: agreement is the share of rows where an engine picks the same class as (1).
Constrained scoring needs the model's log-likelihoods, so only the transformers engines have it; every
engine has free generation (greedy, matched to a class name). ``benchmarks/export_parity.py`` is the CLI.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from helpers import llama_cpp
from helpers.evaluation import match_class_name, predict
from helpers.predict import load_predictor
from helpers.run_folder import EXPORT_RECORD

ADAPTER_ENGINE, MERGED_ENGINE, LLAMA_CPP_ENGINE = "transformers + adapter", "transformers + merged", "llama.cpp"
METHODS = ("constrained", "generation")


def transformers_engine(saved, examples) -> dict:
    """Both methods through ``helpers.evaluation.predict`` (the path notebook 05 evaluates with)."""
    predictor = load_predictor(saved)
    result = predict(predictor.model, predictor.processor, examples, saved.class_names, batch_size=16,
                     progress=False, **saved.prompt)
    return {"constrained": result.constrained, "generation": result.generated, "seconds": result.seconds}


def llama_cpp_engine(gguf_dir, binary, examples) -> dict:
    """Greedy answers of ``llama-mtmd-cli`` on the GGUF export, one process per image, with the export's
    prompt and image-token limits (``helpers.llama_cpp.generate``)."""
    gguf_dir = Path(gguf_dir)
    record = json.loads((gguf_dir / EXPORT_RECORD).read_text())
    files = record["files"]
    texts, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, example in enumerate(examples):
            image = Path(tmp) / f"{i}.png"
            example["image"].save(image)
            texts.append(llama_cpp.generate(binary, gguf_dir / files["text"], gguf_dir / files["projector"], image,
                                            record["prompt"], record["image_soft_tokens"]))
    return {"generation": [match_class_name(t, record["class_names"]) for t in texts], "text": texts,
            "seconds": {"generation": time.perf_counter() - start}}


def share_equal(first, second) -> float:
    return sum(a == b for a, b in zip(first, second)) / len(first) if first else float("nan")


def parity_table(engines: dict, labels: list[str]) -> list[dict]:
    """One row per engine and method: accuracy, and agreement with ``ADAPTER_ENGINE`` by the same method."""
    reference = engines[ADAPTER_ENGINE]
    return [{"engine": engine, "method": method, "n": len(labels), "accuracy": share_equal(result[method], labels),
             "agreement": share_equal(result[method], reference[method])}
            for engine, result in engines.items() for method in METHODS if method in result]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'engine':<24} {'method':<12} {'accuracy':>9} {'agreement with (1)':>19}"]
    lines += [f"{r['engine']:<24} {r['method']:<12} {r['accuracy']:>9.3f} {r['agreement']:>19.3f}" for r in rows]
    return "\n".join(lines)
