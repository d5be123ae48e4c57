"""The embedded offline default: a tiny, randomly initialised Gemma 4 saved as an ordinary checkpoint.

It is loaded through exactly the same ``AutoProcessor.from_pretrained`` /
``AutoModelForMultimodalLM.from_pretrained`` path as ``google/gemma-4-31b-it``, so every notebook, the
runner and the tests run with no GPU, no token and no network. Taught in notebook 01 (what the laptop
runs) and used by every other notebook as the default ``model_id``.

What is real and what is small:
- real: the model classes (``Gemma4ForConditionalGeneration``), the vision tower with
  ``Gemma4ClippableLinear`` (clipping on, as in E2B/E4B), the special-token strings, the chat format,
  the image processor and its variable soft-token count;
- small: every width and depth, and the vocabulary, a byte-level BPE trained on this repository's own
  prompts and class names (so no text is ever an unknown token).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers.chat import QUESTION
from helpers.data import DIGIT_NAMES, PET_BREEDS

# The real Gemma 4 special-token strings (tokenizer_config.json of the published checkpoints):
# attribute name on the tokenizer -> token string.
NAMED_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
# Ids 0..3 as in Gemma 4 (pad 0, eos 1, bos 2, unk 3); the rest follow in a fixed order.
BASE_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
VIDEO_TOKEN = "<|video|>"
ALL_SPECIAL_TOKENS = BASE_SPECIAL_TOKENS + list(NAMED_SPECIAL_TOKENS.values()) + [VIDEO_TOKEN]

# Gemma 4's format (Google's prompt-formatting page): <bos><|turn>user\n...<turn|>\n<|turn>model\n...
# Roles system/user/model; "assistant" is mapped to "model"; one <|image|> placeholder per image item.
# transformers renders with trim_blocks, so newlines are written as {{ '\n' }} expressions.
# `empty_thought_block` reproduces the large models' template, which appends an empty thought
# block to the generation prompt when thinking is off.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
    "{%- if empty_thought_block is defined and empty_thought_block -%}"
    "{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"
    "{%- endif -%}"
)

DEFAULT_TINY_PATH = Path(__file__).resolve().parent.parent / "artifacts" / "tiny-gemma4"
TINY_SEED = 0
# 70 is the smallest budget the real image processor accepts; with patch 4 and pooling 2 a square
# image becomes 64 soft tokens, which keeps a CPU step fast.
TINY_MAX_SOFT_TOKENS = 70
TINY_VISION_LAYERS = 2
TINY_PATCH_SIZE = 4
TINY_POOLING = 2
TINY_TEXT_HIDDEN = 64
# Bumped whenever build_tiny_model draws different weights, so ensure_tiny_gemma4 rebuilds an older folder.
# 2: q/k norm scales at head_dim**-0.25 and vision positions at std 0.1 (benchmarks/tiny_init_sweep.py round 11).
TINY_INIT_VERSION = 2


def tokenizer_training_corpus() -> list[str]:
    """Every text the tiny model will meet: prompts, class names, chat scaffolding, digits."""
    names = list(DIGIT_NAMES) + list(PET_BREEDS)
    scaffolding = ["user\n", "model\n", "system\n", "thought\n", "\n", QUESTION, "You are a helpful assistant."]
    lines = scaffolding * 10 + names + [n.lower() for n in names] + [f"{QUESTION} {n}." for n in names]
    lines += [str(i) for i in range(100)]
    return lines * 20


def build_tokenizer(vocab_size: int = 768):
    """A byte-level BPE (no unknown tokens, exact decoding) that carries Gemma 4's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ALL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tokenizer_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=dict(NAMED_SPECIAL_TOKENS),
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer, max_soft_tokens: int = TINY_MAX_SOFT_TOKENS):
    """The real Gemma 4 processor pieces, sized for the tiny vision tower (patch 4, pooling 2)."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    geometry = {"patch_size": TINY_PATCH_SIZE, "pooling_kernel_size": TINY_POOLING, "max_soft_tokens": max_soft_tokens}
    image_processor = Gemma4ImageProcessor(**geometry)
    video_processor = Gemma4VideoProcessor(**geometry)
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=max_soft_tokens,
    )


def tiny_config(tokenizer, vision_layers: int = TINY_VISION_LAYERS, text_hidden: int = TINY_TEXT_HIDDEN):
    """A small Gemma4Config: 2 text layers (sliding then full), a 2-layer clipped vision tower, no audio."""
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
        "head_dim": 32,
        "global_head_dim": 32,
        "hidden_size_per_layer_input": 16,
        "sliding_window": 128,
        "max_position_embeddings": 4096,
        "final_logit_softcapping": 30.0,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": [tokenizer.eos_token_id, ids["eot_token"]],
        "bos_token_id": tokenizer.bos_token_id,
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "patch_size": TINY_PATCH_SIZE,
        "pooling_kernel_size": TINY_POOLING,
        "position_embedding_size": 512,
        "use_clipped_linears": True,
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
def reinit_vision_positions(model, std: float = 0.1, generator: torch.Generator | None = None) -> None:
    """Replace the all-ones vision position table with random values of std ``std`` (drawn from ``generator``,
    else from torch's global generator, which ``build_tiny_model`` seeds).

    transformers initialises ``position_embedding_table`` to ones (the released checkpoints overwrite
    it). Left at ones, every patch gets the same large offset, which swamps the pixel projection: after
    the first RMSNorm all patches look alike. Too small (0.02, this project's first choice) and a patch
    says little about where it is, which a digit needs: each soft token of an upscaled 8×8 digit is one
    flat pixel. At 0.1 the positions are about as large as the pixels' projection (~0.14 per
    channel), and the held-out accuracy after 516 steps rose from 0.958 to 0.966 on average
    (``benchmarks/tiny_init_sweep.py``, variants ``qk1`` vs ``qk1_pos1``, with ``scale_attention_norms``).
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
    """``Gemma4ForConditionalGeneration`` from ``tiny_config`` (``shape``: its keyword arguments), seeded so
    two builds are identical."""
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(tokenizer, **shape)
    model = Gemma4ForConditionalGeneration(config).eval()
    reinit_vision_positions(model)
    scale_attention_norms(model)
    reinit_token_embeddings(model, std=config.text_config.hidden_size ** -0.5)
    model.tie_weights()
    return model


def build_tiny_gemma4(path: str | Path = DEFAULT_TINY_PATH, seed: int = TINY_SEED, **shape) -> Path:
    """Write a complete tiny Gemma 4 checkpoint folder (config, weights, tokenizer, processor).

    ``shape`` overrides ``tiny_config``'s defaults (``vision_layers``, ``text_hidden``); the benchmarks
    use it, the notebooks take the defaults. Taught in notebook 01.
    Load it back like any hub model::

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForMultimodalLM.from_pretrained(path)
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_tiny_model(tokenizer, seed=seed, **shape)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    built = {"seed": seed, "built_by": "helpers.tiny", "init_version": TINY_INIT_VERSION, **shape}
    (path / "TINY_GEMMA4.json").write_text(json.dumps(built) + "\n")
    return path


def ensure_tiny_gemma4(path: str | Path = DEFAULT_TINY_PATH) -> Path:
    """Build the tiny checkpoint once; later calls reuse the folder, unless an older ``helpers.tiny`` built it
    (its ``TINY_GEMMA4.json`` names another ``init_version``): then it is rebuilt in place."""
    path = Path(path)
    marker = path / "TINY_GEMMA4.json"
    built = json.loads(marker.read_text()) if marker.exists() and (path / "config.json").exists() else {}
    if built.get("init_version") != TINY_INIT_VERSION:
        build_tiny_gemma4(path)
    return path


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
