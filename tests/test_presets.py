"""The presets against the published facts, and the meta-device counts against a closed-form count."""

import pytest

from helpers.teaching.presets import (
    PRESET_NAMES,
    TOWERS,
    count_parameters_by_tower,
    describe_preset,
    preset_config,
)

VOCAB = 262_144
# name: (hidden, layers, heads, kv heads, global kv heads, intermediate, per-layer input, kv-shared layers)
SIZES = {
    "E2B": (1536, 35, 8, 1, 1, 6144, 256, 20),
    "E4B": (2560, 42, 8, 2, 2, 10240, 256, 18),
    "12B": (3840, 48, 16, 8, 1, 15360, 0, 0),  # convert_gemma4_unified_weights.py, _VARIANTS["gemma-4-12b"]
    "26B-A4B": (2816, 30, 16, 8, 2, 2112, 0, 0),
    "31B": (5376, 60, 32, 16, 4, 21504, 0, 0),
}
ON_DEVICE_VISION, LARGE_VISION = (768, 16, 3072), (1152, 27, 4304)  # hidden, layers, intermediate
VISION = {"E2B": ON_DEVICE_VISION, "E4B": ON_DEVICE_VISION, "26B-A4B": LARGE_VISION, "31B": LARGE_VISION}
# Published sizes (Google's Gemma 4 model card): E2B 2.3B effective / 5.1B with embeddings,
# E4B 4.5B effective / 8B with embeddings, 12B 11.95B, 26B-A4B 25.2B total (3.8B active), 31B 30.7B.


def expected_text_decoder(name: str) -> int:
    """Decoder parameters written out from the architecture, independently of transformers' modules."""
    hidden, layers, heads, kv_heads, global_kv, inter, per_layer, shared = SIZES[name]
    text = preset_config(name).text_config
    total = hidden  # final norm
    for index, layer_type in enumerate(text.layer_types):
        full = layer_type == "full_attention"
        head_dim = 512 if full else 256
        kv = global_kv if full else kv_heads
        is_shared = index >= layers - shared
        total += 2 * hidden * heads * head_dim + head_dim  # q, o, q_norm
        if not is_shared:
            k_eq_v = text.attention_k_eq_v and full
            total += hidden * kv * head_dim * (1 if k_eq_v else 2) + head_dim  # k (+ v), k_norm
        wide = 2 if (text.use_double_wide_mlp and is_shared) else 1
        total += 3 * hidden * inter * wide + 4 * hidden  # gate/up/down, four norms
        if per_layer:
            total += 2 * hidden * per_layer + hidden  # gate, projection, norm
        if getattr(text, "enable_moe_block", False):
            experts = text.num_experts
            total += hidden * experts + hidden + experts + 3 * hidden  # router proj, scales, three norms
    if per_layer:
        total += hidden * layers * per_layer + per_layer  # per_layer_model_projection, its norm
    return total


def expected_vision(name: str) -> int:
    if name == "12B":  # the patch embedder: LayerNorm(6912), Dense 6912 -> 3840, LayerNorm, 1120 x 2 positions, LayerNorm
        patch, width = 48 * 48 * 3, 3840
        return 2 * patch + patch * width + width + 2 * width + 1120 * 2 * width + 2 * width
    hidden, layers, inter = VISION[name]
    head_dim = 64 if hidden == 768 else 72
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 4 * hidden + 2 * head_dim
    return 3 * 16 * 16 * hidden + 2 * 10240 * hidden + layers * per_layer


@pytest.fixture(scope="module")
def counts():
    return {name: count_parameters_by_tower(preset_config(name)) for name in PRESET_NAMES}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_text_towers_match_closed_form(counts, name):
    hidden, layers, _, _, _, _, per_layer, _ = SIZES[name]
    assert counts[name]["text embeddings"] == VOCAB * hidden
    assert counts[name]["per-layer embeddings"] == VOCAB * layers * per_layer
    assert counts[name]["decoder"] == expected_text_decoder(name)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_vision_and_projectors_match_closed_form(counts, name):
    text_hidden = SIZES[name][0]
    assert counts[name]["vision"] == expected_vision(name)
    if name == "12B":  # RMSNorm -> Linear 3840 -> 3840 for images, 640 raw audio samples -> 3840
        assert counts[name]["projectors"] == 3840 * 3840 + 640 * 3840
        return
    audio_projector = 1536 * text_hidden if name in ("E2B", "E4B") else 0
    assert counts[name]["projectors"] == VISION[name][0] * text_hidden + audio_projector


