"""How many bytes the weights take, in bf16 and in 4-bit NF4, and how many parameters LoRA adds.

Taught in notebook 01. Everything is counted on a ``meta``-device model built from a preset
(``helpers.teaching.presets``), module by module, so the numbers follow the real module tree.

What bitsandbytes quantizes (modelled on transformers 5.23's ``replace_with_bnb_linear``): every module
whose type is exactly ``nn.Linear`` and whose name is not matched by the skip list, matched with
transformers' own ``should_convert_module``. Everything else keeps bf16: embeddings (``nn.Embedding``),
norms, the 26B-A4B experts (3-D ``nn.Parameter`` tensors in ``Gemma4TextExperts``, not ``nn.Linear``),
and the skipped modules (``helpers.modeling.NF4_SKIP_MODULES``: ``lm_head``, the towers, the projectors; for
the 12B, whose ``embed_vision`` is its whole patch embedder, that keeps the image path in bf16).

NF4 bytes of one quantized weight of ``n`` elements (bitsandbytes 0.50 ``quantize_4bit``):
- the 4-bit codes, two per byte: ``ceil(n / 2)`` bytes;
- one absmax per block of 64 elements (``blocksize`` defaults to 64 for 4-bit). With double quantization
  (``bnb_4bit_use_double_quant=True``, the seed's recipe) each absmax is itself quantized to one byte
  (``quantize_blockwise(..., blocksize=256)``), plus one float32 absmax per 256 of those and one float32
  offset; without it each absmax is a float32;
- the 16-entry NF4 code table (float32) kept in each layer's quant state.
So NF4 costs 4 + 8/64 + 32/(64*256) = 4.127 bits per weight with double quant (0.516 bytes), 4.5 bits
without (0.5625 bytes). The 256-entry table of the second quantization is shared by all layers
(bitsandbytes caches it in ``name2qmap``), so it is not counted.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

from torch import nn

from helpers.modeling import nf4_skip_modules
from helpers.teaching.presets import (
    PRESET_NAMES,
    TOWERS,
    build_meta_model,
    image_patches,
    is_encoder_free,
    preset_config,
    tower_of,
)

BF16_BYTES = 2
NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size
NESTED_BLOCKSIZE = 256  # block size of the second (double) quantization of the absmax values
NF4_CODE_BYTES = 16 * 4  # the NF4 code table, float32, one per quant state
GB = 1e9  # decimal gigabytes, as GPU memory is quoted; GiB = 2**30 where said


def nf4_weight_bytes(numel: int, double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> int:
    """Bytes bitsandbytes stores for one NF4-quantized weight of ``numel`` elements (see module docstring)."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if double_quant:
        # uint8 absmax per block, a float32 absmax per 256 of them, a float32 offset
        absmax = blocks * 1 + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 4
    else:
        absmax = blocks * 4
    return packed + absmax + NF4_CODE_BYTES


def is_quantized_by_bnb(module_name: str, module: nn.Module, skip_modules: list[str]) -> bool:
    """transformers' rule: exactly ``nn.Linear`` (not a subclass wrapper) and not matched by the skip list."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return type(module) is nn.Linear and should_convert_module(module_name, skip_modules)


def quantized_linear_names(model, skip_modules: list[str] | None = None) -> list[str]:
    """Names of the modules ``load_model(..., quantization_config=nf4_config())`` turns into ``bnb.nn.Linear4bit``."""
    skip_modules = nf4_skip_modules() if skip_modules is None else skip_modules
    return [name for name, module in model.named_modules() if is_quantized_by_bnb(name, module, skip_modules)]


def empty_row() -> dict:
    return {"params": 0, "nf4 params": 0, "bf16 params": 0, "bf16 bytes": 0, "nf4 bytes": 0}


def nf4_breakdown_of_model(model, skip_modules: list[str] | None = None, double_quant: bool = True) -> dict:
    """Per tower: parameters, how many are NF4-quantized, and the bytes in bf16 vs in the 4-bit load."""
    skip_modules = nf4_skip_modules() if skip_modules is None else skip_modules
    quantized = set(quantized_linear_names(model, skip_modules))
    rows = OrderedDict((tower, empty_row()) for tower in TOWERS)
    for name, parameter in model.named_parameters():  # the tied lm_head is listed once, as embed_tokens
        module_name, _, _ = name.rpartition(".")
        row = rows[tower_of(name)]
        numel = parameter.numel()
        row["params"] += numel
        row["bf16 bytes"] += numel * BF16_BYTES
        if module_name in quantized:
            row["nf4 params"] += numel
            row["nf4 bytes"] += nf4_weight_bytes(numel, double_quant)
        else:
            row["bf16 params"] += numel
            row["nf4 bytes"] += numel * BF16_BYTES
    return dict(rows)


def nf4_breakdown(config, skip_modules: list[str] | None = None, double_quant: bool = True) -> dict:
    """``nf4_breakdown_of_model`` for a config (a preset), instantiated on ``meta``. Taught in notebook 01."""
    return nf4_breakdown_of_model(build_meta_model(config), skip_modules, double_quant)


def weight_bytes(config, quantization: str = "none", skip_modules: list[str] | None = None) -> int:
    """Bytes of all weights: ``"none"`` = bf16 everywhere, ``"4bit"`` = NF4 with double quant (the seed's)."""
    if quantization not in ("none", "4bit"):
        raise ValueError(f"quantization must be 'none' or '4bit', got {quantization!r}")
    rows = nf4_breakdown(config, skip_modules).values()
    key = "bf16 bytes" if quantization == "none" else "nf4 bytes"
    return sum(row[key] for row in rows)


def lora_target_linears(model) -> list[tuple[str, nn.Linear]]:
    """The modules PEFT's ``target_modules="all-linear"`` wraps: every ``nn.Linear`` except the output layer.

    That includes the inner ``.linear`` of each ``Gemma4ClippableLinear`` (the wrapper is not a Linear).
    """
    output_layer = model.get_output_embeddings()
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output_layer]


