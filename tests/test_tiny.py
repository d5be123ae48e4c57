"""The tiny offline Gemma 4: a real checkpoint folder that round-trips through the Auto classes."""

import json
import re

import pytest
import torch
from PIL import Image
from transformers import AutoModelForMultimodalLM, AutoProcessor

from helpers.chat import ALL_SPECIAL_TOKENS, NAMED_SPECIAL_TOKENS, QUESTION, chat_format, to_messages
from helpers.collator import VisionChatCollator
from helpers.data import DIGIT_NAMES, PET_BREEDS, load_examples
from helpers.modeling import apply_lora
from helpers.tiny import TINY_INIT_VERSION, build_tiny_gemma4, ensure_tiny_gemma4


def test_round_trips_through_auto_classes(tiny_path, tiny_processor):
    model = AutoModelForMultimodalLM.from_pretrained(tiny_path)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    assert type(tiny_processor).__name__ == "Gemma4Processor"
    assert type(tiny_processor.image_processor).__name__ == "Gemma4ImageProcessor"
    # the large family's releases (26B-A4B, 31B) ship the vision tower with clipping off and standardized
    assert model.config.vision_config.use_clipped_linears is False
    assert model.config.vision_config.standardize is True
    assert model.config.text_config.attention_k_eq_v is True
    assert model.config.audio_config is None
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000


