"""Parity of exported models: do they still predict what the adapter predicted? Taught in notebook 06.

Each engine predicts the run's held-out rows; ``parity_table`` compares them method by method with
(1) transformers + adapter: agreement is the share of rows where an engine picks the same class as (1).
Constrained scoring needs the model's log-likelihoods, so only the transformers engines have it; every
engine has free generation (greedy, matched to a class name). ``benchmarks/export_parity.py`` is the CLI.

llama.cpp is asked through ``llama-server`` two ways (``helpers.exports.llama_cpp.Server``): its chat endpoint, as
a client would, and its raw completion endpoint with the prompt transformers renders (the training prompt).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from transformers import AutoProcessor

from helpers.chat import render_generation_prompt, special_token, to_messages
from helpers.evaluation import evaluate, match_class_name
from helpers.exports import llama_cpp
from helpers.exports.merge import share_equal
from helpers.exports.predictor import load_predictor
from helpers.run.folder import EXPORT_RECORD

ADAPTER_ENGINE, MERGED_ENGINE = "transformers + adapter", "transformers + merged"
LLAMA_CPP_ENGINE = "llama.cpp, training prompt"  # llama-server /completion with transformers' rendered prompt
LLAMA_CPP_CHAT_ENGINE = "llama.cpp, chat endpoint"  # llama-server /v1/chat/completions
METHODS = ("constrained", "generation")


def transformers_engine(saved, examples) -> dict:
    """Both methods through ``helpers.evaluation.evaluate`` (the path notebook 05 evaluates with)."""
    predictor = load_predictor(saved)
    result = evaluate(predictor.model, predictor.processor, examples, saved.class_names, batch_size=16,
                     progress=False, **saved.prompt)
    return {"constrained": result.constrained, "generation": result.generated, "seconds": result.seconds}


def training_prompt_text(merged_dir, prompt: dict) -> str:
    """The generation prompt transformers renders for the run (its chat template, system turn and thinking
    setting), with llama.cpp's image marker where the processor would expand ``<|image|>``, and without the
    leading BOS (llama.cpp adds the model's own)."""
    processor = AutoProcessor.from_pretrained(merged_dir)
    text = render_generation_prompt(processor, to_messages(prompt["question"], system=prompt.get("system_prompt")),
                                    enable_thinking=bool(prompt.get("enable_thinking")))
    text = text.replace(special_token(processor.tokenizer, "image_token"), llama_cpp.MEDIA_MARKER, 1)
    bos = processor.tokenizer.bos_token or "<bos>"
    return text.removeprefix(bos)


def llama_cpp_engines(gguf_dir, server_binary, examples, max_tokens: int = 16) -> dict:
    """Greedy answers of ``llama-server`` on the GGUF export, with the export's prompt and image-token limits:
    ``LLAMA_CPP_ENGINE`` (the training prompt, raw completion endpoint) and ``LLAMA_CPP_CHAT_ENGINE`` (the chat
    endpoint). Each result carries the prompt text the server saw (the image as ``MEDIA_MARKER``)."""
    gguf_dir = Path(gguf_dir)
    record = json.loads((gguf_dir / EXPORT_RECORD).read_text())
    files, prompt, classes = record["files"], record["prompt"], record["class_names"]
    training_prompt = training_prompt_text(record["merged"], prompt)
    results = {LLAMA_CPP_ENGINE: {"text": [], "prompt": training_prompt},
               LLAMA_CPP_CHAT_ENGINE: {"text": []}}
    with tempfile.TemporaryDirectory() as tmp, llama_cpp.Server(
            server_binary, gguf_dir / files["text"], gguf_dir / files["projector"], record["image_soft_tokens"],
            bool(prompt.get("enable_thinking"))) as server:
        results[LLAMA_CPP_CHAT_ENGINE]["prompt"] = server.chat_prompt(prompt)
        images = []
        for i, example in enumerate(examples):
            images.append(Path(tmp) / f"{i}.png")
            example["image"].save(images[-1])
        for engine, ask in ((LLAMA_CPP_ENGINE, lambda image: server.complete(image, training_prompt, max_tokens)),
                            (LLAMA_CPP_CHAT_ENGINE, lambda image: server.chat(image, prompt, max_tokens))):
            start = time.perf_counter()
            results[engine]["text"] = [ask(image) for image in images]
            results[engine]["seconds"] = {"generation": time.perf_counter() - start}
    for result in results.values():
        result["generation"] = [match_class_name(t, classes) for t in result["text"]]
    return results


def parity_table(engines: dict, labels: list[str]) -> list[dict]:
    """One row per engine and method: accuracy, and agreement with ``ADAPTER_ENGINE`` by the same method."""
    reference = engines[ADAPTER_ENGINE]
    return [{"engine": engine, "method": method, "n": len(labels), "accuracy": share_equal(result[method], labels),
             "agreement": share_equal(result[method], reference[method])}
            for engine, result in engines.items() for method in METHODS if method in result]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'engine':<28} {'method':<12} {'accuracy':>9} {'agreement with (1)':>19}"]
    lines += [f"{r['engine']:<28} {r['method']:<12} {r['accuracy']:>9.3f} {r['agreement']:>19.3f}" for r in rows]
    return "\n".join(lines)
