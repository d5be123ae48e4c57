"""One held-out digit as each chat-template family trains and serves it: the training text, the evaluation
prompt (soft tokens collapsed) and the tokens that carry a label, to check by eye that the model is trained on
its answer only and served the prefix it was trained on.

    python -m benchmarks.show_one_sample            # both offline families, thinking off
    python -m benchmarks.show_one_sample --thinking
"""

from __future__ import annotations

import argparse
import re

from helpers.collator import IGNORE_INDEX, VisionChatCollator
from helpers.data import DIGIT_NAMES, load_digits_examples
from helpers.modeling import load_processor
from helpers.run.config import resolve_model_id


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.show_one_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--thinking", action="store_true")
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-e-series"])
    args = parser.parse_args(argv)
    for model_id in args.models:
        show(model_id, args.thinking)


if __name__ == "__main__":
    main()
