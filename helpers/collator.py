"""The masking collator: train only on the answer, found by a backward search. Taught in notebook 03.

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

from helpers.chat import NAMED_SPECIAL_TOKENS, QUESTION, to_messages
from helpers.validation import MAX_SIDE, BadExampleError, to_rgb_image

IGNORE_INDEX = -100
# What Gemma4ForConditionalGeneration.forward takes from the processor's output; the rest
# (e.g. num_soft_tokens_per_image) would be an unexpected keyword argument.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "mm_token_type_ids")
# Tensors with one entry per token: truncated and re-padded together, with these padding values.
TOKEN_PAD_VALUES = {"attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
_PROBE_ANSWER = "probe"


class CollatorError(ValueError):
    """A sample cannot be trained on as built (no model turn, answer cut by ``max_length``...)."""


@dataclass(frozen=True)
class TurnMarkers:
    """Token ids that delimit the model's answer, read from the tokenizer and the chat template."""

    start_of_turn: int  # <|turn>
    end_of_turn: int  # <turn|>
    header: tuple[int, ...]  # "model\n", as the template writes it after <|turn>
    empty_thought: tuple[int, ...]  # "<|channel>thought\n<channel|>", () when the template has none


def special_token(tokenizer, attribute: str) -> str:
    """A named special token's text (``sot_token`` -> ``<|turn>``): the tokenizer's attribute when it has
    one, else Gemma 4's published string for that name."""
    return getattr(tokenizer, attribute, None) or NAMED_SPECIAL_TOKENS[attribute]


def token_id(tokenizer, attribute: str) -> int:
    """The id of a named special token, read from the tokenizer, never a hard-coded number."""
    token = special_token(tokenizer, attribute)
    token_ids = tokenizer.convert_tokens_to_ids([token])
    if token_ids[0] is None or token_ids[0] == tokenizer.unk_token_id:
        raise CollatorError(f"the tokenizer has no {attribute} special token ({token!r}); is this Gemma 4?")
    return token_ids[0]


def render_prompt(processor, messages, empty_thought_block: bool = False) -> str:
    """The chat template with the generation prompt: what the model sees before it answers."""
    kwargs = {"empty_thought_block": True} if empty_thought_block else {}
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def tokens_after_last(tokenizer, text: str, marker: str) -> tuple[int, ...]:
    """Token ids of ``text`` after its last ``marker``, tokenized in context (as the processor will)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    last = max(i for i, t in enumerate(ids) if t == marker_id)
    return tuple(ids[last + 1:])


def turn_markers(processor) -> TurnMarkers:
    """Read the markers from the tokenizer and from how the template renders a generation prompt."""
    tokenizer = processor.tokenizer
    start, end = token_id(tokenizer, "sot_token"), token_id(tokenizer, "eot_token")
    messages = to_messages("?")
    plain = render_prompt(processor, messages)
    with_thought = render_prompt(processor, messages, empty_thought_block=True)
    header = tokens_after_last(tokenizer, plain, special_token(tokenizer, "sot_token"))
    # Templates that ignore the flag (E2B/E4B's) give the same text: no thought block to skip.
    full = tokens_after_last(tokenizer, with_thought, special_token(tokenizer, "sot_token"))
    if full[:len(header)] != header:
        raise CollatorError("the template's thought block changes the model header; cannot locate answers")
    return TurnMarkers(start, end, header, full[len(header):])


def template_trailer(processor) -> str:
    """What the template writes after a model turn's ``<turn|>`` (``"\\n"`` for Gemma 4).

    Also checks the premise of the collator: a finished conversation renders as the generation prompt
    followed by the answer and ``<turn|>``.
    """
    eot = special_token(processor.tokenizer, "eot_token")
    prompt = render_prompt(processor, to_messages("?"))
    full = processor.apply_chat_template(to_messages("?", _PROBE_ANSWER), tokenize=False)
    expected = prompt + _PROBE_ANSWER + eot
    if not full.startswith(expected):
        raise CollatorError(f"the chat template does not render the model turn as prompt + answer + {eot}: "
                            f"{full!r} does not start with {expected!r}")
    return full[len(expected):]


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
    """Per sample, the first answer position: after the last ``<|turn>``, its header and any empty thought."""
    turn = last_marker_positions(input_ids, attention_mask, markers.start_of_turn)
    _raise_for(turn < 0, f"no <|turn> marker (id {markers.start_of_turn}): no model turn", names)
    starts = turn + 1
    _raise_for(~matches_at(input_ids, starts, markers.header),
               "the last <|turn> is not followed by the model header (not a model turn, or cut)", names)
    starts = starts + len(markers.header)
    has_thought = matches_at(input_ids, starts, markers.empty_thought)
    return starts + has_thought * len(markers.empty_thought) if markers.empty_thought else starts


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
    """

    def __init__(self, processor, class_names, question: str = QUESTION, system: str | None = None,
                 max_length: int | None = None, mode: str = "train", empty_thought_block: bool = False,
                 padding_side: str | None = None):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.class_names = list(class_names)
        self.max_length, self.mode = max_length, mode
        self.padding_side = padding_side or self.tokenizer.padding_side
        self.markers = turn_markers(processor)
        self.trailer = template_trailer(processor)
        # The question and system are fixed, so the prompt text is rendered once, not per step.
        self.prompt_text = render_prompt(processor, to_messages(question, system=system), empty_thought_block)
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
        return answer

    def texts(self, examples: list[dict]) -> tuple[list[str], list[str]]:
        """(texts, answers): the prompt, plus answer + <turn|> + trailer in train mode."""
        answers = [self.answer_for(example, i) for i, example in enumerate(examples)]
        if self.mode == "eval":
            return [self.prompt_text] * len(examples), answers
        suffix = special_token(self.tokenizer, "eot_token") + self.trailer
        return [self.prompt_text + answer + suffix for answer in answers], answers

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise CollatorError("cannot collate an empty list of examples")
        texts, answers = self.texts(examples)
        # One list per sample: each conversation has exactly one image. Some data sets carry
        # greyscale, RGBA, CMYK or 16-bit images; the image processor expects 8-bit RGB.
        names = [(ex["row"], answer) if "row" in ex else answer for ex, answer in zip(examples, answers)]
        images = [[_rgb(example.get("image"), i, name)] for i, (example, name) in enumerate(zip(examples, names))]
        # The template already writes <bos>; a tokenizer that also adds one would double it.
        encoded = self.processor(text=texts, images=images, return_tensors="pt", padding=True,
                                 padding_side=self.padding_side, add_special_tokens=False)
        batch = {key: encoded[key] for key in MODEL_INPUT_KEYS if key in encoded}
        if self.mode == "train":
            batch["labels"] = mask_prompt_tokens(batch["input_ids"], batch["attention_mask"], self.markers, names)
        return self._fit_max_length(batch, names)

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


def _rgb(image, index: int = 0, name: str | None = None):
    """8-bit RGB via ``helpers.validation.to_rgb_image`` (loaders already did this; direct callers may not)."""
    if isinstance(image, Image.Image) and image.mode == "RGB" and max(image.size) <= MAX_SIDE:
        return image
    label = f"sample {index}" + (f" ({_describe(name)})" if name is not None else "")
    try:
        return to_rgb_image(image, label)
    except BadExampleError as err:
        raise CollatorError(str(err)) from None
