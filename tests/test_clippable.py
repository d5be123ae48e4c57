"""Gemma4ClippableLinear inspection, and what LoRA does around the clamps (notebook 02)."""

import copy

import pytest
import torch

from helpers.modeling import apply_lora
from helpers.speed import use_fast_clamps, use_stock_clamps
from helpers.teaching.clippable import (
    TARGET_ALTERNATIVES,
    clamp_check,
    clip_bounds,
    clippable_linears_by_tower,
    enlarge_lora_update,
    find_clippable_linears,
    lora_wrapped_modules,
    merged_layout_matches,
    naive_lora_error,
    saved_adapter_keys,
    set_clip_bounds,
    trainable_by_target,
)
from helpers.teaching.presets import build_meta_model, preset_config

Q_PROJ = "model.vision_tower.encoder.layers.0.self_attn.q_proj"


@pytest.fixture()
def tiny_model(tiny_e_series_path):
    """The E-series miniature: its vision tower clips, as E2B/E4B's does (the large family ships it off)."""
    from transformers import AutoModelForMultimodalLM

    return AutoModelForMultimodalLM.from_pretrained(tiny_e_series_path)


def vision_clippables(model) -> int:
    """(q, k, v, o, gate, up, down) per vision layer: the tiny model's vision tower clips every projection."""
    return 7 * model.config.vision_config.num_hidden_layers


def test_tiny_model_clips_every_vision_projection(tiny_model):
    # no audio tower in the tiny model
    n = vision_clippables(tiny_model)
    assert clippable_linears_by_tower(tiny_model) == {"vision": {"clippable linears": n, "clipping on": n}}
    module = find_clippable_linears(tiny_model)[Q_PROJ]
    assert isinstance(module.linear, torch.nn.Linear)
    assert clip_bounds(module) == {"input_min": -float("inf"), "input_max": float("inf"),
                                   "output_min": -float("inf"), "output_max": float("inf")}


def test_only_small_presets_clip():
    e2b = clippable_linears_by_tower(build_meta_model(preset_config("E2B")))
    assert e2b["vision"] == {"clippable linears": 16 * 7, "clipping on": 16 * 7}
    assert e2b["audio"]["clipping on"] == e2b["audio"]["clippable linears"] > 0
    large = clippable_linears_by_tower(build_meta_model(preset_config("31B")))
    assert large == {"vision": {"clippable linears": 27 * 7, "clipping on": 0}}


def test_set_clip_bounds(tiny_model):
    assert set_clip_bounds(tiny_model, input_bound=2.0, output_bound=0.5) == vision_clippables(tiny_model)
    assert clip_bounds(find_clippable_linears(tiny_model)[Q_PROJ]) == {
        "input_min": -2.0, "input_max": 2.0, "output_min": -0.5, "output_max": 0.5}


def test_naive_targets_raise_and_leave_the_model_alone(tiny_model):
    before = {name: type(module) for name, module in tiny_model.named_modules()}
    message = naive_lora_error(tiny_model)
    assert message is not None and "Gemma4ClippableLinear" in message and "is not supported" in message
    assert {name: type(module) for name, module in tiny_model.named_modules()} == before


def test_all_linear_wraps_inner_linear_never_lm_head(tiny_model):
    wrapped = lora_wrapped_modules(apply_lora(copy.deepcopy(tiny_model), r=4))
    assert len(wrapped["vision"]) == vision_clippables(tiny_model) + 1  # inner .linear + patch_embedder.input_proj
    assert all(name.endswith(".linear") for name in wrapped["vision"] if "encoder" in name)
    assert wrapped["projectors"] == ["model.embed_vision.embedding_projection"]
    assert not any("lm_head" in name for names in wrapped.values() for name in names)


def test_alternative_targets_counts(tiny_model):
    results = trainable_by_target(tiny_model, r=16)
    text = tiny_model.config.text_config
    decoder = 7 * text.num_hidden_layers - 2 * text.num_kv_shared_layers  # KV-shared layers have no k/v_proj
    assert results["language model only (regex)"]["wrapped per tower"] == {"decoder": decoder}
    attention = 4 * tiny_model.config.vision_config.num_hidden_layers
    assert results["vision + audio attention .linear (list)"]["wrapped per tower"] == {"vision": attention}
    combined = results["language model + every .linear (regex)"]["wrapped per tower"]
    assert combined == {"decoder": decoder, "vision": vision_clippables(tiny_model)}
    assert results["all-linear"]["trainable"] > results["language model + every .linear (regex)"]["trainable"]
    assert set(results) == set(TARGET_ALTERNATIVES)


def test_clamps_still_act_after_lora(tiny_model):
    set_clip_bounds(tiny_model, input_bound=1.0, output_bound=0.5)
    peft_model = apply_lora(tiny_model, r=4, alpha=4)
    wrapped = sum(len(names) for names in lora_wrapped_modules(peft_model).values())
    assert enlarge_lora_update(peft_model, 1.0) == wrapped  # one lora_B per wrapped module
    torch.manual_seed(0)
    clippable = find_clippable_linears(peft_model)[Q_PROJ]
    check = clamp_check(clippable, torch.randn(2, 7, 64) * 3)
    assert -0.5 <= check["wrapped module min"] and check["wrapped module max"] <= 0.5
    assert check["inner .linear max"] > 0.5 or check["inner .linear min"] < -0.5


