"""The four published Gemma 4 sizes as plain ``Gemma4Config`` objects, and exact parameter counts per tower.

Taught in notebook 01. Every number below is copied from the ``_VARIANTS`` table of transformers'
``models/gemma4/convert_gemma4_weights.py`` (the script that converted Google's checkpoints; it is not
shipped in the wheel, read it in the huggingface/transformers repository). Anything not set here is the
installed ``Gemma4TextConfig`` / ``Gemma4VisionConfig`` / ``Gemma4AudioConfig`` default, exactly as in
that script (for example ``global_head_dim=512``, ``vocab_size=262_144``, ``sliding_window=512`` for
E2B/E4B, the audio tower's defaults).

``preset_config(name)`` returns a fresh ``Gemma4Config``; build a real-shape model from it with
``Gemma4ForConditionalGeneration(preset_config("31B"))`` (random weights; use the ``meta`` device to
allocate nothing, as ``count_parameters_by_tower`` does).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from helpers.config import SOFT_TOKEN_BUDGETS  # noqa: F401  (the budgets, defined once in helpers.config)

PRESET_NAMES = ("E2B", "E4B", "26B-A4B", "31B")

# Sliding layers then one full-attention layer, repeated: 4:1 for E2B, 5:1 for the others.
E2B_LAYER_PATTERN = ["sliding_attention"] * 4 + ["full_attention"]
DEFAULT_LAYER_PATTERN = ["sliding_attention"] * 5 + ["full_attention"]

ROPE_PARAMETERS = {
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}

# The on-device vision tower (E2B, E4B): ships with Gemma4ClippableLinear clamps turned on.
ON_DEVICE_VISION = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16, "num_attention_heads": 12,
    "num_key_value_heads": 12, "head_dim": 64, "pooling_kernel_size": 3, "patch_size": 16,
    "use_clipped_linears": True,
}
# The large-model vision tower (26B-A4B, 31B): clamps off, a standardize bias/scale after the pooler.
LARGE_MODEL_VISION = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 72, "pooling_kernel_size": 3, "patch_size": 16,
    "use_clipped_linears": False, "standardize": True,
}

COMMON_TEXT = {"final_logit_softcapping": 30.0, "rope_parameters": ROPE_PARAMETERS}

TEXT_CONFIGS = {
    "E2B": {
        "hidden_size": 1536, "hidden_size_per_layer_input": 256, "intermediate_size": 4 * 1536,
        "num_hidden_layers": 35, "layer_types": E2B_LAYER_PATTERN * 7,
        "num_attention_heads": 8, "num_key_value_heads": 1,
        "num_global_key_value_heads": None, "attention_k_eq_v": False, "use_bidirectional_attention": None,
        "num_kv_shared_layers": 20, "use_double_wide_mlp": True,
    },
    "E4B": {
        "hidden_size": 2560, "hidden_size_per_layer_input": 256, "intermediate_size": 4 * 2560,
        "num_hidden_layers": 42, "layer_types": DEFAULT_LAYER_PATTERN * 7,
        "num_attention_heads": 8, "num_key_value_heads": 2,
        "num_global_key_value_heads": None, "global_head_dim": 512, "attention_k_eq_v": False,
        "use_bidirectional_attention": None, "num_kv_shared_layers": 18,
    },
    "26B-A4B": {
        "hidden_size": 2816, "hidden_size_per_layer_input": 0, "intermediate_size": 2112,
        "num_hidden_layers": 30, "layer_types": DEFAULT_LAYER_PATTERN * 5,
        "num_attention_heads": 16, "num_key_value_heads": 8,
        "num_global_key_value_heads": 2, "attention_k_eq_v": True, "use_bidirectional_attention": "vision",
        "num_kv_shared_layers": 0, "enable_moe_block": True, "num_experts": 128, "moe_intermediate_size": 704,
        "top_k_experts": 8, "sliding_window": 1024, "max_position_embeddings": 262_144,
    },
    "31B": {
        "hidden_size": 5376, "hidden_size_per_layer_input": 0, "intermediate_size": 4 * 5376,
        "num_hidden_layers": 60, "layer_types": DEFAULT_LAYER_PATTERN * 10,
        "num_attention_heads": 32, "num_key_value_heads": 16,
        "num_global_key_value_heads": 4, "attention_k_eq_v": True, "use_bidirectional_attention": "vision",
        "num_kv_shared_layers": 0, "sliding_window": 1024, "max_position_embeddings": 262_144,
    },
}

VISION_CONFIGS = {"E2B": ON_DEVICE_VISION, "E4B": ON_DEVICE_VISION,
                  "26B-A4B": LARGE_MODEL_VISION, "31B": LARGE_MODEL_VISION}
HAS_AUDIO = {"E2B": True, "E4B": True, "26B-A4B": False, "31B": False}

# Tower names in the order notebook 01 stacks them.
TOWERS = ("text embeddings", "per-layer embeddings", "decoder", "experts", "vision", "audio", "projectors")


def check_preset_name(name: str) -> str:
    if name not in PRESET_NAMES:
        raise KeyError(f"unknown Gemma 4 preset {name!r}; known: {list(PRESET_NAMES)}")
    return name


def preset_config(name: str):
    """A fresh ``Gemma4Config`` for "E2B", "E4B", "26B-A4B" or "31B". Taught in notebook 01."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    check_preset_name(name)
    text = Gemma4TextConfig(**COMMON_TEXT, **TEXT_CONFIGS[name])
    vision = Gemma4VisionConfig(**VISION_CONFIGS[name])
    audio = Gemma4AudioConfig() if HAS_AUDIO[name] else None
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=audio)


