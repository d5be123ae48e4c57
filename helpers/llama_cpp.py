"""llama.cpp for Gemma 4: its own converter (HF folder -> GGUF), its multimodal CLI, and the flags they need.

Taught in notebook 06; used by ``helpers.export --gguf`` and ``benchmarks/export_parity.py``.

The source is the llama.cpp that the ``llama-cpp-python`` sdist on PyPI vendors (it has Gemma 4
conversion, ``vendor/llama.cpp/convert_hf_to_gguf.py`` with ``gguf-py``, and the Gemma 4 vision code in
``tools/mtmd``). It is used unpatched. ``find_llama_cpp`` takes a folder you give (``--llama-cpp DIR``),
else the copy cached under the clone's git-ignored ``artifacts/llama-cpp/``, else fetches it there with

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d artifacts/llama-cpp

(77 MB) and extracts it. ``build_mtmd_cli`` builds ``llama-mtmd-cli`` in that copy (about 4 minutes on 2
cores; cmake and a C++ compiler needed).

llama.cpp sizes images its own way and enforces at least 70 image tokens by default; with the token limits
set to the training budget (``image_token_args``) it gives the model the image as training did.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE_DIR = Path(__file__).resolve().parent.parent / "artifacts" / "llama-cpp"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
FETCH_COMMAND = (f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --no-deps --no-binary :all: "
                 f"-d {CACHE_DIR}")
CONVERTER = "convert_hf_to_gguf.py"
CLI = "llama-mtmd-cli"
BUILD_COMMANDS = (["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"],
                  ["cmake", "--build", "build", "-j2", "--target", CLI])


class LlamaCppError(RuntimeError):
    """llama.cpp's source, converter or CLI is missing or failed; the message says what to run."""


def _as_llama_cpp_folder(path: Path) -> Path | None:
    """The llama.cpp folder at ``path``: a llama.cpp checkout, or the sdist (its ``vendor/llama.cpp``)."""
    for candidate in (path, path / "vendor" / "llama.cpp", path / SDIST / "vendor" / "llama.cpp"):
        if (candidate / CONVERTER).is_file() and (candidate / "gguf-py").is_dir():
            return candidate
    return None


def fetch_llama_cpp(cache_dir: Path = CACHE_DIR) -> Path:
    """Download the pinned sdist from PyPI with pip into ``cache_dir`` and extract it; its llama.cpp folder."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"{SDIST}.tar.gz"
    if not archive.exists():
        print(f"fetching llama.cpp's source (77 MB): {FETCH_COMMAND}")
        command = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                   "--no-deps", "--no-binary", ":all:", "-d", str(cache_dir)]
        if subprocess.run(command, check=False).returncode != 0 or not archive.exists():
            raise LlamaCppError(f"could not download the llama-cpp-python sdist; run by hand: {FETCH_COMMAND}")
    with tarfile.open(archive) as tar:
        tar.extractall(cache_dir, filter="data")
    found = _as_llama_cpp_folder(cache_dir)
    if found is None:
        raise LlamaCppError(f"{archive} holds no vendor/llama.cpp/{CONVERTER}")
    return found


def find_llama_cpp(folder=None, fetch: bool = True) -> Path:
    """The llama.cpp folder: ``folder`` when given (a checkout or the extracted sdist), else the cached copy,
    else (``fetch``) downloaded. ``LlamaCppError`` naming the folder or the command otherwise."""
    if folder is not None:
        found = _as_llama_cpp_folder(Path(folder).expanduser())
        if found is None:
            raise LlamaCppError(f"--llama-cpp {str(folder)!r} holds no {CONVERTER} with gguf-py (give a llama.cpp "
                                f"checkout or the extracted {SDIST} sdist)")
        return found
    found = _as_llama_cpp_folder(CACHE_DIR)
    if found is not None:
        return found
    if not fetch:
        raise LlamaCppError(f"no llama.cpp source under {CACHE_DIR}: run {FETCH_COMMAND} and extract it, "
                            "or give --llama-cpp DIR")
    return fetch_llama_cpp()


def convert(model_dir, outfile, llama_cpp: Path, outtype: str, projector: bool = False) -> Path:
    """Run llama.cpp's own converter on a Hugging Face folder: the text model, or (``projector``) the vision
    projector (``--mmproj``). Its output is shown; a failure raises with the command."""
    command = [sys.executable, str(llama_cpp / CONVERTER), str(model_dir), "--outfile", str(outfile),
               "--outtype", outtype] + (["--mmproj"] if projector else [])
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not Path(outfile).exists():
        raise LlamaCppError(f"llama.cpp's converter failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return Path(outfile)


def cli_path(llama_cpp: Path) -> Path:
    return llama_cpp / "build" / "bin" / CLI


def build_mtmd_cli(llama_cpp: Path) -> Path:
    """Build ``llama-mtmd-cli`` in the llama.cpp folder (at low priority), or return the one already built."""
    binary = cli_path(llama_cpp)
    if binary.exists():
        return binary
    for command in BUILD_COMMANDS:
        if subprocess.run(["nice", "-n", "19", *command], check=False, cwd=llama_cpp).returncode != 0:
            raise LlamaCppError(f"building {CLI} failed at: {' '.join(command)} (in {llama_cpp})")
    return binary


def image_token_args(image_soft_tokens: int) -> list[str]:
    """llama.cpp's image-token limits set to the training budget (its default minimum is 70 tokens)."""
    return ["--image-min-tokens", str(image_soft_tokens), "--image-max-tokens", str(image_soft_tokens)]


def prompt_args(prompt: dict) -> list[str]:
    """The run's prompt as llama-mtmd-cli takes it: the question (the CLI puts the image before it, as training
    did) and the system turn. There is no thinking switch: llama-mtmd-cli 0.3.36 renders every template with
    ``enable_thinking=true`` (``--reasoning`` and ``--chat-template-kwargs`` belong to llama-server and
    llama-cli), so a model trained with thinking off sees a thinking prompt there."""
    return ["-p", prompt["question"]] + (["-sys", prompt["system_prompt"]] if prompt.get("system_prompt") else [])


def generate(binary: Path, text_gguf, projector_gguf, image, prompt: dict, image_soft_tokens: int,
             max_new_tokens: int = 16) -> str:
    """The greedy answer of the GGUF model for one image file (``--jinja``: the model's own chat template)."""
    command = [str(binary), "-m", str(text_gguf), "--mmproj", str(projector_gguf), "--image", str(image),
               "--temp", "0", "-n", str(max_new_tokens), "--jinja", "--no-warmup", "-t", "1",
               *prompt_args(prompt), *image_token_args(image_soft_tokens)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise LlamaCppError(f"{CLI} failed on {image} ({' '.join(command)}):\n{result.stderr[-2000:]}")
    return result.stdout.strip()
