"""The run folder: its layout, the manifest that says what made it, and the lock that says who uses it.

Every file and folder name of a run folder lives here, and only here; notebooks and commands call the
functions below, never a name. A run folder holds:

    manifest.json   the validated parameters, a fingerprint of the data, the model, the package versions
    run.lock        the process using the folder (a second runner stops at once; a dead holder's lock is stale)
    checkpoint-N/   transformers' checkpoints; COMPLETE is written last, and only marked ones are resumed
    adapter/        the trained LoRA adapter and the prompt it was trained with; COMPLETE last
    class_names.json, skipped.json, train_result.json, metrics.json, shard_metrics.json, *.png, the notebooks

A rerun with the same training settings and data resumes; one with other settings is refused with the
differences listed, so ``metrics.json`` always describes the adapter beside it (``--fresh`` clears the run's
files, nothing else). Light (no torch, no transformers): the runner calls it before anything loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from helpers.chat import PROMPT_FIELDS
from helpers.data import describe_source
from helpers.run.config import RunConfig, resolve_model_id

MANIFEST = "manifest.json"
LOCK = "run.lock"
METRICS = "metrics.json"  # written by helpers.run.report.write_metrics, whatever the entry point
TRAIN_RESULT = "train_result.json"
CLASS_NAMES = "class_names.json"
SKIPPED = "skipped.json"  # rows skipped as unusable, by split (helpers.validation)
SHARD_METRICS = "shard_metrics.json"  # one evaluation task's per-example predictions (helpers.run.shards)
ADAPTER = "adapter"
ADAPTER_STAGING = ADAPTER + ".tmp"
PROMPT_FILE = "chat_prompt.json"  # beside an adapter or a merged model: the prompt it was trained with
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-N, as transformers' Trainer names them
COMPLETE_MARKER = "COMPLETE"  # written last into a checkpoint or adapter folder: the names and signatures of its files
SIGNED_BYTES = 1 << 20  # file_signature hashes this much of each end of a file
PLOTS = {"loss": "loss.png", "accuracy": "accuracy.png", "confusion": "confusion_matrix.png",
         "samples": "samples.png"}
REPOSITORY = Path(__file__).resolve().parents[2]  # the clone (helpers/ is installed editable from it)
# Written by helpers.export: the merged model's folder and the GGUF folder (by default inside the run folder),
# each with a record of what made it and a model card. Not run files: the next export rewrites them.
MERGED = "merged"
GGUF = "gguf"
EXPORT_RECORD = "export.json"
MODEL_CARD = "README.md"
GGUF_TEXT = "model.gguf"
GGUF_PROJECTOR = "mmproj.gguf"
# What "--fresh" removes: the run's own files (and every checkpoint-N). Executed notebooks and plots are rewritten.
RUN_FILES = (MANIFEST, METRICS, TRAIN_RESULT, CLASS_NAMES, SKIPPED, SHARD_METRICS, ADAPTER, ADAPTER_STAGING)

# Parameters that do not change the adapter: a rerun may change them (evaluate more rows, save less often).
NOT_TRAINING_SETTINGS = ("output_dir", "eval_size", "shard_index", "shard_count", "save_steps",
                         "save_total_limit", "compile_layers", "fast_clamps", "plan_micro_batch",
                         "dataloader_workers")
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "pillow", "numpy")
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS  # a holder that has not touched its lock for this long is gone
GUARD_STALE_SECONDS = 5  # run.lock.guard is held for milliseconds; one this old was left by a killed process


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message names the folder and what to do."""


def atomic_write_json(path, payload) -> Path:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``: whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def resolve_output_dir(path) -> Path:
    """``output_dir`` as an absolute path; a relative one is relative to the repository, not to the working
    directory (notebooks run in ``notebooks/``, papermill from wherever it is started)."""
    path = Path(path).expanduser()
    return (path if path.is_absolute() else REPOSITORY / path).resolve()


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


# -- complete folders: checkpoints and the adapter ---------------------------------------------------------

def is_complete(folder) -> bool:
    """The folder carries the completion marker (``folder_problems`` checks that it is still whole)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def file_signature(path: Path) -> str:
    """A cheap fingerprint of a file: its size and a hash of its first and last MiB. It tells a file that is
    missing, truncated or rewritten from the one the marker vouched for, without reading gigabytes of
    optimizer state back (from a bucket, too); a flipped bit mid-file is not what it is for."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SIGNED_BYTES))
        if size > SIGNED_BYTES:
            handle.seek(max(SIGNED_BYTES, size - SIGNED_BYTES))
            digest.update(handle.read())
    return f"{size}:{digest.hexdigest()[:16]}"


