"""llama.cpp for Gemma 4: its own converter (HF folder -> GGUF), its server, and the flags it needs.

Taught in notebook 06; used by ``python -m helpers.export --gguf`` and ``benchmarks/export_parity.py``.
``export_gguf`` converts a merged folder (``helpers.exports.merge``) into a GGUF folder.

The source is the llama.cpp that the ``llama-cpp-python`` sdist on PyPI vendors (it has Gemma 4
conversion, ``vendor/llama.cpp/convert_hf_to_gguf.py`` with ``gguf-py``, and the Gemma 4 vision code in
``tools/mtmd``). It is used unpatched. ``find_llama_cpp`` takes a folder you give (``--llama-cpp DIR``),
else the copy cached under the clone's git-ignored ``artifacts/llama-cpp/``, else fetches it there with

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d artifacts/llama-cpp

(77 MB) and extracts it. ``build`` builds ``llama-server`` in that copy (cmake and a C++ compiler needed).

llama.cpp sizes images its own way and enforces at least 70 image tokens by default; with the token limits
set to the training budget (``image_token_args``) it gives the model the image as training did.

``Server`` runs ``llama-server`` on the loopback address and asks it two ways. ``chat`` is the OpenAI chat
endpoint, as a client of a llama.cpp server asks (thinking set per request). llama.cpp joins a message's
parts into one string with the image marker glued to the text, and Gemma 4's template trims string content,
so the chat endpoint gives ``user\n<|image>...<image|>What is...`` where transformers renders
``user\n\n\n<|image>...<image|>\n\nWhat is...``. ``complete`` sends the prompt transformers renders (the one
training used, with the image marker in place of ``<|image|>``) to the raw completion endpoint: the same
tokens the model was trained on. ``llama-mtmd-cli`` cannot be told thinking is off (it renders every template
with ``enable_thinking=true``), so the parity benchmark uses the server.
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers.chat import to_messages
from helpers.exports.merge import ExportError, check_target, clear_earlier_export, written_files
from helpers.run.folder import (
    EXPORT_RECORD,
    GGUF_PROJECTOR,
    GGUF_TEXT,
    REPOSITORY,
    atomic_write_json,
    save_prompt,
    write_class_names,
)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE_DIR = REPOSITORY / "artifacts" / "llama-cpp"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
FETCH_COMMAND = (f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --no-deps --no-binary :all: "
                 f"-d {CACHE_DIR}")
CONVERTER = "convert_hf_to_gguf.py"
SERVER = "llama-server"
BUILD_COMMANDS = (["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"],
                  ["cmake", "--build", "build", "-j2", "--target", SERVER])
MEDIA_MARKER = "<__media__>"  # pinned for the server (LLAMA_MEDIA_MARKER); its default is random per process


class LlamaCppError(RuntimeError):
    """llama.cpp's source, converter or server is missing or failed; the message says what to run."""


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


VISION_HEAD_DIM_KEY = "clip.vision.attention.head_dim"  # llama.cpp's clip loader reads it when present
_ADD_KEY = """
import sys
import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
source, target, key, value = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
reader = gguf.GGUFReader(source, "r")
writer = gguf.GGUFWriter(target, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
                         endianess=reader.endianess)
copy_with_new_metadata(reader, writer, {key: MetadataDetails(gguf.GGUFValueType.UINT32, value)}, [])
"""


def vision_head_dim_to_write(vision_config: dict) -> int | None:
    """The vision head size to write into the projector, or None when llama.cpp's assumption holds.

    llama.cpp's clip graph takes the head size as ``hidden_size / num_attention_heads`` unless the projector
    carries ``clip.vision.attention.head_dim``, and Gemma 4's converter never writes it: right for the released
    towers (768 / 12 = 64, 1152 / 16 = 72), wrong for a tower whose ``head_dim * heads`` is not its width
    (the tiny model's: 1 head of 32 in a width of 64), which then aborts in ``ggml_reshape_4d`` at load."""
    heads, head_dim, hidden = (vision_config.get(k) for k in ("num_attention_heads", "head_dim", "hidden_size"))
    if heads and head_dim and hidden and heads * head_dim != hidden:
        return int(head_dim)
    return None


