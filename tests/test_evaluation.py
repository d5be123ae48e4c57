"""Evaluation pieces: class-name matching, constrained scores against a direct computation, metrics."""

import torch

from helpers.collator import VisionChatCollator
from helpers.data import PET_BREEDS, load_examples
from helpers.evaluation import (
    Predictions,
    confusion_matrix,
    constrained_scores,
    match_class_name,
    metrics_for,
)


def test_match_prefers_the_longest_whole_name():
    names = list(PET_BREEDS)
    assert match_class_name("It is an American Pit Bull Terrier.", names) == "American Pit Bull Terrier"
    assert match_class_name("a pug, I think", names) == "Pug"
    assert match_class_name("Pugnacious cat", names) is None
    assert match_class_name("", names) is None


def test_constrained_scores_match_full_forward_passes(tiny_model, tiny_processor):
    data = load_examples("digits", "test", size=3)
    names = data.class_names
    scores = constrained_scores(tiny_model, tiny_processor, data.examples, names, batch_size=2, progress=False)
    assert scores.shape == (3, len(names))
    collator = VisionChatCollator(tiny_processor, names)
    for column, name in list(enumerate(names))[:4]:
        batch = collator([{"image": e["image"], "answer": name} for e in data.examples])
        with torch.no_grad():
            logits = tiny_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        for row in range(3):
            positions = (batch["labels"][row, 1:] != -100).nonzero().flatten()
            expected = sum(logprobs[row, p, batch["labels"][row, p + 1]] for p in positions)
            assert torch.allclose(scores[row, column], expected, atol=1e-4)


def test_metrics_and_confusion_matrix():
    names = ["zero", "one"]
    predictions = Predictions(constrained=["zero", "one", "one"], generated=["zero", None, "zero"],
                              generated_text=["zero", "?", "zero"])
    metrics = metrics_for(predictions, ["zero", "one", "zero"], names)
    assert metrics["constrained"]["accuracy"] == 2 / 3
    assert metrics["generation"]["no_class_named_rate"] == 1 / 3
    assert confusion_matrix(["zero", "one", "zero"], ["zero", "one", "one"], names).tolist() == [[1, 1], [0, 1]]
