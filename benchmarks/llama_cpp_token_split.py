"""Is llama.cpp's disagreement with transformers only its tokenization? Answered on the parity run's rows.

transformers' merged model answers the held-out rows greedily from the training prompt twice: tokenized by
transformers, and with llama.cpp's split of the tiny vocabulary's merged tokens (``model\\n`` -> ``model`` +
``\\n``, ``thought\\n`` -> ``thought`` + ``\\n``, as llama-server's ``/tokenize`` gives them). Both are compared
with the rows in the parity JSON (``python -m benchmarks.export_parity --json``): if the split alone moves
transformers' answers to llama.cpp's, the two engines differ by tokenization, not by the converted weights.

    python -m benchmarks.llama_cpp_token_split runs/parity/merged benchmarks/results/export_parity.json
"""

import argparse
import json
from pathlib import Path

import torch

from helpers.chat import render_generation_prompt, to_messages
from helpers.evaluation import match_class_name
from helpers.exports.merge import held_out_examples
from helpers.exports.parity import ADAPTER_ENGINE, LLAMA_CPP_ENGINE
from helpers.run.folder import read_merged

BATCH = 25


def agreement(first, second) -> float:
    return sum(a == b for a, b in zip(first, second)) / len(first)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llama_cpp_token_split",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("merged_dir", help="the merged model folder the parity run exported")
    parser.add_argument("parity_json", help="python -m benchmarks.export_parity --json's output")
    args = parser.parse_args(argv)
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    merged_dir, parity_json = args.merged_dir, args.parity_json
    parity = json.loads(Path(parity_json).read_text())["predictions"]
    if LLAMA_CPP_ENGINE not in parity:
        parser.error(f"{parity_json} has no {LLAMA_CPP_ENGINE!r} predictions: llama.cpp did not run in that parity run")
    saved = read_merged(merged_dir)
    examples = held_out_examples(saved, len(parity["labels"]))
    processor = AutoProcessor.from_pretrained(merged_dir)
    model = AutoModelForMultimodalLM.from_pretrained(merged_dir).eval()
    tokenizer = processor.tokenizer
    ids_of = tokenizer.convert_tokens_to_ids
    split = {ids_of(merged): [ids_of(word), ids_of("\n")] for merged, word in (("model\n", "model"),
                                                                               ("thought\n", "thought"))}
    print("split:", {tokenizer.convert_ids_to_tokens(k): tokenizer.convert_ids_to_tokens(v) for k, v in split.items()})
    text = render_generation_prompt(processor, to_messages(saved.prompt["question"], system=saved.prompt["system_prompt"]),
                                    enable_thinking=bool(saved.prompt["enable_thinking"]))
    answers = {"transformers tokens": [], "llama.cpp tokens": []}
    for start in range(0, len(examples), BATCH):
        images = [[e["image"]] for e in examples[start:start + BATCH]]
        batch = processor(text=[text] * len(images), images=images, return_tensors="pt")
        plain = batch.pop("input_ids")
        batch.pop("attention_mask")
        types = batch.pop("mm_token_type_ids", None)
        resplit = torch.tensor([[t for token in row for t in split.get(token, [token])] for row in plain.tolist()])
        for name, ids in (("transformers tokens", plain), ("llama.cpp tokens", resplit)):
            extra = {}
            if types is not None:  # the image positions come first; the split adds text positions only
                extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(len(images), ids.shape[1] - types.shape[1])], 1)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **batch, **extra,
                                     max_new_tokens=6, do_sample=False)
            answers[name] += [match_class_name(tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True),
                                               saved.class_names) for o in out]
    adapter, llama = parity[ADAPTER_ENGINE]["generation"], parity[LLAMA_CPP_ENGINE]["generation"]
    for name, said in answers.items():
        print(f"{name}: agreement with the adapter {agreement(said, adapter):.3f}, "
              f"with llama.cpp (training prompt) {agreement(said, llama):.3f} ({len(said)} rows)")


if __name__ == "__main__":
    main()
