"""Loading Gemma 4 (bf16 or 4-bit NF4) and applying LoRA. Taught in notebooks 02 and 04.

One loader serves the hub (``google/gemma-4-31b-it``), a bucket mount (``/mnt/gcs/gemma-4-31b-it/``) and
the tiny offline checkpoints: they are all ``from_pretrained`` paths. The 12B (``gemma4_unified``) loads through
the same ``AutoProcessor`` / ``AutoModelForMultimodalLM`` calls, which pick its own processor and model class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

from helpers.config import QUANTIZATIONS, SOFT_TOKEN_BUDGETS
from helpers.fast_clamps import fast_clamp_count, use_fast_clamps, use_stock_clamps
from helpers.losses import unwrap_gemma4
from helpers.presets import GEMMA4_MODEL_TYPES

# peft 0.21.2's PeftModel.__init__ reads transformers' deprecated ``is_gradient_checkpointing`` property
# (get_peft_model and PeftModel.from_pretrained both), which warns on every call; that one message only.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _NoKernelsPackageWarning(logging.Filter):
    """bitsandbytes 0.50.2, imported by PEFT on a CPU with AVX512-BF16, looks for the optional ``kernels``
    package (a hub-downloaded fused 4-bit CPU GEMM) and warns that it is missing. 4-bit loading needs CUDA
    here, so the message says nothing about the run; it is dropped, and only it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsPackageWarning())

# bitsandbytes quantizes nn.Linear only. Passing llm_int8_skip_modules replaces transformers' default
# skip list, so lm_head is named too; the vision and audio towers and their projectors stay in bf16
# (quantizing the 31B's vision tower would save only 0.88 GB; the seed passes no skip list and so does
# quantize it). transformers matches these names from the start of a module's full name (or as its
# suffix), so the towers are named with their prefix. The 12B (encoder-free) has no towers; its whole image
# path is ``model.embed_vision`` (patch embedder + projector) and its audio path ``model.embed_audio``, so the
# same list keeps them in bf16 and only its language model goes to NF4 (``quantize_towers`` changes nothing there).
NF4_SKIP_MODULES = ["lm_head", "model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"]
TOWERS = ("vision_tower", "audio_tower")


def nf4_skip_modules(quantize_towers: bool = False) -> list[str]:
    """The modules kept out of NF4: ``NF4_SKIP_MODULES``, less the vision/audio towers if they are quantized."""
    return [m for m in NF4_SKIP_MODULES if not m.endswith(TOWERS)] if quantize_towers else list(NF4_SKIP_MODULES)


class ModelLoadError(ValueError):
    """The model path or id cannot be loaded as a Gemma 4 checkpoint."""


def check_model_source(model_id: str) -> None:
    """Fail early, naming the path, when a local path is missing or is not a Gemma 4 checkpoint.

    A hub id is ``name`` or ``owner/name``; anything else (an absolute or relative path, ``~``, more than
    one ``/``) is treated as a local folder and must hold a ``config.json`` whose ``model_type`` is
    ``gemma4`` (E2B, E4B, 26B-A4B, 31B) or ``gemma4_unified`` (the 12B). Hub ids are left to ``from_pretrained``, which gives its own error (network, token, name).
    """
    if not isinstance(model_id, (str, Path)) or not str(model_id).strip():
        raise ModelLoadError(f"model_id must be a hub id or a local path, got {model_id!r}")
    model_id = str(model_id)
    looks_local = (model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id
                   or Path(model_id).expanduser().exists())
    if not looks_local:
        return
    path = Path(model_id).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model path {str(path)!r} has no config.json: it is not a model checkpoint")
    import json

    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise ModelLoadError(f"model path {str(path)!r}: config.json is not a JSON object ({err})") from None
    if model_type not in GEMMA4_MODEL_TYPES:
        raise ModelLoadError(f"model path {str(path)!r} is a {model_type!r} checkpoint, not Gemma 4 "
                             f"({' or '.join(map(repr, GEMMA4_MODEL_TYPES))})")


