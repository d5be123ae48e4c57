"""Would bucketing by length pay? Padding in Gemma 4 training batches, random vs length-sorted order.

Gemma 4's image processor resizes every image to fill the soft-token budget (``max_soft_tokens``), keeping
its aspect ratio (transformers' ``get_aspect_ratio_preserving_size``, the real rule, used here). The vision
tower then runs on a fixed 9 x budget patches (padded), whatever the image. So only the text model's
sequence varies: the soft tokens (with the aspect ratio) plus the answer (a class name of a few tokens).
This script prints, for images of common photo shapes and 1-4 token answers (the benchmarks' synthetic
stream), the share of text-model tokens that are padding when batches are drawn at random and when they are
grouped by length as transformers' ``LengthGroupedSampler`` does (mega-batches of 50 batches, sorted).

    python -m benchmarks.length_spread [--budget 280] [--micro-batches 8,16,32]
"""

from __future__ import annotations

import argparse
import random

from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

PATCH, POOLING = 16, 3
# height x width of photos as cameras and data sets give them (Oxford-IIIT Pet is mostly 4:3 and 3:4 at
# ~500 px); square, 3:2, 16:9 and 2:1, both ways round
SHAPES = [(500, 500), (375, 500), (500, 375), (333, 500), (500, 333), (281, 500), (500, 281), (250, 500),
          (500, 250)]
TEXT_TOKENS = 25  # <bos>, turn markers, <|image>/<image|>, a 12-token prompt: realshape.synthetic_batch
ANSWER_TOKENS = (1, 2, 3, 4)


def soft_tokens(height: int, width: int, budget: int) -> int:
    h, w = get_aspect_ratio_preserving_size(height, width, PATCH, budget * POOLING**2, POOLING)
    return (h // (PATCH * POOLING)) * (w // (PATCH * POOLING))


def padding_share(lengths: list[int], micro_batch: int) -> float:
    """Padded positions / all positions when each batch is padded to its longest row."""
    padded = sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
                 for i in range(0, len(lengths), micro_batch))
    return 1 - sum(lengths) / padded


def grouped(lengths: list[int], micro_batch: int, rng: random.Random) -> list[int]:
    """LengthGroupedSampler's order: shuffle, cut into mega-batches of 50 batches, sort each by length."""
    order = lengths[:]
    rng.shuffle(order)
    mega = 50 * micro_batch
    return [x for i in range(0, len(order), mega) for x in sorted(order[i:i + mega], reverse=True)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.length_spread", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=280)
    parser.add_argument("--micro-batches", default="8,16,32")
    parser.add_argument("--samples", type=int, default=3680, help="one epoch (Pet's trainval split: 3,680)")
    args = parser.parse_args(argv)

    print(f"soft tokens at budget {args.budget} (vision tower: always {9 * args.budget} patches, padded):")
    for h, w in SHAPES:
        print(f"  {h:>3} x {w:<3} -> {soft_tokens(h, w, args.budget)}")
    rng = random.Random(0)
    lengths = [soft_tokens(*rng.choice(SHAPES), args.budget) + TEXT_TOKENS + rng.choice(ANSWER_TOKENS)
               for _ in range(args.samples)]
    print(f"sequence lengths {min(lengths)}-{max(lengths)}; share of text-model tokens that are padding:")
    print("  micro-batch   random order   grouped by length")
    for mb in (int(x) for x in args.micro_batches.split(",")):
        print(f"  {mb:>11}   {padding_share(lengths, mb):>12.1%}   {padding_share(grouped(lengths, mb, rng), mb):>17.1%}")


if __name__ == "__main__":
    main()