def lora_parameters_by_tower(model, r: int) -> dict[str, int]:
    """LoRA parameters ``r * (in + out)`` per wrapped Linear, summed per tower."""
    counts = OrderedDict((tower, 0) for tower in TOWERS)
    for name, linear in lora_target_linears(model):
        counts[tower_of(f"{name}.weight")] += r * (linear.in_features + linear.out_features)
    return dict(counts)


def lora_parameter_count(config, r: int, target: str = "all-linear") -> int:
    """Trainable LoRA parameters for ``target_modules="all-linear"`` at rank ``r``. Taught in notebook 01."""
    if target != "all-linear":
        raise ValueError("only target='all-linear' is modelled here; notebook 02 counts others with PEFT")
    return sum(lora_parameters_by_tower(build_meta_model(config), r).values())


def expert_shapes(config) -> tuple[int, int, int, int]:
    """(layers with experts, experts, hidden width, expert width) of a text config; zeros without experts."""
    text = config.get_text_config()
    if not getattr(text, "enable_moe_block", False):
        return 0, 0, 0, 0
    return text.num_hidden_layers, text.num_experts, text.hidden_size, text.moe_intermediate_size


def expert_lora_parameters(config, r: int) -> int:
    """Trainable parameters of ``lora_experts`` at rank ``r``: PEFT gives each expert its own rank-``r`` pair on
    ``gate_up_proj`` (hidden -> 2 x expert width) and ``down_proj`` (expert width -> hidden), so
    ``r x experts x (2 hidden + 3 expert width)`` a layer."""
    layers, experts, hidden, width = expert_shapes(config)
    return layers * r * experts * (2 * hidden + 3 * width)


def expert_delta_bytes(config, layers: int | None = None, dtype_bytes: int = 2) -> int:
    """What ``lora_experts`` adds to the activations: PEFT folds each layer's LoRA into its expert weights
    (``W + B A`` for every expert, one ``baddbmm``) in the forward, and autograd keeps that folded copy, the
    size of the layer's experts, for the backward: every layer's without checkpointing (``layers`` None), one
    at a time with it."""
    all_layers, experts, hidden, width = expert_shapes(config)
    return (all_layers if layers is None else layers) * experts * 3 * hidden * width * dtype_bytes


@functools.cache
def _preset_weight_bytes(size: str, quantization: str, skip_modules: tuple[str, ...] | None) -> int:
    """``weight_bytes`` of a preset, once per setting: each call builds a meta model (seconds for the large
    sizes), and the planner is asked again for every micro-batch, card and option (notebook 01's tables)."""
    return weight_bytes(preset_config(size), quantization, None if skip_modules is None else list(skip_modules))


@functools.cache
def _preset_lora_parameters_per_rank(size: str) -> int:
    """``lora_parameter_count`` of a preset at rank 1 (the count is linear in the rank), once per size."""
    return lora_parameter_count(preset_config(size), 1)