def nf4_config(compute_dtype=torch.bfloat16, quantize_towers: bool = False):
    """4-bit NF4 with double quantization and bf16 compute (the QLoRA recipe the seed uses).

    The vision/audio towers stay bf16 unless ``quantize_towers`` (as the seed does, by passing no skip
    list): on the 31B that saves 0.88 GB of its 19.15 GB (benchmarks/README.md), at the towers' precision.
    """
    from transformers import BitsAndBytesConfig

    # Stored as bf16-typed words (same bytes): the vision patch embedder casts pixels to its weight's dtype
    # only when that dtype is floating point; with the default uint8 storage they would stay float32.
    storage = {"bnb_4bit_quant_storage": compute_dtype} if quantize_towers else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=nf4_skip_modules(quantize_towers),
        **storage,
    )


def default_dtype() -> torch.dtype:
    """bf16 on a GPU; float32 on the CPU, where bf16 matmuls are slow and the tiny model is small."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_processor(model_id: str, max_soft_tokens: int | None = None):
    """The model's processor; ``max_soft_tokens`` sets the image budget (70, 140, 280, 560 or 1120)."""
    from transformers import AutoProcessor

    check_model_source(model_id)
    processor = AutoProcessor.from_pretrained(model_id)
    if max_soft_tokens is not None:
        if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
            raise ValueError(f"image_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens}")
        processor.image_processor.max_soft_tokens = max_soft_tokens
        processor.image_seq_length = max_soft_tokens
    return processor


def quantization_config(config):
    """The ``BitsAndBytesConfig`` a ``RunConfig`` asks for (``None`` for ``quantization="none"``): what
    notebook 04 shows as plain code."""
    if config.quantization == "none":
        return None
    return nf4_config(torch.bfloat16, quantize_towers=config.quantize_towers)


@contextlib.contextmanager
def no_loading_bar():
    """transformers' "Loading weights" bar off for the block: in an executed notebook a widget bar stays
    drawn at 0% (its progress is not saved), and loading is a few seconds that a line reports anyway."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(model_id: str, quantization: str = "none", dtype: torch.dtype | None = None,
               attn_implementation: str = "sdpa", device_map=None, fast_clamps: bool = True,
               quantize_towers: bool = False, quantization_config=None):
    """``AutoModelForMultimodalLM.from_pretrained`` in bf16/float32 (``"none"``) or 4-bit NF4 (``"4bit"``).

    SDPA, not FlashAttention 2: FA2 does not support Gemma 4's 512-wide global attention heads.
    ``quantization_config``: a ``BitsAndBytesConfig`` (notebook 04 builds its own); by default ``"4bit"``
    uses ``nf4_config(quantize_towers=...)``. ``fast_clamps``: the vision/audio clamps get a cheaper forward
    with the same numbers (``helpers.fast_clamps``; ``use_stock_clamps`` undoes it).
    """
    from transformers import AutoModelForMultimodalLM

    check_model_source(model_id)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization_config is None and quantization == "4bit":
        quantization_config = nf4_config(torch.bfloat16, quantize_towers=quantize_towers)
    dtype = dtype or default_dtype()
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantization_config is not None:
        if not torch.cuda.is_available():
            raise RuntimeError("quantization='4bit' needs a CUDA GPU (bitsandbytes NF4); use 'none' on the CPU")
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with no_loading_bar():
            model = AutoModelForMultimodalLM.from_pretrained(model_id, **kwargs)
    except (OSError, KeyError) as err:
        raise ModelLoadError(f"could not load {model_id!r} as a Gemma 4 model: {err}") from err
    if fast_clamps:
        use_fast_clamps(model)
    return model


def describe_patches(model, compile_layers_on: bool | None = None) -> str:
    """What the helpers changed in the model behind transformers' back, in one line (notebook 04 prints it)."""
    fast = fast_clamp_count(model)
    line = (f"fast clamps: {'on' if fast else 'off'} ({fast} Gemma4ClippableLinear forwards patched; "
            "RunConfig.fast_clamps, undone by helpers.fast_clamps.use_stock_clamps)")
    if compile_layers_on is not None:
        line += (f"\ncompile_layers: {'on' if compile_layers_on else 'off'} (torch.compile per layer during "
                 "train(), undone after it; RunConfig.compile_layers, None: on for bf16 LoRA on one GPU)")
    return line


