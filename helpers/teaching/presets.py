"""The five published Gemma 4 sizes as plain config objects, and exact parameter counts per tower.

Taught in notebook 01. E2B, E4B, 26B-A4B and 31B are ``Gemma4Config``s: every number below is copied from
the ``_VARIANTS`` table of transformers' ``models/gemma4/convert_gemma4_weights.py`` (the script that
converted Google's checkpoints; it is not shipped in the wheel, read it in the huggingface/transformers
repository). Anything not set here is the installed ``Gemma4TextConfig`` / ``Gemma4VisionConfig`` /
``Gemma4AudioConfig`` default, exactly as in that script (for example ``global_head_dim=512``,
``vocab_size=262_144``, ``sliding_window=512`` for E2B/E4B, the audio tower's defaults).

The 12B is the encoder-free fifth size, a ``Gemma4UnifiedConfig`` (``model_type`` ``gemma4_unified``,
``Gemma4UnifiedForConditionalGeneration``). Its numbers are copied from the ``_VARIANTS["gemma-4-12b"]`` entry
of ``src/transformers/models/gemma4_unified/convert_gemma4_unified_weights.py`` in huggingface/transformers
(read at commit 05babaa3b419417dd1906ca6dff7f7179602a24d; not shipped in the wheel either): text hidden 3840,
intermediate 4 x 3840 = 15,360, 48 layers in the 5 sliding : 1 full pattern x 8, 16 attention heads, 8 KV heads
on sliding layers and 1 on full layers with ``attention_k_eq_v``, bidirectional attention over vision, no KV
sharing, no per-layer inputs, no MoE, final logit softcap 30, the same RoPE as the other sizes. Its vision and
audio configs are the class defaults (``Gemma4UnifiedVisionConfig()``, ``Gemma4UnifiedAudioConfig()``): patch 16,
pooling 3 (48-pixel model patches of 48 x 48 x 3 = 6,912 values), a Dense projection to ``mm_embed_dim`` 3840, a
factorised position table of 1,120 x 2 x 3840; audio frames of 640 samples (40 ms at 16 kHz) projected directly.
What the script leaves to ``Gemma4UnifiedTextConfig``'s defaults: vocabulary 262,144, head dim 256 (sliding) and
512 (full: ``global_head_dim``), sliding window 1,024, context 262,144. These agree with Google's model card
(google/gemma-4-12B-it on Hugging Face, as quoted by third-party pages: 11.95B parameters, 48 layers, sliding
window 1,024, 256K context, 262K vocabulary) and with a config.json reproduced at
https://iamulya.one/posts/decoder-forward-pass-dimensions/ (3,840 / 48 / 16 heads / 8 KV / 1 global KV / 256 and
512 head dims / 15,360); the parameter counts here reproduce the model card's 11.95B (``tests/test_presets.py``).
Nothing about the 12B is derived by us except the split of its parameters into rows of ``TOWERS``
(``tower_of``).

``preset_config(name)`` returns a fresh config; build a real-shape model from it with
``model_class(config)(config)`` (random weights; use the ``meta`` device to allocate nothing, as
``count_parameters_by_tower`` does). Where the 12B differs from the other sizes, the difference lives here:
``model_class``, ``is_encoder_free``, ``tower_of``, ``image_path`` (and ``helpers.tiny`` for its miniature).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from helpers.modeling import MODEL_CLASSES
from helpers.run.config import SOFT_TOKEN_BUDGETS  # noqa: F401  (the budgets, defined once in helpers.run.config)

PRESET_NAMES = ("E2B", "E4B", "12B", "26B-A4B", "31B")
ENCODER_FREE = ("12B",)  # Gemma4UnifiedConfig: no vision or audio tower, no Gemma4ClippableLinear
# model_type -> the class that from_pretrained / AutoModelForMultimodalLM picks for it


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

# The 12B's patch embedder (Gemma4UnifiedVisionEmbedder): the class defaults, as its conversion script uses them.
UNIFIED_VISION = {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 3840, "mm_posemb_size": 1120,
                  "output_proj_dims": 3840}

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
    "12B": {  # Gemma4UnifiedTextConfig (its head dims, window, context and vocabulary are the class defaults)
        "hidden_size": 3840, "intermediate_size": 4 * 3840,
        "num_hidden_layers": 48, "layer_types": DEFAULT_LAYER_PATTERN * 8,
        "num_attention_heads": 16, "num_key_value_heads": 8,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "use_bidirectional_attention": "vision",
        "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
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

VISION_CONFIGS = {"E2B": ON_DEVICE_VISION, "E4B": ON_DEVICE_VISION, "12B": UNIFIED_VISION,
                  "26B-A4B": LARGE_MODEL_VISION, "31B": LARGE_MODEL_VISION}
HAS_AUDIO = {"E2B": True, "E4B": True, "12B": True, "26B-A4B": False, "31B": False}

# Tower names in the order notebook 01 stacks them.
TOWERS = ("text embeddings", "per-layer embeddings", "decoder", "experts", "vision", "audio", "projectors")


def check_preset_name(name: str) -> str:
    if name not in PRESET_NAMES:
        raise KeyError(f"unknown Gemma 4 preset {name!r}; known: {list(PRESET_NAMES)}")
    return name


def preset_config(name: str):
    """A fresh config for one of ``PRESET_NAMES``: a ``Gemma4Config``, or for the 12B a ``Gemma4UnifiedConfig``.
    Taught in notebook 01."""
    import transformers

    check_preset_name(name)
    prefix = "Gemma4Unified" if name in ENCODER_FREE else "Gemma4"
    text = getattr(transformers, f"{prefix}TextConfig")(**COMMON_TEXT, **TEXT_CONFIGS[name])
    vision = getattr(transformers, f"{prefix}VisionConfig")(**VISION_CONFIGS[name])
    audio = getattr(transformers, f"{prefix}AudioConfig")() if HAS_AUDIO[name] else None
    return getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, audio_config=audio)


def is_encoder_free(config) -> bool:
    """True for the 12B's ``Gemma4UnifiedConfig`` (images enter through a patch embedder, not a vision tower)."""
    return config.model_type == "gemma4_unified"


