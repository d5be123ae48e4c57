"""One held-out digit as each chat-template family trains and serves it: the training text, the evaluation
prompt (soft tokens collapsed) and the tokens that carry a label.

    python benchmarks/show_one_sample.py            # both offline families, thinking off
    python benchmarks/show_one_sample.py --thinking
"""

from __future__ import annotations

import argparse
import re

from helpers.collator import VisionChatCollator
from helpers.config import resolve_model_id
from helpers.data import DIGIT_NAMES, load_digits_examples
from helpers.losses import IGNORE_INDEX
from helpers.modeling import load_processor


def collapse_soft_tokens(text: str) -> str:
    """``<|image|>`` repeated N times -> ``<|image|>×N``, so a prompt fits on a screen."""
    return re.sub(r"(<\|image\|>)+", lambda m: f"<|image|>×{len(m.group(0)) // len('<|image|>')}", text)


def show(model_id: str, enable_thinking: bool) -> None:
    processor = load_processor(resolve_model_id(model_id))
    example = load_digits_examples("test", size=1)[0]
    train = VisionChatCollator(processor, DIGIT_NAMES, enable_thinking=enable_thinking)
    serve = VisionChatCollator(processor, DIGIT_NAMES, enable_thinking=enable_thinking, mode="eval")
    batch = train([example])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    texts = {"training text": processor.tokenizer.decode(ids), "evaluation prompt":
             processor.tokenizer.decode(serve([example])["input_ids"][0])}
    print(f"== {model_id} (family {train.chat.family}, thinking {'on' if enable_thinking else 'off'}), "
          f"label {DIGIT_NAMES[example['label']]!r}")
    for name, text in texts.items():
        print(f"{name}: {collapse_soft_tokens(text)!r}")
    labelled = [(int(i), processor.tokenizer.convert_ids_to_tokens(int(i))) for i, y in zip(ids, labels)
                if int(y) != IGNORE_INDEX]
    print(f"labelled tokens ({len(labelled)} of {len(ids)}): {labelled}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thinking", action="store_true")
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-e-series"])
    args = parser.parse_args()
    for model_id in args.models:
        show(model_id, args.thinking)


if __name__ == "__main__":
    main()
