"""Training sees what serving sees, on every miniature (large, E-series, 12B, 26B-A4B's experts): on one batch, the logits at the labelled positions from the
training forward (train mode, dropout off, no cache, with and without activation checkpointing) equal those of
the cached evaluation forward.

The E-series miniature shares keys and values across its last two layers, as E2B and E4B do across their last 20
and 18: a training forward that dropped them (as transformers' once did without a cache, which made E2B/E4B
train on garbage logits) would differ here. ``dropped_shared_kv`` is that fault, as a test double, and the check
catches it.
"""

import contextlib

import pytest
import torch
from transformers import AutoModelForMultimodalLM, AutoProcessor
from transformers.models.gemma4 import modeling_gemma4

from helpers.collator import VisionChatCollator
from helpers.data import load_examples
from helpers.modeling import apply_lora

TOLERANCE = 1e-4  # float32: the two forwards differ only in the order of a few additions


@pytest.fixture(scope="module")
def tiny_12b_path(tmp_path_factory):
    from helpers.tiny import build_tiny_gemma4_12b

    return build_tiny_gemma4_12b(tmp_path_factory.mktemp("tiny-gemma4-12b"))


@pytest.fixture(scope="module", params=["large", "e-series", "12b", "moe"])
def miniature(request, tiny_path, tiny_e_series_path, tiny_12b_path, tiny_moe_path):
    path = {"large": tiny_path, "e-series": tiny_e_series_path, "12b": tiny_12b_path, "moe": tiny_moe_path}[request.param]
    return request.param, path


def lora_model(path):
    """The miniature in float32 with ``with_random_lora``."""
    torch.manual_seed(0)
    return with_random_lora(AutoModelForMultimodalLM.from_pretrained(path, dtype=torch.float32))


def with_random_lora(model):
    """``model`` with LoRA on every linear layer, its B matrices random so that the adapter changes the logits
    (as a trained one does), every dropout off."""
    model = apply_lora(model)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def training_batch(path):
    processor = AutoProcessor.from_pretrained(path)
    data = load_examples("digits", "train", size=3)
    return VisionChatCollator(processor, data.class_names, logits_to_keep=True)(data.examples)


def labelled_logits(model, batch, checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(training forward's logits at the answer positions, cached evaluation forward's at the same positions)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions = inputs.pop("logits_to_keep")
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        trained = model(**inputs, logits_to_keep=positions, use_cache=False).logits
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
    model.eval()
    with torch.no_grad():
        served = model(**inputs, use_cache=True).logits
    served = served.gather(1, positions.unsqueeze(-1).expand(-1, -1, served.shape[-1]))
    return trained.detach(), served


@contextlib.contextmanager
def dropped_shared_kv():
    """A forward that, without a cache, gives the KV-shared layers zeros in place of the keys and values of the
    layer they share with: the fault the training-equals-serving check must catch."""
    original = modeling_gemma4.Gemma4TextAttention.forward

    def forward(self, *args, shared_kv_states=None, past_key_values=None, **kwargs):
        if self.is_kv_shared_layer and past_key_values is None:
            shared_kv_states = {kind: tuple(torch.zeros_like(t) for t in kv) for kind, kv in shared_kv_states.items()}
        return original(self, *args, shared_kv_states=shared_kv_states, past_key_values=past_key_values, **kwargs)

    modeling_gemma4.Gemma4TextAttention.forward = forward
    try:
        yield
    finally:
        modeling_gemma4.Gemma4TextAttention.forward = original


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no checkpointing", "activation checkpointing"])
def test_the_training_forward_gives_the_served_logits_at_the_labelled_positions(miniature, checkpointing):
    name, path = miniature
    model = lora_model(path)
    trained, served = labelled_logits(model, training_batch(path), checkpointing)
    assert trained.shape == served.shape and trained.shape[1] >= 2  # the answer and <turn|>, at least
    difference = float((trained - served).abs().max())
    assert difference <= TOLERANCE, f"{name}: training and serving logits differ by {difference:.3g}"


def test_the_e_series_miniature_shares_keys_and_values_as_released(tiny_e_series_path):
    text = AutoModelForMultimodalLM.from_pretrained(tiny_e_series_path).config.text_config
    assert text.num_kv_shared_layers == 2 and text.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    assert text.use_double_wide_mlp and text.hidden_size_per_layer_input > 0


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no checkpointing", "activation checkpointing"])
def test_the_check_fails_when_the_training_forward_drops_the_shared_keys_and_values(tiny_e_series_path,
                                                                                    checkpointing):
    model = lora_model(tiny_e_series_path)
    with dropped_shared_kv():
        trained, served = labelled_logits(model, training_batch(tiny_e_series_path), checkpointing)
    assert float((trained - served).abs().max()) > 100 * TOLERANCE
