"""Evaluation: baseline vs fine-tuned accuracy by constrained scoring and by free generation.

Taught in notebook 05.
- **Constrained scoring** asks the model for the log-likelihood of every class name as the answer
  (``<class name><turn|>`` after the prompt) and picks the best: every prediction is a class name. The
  prompt (image included) runs once and its KV cache is reused for every class (``helpers.scoring``).
- **Free generation** decodes greedily and looks for a class name in the text (the longest one
  that occurs, as the seed does); an answer that names no class counts as wrong and is reported
  as the "no class named" rate.
The baseline is the same PEFT model with its adapter disabled, so only one copy is loaded.
``metrics.json`` is written by ``helpers.report.write_metrics``.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm  # text bars: a widget bar is saved at 0% in an executed notebook

from helpers.chat import answer_from_generation
from helpers.collator import VisionChatCollator
from helpers.scoring import score_class_names
from helpers.shards import compute_metrics


@dataclass
class Predictions:
    """One system's predictions on one split (class names, or None where no class was named)."""

    constrained: list[str]
    generated: list[str | None]
    generated_text: list[str]
    seconds: dict = field(default_factory=dict)


def batches(items, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def constrained_scores(model, processor, examples: list[dict], class_names: list[str], batch_size: int = 32,
                       progress: bool = True, **collator_kwargs) -> torch.Tensor:
    """A (n_examples, n_classes) matrix of class-name log-likelihoods (``helpers.scoring``: the prompt runs
    once and its KV cache scores every class name)."""
    collator = VisionChatCollator(processor, class_names, mode="eval", padding_side="left", **collator_kwargs)
    rows = []
    for chunk in tqdm(list(batches(examples, batch_size)), desc="constrained scoring", disable=not progress):
        rows.append(score_class_names(model, processor, collator(chunk), class_names).cpu())
    return torch.cat(rows)


def match_class_name(text: str, class_names: list[str]) -> str | None:
    """The longest class name that occurs in ``text`` as whole words (case-insensitive), else None."""
    found = [name for name in class_names
             if re.search(r"(?<!\w)" + re.escape(name.lower()) + r"(?!\w)", text.lower())]
    return max(found, key=len) if found else None


@torch.no_grad()
def generate_answers(model, processor, examples: list[dict], class_names: list[str], batch_size: int = 32,
                     max_new_tokens: int | None = None, progress: bool = True, **collator_kwargs) -> list[str]:
    """Greedy answers as text (left-padded prompts, as generation needs): with thinking on, what follows the
    thought channel (``helpers.chat.answer_from_generation``)."""
    collator = VisionChatCollator(processor, class_names, mode="eval", padding_side="left", **collator_kwargs)
    tokenizer = processor.tokenizer
    if max_new_tokens is None:  # room for the longest class name and the closing marker (and a thought)
        max_new_tokens = max(len(tokenizer(n, add_special_tokens=False).input_ids) for n in class_names) + 2
        max_new_tokens += 64 if collator.chat.enable_thinking else 0
    texts = []
    for chunk in tqdm(list(batches(examples, batch_size)), desc="generation", disable=not progress):
        batch = {k: v.to(model.device) for k, v in collator(chunk).items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        texts += [answer_from_generation(text, tokenizer) for text in tokenizer.batch_decode(new_tokens)]
    return texts


def predict(model, processor, examples, class_names, batch_size: int = 32, progress: bool = True,
            **collator_kwargs) -> Predictions:
    """Constrained and generated predictions of ``model`` on ``examples``, with their wall times."""
    start = time.perf_counter()
    scores = constrained_scores(model, processor, examples, class_names, batch_size, progress, **collator_kwargs)
    middle = time.perf_counter()
    texts = generate_answers(model, processor, examples, class_names, batch_size, progress=progress,
                             **collator_kwargs)
    end = time.perf_counter()
    return Predictions(constrained=[class_names[i] for i in scores.argmax(dim=1).tolist()],
                       generated=[match_class_name(t, class_names) for t in texts], generated_text=texts,
                       seconds={"constrained": middle - start, "generation": end - middle})


def adapter_disabled(model):
    """A context in which a PEFT model behaves as its base model (the baseline)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def metrics_for(predictions: Predictions, labels: list[str], class_names: list[str]) -> dict:
    """Metrics of both prediction methods; the generation's "no class named" rate included."""
    generated = compute_metrics(labels, predictions.generated, class_names)
    generated["no_class_named_rate"] = generated["unparsed"] / generated["n"] if generated["n"] else None
    return {"constrained": compute_metrics(labels, predictions.constrained, class_names),
            "generation": generated, "seconds": predictions.seconds}


def confusion_matrix(labels: list[str], predictions: list[str | None], class_names: list[str]):
    """Rows: true class; columns: predicted class (predictions naming no class are left out)."""
    import numpy as np

    index = {name: i for i, name in enumerate(class_names)}
    matrix = np.zeros((len(class_names), len(class_names)), dtype=int)
    for true, pred in zip(labels, predictions):
        if pred in index:
            matrix[index[true], index[pred]] += 1
    return matrix