def write_vision_head_dim(projector_gguf, head_dim: int, llama_cpp: Path) -> None:
    """Add ``VISION_HEAD_DIM_KEY`` to a projector GGUF with llama.cpp's own gguf-py (its metadata copier)."""
    projector_gguf = Path(projector_gguf)
    staged = projector_gguf.with_suffix(".tmp.gguf")
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    result = subprocess.run([sys.executable, "-c", _ADD_KEY, str(projector_gguf), str(staged), VISION_HEAD_DIM_KEY,
                             str(head_dim)], check=False, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not staged.exists():
        raise LlamaCppError(f"writing {VISION_HEAD_DIM_KEY} into {projector_gguf} failed:\n{result.stderr[-2000:]}")
    staged.replace(projector_gguf)


def server_path(llama_cpp: Path) -> Path:
    return llama_cpp / "build" / "bin" / SERVER


def build(llama_cpp: Path) -> Path:
    """Build ``llama-server`` in the llama.cpp folder (at low priority), unless it is built; returns its path."""
    if server_path(llama_cpp).exists():
        return server_path(llama_cpp)
    for command in BUILD_COMMANDS:
        if subprocess.run(["nice", "-n", "19", *command], check=False, cwd=llama_cpp).returncode != 0:
            raise LlamaCppError(f"building {SERVER} failed at: {' '.join(command)} (in {llama_cpp})")
    return server_path(llama_cpp)


def image_token_args(image_soft_tokens: int) -> list[str]:
    """llama.cpp's image-token limits for the training budget (its default minimum is 70 tokens).

    transformers resizes an image to the largest size whose token count fits the budget (a square image:
    ``isqrt(budget)**2`` tokens, 64 of 70, 256 of 280); llama.cpp scales an image up to its minimum pixel count
    (``min_tokens * (patch * pooling)**2``) and down to its maximum. With the minimum at the budget, a square
    image gets 81 tokens of 70 (9 x 9, not 8 x 8); with the minimum at ``isqrt(budget)**2`` it gets what
    transformers gives it. Other aspect ratios can still differ by a row or column of tokens."""
    square = math.isqrt(image_soft_tokens) ** 2
    return ["--image-min-tokens", str(square), "--image-max-tokens", str(image_soft_tokens)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()


def server_args(text_gguf, projector_gguf, image_soft_tokens: int, enable_thinking: bool = False,
                threads: int = 1) -> list[str]:
    """``llama-server``'s flags for a GGUF export: the model's own template (``--jinja``), thinking as trained,
    one slot, and the image-token limits of the training budget."""
    return ["-m", str(text_gguf), "--mmproj", str(projector_gguf), "--jinja",
            "--reasoning", "on" if enable_thinking else "off", "-np", "1", "-c", "2048", "-t", str(threads),
            "--no-webui", *image_token_args(image_soft_tokens)]


class Server:
    """``llama-server`` on 127.0.0.1 (a free port) for one GGUF export; a context manager that stops it.

    The requests are greedy (temperature 0) and ask for no cached prompt, so each image is answered alone."""

    def __init__(self, binary, text_gguf, projector_gguf, image_soft_tokens: int, enable_thinking: bool = False,
                 threads: int = 1, start_timeout: float = 120):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(binary), *server_args(text_gguf, projector_gguf, image_soft_tokens, enable_thinking,
                                                  threads), "--host", "127.0.0.1", "--port", str(self.port)]
        self.enable_thinking = enable_thinking
        self.start_timeout = start_timeout
        # the server's output, kept until __exit__ (its tail goes into errors)
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = None

    def __enter__(self):
        env = {**os.environ, "LLAMA_MEDIA_MARKER": MEDIA_MARKER}
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                message = f"{SERVER} exited {self.process.returncode} ({' '.join(self.command)}):\n{self.log_tail()}"
                self.__exit__(None, None, None)
                raise LlamaCppError(message)
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        message = f"{SERVER} did not answer /health within {self.start_timeout:.0f} s:\n{self.log_tail()}"
        self.__exit__(None, None, None)
        raise LlamaCppError(message)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise LlamaCppError(f"{SERVER} {path}: HTTP {err.code}: {err.read().decode(errors='replace')[:2000]}") from None

    def messages(self, image, prompt: dict) -> list[dict]:
        """The chat request's messages as training rendered them (``helpers.chat.to_messages``), the image part
        as the OpenAI API sends it (a data URI)."""
        return to_messages(prompt["question"], system=prompt.get("system_prompt"),
                           image_part={"type": "image_url", "image_url": {"url": _data_uri(image)}})

    def chat(self, image, prompt: dict, max_tokens: int = 16) -> str:
        """The greedy answer of the chat endpoint (``/v1/chat/completions``) for one image file."""
        reply = self.post("/v1/chat/completions", {
            "messages": self.messages(image, prompt), "temperature": 0, "max_tokens": max_tokens,
            "cache_prompt": False, "chat_template_kwargs": {"enable_thinking": bool(prompt.get("enable_thinking"))}})
        return reply["choices"][0]["message"].get("content") or ""

    def chat_prompt(self, prompt: dict) -> str:
        """The text the chat endpoint renders for ``prompt`` (``/apply-template``; the image as the marker)."""
        messages = self.messages(Path(os.devnull), prompt)
        messages[-1]["content"] = MEDIA_MARKER + prompt["question"]  # what llama.cpp joins the parts into
        body = {"messages": messages, "chat_template_kwargs": {"enable_thinking": bool(prompt.get("enable_thinking"))}}
        return self.post("/apply-template", body)["prompt"]

    def complete(self, image, prompt_text: str, max_tokens: int = 16) -> str:
        """The greedy continuation of ``prompt_text`` (holding ``MEDIA_MARKER`` once, where the image goes) from
        the raw completion endpoint, which tokenizes the text as given (BOS added by the model's own rule)."""
        reply = self.post("/completion", {
            "prompt": {"prompt_string": prompt_text, "multimodal_data": [_data_uri(image).split(",", 1)[1]]},
            "n_predict": max_tokens, "temperature": 0, "cache_prompt": False})
        return reply.get("content", "")

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]


