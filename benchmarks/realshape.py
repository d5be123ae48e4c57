"""Real-shape Gemma 4 with random weights, in bf16 or 4-bit NF4, built on the GPU without a download.

Used by the GPU benchmarks (``benchmarks/gpu_train_bench.py``, ``benchmarks/gpu_eval_bench.py``) and the
GPU tests: memory and speed of a published size are real, accuracy is not (the weights are random).
``synthetic_batch`` is a training batch of the collator's layout; ``answer_loss`` is the training loss on it,
computed as the ``Trainer`` computes it with ``helpers.training.answer_only_loss``.

How the 4-bit model is built without ever holding the whole bf16 model on the GPU:

1. the model is instantiated on the ``meta`` device (shapes only, no memory);
2. transformers' own ``replace_with_bnb_linear`` swaps every ``nn.Linear`` that the quantization config
   does not skip for a bitsandbytes ``Linear4bit`` (still on ``meta``), exactly as
   ``from_pretrained(quantization_config=...)`` does, with the same skip-list rule;
3. module by module, each ``Linear4bit`` gets a random bf16 weight drawn on the GPU that is quantized to
   NF4 at once (the bf16 copy is freed before the next module); every other module (embeddings, norms,
   skipped linears, the MoE experts' 3-D tensors) is materialised in bf16 and initialised by the model's
   own ``_init_weights`` (so buffers such as the rotary frequencies and the clip bounds are right);
4. the attributes that ``from_pretrained`` sets on a quantized model are set (``hf_quantizer``,
   ``is_quantized``, ``is_loaded_in_4bit``, ``quantization_method``, ``config.quantization_config``), so
   PEFT (``get_peft_model``, ``prepare_model_for_kbit_training``) and the Trainer treat it like a
   checkpoint loaded in 4-bit.

The transient bf16 memory is one linear layer (the largest, a 31B MLP projection, is 231 MB).

The 12B (``Gemma4UnifiedForConditionalGeneration``) goes through the same functions: ``build_model`` picks its
class (``helpers.teaching.presets.model_class``), and ``pixel_layout`` gives its processor's layout (one 6,912-value merged
patch per soft token, padded to the budget) instead of the vision tower's (768-value patches, 9 per soft token).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SOFT_TOKENS_224 = 256  # a 224x224 image at the default 280-token budget (Gemma4ImageProcessor; notebook 01)
PATCHES_AT_280 = 2520  # pixel_values are padded to 280 * 3**2 patches at the default budget
PATCH_VALUES = 3 * 16 * 16  # patch 16, RGB


def reference_nf4_config():
    """The seed's BitsAndBytesConfig: NF4, double quant, bf16 compute and bf16 storage, default skips.

    With no ``llm_int8_skip_modules`` transformers skips only ``lm_head``, ``embed_tokens`` and
    ``embed_vision.embedding_projection``: the seed quantizes the vision tower too.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )


