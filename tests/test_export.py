"""helpers.export and helpers.exports: the merged folder loads with plain transformers and predicts what the adapter predicts;
GGUF conversion and llama.cpp parity when llama.cpp's source (and its CLI) are present."""

import json

import pytest

from helpers import export
from helpers.exports import llama_cpp, merge, parity
from helpers.run.folder import (
    CLASS_NAMES,
    EXPORT_RECORD,
    MODEL_CARD,
    PROMPT_FILE,
    atomic_write_json,
    read_merged,
    read_run,
)


@pytest.fixture(scope="module")
def merged_dir(random_adapter_run, tmp_path_factory):
    return merge.export_merged(read_run(random_adapter_run), tmp_path_factory.mktemp("export") / "merged",
                                check_size=16)


def test_merged_folder_loads_without_peft_and_predicts_like_the_adapter(random_adapter_run, merged_dir):
    from peft import PeftModel
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    for name in ("config.json", "model.safetensors", "chat_template.jinja", PROMPT_FILE, CLASS_NAMES, MODEL_CARD):
        assert (merged_dir / name).exists(), name
    record = json.loads((merged_dir / EXPORT_RECORD).read_text())
    assert record["check"] == {"rows": 16, "adapter_base": "float32", "agreement": 1.0}
    saved = read_run(random_adapter_run)
    examples = merge.held_out_examples(saved, 16)
    processor = AutoProcessor.from_pretrained(merged_dir)
    merged = AutoModelForMultimodalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(AutoModelForMultimodalLM.from_pretrained(saved.model_path),
                                        saved.adapter).eval()
    base_says = merge.constrained_predictions(AutoModelForMultimodalLM.from_pretrained(saved.model_path).eval(),
                                               processor, saved, examples)
    adapter_says = merge.constrained_predictions(adapter, processor, saved, examples)
    assert merge.constrained_predictions(merged, processor, saved, examples) == adapter_says
    assert adapter_says != base_says  # the adapter does change the model: the check above is not vacuous
    assert "agreement" not in read_merged(merged_dir).prompt and "0 held-out" not in (merged_dir / MODEL_CARD).read_text()


def test_export_refuses_a_folder_it_did_not_write(random_adapter_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert export.main(["--run", str(random_adapter_run), "--merged", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to write into it" in err and str(tmp_path) in err and "--overwrite" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_writes_into_it_and_keeps_the_other_files(random_adapter_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert export.main(["--run", str(random_adapter_run), "--merged", str(tmp_path), "--check-size", "0",
                        "--overwrite"]) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine" and read_merged(tmp_path).class_names
    assert "notes.txt" not in json.loads((tmp_path / EXPORT_RECORD).read_text())["written"]


def test_an_earlier_export_is_replaced_without_the_flag_and_only_its_files(random_adapter_run, tmp_path):
    """Exporting again into a merged folder replaces the files the earlier export listed as written (a file it
    wrote that this one does not write is removed) and leaves a file the user added."""
    folder = tmp_path / "merged"
    assert export.main(["--run", str(random_adapter_run), "--merged", str(folder), "--check-size", "0"]) == 0
    record = json.loads((folder / EXPORT_RECORD).read_text())
    assert {"config.json", "model.safetensors", EXPORT_RECORD, MODEL_CARD} <= set(record["written"])
    (folder / "Modelfile").write_text("FROM ./model.gguf")  # the user's
    (folder / "old_shard.safetensors").write_text("written by the earlier export")
    atomic_write_json(folder / EXPORT_RECORD, {**record, "written": [*record["written"], "old_shard.safetensors"]})
    assert export.main(["--run", str(random_adapter_run), "--merged", str(folder), "--check-size", "0"]) == 0
    assert (folder / "Modelfile").read_text() == "FROM ./model.gguf" and not (folder / "old_shard.safetensors").exists()
    assert "Modelfile" not in json.loads((folder / EXPORT_RECORD).read_text())["written"]


def test_targets_an_export_may_not_write_into(random_adapter_run, merged_dir, tmp_path, capsys):
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / EXPORT_RECORD).write_text(json.dumps({"kind": "gguf"}))
    (gguf / "model.gguf").write_text("an earlier GGUF export")
    with pytest.raises(merge.ExportError, match="holds a gguf export, not a merged one.*--overwrite"):
        merge.check_target(gguf, "merged")
    assert merge.check_target(gguf, "gguf") == gguf
    user = tmp_path / "user"
    user.mkdir()
    (user / EXPORT_RECORD).write_text('{"exported_by": "some other tool"}')  # not an export of ours
    with pytest.raises(merge.ExportError, match="no export.json of an earlier export"):
        merge.check_target(user, "gguf")
    with pytest.raises(merge.ExportError, match="is a run folder"):  # even with --overwrite
        merge.check_target(random_adapter_run, "merged", overwrite=True)
    assert export.main(["--model", str(merged_dir), "--gguf", str(merged_dir)]) == 2
    assert "is the merged folder" in capsys.readouterr().err
    assert (gguf / "model.gguf").exists() and (merged_dir / "model.safetensors").exists()


