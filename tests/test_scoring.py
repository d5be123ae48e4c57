"""helpers.scoring: cached class-name scoring equals naive full forward passes (tiny model, CPU)."""

import pytest
import torch
from reference import naive_class_scores

from helpers.chat import QUESTION, to_messages
from helpers.data import DIGIT_NAMES, load_digits_examples
from helpers.scoring import (
    _takes_custom_masks,
    answer_tree,
    class_token_ids,
    score_class_names,
)

QUESTIONS = [QUESTION, "Which digit is this? Answer with its name.", QUESTION + " One word."]


@pytest.fixture(scope="module")
def prompts(tiny_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_path)
    processor.tokenizer.padding_side = "left"
    examples = load_digits_examples("test", size=len(QUESTIONS), seed=3).examples
    texts = [processor.apply_chat_template(to_messages(q), tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    batch = processor(text=texts, images=[[e["image"]] for e in examples], padding=True, return_tensors="pt")
    return processor, batch


@pytest.fixture(scope="module")
def model(tiny_path):
    from transformers import AutoModelForMultimodalLM

    return AutoModelForMultimodalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


def test_prompts_are_left_padded_with_different_lengths(prompts):
    _, batch = prompts
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1, "the test needs padding to mean something"
    assert bool(batch["attention_mask"][:, -1].all())


@pytest.fixture(scope="module")
def narrow_window_model(tiny_path):
    """The tiny model with a sliding window of 24 tokens, shorter than the prompts: the cache of its sliding
    layers keeps only the last 23 prompt tokens, as a long prompt does on a released model."""
    from transformers import AutoConfig, AutoModelForMultimodalLM

    config = AutoConfig.from_pretrained(tiny_path)
    config.text_config.sliding_window = 24
    return AutoModelForMultimodalLM.from_pretrained(tiny_path, config=config, dtype=torch.float32).eval()


def _check_against_naive(model, processor, batch, names, fast):
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool()
        extra = {"pixel_values": batch["pixel_values"][b:b + 1], "image_position_ids": batch["image_position_ids"][b:b + 1],
                 "mm_token_type_ids": batch["mm_token_type_ids"][b:b + 1, keep]}
        slow = naive_class_scores(model, processor.tokenizer, batch["input_ids"][b, keep], extra, names)
        torch.testing.assert_close(fast[b], slow, atol=1e-3, rtol=1e-4)
        assert fast[b].argmax() == slow.argmax()


@pytest.mark.parametrize("method", ["tree", "copies"])
def test_cached_scores_equal_naive_forward_passes(prompts, model, method):
    processor, batch = prompts
    names = list(DIGIT_NAMES)
    assert _takes_custom_masks(model)  # SDPA: the tree is what runs, not the fallback
    fast = score_class_names(model, processor, batch, names, max_logit_bytes=1, method=method)  # 1 byte: smallest chunks
    fast_one_chunk = score_class_names(model, processor, batch, names, method=method)
    torch.testing.assert_close(fast, fast_one_chunk, atol=1e-4, rtol=1e-4)
    _check_against_naive(model, processor, batch, names, fast)


@pytest.mark.parametrize("method", ["tree", "copies"])
def test_scores_with_a_window_shorter_than_the_prompt(prompts, narrow_window_model, method):
    processor, batch = prompts
    assert int(batch["attention_mask"].sum(-1).min()) > 24
    names = list(DIGIT_NAMES) + ["seventy seven", "seven hundred", "nine nine nine"]  # shared first tokens
    fast = score_class_names(narrow_window_model, processor, batch, names, method=method)
    _check_against_naive(narrow_window_model, processor, batch, names, fast)


def test_tree_shares_the_names_first_tokens(prompts):
    processor, _ = prompts
    names = ["seven", "seventy seven", "seven hundred"]
    candidates = class_token_ids(processor.tokenizer, names)
    tokens, parents, depths, steps = answer_tree(candidates)
    assert len(tokens) < sum(len(c) - 1 for c in candidates)  # "seven" is fed once for the three
    for answer, pairs in zip(candidates, steps):
        assert [t for _, t in pairs] == answer[1:]
        node, _ = pairs[-1]
        path = []
        while node >= 0:  # the last node's ancestors spell the answer's fed tokens
            path.append(tokens[node])
            node = parents[node]
        assert path[::-1] == answer[:-1] and depths[pairs[-1][0]] == len(answer) - 1


def test_scores_are_log_likelihoods(prompts, model):
    processor, batch = prompts
    scores = score_class_names(model, processor, batch, list(DIGIT_NAMES))
    assert scores.shape == (batch["input_ids"].shape[0], len(DIGIT_NAMES))
    assert bool((scores < 0).all()) and bool(torch.isfinite(scores).all())


def test_right_padding_is_refused(prompts, model):
    processor, batch = prompts
    flipped = dict(batch)
    flipped["attention_mask"] = batch["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="left-padded"):
        score_class_names(model, processor, flipped, list(DIGIT_NAMES))


def test_class_tokens_end_with_end_of_turn(prompts):
    processor, _ = prompts
    ids = class_token_ids(processor.tokenizer, ["seven", "Great Pyrenees"])
    end = processor.tokenizer.convert_tokens_to_ids("<turn|>")
    assert all(c[-1] == end and len(c) >= 2 for c in ids)


def test_tree_scores_on_the_e_series_format(tiny_e_series_path):
    """The E2B/E4B miniature (per-layer inputs, clipped vision tower, causal attention over the image)."""
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_e_series_path)
    processor.tokenizer.padding_side = "left"
    examples = load_digits_examples("test", size=2, seed=5).examples
    texts = [processor.apply_chat_template(to_messages(q), tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS[:2]]
    batch = processor(text=texts, images=[[e["image"]] for e in examples], padding=True, return_tensors="pt")
    model = AutoModelForMultimodalLM.from_pretrained(tiny_e_series_path, dtype=torch.float32).eval()
    names = list(DIGIT_NAMES)
    _check_against_naive(model, processor, batch, names, score_class_names(model, processor, batch, names))
