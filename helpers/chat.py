"""Gemma 4's chat format: special tokens, messages, the evaluation prompt and the training sequence.

Taught in notebook 03. Everything that renders a prompt goes through ``chat_format``: the collator (training
and evaluation batches), constrained scoring, free generation and its parsing, and the multi-GPU launcher.
This file imports nothing else of this package: with ``helpers/collator.py`` it can be copied into a project.

Gemma 4 ships two chat-template families (Google's prompt-formatting page; the released templates):
- **large** (12B, 26B-A4B, 31B): with thinking off (the default) the generation prompt ends
  ``<|turn>model\\n<|channel>thought\\n<channel|>``, an empty thought channel;
- **E-series** (E2B, E4B): the generation prompt ends ``<|turn>model\\n``.
In history both render a model turn as ``<|turn>model\\n`` + answer + ``<turn|>\\n``, with no thought
channel. So "history = generation prompt + answer" is false for the large family: a model served with its
own template sees the empty thought channel before it answers. The training sequence is therefore built from
the generation prompt: **prompt + answer + ``<turn|>`` + what the template writes after a model turn**.
"""

from __future__ import annotations

from dataclasses import dataclass

# The real Gemma 4 special-token strings (tokenizer_config.json of the published checkpoints):
# attribute name on the tokenizer -> token string.
NAMED_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
# Ids 0..4 as in Gemma 4 (pad 0, eos 1, bos 2, unk 3, mask 4).
BASE_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
VIDEO_TOKEN = "<|video|>"
ALL_SPECIAL_TOKENS = (*BASE_SPECIAL_TOKENS, *NAMED_SPECIAL_TOKENS.values(), VIDEO_TOKEN)

QUESTION = "What is in this image?"
LARGE, E_SERIES = "large", "e-series"
FAMILIES = (LARGE, E_SERIES)
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"  # the large family's generation prompt, thinking off
_PROBE_QUESTION, _PROBE_ANSWER = "?", "probe"
# What a prompt is made of, by RunConfig's names: saved beside an adapter, read back by evaluation and serving.
PROMPT_FIELDS = ("question", "system_prompt", "enable_thinking")  # RunConfig's names


class ChatFormatError(ValueError):
    """The processor's chat template does not render Gemma 4's format; the message shows expected vs rendered."""


def special_token(tokenizer, attribute: str) -> str:
    """A named special token's text (``sot_token`` -> ``<|turn>``): the tokenizer's attribute when it has
    one, else Gemma 4's published string for that name."""
    return getattr(tokenizer, attribute, None) or NAMED_SPECIAL_TOKENS[attribute]


def to_messages(question: str = QUESTION, answer: str | None = None, system: str | None = None,
                image_part: dict | None = None) -> list[dict]:
    """Chat messages for one example: the image first, then the question; the answer as the model turn.

    The system turn's content is a plain string: the released templates read it as one
    (``messages[0]['content'] | trim``) and would print a list of parts as a Python repr. The image comes
    first, as in Google's examples and the seed's training code. ``image_part``: the image as an engine takes it
    (an OpenAI ``image_url`` part, vLLM's ``image_pil``); by default ``{"type": "image"}``, as processors take it.
    """
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    image = image_part if image_part is not None else {"type": "image"}
    messages.append({"role": "user", "content": [image, {"type": "text", "text": question}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def render_generation_prompt(processor, messages, enable_thinking: bool = False) -> str:
    """The template's own generation prompt: what a server using this template shows the model."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def expected_generation_prompt(tokenizer, family: str, question: str = _PROBE_QUESTION) -> str:
    """Gemma 4's generation prompt for one image and ``question`` (no system turn, thinking off), per family."""
    sot, eot = special_token(tokenizer, "sot_token"), special_token(tokenizer, "eot_token")
    image = special_token(tokenizer, "image_token")
    bos = tokenizer.bos_token or "<bos>"
    prompt = f"{bos}{sot}user\n\n\n{image}\n\n{question.strip()}{eot}\n{sot}model\n"
    return prompt + EMPTY_THOUGHT if family == LARGE else prompt


def template_family(processor) -> str:
    """``"large"`` or ``"e-series"``: which released format the template renders; anything else is an error."""
    rendered = render_generation_prompt(processor, to_messages(_PROBE_QUESTION))
    expected = {family: expected_generation_prompt(processor.tokenizer, family) for family in FAMILIES}
    for family, text in expected.items():
        if rendered == text:
            return family
    shown = "\n".join(f"  {family:>8}: {text!r}" for family, text in expected.items())
    raise ChatFormatError(f"the chat template matches neither Gemma 4 family.\n  rendered: {rendered!r}\n"
                          f"expected one of:\n{shown}")


@dataclass(frozen=True)
class ChatFormat:
    """The two texts built from a template, for one question, system prompt and thinking setting.

    ``prompt`` is the evaluation prompt (the template's generation prompt); the training sequence of an
    answer is ``prompt + answer + suffix``, so its prefix is, token for token, what is served.
    """

    family: str
    prompt: str
    suffix: str  # "<turn|>" + what the template writes after a model turn ("\n")
    question: str = QUESTION
    system_prompt: str | None = None
    enable_thinking: bool = False

    def training_text(self, answer: str) -> str:
        return self.prompt + answer + self.suffix

    def settings(self) -> dict:
        """What rendered ``prompt``, by RunConfig's names: saved beside the adapter (``save_prompt``)."""
        return {name: getattr(self, name) for name in PROMPT_FIELDS}


def chat_format(processor, question: str = QUESTION, system_prompt: str | None = None,
                enable_thinking: bool = False) -> ChatFormat:
    """Read the evaluation prompt and the training suffix from the processor's own template.

    Checks the premises: the template renders one of the two released families, and a finished conversation
    renders as the generation prompt (less the large family's empty thought channel) + answer + ``<turn|>``.
    """
    family = template_family(processor)
    messages = to_messages(question, system=system_prompt)
    prompt = render_generation_prompt(processor, messages, enable_thinking)
    history = processor.apply_chat_template(to_messages(question, _PROBE_ANSWER, system_prompt), tokenize=False,
                                            enable_thinking=enable_thinking)
    eot = special_token(processor.tokenizer, "eot_token")
    turn_start = prompt.removesuffix(EMPTY_THOUGHT) if family == LARGE else prompt
    expected = turn_start + _PROBE_ANSWER + eot
    if not history.startswith(expected):
        raise ChatFormatError(f"the chat template does not render a model turn as the generation prompt + answer + "
                              f"{eot}:\n  rendered: {history!r}\n  expected: {expected!r}...")
    return ChatFormat(family, prompt, eot + history[len(expected):], question, system_prompt, enable_thinking)


def answer_from_generation(text: str, tokenizer) -> str:
    """The answer in a generated text decoded *with* special tokens: after the last thought channel (thinking
    on), up to ``<turn|>``, special tokens removed, stripped."""
    end_of_thought = special_token(tokenizer, "eoc_token")
    if end_of_thought in text:
        text = text.rsplit(end_of_thought, 1)[1]
    text = text.split(special_token(tokenizer, "eot_token"), 1)[0]
    for token in tokenizer.all_special_tokens:
        if token:
            text = text.replace(token, "")
    return text.strip()