def model_class(config):
    """``Gemma4ForConditionalGeneration`` or, for the 12B, ``Gemma4UnifiedForConditionalGeneration``: the class
    ``AutoModelForMultimodalLM`` picks for ``config.model_type``."""
    import transformers

    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"not a Gemma 4 config: model_type {config.model_type!r}; known: {list(MODEL_CLASSES)}")
    return getattr(transformers, MODEL_CLASSES[config.model_type])


def build_meta_model(config):
    """The size's model class (``model_class``) on the ``meta`` device: every shape, no memory, no download."""
    with torch.device("meta"):
        return model_class(config)(config)


def tower_of(parameter_name: str) -> str:
    """Which tower a parameter of ``Gemma4ForConditionalGeneration`` belongs to (see ``TOWERS``).

    The router of a MoE layer and the per-layer projections are ``nn.Linear`` inside the decoder, so they
    count as decoder; "experts" holds only the 3-D expert tensors of ``Gemma4TextExperts``.

    The 12B (``Gemma4UnifiedForConditionalGeneration``) has no towers: its "vision" row is the patch embedder
    (``embed_vision``'s LayerNorms, Dense ``patch_dense`` and position table), and its "projectors" row the two
    RMSNorm -> Linear projections to the text width (``embed_vision.multimodal_embedder``, ``embed_audio``), as
    the other sizes' ``embed_vision`` / ``embed_audio`` are; its "audio" row is empty (raw frames, no tower).
    """
    name = parameter_name.removeprefix("model.")
    if name.startswith("vision_tower."):
        return "vision"
    if name.startswith("audio_tower."):
        return "audio"
    if name.startswith(("embed_vision.multimodal_embedder.", "embed_vision.embedding_", "embed_audio.")):
        return "projectors"
    if name.startswith("embed_vision."):  # the 12B's Gemma4UnifiedVisionEmbedder, before its projector
        return "vision"
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
    moe = getattr(text, "enable_moe_block", False)  # the 12B's text config has no MoE or per-layer fields
    if is_encoder_free(config):
        vision_shape = f"none: {vision.model_patch_size}px patch -> Dense {vision.mm_embed_dim}"
    else:
        vision_shape = f"{vision.hidden_size}x{vision.num_hidden_layers}"
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
        "experts (top-k)": f"{text.num_experts} ({text.top_k_experts})" if moe else "-",
        "per-layer input": getattr(text, "hidden_size_per_layer_input", 0),
        "KV-shared layers": text.num_kv_shared_layers,
        "sliding window": text.sliding_window,
        "context": text.max_position_embeddings,
        "vocab": text.vocab_size,
        "logit softcap": text.final_logit_softcapping,
        "vision": vision_shape,
        "vision clipping": getattr(vision, "use_clipped_linears", False),
        "audio": config.audio_config is not None,
    }




