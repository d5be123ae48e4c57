"""Where the answer's logits are computed: transformers' ``logits_to_keep`` given the answer's positions (what
training ships) against the model's own full-vocabulary loss, in one run, on real-shape random-weight Gemma 4 (or the
shrunk configs).

    python -m benchmarks.answer_logits --sizes E4B,31B --out $OUT          # one GPU
    python -m benchmarks.answer_logits --shrink --sizes E4B --batch 2       # CPU smoke test (numbers compare nothing)

Per size: forward + backward of one micro-batch (``benchmarks.realshape.synthetic_batch``), the mean of
``--repeats`` timed steps after a warm-up, and the peak memory of a step. ``answer`` is
``benchmarks.realshape.answer_loss`` (the collator's ``logits_to_keep`` positions, then
``helpers.training.answer_only_loss``); ``full`` is ``model(**batch, labels=...).loss``. The losses must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.realshape import answer_loss, build_model, shrunk_config, synthetic_batch
from helpers.modeling import apply_lora
from helpers.teaching.presets import preset_config


def full_loss(model, batch):
    return model(**batch, use_cache=False).loss


def timed(loss_of, model, batch, repeats: int, device) -> dict:
    """Seconds per forward + backward (mean of ``repeats`` after one warm-up), the peak memory, the loss."""
    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        return loss.detach()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds": statistics.mean(seconds), "peak_bytes": peak, "loss": float(loss)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.answer_logits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="E4B,31B")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shrink", action="store_true", help="shrunk configs (a CPU smoke test)")
    parser.add_argument("--out", default=None, help="folder for answer_logits.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for size in args.sizes.split(","):
        config = shrunk_config(size) if args.shrink else preset_config(size)
        quantization = "4bit" if size == "31B" and device.type == "cuda" else "none"
        model = apply_lora(build_model(config, quantization, device=device, dtype=dtype), r=16, alpha=16)
        model.train()
        batch = synthetic_batch(config, args.batch, soft_tokens=16 if args.shrink else 256, device=device)
        results = {name: timed(loss_of, model, batch, args.repeats, device)
                   for name, loss_of in (("answer", answer_loss), ("full", full_loss))}
        row = {"size": size, "quantization": quantization, "micro_batch": args.batch, **results,
               "full_over_answer_seconds": results["full"]["seconds"] / results["answer"]["seconds"],
               "loss_difference": abs(results["full"]["loss"] - results["answer"]["loss"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "answer_logits.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