# ------------------------------------------------------------------------------------------------------
# Peak training memory: plan(). Taught in notebook 01 ("will it fit on a 24 / 48 / 80 / 96 GB GPU?").
#
# peak = weights + LoRA state + activations + logits, each term below. The weights and the LoRA counts are
# exact (module by module, above). The activation term is a model: "activation units" per sample,
#   U = text layers x text tokens x (hidden + intermediate) + vision layers x patches x (hidden + intermediate)
# (the MoE's routed width is top-k x expert width), times bytes per unit measured on an H200 (E2B on an H100)
# (benchmarks/README.md, "How much memory"; transformers 5.23, peft 0.21.2, bitsandbytes 0.50.2, SDPA, bf16 autocast).
# They are large because Gemma 4's RMSNorm computes in float32 and autograd keeps those float32 copies, and
# because the vision tower runs on all 9 x budget patches (2,520 at the default 280), padding included.
# The 12B has no vision tower: its image path is one patch embedder over budget merged patches (280), each
# 6,912 values wide projected to 3,840 (``vision_widths``).
ACTIVATION_BYTES_PER_UNIT = {  # no checkpointing, fitted on the runs named in benchmarks/README.md
    "E2B": 21.4,  # E2B QLoRA eager mb 8 on an H100; its compiled rows agree with E4B's compiled factor
    "E4B": 19.0,  # with the fast clamps (helpers.speed, the default); transformers' own clamps: 20.5
    "12B": 14.8,  # between 14.0 (NF4, mb 32) and 15.6 (bf16, mb 16), as fitted on an H200: all within 6%
    "26B-A4B": 18.2,
    "31B": 16.0,
}
# Liger's RMSNorm + GeGLU keep bf16, not float32, copies: 0.85 with liger-kernel's forwards (benchmarks/liger.py; text decoder
# only; 31B QLoRA mb 8, H200); patching the classes instead (which also reached other norms) kept 0.78
LIGER_ACTIVATION_FACTOR = 0.85
FULL_LOGITS_BYTES = 20  # per position x vocabulary entry with the model's own loss (bf16 logits, fp32
# upcast, softmax and gradient): 1.5 GB for one 31B sample of 290 tokens; the answer-only loss: ~0
LORA_STATE_BYTES = {"bf16": 8, "fp32": 16}  # parameter + gradient + AdamW's two moments
EIGHT_BIT_STATE_SAVING = {"bf16": 2, "fp32": 6}  # bitsandbytes' 8-bit AdamW: two 1-byte moments per parameter
# compile_layers fuses the float32 RMSNorm copies: E4B bf16 mb 32 measured 0.61 (the 12B's row fits it too), the 31B
# in NF4 mb 8 0.69 (on an H200); E2B takes E4B's (the same E-series layers; its compiled rows on an H100 agree); the 26B-A4B
# takes the larger (its NF4 mb 8 compiled peak came out within 2% of that prediction: benchmarks/README.md)
COMPILED_ACTIVATION_FACTOR = {"E2B": 0.61, "E4B": 0.61, "12B": 0.61, "31B": 0.69}
COMPILED_ACTIVATION_FACTOR_UNMEASURED = 0.69
TEXT_TOKENS = 29  # chat scaffolding + a short question + a class name (the benchmark's stream)


def _widths(config):
    text = config.get_text_config()
    intermediate = text.intermediate_size
    if getattr(text, "enable_moe_block", False):
        intermediate += text.top_k_experts * text.moe_intermediate_size
    return text, intermediate


def vision_widths(config) -> tuple[int, int, int]:
    """(layers, hidden, second width) of the image path: the vision tower's, or for the 12B its patch embedder
    counted as one layer of width ``mm_embed_dim`` whose wide input is the 6,912-value merged patch."""
    vision = config.vision_config
    if is_encoder_free(config):
        return 1, vision.mm_embed_dim, vision.model_patch_size ** 2 * 3
    return vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size


def activation_units(config, image_tokens: int, patches: int, text_tokens: int = TEXT_TOKENS) -> int:
    """``U`` per sample (see above): the widths every layer keeps activations of, times its tokens."""
    text, intermediate = _widths(config)
    vision_layers, vision_hidden, vision_wide = vision_widths(config)
    tokens = image_tokens + text_tokens
    return (text.num_hidden_layers * tokens * (text.hidden_size + intermediate)
            + vision_layers * patches * (vision_hidden + vision_wide))


def checkpoint_bytes(config, image_tokens: int, patches: int, text_tokens: int = TEXT_TOKENS) -> int:
    """Activation checkpointing keeps each layer's bf16 input; one layer is recomputed at a time."""
    text, _ = _widths(config)
    vision_layers, vision_hidden, _ = vision_widths(config)
    tokens = image_tokens + text_tokens
    return 2 * (text.num_hidden_layers * tokens * text.hidden_size + vision_layers * patches * vision_hidden)


