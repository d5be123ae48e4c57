"""Where a profiled GPU step sits idle: the gaps between kernels, and the CPU work that ran during them.

``idle_gaps(trace)`` reads a Chrome trace written by ``torch.profiler`` (``prof.export_chrome_trace``): the GPU's
kernels, copies and memsets are merged into busy spans on all streams; every gap between spans (and before the
first and after the last, within the profiled window) is idle time. Each gap is charged to the CPU op that
launched the kernel ending it (its outermost enclosing op on the launching thread, and the innermost), and marked
``after_sync`` when a synchronising runtime call (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
``cudaEventSynchronize``, a blocking ``cudaMemcpy``) returned inside the gap itself. (A sync that drained the queue
earlier and left the CPU behind for a while is not marked: compare traces with and without it for that.)

Used by ``gpu_train_bench.step_profiler`` and ``gpu_eval_bench --profile``;
``python -m benchmarks.gpu_gaps TRACE`` prints the summary of a saved trace (``.json`` or ``.json.gz``).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
MIN_GAP_US = 5.0  # shorter gaps are launch latency between queued kernels, not the GPU waiting for the CPU


def _load(trace) -> list[dict]:
    path = Path(trace)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _is_sync(name: str) -> bool:
    return name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _busy_spans(kernels: list[dict]) -> list[tuple[float, float]]:
    spans: list[list[float]] = []
    for e in sorted(kernels, key=lambda e: e["ts"]):
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return [(s, e) for s, e in spans]


def _enclosing(ops_by_thread: dict, annotations: list[dict], tid, ts: float) -> tuple[str, str]:
    """(outermost, innermost) CPU op names on thread ``tid`` that contain the instant ``ts``. The annotations (few,
    long: the model's parts) are searched in full, the ops among the last few thousand that started before ``ts``."""
    starts, ops = ops_by_thread.get(tid, ([], []))
    i = bisect.bisect_right(starts, ts)
    containing = [op for op in ops[max(0, i - 4000):i] if op["ts"] + op.get("dur", 0) >= ts]
    containing += [a for a in annotations if a["tid"] == tid and a["ts"] <= ts <= a["ts"] + a.get("dur", 0)]
    if not containing:
        return "(no CPU op)", "(no CPU op)"
    containing.sort(key=lambda op: (op["ts"], -op.get("dur", 0)))
    return containing[0]["name"], containing[-1]["name"]


def idle_gaps(trace, top: int = 12, kind_of=None) -> dict:
    """The idle time of the profiled window, by the CPU op that ended each gap; the largest gaps listed.
    ``kind_of``: a kernel name's kind (``gpu_train_bench.kernel_kind``), to add the kernels' time by kind."""
    events = [e for e in _load(trace) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not kernels:
        return {"error": "no GPU events in the trace"}
    cpu_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    annotations = [e for e in cpu_ops if e.get("cat") == "user_annotation"]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver"]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    ops_by_thread: dict = {}
    for op in sorted(cpu_ops, key=lambda e: e["ts"]):
        starts, ops = ops_by_thread.setdefault(op["tid"], ([], []))
        starts.append(op["ts"])
        ops.append(op)
    sync_ends = sorted(e["ts"] + e.get("dur", 0) for e in runtime if _is_sync(e["name"]))
    window_start = min(e["ts"] for e in cpu_ops + kernels)
    window_end = max(e["ts"] + e.get("dur", 0) for e in cpu_ops + kernels)
    spans = _busy_spans(kernels)
    kernel_starting_at = {round(e["ts"], 3): e for e in kernels}
    gaps = []
    previous_end = window_start
    for start, end in spans + [(window_end, window_end)]:
        if start - previous_end >= MIN_GAP_US:
            kernel = kernel_starting_at.get(round(start, 3))
            launch = launches.get(kernel["args"].get("correlation")) if kernel is not None else None
            outer, inner = (_enclosing(ops_by_thread, annotations, launch["tid"], launch["ts"]) if launch is not None
                            else ("(end of window)", "(end of window)"))
            i = bisect.bisect_left(sync_ends, previous_end)
            after_sync = i < len(sync_ends) and sync_ends[i] <= start
            gaps.append({"start_us": previous_end, "us": start - previous_end, "outer": outer, "inner": inner,
                         "after_sync": after_sync, "next_kernel": kernel["name"][:60] if kernel else None})
        previous_end = max(previous_end, end)
    window = window_end - window_start
    idle = sum(g["us"] for g in gaps)
    by_outer: dict = {}
    by_inner: dict = {}
    for g in gaps:
        by_outer[g["outer"]] = by_outer.get(g["outer"], 0.0) + g["us"]
        by_inner[g["inner"]] = by_inner.get(g["inner"], 0.0) + g["us"]

    def ranked(d):
        return [(k[:80], round(v / 1e3, 2)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    kinds: dict = {}
    for e in kernels if kind_of is not None else []:
        kinds[kind_of(e["name"])] = kinds.get(kind_of(e["name"]), 0.0) + e.get("dur", 0) / 1e3
    return {
        **({"kernel_ms_by_kind": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}
           if kinds else {}),
        "window_ms": round(window / 1e3, 2), "busy_ms": round((window - idle) / 1e3, 2), "idle_ms": round(idle / 1e3, 2),
        "gaps": len(gaps), "syncs": len(sync_ends),
        "idle_after_sync_ms": round(sum(g["us"] for g in gaps if g["after_sync"]) / 1e3, 2),
        "idle_ms_by_outer_op": ranked(by_outer), "idle_ms_by_inner_op": ranked(by_inner),
        "largest_gaps": [{"ms": round(g["us"] / 1e3, 3), "at_ms": round((g["start_us"] - window_start) / 1e3, 2),
                          "outer": g["outer"][:60], "inner": g["inner"][:60], "after_sync": g["after_sync"],
                          "next_kernel": g["next_kernel"]}
                         for g in sorted(gaps, key=lambda g: -g["us"])[:top]],
    }


def export_and_analyse(prof, path: Path, top: int = 12, kind_of=None) -> dict:
    """Write ``prof``'s trace to ``path`` (gzip, kept beside the results), and return its ``idle_gaps``."""
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    try:
        summary = idle_gaps(raw, top, kind_of)
    except Exception as err:  # noqa: BLE001 (the analysis must not lose the measurement it annotates)
        summary = {"error": repr(err)[:300]}
    with open(raw, "rb") as f_in, gzip.open(path, "wb") as f_out:
        f_out.write(f_in.read())
    raw.unlink()
    return summary


def annotate_modules(model) -> list:
    """Name the model's parts in the profile (``record_function`` around the forward of the vision tower, its
    projector, the language model and ``lm_head``), so a gap's outer op says which part the CPU was in; returns
    the hook handles (remove them after profiling)."""
    from torch.autograd.profiler import record_function

    from helpers.modeling import unwrap_gemma4

    gemma = unwrap_gemma4(model)
    parts = {"vision_tower": getattr(gemma.model, "vision_tower", None),
             "embed_vision": getattr(gemma.model, "embed_vision", None),
             "language_model": getattr(gemma.model, "language_model", None), "lm_head": gemma.lm_head}
    handles = []
    for name, module in parts.items():
        if module is None:
            continue
        open_ranges = []

        def enter(mod, args, name=name, open_ranges=open_ranges):
            label = record_function(f"## {name}")
            label.__enter__()
            open_ranges.append(label)

        def leave(mod, args, out, open_ranges=open_ranges):
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_gaps", description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="a Chrome trace written by torch.profiler (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=12, help="how many of the largest gaps and ops to list")
    args = parser.parse_args(argv)
    print(json.dumps(idle_gaps(args.trace, args.top), indent=1))


if __name__ == "__main__":
    main()
