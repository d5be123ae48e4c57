"""Evaluation speed on one GPU: the seed's ``generate(max_new_tokens=128)`` at batch 8 vs cached class scoring.

Same real-shape random-weight model (the seed's NF4 settings, as it evaluates the 4-bit model), same
prompts (one 224×224 image -> 256 soft tokens, a short question, the generation prompt; the large models'
template adds the empty thought block), the 37 Oxford-IIIT Pet breeds as the label set.

- ``generate-128``: greedy ``generate`` forced to 128 new tokens (``min_new_tokens=128``), the seed's
  ceiling: what a model that thinks or rambles costs (random weights rarely stop on their own).
- ``generate-8``: the same, forced to 8 new tokens: a model that answers with the name and stops.
- ``score``: ``helpers.scoring.score_class_names``: one prompt pass, then every class name scored on copies
  of the prompt's KV cache.

Run: ``python benchmarks/gpu_eval_bench.py --sizes E4B,31B --out $OUT``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.data import PET_BREEDS
from helpers.realshape import build_model, pixel_layout, reference_nf4_config, shrunk_config, synthetic_pixels
from helpers.scoring import score_class_names

THOUGHT_BLOCK = [100, 45518, 107, 101]  # <|channel>thought\n<channel|> (ids as in Gemma 4; any in-vocab ids do)


def prompt_batch(config, n: int, size: str, seed: int = 0, prompt_tokens: int = 12) -> dict:
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


def timed(batches, run_one) -> tuple[float, int, list]:
    """Images/s of ``run_one`` over ``batches``; the first batch is a warm-up and is not timed."""
    n, t0, outputs = 0, None, []
    for i, b in enumerate(batches):
        if i == 1:
            sync()
            t0 = time.perf_counter()
        if i >= 1:
            n += b["input_ids"].shape[0]
        outputs.append(run_one(b))
    sync()
    return n / (time.perf_counter() - t0), n, outputs


def time_generate(model, batches, new_tokens: int) -> tuple[float, int]:
    def generate(b):
        with torch.no_grad():
            model.generate(**b, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    rate, n, _ = timed(batches, generate)
    return rate, n


def time_score(model, tokenizer, batches, names) -> tuple[float, int, torch.Tensor]:
    rate, n, preds = timed(batches, lambda b: score_class_names(model, tokenizer, b, names).argmax(-1).cpu())
    return rate, n, torch.cat(preds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="E4B,31B")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="the first is a warm-up")
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--quant", default="ref4", choices=["ref4", "bf16"])
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from helpers.presets import preset_config
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
        row = {"size": size, "quant": args.quant, "batch": args.batch, "classes": len(names)}
        for new in (128, 8):
            sps, n = time_generate(model, batches, new)
            row[f"generate{new}_img_s"] = round(sps, 3)
        sps, n, _preds = time_score(model, tokenizer, batches, names)
        row["score_img_s"] = round(sps, 3)
        row["images_timed"] = n
        row["ratio_vs_generate128"] = round(row["score_img_s"] / row["generate128_img_s"], 2)
        row["ratio_vs_generate8"] = round(row["score_img_s"] / row["generate8_img_s"], 2)
        row["peak_alloc"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
        results.append(row)
        print(json.dumps(row), flush=True)
        del model, batches
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        (out / "eval_results.json").write_text(json.dumps(results, indent=1))
    lines = ["size     quant  batch  generate-128 img/s  generate-8 img/s  score img/s  ×gen128  ×gen8"]
    for r in results:
        lines.append(f"{r['size']:<8} {r['quant']:<5} {r['batch']:>5}  {r['generate128_img_s']:>18}  "
                     f"{r['generate8_img_s']:>16}  {r['score_img_s']:>11}  {r['ratio_vs_generate128']:>7}  "
                     f"{r['ratio_vs_generate8']:>5}")
    text = "\n".join(lines)
    print(text)


if __name__ == "__main__":
    main()
