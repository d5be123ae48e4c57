"""Sharded evaluation: split the test set across tasks, then merge their predictions into one metrics.json.

Used by the Cloud Run evaluation job (``cloudrun/entrypoint.sh``, ``JOB_MODE=eval-shard``), where each of
``--tasks N`` tasks evaluates its shard of the test split (notebook 05 with ``shard_index`` / ``shard_count``)
and writes a shard file into its run folder; the merge (``python -m helpers.run.shards merge``) recombines
the *per-example predictions* and computes every
metric once, from all of them, so N shards merged give exactly what one unsharded evaluation gives
(averaging per-shard accuracies or F1 scores would not: shards differ in size and class mix).

Shard file (JSON), one per task::

    {"format": "gemma4-finetune/shard-metrics/v1", "shard_index": 2, "shard_count": 8,
     "n_total": 3669, "class_names": [...],
     "examples": [{"index": 918, "label": "Abyssinian",
                   "predictions": {"baseline": "Bengal", "finetuned": "Abyssinian"}}, ...],
     "meta": {...}}

``index`` is the example's position in the (ordered) evaluation split; a prediction of ``None`` means no
class name could be read from the model's answer and counts as wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers.evaluation import compute_metrics, metrics_by_system
from helpers.run.folder import SHARD_METRICS as SHARD_METRICS_FILE  # each evaluation task's file
from helpers.run.folder import atomic_write_json
from helpers.run.report import summarize, write_metrics

FORMAT = "gemma4-finetune/shard-metrics/v1"
DEFAULT_SYSTEM = "model"  # the system name used when predictions are given as a plain list
STRATEGIES = ("contiguous", "strided")


class ShardError(ValueError):
    """Shard files that cannot be merged (missing, duplicated or inconsistent shards)."""


def shard_indices(n: int, index: int, count: int, strategy: str = "contiguous") -> list[int]:
    """The example indices (into ``range(n)``) that shard ``index`` of ``count`` evaluates.

    ``contiguous``: balanced consecutive blocks (the first ``n % count`` shards get one more example);
    ``strided``: ``index, index + count, ...``. Either way the shards are disjoint and together cover every
    index exactly once; shards may be empty when ``count > n``.
    """
    for name, value in (("n", n), ("index", index), ("count", count)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"index must be in [0, {count}), got {index}")
    if strategy == "strided":
        return list(range(index, n, count))
    if strategy != "contiguous":
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return list(range(start, stop))


def _as_systems(predictions, n: int) -> dict[str, list]:
    if isinstance(predictions, Mapping):
        systems = {str(k): list(v) for k, v in predictions.items()}
    else:
        systems = {DEFAULT_SYSTEM: list(predictions)}
    if not systems:
        raise ValueError("predictions: at least one system is needed")
    for name, preds in systems.items():
        if len(preds) != n:
            raise ValueError(f"predictions[{name!r}] has {len(preds)} entries for {n} examples")
    return systems


def write_shard_metrics(path, indices: Sequence[int], labels: Sequence[str], predictions,
                        class_names: Sequence[str], *, shard_index: int = 0, shard_count: int = 1,
                        n_total: int | None = None, meta: dict | None = None) -> dict:
    """Write one shard's per-example predictions (and, for a quick look, its own metrics) to ``path``.

    ``predictions``: a list aligned with ``indices`` (one system, named ``"model"``) or a dict
    ``{system: list}`` such as ``{"baseline": [...], "finetuned": [...]}``. ``n_total``: the size of the
    whole split, so that the merge can check every example was evaluated. Returns the written payload.
    """
    indices = [int(i) for i in indices]
    labels = list(labels)
    if len(labels) != len(indices):
        raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
    if len(set(indices)) != len(indices):
        raise ValueError("indices must be unique within a shard")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"bad shard {shard_index} of {shard_count}")
    systems = _as_systems(predictions, len(indices))
    examples = [
        {"index": idx, "label": lab, "predictions": {name: preds[k] for name, preds in systems.items()}}
        for k, (idx, lab) in enumerate(zip(indices, labels))
    ]
    payload = {
        "format": FORMAT,
        "shard_index": shard_index,
        "shard_count": shard_count,
        "n_total": n_total,
        "class_names": list(class_names),
        "systems": list(systems),
        "examples": examples,
        "shard_metrics": {name: compute_metrics(labels, preds, class_names) for name, preds in systems.items()},
        "meta": meta or {},
    }
    atomic_write_json(Path(path), payload)
    return payload


def _load(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ShardError(f"shard file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ShardError(f"shard file {path} is not valid JSON ({err}); was its task killed mid-write?") from None
    if data.get("format") != FORMAT:
        raise ShardError(f"{path}: not a shard file (format {data.get('format')!r}, expected {FORMAT!r})")
    return data


def merge_shard_metrics(paths: Sequence, expected_count: int | None = None) -> dict:
    """Recombine shard files into one metrics dict, computed from the merged per-example predictions.

    Checks that the shards agree (class names, systems, shard count, split size), that each shard index
    appears once, that no example is evaluated twice and, when the split size is known, that none is
    missing. Returns ``{"summary", "n_examples", "n_shards", "class_names", "systems", "skipped", "meta",
    "metrics": {system: {"constrained": ...}}, "predictions": [...]}`` (predictions in index order; ``skipped``
    and ``meta`` from the first shard, as notebook 05 wrote them); ``write_merged`` writes it as metrics.json.
    """
    paths = list(paths)
    if not paths:
        raise ShardError("no shard files to merge")
    shards = [(str(p), _load(p)) for p in paths]
    first_path, first = shards[0]
    count = first["shard_count"]
    if expected_count is not None and count != expected_count:
        raise ShardError(f"{first_path}: shard_count {count}, expected {expected_count}")
    # Every shard loads (and validates) the whole split before taking its part, so each one carries the
    # same skipped-row counts: they must agree, and are kept once.
    first_skipped = first.get("meta", {}).get("skipped")
    skipped = first_skipped or {}
    seen_shards: dict[int, str] = {}
    by_index: dict[int, dict] = {}
    for path, data in shards:
        for key in ("shard_count", "class_names", "systems", "n_total"):
            if data.get(key) != first.get(key):
                raise ShardError(f"{path}: {key} {data.get(key)!r} differs from {first_path}'s {first.get(key)!r}")
        if data.get("meta", {}).get("skipped") != first_skipped:  # the shards did not read the same data
            raise ShardError(f"{path}: skipped rows {data.get('meta', {}).get('skipped')!r} differ from "
                             f"{first_path}'s {first_skipped!r}")
        s = data["shard_index"]
        if s in seen_shards:
            raise ShardError(f"shard {s} given twice: {seen_shards[s]} and {path}")
        seen_shards[s] = path
        for ex in data["examples"]:
            if ex["index"] in by_index:
                raise ShardError(f"example {ex['index']} appears in more than one shard (again in {path})")
            by_index[ex["index"]] = ex
    missing_shards = sorted(set(range(count)) - set(seen_shards))
    if missing_shards:
        raise ShardError(f"missing shard(s) {missing_shards[:10]} of {count}")
    n_total = first.get("n_total")
    if n_total is not None:
        missing = sorted(set(range(n_total)) - set(by_index))
        extra = sorted(set(by_index) - set(range(n_total)))
        if missing or extra:
            raise ShardError(f"examples missing {missing[:10]} / out of range {extra[:10]} for n_total={n_total}")
    ordered = [by_index[i] for i in sorted(by_index)]
    labels = [ex["label"] for ex in ordered]
    class_names = first["class_names"]
    metrics = metrics_by_system(labels, {name: [ex["predictions"][name] for ex in ordered] for name in first["systems"]},
                                class_names)
    return {
        "summary": summarize(metrics, skipped),
        "n_examples": len(ordered),
        "n_shards": count,
        "class_names": class_names,
        "systems": first["systems"],
        "skipped": skipped,
        "meta": first.get("meta", {}),
        "metrics": metrics,
        "predictions": ordered,
    }


def write_merged(path, merged: dict) -> dict:
    """The merged shards as ``metrics.json`` (``helpers.run.report.write_metrics``: the one schema), with the run's
    facts from the shards' ``meta`` (notebook 05 puts the config, model path, prompt and training summary there)."""
    meta = merged["meta"]
    return write_metrics(path, merged["metrics"], config=meta.get("config"), model_path=meta.get("model_path"),
                         train=meta.get("train"), skipped=merged["skipped"], prompt=meta.get("prompt"),
                         shard=(None, merged["n_shards"]), predictions=merged["predictions"])


