"""The embedded offline default: a tiny, randomly initialised Gemma 4 saved as an ordinary checkpoint.

It is loaded through exactly the same ``AutoProcessor.from_pretrained`` /
``AutoModelForMultimodalLM.from_pretrained`` path as ``google/gemma-4-31B-it``, so every notebook, the
runner and the tests run with no GPU, no token and no network. Taught in notebook 01 (what the laptop
runs) and used by every other notebook as the default ``model_id``.

What is real and what is small:
- real: the model classes (``Gemma4ForConditionalGeneration``, the 12B's ``Gemma4UnifiedForConditionalGeneration``),
  the vision tower with ``Gemma4ClippableLinear`` (clipping on in ``tiny-e-series``, as in E2B/E4B; off in
  ``tiny``, as in the large models), the special-token strings, each family's chat format, the image processor
  and its variable soft-token count;
- small: every width and depth, and the vocabulary, a SentencePiece-style BPE with byte fallback trained on
  this repository's own prompts and class names (so no text is ever an unknown token).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers.chat import (
    ALL_SPECIAL_TOKENS,
    E_SERIES,
    FAMILIES,
    LARGE,
    NAMED_SPECIAL_TOKENS,
    QUESTION,
    VIDEO_TOKEN,
)
from helpers.data import DIGIT_NAMES, PET_BREEDS

# SentencePiece-style byte fallback, as in Gemma's vocabulary: any byte without a piece of its own.
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# Our own templates, written to render the released formats exactly (the strings in tests/test_chat.py):
# the image wrapped in blank lines, text parts and the system turn trimmed, "assistant" read as "model",
# thinking switched by `enable_thinking` in the system turn, and, for the large family only, the empty
# thought channel after the generation prompt when thinking is off. transformers renders chat templates
# with trim_blocks, so every newline is written as a {{ '\n' }} expression.
_TEMPLATE_HEAD = (
    "{{- bos_token -}}"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- set has_system = messages and messages[0]['role'] in ['system', 'developer'] -%}"
    "{%- if thinking or has_system -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if thinking -%}{{- THINK -}}{%- endif -%}"
    "{%- if has_system -%}{{- messages[0]['content'] | trim -}}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in (messages[1:] if has_system else messages) -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '\\n\\n<|image|>\\n\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
)
CHAT_TEMPLATES = {
    # 12B, 26B-A4B, 31B: "<|think|>\n" opens the system turn; an empty thought channel when thinking is off.
    LARGE: _TEMPLATE_HEAD.replace("THINK", "'<|think|>\\n'")
    + "{%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}{%- endif -%}",
    # E2B, E4B: no thought channel in the generation prompt; "<|think|>" as in llama.cpp's generic Gemma 4 template.
    E_SERIES: _TEMPLATE_HEAD.replace("THINK", "'<|think|>'") + "{%- endif -%}",
}

DEFAULT_TINY_PATH = Path(__file__).resolve().parent.parent / "artifacts" / "tiny-gemma4"
TINY_SEED = 0
# 70 is the smallest budget the real image processor accepts: a square image becomes 8 x 8 = 64 soft tokens,
# each pooled from 3 x 3 patches (pooling 3, as released) of 8 x 8 pixels. Released models use patch 16; the
# miniature's patch 8 keeps the patch count (9 per soft token: 630 at this budget) and the image path's code,
# but quarters the pixels (192 x 192 instead of 384 x 384): at patch 16 the image processor alone took
# 0.7-1.6 s per batch of 32 on 2 cores (0.07 s at patch 8), more than the main job's 5 minutes allow over its
# 344-595 steps. ``build_tiny_gemma4(patch_size=16)`` builds the released geometry.
TINY_MAX_SOFT_TOKENS = 70
TINY_VISION_LAYERS = 1  # 630 patches per image make a vision layer the CPU step's largest cost
TINY_PATCH_SIZE = 8
TINY_POOLING = 3
TINY_TEXT_HIDDEN = 64
# The one shape that is not Gemma 4 in kind: released towers have heads x head size = width (768 = 12 x 64,
# 1152 = 16 x 72); the miniature has 1 head of 32 in a width of 64: 2 heads of 32 cost 18% more a forward +
# backward on the CPU, 1 head of 64 10% more for a lower accuracy (docs/tiny-model.md). llama.cpp needs the
# head size written into the projector for it (helpers.exports.llama_cpp.vision_head_dim_to_write).
TINY_VISION_HIDDEN = 64
TINY_VISION_HEADS = 1
TINY_VISION_HEAD_DIM = 32
TINY_HEAD_DIM, TINY_GLOBAL_HEAD_DIM = 32, 64  # sliding vs full attention, distinct as in every released size
# Bumped whenever build_tiny_model draws different weights or the folder's format changes, so
# ensure_tiny_gemma4 rebuilds an older folder.
TINY_INIT_VERSION = 5


def tokenizer_training_corpus() -> list[str]:
    """Every text the tiny model will meet, one piece per line: prompts, class names, chat scaffolding, digits.

    The pieces are the spans between special tokens with their newlines cut off into pieces of their own, so
    no merge joins a newline to anything but newlines: Gemma 4's released vocabulary has no such piece, and
    llama.cpp's Gemma 4 tokenizer relies on it (it splits text into newline runs and the rest before its BPE
    merges). A prompt then tokenizes the same alone as in front of an answer, in transformers as in llama.cpp.
    """
    names = list(DIGIT_NAMES) + list(PET_BREEDS)
    scaffolding = ["user", "model", "system", "thought", "\n", "\n\n", "\n\n\n", QUESTION,
                   "You are a helpful assistant."]
    lines = scaffolding * 10 + names + [n.lower() for n in names]
    lines += [str(i) for i in range(100)]
    return lines * 20


def build_tokenizer(vocab_size: int = 1024):
    """A Gemma-style tokenizer in miniature: transformers' ``GemmaTokenizer`` (BPE with byte fallback, spaces
    as ``▁``, Gemma 4's special tokens) over a vocabulary trained on this repository's own prompts and names.

    Its ids start as Gemma's do (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4); the named
    special tokens and the 256 ``<0xNN>`` byte pieces follow, then the learned pieces.
    """
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    fixed = [*ALL_SPECIAL_TOKENS, *BYTE_TOKENS]
    learner = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=fixed, show_progress=False)
    learner.train_from_iterator(tokenizer_training_corpus(), trainer=trainer)
    state = json.loads(learner.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = GemmaTokenizer(vocab=state["vocab"], merges=merges, extra_special_tokens=dict(NAMED_SPECIAL_TOKENS))
    tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    return tokenizer


def build_processor(tokenizer, family: str = LARGE, max_soft_tokens: int = TINY_MAX_SOFT_TOKENS,
                    patch_size: int = TINY_PATCH_SIZE, encoder_free: bool = False):
    """The real Gemma 4 processor pieces (pooling 3 as released, ``patch_size`` as the model's), with the
    family's chat template: ``Gemma4Processor``, or with ``encoder_free`` the 12B's ``Gemma4UnifiedProcessor``
    (merged patches, no pooling in the model)."""
    import importlib

    import transformers

    prefix, module = ("Gemma4Unified", "gemma4_unified") if encoder_free else ("Gemma4", "gemma4")
    video = importlib.import_module(f"transformers.models.{module}.video_processing_{module}")
    geometry = {"patch_size": patch_size, "pooling_kernel_size": TINY_POOLING, "max_soft_tokens": max_soft_tokens}
    return getattr(transformers, f"{prefix}Processor")(
        feature_extractor=getattr(transformers, f"{prefix}AudioFeatureExtractor")(),
        image_processor=getattr(transformers, f"{prefix}ImageProcessor")(**geometry),
        tokenizer=tokenizer,
        video_processor=getattr(video, f"{prefix}VideoProcessor")(**geometry),
        chat_template=CHAT_TEMPLATES[family],
        image_seq_length=max_soft_tokens,
    )


def family_text_config(family: str) -> dict:
    """What differs between the families' text models, in miniature.

    Large (26B-A4B, 31B): keys equal values on full-attention layers (``attention_k_eq_v``) with their own KV
    head count, bidirectional attention over an image's soft tokens, no per-layer inputs, two layers. E-series
    (E2B, E4B): per-layer input embeddings, and KV sharing: four layers (sliding, full, sliding, full), of which
    the last two compute no keys or values of their own and reuse those of the last earlier layer of their type
    (E2B: 20 of 35 layers, E4B: 18 of 42), with the double-wide MLP that E2B gives its shared layers. Training
    runs without a cache, so these two layers are where a forward that drops the shared keys and values shows.
    """
    if family == LARGE:
        return {"attention_k_eq_v": True, "num_global_key_value_heads": 1, "use_bidirectional_attention": "vision",
                "hidden_size_per_layer_input": 0}
    return {"hidden_size_per_layer_input": 16, "num_hidden_layers": 4, "num_kv_shared_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"] * 2, "use_double_wide_mlp": True}


# The 26B-A4B's text model in miniature (offline id "tiny-moe"): each layer runs a dense MLP (2112 wide in the
# 26B-A4B, 0.75 of its width) beside a block of experts (128 of 704, 0.25 of its width; 8 of them per token).
# The miniature keeps those widths' ratios to its width of 64, with 16 experts of which a token takes 2: fewer
# than 16 would make the router (width -> experts) narrower than the default LoRA rank.
TINY_MOE_TEXT = {"enable_moe_block": True, "num_experts": 16, "top_k_experts": 2, "moe_intermediate_size": 16,
                 "intermediate_size": 48}


def tiny_config(tokenizer, family: str = LARGE, vision_layers: int = TINY_VISION_LAYERS,
                text_hidden: int = TINY_TEXT_HIDDEN, patch_size: int = TINY_PATCH_SIZE,
                vision_hidden: int = TINY_VISION_HIDDEN, vision_heads: int = TINY_VISION_HEADS,
                vision_head_dim: int = TINY_VISION_HEAD_DIM, moe: bool = False):
    """A small Gemma4Config: 2 text layers (sliding then full; 4 for the E-series, ``family_text_config``), a
    vision tower of ``vision_layers`` layers, no audio.

    The vision tower clips as the family's releases do: on for the E-series, off (standardized) for the large.
    ``moe``: the large family's text model with the 26B-A4B's experts (``TINY_MOE_TEXT``).
    """
    from transformers import Gemma4Config

    vocab = len(tokenizer)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in NAMED_SPECIAL_TOKENS.items()}
    text = {
        "vocab_size": vocab,
        "vocab_size_per_layer_input": vocab,
        "hidden_size": text_hidden,
        "intermediate_size": 4 * text_hidden,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": TINY_HEAD_DIM,
        "global_head_dim": TINY_GLOBAL_HEAD_DIM,
        "sliding_window": 128,
        "max_position_embeddings": 4096,
        "final_logit_softcapping": 30.0,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": [tokenizer.eos_token_id, ids["eot_token"]],
        "bos_token_id": tokenizer.bos_token_id,
        **family_text_config(family),
        **(TINY_MOE_TEXT if moe else {}),
    }
    vision = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "num_key_value_heads": vision_heads,
        "head_dim": vision_head_dim,
        "patch_size": patch_size,
        "pooling_kernel_size": TINY_POOLING,
        "position_embedding_size": 512,
        "default_output_length": TINY_MAX_SOFT_TOKENS,  # in every released vision config (280 there); vLLM reads it
        "use_clipped_linears": family == E_SERIES,
        "standardize": family == LARGE,
    }
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        audio_token_id=ids["audio_token"],
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, ids["eot_token"]],
        bos_token_id=tokenizer.bos_token_id,
    )


@torch.no_grad()
def reinit_vision_positions(model, std: float = 0.2, generator: torch.Generator | None = None) -> None:
    """Replace the all-ones vision position table with random values of std ``std`` (drawn from ``generator``,
    else from torch's global generator, which ``build_tiny_model`` seeds).

    transformers initialises ``position_embedding_table`` to ones (the released checkpoints overwrite
    it). Left at ones, every patch gets the same large offset, which swamps the pixel projection: after
    the first RMSNorm all patches look alike. Too small and a patch says little about where it is, which a
    digit needs: each soft token of an upscaled 8×8 digit is one flat pixel. The positions should be about as
    large as the pixels' projection: at patch 4 (48 values a patch, ~0.14 per channel) std 0.1 raised the
    held-out accuracy after 516 steps from 0.958 to 0.966 on average; at patch 8 (192 values, ~0.28) std 0.2
    keeps that ratio, and raised one seed's accuracy after 344 steps from 0.878 to 0.931
    (``benchmarks/tiny_init_sweep.py``, variants ``qk1`` vs ``qk1_pos1``, then ``v3_1l_e8`` vs ``v3_1l_pos2_e8``).
    """
    table = model.model.vision_tower.patch_embedder.position_embedding_table
    table.copy_(torch.randn(table.shape, generator=generator, dtype=table.dtype) * std)


@torch.no_grad()
def scale_attention_norms(model, multiple: float = 1.0) -> None:
    """Set every ``q_norm`` and ``k_norm`` scale to ``multiple * head_dim ** -0.25``: attention logits of std
    ~``multiple**2`` (``multiple = head_dim ** 0.25`` gives back transformers' ones; the benchmarks sweep it).

    Gemma 4 computes attention with ``scaling = 1.0``, not ``1/sqrt(head_dim)``; trained checkpoints carry
    learned q/k norm scales instead. At transformers' init (ones) a random model's logits have std
    ``sqrt(head_dim)`` (5.7 here), so attention is peaked on a few random tokens: the answer position's
    largest attention weight averages 0.65, against 0.05 with these scales (``tests/test_tiny.py``).
    A linear probe on that position's final state then names 36% of the held-out digits, against 79%
    with these scales (``benchmarks/tiny_probe.py``). Training was slow and stuck on some seeds; with
    these scales the held-out accuracy after 516 steps rose from 0.86 to 0.96 on average
    (``benchmarks/tiny_init_sweep.py``, variants ``main`` vs ``qk1``).
    """
    for name, param in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            param.fill_(multiple * param.numel() ** -0.25)


@torch.no_grad()
def reinit_token_embeddings(model, std: float = 0.125) -> None:
    """Draw the (tied) token embeddings at std 1/sqrt(hidden) instead of transformers' 0.02.

    ``lm_head`` shares this table and reads RMS-normalised hidden states (norm sqrt(64) = 8), so with
    std 0.02 no logit can exceed about 8 x 0.02 x 8 = 1.3: the answer's loss cannot fall below ~2 and
    its gradient stays weak. At 0.125 the logits can reach about 8, and the loss goes to ~0.3 within a
    few hundred steps (benchmarks/tiny_init_sweep.py, variants ``base`` vs ``emb125``).
    """
    table = model.model.language_model.embed_tokens.weight
    table.copy_(torch.randn_like(table) * std)


def build_tiny_model(tokenizer, seed: int = TINY_SEED, **shape):
    """``Gemma4ForConditionalGeneration`` from ``tiny_config`` (``shape``: its keyword arguments, ``family``
    included), seeded so two builds are identical."""
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(tokenizer, **shape)
    model = Gemma4ForConditionalGeneration(config).eval()
    reinit_vision_positions(model)
    scale_attention_norms(model)
    reinit_token_embeddings(model, std=config.text_config.hidden_size ** -0.5)
    model.tie_weights()
    return model


def tiny_path(family: str = LARGE, moe: bool = False) -> Path:
    """Where the tiny checkpoint of a family is built: ``artifacts/tiny-gemma4`` (large, the default),
    ``artifacts/tiny-gemma4-e-series``, or ``artifacts/tiny-gemma4-moe`` (large, with experts)."""
    suffix = "-moe" if moe else "" if family == LARGE else f"-{family}"
    return DEFAULT_TINY_PATH.with_name(DEFAULT_TINY_PATH.name + suffix)


def build_tiny_gemma4(path: str | Path | None = None, seed: int = TINY_SEED, family: str = LARGE, **shape) -> Path:
    """Write a complete tiny Gemma 4 checkpoint folder (config, weights, tokenizer, processor) of ``family``
    (``"large"``: the 12B/26B-A4B/31B format, the default; ``"e-series"``: E2B/E4B's).

    ``shape`` overrides ``tiny_config``'s defaults (``vision_layers``, ``text_hidden``); the benchmarks
    use it, the notebooks take the defaults. Taught in notebook 01.
    Load it back like any hub model::

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForMultimodalLM.from_pretrained(path)
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path) if path is not None else tiny_path(family, shape.get("moe", False))
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, family, patch_size=shape.get("patch_size", TINY_PATCH_SIZE))
    model = build_tiny_model(tokenizer, seed=seed, family=family, **shape)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    built = {"seed": seed, "built_by": "helpers.tiny", "init_version": TINY_INIT_VERSION, "family": family, **shape}
    (path / "TINY_GEMMA4.json").write_text(json.dumps(built) + "\n")
    return path


def ensure_tiny_gemma4(path: str | Path | None = None, family: str = LARGE, moe: bool = False) -> Path:
    """Build the tiny checkpoint once; later calls reuse the folder, unless an older ``helpers.tiny`` built it
    (its ``TINY_GEMMA4.json`` names another ``init_version``): then it is rebuilt in place."""
    path = Path(path) if path is not None else tiny_path(family, moe)
    marker = path / "TINY_GEMMA4.json"
    built = json.loads(marker.read_text()) if marker.exists() and (path / "config.json").exists() else {}
    if (built.get("init_version") != TINY_INIT_VERSION or built.get("family", family) != family
            or built.get("moe", False) != moe):
        build_tiny_gemma4(path, family=family, **({"moe": True} if moe else {}))
    return path


# ------------------------------------------------------------------------------------------------------
# The 12B in miniature: Gemma4UnifiedForConditionalGeneration (encoder-free), offline id "tiny-12b".
#
# The same tokenizer, large-family chat template, text model (tiny_config's, family "large": k = v on the full
# layer, one global KV head, bidirectional attention over the image) and init scales as the default tiny model;
# instead of a vision tower, the 12B's patch embedder (LayerNorm -> Dense -> LayerNorm -> + x/y positions ->
# LayerNorm -> RMSNorm -> Linear), fed by Gemma4UnifiedProcessor with merged patches of 3 x 3 patches of
# TINY_PATCH_SIZE pixels (24 pixels; the released model's are 48).
TINY_12B_PATH = DEFAULT_TINY_PATH.with_name(f"{DEFAULT_TINY_PATH.name}-12b")
# Bumped whenever build_tiny_gemma4_12b draws different weights (ensure_tiny_gemma4_12b then rebuilds).
TINY_12B_INIT_VERSION = 2
TINY_12B_POSITION_STD = 0.5  # the x and y position rows, against the unit-variance patch after LayerNorm 2
_UNIFIED_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "layer_types",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                      "max_position_embeddings", "final_logit_softcapping", "rope_parameters", "pad_token_id",
                      "eos_token_id", "bos_token_id", "attention_k_eq_v", "use_bidirectional_attention")
_TOKEN_ID_KEYS = ("image_token_id", "boi_token_id", "eoi_token_id", "audio_token_id", "boa_token_id",
                  "eoa_token_index", "video_token_id", "pad_token_id", "eos_token_id", "bos_token_id")


def tiny_12b_config(tokenizer, text_hidden: int = TINY_TEXT_HIDDEN, patch_size: int = TINY_PATCH_SIZE):
    """A small ``Gemma4UnifiedConfig``: ``tiny_config``'s large-family text model, the patch embedder at the
    text width (as the 12B's ``mm_embed_dim`` 3840 equals its text width), the released 1,120-row position
    table, no audio."""
    from transformers import Gemma4UnifiedConfig

    base = tiny_config(tokenizer, family=LARGE, text_hidden=text_hidden, patch_size=patch_size)
    text = {key: value for key, value in base.text_config.to_dict().items() if key in _UNIFIED_TEXT_KEYS}
    text.update(global_head_dim=TINY_GLOBAL_HEAD_DIM,
                num_global_key_value_heads=family_text_config(LARGE)["num_global_key_value_heads"])
    vision = {"patch_size": patch_size, "pooling_kernel_size": TINY_POOLING, "mm_embed_dim": text_hidden,
              "output_proj_dims": text_hidden, "mm_posemb_size": 1120}
    return Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config=None,
                               **{key: getattr(base, key) for key in _TOKEN_ID_KEYS})


