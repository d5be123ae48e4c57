"""Loading Gemma 4 (bf16, or 4-bit NF4 for QLoRA) and wrapping it with LoRA. Taught in notebooks 02 and 04.

Notebook 04 writes these steps as plain transformers and PEFT code; the launcher, prediction and export call
the functions here, and ``tests/test_recipe.py`` checks that both build the same objects. One loader serves the
hub (``google/gemma-4-31B-it``), a bucket mount (``/mnt/gcs/gemma-4-31B-it/``) and the tiny offline checkpoints:
they are all ``from_pretrained`` paths. The 12B (``gemma4_unified``) loads through the same Auto classes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor, BitsAndBytesConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

# The model types of Gemma 4 and the class each loads as: the 12B is ``gemma4_unified`` (encoder-free).
MODEL_CLASSES = {"gemma4": "Gemma4ForConditionalGeneration", "gemma4_unified": "Gemma4UnifiedForConditionalGeneration"}
GEMMA4_MODEL_TYPES = tuple(MODEL_CLASSES)

# bitsandbytes quantizes nn.Linear only. Passing llm_int8_skip_modules replaces transformers' default
# skip list, so lm_head is named too; the vision and audio towers and their projectors stay in bf16
# (``nf4_config`` says what quantizing them saves; the seed passes no skip list and so does quantize
# them). transformers matches these names from the start of a module's full name (or as its
# suffix), so the towers are named with their prefix. The 12B (encoder-free) has no towers; its whole image
# path is ``model.embed_vision`` (patch embedder + projector) and its audio path ``model.embed_audio``, so the
# same list keeps them in bf16 and only its language model goes to NF4 (``quantize_towers`` changes nothing there).
NF4_SKIP_MODULES = ["lm_head", "model.embed_vision", "model.embed_audio", "model.vision_tower", "model.audio_tower"]
TOWERS = ("vision_tower", "audio_tower")


class ModelLoadError(ValueError):
    """The model path or id cannot be loaded as a Gemma 4 checkpoint."""


def check_model_source(model_id: str) -> None:
    """Fail early, naming the path, when a local path is missing or is not a Gemma 4 checkpoint.

    A hub id is ``name`` or ``owner/name``; anything else (an absolute or relative path, ``~``, more than
    one ``/``) is treated as a local folder and must hold a ``config.json`` whose ``model_type`` is
    ``gemma4`` (E2B, E4B, 26B-A4B, 31B) or ``gemma4_unified`` (the 12B). Hub ids are left to
    ``from_pretrained``, which gives its own error (network, token, name).
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
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise ModelLoadError(f"model path {str(path)!r}: config.json is not a JSON object ({err})") from None
    if model_type not in GEMMA4_MODEL_TYPES:
        raise ModelLoadError(f"model path {str(path)!r} is a {model_type!r} checkpoint, not Gemma 4 "
                             f"({' or '.join(map(repr, GEMMA4_MODEL_TYPES))})")


def nf4_skip_modules(quantize_towers: bool = False) -> list[str]:
    """The modules kept out of NF4: ``NF4_SKIP_MODULES``, less the vision/audio towers if they are quantized."""
    return [m for m in NF4_SKIP_MODULES if not m.endswith(TOWERS)] if quantize_towers else list(NF4_SKIP_MODULES)


def nf4_config(compute_dtype=torch.bfloat16, quantize_towers: bool = False) -> BitsAndBytesConfig:
    """4-bit NF4 with double quantization and bf16 compute (the QLoRA recipe the seed uses): notebook 04's
    ``BitsAndBytesConfig``. The towers stay bf16 unless ``quantize_towers`` (as the seed does, by passing no skip
    list): on the 31B that saves 0.88 GB of its 19.15 GB, at the towers' precision."""
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


