"""The adapter merged into its base: a folder that plain transformers loads, no PEFT. Taught in notebook 06.

The merged folder holds the model (bf16 when merged on a GPU, the base checkpoint's dtype on a CPU), the
processor with its chat template and the run's image budget, the run's prompt and class names, a model card,
and ``export.json``: what made it, and how often it agrees with the adapter on held-out rows. A QLoRA adapter
was trained on a 4-bit base and is merged into the bf16 base: the agreement says what that changed.
``python -m helpers.export --run RUN_DIR --merged DIR`` is the command.

An export writes only its own files (``check_target``): into a new or empty folder, or over an earlier export of
the same kind, whose ``export.json`` (written last) lists the files it wrote; those are replaced and anything else
in the folder is left as it is. A folder it did not write is refused unless asked (``overwrite``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig

from helpers.data import load_examples
from helpers.evaluation import constrained_scores
from helpers.exports.predictor import check_readable
from helpers.modeling import load_model, load_processor, meta_model, quantization_config, read_model_config
from helpers.run.folder import (
    CLASS_NAMES,
    EXPORT_RECORD,
    MANIFEST,
    MODEL_CARD,
    SavedRun,
    atomic_write_json,
    metrics_file,
    package_versions,
    read_json,
    save_prompt,
    write_class_names,
)


def share_equal(first, second) -> float:
    """The share of positions where two lists of predictions agree."""
    return sum(a == b for a, b in zip(first, second)) / len(first) if first else float("nan")


DEFAULT_CHECK_SIZE = 100  # held-out rows on which the merged model is compared with the adapter


class ExportError(ValueError):
    """The export cannot be made as asked; the message names the folder or option."""


EXPORT_KINDS = ("merged", "gguf")  # the "kind" of an export.json: a merged folder, or a GGUF folder


def export_record(folder) -> dict | None:
    """The ``export.json`` of a folder an export wrote (a JSON object of a known kind), else None."""
    try:
        record = json.loads((Path(folder) / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("kind") in EXPORT_KINDS else None


def check_target(folder, kind: str = "merged", overwrite: bool = False) -> Path:
    """A folder an export of ``kind`` may write into: new, empty, or an earlier export of the same kind; with
    ``overwrite`` any folder (the export's files replace those of the same names; nothing else is removed).
    A run folder is refused either way: the export would mix its files with the run's."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file: give a folder to export into")
    if (folder / MANIFEST).exists():
        raise ExportError(f"{folder} is a run folder (it holds {MANIFEST}): export into a folder of its own, "
                          f"e.g. {folder / kind}")
    if overwrite or not folder.is_dir() or not any(folder.iterdir()):
        return folder
    record = export_record(folder)
    if record is None:
        raise ExportError(f"{folder} is not empty and holds no {EXPORT_RECORD} of an earlier export: refusing to "
                          "write into it; give a new folder, or pass --overwrite to write the export's files into "
                          "it (files of the same names are replaced, the others kept)")
    if record["kind"] != kind:
        raise ExportError(f"{folder} holds a {record['kind']} export, not a {kind} one: refusing to write into it; "
                          "give another folder, or pass --overwrite")
    return folder


def folder_files(folder) -> set[str]:
    """Every file under ``folder``, as paths relative to it."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def clear_earlier_export(folder, kind: str) -> set[str]:
    """Remove the files an earlier export of ``kind`` listed in its record, but not the record itself (replaced
    last, so a killed export still reads as one); returns the files left, which the new export did not write."""
    record = export_record(folder)
    if record is not None and record["kind"] == kind:
        for name in record.get("written", []):
            path = Path(folder) / name
            if name != EXPORT_RECORD and path.is_file() and path.resolve().is_relative_to(Path(folder).resolve()):
                path.unlink()
    return folder_files(folder) - {EXPORT_RECORD}


def written_files(folder, kept: set[str]) -> list[str]:
    """What an export wrote into ``folder``: every file but those ``clear_earlier_export`` left, and its record."""
    return sorted((folder_files(folder) - kept) | {EXPORT_RECORD})


def merge_dtype(model_path: str) -> torch.dtype:
    """bf16 on a GPU; on a CPU the base checkpoint's own dtype (the tiny checkpoint is float32)."""
    if torch.cuda.is_available():
        return torch.bfloat16
    dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# Room left beside the bf16 weights for the merge and the check's forward passes.
GPU_MERGE_HEADROOM = 1.15


def merge_device_map(model_path: str, dtype: torch.dtype):
    """Where the base loads for the merge: the GPU when its bf16 weights (counted on the ``meta`` device) fit
    its free memory with ``GPU_MERGE_HEADROOM``; else the CPU (``None``), slower but never out of GPU memory.
    The 31B's 62 GB fit the RTX PRO 6000's 96 GB, and the check runs there in minutes instead of an hour."""
    if not torch.cuda.is_available():
        return None
    model = meta_model(read_model_config(model_path))
    needed = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info()
    return {"": torch.cuda.current_device()} if needed * GPU_MERGE_HEADROOM < free else None


def held_out_examples(saved: SavedRun, size: int) -> list[dict]:
    """The run's own held-out rows (the first ``size`` of what evaluation used)."""
    config = saved.config
    return load_examples(config.dataset, "test", size, config.seed, **config.data_options()).examples


def constrained_predictions(model, processor, saved: SavedRun, examples: list[dict]) -> list[str]:
    """The class constrained scoring picks for each example (the scoring path evaluation and predict use)."""
    scores = constrained_scores(model, processor, examples, saved.class_names, 16, False, **saved.prompt)
    return [saved.class_names[i] for i in scores.argmax(dim=-1).tolist()]


def merge_run(saved: SavedRun, check_size: int = DEFAULT_CHECK_SIZE):
    """(merged model, processor, check): the adapter merged into its base in ``merge_dtype``; ``check``
    compares the merged model with the adapter as trained (a QLoRA adapter on its 4-bit base) on
    ``check_size`` held-out rows, or says why it was not measured."""
    check_readable(saved)
    processor = load_processor(saved.model_path, saved.image_soft_tokens)
    dtype = merge_dtype(saved.model_path)
    qlora = saved.config.quantization == "4bit"
    examples = held_out_examples(saved, check_size) if check_size else []
    check = {"rows": len(examples), "adapter_base": "4-bit NF4" if qlora else str(dtype).removeprefix("torch.")}
    adapter_says = None
    if examples and qlora and not torch.cuda.is_available():
        check["not_measured"] = "the adapter's 4-bit base needs a CUDA GPU (bitsandbytes); this export ran on a CPU"
    elif examples and qlora:  # the adapter as trained: on the 4-bit base, loaded separately and freed
        base = load_model(saved.model_path, quantization_config(saved.config))
        trained = PeftModel.from_pretrained(base, saved.adapter)
        adapter_says = constrained_predictions(trained.eval(), processor, saved, examples)
        del trained, base  # the 4-bit model leaves the GPU before the bf16 one loads
        torch.cuda.empty_cache()
    base = load_model(saved.model_path, dtype=dtype, device_map=merge_device_map(saved.model_path, dtype))
    model = PeftModel.from_pretrained(base, saved.adapter)
    model.eval()
    if examples and not qlora:
        adapter_says = constrained_predictions(model, processor, saved, examples)
    model = model.merge_and_unload()
    if adapter_says is not None:
        merged_says = constrained_predictions(model, processor, saved, examples)
        check["agreement"] = share_equal(adapter_says, merged_says)
    return model, processor, check


def run_metrics(saved: SavedRun) -> dict:
    """The summary of the run's metrics.json (notebook 05's accuracies), or ``{}`` before evaluation."""
    return (read_json(metrics_file(saved.folder)) or {}).get("summary", {})


def model_card(record: dict) -> str:
    """A short README for the merged folder: base, data, prompt, classes, metrics, the merge check."""
    config, check = record["config"], record["check"]
    classes = record["class_names"]
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    metrics = "\n".join(f"- {k}: {v}" for k, v in record["metrics"].items()) or "- (no metrics.json in the run)"
    if "agreement" in check:
        merged = (f"On {check['rows']} held-out rows the merged model picks the same class as the adapter on its "
                  f"{check['adapter_base']} base for {check['agreement']:.1%} of them (constrained scoring).")
    else:
        merged = f"Agreement with the adapter not measured: {check.get('not_measured', 'no held-out rows checked')}."
    qlora = ("\nThe adapter was trained on a **4-bit (NF4) base** (QLoRA) and merged into the bf16 base, which is "
             "not the base it was trained on.\n" if config["quantization"] == "4bit" else "")
    return f"""# {config['model_id']} fine-tuned on {config['dataset']} (LoRA merged)

Written by `python -m helpers.export` on {record['created']} from the run folder `{record['run']}`.
Loads with `AutoModelForMultimodalLM.from_pretrained` and `AutoProcessor.from_pretrained` alone (no PEFT).

- base: `{config['model_id']}`; merged in {record['dtype']}
- data: `{config['dataset']}`, {config['train_size']} training rows; LoRA r={config['lora_r']}, alpha={config['lora_alpha']}, targets {config['lora_targets']}
- prompt: the image, then {record['prompt']['question']!r}; system prompt {record['prompt']['system_prompt']!r}; thinking {'on' if record['prompt']['enable_thinking'] else 'off'} (`chat_prompt.json`)
- image budget: {record['image_soft_tokens']} soft tokens per image (saved in the processor's config)
- classes ({len(classes)}, `{CLASS_NAMES}`; the answer is the class name): {shown}
{qlora}
## Metrics of the run (held out, the adapter)
{metrics}

## The merge
{merged}
"""


def export_merged(saved: SavedRun, folder, check_size: int = DEFAULT_CHECK_SIZE, overwrite: bool = False) -> Path:
    """Merge the run's adapter and save a folder that plain transformers loads; returns the folder.

    ``folder`` as ``check_target`` allows (``overwrite``: a folder an export did not write)."""
    folder = check_target(folder, "merged", overwrite)
    model, processor, check = merge_run(saved, check_size)
    kept = clear_earlier_export(folder, "merged")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_prompt(folder, saved.prompt)
    write_class_names(folder, saved.class_names)
    record = {"kind": "merged", "run": str(saved.folder.resolve()), "created": time.strftime("%Y-%m-%d"),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "image_soft_tokens": processor.image_processor.max_soft_tokens, "prompt": saved.prompt,
              "class_names": saved.class_names, "check": check, "metrics": run_metrics(saved),
              "config": saved.config.to_dict(), "versions": package_versions()}
    (folder / MODEL_CARD).write_text(model_card(record))
    atomic_write_json(folder / EXPORT_RECORD, {**record, "written": written_files(folder, kept)})
    return folder
