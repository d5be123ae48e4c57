"""Run parameters that cannot work are refused before the model loads, in one line naming the parameter: the seed
outside numpy's range, a max_length shorter than the longest training sequence or longer than the model's
context, a LoRA rank above the narrowest layer LoRA wraps, LoRA targets PEFT cannot wrap."""

import pytest
from PIL import Image

from helpers.collator import VisionChatCollator, image_sequence_length, longest_training_sequence
from helpers.data import DIGIT_NAMES
from helpers.launch import main as launch_main
from helpers.run.command_line import check_run_against_model, parameters_from_command_line
from helpers.run.config import ConfigError, RunConfig, check_against_model
from helpers.runner import main as runner_main


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_a_seed_outside_numpys_range_is_refused(seed):
    with pytest.raises(ConfigError, match=r"^seed must be in \[0, 2\*\*32\)"):
        RunConfig(seed=seed)


def test_the_ends_of_numpys_seed_range_are_accepted():
    assert RunConfig(seed=0).seed == 0 and RunConfig(seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("budget", [70, 280])
def test_the_longest_sequence_is_what_the_collator_builds_at_most(tiny_processor, budget):
    """The measured length bounds every batch and is reached: an image whose shape fills the budget (7 x 10 soft
    tokens at 70) gives the longest answer exactly that many tokens."""
    processor = type(tiny_processor).from_pretrained(tiny_processor.tokenizer.name_or_path)
    processor.image_processor.max_soft_tokens = processor.image_seq_length = budget
    longest = longest_training_sequence(processor, DIGIT_NAMES)
    assert image_sequence_length(processor) == budget + 2
    collator = VisionChatCollator(processor, DIGIT_NAMES)
    built = 0
    for size in [(192, 192), (168, 240), (336, 480), (100, 300)]:
        batch = collator([{"image": Image.new("RGB", size), "label": i} for i in range(len(DIGIT_NAMES))])
        built = max(built, int(batch["attention_mask"].sum(dim=1).max()))
    assert built == longest


def test_the_defaults_pass(tiny_processor, tiny_path):
    assert check_against_model(RunConfig(), tiny_processor, DIGIT_NAMES, str(tiny_path)) == 90


@pytest.mark.parametrize("settings, message", [
    ({"max_length": 8}, (r"^max_length=8 is shorter than the longest training sequence of this run, 90 tokens "
                        r"\(18 of text .*, 72 for the image at 70 soft tokens\): set max_length to at least 90")),
    ({"max_length": 5000}, (r"^max_length=5000 is longer than the model's context, 4096 tokens "
                           r"\(text_config.max_position_embeddings of .*\): set max_length to at most 4096")),
    ({"lora_r": 10_000}, (r"^lora_r=10000 is larger than the narrowest layer LoRA wraps \(.*: 64 -> 32, "
                         r"with lora_targets='all-linear'\): set lora_r to at most 32$")),
    ({"lora_targets": ["q_proj", "v_proj"]}, (r"^lora_targets=\['q_proj', 'v_proj'\]: Target module "
                                             r"Gemma4ClippableLinear\(.* is not supported")),
    ({"lora_targets": ["no_such_layer"]}, r"^lora_targets=\['no_such_layer'\]: Target modules .* not found"),
])
def test_lengths_and_rank_that_cannot_work_are_refused(tiny_processor, tiny_path, settings, message):
    with pytest.raises(ConfigError, match=message) as raised:
        check_against_model(RunConfig(**settings), tiny_processor, DIGIT_NAMES, str(tiny_path))
    assert "\n" not in str(raised.value)


def test_the_rank_limit_follows_the_targets(tiny_processor, tiny_path):
    """Only the text model's MLP targeted (a PEFT regex): its narrowest layer is 64 wide (the tiny model's width;
    the vision tower and the attention, 32 wide, are not wrapped), so rank 64 passes and 65 does not."""
    mlp = r".*language_model.*\.(gate_proj|up_proj|down_proj)"
    check_against_model(RunConfig(lora_r=64, lora_targets=mlp), tiny_processor, DIGIT_NAMES, str(tiny_path))
    with pytest.raises(ConfigError, match="set lora_r to at most 64"):
        check_against_model(RunConfig(lora_r=65, lora_targets=mlp), tiny_processor, DIGIT_NAMES, str(tiny_path))


def test_a_longer_question_needs_a_longer_max_length(tiny_processor, tiny_path):
    question = "Which digit, from zero to nine, is written in this small grey image?"
    longest = check_against_model(RunConfig(question=question), tiny_processor, DIGIT_NAMES, str(tiny_path))
    assert longest > 90
    with pytest.raises(ConfigError, match=f"at least {longest}"):
        check_against_model(RunConfig(question=question, max_length=90), tiny_processor, DIGIT_NAMES, str(tiny_path))


def test_the_command_line_checks_before_any_model_loads(tmp_path, monkeypatch):
    """parameters_from_command_line (the runner's and the launcher's) refuses max_length 8 with the processor and
    config.json alone: loading a model there would fail the test."""
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForMultimodalLM, "from_pretrained", no_weights)
    with pytest.raises(ConfigError, match="max_length=8 is shorter"):
        parameters_from_command_line([("max_length", "8")], str(tmp_path))
    assert check_run_against_model(RunConfig(output_dir=str(tmp_path))) == 90


@pytest.mark.parametrize("args, message", [(["-p", "max_length", "8"], "max_length=8 is shorter"),
                                           (["-p", "lora_r", "10000"], "lora_r=10000 is larger"),
                                           (["-p", "seed", "-3"], "seed must be in")])
def test_runner_and_launcher_refuse_in_one_line(args, message, tmp_path, capsys):
    assert runner_main(["--output-dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not list((tmp_path / "run").glob("*.ipynb"))  # refused before papermill started
    assert launch_main(["--output-dir", str(tmp_path / "launch"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