def soft_tokens_per_image(width: int, height: int, max_soft_tokens: int = 280, size: str = "31B") -> int:
    """Soft tokens the size's real image processor (patch 16, pooling 3, as published) gives one image:
    ``Gemma4ImageProcessor``, or ``Gemma4UnifiedImageProcessor`` for the 12B (the same resize rule).

    Taught in notebook 01: the count depends on the image's size and the budget, never on its content,
    so a blank image of the right size is enough.
    """
    from PIL import Image
    from transformers import Gemma4ImageProcessor, Gemma4UnifiedImageProcessor

    check_preset_name(size)
    processor_class = Gemma4UnifiedImageProcessor if size in ENCODER_FREE else Gemma4ImageProcessor
    processor = processor_class(max_soft_tokens=max_soft_tokens)
    features = processor(Image.new("RGB", (width, height)), return_tensors="pt")
    if "num_soft_tokens_per_image" in features:
        return int(features["num_soft_tokens_per_image"][0])
    return int((features["image_position_ids"][0] >= 0).all(-1).sum())  # the unified processor: real patches


def image_patches(config, soft_tokens: int = 280) -> int:
    """Rows the image path runs on for one image at a budget (padding included): a vision tower sees every
    16-pixel patch (pooling^2 x budget: 2,520 at 280); the 12B's patch embedder one merged 48-pixel patch per
    soft token (280)."""
    pooling = config.vision_config.pooling_kernel_size
    return soft_tokens if is_encoder_free(config) else pooling ** 2 * soft_tokens


def image_path(name: str, soft_tokens: int = 280) -> dict:
    """The two image paths side by side (notebook 01): what one image goes through before the decoder."""
    config = preset_config(name)
    vision = config.vision_config
    counts = count_parameters_by_tower(config)
    pooling = vision.pooling_kernel_size
    if is_encoder_free(config):
        return {
            "encoder": "none (Gemma4UnifiedVisionEmbedder)",
            "pixels per soft token": f"{vision.model_patch_size}x{vision.model_patch_size}",
            "values entering per row": vision.model_patch_size ** 2 * 3,
            f"rows per image at budget {soft_tokens}": image_patches(config, soft_tokens),
            "steps": "LayerNorm -> Dense -> LayerNorm -> + x/y position rows -> LayerNorm",
            "position table": "x, y: 2 x " + f"{vision.mm_posemb_size} x {vision.mm_embed_dim} (summed)",
            "pooling": f"{pooling}x{pooling} patches merged by the processor, before the model",
            "clipped linears": 0,
            "vision parameters": counts["vision"],
            "to text width": f"RMSNorm -> Linear {vision.output_proj_dims} -> {config.text_config.hidden_size}",
        }
    layers = vision.num_hidden_layers
    return {
        "encoder": f"vision transformer, {layers} layers x {vision.hidden_size}",
        "pixels per soft token": f"{vision.patch_size * pooling}x{vision.patch_size * pooling}",
        "values entering per row": vision.patch_size ** 2 * 3,
        f"rows per image at budget {soft_tokens}": image_patches(config, soft_tokens),
        "steps": f"Linear -> + x/y position rows -> {layers} attention + MLP layers",
        "position table": f"x, y: 2 x {vision.position_embedding_size} x {vision.hidden_size} (summed)",
        "pooling": f"{pooling}x{pooling} patches averaged after the encoder",
        "clipped linears": 7 * layers if vision.use_clipped_linears else f"{7 * layers} (clipping off)",
        "vision parameters": counts["vision"],
        "to text width": f"RMSNorm -> Linear {vision.hidden_size} -> {config.text_config.hidden_size}",
    }
