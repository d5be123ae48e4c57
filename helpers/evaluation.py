"""Evaluation: baseline vs fine-tuned, by constrained scoring and by free generation. Taught in notebook 05.

- **Constrained scoring** asks the model for the log-likelihood of every class name as the answer
  (``<class name><turn|>`` after the prompt) and picks the best: every prediction is a class name. The
  prompt (image included) runs once, with every class name in the same pass (``helpers.scoring``).
- **Free generation** decodes greedily and looks for a class name in the text (the longest one
  that occurs, as the seed does); an answer that names no class counts as wrong and is reported
  as the "no class named" rate.
The baseline is the same PEFT model with its adapter disabled, so only one copy is loaded. The metrics are
scikit-learn's (``compute_metrics``); ``metrics.json`` is written by ``helpers.run.report.write_metrics``.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import f1_score, precision_recall_fscore_support
from tqdm import tqdm  # text bars: a widget bar is saved at 0% in an executed notebook

from helpers.chat import answer_from_generation
from helpers.collator import VisionChatCollator
from helpers.scoring import score_class_names

NO_CLASS = ""  # what a prediction that names no class is, for scikit-learn (class names are never empty)


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


def _bar(progress) -> tuple[bool, str]:
    """``progress``: False (no bar), True, or the name the bar starts with (``"baseline"``)."""
    return progress is False, f"{progress}: " if isinstance(progress, str) else ""


def constrained_scores(model, processor, examples: list[dict], class_names: list[str], batch_size: int = 32,
                       progress: bool | str = True, **collator_kwargs) -> torch.Tensor:
    """A (n_examples, n_classes) matrix of class-name log-likelihoods (``helpers.scoring``: the prompt runs once,
    with every class name in the same pass). ``progress``: a text bar, named when a name is given."""
    collator = VisionChatCollator(processor, class_names, mode="eval", padding_side="left", **collator_kwargs)
    off, name = _bar(progress)
    rows = []
    for chunk in tqdm(list(batches(examples, batch_size)), desc=name + "constrained scoring", disable=off):
        rows.append(score_class_names(model, processor, collator(chunk), class_names).cpu())
    return torch.cat(rows)


def match_class_name(text: str, class_names: list[str]) -> str | None:
    """The longest class name that occurs in ``text`` as whole words (case-insensitive), else None."""
    found = [name for name in class_names
             if re.search(r"(?<!\w)" + re.escape(name.lower()) + r"(?!\w)", text.lower())]
    return max(found, key=len) if found else None


@torch.no_grad()
def generate_answers(model, processor, examples: list[dict], class_names: list[str], batch_size: int = 32,
                     max_new_tokens: int | None = None, progress: bool | str = True, **collator_kwargs) -> list[str]:
    """Greedy answers as text (left-padded prompts, as generation needs): with thinking on, what follows the
    thought channel (``helpers.chat.answer_from_generation``)."""
    collator = VisionChatCollator(processor, class_names, mode="eval", padding_side="left", **collator_kwargs)
    tokenizer = processor.tokenizer
    if max_new_tokens is None:  # room for the longest class name and the closing marker (and a thought)
        max_new_tokens = max(len(tokenizer(n, add_special_tokens=False).input_ids) for n in class_names) + 2
        max_new_tokens += 64 if collator.chat.enable_thinking else 0
    off, name = _bar(progress)
    texts = []
    for chunk in tqdm(list(batches(examples, batch_size)), desc=name + "generation", disable=off):
        batch = {k: v.to(model.device) for k, v in collator(chunk).items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        texts += [answer_from_generation(text, tokenizer) for text in tokenizer.batch_decode(new_tokens)]
    return texts


def evaluate(model, processor, examples, class_names, batch_size: int = 32, progress: bool | str = True,
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


def compute_metrics(labels: list[str], predictions: list[str | None], class_names: list[str]) -> dict:
    """Accuracy, per-class accuracy (= recall), precision, F1, macro-F1 and counts, from scikit-learn.

    A prediction of ``None`` (or a name outside ``class_names``) names no class: it is wrong, and counted in
    ``unparsed``. Macro-F1 averages over the classes present in ``labels`` (a class that is never the answer has
    no recall); a class without support has ``accuracy`` and ``f1`` None."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    unknown = sorted({label for label in labels if label not in class_names})
    if unknown:
        raise ValueError(f"labels not in class_names: {unknown[:5]}")
    known = set(class_names)
    named = [p if p in known else NO_CLASS for p in predictions]
    n = len(labels)
    if not n:
        return {"n": 0, "correct": 0, "accuracy": None, "macro_f1": None, "unparsed": 0,
                "per_class": {c: {"support": 0, "correct": 0, "predicted": 0, "accuracy": None, "precision": 0.0,
                                  "f1": None} for c in class_names}}
    matrix = sklearn_confusion_matrix(labels, named, labels=class_names)  # rows naming no class are left out
    precision, recall, f1, support = precision_recall_fscore_support(labels, named, labels=class_names,
                                                                     zero_division=0)
    present = [c for c, count in zip(class_names, support) if count]
    per_class = {c: {"support": int(support[i]), "correct": int(matrix[i, i]), "predicted": int(matrix[:, i].sum()),
                     "accuracy": float(recall[i]) if support[i] else None, "precision": float(precision[i]),
                     "f1": float(f1[i]) if support[i] else None} for i, c in enumerate(class_names)}
    correct = int(np.trace(matrix))
    return {"n": n, "correct": correct, "accuracy": correct / n,
            "macro_f1": float(f1_score(labels, named, labels=present, average="macro", zero_division=0)),
            "unparsed": sum(p == NO_CLASS for p in named), "per_class": per_class}


def metrics_for(predictions: Predictions, labels: list[str], class_names: list[str]) -> dict:
    """Metrics of both prediction methods; the generation's "no class named" rate included."""
    generated = compute_metrics(labels, predictions.generated, class_names)
    generated["no_class_named_rate"] = generated["unparsed"] / generated["n"] if generated["n"] else None
    return {"constrained": compute_metrics(labels, predictions.constrained, class_names),
            "generation": generated, "seconds": predictions.seconds}


def metrics_by_system(labels: list[str], predictions: dict, class_names: list[str]) -> dict:
    """``{system: {"constrained": compute_metrics(...)}}``: constrained-scoring predictions per system, in the
    shape ``helpers.run.report.write_metrics`` takes (the launcher and the shard merge score constrained only)."""
    return {name: {"constrained": compute_metrics(labels, preds, class_names)} for name, preds in predictions.items()}


def confusion_matrix(labels: list[str], predictions: list[str | None], class_names: list[str]) -> np.ndarray:
    """Rows: true class; columns: predicted class (predictions naming no class are left out)."""
    return sklearn_confusion_matrix(labels, [p if p in class_names else NO_CLASS for p in predictions],
                                    labels=class_names)
