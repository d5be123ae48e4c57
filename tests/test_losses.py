"""The labelled-positions loss equals transformers' full-logits loss, and ignores unlabelled positions."""

import pytest
import torch

from helpers.collator import VisionChatCollator
from helpers.data import load_examples
from helpers.losses import full_logits_loss, labelled_index, labelled_positions_loss, softcapped_logits


@pytest.fixture()
def batch(tiny_processor):
    examples = load_examples("digits", "train", size=6, seed=3).examples
    names = load_examples("digits", "train", size=1).class_names
    return VisionChatCollator(tiny_processor, names)(examples)


def test_equals_full_logits_loss(tiny_model, batch):
    torch.manual_seed(0)
    ours = labelled_positions_loss(tiny_model, batch)
    reference = full_logits_loss(tiny_model, batch)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_gradients_match_full_logits_loss(tiny_model, batch):
    ours = torch.autograd.grad(labelled_positions_loss(tiny_model, batch), tiny_model.lm_head.weight)[0]
    reference = torch.autograd.grad(full_logits_loss(tiny_model, batch), tiny_model.lm_head.weight)[0]
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-7)


def test_sum_over_items_gives_the_accumulated_mean(tiny_model, batch):
    n = int((batch["labels"][:, 1:] != -100).sum())
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 3), slice(3, 6))]
    summed = sum(labelled_positions_loss(tiny_model, h, num_items_in_batch=n) for h in halves)
    assert torch.allclose(summed, labelled_positions_loss(tiny_model, batch), rtol=1e-5)


def test_keeps_the_softcap(tiny_model, batch):
    tiny_model.config.get_text_config().final_logit_softcapping = 0.5  # a tight cap changes the loss
    capped = labelled_positions_loss(tiny_model, batch)
    assert torch.allclose(capped, full_logits_loss(tiny_model, batch), rtol=1e-5)
    assert capped > 1.5  # with logits capped at 0.5 nothing is confident


def test_no_labels_is_an_error(tiny_model, batch):
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no labelled tokens"):
        labelled_positions_loss(tiny_model, batch)


def test_labelled_index_finds_the_positions_that_predict_a_label():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    # row 0: positions 1 and 2 predict labels 7 and 8; row 1: position 0 predicts 5 (flat index 4)
    assert labelled_index(labels).tolist() == [1, 2, 4]
    with pytest.raises(ValueError, match="no labelled tokens"):
        labelled_index(torch.full((2, 3), -100))


def test_the_labelled_rows_and_targets_are_those_of_the_boolean_mask(tiny_model, batch):
    from helpers.losses import labelled_logits

    logits, targets = labelled_logits(tiny_model, batch)
    keep = batch["labels"][:, 1:] != -100
    assert torch.equal(targets, batch["labels"][:, 1:][keep])
    hidden = tiny_model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(logits, softcapped_logits(tiny_model, hidden[:, :-1][keep]), atol=1e-5)