def plan(size: str, quantization: str = "4bit", lora_r: int = 16, micro_batch: int = 1, soft_tokens: int = 280,
         gradient_checkpointing: bool = False, *, image_tokens: int | None = None, text_tokens: int = TEXT_TOKENS,
         lora_dtype: str = "bf16", loss: str = "labelled", liger: bool = False,
         skip_modules: list[str] | None = None, quantize_towers: bool = False, optimizer: str = "adamw_torch",
         compiled: bool = False, lora_experts: bool = False) -> dict:
    """Predicted peak training memory (bytes) and its terms, for one GPU. Taught in notebook 01.

    ``soft_tokens`` is the image budget (70 ... 1120): the vision tower sees ``9 x soft_tokens`` patches
    (padding included; the 12B's patch embedder ``soft_tokens`` merged patches, ``helpers.teaching.presets.image_patches``) and the decoder up to ``soft_tokens`` image tokens (``image_tokens``: fewer for
    non-square images, e.g. 256 for 224 x 224 at 280). ``loss``: ``"labelled"`` (ours) or ``"full"`` (the
    model's own loss over the full vocabulary at every position, as the seed). ``lora_dtype``: the
    adapters' dtype (``"bf16"`` as TRL casts them for QLoRA; PEFT's default is ``"fp32"``).
    ``quantize_towers``, ``optimizer`` (``"adamw_8bit"``), ``compiled`` (``compile_layers``) and
    ``lora_experts`` are ``RunConfig``'s options of the same names.
    """
    config = preset_config(size)
    image_tokens = soft_tokens if image_tokens is None else image_tokens
    patches = image_patches(config, soft_tokens)
    if quantize_towers and skip_modules is None:
        skip_modules = nf4_skip_modules(quantize_towers=True)
    weights = _preset_weight_bytes(size, quantization, None if skip_modules is None else tuple(skip_modules))
    state_bytes = LORA_STATE_BYTES[lora_dtype] - (EIGHT_BIT_STATE_SAVING[lora_dtype] if optimizer == "adamw_8bit" else 0)
    lora = state_bytes * lora_r * (_preset_lora_parameters_per_rank(size)
                                   + (expert_lora_parameters(config, 1) if lora_experts else 0))
    units = activation_units(config, image_tokens, patches, text_tokens)
    per_unit = ACTIVATION_BYTES_PER_UNIT[size] * (LIGER_ACTIVATION_FACTOR if liger else 1.0) * (
        COMPILED_ACTIVATION_FACTOR.get(size, COMPILED_ACTIVATION_FACTOR_UNMEASURED) if compiled else 1.0)
    text = config.get_text_config()
    if gradient_checkpointing:
        one_layer = units / text.num_hidden_layers  # the layer being recomputed (the widest: a text layer)
        activations = micro_batch * checkpoint_bytes(config, image_tokens, patches, text_tokens) + (
            micro_batch * one_layer * per_unit)
    else:
        activations = micro_batch * units * per_unit
    if lora_experts:  # the folded expert weights, whatever the micro-batch
        activations += expert_delta_bytes(config, 1 if gradient_checkpointing else None)
    logits = 0
    if loss == "full":
        logits = FULL_LOGITS_BYTES * micro_batch * (image_tokens + text_tokens) * text.vocab_size
    terms = {"weights": weights, "lora state": lora, "activations": int(activations), "logits": int(logits)}
    return {**terms, "total": sum(terms.values())}


def fits(size: str, gpu_gb: float, margin: float = 0.0, **kwargs) -> bool:
    """``plan(...)["total"]`` under the GPU's memory, keeping ~1 GB for the CUDA context and allocator;
    ``margin``: a share added to the prediction first (0.06: 6% more than planned must still fit)."""
    return plan(size, **kwargs)["total"] * (1 + margin) + 1 * GB <= gpu_gb * GB


def largest_micro_batch(size: str, gpu_gb: float, candidates=(64, 32, 16, 8, 4, 2, 1), margin: float = 0.0,
                        **kwargs) -> int | None:
    """The largest micro-batch whose ``plan`` fits ``gpu_gb`` (``None``: not even 1). Taught in notebook 01.

    Use it for ``batch_size`` instead of the seed's 1 x 16: with the same global batch (raise
    ``gradient_accumulation`` to match), fewer, larger steps keep the GPU busy (31B NF4 on an H200:
    micro-batch 8 trained 11x faster than 1 x 16 with checkpointing; benchmarks/README.md).
    ``helpers.speed.planned_batch`` asks it on a GPU (``micro_batch_for``).
    """
    return next((mb for mb in sorted(candidates, reverse=True)
                 if fits(size, gpu_gb, margin=margin, micro_batch=mb, **kwargs)), None)