def lora_config(r: int = 16, alpha: int = 16, dropout: float = 0.0, target_modules="all-linear",
                modules_to_save=None):
    """The ``LoraConfig`` notebook 04 shows as plain code."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")


def enable_gradient_checkpointing(model):
    """Recompute activations in the backward pass (less memory, slower), non-reentrant as PEFT needs."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def cast_adapters(model, lora_dtype: torch.dtype | None = None):
    """The trainable (adapter) weights cast to ``lora_dtype``; by default bf16 on a 4-bit base, as TRL does
    (halving their optimizer state), and unchanged otherwise."""
    if lora_dtype is None and getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        lora_dtype = torch.bfloat16
    if lora_dtype is not None:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(lora_dtype)
    return model


def apply_lora(model, r: int = 16, alpha: int = 16, dropout: float = 0.0, target_modules="all-linear",
               modules_to_save=None, gradient_checkpointing: bool = False, lora_dtype: torch.dtype | None = None,
               config=None):
    """Wrap ``model`` with LoRA adapters on a frozen base; ``"all-linear"`` reaches inside ``Gemma4ClippableLinear``.

    The steps notebook 04 shows: freeze the base, ``enable_gradient_checkpointing`` if asked,
    ``get_peft_model(model, config)`` (``config``: a ``LoraConfig``; by default ``lora_config(r, alpha, ...)``),
    ``cast_adapters``. A short list such as ``["q_proj", "v_proj"]`` names the clamp wrappers in the vision
    tower, which PEFT rejects (notebook 02 shows the error); ``"all-linear"`` wraps their inner ``.linear``.

    Not ``prepare_model_for_kbit_training``: it casts every parameter that is not 4-bit to float32, which
    for the 31B is its 1.4B-parameter embedding and for the 26B-A4B its 22.8B expert parameters (measured
    on an H200: +45.6 GB for the 26B-A4B; benchmarks/README.md).
    """
    from peft import get_peft_model

    model.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = get_peft_model(model, config or lora_config(r, alpha, dropout, target_modules, modules_to_save))
    return cast_adapters(model, lora_dtype)


def should_compile_layers(config) -> bool:
    """``compile_layers`` as asked; ``None`` means on for bf16 LoRA on one GPU (measured there, off elsewhere:
    checkpointing and several processes are not measured compiled; 4-bit was measured on the 31B only, where
    ``compile_layers=True`` trained QLoRA 1.5x faster than eager on an H200, with no graph break: 7.9 against 5.1
    samples/s on ready tensors, 7.8 against 5.1 on JPEG files, benchmarks/README.md; the other 4-bit sizes are not
    measured compiled)."""
    if config.compile_layers is not None:
        return config.compile_layers
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    return (torch.cuda.is_available() and config.quantization == "none" and not config.gradient_checkpointing
            and one_process)


# Dynamo's recompile limit while the layers are compiled. Every layer's compiled call is the same code
# (``nn.Module._call_impl``), so its graphs count against one limit, 8 by default: E4B's seven layer kinds at one
# sequence length, then a second length (real images give 253-266 soft tokens, so a batch's length varies) hit
# it, and layers fell back to eager (H200, 2026-12-02: 1.13 s a step instead of 0.91). With the limit raised,
# E4B settled at 14 graphs (each kind static, then dynamic) and image files trained at 0.87 s a step, as the
# synthetic stream (benchmarks/README.md, "The user's path").
COMPILED_RECOMPILE_LIMIT = 64


def compile_layers(model, dynamic: bool | None = None) -> int:
    """``torch.compile`` every decoder and vision-encoder layer in place; returns how many.

    Regional compilation: layers of one kind share one compiled graph, so compiling takes a minute, not
    one per layer, and the rest of the model (the labelled-position LM head) stays eager. On an H200 it
    took E4B bf16 LoRA from 13.0 to 34.9 samples/s (MFU 8.8% -> 23.7%; benchmarks/README.md): it fuses the
    float32 RMSNorm casts and the clamps, which also makes micro-batch 32 fit. The clamps go back to
    transformers' own forward, which the compiler fuses better than it traces ours. ``dynamic``: passed to
    ``torch.compile``; ``None`` (its default) compiles a layer kind for the first sequence length and once more,
    with the length dynamic, when a second one comes. (``True``, dynamic from the start, took 194 s to compile
    E4B's first step instead of 70-100 s and ran ~1.0 s a step instead of 0.87 on an H200.) Dynamo's recompile
    limit is raised to ``COMPILED_RECOMPILE_LIMIT`` until ``uncompile_layers``.
    """
    inner = unwrap_gemma4(model).model
    model._fast_clamps_were_on = use_stock_clamps(inner) > 0  # uncompile_layers puts them back
    layers = list(inner.language_model.layers)
    if getattr(inner, "vision_tower", None) is not None:
        layers += list(inner.vision_tower.encoder.layers)
    for layer in layers:
        layer.compile(**({} if dynamic is None else {"dynamic": dynamic}))
    model._compiled_layers = layers  # what uncompile_layers undoes, and nothing a user compiled
    if getattr(model, "_recompile_limit_before", None) is None:  # compiled twice: keep the first "before"
        model._recompile_limit_before = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_RECOMPILE_LIMIT)
    return len(layers)


