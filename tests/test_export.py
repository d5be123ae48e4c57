"""helpers.export: the merged folder loads with plain transformers and predicts what the adapter predicts;
GGUF conversion and llama.cpp parity when llama.cpp's source (and its CLI) are present."""

import json

import pytest

from helpers import export, llama_cpp
from helpers.chat import PROMPT_FILE
from helpers.predict import read_merged, read_run
from helpers.run_folder import CLASS_NAMES, EXPORT_RECORD, MODEL_CARD


@pytest.fixture(scope="module")
def merged_dir(random_adapter_run, tmp_path_factory):
    return export.export_merged(read_run(random_adapter_run), tmp_path_factory.mktemp("export") / "merged",
                                check_size=16)


def test_merged_folder_loads_without_peft_and_predicts_like_the_adapter(random_adapter_run, merged_dir):
    from peft import PeftModel
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    for name in ("config.json", "model.safetensors", "chat_template.jinja", PROMPT_FILE, CLASS_NAMES, MODEL_CARD):
        assert (merged_dir / name).exists(), name
    record = json.loads((merged_dir / EXPORT_RECORD).read_text())
    assert record["check"] == {"rows": 16, "adapter_base": "float32", "agreement": 1.0}
    saved = read_run(random_adapter_run)
    examples = export.held_out_examples(saved, 16)
    processor = AutoProcessor.from_pretrained(merged_dir)
    merged = AutoModelForMultimodalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(AutoModelForMultimodalLM.from_pretrained(saved.model_path),
                                        saved.adapter).eval()
    base_says = export.constrained_predictions(AutoModelForMultimodalLM.from_pretrained(saved.model_path).eval(),
                                               processor, saved, examples)
    adapter_says = export.constrained_predictions(adapter, processor, saved, examples)
    assert export.constrained_predictions(merged, processor, saved, examples) == adapter_says
    assert adapter_says != base_says  # the adapter does change the model: the check above is not vacuous
    assert "agreement" not in read_merged(merged_dir).prompt and "0 held-out" not in (merged_dir / MODEL_CARD).read_text()


def test_export_refuses_a_folder_it_did_not_write(random_adapter_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert export.main(["--run", str(random_adapter_run), "--merged", str(tmp_path)]) == 2
    assert "refusing to write into it" in capsys.readouterr().err


def llama_cpp_source():
    try:
        return llama_cpp.find_llama_cpp(fetch=False)
    except llama_cpp.LlamaCppError as err:
        pytest.skip(f"llama.cpp source not cached ({err})")


def test_gguf_conversion_with_llama_cpps_own_converter(merged_dir, tmp_path):
    """Runs where artifacts/llama-cpp holds the sdist (python -m helpers.export --gguf fetches it once)."""
    folder = export.export_gguf(merged_dir, tmp_path / "gguf", llama_cpp_source())
    record = json.loads((folder / EXPORT_RECORD).read_text())
    assert (folder / record["files"]["text"]).stat().st_size > 0 and (folder / record["files"]["projector"]).exists()
    budget = str(record["image_soft_tokens"])
    assert record["llama_cpp"]["args"] == ["--image-min-tokens", budget, "--image-max-tokens", budget]