# The share by which train()'s micro-batch must undercut the GPU's memory (micro_batch_for): the plan was within
# 6.2% of every peak measured on the H200 (tests/test_memory_plan.py), and it counts a full image budget
# (2,520 patches, 280 image tokens at the default) where real photos give 253-266 image tokens.
PLANNER_MARGIN = 0.06

# The shape numbers that tell the published sizes apart (preset_of): a checkpoint's config.json carries the same.
# (Not the per-layer ones such as num_key_value_heads: a built model's config refuses to give those globally.)
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size", "hidden_size_per_layer_input")


@functools.cache
def _preset_shapes() -> dict:
    shapes = {}
    for name in PRESET_NAMES:
        config = preset_config(name)
        shapes[name] = (config.model_type, tuple(getattr(config.get_text_config(), k, None) for k in _SHAPE_KEYS))
    return shapes


def preset_of(config) -> str | None:
    """Which of the published sizes (``helpers.teaching.presets``) a model's config is, by its text model's shape;
    ``None`` for anything else (the tiny offline models, other architectures): the planner has no numbers then."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = (getattr(config, "model_type", None), tuple(getattr(text, k, None) for k in _SHAPE_KEYS))
    return next((name for name, known in _preset_shapes().items() if known == shape), None)


def micro_batch_for(size: str, gpu_bytes: int, batch: int, margin: float = PLANNER_MARGIN, **kwargs) -> int | None:
    """The micro-batch ``helpers.speed`` plans on a GPU of ``gpu_bytes``: the largest divisor of ``batch``
    (the samples of one optimizer step on one device, ``batch_size x gradient_accumulation``) whose ``plan``,
    ``margin`` added, fits; the accumulation is then ``batch // micro-batch``, so the step's batch is unchanged.
    ``None``: not even 1 is predicted to fit. ``kwargs``: ``plan``'s (quantization, lora_r, soft_tokens, ...)."""
    divisors = [d for d in range(batch, 0, -1) if batch % d == 0]
    return largest_micro_batch(size, gpu_bytes / GB, candidates=divisors, margin=margin, **kwargs)


def run_batch(model_config, config, gpu_bytes: int, lora_dtype: str = "bf16", compiled: bool = False,
              liger: bool = False) -> tuple[int, int, str]:
    """(micro-batch, gradient accumulation, how chosen) for a ``RunConfig`` on one GPU of ``gpu_bytes``, as
    ``helpers.speed.switch_on`` sets them there.

    For a published size (``preset_of(model_config)``): ``micro_batch_for`` over the step's batch
    ``config.batch_size x config.gradient_accumulation``, which stays as configured (on an H200: 31B QLoRA r64,
    8 x 4 for 32 x 1, 8 x 2 for the default 16 x 1; E4B bf16 compiled, 32 x 1 for 32 x 1). For other models (the tiny ones), the config's own
    values. ``lora_dtype``, ``compiled`` (``compile_layers`` on) and ``liger``
    (liger-kernel's forwards, ``benchmarks/liger.py``) are what ``switch_on`` found."""
    configured = (config.batch_size, config.gradient_accumulation)
    size = preset_of(model_config)
    if size is None:
        return (*configured, "as configured: not a published Gemma 4 size, so no memory plan")
    batch = config.batch_size * config.gradient_accumulation
    micro = micro_batch_for(size, gpu_bytes, batch, quantization=config.quantization, lora_r=config.lora_r,
                            soft_tokens=config.image_soft_tokens or 280, lora_dtype=lora_dtype,
                            gradient_checkpointing=config.gradient_checkpointing,
                            quantize_towers=config.quantization == "4bit" and config.quantize_towers,
                            optimizer=config.optimizer, compiled=compiled, liger=liger,
                            lora_experts=config.lora_experts)
    how = (f"helpers.teaching.memory.plan for {size}, quantization {config.quantization}, LoRA r{config.lora_r} {lora_dtype}"
           f"{' with the experts' if config.lora_experts else ''}"
           f"{', compiled' if compiled else ''}{', Liger' if liger else ''}"
           f"{', checkpointing' if config.gradient_checkpointing else ''}: the "
           f"largest that fits {gpu_bytes / GB:.0f} GB with a {PLANNER_MARGIN:.0%} margin; {batch} samples a step "
           "as configured")
    if micro is None:
        return 1, batch, how + " (even micro-batch 1 is predicted not to fit)"
    return micro, batch // micro, how
