"""Greedy answers of vLLM for image files, one JSON string per line. Runs inside vLLM's own venv (vLLM pins
its own torch and transformers), called by ``benchmarks/export_parity.py --vllm-python`` from the repository root,
so that ``helpers.chat`` (standard library only) imports without this package installed in that venv:

    VENV/bin/python -m benchmarks.vllm_generate MERGED_DIR '{"question": ..., "system_prompt": ..., "enable_thinking": ...}' IMG...

The messages are those training rendered (``helpers.chat.to_messages``): an optional system turn, then the
image and the question; the model's own chat template renders them, with the run's thinking setting.

vLLM 0.32's Gemma 4 code reads ``vision_config.default_output_length`` (released checkpoints' config.json
carry it, 280, and so does the tiny model's); a folder without it gets it from the processor's image budget
through ``hf_overrides``. The content format is "openai" (the template renders the image part, ``\n\n<|image|>\n\n``
as transformers does): vLLM detects "string" for Gemma 4's template and then writes its own placeholder,
``<image_soft_token>``, which a tokenizer without that token (the tiny model's) splits into plain text.
"""

import argparse
import json
import sys
from pathlib import Path

from helpers.chat import to_messages  # it needs only the standard library


def messages(image_path: str, prompt: dict) -> list[dict]:
    """``helpers.chat.to_messages`` (what training rendered), the image part as vLLM takes a PIL image."""
    from PIL import Image

    return to_messages(prompt["question"], system=prompt.get("system_prompt"),
                       image_part={"type": "image_pil", "image_pil": Image.open(image_path).convert("RGB")})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_generate", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a merged model folder (python -m helpers.export)")
    parser.add_argument("prompt", help='the run\'s prompt as JSON: {"question": ..., "system_prompt": ..., '
                                       '"enable_thinking": ...}')
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    from vllm import LLM, SamplingParams  # vLLM's venv only

    model_dir, prompt, images = args.model_dir, json.loads(args.prompt), args.images
    overrides = {}
    vision = json.loads((Path(model_dir) / "config.json").read_text()).get("vision_config", {})
    if "default_output_length" not in vision:
        processor = json.loads((Path(model_dir) / "processor_config.json").read_text())
        budget = processor.get("image_processor", processor)["max_soft_tokens"]
        overrides = {"vision_config": {"default_output_length": budget}}
        print(f"hf_overrides: {overrides}", file=sys.stderr)
    # the merged folder's own dtype: vLLM's "auto" downcasts float32 to bfloat16 on the CPU
    dtype = json.loads((Path(model_dir) / "config.json").read_text()).get("dtype") or "auto"
    # a fixed KV cache: by default vLLM on the CPU claims ~90% of the machine's memory and refuses to start
    # ("Available memory ... is less than requested memory for kv") beside the parity script's own models
    llm = LLM(model=model_dir, max_model_len=1024, limit_mm_per_prompt={"image": 1}, enforce_eager=True,
              hf_overrides=overrides or None, dtype=dtype, kv_cache_memory_bytes=2 << 30)
    outputs = llm.chat([messages(image, prompt) for image in images], SamplingParams(temperature=0, max_tokens=16),
                       chat_template_kwargs={"enable_thinking": bool(prompt.get("enable_thinking"))},
                       chat_template_content_format="openai")
    for output in outputs:
        print("ANSWER " + json.dumps(output.outputs[0].text))
    import torch
    import transformers
    import vllm

    print("VERSIONS " + json.dumps({"vllm": vllm.__version__, "torch": torch.__version__,
                                    "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