def find_shard_files(root) -> list[Path]:
    """Every ``shard_metrics.json`` below ``root`` (one per task folder), sorted."""
    return sorted(Path(root).rglob(SHARD_METRICS_FILE))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.run.shards",
                                     description="Merge sharded evaluation results into one metrics.json.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge shard files (or every shard file below folders)")
    merge.add_argument("inputs", nargs="+", help=f"shard files, or folders searched for {SHARD_METRICS_FILE}")
    merge.add_argument("--out", required=True, help="where to write the merged metrics.json")
    merge.add_argument("--expect", type=int, default=None, help="the number of shards there must be")
    merge.add_argument("--if-complete", action="store_true",
                       help="exit 0 without writing while fewer than --expect shard files exist")
    args = parser.parse_args(argv)

    files: list[Path] = []
    for item in args.inputs:
        p = Path(item)
        files.extend(find_shard_files(p) if p.is_dir() else [p])
    if args.if_complete:
        if args.expect is None:
            parser.error("--if-complete needs --expect")
        if len(files) < args.expect:
            print(f"merge: {len(files)} of {args.expect} shard files so far; not merging yet")
            return 0
    try:
        merged = merge_shard_metrics(files, expected_count=args.expect)
    except ShardError as err:
        print(f"merge failed: {err}", file=sys.stderr)
        return 1
    write_merged(Path(args.out), merged)
    summary = ", ".join(f"{name}: accuracy {m['constrained']['accuracy']:.4f}, macro-F1 {m['constrained']['macro_f1']:.4f}"
                        for name, m in merged["metrics"].items() if m["constrained"]["accuracy"] is not None)
    print(f"merged {merged['n_shards']} shards, {merged['n_examples']} examples -> {args.out} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