def build_meta_model(config):
    """``Gemma4ForConditionalGeneration`` on the ``meta`` device: every shape, no memory, no download."""
    from transformers import Gemma4ForConditionalGeneration

    with torch.device("meta"):
        return Gemma4ForConditionalGeneration(config)


def tower_of(parameter_name: str) -> str:
    """Which tower a parameter of ``Gemma4ForConditionalGeneration`` belongs to (see ``TOWERS``).

    The router of a MoE layer and the per-layer projections are ``nn.Linear`` inside the decoder, so they
    count as decoder; "experts" holds only the 3-D expert tensors of ``Gemma4TextExperts``.
    """
    name = parameter_name.removeprefix("model.")
    if name.startswith("vision_tower."):
        return "vision"
    if name.startswith("audio_tower."):
        return "audio"
    if name.startswith(("embed_vision.", "embed_audio.")):
        return "projectors"
    if name.startswith("language_model.embed_tokens_per_layer."):
        return "per-layer embeddings"
    if name.startswith("language_model.embed_tokens."):
        return "text embeddings"
    if ".experts." in name:
        return "experts"
    if name.startswith(("language_model.", "lm_head.")):
        return "decoder"
    raise ValueError(f"parameter {parameter_name!r} belongs to no known tower")


def count_by_tower(model) -> dict[str, int]:
    """Exact parameter counts per tower of an instantiated model (tied ``lm_head`` counted once)."""
    counts = OrderedDict((tower, 0) for tower in TOWERS)
    for name, parameter in model.named_parameters():  # named_parameters skips the tied lm_head duplicate
        counts[tower_of(name)] += parameter.numel()
    return dict(counts)


def count_parameters_by_tower(config) -> dict[str, int]:
    """Exact parameter counts per tower for a config, instantiated on ``meta``. Taught in notebook 01."""
    return count_by_tower(build_meta_model(config))


def describe_preset(name: str) -> dict:
    """The headline facts of one size, read back from its config (so the notebook shows, not tells)."""
    config = preset_config(name)
    text, vision = config.text_config, config.vision_config
    # head_dim and KV heads differ between sliding and full layers, so read them per layer.
    sliding = text.per_layer_config[text.layer_types.index("sliding_attention")]
    full = text.per_layer_config[text.layer_types.index("full_attention")]
    return {
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "full-attention layers": text.layer_types.count("full_attention"),
        "heads / KV heads": f"{text.num_attention_heads} / {sliding.num_key_value_heads}",
        "global KV heads": full.num_key_value_heads,
        "head dim / global": f"{sliding.head_dim} / {full.head_dim}",
        "k = v (full layers)": text.attention_k_eq_v,
        "double-wide MLP": text.use_double_wide_mlp,
        "intermediate": text.intermediate_size,
        "experts (top-k)": f"{text.num_experts} ({text.top_k_experts})" if text.enable_moe_block else "-",
        "per-layer input": text.hidden_size_per_layer_input,
        "KV-shared layers": text.num_kv_shared_layers,
        "sliding window": text.sliding_window,
        "context": text.max_position_embeddings,
        "vocab": text.vocab_size,
        "logit softcap": text.final_logit_softcapping,
        "vision": f"{vision.hidden_size}x{vision.num_hidden_layers}",
        "vision clipping": vision.use_clipped_linears,
        "audio": config.audio_config is not None,
    }




def soft_tokens_per_image(width: int, height: int, max_soft_tokens: int = 280) -> int:
    """Soft tokens the real ``Gemma4ImageProcessor`` (patch 16, pooling 3, as published) gives one image.

    Taught in notebook 01: the count depends on the image's size and the budget, never on its content,
    so a blank image of the right size is enough.
    """
    from PIL import Image
    from transformers import Gemma4ImageProcessor

    processor = Gemma4ImageProcessor(max_soft_tokens=max_soft_tokens)
    features = processor(Image.new("RGB", (width, height)), return_tensors="pt")
    return int(features["num_soft_tokens_per_image"][0])
