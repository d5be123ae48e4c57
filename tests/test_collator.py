"""The masking collator (helpers/collator.py, notebook 03): properties over random images, budgets and answers."""

import copy
import string

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers.chat import (
    EMPTY_THOUGHT,
    LARGE,
    QUESTION,
    ChatFormatError,
    chat_format,
    render_generation_prompt,
    to_messages,
)
from helpers.collator import (
    IGNORE_INDEX,
    TOKEN_ROLES,
    CollatorError,
    VisionChatCollator,
    mask_prompt_tokens,
    naive_labels,
    token_roles,
    turn_markers,
)
from helpers.run.config import SOFT_TOKEN_BUDGETS

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ANSWER_ALPHABET = string.ascii_letters + string.digits + " -'.,()éü"
answers = st.text(ANSWER_ALPHABET, min_size=1, max_size=24).filter(lambda s: s.strip())
image_sizes = st.tuples(st.integers(4, 320), st.integers(4, 320))


@pytest.fixture(scope="module", params=["large", "e-series"])
def processor(request, tiny_processor, tiny_e_series_processor):
    """Each family's processor (every test here runs under both), as a private copy: these tests change the
    image budget, other modules must not see that."""
    return copy.deepcopy(tiny_processor if request.param == LARGE else tiny_e_series_processor)


def markers(processor):
    return turn_markers(processor, chat_format(processor))


def model_header(processor) -> str:
    """What the family's generation prompt writes after the last <|turn> ("model\\n", + the empty thought)."""
    return chat_format(processor).prompt.rsplit("<|turn>", 1)[1]


def set_budget(processor, budget: int) -> None:
    processor.image_processor.max_soft_tokens = budget
    processor.image_seq_length = budget


def make_examples(sizes, labels):
    return [{"image": Image.new("RGB", size, color=(i * 40 % 256, 90, 200)), "label": label}
            for i, (size, label) in enumerate(zip(sizes, labels))]


def real_tokens(batch, i):
    return batch["input_ids"][i][batch["attention_mask"][i].bool()]


def kept_positions(labels_row):
    return (labels_row != IGNORE_INDEX).nonzero().flatten()


@st.composite
def batches(draw):
    """Class names, a batch of examples with random image sizes, and a collator configuration."""
    class_names = draw(st.lists(answers, min_size=1, max_size=6))
    size = draw(st.integers(1, 4))
    return {
        "class_names": class_names,
        "sizes": draw(st.lists(image_sizes, min_size=size, max_size=size)),
        "labels": draw(st.lists(st.integers(0, len(class_names) - 1), min_size=size, max_size=size)),
        "budget": draw(st.sampled_from(SOFT_TOKEN_BUDGETS)),
        "system": draw(st.one_of(st.none(), st.sampled_from(["You are a helpful assistant.", "Answer briefly."]))),
        "enable_thinking": draw(st.booleans()),
        "padding_side": draw(st.sampled_from(["left", "right"])),
    }


@PROPERTY_SETTINGS
@given(case=batches())
def test_only_the_answer_and_end_of_turn_are_trained(processor, case):
    set_budget(processor, case["budget"])
    options = {"system_prompt": case["system"], "enable_thinking": case["enable_thinking"],
               "padding_side": case["padding_side"]}
    examples = make_examples(case["sizes"], case["labels"])
    train = VisionChatCollator(processor, case["class_names"], mode="train", **options)(examples)
    prompts = VisionChatCollator(processor, case["class_names"], mode="eval", **options)(examples)
    tokenizer = processor.tokenizer
    assert "labels" not in prompts
    for i, label in enumerate(case["labels"]):
        labels = train["labels"][i]
        kept = kept_positions(labels)
        # Exactly the answer and <turn|>, contiguous, and never padding.
        assert tokenizer.decode(labels[kept]) == case["class_names"][label] + tokenizer.eot_token
        assert torch.equal(kept, torch.arange(int(kept[0]), int(kept[-1]) + 1))
        assert bool(train["attention_mask"][i][kept].all())
        # Train what you infer: the sequence up to the answer is the evaluation prompt, token for token.
        prompt, sequence = real_tokens(prompts, i), real_tokens(train, i)
        assert torch.equal(sequence[:len(prompt)], prompt)
        first_kept = int(kept[0]) - int((~train["attention_mask"][i].bool()).cumsum(0)[int(kept[0])])
        assert first_kept == len(prompt)
        # ... and that prompt is what the template itself renders as the generation prompt (served text).
        served = render_generation_prompt(processor, to_messages(system=case["system"]), case["enable_thinking"])
        assert tokenizer.decode(prompt).replace("<|image|>" * int((prompt == tokenizer.image_token_id).sum()),
                                                "<|image|>").replace("<|image><|image|><image|>", "<|image|>") == served
        thought = chat_format(processor).family == LARGE and not case["enable_thinking"]
        assert served.endswith(EMPTY_THOUGHT if thought else "<|turn>model\n")
    assert train["pixel_values"].shape[0] == len(examples)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(image_sizes, min_size=2, max_size=3), budget=st.sampled_from(SOFT_TOKEN_BUDGETS),
       slack=st.integers(-3, 1), padding_side=st.sampled_from(["left", "right"]))
