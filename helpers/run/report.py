"""``metrics.json``: one writer and one schema for every entry point.

Notebook 05 (one process, or one shard of a Cloud Run evaluation), the multi-GPU launcher
(``helpers.launch``) and the shard merge (``python -m helpers.run.shards merge``) all call ``write_metrics``,
so a dashboard reads the same keys whichever wrote the file::

    {"summary": {"baseline_accuracy", "baseline_macro_f1", "baseline_generation_accuracy",
                 "baseline_no_class_named_rate", "finetuned_accuracy", ..., "n_eval", "n_skipped"},
     "model_id", "model_path", "dataset", "train_size", "eval_size", "optimizer_steps",
     "peak_memory_bytes", "peak_memory_kind", "wall_seconds": {"train", ...},
     "shard": {"index", "count"}, "processes", "skipped", "prompt",
     "metrics": {system: {"constrained": {...}, "generation": {...} or absent}},
     "predictions": [{"index", "label", "predictions": {system: name}}, ...] or null, "config"}

Accuracies and macro-F1 in the summary are constrained scoring's; the generation fields are ``None`` where
free generation was not run (the launcher and the merge score constrained only). ``shard.index`` is
``None`` for a merged file (every shard).
"""

from __future__ import annotations

from pathlib import Path

from helpers.run.folder import atomic_write_json

SYSTEMS = ("baseline", "finetuned")  # the adapter off, then on


def summarize(metrics: dict, skipped: dict | None) -> dict:
    """The summary: per system the constrained accuracy and macro-F1, the generation accuracy and its "no
    class named" rate (``None`` when not run); the number evaluated and the bad rows skipped."""
    summary = {}
    for system, by_method in metrics.items():
        constrained, generation = by_method["constrained"], by_method.get("generation") or {}
        summary[f"{system}_accuracy"] = constrained["accuracy"]
        summary[f"{system}_macro_f1"] = constrained["macro_f1"]
        summary[f"{system}_generation_accuracy"] = generation.get("accuracy")
        summary[f"{system}_no_class_named_rate"] = generation.get("no_class_named_rate")
    first = next(iter(metrics.values()), {"constrained": {"n": 0}})
    summary["n_eval"] = first["constrained"]["n"]
    summary["n_skipped"] = sum(split.get("n_skipped", 0) for split in (skipped or {}).values())
    return summary


def write_metrics(path, metrics: dict, *, config: dict | None = None, model_path: str | None = None,
                  train: dict | None = None, skipped: dict | None = None, prompt: dict | None = None,
                  shard: tuple = (0, 1), processes: int = 1, eval_seconds: dict | None = None,
                  predictions: list | None = None) -> dict:
    """Write ``metrics.json`` at ``path`` atomically and return what was written (schema above).

    ``metrics``: ``{system: {"constrained": helpers.evaluation.compute_metrics(...), "generation": ...,
    "seconds": {method: s}}}``; ``config``: ``RunConfig.to_dict()``; ``train``: ``TrainResult.to_dict()``
    (absent when only evaluating); ``skipped``: ``helpers.validation.skipped_summary``; ``prompt``: the
    question, system prompt and thinking setting used (``helpers.chat``); ``eval_seconds``: extra timings.
    """
    config, train = config or {}, train or {}
    seconds = {f"{system}_{method}": value for system, by_method in metrics.items()
               for method, value in by_method.get("seconds", {}).items()}
    summary = summarize(metrics, skipped)
    report = {
        "summary": summary,
        "model_id": config.get("model_id"),
        "model_path": model_path,
        "dataset": config.get("dataset"),
        "train_size": train.get("train_samples", config.get("train_size")),
        "eval_size": summary["n_eval"],
        "optimizer_steps": train.get("global_step"),
        "peak_memory_bytes": train.get("peak_memory_bytes"),
        "peak_memory_kind": train.get("peak_memory_kind"),
        "wall_seconds": {**seconds, "train": train.get("wall_seconds"), **(eval_seconds or {})},
        "shard": {"index": shard[0], "count": shard[1]},
        "processes": processes,
        "skipped": skipped or {},
        "prompt": prompt,
        "metrics": metrics,
        "predictions": predictions,
        "config": config,
    }
    atomic_write_json(Path(path), report)
    return report
