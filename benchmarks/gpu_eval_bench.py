"""Evaluation speed on one GPU: the seed's ``generate`` at batch 8 vs constrained class scoring, and where the time goes.

Same real-shape random-weight model (the seed's NF4 settings, as it evaluates the 4-bit model), same
prompts (one 224×224 image -> 256 soft tokens, a short question, the generation prompt; the large models'
template adds the empty thought block), the 37 Oxford-IIIT Pet breeds as the label set.

- ``generate-128`` (``--gen128``): greedy ``generate`` forced to 128 new tokens (``min_new_tokens=128``), the
  seed's ceiling: what a model that thinks or rambles costs (random weights rarely stop on their own).
- ``generate-8``: the same, forced to 8 new tokens: a model that answers with the name and stops.
- ``generate-1``: one new token: the prompt pass as ``generate`` runs it, so ``D = (t8 - t1) / 7`` is one
  decoding step.
- ``prefill``: the prompt pass alone as ``score_class_names`` runs it (``P``).
- ``score`` (``helpers.scoring.score_class_names``, ``method="tree"``, the default): one pass, the prompt with a
  prefix tree of the class names' tokens appended (tree attention mask); ``score-copies`` (``method="copies"``):
  the prompt pass with a cache, then the names on copies of it. ``S = t_score - P``.
- ``--score-batch M`` (16): scoring and ``generate-8`` again at batch M, the batch notebook 05 and the launcher
  score at for docs/one-gpu.md's commands; ``shipped × seed`` is scoring's images/s at M over ``generate-8``'s at
  ``--batch`` (the seed evaluates at 8).
- ``--compiled``: tree scoring again with ``helpers.speed.compile_layers(model, dynamic=True)`` (every decoder
  and vision layer compiled, for all prompt lengths); the first batch, which compiles, is reported apart
  (``compile_score_tree_s``). Tree scoring runs without a KV cache, as evaluation runs it; ``--compiled-prefill``
  also times the prompt pass with a cache compiled (``compile_prefill_s``: its cache's guards add a graph per
  layer, minutes on the 31B). With ``--fp32-check``, compiled and eager scoring are also compared in float32.
- ``--fp32-check SIZE``: the same prompts on a float32 build of SIZE, tree against copies (the bf16/NF4 rows
  differ by rounding; in float32 the two methods must agree).

So the 8-token ratio is ``(P' + 7 D) / (P + S)`` (``P'``: generate's prompt pass), at most ``t8 / P`` however
cheap scoring gets. The tree's and the copies' predictions are compared (identical argmax, largest score
difference). Times are medians over the timed batches (the first batch of each is a warm-up).

Run from the repository root: ``python -m benchmarks.gpu_eval_bench --sizes E4B,31B --out $OUT``
(``--shrink --quant bf16 --batch 2 --batches 2`` for a CPU smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.realshape import (
    build_model,
    pixel_layout,
    reference_nf4_config,
    shrunk_config,
    synthetic_pixels,
)
from helpers.data import PET_BREEDS
from helpers.scoring import score_class_names

THOUGHT_BLOCK = [100, 45518, 107, 101]  # <|channel>thought\n<channel|> (ids as in Gemma 4; any in-vocab ids do)


def prompt_batch(config, n: int, size: str, seed: int = 0, prompt_tokens: int = 12) -> dict:
    """``n`` evaluation prompts of the real layout (no padding): one 224×224 image, a short random question, the
    generation prompt (and, for the large family, its empty thought block)."""
    g = torch.Generator().manual_seed(seed)
    text = config.get_text_config()
    high = min(200_000, text.vocab_size)
    rows = []
    for _ in range(n):
        prompt = torch.randint(min(1000, high // 2), high, (prompt_tokens,), generator=g).tolist()
        row = ([2, 105, 2364, 107, config.boi_token_id] + [config.image_token_id] * 256 + [config.eoi_token_id]
               + prompt + [106, 107, 105, 4368, 107])
        if size in ("12B", "26B-A4B", "31B"):  # the large family's template
            row += THOUGHT_BLOCK
        rows.append(row)
    ids = torch.tensor(rows)
    pixel_values, positions = synthetic_pixels(n, generator=g, **pixel_layout(config))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
            "image_position_ids": positions, "mm_token_type_ids": (ids == config.image_token_id).long()}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(batches, run_one) -> tuple[float, list]:
    """Median seconds per batch of ``run_one`` over ``batches`` after the first (a warm-up), and the outputs."""
    times, outputs = [], []
    for b in batches:
        sync()
        t0 = time.perf_counter()
        outputs.append(run_one(b))
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times), outputs


def generate_fn(model, new_tokens: int):
    def generate(b):
        with torch.no_grad():
            return model.generate(**b, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return generate


def score_fn(model, tokenizer, names, method: str = "tree"):
    """``helpers.scoring.score_class_names`` over one batch, by ``method``, its scores on the CPU."""
    def score(b):
        return score_class_names(model, tokenizer, b, names, method=method).cpu()
    return score


def prefill_fn(model):
    """The prompt pass exactly as ``score_class_names`` makes it (positions from the mask, cache, last logits)."""
    from helpers.scoring import MODEL_INPUTS, _positions

    def prefill(b):
        with torch.no_grad():
            inputs = {k: v for k, v in b.items() if k in MODEL_INPUTS}
            inputs["position_ids"] = _positions(inputs["attention_mask"])
            return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].float().log_softmax(-1).amax(-1)
    return prefill


def compiled_scoring(model, tokenizer, names, batches, generate8_s: float, batch_size: int, eager_scores,
                     prefill: bool = False) -> dict:
    """Tree scoring (and with ``prefill`` the prompt pass with a cache) with every layer compiled
    (``helpers.speed.compile_layers`` with ``dynamic=True``: one graph for all prompt lengths; a KV cache adds
    graphs of its own), timed like the eager ones; the layers run eager again afterwards. ``compile_*_s``: the
    first call of each, which compiles; the scores are compared with the eager ones (``eager_scores``)."""
    from helpers.speed import compile_layers, uncompile_layers

    passes = [("score_tree", score_fn(model, tokenizer, names))] + ([("prefill", prefill_fn(model))] if prefill else [])
    compile_layers(model, dynamic=True)
    try:
        row, seconds, outputs = {}, {}, {}
        for name, run_one in passes:
            sync()
            t0 = time.perf_counter()
            run_one(batches[0])  # compiles (the prompt pass with a cache is another graph than scoring's)
            sync()
            row[f"compile_{name}_s"] = round(time.perf_counter() - t0, 1)
            seconds[name], outputs[name] = timed(batches, run_one)
            print(json.dumps({"compiled": name, "compile_s": row[f"compile_{name}_s"], "s": seconds[name]}), flush=True)
    finally:
        uncompile_layers(model)
    row["seconds_per_batch"] = {k: round(v, 4) for k, v in seconds.items()}
    row["score_tree_img_s"] = round(batch_size / seconds["score_tree"], 3)
    row["ratio_vs_generate8"] = round(generate8_s / seconds["score_tree"], 2)  # against the eager generate-8
    scores = torch.cat(outputs["score_tree"])
    row["same_argmax_as_eager"] = bool(torch.equal(scores.argmax(-1), eager_scores.argmax(-1)))
    row["max_abs_diff_vs_eager"] = float((scores - eager_scores).abs().max())
    return row


def profiled(model, run_one, batch, out_path: Path) -> dict:
    """One call of ``run_one(batch)`` under torch.profiler: where the GPU idled and the kernels' time by kind, from
    the trace (``gpu_gaps.idle_gaps``; the model's parts annotated). The trace is kept beside the results, gzipped."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu_gaps import annotate_modules, export_and_analyse
    from benchmarks.gpu_train_bench import kernel_kind

    handles = annotate_modules(model)
    try:
        sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_one(batch)
            sync()
        wall = time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
    out_path.with_suffix(".txt").write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    return {"wall_s": round(wall, 4),
            "idle": export_and_analyse(prof, out_path.with_suffix(".trace.json.gz"), kind_of=kernel_kind)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_eval_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="E4B,31B")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="the first is a warm-up")
    parser.add_argument("--score-batch", type=int, default=16,
                        help="also time scoring and generate-8 at this batch: notebook 05's and the launcher's "
                             "(max(batch_size, 16)) for docs/one-gpu.md's commands; 0: not")
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--quant", default="ref4", choices=["ref4", "bf16"])
    parser.add_argument("--gen128", action="store_true", help="also time generate forced to 128 tokens")
    parser.add_argument("--fp32-check", default="", help="a size: compare tree and copies on a float32 build of it")
    parser.add_argument("--profile", default="", help="sizes whose prompt pass, scoring and generate-8 are profiled")
    parser.add_argument("--compiled", action="store_true",
                        help="also time tree scoring compiled (with --fp32-check: compare it in float32)")
    parser.add_argument("--compiled-prefill", action="store_true",
                        help="with --compiled, also time the prompt pass with a KV cache compiled")
    args = parser.parse_args(argv)
    if args.compiled_prefill and not args.compiled:
        parser.error("--compiled-prefill adds to --compiled: pass both")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from helpers.teaching.presets import preset_config
    from helpers.tiny import build_tokenizer

    tokenizer = build_tokenizer()  # only to turn class names into ids; the weights are random anyway
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = list(PET_BREEDS)
    results = []
    for size in args.sizes.split(","):
        config = shrunk_config(size) if args.shrink else preset_config(size)
        if args.quant == "bf16":
            model = build_model(config, "none", device=device)
        else:
            model = build_model(config, "4bit", quantization_config=reference_nf4_config(), device=device)
        model.generation_config.pad_token_id = 0
        batches = [{k: v.to(device) for k, v in prompt_batch(config, args.batch, size, seed=i).items()}
                   for i in range(args.batches)]
        row = {"size": size, "quant": args.quant, "batch": args.batch, "classes": len(names),
               "batches_timed": len(batches) - 1}
        n = args.batch
        seconds = {}
        if args.gen128:
            seconds["generate128"], _ = timed(batches, generate_fn(model, 128))
        for new in (1, 8):
            seconds[f"generate{new}"], _ = timed(batches, generate_fn(model, new))
        seconds["prefill"], _ = timed(batches, prefill_fn(model))
        scores = {}
        for method in ("tree", "copies"):  # copies holds 37 copies of the cache: on an 80 GB card the 31B's do not fit
            try:
                seconds[f"score_{method}"], outs = timed(batches, score_fn(model, tokenizer, names, method))
                scores[method] = torch.cat(outs)
            except torch.OutOfMemoryError:
                row[f"score_{method}"] = "out of memory"
                gc.collect()
                torch.cuda.empty_cache()
        row["seconds_per_batch"] = {k: round(v, 4) for k, v in seconds.items()}
        row.update({f"{k}_img_s": round(n / v, 3) for k, v in seconds.items()})
        prefill_s, decode_s = seconds["prefill"], (seconds["generate8"] - seconds["generate1"]) / 7
        row["P_s"] = round(prefill_s, 4)  # the prompt pass (scoring's)
        row["P_generate_s"] = round(seconds["generate1"], 4)  # generate's prompt pass (and one token)
        row["D_s"] = round(decode_s, 4)  # one decoding step of generate
        row["S_tree_s"] = round(seconds["score_tree"] - prefill_s, 4)  # scoring beyond the prompt pass
        copies = "score_copies" in seconds
        row["S_copies_s"] = round(seconds["score_copies"] - prefill_s, 4) if copies else None
        row["bound_vs_generate8"] = round(seconds["generate8"] / prefill_s, 2)  # if scoring cost nothing past P
        row["ratio_vs_generate8"] = round(seconds["generate8"] / seconds["score_tree"], 2)
        row["ratio_copies_vs_generate8"] = round(seconds["generate8"] / seconds["score_copies"], 2) if copies else None
        if args.gen128:
            row["ratio_vs_generate128"] = round(seconds["generate128"] / seconds["score_tree"], 2)
        if args.score_batch and args.score_batch != n:  # the shipped evaluation's batch against the seed's 8
            wide = [{k: v.to(device) for k, v in prompt_batch(config, args.score_batch, size, seed=100 + i).items()}
                    for i in range(args.batches)]
            m = args.score_batch
            wide_s = {"generate8": timed(wide, generate_fn(model, 8))[0],
                      "score_tree": timed(wide, score_fn(model, tokenizer, names))[0]}
            del wide
            row["score_batch"] = m
            row["at_score_batch_img_s"] = {k: round(m / v, 3) for k, v in wide_s.items()}
            row["ratio_at_score_batch"] = round(wide_s["generate8"] / wide_s["score_tree"], 2)
            # what a user sees: notebook 05's scoring at its batch against the seed's generate at batch 8
            row["ratio_shipped_vs_seed"] = round((m / wide_s["score_tree"]) / (n / seconds["generate8"]), 2)
        if copies:
            row["tree_equals_copies_argmax"] = bool(torch.equal(scores["tree"].argmax(-1), scores["copies"].argmax(-1)))
            row["tree_vs_copies_max_abs_diff"] = float((scores["tree"] - scores["copies"]).abs().max())
            row["tree_vs_copies_max_score"] = float(scores["copies"].abs().max())
        if args.compiled:
            compiled = compiled_scoring(model, tokenizer, names, batches, seconds["generate8"], n, scores["tree"],
                                        prefill=args.compiled_prefill)
            saved_per_image = (seconds["score_tree"] - compiled["seconds_per_batch"]["score_tree"]) / n
            # images scored before compiling pays for itself: the first call's whole time (compiling and one batch)
            # over the time compiled scoring saves an image against eager scoring
            compiled["break_even_images"] = (round(compiled["compile_score_tree_s"] / saved_per_image)
                                             if saved_per_image > 0 else None)
            row["compiled"] = compiled
            print(json.dumps({"size": size, "compiled": row["compiled"]}), flush=True)
        if size in args.profile.split(",") and device == "cuda":
            runs = {"prefill": prefill_fn(model), "generate8": generate_fn(model, 8),
                    "score_tree": score_fn(model, tokenizer, names)}
            row["profile"] = {name: profiled(model, run_one, batches[1], out / f"profile_eval_{size}_{name}")
                              for name, run_one in runs.items()}
            print(json.dumps({"size": size, "profile": row["profile"]}), flush=True)
        row["peak_alloc"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
        results.append(row)
        print(json.dumps(row), flush=True)
        del model, batches
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        (out / "eval_results.json").write_text(json.dumps(results, indent=1))
    if args.fp32_check:  # the two methods on a float32 model of real shape: the same scores up to float32 rounding
        size = args.fp32_check
        config = shrunk_config(size) if args.shrink else preset_config(size)
        model = build_model(config, "none", device=device, dtype=torch.float32)
        batch = {k: v.to(device) for k, v in prompt_batch(config, args.batch, size, seed=0).items()}
        tree = score_class_names(model, tokenizer, batch, names, method="tree")
        copies = score_class_names(model, tokenizer, batch, names, method="copies")
        check = {"fp32_check": size, "batch": args.batch, "same_argmax": bool(torch.equal(tree.argmax(-1), copies.argmax(-1))),
                 "max_abs_diff": float((tree - copies).abs().max()), "max_abs_score": float(copies.abs().max()),
                 "top2_gap_min": float(copies.topk(2, dim=-1).values.diff(dim=-1).abs().min())}
        if args.compiled:  # compiled against eager in float32: what differs beyond rounding is a compiler's doing
            from helpers.speed import compile_layers, uncompile_layers

            compile_layers(model, dynamic=True)
            try:
                compiled = score_class_names(model, tokenizer, batch, names, method="tree")
            finally:
                uncompile_layers(model)
            check["compiled_same_argmax"] = bool(torch.equal(tree.argmax(-1), compiled.argmax(-1)))
            check["compiled_max_abs_diff"] = float((tree - compiled).abs().max())
        results.append(check)
        print(json.dumps(check), flush=True)
        (out / "eval_results.json").write_text(json.dumps(results, indent=1))
        del model
    results = [r for r in results if "P_s" in r]
    lines = [("size   batch  P s     P' s    D s     S tree  S copies  gen-8 img/s  score img/s  ×gen8  (copies)  bound  "
              "same argmax  score batch: ×gen8, shipped × seed")]
    for r in results:
        lines.append(f"{r['size']:<6} {r['batch']:>5}  {r['P_s']:<6}  {r['P_generate_s']:<6}  {r['D_s']:<6}  "
                     f"{r['S_tree_s']:<6}  {r['S_copies_s']!s:<8}  {r['generate8_img_s']:>11}  {r['score_tree_img_s']:>11}  "
                     f"{r['ratio_vs_generate8']:>5}  {r['ratio_copies_vs_generate8']!s:>8}  {r['bound_vs_generate8']:>5}  "
                     f"{r.get('tree_equals_copies_argmax', '-')!s:<11}  {r.get('score_batch', '-')}: "
                     f"{r.get('ratio_at_score_batch', '-')}, {r.get('ratio_shipped_vs_seed', '-')}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
