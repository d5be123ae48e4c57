"""The headless main job: notebook 04 (training) then 05 (evaluation), executed with papermill.

    python -m helpers.runner                                   # the offline default (tiny Gemma 4 + digits)
    python -m helpers.runner --model-id /mnt/gcs/gemma-4-31B-it/ --train-size 4000 -p quantization 4bit

Everything lands in one run folder (``--output-dir``): the executed notebooks, ``metrics.json``, the adapter,
checkpoints and plots. Rerunning the same command resumes from the last complete checkpoint there, and a run
that finished training is not trained again (``--fresh`` starts over); a rerun with other training settings or
data is refused (``helpers.run.folder``: the manifest), and a second runner on a folder in use stops at once
(the lock). Parameters, the output folder and the data are checked before any notebook starts. Secrets such as
``HF_TOKEN`` are never parameters: papermill writes parameters into the executed notebook.

``-p NAME VALUE`` sets any ``RunConfig`` field: the ones a notebook's ``parameters`` cell names are passed as
themselves, the others in its ``settings`` dict, so a notebook shows the knobs a learner turns and runs with all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import papermill
from jupyter_client.manager import AsyncKernelManager
from papermill.exceptions import PapermillExecutionError

from helpers.run.command_line import check_data, parameters_from_command_line
from helpers.run.config import ConfigError, RunConfig
from helpers.run.folder import (
    REPOSITORY,
    RunFolderError,
    holding_lock,
    is_trained,
    metrics_file,
    read_json,
    read_skipped,
    run_manifest,
    start_run,
)

NOTEBOOK_DIR = REPOSITORY / "notebooks"
TRAINING_NOTEBOOK = "04_training"
DEFAULT_NOTEBOOKS = (TRAINING_NOTEBOOK, "05_evaluation")
SETTINGS = "settings"  # the parameters cell's dict of every other RunConfig field


class RunnerError(RuntimeError):
    """A notebook failed or the run was mis-specified; the message says which and why."""


class EncryptedKernelManager(AsyncKernelManager):
    """A kernel whose sockets are encrypted (CurveZMQ keys, as the python3 kernelspec offers): ipykernel warns
    about an unencrypted kernel into the output of every notebook it runs."""

    def __init__(self, **kwargs):
        super().__init__(transport_encryption="auto", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="run folder (default: RunConfig.output_dir)")
    parser.add_argument("--model-id", default=None, help="hub id or local path (default: the tiny offline model)")
    parser.add_argument("--train-size", type=int, default=None, help="number of training examples")
    parser.add_argument("--notebook", nargs="+", default=list(DEFAULT_NOTEBOOKS),
                        help="notebooks to run, in order (names under notebooks/, without .ipynb)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a run parameter (a RunConfig field), e.g. -p max_steps 20")
    parser.add_argument("--fresh", action="store_true",
                        help="start the run folder over: delete its checkpoints, adapter and results first")
    return parser


def planned_rows(source, config: RunConfig) -> str:
    """How many rows the run will use, said before it starts (bad rows are replaced from the rest)."""
    parts = []
    for role, size in (("train_size", config.train_size), ("eval_size", config.eval_size)):
        rows = source.train if role == "train_size" else source.held_out
        parts.append(f"{role} {size}" if size <= len(rows) else f"{role} {size} > {len(rows)} rows: all {len(rows)}")
    return ("data: " + source.summary() + "\nusing " + "; ".join(parts)
            + " (a bad row is skipped and replaced by another, while there are any)")


def used_rows(output_dir: Path) -> str | None:
    """What notebook 04 kept and skipped, in one line."""
    counts = read_skipped(output_dir)
    if not counts:
        return None
    return "used: " + "; ".join(f"{split} {c['kept']} rows" + (f" ({c['n_skipped']} bad rows skipped: {c['skipped']})"
                                                              if c["n_skipped"] else "") for split, c in counts.items())


def notebook_path(name: str) -> Path:
    path = NOTEBOOK_DIR / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    if not path.exists():
        known = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
        raise RunnerError(f"no notebook {name!r} in {NOTEBOOK_DIR}; known: {known}")
    return path


def notebook_parameters(source: Path, params: dict) -> dict:
    """``params`` as ``source``'s parameters cell takes them: the names it has, and every other one in its
    ``settings`` dict (when it has one; a notebook without it takes only its own names)."""
    names = set(papermill.inspect_notebook(str(source)))
    passed = {name: value for name, value in params.items() if name in names}
    others = {name: value for name, value in params.items() if name not in names}
    if SETTINGS in names:
        passed[SETTINGS] = others
    return passed


def execute_notebook(source: Path, executed: Path, parameters: dict, cwd: Path = NOTEBOOK_DIR):
    """Run ``source`` with papermill into ``executed``: text progress only (transformers' loading bar would be
    saved as a widget at 0%), an encrypted kernel. The runner and the tests execute every notebook through it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by the kernel, which inherits it
    return papermill.execute_notebook(str(source), str(executed), parameters=parameters, kernel_name="python3",
                                      cwd=str(cwd), progress_bar=False, log_output=False,
                                      kernel_manager_class=EncryptedKernelManager)


