"""Export a trained run: the adapter merged into its base (plain transformers), and GGUF for llama.cpp.

Taught in notebook 06.

    python -m helpers.export --run runs/offline --merged runs/offline/merged
    python -m helpers.export --run runs/offline --gguf runs/offline/gguf          # merges first
    python -m helpers.export --model runs/offline/merged --gguf runs/offline/gguf  # from a merged folder

The merged folder loads with ``AutoModelForMultimodalLM.from_pretrained`` alone (no PEFT). It holds the
model (bf16 when merged on a GPU, the base checkpoint's dtype on a CPU), the processor with its chat
template and the run's image budget, the run's prompt (``chat_prompt.json``) and class names, a model card,
and ``export.json`` (what made it, and how often it agrees with the adapter on held-out rows). A QLoRA
adapter was trained on a 4-bit base and is merged into the bf16 base: the agreement says what that changed.

The GGUF folder holds llama.cpp's own conversion (``helpers.llama_cpp``, unpatched): the text model and the
vision projector, and in ``export.json`` the image-token limits that match the training budget. Where the
vision tower's head size is not its width / heads (the tiny model; no released tower), the projector gets
``clip.vision.attention.head_dim`` written after conversion (``export.json``: ``written_after_conversion``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from helpers.chat import save_prompt
from helpers.io import atomic_write_json
from helpers.predict import PredictError, SavedRun, read_merged, read_run
from helpers.run_folder import (
    CLASS_NAMES,
    EXPORT_RECORD,
    GGUF_PROJECTOR,
    GGUF_TEXT,
    MERGED,
    METRICS,
    MODEL_CARD,
    package_versions,
    write_class_names,
)

DEFAULT_CHECK_SIZE = 100  # held-out rows on which the merged model is compared with the adapter


class ExportError(ValueError):
    """The export cannot be made as asked; the message names the folder or option."""


def check_target(folder) -> Path:
    """An export folder that may be (re)written: new, empty, or a previous export of the same kind."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file: give a folder to export into")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / EXPORT_RECORD).exists():
        raise ExportError(f"{folder} is not empty and holds no {EXPORT_RECORD}: refusing to write into it; "
                          "give a new folder")
    return folder


def merge_dtype(model_path: str) -> torch.dtype:
    """bf16 on a GPU; on a CPU the base checkpoint's own dtype (the tiny checkpoint is float32)."""
    if torch.cuda.is_available():
        return torch.bfloat16
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def held_out_examples(saved: SavedRun, size: int) -> list[dict]:
    """The run's own held-out rows (the first ``size`` of what evaluation used)."""
    from helpers.data import load_examples

    config = saved.config
    return load_examples(config.dataset, "test", size, config.seed, **config.data_options()).examples


def constrained_predictions(model, processor, saved: SavedRun, examples: list[dict]) -> list[str]:
    """The class constrained scoring picks for each example (the scoring path evaluation and predict use)."""
    from helpers.evaluation import constrained_scores

    scores = constrained_scores(model, processor, examples, saved.class_names, 16, False, **saved.prompt)
    return [saved.class_names[i] for i in scores.argmax(dim=-1).tolist()]


def merge_run(saved: SavedRun, check_size: int = DEFAULT_CHECK_SIZE):
    """(merged model, processor, check): the adapter merged into its base in ``merge_dtype``; ``check``
    compares the merged model with the adapter as trained (a QLoRA adapter on its 4-bit base) on
    ``check_size`` held-out rows, or says why it was not measured."""
    from peft import PeftModel

    from helpers.modeling import load_model, load_processor
    from helpers.parity import share_equal

    processor = load_processor(saved.model_path, saved.image_soft_tokens)
    dtype = merge_dtype(saved.model_path)
    qlora = saved.config.quantization == "4bit"
    examples = held_out_examples(saved, check_size) if check_size else []
    check = {"rows": len(examples), "adapter_base": "4-bit NF4" if qlora else str(dtype).removeprefix("torch.")}
    adapter_says = None
    if examples and qlora and not torch.cuda.is_available():
        check["not_measured"] = "the adapter's 4-bit base needs a CUDA GPU (bitsandbytes); this export ran on a CPU"
    elif examples and qlora:  # the adapter as trained: on the 4-bit base, loaded separately and freed
        trained = PeftModel.from_pretrained(load_model(saved.model_path, quantization="4bit",
                                                       quantize_towers=saved.config.quantize_towers), saved.adapter)
        adapter_says = constrained_predictions(trained.eval(), processor, saved, examples)
        del trained
        torch.cuda.empty_cache()
    # fast_clamps off: the saved modules are transformers' own, untouched.
    model = PeftModel.from_pretrained(load_model(saved.model_path, dtype=dtype, fast_clamps=False), saved.adapter)
    model.eval()
    if examples and not qlora:
        adapter_says = constrained_predictions(model, processor, saved, examples)
    model = model.merge_and_unload()
    if adapter_says is not None:
        merged_says = constrained_predictions(model, processor, saved, examples)
        check["agreement"] = share_equal(adapter_says, merged_says)
    return model, processor, check