def test_max_length_truncates_or_names_the_cut_sample(processor, sizes, budget, slack, padding_side):
    """Truncation may drop what follows <turn|>, never part of the answer: that is an error naming the sample."""
    set_budget(processor, budget)
    class_names = ["Great Pyrenees", "Pug", "Staffordshire Bull Terrier"]
    examples = make_examples(sizes, [i % 3 for i in range(len(sizes))])
    full = VisionChatCollator(processor, class_names, padding_side=padding_side)(examples)
    lengths = full["attention_mask"].sum(dim=1)
    answer_ends = torch.stack([kept_positions(row)[-1] for row in full["labels"]])
    answer_ends = answer_ends - (~full["attention_mask"].bool()).sum(dim=1) * (padding_side == "left")
    max_length = int(lengths.max()) + slack
    collator = VisionChatCollator(processor, class_names, max_length=max_length, padding_side=padding_side)
    cut = answer_ends + 1 > max_length
    event("answer cut" if cut.any() else ("truncated" if slack < 0 else "fits"))
    if cut.any():
        first = int(cut.nonzero()[0, 0])
        with pytest.raises(CollatorError, match=f"sample {first} .*{class_names[first % 3]}.*max_length"):
            collator(examples)
        return
    batch = collator(examples)
    assert batch["input_ids"].shape[1] <= max_length
    for i in range(len(examples)):
        labels = batch["labels"][i]
        assert processor.tokenizer.decode(labels[kept_positions(labels)]) == class_names[i % 3] + "<turn|>"


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_truncation_may_drop_only_what_follows_end_of_turn(processor, padding_side):
    set_budget(processor, 70)
    examples = make_examples([(32, 32), (300, 32)], [0, 1])
    full = VisionChatCollator(processor, ["Pug", "Great Pyrenees"], padding_side=padding_side)(examples)
    longest = int(full["attention_mask"].sum(dim=1).max())
    batch = VisionChatCollator(processor, ["Pug", "Great Pyrenees"], max_length=longest - 1,
                               padding_side=padding_side)(examples)
    assert batch["input_ids"].shape[1] == longest - 1
    for labels, name in zip(batch["labels"], ["Pug", "Great Pyrenees"]):
        assert processor.tokenizer.decode(labels[kept_positions(labels)]) == name + "<turn|>"
    with pytest.raises(CollatorError, match="sample 0 \\('Pug'\\): max_length=.* cuts into the answer"):
        VisionChatCollator(processor, ["Pug", "Great Pyrenees"], max_length=longest - 2,
                           padding_side=padding_side)(examples)


def test_image_soft_tokens_vary_and_the_mask_follows(processor):
    """Different sizes and budgets give different N; the labels are the answer every time."""
    counts = set()
    for budget in (70, 280):
        set_budget(processor, budget)
        examples = make_examples([(32, 32), (300, 40), (40, 300), (500, 375)], [0, 1, 0, 1])
        batch = VisionChatCollator(processor, ["cat", "dog"])(examples)
        counts |= set((batch["input_ids"] == processor.tokenizer.image_token_id).sum(dim=1).tolist())
        for labels, name in zip(batch["labels"], ["cat", "dog"] * 2):
            assert processor.tokenizer.decode(labels[kept_positions(labels)]) == name + "<turn|>"
    assert len(counts) >= 4, counts


def test_the_naive_prompt_length_is_misaligned(processor):
    """Counting the prompt on the template text leaves N + 1 image and prompt tokens trained."""
    set_budget(processor, 70)
    tokenizer = processor.tokenizer
    collator = VisionChatCollator(processor, ["seven"], padding_side="right")
    batch = collator(make_examples([(32, 32)], [0]))
    template_prompt = processor.apply_chat_template(to_messages(QUESTION), tokenize=False, add_generation_prompt=True)
    naive_length = len(tokenizer(template_prompt, add_special_tokens=False)["input_ids"])
    naive = naive_labels(batch["input_ids"], batch["attention_mask"], [naive_length])[0]
    right = batch["labels"][0]
    soft_tokens = int((batch["input_ids"][0] == tokenizer.image_token_id).sum())
    assert tokenizer.decode(right[kept_positions(right)]) == "seven<turn|>"
    naive_text = tokenizer.decode(naive[kept_positions(naive)])
    assert naive_text != "seven<turn|>" and "<|image|>" in naive_text and QUESTION in naive_text
    # The naive mask starts N + 1 tokens early: <|image|> became <|image>, N soft tokens and <image|>.
    assert int(kept_positions(right)[0] - kept_positions(naive)[0]) == soft_tokens + 1


def test_left_and_right_padding_give_the_same_loss(processor, tiny_model):
    set_budget(processor, 70)
    examples = make_examples([(32, 32), (64, 20), (20, 64)], [0, 1, 2])
    losses = []
    for side in ("left", "right"):
        batch = VisionChatCollator(processor, ["zero", "one hundred and one", "two"], padding_side=side)(examples)
        with torch.no_grad():
            losses.append(tiny_model(**batch).loss)
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)


