"""Float32 scores at real shape: the tree and the cache copies against naive full forward passes (one per class).

Random weights, the eval bench's prompts (no padding), and ``tests/reference.py``'s ``naive_class_scores`` (one
full forward pass per class name) as the reference: in float32 the two shipped methods must agree with it up to
rounding, so a difference here is a bug, not precision. Prints, per image, the largest difference of each method
from the reference and whether the argmax agrees.

    python -m benchmarks.scoring_precision --size E4B --images 2 --out $OUT    # on a GPU, from the repository root
    python -m benchmarks.scoring_precision --size E4B --images 1 --shrink      # a CPU smoke test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.gpu_eval_bench import prompt_batch
from benchmarks.realshape import build_model, shrunk_config
from helpers.data import PET_BREEDS
from helpers.scoring import score_class_names
from helpers.tiny import build_tokenizer
from tests.reference import naive_class_scores


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scoring_precision", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="E4B")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    from helpers.teaching.presets import preset_config

    config = shrunk_config(args.size) if args.shrink else preset_config(args.size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(config, "none", device=device, dtype=torch.float32)
    tokenizer = build_tokenizer()
    names = list(PET_BREEDS)
    batch = {k: v.to(device) for k, v in prompt_batch(config, args.images, args.size).items()}
    with torch.no_grad():
        tree = score_class_names(model, tokenizer, batch, names, method="tree")
        copies = score_class_names(model, tokenizer, batch, names, method="copies")
        rows = []
        for b in range(args.images):
            extra = {k: batch[k][b:b + 1] for k in ("pixel_values", "image_position_ids", "mm_token_type_ids")}
            naive = naive_class_scores(model, tokenizer, batch["input_ids"][b], extra, names)
            rows.append({"image": b, "tree_vs_naive": float((tree[b] - naive).abs().max()),
                         "copies_vs_naive": float((copies[b] - naive).abs().max()),
                         "tree_vs_copies": float((tree[b] - copies[b]).abs().max()),
                         "argmax": [int(naive.argmax()), int(tree[b].argmax()), int(copies[b].argmax())],
                         "top2_gap": float(naive.topk(2).values.diff().abs())})
    out = {"size": args.size, "dtype": "float32", "tf32": torch.backends.cuda.matmul.allow_tf32, "rows": rows}
    print(json.dumps(out), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "scoring_precision.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