def test_experts_only_in_the_moe(counts):
    assert counts["26B-A4B"]["experts"] == 30 * 128 * 3 * 704 * 2816
    assert all(counts[name]["experts"] == 0 for name in ("E2B", "E4B", "12B", "31B"))


def test_audio_only_on_the_small_models(counts):
    assert counts["E2B"]["audio"] == counts["E4B"]["audio"] > 250e6
    assert counts["26B-A4B"]["audio"] == counts["31B"]["audio"] == 0
    assert counts["12B"]["audio"] == 0  # no tower: raw 40 ms frames go straight to its projector


def test_totals_match_the_published_sizes(counts):
    def text_only(name):
        return sum(counts[name][t] for t in TOWERS if t not in ("vision", "audio", "projectors"))

    def effective(name):  # the "E" count: everything but the two embedding tables
        tables = counts[name]["text embeddings"] + counts[name]["per-layer embeddings"]
        return sum(counts[name].values()) - tables

    assert round(sum(counts["E2B"].values()) / 1e9, 1) == 5.1
    assert round(sum(counts["E4B"].values()) / 1e9) == 8
    assert 2.3e9 <= effective("E2B") < 2.4e9
    assert round(effective("E4B") / 1e9, 1) == 4.5
    assert round(text_only("26B-A4B") / 1e9, 1) == 25.2
    assert round(text_only("31B") / 1e9, 1) == 30.7
    assert 11.95e9 <= sum(counts["12B"].values()) < 11.96e9  # the card's 11.95B (ours: 11.9597B, truncated)
    active = text_only("26B-A4B") - counts["26B-A4B"]["experts"] * (128 - 8) / 128
    assert round(active / 1e9, 1) == 3.8


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_published_facts(name):
    facts = describe_preset(name)
    small = name in ("E2B", "E4B")
    assert facts["vocab"] == VOCAB and facts["logit softcap"] == 30.0
    assert facts["context"] == (131_072 if small else 262_144)
    assert facts["vision clipping"] is small and facts["audio"] is (small or name == "12B")
    assert facts["sliding window"] == (512 if small else 1024)
    if name == "12B":
        assert facts["vision"] == "none: 48px patch -> Dense 3840"
        assert facts["k = v (full layers)"] and facts["global KV heads"] == 1 and facts["full-attention layers"] == 8
    else:
        assert facts["vision"] == ("768x16" if small else "1152x27")
    assert facts["head dim / global"] == "256 / 512"


def test_unknown_preset_is_named():
    with pytest.raises(KeyError, match="31b"):
        preset_config("31b")


def test_soft_tokens_follow_size_and_budget():
    from helpers.teaching.presets import SOFT_TOKEN_BUDGETS, soft_tokens_per_image

    assert [soft_tokens_per_image(w, h) for w, h in [(500, 375), (224, 224), (300, 200)]] == [266, 256, 260]
    assert [soft_tokens_per_image(w, h, size="12B") for w, h in [(500, 375), (224, 224), (300, 200)]] == [266, 256, 260]
    for budget in SOFT_TOKEN_BUDGETS:
        square = soft_tokens_per_image(640, 640, budget)
        assert square <= budget and int(square**0.5) ** 2 == square


def test_the_12b_is_encoder_free():
    from helpers.teaching.presets import build_meta_model, image_path, is_encoder_free, model_class

    config = preset_config("12B")
    assert config.model_type == "gemma4_unified" and is_encoder_free(config)
    model = build_meta_model(config)
    assert type(model) is model_class(config) and type(model).__name__ == "Gemma4UnifiedForConditionalGeneration"
    assert not hasattr(model.model, "vision_tower") and not hasattr(model.model, "audio_tower")
    assert tuple(model.model.embed_vision.patch_dense.weight.shape) == (3840, 6912)
    assert tuple(model.model.embed_vision.pos_embedding.shape) == (1120, 2, 3840)
    unified, towered = image_path("12B"), image_path("31B")
    assert unified["rows per image at budget 280"] == 280 and towered["rows per image at budget 280"] == 2520
    assert unified["pixels per soft token"] == towered["pixels per soft token"] == "48x48"
    assert unified["clipped linears"] == 0