@pytest.mark.parametrize("vouched", [False, True])
def test_a_damaged_adapter_is_one_line_and_nothing_is_written(random_adapter_run, tmp_path, capsys, vouched):
    from test_predict import damaged_copy, one_error_line

    run, path = damaged_copy(random_adapter_run, tmp_path, "adapter_model.safetensors", "truncated", vouched)
    assert export.main(["--run", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path.parent) in line and "rerun the training command" in line
    assert not (run / "merged").exists()


def llama_cpp_source():
    try:
        return llama_cpp.find_llama_cpp(fetch=False)
    except llama_cpp.LlamaCppError as err:
        pytest.skip(f"llama.cpp source not cached ({err})")


def test_gguf_conversion_with_llama_cpps_own_converter(merged_dir, tmp_path):
    """Runs where artifacts/llama-cpp holds the sdist (python -m helpers.export --gguf fetches it once)."""
    folder = llama_cpp.export_gguf(merged_dir, tmp_path / "gguf", llama_cpp_source())
    record = json.loads((folder / EXPORT_RECORD).read_text())
    assert (folder / record["files"]["text"]).stat().st_size > 0 and (folder / record["files"]["projector"]).exists()
    assert record["llama_cpp"]["args"] == llama_cpp.image_token_args(record["image_soft_tokens"])


def test_llama_cpp_is_asked_with_the_training_prompt(merged_dir):
    """What the parity benchmark sends llama-server's completion endpoint: transformers' own generation prompt
    (large family, thinking off: the empty thought channel), the image as llama.cpp's marker, no BOS."""

    prompt = read_merged(merged_dir).prompt
    text = parity.training_prompt_text(merged_dir, prompt)
    assert text == (f"<|turn>user\n\n\n{llama_cpp.MEDIA_MARKER}\n\n{prompt['question']}<turn|>\n<|turn>model\n"
                    "<|channel>thought\n<channel|>")
    args = llama_cpp.server_args("m.gguf", "p.gguf", 70)
    assert args[args.index("--reasoning") + 1] == "off" and args[-4:] == llama_cpp.image_token_args(70) == ["--image-min-tokens", "64", "--image-max-tokens", "70"]


def llama_server():
    server = llama_cpp.server_path(llama_cpp_source())
    if not server.exists():
        pytest.skip(f"{server} is not built (python -m benchmarks.export_parity RUN_DIR --build-llama-cpp builds it)")
    return server


def test_llama_server_answers_through_both_endpoints(merged_dir, tmp_path):
    """Runs where llama-server is built: the projector loads (the vision head size written after conversion),
    the training prompt's text on both sides of the image tokenizes as transformers tokenizes it, and the server
    answers each image (greedy) through both endpoints."""
    from transformers import AutoProcessor


    server_binary = llama_server()
    folder = llama_cpp.export_gguf(merged_dir, tmp_path / "gguf", llama_cpp_source())
    record = json.loads((folder / EXPORT_RECORD).read_text())
    text = parity.training_prompt_text(merged_dir, record["prompt"])
    tokenizer = AutoProcessor.from_pretrained(merged_dir).tokenizer
    before, after = text.split(llama_cpp.MEDIA_MARKER)
    with llama_cpp.Server(server_binary, folder / record["files"]["text"], folder / record["files"]["projector"],
                          record["image_soft_tokens"]) as server:
        assert server.tokenize(before) == tokenizer(tokenizer.bos_token + before, add_special_tokens=False).input_ids
        assert server.tokenize(after) == tokenizer(tokenizer.bos_token + after, add_special_tokens=False).input_ids
    examples = merge.held_out_examples(read_merged(merged_dir), 2)
    results = parity.llama_cpp_engines(folder, server_binary, examples)
    assert {len(r["text"]) for r in results.values()} == {2}


def test_the_merge_loads_the_base_on_the_gpu_only_where_it_fits(monkeypatch, tiny_path):
    import torch

    from helpers.modeling import meta_model, read_model_config

    weights = sum(p.numel() for p in meta_model(read_model_config(str(tiny_path))).parameters()) * 2  # bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(weights * 1.2), 10**12))
    assert merge.merge_device_map(str(tiny_path), torch.bfloat16) == {"": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(weights * 1.1), 10**12))
    assert merge.merge_device_map(str(tiny_path), torch.bfloat16) is None  # the host's memory instead
