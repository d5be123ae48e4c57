"""The masking collator: train only on the answer, found by a backward search. Taught in notebook 03.

This file and ``helpers/chat.py`` import nothing else of this package: copy the two into your own project.

Gemma 4 turns each image into a variable number N of soft tokens (it depends on the image's size and on
the budget, ``max_soft_tokens`` ∈ 70..1120), so the prompt's length cannot be computed from the text. The
collator lets the processor expand the images first, then searches ``input_ids`` backward for the last
``<|turn>`` (the model turn), skips its ``model\\n`` header (and an empty thought block when present) and
keeps labels only from there to the closing ``<turn|>``.

The training sequence is built as *the evaluation prompt* + answer + ``<turn|>`` + what the template
writes after a model turn, so its prefix is token-for-token what the model sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

# Relative, so that this file and chat.py work in whatever package you copy them into.
from .chat import QUESTION, ChatFormat, chat_format, special_token

IGNORE_INDEX = -100  # the label of a position that is not trained (PyTorch's cross-entropy default)
# What Gemma4ForConditionalGeneration.forward takes from the processor's output; the rest
# (e.g. num_soft_tokens_per_image) would be an unexpected keyword argument.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "mm_token_type_ids")
# Tensors with one entry per token: truncated and re-padded together, with these padding values.
TOKEN_PAD_VALUES = {"attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}


class CollatorError(ValueError):
    """A sample cannot be trained on as built (no model turn, answer cut by ``max_length``...)."""


@dataclass(frozen=True)
class TurnMarkers:
    """Token ids that delimit the model's answer, read from the tokenizer and the chat template."""

    start_of_turn: int  # <|turn>
    end_of_turn: int  # <turn|>
    header: tuple[int, ...]  # what the generation prompt writes after the last <|turn>: "model\n" (+ empty thought)


def token_id(tokenizer, attribute: str) -> int:
    """The id of a named special token, read from the tokenizer, never a hard-coded number."""
    token = special_token(tokenizer, attribute)
    token_ids = tokenizer.convert_tokens_to_ids([token])
    if token_ids[0] is None or token_ids[0] == tokenizer.unk_token_id:
        raise CollatorError(f"the tokenizer has no {attribute} special token ({token!r}); is this Gemma 4?")
    return token_ids[0]


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokens_after_last(tokenizer, text: str, marker: str) -> tuple[int, ...]:
    """Token ids of ``text`` after its last ``marker``, tokenized in context (as the processor will)."""
    ids = text_ids(tokenizer, text)
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    last = max(i for i, t in enumerate(ids) if t == marker_id)
    return tuple(ids[last + 1:])


def turn_markers(processor, chat: ChatFormat) -> TurnMarkers:
    """The markers of ``chat``'s model turn: the answer starts right where the evaluation prompt ends."""
    tokenizer = processor.tokenizer
    start, end = token_id(tokenizer, "sot_token"), token_id(tokenizer, "eot_token")
    return TurnMarkers(start, end, tokens_after_last(tokenizer, chat.prompt, special_token(tokenizer, "sot_token")))


def check_prompt_is_prefix(tokenizer, chat: ChatFormat, answers) -> None:
    """Each answer's training sequence must be the evaluation prompt's tokens followed by the answer's own
    tokens (as scoring encodes it, ``helpers.scoring``), not merely the same text: a tokenizer that merged
    the prompt's last piece with the answer would train a prefix that is never served."""
    prompt = text_ids(tokenizer, chat.prompt)
    for answer in answers:
        full = text_ids(tokenizer, chat.training_text(answer))
        alone = text_ids(tokenizer, answer)
        if full[:len(prompt)] != prompt or full[len(prompt):len(prompt) + len(alone)] != alone:
            raise CollatorError(f"the answer {answer!r} tokenizes differently after the prompt: "
                                f"{tokenizer.convert_ids_to_tokens(full[len(prompt) - 2:])} against the prompt's "
                                f"end {tokenizer.convert_ids_to_tokens(prompt[-2:])} + {tokenizer.convert_ids_to_tokens(alone)}")


def image_sequence_length(processor) -> int:
    """The most tokens one image can take in a sequence: ``<|image>``, up to the budget's soft tokens
    (``max_soft_tokens``; fewer when the image's shape does not fill it), ``<image|>``."""
    return processor.image_processor.max_soft_tokens + 2