def quantization_config(config) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` a ``RunConfig`` asks for (``None`` for ``quantization="none"``)."""
    return nf4_config(quantize_towers=config.quantize_towers) if config.quantization == "4bit" else None


def default_dtype() -> torch.dtype:
    """bf16 on a GPU; float32 on the CPU, where bf16 matmuls are slow and the tiny model is small."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_processor(model_id: str, max_soft_tokens: int | None = None):
    """The model's processor; ``max_soft_tokens`` sets the image budget (70, 140, 280, 560 or 1120 soft tokens)."""
    check_model_source(model_id)
    processor = AutoProcessor.from_pretrained(model_id)
    if max_soft_tokens is not None:
        processor.image_processor.max_soft_tokens = processor.image_seq_length = max_soft_tokens
    return processor


def load_model(model_id: str, quantization_config: BitsAndBytesConfig | None = None, dtype: torch.dtype | None = None,
               device_map=None):
    """``AutoModelForMultimodalLM.from_pretrained`` in bf16 (float32 on a CPU), or quantized as
    ``quantization_config`` says (``nf4_config()``: QLoRA's 4-bit NF4, on a CUDA GPU).

    SDPA, not FlashAttention 2: FA2 does not support Gemma 4's 512-wide global attention heads.
    """
    check_model_source(model_id)
    kwargs = {"dtype": dtype or default_dtype(), "attn_implementation": "sdpa"}
    if quantization_config is not None:
        if not torch.cuda.is_available():
            raise RuntimeError("quantization='4bit' needs a CUDA GPU (bitsandbytes NF4); use 'none' on the CPU")
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForMultimodalLM.from_pretrained(model_id, **kwargs)
    except (OSError, KeyError) as err:
        raise ModelLoadError(f"could not load {model_id!r} as a Gemma 4 model: {err}") from err


# The 26B-A4B's experts are 3-D nn.Parameters of Gemma4TextExperts (22.8B of its 25.2B parameters), not Linear
# layers: target_modules, "all-linear" included, never reaches them. PEFT wraps parameters by name through
# target_parameters, with a LoRA of rank r per expert (ParamWrapper, which takes no dropout).
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def lora_config(r: int = 16, alpha: int = 16, dropout: float = 0.0, target_modules="all-linear",
                modules_to_save=None, experts: bool = False) -> LoraConfig:
    """The ``LoraConfig`` notebook 04 shows as plain code; ``experts``: LoRA on the experts too
    (``EXPERT_PARAMETERS``, ``RunConfig.lora_experts``)."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      target_parameters=EXPERT_PARAMETERS if experts else None,
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")


def meta_model(model_config):
    """The model ``model_config`` describes, built on the ``meta`` device: every shape, no weights, no memory."""
    with torch.device("meta"):
        return AutoModelForMultimodalLM.from_config(model_config)


def lora_layer_widths(model, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """Every layer ``lora`` wraps in ``model`` (a ``meta_model``: a second or two for the 31B), with its (in, out)
    widths. PEFT itself picks the layers; a ``target_modules`` it cannot wrap raises its ValueError."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft reads a property transformers renamed
        model = get_peft_model(model, lora)
    return {name.removeprefix("base_model.model."): (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and getattr(module, "in_features", None)}


def read_model_config(model_id: str):
    """The model's ``config.json`` as transformers reads it (``AutoConfig``): no weights are read."""
    check_model_source(model_id)
    return AutoConfig.from_pretrained(model_id)


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


def apply_lora(model, config: LoraConfig | None = None, lora_dtype: torch.dtype | None = None, **lora_options):
    """``get_peft_model`` on a frozen base, then ``cast_adapters``: notebook 04's LoRA cell. ``config``: a
    ``LoraConfig``; by default ``lora_config(**lora_options)``.

    ``"all-linear"`` reaches inside ``Gemma4ClippableLinear``; a short list such as ``["q_proj", "v_proj"]`` names
    the clamp wrappers, which PEFT rejects (notebook 02 shows both). Not ``prepare_model_for_kbit_training``: it
    casts every parameter that is not 4-bit to float32, which for the 31B is its 1.4B-parameter embedding and for
    the 26B-A4B its 22.8B expert parameters (2 bytes more each: +45.6 GB).
    """
    model = get_peft_model(model, config or lora_config(**lora_options))
    return cast_adapters(model, lora_dtype)


def unwrap_gemma4(model):
    """The ``Gemma4ForConditionalGeneration`` inside a PEFT / DDP / compiled wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


CLIP_BUFFERS = ("input_min", "input_max", "output_min", "output_max")  # a Gemma4ClippableLinear's four bounds


def clipping_modules(model) -> list:
    """Every ``Gemma4ClippableLinear`` of ``model`` (PEFT-wrapped or not): the vision and audio towers' linears."""
    return [module for module in model.modules() if isinstance(module, Gemma4ClippableLinear)]


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
