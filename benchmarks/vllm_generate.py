"""Greedy answers of vLLM for image files, one JSON string per line. Runs inside vLLM's own venv (vLLM pins
its own torch and transformers), called by ``benchmarks/export_parity.py --vllm-python``:

    VENV/bin/python benchmarks/vllm_generate.py MERGED_DIR '{"question": ..., "system_prompt": ..., "enable_thinking": ...}' IMG...

The messages are those training rendered (``helpers.chat.to_messages``): an optional system turn, then the
image and the question; the model's own chat template renders them, with the run's thinking setting.
"""

import json
import sys

from PIL import Image
from vllm import LLM, SamplingParams


def messages(image_path: str, prompt: dict) -> list[dict]:
    turns = [{"role": "system", "content": prompt["system_prompt"]}] if prompt.get("system_prompt") else []
    content = [{"type": "image_pil", "image_pil": Image.open(image_path).convert("RGB")},
               {"type": "text", "text": prompt["question"]}]
    return turns + [{"role": "user", "content": content}]


def main() -> None:
    model_dir, prompt_json, *images = sys.argv[1:]
    prompt = json.loads(prompt_json)
    llm = LLM(model=model_dir, max_model_len=1024, limit_mm_per_prompt={"image": 1}, enforce_eager=True)
    outputs = llm.chat([messages(image, prompt) for image in images], SamplingParams(temperature=0, max_tokens=16),
                       chat_template_kwargs={"enable_thinking": bool(prompt.get("enable_thinking"))})
    for output in outputs:
        print("ANSWER " + json.dumps(output.outputs[0].text))


if __name__ == "__main__":
    main()