def longest_training_sequence(processor, class_names, question: str = QUESTION, system_prompt: str | None = None,
                              enable_thinking: bool = False) -> int:
    """The most tokens a training sequence of these class names can take, measured without an image: the
    longest answer's training text, its one ``<|image|>`` placeholder counted as the whole image at the
    processor's budget (``image_sequence_length``). No example the collator builds is longer."""
    chat = chat_format(processor, question, system_prompt, enable_thinking)
    text = max(len(text_ids(processor.tokenizer, chat.training_text(answer))) for answer in class_names)
    return text - 1 + image_sequence_length(processor)


# -- the backward search, one small step per function (notebook 03 shows each) ------------------------

def last_marker_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker_id: int) -> torch.Tensor:
    """Per sample, the position of the last ``marker_id`` among real tokens; -1 where there is none.

    Searching backward from the end (the largest position) finds the model turn whatever the padding
    side and however many soft tokens the images were expanded to.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    found = (input_ids == marker_id) & attention_mask.bool()
    return torch.where(found, positions, -1).amax(dim=1)


def matches_at(input_ids: torch.Tensor, starts: torch.Tensor, pattern: tuple[int, ...]) -> torch.Tensor:
    """Per sample, whether ``pattern`` occurs at ``starts`` (False where it would run off the end)."""
    if not pattern:
        return torch.ones_like(starts, dtype=torch.bool)
    offsets = torch.arange(len(pattern), device=input_ids.device)
    index = starts[:, None] + offsets
    inside = (index >= 0) & (index < input_ids.shape[1])
    window = input_ids.gather(1, index.clamp(0, input_ids.shape[1] - 1))
    expected = torch.tensor(pattern, device=input_ids.device)
    return ((window == expected) & inside).all(dim=1)


def answer_starts(input_ids: torch.Tensor, attention_mask: torch.Tensor, markers: TurnMarkers,
                  names=None) -> torch.Tensor:
    """Per sample, the first answer position: after the last ``<|turn>`` and the generation prompt's header."""
    turn = last_marker_positions(input_ids, attention_mask, markers.start_of_turn)
    _raise_for(turn < 0, f"no <|turn> marker (id {markers.start_of_turn}): no model turn", names)
    starts = turn + 1
    _raise_for(~matches_at(input_ids, starts, markers.header),
               "the last <|turn> is not followed by the model header (not a model turn, or cut)", names)
    return starts + len(markers.header)


def answer_ends(input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor,
                end_of_turn: int) -> torch.Tensor:
    """Per sample, the position of the first ``<turn|>`` at or after ``starts``; -1 where there is none."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    found = (input_ids == end_of_turn) & attention_mask.bool() & (positions >= starts[:, None])
    big = input_ids.shape[1]
    first = torch.where(found, positions, big).amin(dim=1)
    return torch.where(first == big, -1, first)


def mask_prompt_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, markers: TurnMarkers,
                       names=None) -> torch.Tensor:
    """Labels that keep only the answer and its closing ``<turn|>``; prompt, image and padding are -100.

    Taught in notebook 03. ``names`` (one per sample, e.g. the class names) only make errors readable.
    """
    starts = answer_starts(input_ids, attention_mask, markers, names)
    ends = answer_ends(input_ids, attention_mask, starts, markers.end_of_turn)
    _raise_for(ends < 0, "no closing <turn|> after the answer (cut by max_length?)", names)
    _raise_for(ends == starts, "the answer is empty (only <turn|> would be trained)", names)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    keep = (positions >= starts[:, None]) & (positions <= ends[:, None])
    return torch.where(keep, input_ids, IGNORE_INDEX)


def naive_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths) -> torch.Tensor:
    """THE WRONG WAY, for notebook 03 and the tests: mask the first ``prompt_lengths`` real tokens.

    With lengths counted on the template text, where each image is one ``<|image|>`` placeholder, the
    mask ends N + 1 tokens too early (the processor adds ``<|image>`` and ``<image|>`` and N soft
    tokens): the model would be trained on image placeholders and its own prompt.
    """
    real_start = (attention_mask.cumsum(dim=1) == 0).sum(dim=1)  # number of left-padding tokens
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    lengths = torch.as_tensor(prompt_lengths)
    keep = (positions >= (real_start + lengths)[:, None]) & attention_mask.bool()
    return torch.where(keep, input_ids, IGNORE_INDEX)


def answer_order(labels: torch.Tensor) -> torch.Tensor:
    """Per row, every position, those whose next token is labelled first and in their order (a stable sort): the
    order ``answer_logit_positions`` hands the model and ``helpers.training.answer_only_loss`` reads targets in."""
    return (labels[:, 1:] != IGNORE_INDEX).int().sort(dim=1, descending=True, stable=True).indices


def answer_logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where the answer's logits are needed: per row, the positions whose *next* token is labelled, first ones
    first, as an integer ``[batch, K]`` tensor (K: the most labelled tokens in a row). A row with fewer fills its
    last columns with positions whose next token is not labelled, so their targets are ignored.

    Passed to the model as ``logits_to_keep``, it makes transformers apply ``lm_head`` at those positions only,
    instead of at every position with Gemma 4's 262,144-entry vocabulary; ``helpers.training.answer_only_loss``
    finds the same positions in the labels, in the same order (``answer_order``). Integer positions, not a boolean
    mask: selecting by a mask inside the forward would make the CPU wait for the GPU there, every micro-batch."""
    return answer_order(labels)[:, :int((labels[:, 1:] != IGNORE_INDEX).sum(dim=1).max())]