def build_tiny_12b_model(tokenizer, seed: int = TINY_SEED, position_std: float = TINY_12B_POSITION_STD, **shape):
    """``Gemma4UnifiedForConditionalGeneration`` from ``tiny_12b_config``, seeded, with the tiny model's scales
    (``scale_attention_norms``, ``reinit_token_embeddings``) and the position rows at ``position_std``."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_12b_config(tokenizer, **shape)
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    with torch.no_grad():
        table = model.model.embed_vision.pos_embedding
        table.copy_(torch.randn(table.shape) * position_std)
    scale_attention_norms(model)
    reinit_token_embeddings(model, std=config.text_config.hidden_size ** -0.5)
    model.tie_weights()
    return model


def build_tiny_gemma4_12b(path: str | Path | None = None, seed: int = TINY_SEED, **shape) -> Path:
    """Write a tiny 12B-architecture checkpoint folder (``Gemma4UnifiedForConditionalGeneration``, its processor,
    the Gemma-style tokenizer, the large family's template). Taught in notebooks 01 and 02; loaded like any hub
    model (``AutoProcessor`` / ``AutoModelForMultimodalLM``). ``shape``: ``build_tiny_12b_model``'s keywords."""
    path = Path(path) if path is not None else TINY_12B_PATH
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, LARGE, patch_size=shape.get("patch_size", TINY_PATCH_SIZE),
                                encoder_free=True)
    build_tiny_12b_model(tokenizer, seed=seed, **shape).save_pretrained(path)
    processor.save_pretrained(path)
    built = {"seed": seed, "built_by": "helpers.tiny", "init_version": TINY_12B_INIT_VERSION, "family": LARGE,
             "architecture": "gemma4_unified", **shape}
    (path / "TINY_GEMMA4.json").write_text(json.dumps(built) + "\n")
    return path


def ensure_tiny_gemma4_12b(path: str | Path | None = None) -> Path:
    """Build the tiny 12B checkpoint once (as ``ensure_tiny_gemma4``); rebuilt when its init version changed."""
    path = Path(path) if path is not None else TINY_12B_PATH
    marker = path / "TINY_GEMMA4.json"
    built = json.loads(marker.read_text()) if marker.exists() and (path / "config.json").exists() else {}
    if built.get("init_version") != TINY_12B_INIT_VERSION or built.get("architecture") != "gemma4_unified":
        build_tiny_gemma4_12b(path)
    return path