def mark_complete(folder) -> None:
    """Write the completion marker last: the name and signature of every file the folder holds."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): file_signature(path)
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER}
    (folder / COMPLETE_MARKER).write_text(json.dumps({"files": files}, indent=1) + "\n")


def unmark(folder) -> None:
    """Remove the completion marker before the folder is written again (a kill mid-write leaves it unmarked)."""
    (Path(folder) / COMPLETE_MARKER).unlink(missing_ok=True)


def folder_problems(folder) -> list[str]:
    """What is wrong with a marked folder (empty when it is whole): each file its marker lists must be there
    with the same signature. A marker without a file list (written by an older version of this package) is
    trusted when a checkpoint's trainer_state.json, or an adapter's adapter_config.json, is there."""
    folder = Path(folder)
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    except FileNotFoundError:
        return [f"no {COMPLETE_MARKER} marker"]
    except (ValueError, TypeError, KeyError):
        needed = [name for name in ("trainer_state.json", "adapter_config.json") if (folder / name).exists()]
        return [] if needed else [f"{COMPLETE_MARKER} lists no files and the folder holds no training state"]
    problems = []
    for name, signature in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_signature(path) != signature:
            problems.append(f"{name} differs from the file the marker vouched for (truncated or rewritten)")
    return problems


def checkpoint_step(checkpoint) -> int:
    return int(Path(checkpoint).name.removeprefix(CHECKPOINT_PREFIX))


def checkpoint_folders(run_dir) -> list[Path]:
    """``checkpoint-N`` folders (complete or not), oldest step first."""
    found = [p for p in Path(run_dir).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(run_dir, report=print) -> str | None:
    """The newest ``checkpoint-N`` of ``run_dir`` that is marked complete and still whole, or None.

    A folder that a kill left unmarked (half written, or written but not yet marked) is never resumed from. A
    marked one whose files no longer match its marker (``folder_problems``) is passed over with a line to
    ``report`` saying why, for the one before it; when every marked checkpoint is damaged, ``RunFolderError``:
    resuming from none of them would silently restart the run."""
    damaged = []
    for checkpoint in reversed([p for p in checkpoint_folders(run_dir) if is_complete(p)]):
        problems = folder_problems(checkpoint)
        if not problems:
            if damaged:
                report(f"resuming from {checkpoint.name} instead")
            return str(checkpoint)
        damaged.append(checkpoint.name)
        report(f"{checkpoint} is damaged ({'; '.join(problems)}): not resumed from")
    if damaged:
        raise RunFolderError(f"every complete checkpoint of {run_dir} is damaged ({', '.join(damaged)}): restore "
                             "the files, or start over with --fresh (it deletes the checkpoints)")
    return None


def _copy_files(source: Path, target: Path) -> None:
    """Every file under ``source`` to the same place under ``target``: contents only, because a bucket mount
    may refuse the permission and time changes that ``shutil.copytree`` also makes."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


def publish_folder(staging, target) -> Path:
    """Put the fully written ``staging`` folder at ``target``, then write the completion marker last.

    A directory rename where the file system allows one; where it refuses (gcsfuse on a flat bucket without
    ``rename-dir-limit``), a copy of every file, then the staging folder is removed. Either way a kill
    before the marker leaves a folder that nothing trusts."""
    staging, target = Path(staging), Path(target)
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)  # a refused or half-done rename may leave part of one
        _copy_files(staging, target)
        shutil.rmtree(staging, ignore_errors=True)
    mark_complete(target)
    return target


def adapter_staging(run_dir) -> Path:
    """An empty folder to save the adapter into; ``publish_adapter`` then puts it in place, whole."""
    staging = Path(run_dir) / ADAPTER_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_adapter(run_dir, staging, prompt: dict) -> Path:
    """The adapter saved in ``staging`` (``adapter_staging``), with the prompt it was trained with, moved to
    the run folder's adapter place and marked complete; returns that folder."""
    save_prompt(staging, prompt)
    return publish_folder(staging, Path(run_dir) / ADAPTER)