def gguf_outtype(merged: Path) -> str:
    """The converter's output type: the merged weights' own (f32 for the tiny model, bf16 from a GPU)."""
    dtype = json.loads((merged / EXPORT_RECORD).read_text())["dtype"]
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def export_gguf(merged, folder, llama_cpp=None, overwrite: bool = False) -> Path:
    """Convert a merged folder with llama.cpp's own converter: the text model and the vision projector,
    plus the run's prompt, class names and the llama.cpp flags (image-token limits = training budget).

    ``folder`` as ``helpers.exports.merge.check_target`` allows (``overwrite``: a folder an export did not write),
    and never the merged folder itself."""
    merged, folder = Path(merged), check_target(folder, "gguf", overwrite)
    if folder.resolve() == merged.resolve():
        raise ExportError(f"{folder} is the merged folder being converted: give the GGUF export a folder of its own")
    source = find_llama_cpp(llama_cpp)
    record = json.loads((merged / EXPORT_RECORD).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    kept = clear_earlier_export(folder, "gguf")
    outtype = gguf_outtype(merged)
    convert(merged, folder / GGUF_TEXT, source, outtype)
    convert(merged, folder / GGUF_PROJECTOR, source, outtype, projector=True)
    written = {}
    head_dim = vision_head_dim_to_write(json.loads((merged / "config.json").read_text()).get("vision_config", {}))
    if head_dim is not None:  # not for released towers: see vision_head_dim_to_write
        write_vision_head_dim(folder / GGUF_PROJECTOR, head_dim, source)
        written[VISION_HEAD_DIM_KEY] = head_dim
    save_prompt(folder, record["prompt"])
    write_class_names(folder, record["class_names"])
    atomic_write_json(folder / EXPORT_RECORD, {
        **record, "kind": "gguf", "merged": str(merged.resolve()), "outtype": outtype,
        "files": {"text": GGUF_TEXT, "projector": GGUF_PROJECTOR},
        "llama_cpp": {"source": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (vendor/llama.cpp)",
                      "args": image_token_args(record["image_soft_tokens"]),
                      "written_after_conversion": written},
        "written": written_files(folder, kept)})
    return folder
