"""The chat format (helpers/chat.py, notebook 03) against Google's released Gemma 4 formats, for both families.

The expected strings are the released templates' renderings (Google's prompt-formatting page; the templates
as copied in llama.cpp's models/templates), not our own template's output: the tiny checkpoints must render
them exactly, so the offline default cannot drift from what a served Gemma 4 sees.
"""

import pytest

from helpers.chat import (
    E_SERIES,
    EMPTY_THOUGHT,
    LARGE,
    QUESTION,
    ChatFormatError,
    answer_from_generation,
    chat_format,
    render_generation_prompt,
    template_family,
    to_messages,
)

USER = "<bos><|turn>user\n\n\n<|image|>\n\nWhat is in this image?<turn|>\n"
RELEASED = {
    # generation prompt, thinking off (the default)
    (LARGE, "prompt"): USER + "<|turn>model\n<|channel>thought\n<channel|>",
    (E_SERIES, "prompt"): USER + "<|turn>model\n",
    # generation prompt, enable_thinking=True: 31B's template; the E-series file was not seen, llama.cpp's
    # generic Gemma 4 template writes <|think|> without the newline
    (LARGE, "thinking"): "<bos><|turn>system\n<|think|>\n<turn|>\n" + USER[5:] + "<|turn>model\n",
    (E_SERIES, "thinking"): "<bos><|turn>system\n<|think|><turn|>\n" + USER[5:] + "<|turn>model\n",
    # the conversation with the answer (history): no thought channel in either family
    (LARGE, "history"): USER + "<|turn>model\nAmerican Pit Bull Terrier<turn|>\n",
    (E_SERIES, "history"): USER + "<|turn>model\nAmerican Pit Bull Terrier<turn|>\n",
}
ANSWER = "American Pit Bull Terrier"


@pytest.fixture(scope="module", params=[LARGE, E_SERIES])
def family_processor(request, tiny_processor, tiny_e_series_processor):
    return request.param, tiny_processor if request.param == LARGE else tiny_e_series_processor


def test_generation_prompts_are_the_released_strings(family_processor):
    family, processor = family_processor
    assert template_family(processor) == family
    assert render_generation_prompt(processor, to_messages()) == RELEASED[family, "prompt"]
    assert render_generation_prompt(processor, to_messages(), enable_thinking=True) == RELEASED[family, "thinking"]


def test_history_is_the_released_string(family_processor):
    family, processor = family_processor
    assert processor.apply_chat_template(to_messages(answer=ANSWER), tokenize=False) == RELEASED[family, "history"]


def test_a_system_turn_renders_as_text(family_processor):
    family, processor = family_processor
    prompt = render_generation_prompt(processor, to_messages(system="  You are a vet. "))
    assert prompt == "<bos><|turn>system\nYou are a vet.<turn|>\n" + RELEASED[family, "prompt"][5:]
    assert "[{" not in prompt and "'type'" not in prompt


def test_the_released_templates_print_a_list_system_turn_as_a_repr(tiny_processor):
    # why to_messages gives the system turn as a string: the templates read it with `| trim`
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *to_messages()]
    assert "<|turn>system\n[{'type': 'text', 'text': 'Be brief.'}]<turn|>" in render_generation_prompt(
        tiny_processor, messages)


def test_prompt_tokens_carry_each_special_token_as_one_id(family_processor):
    family, processor = family_processor
    tokenizer = processor.tokenizer
    text = RELEASED[family, "prompt"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    specials = [t for t in tokenizer.convert_ids_to_tokens(ids) if t.startswith("<") and t.endswith(">") and
                t in tokenizer.all_special_tokens]
    thought = ["<|channel>", "<channel|>"] if family == LARGE else []
    assert specials == ["<bos>", "<|turn>", "<|image|>", "<turn|>", "<|turn>", *thought]
    assert tokenizer.decode(ids) == text


def test_the_processor_expands_the_image_placeholder(family_processor, tiny_path):
    from PIL import Image

    _, processor = family_processor
    batch = processor(text=[RELEASED[LARGE, "prompt"]], images=[[Image.new("RGB", (40, 40))]],
                      add_special_tokens=False, return_tensors="pt")
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    start, end = tokens.index("<|image>"), tokens.index("<image|>")
    assert set(tokens[start + 1:end]) == {"<|image|>"} and end - start - 1 == 64  # 8 x 8 soft tokens at budget 70


@pytest.mark.parametrize("system", [None, "You are a vet."])
@pytest.mark.parametrize("thinking", [False, True])
def test_training_sequence_follows_the_generation_prompt(family_processor, system, thinking):
    family, processor = family_processor
    chat = chat_format(processor, QUESTION, system, thinking)
    assert chat.family == family and chat.suffix == "<turn|>\n"
    assert chat.prompt == render_generation_prompt(processor, to_messages(system=system), thinking)
    assert chat.training_text(ANSWER) == chat.prompt + ANSWER + "<turn|>\n"
    history = processor.apply_chat_template(to_messages(answer=ANSWER, system=system), tokenize=False,
                                            enable_thinking=thinking)
    # The large family with thinking off is where "history = prompt + answer" breaks: the served prompt
    # carries the empty thought channel, the history does not.
    if family == LARGE and not thinking:
        assert chat.prompt.endswith(EMPTY_THOUGHT) and chat.training_text(ANSWER) != history
        assert chat.training_text(ANSWER).replace(EMPTY_THOUGHT, "") == history
    else:
        assert chat.training_text(ANSWER) == history


def test_a_template_of_neither_family_shows_expected_and_rendered(tiny_processor):
    import copy

    odd = copy.deepcopy(tiny_processor)
    odd.chat_template = odd.chat_template.replace("'<|turn>model\\n'", "'<|turn>assistant\\n'")
    with pytest.raises(ChatFormatError) as error:
        chat_format(odd)
    message = str(error.value)
    assert "<|turn>assistant" in message and repr(RELEASED[LARGE, "prompt"].replace("What is in this image", "")
                                                 ) in message


@pytest.mark.parametrize("generated, answer", [
    ("Beagle<turn|>", "Beagle"),
    ("<|channel>thought\nA dog with long ears.<channel|>Beagle<turn|><eos>", "Beagle"),
    ("  Basset Hound <turn|>\n", "Basset Hound"),
    ("<|channel>thought\nstill thinking", "thought\nstill thinking"),  # cut off mid-thought: no answer yet
])
def test_answers_are_read_after_the_thought_channel(tiny_processor, generated, answer):
    assert answer_from_generation(generated, tiny_processor.tokenizer) == answer
