"""helpers.run.shards: shards cover the split exactly once; N shards merged == one unsharded computation."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.evaluation import compute_metrics
from helpers.run import shards
from helpers.run.shards import (
    ShardError,
    merge_shard_metrics,
    shard_indices,
    write_shard_metrics,
)

CLASSES = [f"breed_{i}" for i in range(7)]


def synthetic(n, seed=0, classes=CLASSES, p_correct=0.6, p_none=0.05):
    """Labels and two systems' predictions (some right, some wrong, some unparsed)."""
    rng = random.Random(seed)
    labels = [rng.choice(classes) for _ in range(n)]

    def predict(p):
        out = []
        for lab in labels:
            r = rng.random()
            out.append(None if r < p_none else lab if r < p_none + p else rng.choice(classes))
        return out

    return labels, {"baseline": predict(0.2), "finetuned": predict(p_correct)}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), count=st.integers(1, 40), strategy=st.sampled_from(shards.STRATEGIES))
def test_shards_partition_every_index_exactly_once(n, count, strategy):
    parts = [shard_indices(n, i, count, strategy) for i in range(count)]
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    assert len(flat) == n  # no index twice
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert parts == [shard_indices(n, i, count, strategy) for i in range(count)]  # deterministic


def test_contiguous_and_strided_layouts():
    assert [shard_indices(10, i, 3) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [shard_indices(10, i, 3, "strided") for i in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert shard_indices(2, 3, 5) == []  # more shards than examples: some are empty


@pytest.mark.parametrize("args", [(10, 3, 3), (10, -1, 3), (10, 0, 0), (-1, 0, 1), (10, 0, 2, "random")])
def test_shard_indices_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        shard_indices(*args)


def test_compute_metrics_matches_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    labels, systems = synthetic(500, seed=3)
    for preds in systems.values():
        m = compute_metrics(labels, preds, CLASSES)
        as_str = [p if p is not None else "<none>" for p in preds]
        present = sorted(set(labels))
        assert m["accuracy"] == pytest.approx(accuracy_score(labels, as_str))
        assert m["macro_f1"] == pytest.approx(f1_score(labels, as_str, labels=present, average="macro",
                                                       zero_division=0))
        recalls = recall_score(labels, as_str, labels=present, average=None, zero_division=0)
        for c, r in zip(present, recalls):
            assert m["per_class"][c]["accuracy"] == pytest.approx(r)
        assert m["unparsed"] == preds.count(None)
        assert sum(pc["support"] for pc in m["per_class"].values()) == m["n"] == 500


def test_class_absent_from_labels_has_no_recall_and_is_left_out_of_macro_f1():
    m = compute_metrics(["a", "a", "b"], ["a", "c", "b"], ["a", "b", "c"])
    assert m["per_class"]["c"]["accuracy"] is None and m["per_class"]["c"]["f1"] is None
    # a: P=1, R=0.5 -> 2/3; b: 1 -> macro (2/3 + 1) / 2
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def write_all(tmp_path, labels, systems, count, strategy, meta=None):
    paths = []
    for i in range(count):
        idx = shard_indices(len(labels), i, count, strategy)
        preds = {name: [p[j] for j in idx] for name, p in systems.items()}
        path = tmp_path / f"task-{i:05d}" / shards.SHARD_METRICS_FILE
        write_shard_metrics(path, idx, [labels[j] for j in idx], preds, CLASSES,
                            shard_index=i, shard_count=count, n_total=len(labels), meta=meta)
        paths.append(path)
    return paths


@pytest.mark.parametrize("count", [1, 2, 3, 8, 13])
@pytest.mark.parametrize("strategy", shards.STRATEGIES)
def test_n_shards_merged_equal_one_unsharded_computation(tmp_path, count, strategy):
    labels, systems = synthetic(101, seed=count)
    paths = write_all(tmp_path, labels, systems, count, strategy)
    random.Random(0).shuffle(paths)  # file order must not matter
    merged = merge_shard_metrics(paths, expected_count=count)
    assert merged["n_examples"] == 101 and merged["n_shards"] == count
    for name, preds in systems.items():
        assert merged["metrics"][name]["constrained"] == compute_metrics(labels, preds, CLASSES)
    assert [ex["index"] for ex in merged["predictions"]] == list(range(101))


def test_merge_rejects_missing_duplicate_and_inconsistent_shards(tmp_path):
    labels, systems = synthetic(30)
    paths = write_all(tmp_path, labels, systems, 3, "contiguous")
    with pytest.raises(ShardError, match="missing shard"):
        merge_shard_metrics(paths[:2])
    with pytest.raises(ShardError, match="given twice"):
        merge_shard_metrics([paths[0], paths[0], paths[1], paths[2]])
    with pytest.raises(ShardError, match="shard_count"):
        merge_shard_metrics(paths, expected_count=4)
    other = tmp_path / "other.json"
    write_shard_metrics(other, [0], [CLASSES[0]], {"baseline": [None], "finetuned": [None]}, CLASSES[:3],
                        shard_index=1, shard_count=3, n_total=30)
    with pytest.raises(ShardError, match="class_names"):
        merge_shard_metrics([paths[0], other, paths[2]])
    # an example evaluated by two shards
    overlap = tmp_path / "overlap.json"
    write_shard_metrics(overlap, [0, 15], [labels[0], labels[15]],
                        {n: [p[0], p[15]] for n, p in systems.items()}, CLASSES,
                        shard_index=1, shard_count=3, n_total=30)
    with pytest.raises(ShardError, match="more than one shard"):
        merge_shard_metrics([paths[0], overlap, paths[2]])
    # a truncated file (task killed mid-write without the atomic rename)
    paths[1].write_text('{"format": ')
    with pytest.raises(ShardError, match="not valid JSON"):
        merge_shard_metrics(paths)


def test_merge_keeps_the_skipped_rows_once_and_checks_the_shards_agree(tmp_path):
    labels, systems = synthetic(20)
    skipped = {"test": {"kept": 20, "skipped": {"corrupt image": 2, "unknown label": 1}, "n_skipped": 3}}
    paths = write_all(tmp_path, labels, systems, 2, "contiguous", meta={"skipped": skipped})
    merged = merge_shard_metrics(paths)
    assert merged["summary"]["n_skipped"] == 3 and merged["skipped"] == skipped  # not 6: one split, read twice
    data = json.loads(paths[1].read_text())
    data["meta"]["skipped"]["test"]["n_skipped"] = 0
    paths[1].write_text(json.dumps(data))
    with pytest.raises(ShardError, match="skipped rows"):
        merge_shard_metrics(paths)


def test_merge_detects_examples_never_evaluated(tmp_path):
    labels, systems = synthetic(20)
    paths = write_all(tmp_path, labels, systems, 2, "contiguous")
    data = json.loads(paths[1].read_text())
    data["examples"] = data["examples"][:-1]
    paths[1].write_text(json.dumps(data))
    with pytest.raises(ShardError, match="examples missing"):
        merge_shard_metrics(paths)


def test_single_system_list_predictions(tmp_path):
    path = tmp_path / "s.json"
    write_shard_metrics(path, [0, 1], ["breed_0", "breed_1"], ["breed_0", None], CLASSES)
    merged = merge_shard_metrics([path])
    assert merged["systems"] == [shards.DEFAULT_SYSTEM]
    assert merged["metrics"]["model"]["constrained"]["accuracy"] == 0.5


def test_cli_merge_waits_for_all_shards_then_writes(tmp_path, capsys):
    labels, systems = synthetic(40)
    write_all(tmp_path / "run", labels, systems, 4, "strided")
    out = tmp_path / "run" / "metrics.json"
    (tmp_path / "run" / "task-00003" / shards.SHARD_METRICS_FILE).unlink()
    assert shards.main(["merge", str(tmp_path / "run"), "--out", str(out), "--expect", "4", "--if-complete"]) == 0
    assert not out.exists() and "3 of 4" in capsys.readouterr().out
    assert shards.main(["merge", str(tmp_path / "run"), "--out", str(out), "--expect", "4"]) == 1
    write_all(tmp_path / "run", labels, systems, 4, "strided")
    assert shards.main(["merge", str(tmp_path / "run"), "--out", str(out), "--expect", "4", "--if-complete"]) == 0
    merged = json.loads(out.read_text())
    assert merged["metrics"]["finetuned"]["constrained"] == compute_metrics(labels, systems["finetuned"], CLASSES)
    assert merged["shard"] == {"index": None, "count": 4} and merged["summary"]["n_eval"] == 40
    assert len(merged["predictions"]) == 40


def test_merged_metrics_json_has_the_schema_of_every_other_writer(tmp_path):
    """One schema: the merge writes metrics.json through helpers.run.report.write_metrics, as notebook 05 and the
    launcher do; the run's facts come from the shards' meta."""
    from helpers.run.report import write_metrics

    labels, systems = synthetic(12)
    config = {"model_id": "tiny", "dataset": "digits", "train_size": 8}
    train = {"global_step": 3, "wall_seconds": 1.5, "train_samples": 8, "peak_memory_bytes": 1, "peak_memory_kind": "x"}
    meta = {"config": config, "model_path": "/m", "prompt": {"question": "Q"}, "train": train, "skipped": {}}
    merged = shards.write_merged(tmp_path / "merged.json", merge_shard_metrics(write_all(tmp_path, labels, systems, 3,
                                                                                         "contiguous", meta=meta)))
    metrics = {name: {"constrained": compute_metrics(labels, preds, CLASSES),
                      "generation": {**compute_metrics(labels, preds, CLASSES), "no_class_named_rate": 0.0},
                      "seconds": {"constrained": 1.0}} for name, preds in systems.items()}
    notebook = write_metrics(tmp_path / "metrics.json", metrics, config=config, model_path="/m", train=train,
                             skipped={}, prompt={"question": "Q"})
    assert set(merged) == set(notebook) and set(merged["summary"]) == set(notebook["summary"])
    assert merged["summary"]["finetuned_generation_accuracy"] is None  # the merge scores constrained only
    assert notebook["summary"]["finetuned_generation_accuracy"] == notebook["summary"]["finetuned_accuracy"]
    for key in ("model_id", "dataset", "model_path", "optimizer_steps", "train_size", "prompt", "eval_size"):
        assert merged[key] == notebook[key], key
