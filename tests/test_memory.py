"""Weight bytes (bf16 vs NF4) and LoRA counts, checked against bitsandbytes, transformers and PEFT."""

import copy

import pytest
import torch

from helpers.teaching.memory import (
    GB,
    lora_parameter_count,
    lora_parameters_by_tower,
    nf4_breakdown,
    nf4_weight_bytes,
    quantized_linear_names,
    weight_bytes,
)
from helpers.teaching.presets import build_meta_model, preset_config


@pytest.mark.parametrize("shape", [(320, 200), (64, 64), (4304, 1152), (3, 7)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_what_bitsandbytes_stores(shape, double_quant):
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(*shape, dtype=torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    stored += state.code.numel() * state.code.element_size()
    if double_quant:  # second-level absmax and the offset (its 256-entry code table is shared by all layers)
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
    assert nf4_weight_bytes(weight.numel(), double_quant) == stored


def test_quantized_names_equal_transformers_replacement(tiny_model):
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from helpers.modeling import NF4_SKIP_MODULES, nf4_config

    expected = quantized_linear_names(tiny_model)
    replaced = replace_with_bnb_linear(copy.deepcopy(tiny_model), quantization_config=nf4_config(),
                                       modules_to_not_convert=list(NF4_SKIP_MODULES))
    actual = [name for name, module in replaced.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert expected == actual and len(actual) > 0


def test_skip_list_keeps_towers_and_projectors_in_bf16(tiny_model):
    """transformers matches skip names from the start of the module path ("model.vision_tower...")."""
    names = quantized_linear_names(tiny_model)
    towers = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")
    leaked = [name for name in names if name.split(".")[1] in towers]
    assert leaked == [], f"NF4 would quantize {len(leaked)} tower/projector linears, e.g. {leaked[:2]}"
    assert "lm_head" not in names


@pytest.fixture(scope="module")
def breakdowns():
    return {name: nf4_breakdown(preset_config(name)) for name in ("26B-A4B", "31B")}


def test_moe_experts_stay_bf16(breakdowns):
    experts = breakdowns["26B-A4B"]["experts"]
    assert experts["nf4 params"] == 0 and experts["params"] == 30 * 128 * 3 * 704 * 2816
    total = sum(row["nf4 bytes"] for row in breakdowns["26B-A4B"].values())
    assert total / GB > 45  # NF4 barely shrinks the 26B-A4B: the experts are 3-D parameters, not nn.Linear


def test_31b_nf4_footprint_is_18_to_20_gb(breakdowns):
    rows = breakdowns["31B"]
    total = sum(row["nf4 bytes"] for row in rows.values())
    assert 18 * GB < total < 20 * GB
    assert rows["text embeddings"]["nf4 bytes"] == 262_144 * 5376 * 2  # embeddings stay bf16
    assert 0.51 < rows["decoder"]["nf4 bytes"] / rows["decoder"]["nf4 params"] < 0.53


def test_weight_bytes_bf16_is_two_bytes_per_parameter():
    config = preset_config("E2B")
    assert weight_bytes(config, "none") == 2 * sum(p.numel() for p in build_meta_model(config).parameters())
    assert weight_bytes(config, "4bit") < weight_bytes(config, "none")
    with pytest.raises(ValueError, match="quantization"):
        weight_bytes(config, "8bit")


def test_lora_count_equals_peft_on_the_tiny_model(tiny_model):
    from helpers.modeling import apply_lora, trainable_parameters

    expected = sum(lora_parameters_by_tower(tiny_model, 16).values())
    assert trainable_parameters(apply_lora(copy.deepcopy(tiny_model), r=16))[0] == expected


@pytest.mark.parametrize("name", ["E2B", "26B-A4B"])
def test_lora_count_equals_peft_on_meta(name):
    from peft import LoraConfig, get_peft_model

    config = preset_config(name)
    peft_model = get_peft_model(build_meta_model(config), LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameter_count(config, 16) == trainable
    assert lora_parameter_count(config, 64) == 4 * trainable