def adapter_folder(run_dir) -> Path:
    """The run's trained adapter, whole; ``RunFolderError`` when there is none, only part of one, or its files
    no longer match its completion marker (``folder_problems``)."""
    adapter = Path(run_dir) / ADAPTER
    if not (adapter / "adapter_config.json").exists():
        raise RunFolderError(f"{run_dir} has no trained adapter ({adapter}): train first (notebook 04, or "
                             "python -m helpers.runner with this output_dir)")
    problems = folder_problems(adapter)
    if problems:
        raise RunFolderError(f"the adapter in {adapter} is not whole ({'; '.join(problems)}): rerun the training "
                             "command (or notebook 04) with this output_dir; it publishes the adapter again from "
                             "the last checkpoint without training more")
    return adapter


# -- the prompt an adapter was trained with -------------------------------------------------------------------

def save_prompt(folder, settings: dict) -> Path:
    path = Path(folder) / PROMPT_FILE
    path.write_text(json.dumps({name: settings[name] for name in PROMPT_FIELDS}, indent=1) + "\n")
    return path


def load_prompt(folder) -> dict | None:
    """The prompt saved beside an adapter or merged model, or None where none was saved."""
    return read_json(Path(folder) / PROMPT_FILE)


def prompt_for_adapter(folder, asked: dict) -> tuple[dict, list[str]]:
    """The prompt to evaluate an adapter with: the one it was trained with when saved, else ``asked``; and
    the fields where ``asked`` differs (evaluation uses the trained prompt)."""
    saved = load_prompt(folder)
    if saved is None:
        return asked, []
    return saved, [name for name in PROMPT_FIELDS if saved.get(name) != asked[name]]


# -- what the notebooks record -------------------------------------------------------------------------------

def write_class_names(run_dir, class_names: list[str]) -> Path:
    """The class names training used (their order is the label index), for evaluation and prediction."""
    return atomic_write_json(Path(run_dir) / CLASS_NAMES, list(class_names))


def saved_class_names(run_dir, data_class_names: list[str]) -> list[str]:
    """The class names the adapter was trained on; ``RunFolderError`` when the data's differ.

    A folder without the file falls back to the data's own names."""
    saved = read_json(Path(run_dir) / CLASS_NAMES)
    if saved is None:
        return list(data_class_names)
    if saved != list(data_class_names):
        only_saved = [n for n in saved if n not in data_class_names]
        only_data = [n for n in data_class_names if n not in saved]
        raise RunFolderError(f"the evaluation data's classes differ from those the adapter was trained on "
                             f"({Path(run_dir) / CLASS_NAMES}): only in training {only_saved}, only in this data "
                             f"{only_data}" + ("" if only_saved or only_data else " (same names, another order)"))
    return saved


def write_skipped(run_dir, counts: dict) -> Path:
    """The rows skipped as unusable, by split (``helpers.validation.skipped_summary``)."""
    return atomic_write_json(Path(run_dir) / SKIPPED, counts)


def read_skipped(run_dir) -> dict:
    return read_json(Path(run_dir) / SKIPPED, {})


def write_train_result(run_dir, summary: dict) -> Path:
    """What training did (``helpers.training.TrainResult`` with the config and model): read by evaluation."""
    return atomic_write_json(Path(run_dir) / TRAIN_RESULT, summary)


def read_train_result(run_dir) -> dict:
    return read_json(Path(run_dir) / TRAIN_RESULT, {})


def metrics_file(run_dir) -> Path:
    return Path(run_dir) / METRICS


def shard_metrics_file(run_dir) -> Path:
    return Path(run_dir) / SHARD_METRICS


def plot_file(run_dir, kind: str) -> Path:
    """Where a run keeps its plot of ``kind``: ``loss``, ``accuracy``, ``confusion`` or ``samples``."""
    return Path(run_dir) / PLOTS[kind]


# -- the manifest --------------------------------------------------------------------------------------------

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
    return read_json(Path(run_dir) / MANIFEST)


def write_manifest(run_dir, manifest: dict) -> Path:
    return atomic_write_json(Path(run_dir) / MANIFEST, manifest)


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
    defaults = RunConfig().to_dict()
    # A fact the folder's manifest does not hold was not recorded by the version of this package that wrote it:
    # a data fact, or a setting at its default (which is what that version trained with), is no difference.
    unrecorded = {key for key in set(now) - set(before)
                  if key.startswith("data.") or (key in defaults and now[key] == defaults[key])}
    return [f"{key}: {before.get(key, '(absent)')!r} in the folder, {now.get(key, '(absent)')!r} now"
            for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key) and key not in unrecorded]


def has_run_output(run_dir) -> bool:
    """True when the folder holds a checkpoint or an adapter (something a new run would build on)."""
    return (Path(run_dir) / ADAPTER).exists() or bool(checkpoint_folders(run_dir))


