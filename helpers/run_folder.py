"""The run folder: what is in it, the manifest that says what made it, and the lock that says who uses it.

Taught in the README ("Train on your own images") and used by ``helpers.runner``:
- the run folder's layout lives here, and only here: every file and folder name below, and
  ``resolve_output_dir`` (a relative ``output_dir`` is relative to the repository, wherever the notebook runs);
- ``manifest.json`` is written when a run starts: the validated config, a fingerprint of the data, the
  model and the package versions. A rerun with the same training settings and data resumes; a rerun
  with other ones is refused with the differences listed, so ``metrics.json`` always describes the
  adapter beside it (``--fresh`` clears the folder's run files, or choose another folder);
- ``run.lock`` names the process that uses the folder; a second runner stops at once. A lock whose
  process is gone (same machine) or whose heartbeat stopped (any machine, e.g. a shared bucket) is stale
  and does not block.

Deliberately light (no torch, no numpy): the runner calls it before anything loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

from helpers.io import atomic_write_json

MANIFEST = "manifest.json"
LOCK = "run.lock"
METRICS = "metrics.json"  # written by helpers.report.write_metrics, whatever the entry point
TRAIN_RESULT = "train_result.json"
CLASS_NAMES = "class_names.json"
SKIPPED = "skipped.json"  # rows skipped as unusable, by split (helpers.validation)
SHARD_METRICS = "shard_metrics.json"  # one evaluation task's per-example predictions (helpers.shards)
ADAPTER = "adapter"
ADAPTER_STAGING = ADAPTER + ".tmp"
PROMPT_FILE = "chat_prompt.json"  # inside the adapter folder: the prompt it was trained with (helpers.chat)
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoints/checkpoint-N, as transformers' Trainer names them
STAGING = ".staging"  # checkpoints/.staging: a checkpoint being written, before it is moved into place
# Written last into a checkpoint or adapter folder once every other file is in place (helpers.training).
COMPLETE_MARKER = "COMPLETE"
# Plots: notebook 04 saves the loss, notebook 05 the rest.
LOSS_PLOT = "loss.png"
ACCURACY_PLOT = "accuracy.png"
CONFUSION_PLOT = "confusion_matrix.png"
SAMPLES_PLOT = "samples.png"
REPOSITORY = Path(__file__).resolve().parent.parent  # the clone (helpers/ is installed editable from it)
# Written by helpers.export: the merged model's folder and the GGUF folder (default places: inside the run
# folder), and in each of them a record of what made it (base, run, image budget, llama.cpp flags) and a
# model card. Not in RUN_FILES: an export is rewritten by the next export, not by a run.
MERGED = "merged"
GGUF = "gguf"
EXPORT_RECORD = "export.json"
MODEL_CARD = "README.md"
GGUF_TEXT = "model.gguf"
GGUF_PROJECTOR = "mmproj.gguf"
# What "--fresh" removes: the run's own files. Executed notebooks and plots are rewritten by the run.
RUN_FILES = (MANIFEST, METRICS, TRAIN_RESULT, CLASS_NAMES, SKIPPED, SHARD_METRICS, ADAPTER, ADAPTER_STAGING,
             CHECKPOINTS)

# Parameters that do not change the adapter: a rerun may change them (evaluate more rows, save less often).
NOT_TRAINING_SETTINGS = ("output_dir", "eval_size", "shard_index", "shard_count", "save_steps",
                         "save_total_limit", "compile_layers", "fast_clamps", "dataloader_workers")
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "pillow", "numpy")
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS  # a holder that has not touched its lock for this long is gone


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message names the folder and what to do."""


def resolve_output_dir(path) -> Path:
    """``output_dir`` as an absolute path; a relative one is relative to the repository, not to the working
    directory (notebooks run in ``notebooks/``, papermill from wherever it is started)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPOSITORY / path


def check_output_dir(path) -> Path:
    """The run folder, created and proven writable, before anything loads; else ``RunFolderError``."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output_dir {str(path)!r} is a file, not a folder: choose a folder for the run")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check."):
            pass
    except OSError as err:
        raise RunFolderError(f"output_dir {str(path)!r} cannot be written ({type(err).__name__}: "
                             f"{err.strerror or err}): choose a writable folder") from None
    return path