# What each position of a batch is, for notebook 03's picture: padding, prompt, image, trained.
TOKEN_ROLES = ("padding", "prompt", "image", "trained")


def token_roles(batch: dict, tokenizer, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per position: 0 padding, 1 prompt (masked), 2 image (``<|image>``, soft tokens, ``<image|>``), 3 trained.

    Taught in notebook 03; ``labels`` defaults to ``batch["labels"]`` (pass others, e.g. naive ones, to compare).
    """
    labels = batch["labels"] if labels is None else labels
    image_ids = [token_id(tokenizer, name) for name in ("boi_token", "image_token", "eoi_token")]
    roles = torch.ones_like(batch["input_ids"])
    roles[torch.isin(batch["input_ids"], torch.tensor(image_ids))] = 2
    roles[labels != IGNORE_INDEX] = 3
    roles[~batch["attention_mask"].bool()] = 0
    return roles


def _describe(name) -> str:
    """A sample's name in an error: its answer, and its row in the loaded split when known."""
    if isinstance(name, tuple):  # (row, answer), as VisionChatCollator passes them
        return f"row {name[0]} of the data set, {name[1]!r}"
    return repr(name)


def _raise_for(bad: torch.Tensor, problem: str, names=None) -> None:
    """Raise CollatorError naming the first bad sample (its place in the batch and, when known, its name)."""
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        name = f" ({_describe(names[index])})" if names is not None else ""
        raise CollatorError(f"sample {index}{name}: {problem}")


def truncate_right(batch: dict, max_length: int, padding_side: str, pad_token_id: int) -> dict:
    """Cut every sample to its first ``max_length`` real tokens and re-pad the per-token tensors."""
    real = batch["attention_mask"].bool()
    kept = real.sum(dim=1).clamp(max=max_length)
    width = int(kept.max())
    for key, values in batch.items():
        if key not in TOKEN_PAD_VALUES and key != "input_ids":
            continue
        pad = TOKEN_PAD_VALUES.get(key, pad_token_id)
        out = torch.full((values.shape[0], width), pad, dtype=values.dtype)
        for i in range(values.shape[0]):
            row = values[i][real[i]][:max_length]
            if padding_side == "left":
                out[i, width - len(row):] = row
            else:
                out[i, :len(row)] = row
        batch[key] = out
    return batch


class VisionChatCollator:
    """Examples ``{"image", "label"}`` (or an explicit ``"answer"``) -> a Gemma 4 batch. Taught in notebook 03.

    ``mode="train"``: the full conversation with ``labels`` on the answer and ``<turn|>`` only.
    ``mode="eval"``: the prompt ending with the generation prompt, identical to the training prefix.
    ``logits_to_keep`` (train mode): the batch also carries ``answer_logit_positions(labels)`` under that name,
    so the model computes logits where the answer is only (``helpers.training.answer_only_loss`` needs it;
    transformers' own loss needs it off). Images are PIL images; other modes than RGB are converted.
    """

    def __init__(self, processor, class_names, question: str = QUESTION, system_prompt: str | None = None,
                 enable_thinking: bool = False, max_length: int | None = None, mode: str = "train",
                 padding_side: str | None = None, logits_to_keep: bool = False):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.class_names = list(class_names)
        self.max_length, self.mode, self.logits_to_keep = max_length, mode, logits_to_keep
        self.padding_side = padding_side or self.tokenizer.padding_side
        # The question, system turn and thinking setting are fixed, so the prompt is rendered once, not per step.
        self.chat = chat_format(processor, question, system_prompt, enable_thinking)
        self.markers = turn_markers(processor, self.chat)
        check_prompt_is_prefix(self.tokenizer, self.chat, self.class_names)
        self._checked_answers = set(self.class_names)
        self._special_tokens = [t for t in self.tokenizer.all_special_tokens if t]

    def answer_for(self, example: dict, index: int = 0) -> str:
        """The example's ``"answer"``, else its class name; special tokens in it would fool the search."""
        if "answer" in example:
            answer = example["answer"]
        else:
            label = example.get("label")
            if not isinstance(label, int) or not 0 <= label < len(self.class_names):
                raise CollatorError(f"sample {index}: label {label!r} is not an index into "
                                    f"{len(self.class_names)} class names")
            answer = self.class_names[label]
        if not isinstance(answer, str) or not answer.strip():
            raise CollatorError(f"sample {index} ({answer!r}): the answer is empty")
        bad = [t for t in self._special_tokens if t in answer]
        if bad:
            raise CollatorError(f"sample {index} ({answer!r}): the answer contains special token(s) {bad}")
        if answer not in self._checked_answers:
            check_prompt_is_prefix(self.tokenizer, self.chat, [answer])
            self._checked_answers.add(answer)
        return answer

    def texts(self, examples: list[dict]) -> tuple[list[str], list[str]]:
        """(texts, answers): the evaluation prompt, or in train mode each answer's training sequence.

        In eval mode a label is optional (unlabelled images are what prediction sees): without one the
        answer is None, which only names the sample in errors."""
        if self.mode == "eval":
            answers = [self.answer_for(example, i) if _labelled(example) else None for i, example in enumerate(examples)]
            return [self.chat.prompt] * len(examples), answers
        answers = [self.answer_for(example, i) for i, example in enumerate(examples)]
        return [self.chat.training_text(answer) for answer in answers], answers

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise CollatorError("cannot collate an empty list of examples")
        texts, answers = self.texts(examples)
        # One list per sample: each conversation has exactly one image, in the 8-bit RGB the processor expects.
        names = [(ex["row"], answer) if "row" in ex else answer for ex, answer in zip(examples, answers)]
        images = [[_rgb(example.get("image"), i, name)] for i, (example, name) in enumerate(zip(examples, names))]
        # The template already writes <bos>; a tokenizer that also adds one would double it.
        encoded = self.processor(text=texts, images=images, return_tensors="pt", padding=True,
                                 padding_side=self.padding_side, add_special_tokens=False)
        batch = {key: encoded[key] for key in MODEL_INPUT_KEYS if key in encoded}
        if self.mode == "train":
            batch["labels"] = mask_prompt_tokens(batch["input_ids"], batch["attention_mask"], self.markers, names)
        batch = self._fit_max_length(batch, names)
        if self.mode == "train" and self.logits_to_keep:
            batch["logits_to_keep"] = answer_logit_positions(batch["labels"])
        return batch

    def _fit_max_length(self, batch: dict, names: list) -> dict:
        """Truncate to ``max_length``; an error when that would cut the prompt (eval) or the answer (train)."""
        if self.max_length is None or batch["input_ids"].shape[1] <= self.max_length:
            return batch
        lengths = batch["attention_mask"].sum(dim=1)
        if self.mode == "eval":
            _raise_for(lengths > self.max_length, f"the prompt is longer than max_length={self.max_length}", names)
        kept = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
        batch = truncate_right(batch, self.max_length, self.padding_side, self.tokenizer.pad_token_id)
        cut = (batch["labels"] != IGNORE_INDEX).sum(dim=1) < kept
        _raise_for(cut, f"max_length={self.max_length} cuts into the answer (sequence of "
                        f"{int(lengths.max())} tokens); raise max_length or lower the image budget", names)
        return batch


def _labelled(example: dict) -> bool:
    return "answer" in example or example.get("label") is not None


def _rgb(image, index: int = 0, name: str | None = None):
    """The image in 8-bit RGB. The loaders (``helpers.data``) hand over checked RGB images already; a caller of
    its own may pass another PIL mode, which is converted. Anything that is not a PIL image is refused."""
    if not isinstance(image, Image.Image):
        label = f"sample {index}" + (f" ({_describe(name)})" if name is not None else "")
        raise CollatorError(f"{label}: the image is a {type(image).__name__}, not a PIL image: open and check it "
                            "first (helpers.validation.to_rgb_image does, for every source helpers.data reads)")
    return image if image.mode == "RGB" else image.convert("RGB")