def is_trained(run_dir) -> bool:
    """True when training finished here: the adapter is whole and the training record written after it."""
    adapter = Path(run_dir) / ADAPTER
    return is_complete(adapter) and not folder_problems(adapter) and (Path(run_dir) / TRAIN_RESULT).exists()


def has_run_files(run_dir) -> bool:
    """True when ``clear_run_files`` would remove anything."""
    return bool(checkpoint_folders(run_dir)) or any((Path(run_dir) / name).exists() for name in RUN_FILES)


def clear_run_files(run_dir) -> list[str]:
    """Remove the run's own files (``RUN_FILES`` and every checkpoint), nothing else; returns what was removed."""
    removed = []
    for path in [*(Path(run_dir) / name for name in RUN_FILES), *checkpoint_folders(run_dir)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return removed


def run_manifest(config: RunConfig, source) -> dict:
    """What a run is made of (``build_manifest``): its parameters, its data (``helpers.data.DataSource``) and model."""
    return build_manifest(config.to_dict(), source.fingerprint(), {"model_id": config.model_id})


def open_run(config: RunConfig, trains: bool = True) -> tuple[str, str]:
    """(the run folder, what happened, in words) for a notebook: the folder made absolute (``resolve_output_dir``),
    its manifest written or checked against ``config`` and the data (``start_run``), as the runner does before
    it starts; a folder holding another run is refused (``RunFolderError``) with the differences listed."""
    run_dir = resolve_output_dir(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(run_dir), start_run(run_dir, run_manifest(config, describe_source(config.dataset,
                                                                                 **config.data_options())), trains)


def record_training(run_dir, result, config: RunConfig, model_path: str) -> str:
    """Write the training record (``result``: a ``helpers.training.TrainResult``) for evaluation and metrics.json;
    returns what was done, in words. A finished run reopened trains no step: the record of the run that trained
    it is kept, with its wall time and peak memory."""
    resumed = checkpoint_step(result.resumed_from) if result.resumed_from else 0
    if result.global_step == resumed and read_train_result(run_dir):
        return f"trained no step (the run had finished at step {resumed}): its training record is kept"
    write_train_result(run_dir, {"config": config.to_dict(), "model_path": model_path, "train": result.to_dict()})
    return f"{result.global_step} optimizer steps; the training record is written"


def start_run(run_dir, manifest: dict, trains: bool = True, fresh: bool = False) -> str:
    """Write the manifest or check the folder's own against it; returns what happened, in words.

    A run that ``trains`` in a folder holding another run's manifest, or checkpoints without any
    manifest, is refused (``RunFolderError`` listing what differs); one that resumes names the checkpoint it
    resumes from, and is refused when every complete checkpoint is damaged (``last_complete_checkpoint``). One
    that only evaluates checks a manifest when there is one (the adapter must be the one its settings
    describe). ``fresh`` first clears the run's files, and only for a run that trains: clearing for one that
    does not would delete the adapter it is about to use."""
    run_dir = Path(run_dir)
    if fresh:
        if not trains and has_run_files(run_dir):
            raise RunFolderError(f"--fresh would delete the adapter, checkpoints and results in {run_dir}, and "
                                 "no notebook asked for trains a new adapter: drop --fresh to use the "
                                 "one there, or run the training notebook too to replace it")
        removed = clear_run_files(run_dir)
        if trains:
            write_manifest(run_dir, manifest)
        return f"started fresh (removed {', '.join(removed) or 'nothing'})"
    old = read_manifest(run_dir)
    how_to_restart = ("To start over in this folder, rerun with --fresh (it deletes this folder's checkpoints, "
                      "adapter and results); or give another --output-dir.")
    if old is None:
        if trains and has_run_output(run_dir):
            raise RunFolderError(f"{run_dir} holds checkpoints or an adapter but no {MANIFEST}, so nothing says "
                                 f"which settings made them. {how_to_restart}")
        if trains:
            write_manifest(run_dir, manifest)
            return "new run: manifest written"
        return f"no {MANIFEST}: evaluating the adapter as it is"
    differences = manifest_differences(old, manifest)
    if differences:
        listed = "\n  ".join(differences)
        raise RunFolderError(f"{run_dir} holds a run made with other settings or data ({run_dir / MANIFEST}):\n"
                             f"  {listed}\n{how_to_restart}")
    if trains and not is_trained(run_dir):
        resume_from = last_complete_checkpoint(run_dir)
        return ("same settings and data as the folder's manifest: resuming from "
                + (Path(resume_from).name if resume_from else "the start (no complete checkpoint yet)"))
    return "same settings and data as the folder's manifest"


# -- the lock ------------------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def _lock_guard(run_dir: Path):
    """One process at a time looks at ``run.lock`` and takes it over when stale: without this, two processes
    that both find the same stale lock both remove it, and the second removes the first one's new lock.

    ``flock`` on the run folder itself where the file system has it (released by the kernel when its holder
    dies); where it has none (a bucket mounted with gcsfuse), a ``run.lock.guard`` file created exclusively,
    held for the milliseconds of a look and removed after, and taken over when older than ``GUARD_STALE_SECONDS``
    (its holder died inside those milliseconds)."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        with _guard_file(run_dir / (LOCK + ".guard")):
            yield
        return
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _guard_file(path: Path):
    deadline = time.monotonic() + 10 * GUARD_STALE_SECONDS
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > GUARD_STALE_SECONDS:
                    path.unlink(missing_ok=True)
            if time.monotonic() > deadline:
                raise RunFolderError(f"could not take {path}: remove it if no run is starting in this folder") from None
            time.sleep(0.005)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def acquire_lock(run_dir) -> Path:
    """Create ``run.lock`` naming this process, or raise ``RunFolderError`` naming the live holder. A stale lock
    (its process gone, or its heartbeat stopped) is replaced; exactly one of several processes racing for it
    wins (``_lock_guard``)."""
    path = Path(run_dir) / LOCK
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.argv), "id": uuid.uuid4().hex}
    with _lock_guard(Path(run_dir)):
        holder = _read_lock(path) if path.exists() else None
        if holder is not None:
            with contextlib.suppress(FileNotFoundError):
                if holder and not _lock_is_stale(holder, time.time() - path.stat().st_mtime):
                    raise RunFolderError(
                        f"{run_dir} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
                        f"{holder.get('started')}: {holder.get('command')}). Wait for it to finish, stop it, or "
                        "give another --output-dir.")
            path.unlink(missing_ok=True)  # stale: its process is gone or its heartbeat stopped
        with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as handle:
            json.dump(record, handle)
    return path


def release_lock(path: Path) -> None:
    """Remove ``run.lock`` if this process still holds it (a lock taken over as stale is another's now)."""
    with _lock_guard(path.parent):
        if _read_lock(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


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
        release_lock(path)


# -- a trained run, as prediction and export read it -----------------------------------------------------------

@dataclass
class SavedRun:
    """How a trained model is to be asked: what its run folder (or merged folder) recorded.

    ``model_path`` is the base model (with ``adapter``) or a merged folder (``adapter`` None)."""

    folder: Path
    config: RunConfig
    class_names: list[str]
    prompt: dict  # question, system_prompt, enable_thinking (helpers.chat.PROMPT_FIELDS)
    model_path: str
    adapter: Path | None = None

    @property
    def image_soft_tokens(self) -> int | None:
        return self.config.image_soft_tokens


def _class_names(folder: Path, fallback: list[str] | None) -> list[str]:
    names = read_json(folder / CLASS_NAMES)
    if names is not None:
        return names
    if fallback:
        return list(fallback)
    raise RunFolderError(f"{folder} has no {CLASS_NAMES}: the class names the model was trained on are unknown")


def read_run(run_dir) -> SavedRun:
    """A run folder's adapter, base model, prompt and class names; ``RunFolderError`` naming what is missing."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {str(run_dir)!r} does not exist")
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise RunFolderError(f"{run_dir} has no {MANIFEST}: not a run folder written by helpers.runner")
    adapter = adapter_folder(run_dir)
    config = RunConfig.from_saved(manifest["config"])
    prompt = load_prompt(adapter) or config.prompt()
    class_names = _class_names(run_dir, manifest.get("data", {}).get("class_names"))
    return SavedRun(run_dir, config, class_names, prompt, resolve_model_id(config.model_id), adapter)


def read_merged(model_dir) -> SavedRun:
    """A merged folder written by ``helpers.export``: its record carries the run's settings."""
    model_dir = Path(model_dir).expanduser()
    record = read_json(model_dir / EXPORT_RECORD)
    if record is None:
        raise RunFolderError(f"{model_dir} has no {EXPORT_RECORD}: not a merged folder written by helpers.export "
                             "(give --run RUN_DIR for a run folder)")
    prompt = load_prompt(model_dir) or record["prompt"]
    return SavedRun(model_dir, RunConfig.from_saved(record["config"]), _class_names(model_dir, None), prompt,
                    str(model_dir))