def package_versions() -> dict:
    """Installed versions of the packages that shape a run (``None`` where one is not installed)."""
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(config: dict, data: dict, model: dict) -> dict:
    """What a run is made of: ``config`` (``RunConfig.to_dict()``), ``data`` (``helpers.data``'s
    fingerprint), ``model`` (id and, for a local folder, its path) and the package versions."""
    return {"config": config, "data": data, "model": model, "versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_manifest(run_dir) -> dict | None:
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _flatten(value, prefix: str) -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, so that a difference names the exact setting."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, inner in value.items():
        flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def manifest_differences(old: dict, new: dict) -> list[str]:
    """``"learning_rate: 0.002 in the folder, 0.003 now"`` for every training setting or data fact
    that differs (settings in ``NOT_TRAINING_SETTINGS`` and package versions are not compared)."""
    compared = []
    for manifest in (old, new):
        config = {k: v for k, v in manifest.get("config", {}).items() if k not in NOT_TRAINING_SETTINGS}
        compared.append({**_flatten(config, ""), **_flatten(manifest.get("data", {}), "data"),
                         **_flatten(manifest.get("model", {}), "model")})
    before, now = compared
    return [f"{key}: {before.get(key, '(absent)')!r} in the folder, {now.get(key, '(absent)')!r} now"
            for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]


def has_run_output(run_dir) -> bool:
    """True when the folder holds a checkpoint or an adapter (something a new run would build on)."""
    run_dir = Path(run_dir)
    return (run_dir / ADAPTER).exists() or any((run_dir / CHECKPOINTS).glob(CHECKPOINT_PREFIX + "*"))


def clear_run_files(run_dir) -> list[str]:
    """Remove the run's own files (``RUN_FILES``), nothing else; returns the names removed."""
    removed = []
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def start_run(run_dir, manifest: dict, trains: bool = True, fresh: bool = False) -> str:
    """Write the manifest or check the folder's own against it; returns what happened, in words.

    A run that ``trains`` in a folder holding another run's manifest, or checkpoints without any
    manifest, is refused (``RunFolderError`` listing what differs). One that only evaluates checks a
    manifest when there is one (the adapter must be the one its settings describe). ``fresh`` first
    clears the run's files."""
    run_dir = Path(run_dir)
    if fresh:
        removed = clear_run_files(run_dir)
        if trains:
            atomic_write_json(run_dir / MANIFEST, manifest)
        return f"started fresh (removed {', '.join(removed) or 'nothing'})"
    old = read_manifest(run_dir)
    how_to_restart = ("To start over in this folder, rerun with --fresh (it deletes this folder's checkpoints, "
                      "adapter and results); or give another --output-dir.")
    if old is None:
        if trains and has_run_output(run_dir):
            raise RunFolderError(f"{run_dir} holds checkpoints or an adapter but no {MANIFEST}, so nothing says "
                                 f"which settings made them. {how_to_restart}")
        if trains:
            atomic_write_json(run_dir / MANIFEST, manifest)
            return "new run: manifest written"
        return f"no {MANIFEST}: evaluating the adapter as it is"
    differences = manifest_differences(old, manifest)
    if differences:
        listed = "\n  ".join(differences)
        raise RunFolderError(f"{run_dir} holds a run made with other settings or data ({run_dir / MANIFEST}):\n"
                             f"  {listed}\n{how_to_restart}")
    return "same settings and data as the folder's manifest: resuming"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _lock_is_stale(lock: dict, age_seconds: float) -> bool:
    if age_seconds > STALE_AFTER_SECONDS:
        return True
    return lock.get("host") == socket.gethostname() and not _process_alive(int(lock.get("pid", -1)))


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # half-written by a holder killed at that instant: no pid to respect
        return {}


def acquire_lock(run_dir) -> Path:
    """Create ``run.lock`` naming this process, or raise ``RunFolderError`` naming the live holder."""
    path = Path(run_dir) / LOCK
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.argv)}
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:  # released meanwhile
                continue
            if holder and not _lock_is_stale(holder, age):
                raise RunFolderError(
                    f"{run_dir} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
                    f"{holder.get('started')}: {holder.get('command')}). Wait for it to finish, stop it, or give "
                    f"another --output-dir.") from None
            path.unlink(missing_ok=True)  # stale: its process is gone or its heartbeat stopped
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        return path
    raise RunFolderError(f"could not take the lock {path}: another process keeps taking it")


@contextlib.contextmanager
def holding_lock(run_dir):
    """Hold ``run.lock`` for the ``with`` block, touching it every ``HEARTBEAT_SECONDS`` so that a holder
    on another machine is known to be alive; released (removed) on the way out."""
    path = acquire_lock(run_dir)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=heartbeat, name="run-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        if _read_lock(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


def write_class_names(run_dir, class_names: list[str]) -> Path:
    """The class names training used (their order is the label index), for evaluation and prediction."""
    return atomic_write_json(Path(run_dir) / CLASS_NAMES, list(class_names))


def saved_class_names(run_dir, data_class_names: list[str]) -> list[str]:
    """The class names the adapter was trained on; ``RunFolderError`` when the data's differ.

    A folder without the file (made before it existed) falls back to the data's own names."""
    path = Path(run_dir) / CLASS_NAMES
    if not path.exists():
        return list(data_class_names)
    saved = json.loads(path.read_text())
    if saved != list(data_class_names):
        only_saved = [n for n in saved if n not in data_class_names]
        only_data = [n for n in data_class_names if n not in saved]
        raise RunFolderError(f"the evaluation data's classes differ from those the adapter was trained on "
                             f"({path}): only in training {only_saved}, only in this data {only_data}"
                             + ("" if only_saved or only_data else " (same names, another order)"))
    return saved
