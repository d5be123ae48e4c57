"""How much of the digit reaches the answer position of the *untrained* tiny Gemma 4: linear probes.

A logistic regression is fitted on the frozen random model's features of the 1,347 training digits and
scored on the 450 held-out ones, at two places:
- ``soft``: the image's soft tokens as they enter the text model (all 64 of them, concatenated);
- ``last``: the text model's final hidden state at the answer position (what ``lm_head`` reads).

A random model that already carries the digit to the answer position gives LoRA something to pick up; one
that loses it there has to learn attention from scratch. ``--qk`` and ``--pos-std`` set the scales that
``helpers.tiny`` chooses (``scale_attention_norms``, ``reinit_vision_positions``), to compare them. From the
repository root:

    python -m benchmarks.tiny_probe                            # as helpers.tiny builds it
    python -m benchmarks.tiny_probe --qk 2.378 --pos-std 0.02  # transformers' scales: norms at ones (32**0.25)
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch


def features(model, processor, examples, class_names, batch_size: int = 100):
    from helpers.collator import VisionChatCollator

    collate, captured, soft, last = VisionChatCollator(processor, class_names, mode="eval"), {}, [], []
    hook = model.model.embed_vision.register_forward_hook(lambda m, a, out: captured.__setitem__("soft", out))
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        batch = collate(part)
        with torch.no_grad():
            out = model.model(**batch, use_cache=False)
        soft.append(captured["soft"].reshape(len(part), -1))
        last.append(out.last_hidden_state[:, -1])
    hook.remove()
    return torch.cat(soft).numpy(), torch.cat(last).numpy()


def main(argv=None):
    from sklearn.linear_model import LogisticRegression

    from helpers.data import load_digits_examples
    from helpers.modeling import load_model, load_processor
    from helpers.tiny import build_tiny_gemma4, reinit_vision_positions, scale_attention_norms

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiny_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the tiny checkpoint's seed")
    parser.add_argument("--qk", type=float, help="q/k norm scales = qk * head_dim**-0.25 (default: as built)")
    parser.add_argument("--pos-std", type=float, help="redraw the vision position table at this std")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = build_tiny_gemma4(tempfile.mkdtemp(), seed=args.seed)
    processor, model = load_processor(str(path)), load_model(str(path), dtype=torch.float32)
    if args.qk is not None:
        scale_attention_norms(model, args.qk)
    if args.pos_std is not None:
        reinit_vision_positions(model, args.pos_std, generator=torch.Generator().manual_seed(args.seed))
    train, test = load_digits_examples("train"), load_digits_examples("test")
    train_feats = features(model, processor, train.examples, train.class_names)
    test_feats = features(model, processor, test.examples, train.class_names)
    y_train = np.array([e["label"] for e in train.examples])
    y_test = np.array([e["label"] for e in test.examples])
    result = {"seed": args.seed, "qk": args.qk, "pos_std": args.pos_std}
    for name, a, b in zip(("soft", "last"), train_feats, test_feats):
        result[f"probe_{name}"] = round(LogisticRegression(max_iter=3000).fit(a, y_train).score(b, y_test), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