def uncompile_layers(model) -> int:
    """Undo ``compile_layers`` (evaluation and generation then run eager); returns how many.

    Only the layers ``compile_layers`` compiled: a module the user compiled themselves stays compiled. The
    fast clamps come back if ``compile_layers`` had switched them off."""
    layers = getattr(model, "_compiled_layers", [])
    for layer in layers:
        layer._compiled_call_impl = None
    model._compiled_layers = []
    if getattr(model, "_recompile_limit_before", None) is not None:
        torch._dynamo.config.recompile_limit = model._recompile_limit_before
        model._recompile_limit_before = None
    if getattr(model, "_fast_clamps_were_on", False):
        use_fast_clamps(unwrap_gemma4(model).model)
        model._fast_clamps_were_on = False
    return len(layers)


LIGER_METHODS = ("forward", "extra_repr", "_get_name")  # what liger-kernel binds on a module it patches


def use_liger_kernels(model) -> int:
    """Liger-kernel's Triton RMSNorm and GeGLU MLP in the text decoder of a loaded Gemma 4 (``gemma4``: E2B, E4B,
    26B-A4B's norms, 31B), in place, this model only; returns how many modules. Undone by ``use_stock_kernels``.

    liger-kernel's ``apply_liger_kernel_to_gemma4(model=...)``, without its fused cross-entropy (the loss here
    is ``helpers.losses``'s, at labelled positions). That call also swaps transformers' ``Gemma4RMSNorm`` and
    ``Gemma4TextMLP`` classes for every model built later; those are put back at once. Needs ``liger-kernel``
    and a CUDA GPU (its kernels are Triton). Measured in benchmarks/README.md (31B QLoRA on an H200)."""
    from liger_kernel.transformers import apply_liger_kernel_to_gemma4
    from transformers.models.gemma4 import modeling_gemma4

    gemma = unwrap_gemma4(model)
    if gemma.config.model_type != "gemma4":
        raise ValueError(f"liger-kernel patches Gemma 4 (model_type 'gemma4'), not {gemma.config.model_type!r}")
    before = {id(m) for m in gemma.modules() if "forward" in m.__dict__}
    classes = modeling_gemma4.Gemma4RMSNorm, modeling_gemma4.Gemma4TextMLP
    try:
        apply_liger_kernel_to_gemma4(rope=False, cross_entropy=False, fused_linear_cross_entropy=False,
                                     rms_norm=True, geglu=True, model=gemma)
    finally:
        modeling_gemma4.Gemma4RMSNorm, modeling_gemma4.Gemma4TextMLP = classes
    patched = [m for m in gemma.modules() if "forward" in m.__dict__ and id(m) not in before]
    gemma._liger_modules = getattr(gemma, "_liger_modules", []) + patched
    return len(patched)


def use_stock_kernels(model) -> int:
    """Undo ``use_liger_kernels``: transformers' own forwards again; returns how many modules."""
    gemma = unwrap_gemma4(model)
    modules = getattr(gemma, "_liger_modules", [])
    for module in modules:
        for name in LIGER_METHODS:
            module.__dict__.pop(name, None)
    gemma._liger_modules = []
    return len(modules)


def liger_kernel_count(model) -> int:
    """Modules of ``model`` running liger-kernel's forwards (``use_liger_kernels``)."""
    return len(getattr(unwrap_gemma4(model), "_liger_modules", []))


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