def test_saved_keys_and_merge_keep_the_linear_layout(tiny_model):
    original_keys = list(tiny_model.state_dict().keys())
    peft_model = apply_lora(tiny_model, r=4, alpha=4)
    keys = saved_adapter_keys(peft_model)
    assert f"base_model.model.{Q_PROJ}.linear.lora_A.weight" in keys
    assert not any("lm_head" in key for key in keys)
    merged = peft_model.merge_and_unload()
    assert merged_layout_matches(original_keys, merged)
    assert f"{Q_PROJ}.linear.weight" in merged.state_dict()


@pytest.mark.parametrize("bound", [0.25, 1.0])
def test_merged_model_still_clamps(tiny_model, bound):
    set_clip_bounds(tiny_model, input_bound=10.0, output_bound=bound)
    peft_model = apply_lora(tiny_model, r=4, alpha=4)
    enlarge_lora_update(peft_model, 1.0)
    merged = peft_model.merge_and_unload()
    output = find_clippable_linears(merged)[Q_PROJ](torch.randn(3, 64) * 5)
    assert output.abs().max().item() <= bound


def _loss_and_grads(model, pixels):
    """A scalar through the vision tower (whose linears all clip), and the LoRA gradients it gives."""
    model.zero_grad()
    side = 6 * model.config.vision_config.pooling_kernel_size  # a patch grid the pooler divides evenly
    positions = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1)
    positions = positions.reshape(1, side * side, 2)
    out = model.get_image_features(pixel_values=pixels, image_position_ids=positions.expand(len(pixels), -1, -1))
    loss = sum(part.pow(2).sum() for part in out.pooler_output)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bounds", [(float("inf"), float("inf")), (0.6, 0.3), (3.0, float("inf"))])
def test_fast_clamps_give_stock_values_and_gradients(tiny_model, bounds):
    set_clip_bounds(tiny_model, input_bound=bounds[0], output_bound=bounds[1])
    stock = apply_lora(copy.deepcopy(tiny_model).double(), r=4, alpha=4).double()  # float64: order-free sums
    enlarge_lora_update(stock, 0.5)  # non-zero LoRA B, so the clamps see the adapter's update
    fast = copy.deepcopy(stock)
    assert use_fast_clamps(fast) == vision_clippables(fast)
    vision = tiny_model.config.vision_config
    patches, patch_values = (6 * vision.pooling_kernel_size) ** 2, 3 * vision.patch_size ** 2
    pixels = torch.rand(2, patches, patch_values, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 2
    stock_loss, stock_grads = _loss_and_grads(stock, pixels)
    fast_loss, fast_grads = _loss_and_grads(fast, pixels)
    torch.testing.assert_close(fast_loss, stock_loss)
    assert stock_grads.keys() == fast_grads.keys() and len(stock_grads) > 0
    for name, stock_grad in stock_grads.items():
        torch.testing.assert_close(fast_grads[name], stock_grad, rtol=1e-12, atol=1e-12 * stock_grad.abs().max())
    if bounds[1] < 1:  # the bounds bit: some outputs were clipped, so equal gradients mean equal masks
        inner = find_clippable_linears(stock)[Q_PROJ].linear(torch.rand(1, 256, 64, dtype=torch.float64) * 4 - 2)
        assert inner.abs().max() > bounds[1]


def test_fast_clamps_follow_new_bounds_and_undo(tiny_model):
    use_fast_clamps(tiny_model)
    clippable = find_clippable_linears(tiny_model)[Q_PROJ]
    inputs = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 5
    assert clippable(inputs).abs().max() > 0.25  # bounds still infinite
    set_clip_bounds(tiny_model, input_bound=10.0, output_bound=0.25)  # seen without re-patching
    assert clippable(inputs).abs().max() <= 0.25
    assert "Gemma4ClippableLinear" in repr(clippable) and "Gemma4ClippableLinear" in naive_lora_error(tiny_model)
    assert use_stock_clamps(tiny_model) == vision_clippables(tiny_model) and "forward" not in clippable.__dict__
    assert clippable(inputs).abs().max() <= 0.25


def test_loading_never_patches_and_only_clipping_modules_get_the_fast_forward(tiny_e_series_path, tiny_path):
    from helpers.modeling import load_model

    model = load_model(tiny_e_series_path, dtype=torch.float32)  # transformers' own forward, as released
    assert not any("forward" in m.__dict__ for m in find_clippable_linears(model).values())
    assert use_fast_clamps(model) == vision_clippables(model)
    large = load_model(tiny_path, dtype=torch.float32)  # clipping off: nothing to speed up
    assert find_clippable_linears(large) and use_fast_clamps(large) == 0