def modules_to_not_convert(model, quantization_config) -> list[str]:
    """The skip patterns ``from_pretrained`` would use for this config (same function, same rule)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    return quantizer.get_modules_to_not_convert(model, quantization_config.llm_int8_skip_modules,
                                                 getattr(model, "_keep_in_fp32_modules", None))


def _has_meta(module: nn.Module) -> bool:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return any(t.is_meta for t in tensors)


@torch.no_grad()
def _quantized_linear_from_random(module, device, dtype, std):
    """Draw a bf16 weight for a meta ``Linear4bit`` on ``device`` and quantize it in place."""
    import bitsandbytes as bnb

    old = module.weight
    weight = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype).normal_(0.0, std)
    module.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type=old.quant_type, compress_statistics=old.compress_statistics,
        blocksize=old.blocksize, quant_storage=old.quant_storage, module=module,
    ).to(device)  # Params4bit.to(cuda) quantizes; the bf16 `weight` is freed when this returns
    del weight
    if module.bias is not None:
        module.bias = nn.Parameter(torch.zeros(module.out_features, device=device, dtype=dtype),
                                   requires_grad=False)


def build_model(config, quantization: str = "none", quantization_config=None, device=None,
                dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa", seed: int = 0,
                std: float | None = None, init_device=None):
    """A Gemma 4 model (``helpers.teaching.presets.model_class``: the 12B's is ``Gemma4UnifiedForConditionalGeneration``)
    of ``config``'s shape with random weights on ``device``.

    ``quantization``: ``"none"`` (``dtype`` everywhere) or ``"4bit"`` (NF4 via bitsandbytes; by default
    ``helpers.modeling.nf4_config()``, i.e. what ``load_model(..., quantization_config=nf4_config())`` loads; pass
    ``quantization_config=reference_nf4_config()`` for the seed's settings).

    ``init_device``: where each module's random values are drawn before it moves to ``device`` (bf16 only).
    Drawing 31B values on the CPU takes minutes (``_init_weights`` ran at ~21 s per 10^9 parameters on two
    cores); on a GPU, seconds. FSDP wants the model on the CPU: ``device="cpu", init_device="cuda"``.
    """
    from helpers.teaching.presets import model_class

    if quantization not in ("none", "4bit"):
        raise ValueError(f"quantization must be 'none' or '4bit', got {quantization!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    init_device = torch.device(init_device) if init_device is not None else device
    # text and vision only: the audio tower (E2B/E4B) has no SDPA path; left unset it picks eager itself
    for sub in (config.get_text_config(), config.vision_config):
        if sub is not None:
            sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=dtype)
    std = std if std is not None else config.get_text_config().initializer_range

    quantizer = None
    if quantization == "4bit":
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
        from transformers.quantizers.auto import AutoHfQuantizer

        from helpers.modeling import nf4_config

        quantization_config = quantization_config or nf4_config(dtype)
        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        skip = quantizer.get_modules_to_not_convert(model, quantization_config.llm_int8_skip_modules,
                                                    getattr(model, "_keep_in_fp32_modules", None))
        quantizer.modules_to_not_convert = skip
        model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantization_config)

    linear4bit = None
    if quantizer is not None:
        import bitsandbytes as bnb

        linear4bit = bnb.nn.Linear4bit
    for module in list(model.modules()):
        if not _has_meta(module):
            continue
        if linear4bit is not None and isinstance(module, linear4bit):
            _quantized_linear_from_random(module, device, dtype, std)
        else:
            module.to_empty(device=init_device, recurse=False)
            model._init_weights(module)
            if init_device != device:
                module._apply(lambda t: t.to(device), recurse=False)
    _reinit_vision_positions(model, std)
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)

    if quantizer is not None:
        from transformers import PreTrainedModel

        model.hf_quantizer = quantizer
        model.is_quantized = True
        model.quantization_method = quantization_config.quant_method
        model.config.quantization_config = quantization_config
        model.is_loaded_in_4bit = True
        for sub in model.modules():  # what transformers' _assign_is_quantized does after loading
            if isinstance(sub, PreTrainedModel):
                sub.config._is_quantized = True
    return model


@torch.no_grad()
def _reinit_vision_positions(model, std):
    """transformers initialises the vision position table to ones (checkpoints overwrite it); keep it small.
    (The 12B's position table is already drawn at ``initializer_range`` by its ``_init_weights``.)"""
    if getattr(model.model, "vision_tower", None) is None:
        return
    table = model.model.vision_tower.patch_embedder.position_embedding_table
    table.normal_(0.0, std)


def pixel_layout(config, budget: int = 280) -> dict:
    """``synthetic_pixels``' keywords for the size's processor at ``budget``: 16-pixel patches (768 values) on a
    grid of 3 x 3 per soft token, padded to 9 x budget; for the 12B, merged 48-pixel patches (6,912 values), one
    per soft token, padded to the budget."""
    from helpers.teaching.presets import image_patches, is_encoder_free

    vision = config.vision_config
    if is_encoder_free(config):
        return {"patches": image_patches(config, budget), "pooling": 1,
                "patch_values": 3 * vision.model_patch_size ** 2}
    return {"patches": image_patches(config, budget), "pooling": vision.pooling_kernel_size,
            "patch_values": 3 * vision.patch_size ** 2}


def synthetic_batch(config, batch_size: int, answer_lengths=(1, 2, 3, 4), prompt_tokens: int = 12,
                    soft_tokens: int = IMAGE_SOFT_TOKENS_224, patches: int | None = None,
                    pixel_values=None, image_position_ids=None, seed: int = 0, device=None,
                    pad_to: int | None = None) -> dict:
    """A training batch with the collator's keys and Gemma 4's real layout, right-padded like the seed.

    Each row: ``<bos><|turn>user\\n<|image>`` + ``soft_tokens`` × ``<|image|>`` + ``<image|>`` + a short
    prompt + ``<turn|>\\n<|turn>model\\n`` + a class name of 1-4 tokens + ``<turn|>\\n``. Labels start at
    the model turn's ``<|turn>`` (as the seed's collator and ours do). Text tokens are random ids (the
    weights are random too). ``pixel_values`` / ``image_position_ids`` default to the layout of a
    224×224 image through the real image processor (patch 16, pooling 3, budget 280): 2,304 real patches
    on a 48×48 grid, padded to 2,520 with position -1 (the 12B: 256 merged patches on a 16×16 grid, padded to
    280; ``pixel_layout``). ``patches`` overrides the padded length.
    """
    g = torch.Generator().manual_seed(seed)
    text = config.get_text_config()
    bos, pad = text.bos_token_id or 2, text.pad_token_id or 0
    sot, eot, nl, user, model_tok = 105, 106, 107, 2364, 4368  # Gemma 4 ids; any in-vocab id would do
    low, high = min(1000, text.vocab_size // 2), min(200_000, text.vocab_size)
    rows, labels = [], []
    for i in range(batch_size):
        n_answer = answer_lengths[(seed + i) % len(answer_lengths)]
        prompt = torch.randint(low, high, (prompt_tokens,), generator=g).tolist()
        answer = torch.randint(low, high, (n_answer,), generator=g).tolist()
        head = ([bos, sot, user, nl, config.boi_token_id] + [config.image_token_id] * soft_tokens
                + [config.eoi_token_id] + prompt + [eot, nl])
        tail = [sot, model_tok, nl] + answer + [eot, nl]
        rows.append(head + tail)
        labels.append([-100] * len(head) + tail)
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
    label_t = torch.full((batch_size, length), -100, dtype=torch.long)
    attention = torch.zeros((batch_size, length), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(r)] = torch.tensor(lab)
        attention[i, : len(r)] = 1
    mm = (input_ids == config.image_token_id).long()
    if pixel_values is None or image_position_ids is None:
        layout = pixel_layout(config)
        layout["patches"] = patches or layout["patches"]
        pixel_values, image_position_ids = synthetic_pixels(batch_size, soft_tokens, generator=g, **layout)
    batch = {
        "input_ids": input_ids, "attention_mask": attention, "labels": label_t, "mm_token_type_ids": mm,
        "pixel_values": pixel_values[:batch_size], "image_position_ids": image_position_ids[:batch_size],
    }
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def answer_loss(model, batch: dict, num_items_in_batch=None) -> torch.Tensor:
    """The training loss on ``batch`` as the ``Trainer`` computes it with ``compute_loss_func=answer_only_loss``:
    the model called with ``logits_to_keep = helpers.collator.answer_logit_positions(labels)`` (logits at the
    answer's positions only), then ``helpers.training.answer_only_loss``. ``batch``: ``synthetic_batch``'s, or
    a ``VisionChatCollator`` training batch (with or without its own ``logits_to_keep``)."""
    from helpers.collator import answer_logit_positions
    from helpers.training import answer_only_loss

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["logits_to_keep"] = answer_logit_positions(labels)
    return answer_only_loss(model(**inputs, use_cache=False), labels, num_items_in_batch)


def synthetic_pixels(n: int, soft_tokens: int = IMAGE_SOFT_TOKENS_224, patches: int = PATCHES_AT_280,
                     generator=None, pooling: int = 3, patch_values: int = PATCH_VALUES):
    """Random pixel patches with the processor's layout: a square grid of real patches, then padding (-1)."""
    side = round(soft_tokens ** 0.5) * pooling
    real = side * side
    if real > patches:
        raise ValueError(f"{soft_tokens} soft tokens need {real} patches > {patches}")
    pixel_values = torch.zeros(n, patches, patch_values)
    pixel_values[:, :real] = torch.rand(n, real, patch_values, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (x, y) as the processor writes it
    positions = torch.full((n, patches, 2), -1, dtype=torch.long)
    positions[:, :real] = grid
    return pixel_values, positions


def shrunk_config(name: str, hidden: int = 64, vision_hidden: int = 64):
    """A published preset with its structure kept (layer pattern, k=v, MoE, per-layer inputs, KV sharing,
    the real vocabulary, patch 16 / pooling 3) and its widths and depths shrunk: for CPU tests. The 12B keeps
    its patch embedder's geometry (48-pixel merged patches), at the shrunk text width."""
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    from helpers.teaching.presets import ENCODER_FREE, TEXT_CONFIGS, VISION_CONFIGS
    from helpers.teaching.presets import preset_config as _preset

    full = _preset(name)
    text = dict(TEXT_CONFIGS[name])
    cycle = 5 if name == "E2B" else 6
    # one cycle of the sliding:full pattern; two when KV sharing needs both types among the producers
    pattern = text["layer_types"][: cycle * (2 if text.get("num_kv_shared_layers") else 1)]
    text.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=len(pattern),
                layer_types=pattern, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                global_head_dim=32)
    if text.get("num_global_key_value_heads"):
        text["num_global_key_value_heads"] = 1
    if text.get("hidden_size_per_layer_input"):
        text["hidden_size_per_layer_input"] = 16
    if text.get("num_kv_shared_layers"):
        text["num_kv_shared_layers"] = 2
    if text.get("enable_moe_block"):
        text.update(num_experts=4, moe_intermediate_size=hidden // 2, top_k_experts=2)
    text.update(final_logit_softcapping=30.0, rope_parameters=full.text_config.rope_parameters)
    if name in ENCODER_FREE:
        from transformers import Gemma4UnifiedConfig

        vision = {**VISION_CONFIGS[name], "mm_embed_dim": hidden, "output_proj_dims": hidden}
        return Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config=None)
    vision = dict(VISION_CONFIGS[name])
    vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=vision_hidden // 2)
    return Gemma4Config(text_config=Gemma4TextConfig(**text), vision_config=Gemma4VisionConfig(**vision),
                        audio_config=None)