def test_two_builds_are_identical(tmp_path, tiny_path):
    other = build_tiny_gemma4(tmp_path / "again")
    a = AutoModelForMultimodalLM.from_pretrained(tiny_path).state_dict()
    b = AutoModelForMultimodalLM.from_pretrained(other).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_special_tokens_are_single_ids_with_real_strings(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = [tok(t, add_special_tokens=False).input_ids for t in ALL_SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ALL_SPECIAL_TOKENS)
    for attribute, string in NAMED_SPECIAL_TOKENS.items():
        assert getattr(tok, attribute) == string
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_vocabulary_covers_every_prompt_and_class_name(tiny_processor):
    tok = tiny_processor.tokenizer
    for text in [QUESTION, *DIGIT_NAMES, *PET_BREEDS]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_the_e_series_miniature_clips_and_has_per_layer_inputs(tiny_e_series_path):
    model = AutoModelForMultimodalLM.from_pretrained(tiny_e_series_path)
    assert model.config.vision_config.use_clipped_linears is True
    assert model.config.text_config.hidden_size_per_layer_input > 0
    assert model.config.text_config.attention_k_eq_v is False


def test_what_llama_cpp_converter_assumes(tiny_path):
    """The checks of llama.cpp's Gemma 4 converter that need no llama.cpp (conversion/gemma.py, gguf-py's
    LlamaHfVocab): a full-attention head size of its own in config.json, a SentencePiece-style BPE with byte
    fallback and a Sequence decoder, and pooling 3 (the projector file carries no pooling; 3 is assumed)."""
    config = json.loads((tiny_path / "config.json").read_text())
    text = config["text_config"]
    full = [i for i, kind in enumerate(text["layer_types"]) if kind == "full_attention"]
    overrides = text.get("per_layer_config") or {}
    assert text.get("global_head_dim") or all(overrides[str(i)]["head_dim"] != text["head_dim"] for i in full)
    assert "num_kv_shared_layers" in text
    assert text["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    assert config["vision_config"]["pooling_kernel_size"] == 3
    tokenizer_json = json.loads((tiny_path / "tokenizer.json").read_text())
    model = tokenizer_json["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is True and not model.get("ignore_merges")
    assert tokenizer_json["decoder"]["type"] == "Sequence"
    assert all(f"<0x{b:02X}>" in model["vocab"] for b in range(256))
    processor_config = json.loads((tiny_path / "processor_config.json").read_text())
    image = processor_config["image_processor"]
    assert image["pooling_kernel_size"] == 3 and image["patch_size"] == config["vision_config"]["patch_size"]
    vision = config["vision_config"]
    assert vision["default_output_length"] == image["max_soft_tokens"]  # vLLM's Gemma 4 code reads it


def test_tokenizer_is_gemma_style(tiny_processor):
    tok = tiny_processor.tokenizer
    assert type(tok).__name__ == "GemmaTokenizer"
    assert tok.convert_ids_to_tokens(list(range(5))) == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    pieces = tok.tokenize("Great Pyrenees")
    assert "\u2581" in "".join(pieces) and " " not in "".join(pieces)  # spaces are "▁", as in SentencePiece
    unseen = tok.tokenize("ß")  # a character the vocabulary never saw: its UTF-8 bytes, not <unk>
    assert unseen == ["<0xC3>", "<0x9F>"] and tok.decode(tok.convert_tokens_to_ids(unseen)) == "ß"


def _llama_cpp_gemma4_ids(tokenizer, text: str) -> list[int]:
    """Tokenize as llama.cpp's Gemma 4 tokenizer does (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GEMMA4): special
    tokens first, then each stretch cut into newline runs and the rest (regex ``[^\\n]+|[\\n]+``), BPE on each."""
    specials = "|".join(re.escape(t) for t in sorted(tokenizer.all_special_tokens, key=len, reverse=True))
    ids = []
    for piece in re.split(f"({specials})", text):
        if piece in tokenizer.all_special_tokens:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            for chunk in re.findall(r"[^\n]+|\n+", piece):
                ids += tokenizer.encode(chunk, add_special_tokens=False)
    return ids


def test_no_piece_joins_a_newline_to_other_text(tiny_processor):
    # llama.cpp's Gemma 4 BPE never sees a newline beside other text, so such a piece would tokenize differently
    # there; Gemma 4's released vocabulary has none (llama.cpp asserts it).
    vocab = tiny_processor.tokenizer.get_vocab()
    assert "\n" in vocab and "\n\n" in vocab
    assert [piece for piece in vocab if "\n" in piece and piece.strip("\n")] == []


@pytest.mark.parametrize("system, thinking", [(None, False), ("You are a helpful assistant.", False), (None, True)])
def test_training_text_tokenizes_as_in_llama_cpp(tiny_processor, tiny_e_series_processor, system, thinking):
    for processor in (tiny_processor, tiny_e_series_processor):
        tokenizer = processor.tokenizer
        text = chat_format(processor, system_prompt=system, enable_thinking=thinking).training_text("Great Pyrenees")
        assert tokenizer.encode(text, add_special_tokens=False) == _llama_cpp_gemma4_ids(tokenizer, text)


def _soft_tokens(processor, size):
    text = processor.apply_chat_template(to_messages(), tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[[Image.new("RGB", size, "white")]], return_tensors="pt")
    return int((batch["input_ids"] == processor.tokenizer.image_token_id).sum())


def test_image_expands_to_size_dependent_soft_token_counts(tiny_processor):
    # pooling 3, budget 70 -> at most 70 soft tokens, fewer for elongated images
    counts = {size: _soft_tokens(tiny_processor, size) for size in [(64, 64), (300, 100), (40, 200)]}
    assert counts[(64, 64)] == 64
    assert len(set(counts.values())) == 3
    assert all(0 < c <= 70 for c in counts.values())


def test_forward_and_generate(tiny_path, tiny_processor):
    model = AutoModelForMultimodalLM.from_pretrained(tiny_path)
    example = load_examples("digits", "test", size=2)[0]
    text = tiny_processor.apply_chat_template(to_messages(), tokenize=False, add_generation_prompt=True)
    batch = tiny_processor(text=[text], images=[[example["image"]]], return_tensors="pt")
    batch.pop("num_soft_tokens_per_image", None)
    logits = model(**batch).logits
    assert logits.shape[-1] == len(tiny_processor.tokenizer)
    assert logits.abs().max() <= model.config.text_config.final_logit_softcapping
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3 or out[0, -1].item() in model.config.text_config.eos_token_id


def test_lora_all_linear_applies_to_the_tiny_model(tiny_path):
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("vision_tower" in n and ".linear.lora_A" in n for n in names)  # ClippableLinear's inner Linear
    assert any("language_model" in n for n in names)
    assert not any("lm_head" in n for n in names)


def test_processor_loads_with_auto_processor(tiny_path):
    assert AutoProcessor.from_pretrained(tiny_path).image_processor.max_soft_tokens == 70


def _answer_position_attention_peaks(model, processor):
    """Per layer, the answer position's largest attention weight, averaged over heads and eight digits."""
    examples = load_examples("digits", "test", size=8)
    batch = VisionChatCollator(processor, examples.class_names, mode="eval")(examples.examples)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    return [a[:, :, -1].max(-1).values.mean().item() for a in attentions]


def test_answer_position_attends_to_many_tokens(tiny_path, tiny_processor):
    # Gemma 4's attention scaling is 1.0; with q/k norm scales at ones a random model's attention piles onto a
    # few tokens (largest weight ~0.65 on average, measured) and the answer sees little of the image.
    model = AutoModelForMultimodalLM.from_pretrained(tiny_path, attn_implementation="eager")
    assert max(_answer_position_attention_peaks(model, tiny_processor)) < 0.2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.fill_(1.0)
    assert min(_answer_position_attention_peaks(model, tiny_processor)) > 0.4


def test_ensure_rebuilds_a_folder_from_an_older_init(tmp_path):
    path = ensure_tiny_gemma4(tmp_path / "tiny")
    marker = path / "TINY_GEMMA4.json"
    assert json.loads(marker.read_text())["init_version"] == TINY_INIT_VERSION
    weights = path / "model.safetensors"
    weights.write_bytes(b"stale")  # reused as is while the marker says this init
    ensure_tiny_gemma4(path)
    assert weights.read_bytes() == b"stale"
    marker.write_text(json.dumps({"seed": 0, "built_by": "helpers.tiny"}))  # built before init_version existed
    ensure_tiny_gemma4(path)
    assert json.loads(marker.read_text())["init_version"] == TINY_INIT_VERSION
    assert AutoModelForMultimodalLM.from_pretrained(path) is not None