def run_metrics(saved: SavedRun) -> dict:
    path = saved.folder / METRICS
    return json.loads(path.read_text()).get("summary", {}) if path.exists() else {}


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


def export_merged(saved: SavedRun, folder, check_size: int = DEFAULT_CHECK_SIZE) -> Path:
    """Merge the run's adapter and save a folder that plain transformers loads; returns the folder."""
    folder = check_target(folder)
    model, processor, check = merge_run(saved, check_size)
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_prompt(folder, saved.prompt)
    write_class_names(folder, saved.class_names)
    record = {"kind": "merged", "run": str(saved.folder.resolve()), "created": time.strftime("%Y-%m-%d"),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "image_soft_tokens": processor.image_processor.max_soft_tokens, "prompt": saved.prompt,
              "class_names": saved.class_names, "check": check, "metrics": run_metrics(saved),
              "config": saved.config.to_dict(), "versions": package_versions()}
    atomic_write_json(folder / EXPORT_RECORD, record)
    (folder / MODEL_CARD).write_text(model_card(record))
    return folder


def gguf_outtype(merged: Path) -> str:
    """The converter's output type: the merged weights' own (f32 for the tiny model, bf16 from a GPU)."""
    dtype = json.loads((merged / EXPORT_RECORD).read_text())["dtype"]
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def export_gguf(merged, folder, llama_cpp=None) -> Path:
    """Convert a merged folder with llama.cpp's own converter: the text model and the vision projector,
    plus the run's prompt, class names and the llama.cpp flags (image-token limits = training budget)."""
    from helpers import llama_cpp as lc

    merged, folder = Path(merged), check_target(folder)
    source = lc.find_llama_cpp(llama_cpp)
    record = json.loads((merged / EXPORT_RECORD).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    outtype = gguf_outtype(merged)
    lc.convert(merged, folder / GGUF_TEXT, source, outtype)
    lc.convert(merged, folder / GGUF_PROJECTOR, source, outtype, projector=True)
    written = {}
    head_dim = lc.vision_head_dim_to_write(json.loads((merged / "config.json").read_text()).get("vision_config", {}))
    if head_dim is not None:  # not for released towers: see lc.vision_head_dim_to_write
        lc.write_vision_head_dim(folder / GGUF_PROJECTOR, head_dim, source)
        written[lc.VISION_HEAD_DIM_KEY] = head_dim
    save_prompt(folder, record["prompt"])
    write_class_names(folder, record["class_names"])
    atomic_write_json(folder / EXPORT_RECORD, {
        **record, "kind": "gguf", "merged": str(merged.resolve()), "outtype": outtype,
        "files": {"text": GGUF_TEXT, "projector": GGUF_PROJECTOR},
        "llama_cpp": {"source": f"llama-cpp-python {lc.LLAMA_CPP_PYTHON_VERSION} sdist (vendor/llama.cpp)",
                      "args": lc.image_token_args(record["image_soft_tokens"]),
                      "written_after_conversion": written}})
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="the run folder (helpers.runner --output-dir) whose adapter is exported")
    parser.add_argument("--model", help="an existing merged folder (for --gguf without merging again)")
    parser.add_argument("--merged", help=f"write the merged model here (default with --run: RUN_DIR/{MERGED})")
    parser.add_argument("--gguf", help="also convert to GGUF for llama.cpp / Ollama into this folder")
    parser.add_argument("--llama-cpp", help="a llama.cpp checkout or the extracted llama-cpp-python sdist "
                                            "(default: the copy under artifacts/llama-cpp, fetched with pip)")
    parser.add_argument("--check-size", type=int, default=DEFAULT_CHECK_SIZE,
                        help="held-out rows on which the merged model is compared with the adapter (0: none)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from helpers.llama_cpp import LlamaCppError

    try:
        if bool(args.run) == bool(args.model):
            raise ExportError("give --run RUN_DIR (merge its adapter) or --model MERGED_DIR (convert it), not both")
        if args.model and not args.gguf:
            raise ExportError("--model MERGED_DIR only converts: add --gguf DIR")
        if args.run:
            saved = read_run(args.run)
            merged = check_target(args.merged or saved.folder / MERGED)
            if args.gguf:
                check_target(args.gguf)
            print("merged:", export_merged(saved, merged, args.check_size))
            print(json.dumps(json.loads((merged / EXPORT_RECORD).read_text())["check"]))
        else:
            merged = read_merged(args.model).folder
        if args.gguf:
            print("gguf:", export_gguf(merged, args.gguf, args.llama_cpp))
    except (ExportError, PredictError, LlamaCppError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