def execute(name: str, params: dict, output_dir: Path) -> Path:
    """Run one notebook into ``output_dir``; a failure names the notebook, the cell and the error."""
    source = notebook_path(name)
    executed = output_dir / source.name
    try:
        execute_notebook(source, executed, notebook_parameters(source, params))
    except PapermillExecutionError as err:
        raise RunnerError(f"notebook {source.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                          f"the executed notebook, up to the failure, is {executed}") from None
    return executed


def run(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    params = parameters_from_command_line(args.parameter, args.output_dir, args.model_id, args.train_size)
    config = RunConfig.from_params(params)
    output_dir = Path(params["output_dir"])
    names = [notebook_path(n).stem for n in args.notebook]  # fail early on a mistyped name
    source = check_data(config)
    print(planned_rows(source, config), flush=True)
    with holding_lock(output_dir):
        trains = TRAINING_NOTEBOOK in names
        print(f"run folder: {start_run(output_dir, run_manifest(config, source), trains, args.fresh)}", flush=True)
        for i, name in enumerate(names, 1):
            if name == TRAINING_NOTEBOOK and is_trained(output_dir):
                print(f"[{i}/{len(names)}] {name}: already trained in this folder (its adapter and training record "
                      "are there); not trained again (--fresh starts over)", flush=True)
                continue
            print(f"[{i}/{len(names)}] {name} ...", flush=True)
            start = time.perf_counter()
            executed = execute(name, params, output_dir)
            print(f"[{i}/{len(names)}] {name} done in {time.perf_counter() - start:.0f} s -> {executed}", flush=True)
            if name == TRAINING_NOTEBOOK and used_rows(output_dir):
                print(used_rows(output_dir), flush=True)
    metrics = read_json(metrics_file(output_dir))
    if metrics is not None:
        print("metrics:", json.dumps(metrics.get("summary", {})), flush=True)
    print(f"run folder: {output_dir}", flush=True)
    return output_dir


def train_briefly(output_dir: Path, model_id: str, max_steps: int, train_size: int, eval_size: int) -> Path:
    """Notebook 04 alone for ``max_steps`` optimizer steps, without warm-up: a run folder with an adapter, for
    notebook 06 when no finished run is at hand (the model barely learns in so few steps)."""
    return run(["--output-dir", str(output_dir), "--notebook", TRAINING_NOTEBOOK, "-p", "model_id", model_id,
                "-p", "max_steps", str(max_steps), "-p", "train_size", str(train_size),
                "-p", "eval_size", str(eval_size), "-p", "warmup_steps", "0"])


def main(argv=None) -> int:
    try:
        run(argv)
    except (ConfigError, RunnerError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