def test_explicit_answer_wins_over_label(processor):
    set_budget(processor, 70)
    examples = make_examples([(32, 32)], [0])
    examples[0]["answer"] = "a seven, surely"
    batch = VisionChatCollator(processor, ["zero"])(examples)
    labels = batch["labels"][0]
    assert processor.tokenizer.decode(labels[kept_positions(labels)]) == "a seven, surely<turn|>"


def test_a_template_of_neither_family_is_refused_with_what_was_expected(processor):
    odd = copy.deepcopy(processor)
    odd.chat_template = odd.chat_template.replace("\\n\\n<|image|>\\n\\n", "<|image|>")
    with pytest.raises(ChatFormatError, match="matches neither Gemma 4 family(.|\n)*rendered: .*<\\|image\\|>\\?"
                                              "(.|\n)*expected one of(.|\n)*large(.|\n)*e-series"):
        VisionChatCollator(odd, ["nine"])


def test_missing_marker_names_the_sample(processor):
    tokenizer = processor.tokenizer
    good = tokenizer(f"<bos><|turn>{model_header(processor)}five<turn|>", add_special_tokens=False)["input_ids"]
    bad = tokenizer("<bos>six<turn|>", add_special_tokens=False)["input_ids"]
    padding = len(good) - len(bad)
    ids = torch.tensor([good, bad + [tokenizer.pad_token_id] * padding])
    mask = torch.tensor([[1] * len(good), [1] * len(bad) + [0] * padding])
    with pytest.raises(CollatorError, match=r"sample 1 \('six'\): no <\|turn> marker"):
        mask_prompt_tokens(ids, mask, markers(processor), names=["five", "six"])


def test_user_turn_last_is_not_mistaken_for_the_answer(processor):
    ids = torch.tensor([processor.tokenizer("<bos><|turn>user\nhi<turn|>", add_special_tokens=False)["input_ids"]])
    with pytest.raises(CollatorError, match="sample 0: the last <\\|turn> is not followed by the model header"):
        mask_prompt_tokens(ids, torch.ones_like(ids), markers(processor))


def test_missing_end_of_turn_is_an_error(processor):
    text = f"<bos><|turn>{model_header(processor)}five"
    ids = torch.tensor([processor.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with pytest.raises(CollatorError, match="sample 0: no closing <turn\\|>"):
        mask_prompt_tokens(ids, torch.ones_like(ids), markers(processor))


@pytest.mark.parametrize("class_names, example, message", [
    (["  "], {"label": 0}, "sample 0 .*empty"),
    (["<|turn>model"], {"label": 0}, "sample 0 .*special token"),
    (["one"], {"label": 3}, "sample 0: label 3"),
    (["one"], {"label": 0, "answer": ""}, "sample 0 .*empty"),
])
def test_bad_answers_are_refused(processor, class_names, example, message):
    example = {"image": Image.new("RGB", (16, 16)), **example}
    with pytest.raises(CollatorError, match=message):
        VisionChatCollator(processor, class_names)([example])


def test_eval_prompt_longer_than_max_length_is_an_error(processor):
    set_budget(processor, 70)
    collator = VisionChatCollator(processor, ["one"], mode="eval", max_length=20)
    with pytest.raises(CollatorError, match="sample 0 .*prompt is longer than max_length=20"):
        collator(make_examples([(32, 32)], [0]))


def test_errors_name_the_data_set_row_of_validated_examples(processor):
    # examples that went through helpers.validation carry their row: a failing batch names it
    from helpers.data import load_examples

    set_budget(processor, 70)
    digits = load_examples("digits", "test", size=6)
    assert [ex["row"] for ex in digits.examples] == list(range(6))
    collator = VisionChatCollator(processor, digits.class_names, mode="eval", max_length=20)
    name = digits.class_names[digits.examples[4]["label"]]
    with pytest.raises(CollatorError, match=f"sample 0 \\(row 4 of the data set, '{name}'\\): the prompt is longer"):
        collator(digits.examples[4:])


def test_greyscale_images_are_converted(processor):
    set_budget(processor, 70)
    batch = VisionChatCollator(processor, ["one"])([{"image": Image.new("L", (30, 20)), "label": 0}])
    assert batch["pixel_values"].shape[-1] == 3 * processor.image_processor.patch_size ** 2
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_position_ids", "mm_token_type_ids",
                          "labels"}


def test_token_roles_partition_the_batch(processor):
    set_budget(processor, 70)
    batch = VisionChatCollator(processor, ["Pug", "Great Pyrenees"])(make_examples([(32, 32), (160, 20)], [0, 1]))
    roles = token_roles(batch, processor.tokenizer)
    soft_tokens = (batch["input_ids"] == processor.tokenizer.image_token_id).sum(dim=1)
    assert torch.equal((roles == TOKEN_ROLES.index("image")).sum(dim=1), soft_tokens + 2)
    assert torch.equal(roles == TOKEN_ROLES.index("trained"), batch["labels"] != IGNORE_INDEX)
    assert torch.equal(roles == TOKEN_ROLES.index("padding"), batch["attention_mask"] == 0)
