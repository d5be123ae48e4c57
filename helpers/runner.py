"""The headless main job: notebook 04 (training) then 05 (evaluation), executed with papermill.

    python -m helpers.runner                                   # the offline default (tiny Gemma 4 + digits)
    python -m helpers.runner --model-id /mnt/gcs/gemma-4-31b-it/ --train-size 4000 -p quantization 4bit

Everything lands in one run folder (``--output-dir``): the executed notebooks, ``metrics.json``, the
adapter, checkpoints and plots. Rerunning the same command resumes from the last checkpoint there; a
rerun with other training settings or data is refused (``helpers.run_folder``: the manifest), unless
``--fresh``; a second runner on a folder in use stops at once (the lock). Parameters, the output folder
and the data are checked before any notebook starts (unknown names, bad values, a missing data path...
are errors); secrets such as ``HF_TOKEN`` are never parameters: papermill writes parameters into the
executed notebook.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from helpers.config import OFFLINE_MODELS, ConfigError, RunConfig
from helpers.data import DIGITS
from helpers.run_folder import (
    METRICS,
    SKIPPED,
    RunFolderError,
    build_manifest,
    check_output_dir,
    holding_lock,
    start_run,
)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
TRAINING_NOTEBOOK = "04_training"
DEFAULT_NOTEBOOKS = (TRAINING_NOTEBOOK, "05_evaluation")
SECRET_WORDS = ("token", "secret", "password", "api_key")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class RunnerError(RuntimeError):
    """A notebook failed or the run was mis-specified; the message says which and why."""


def parse_value(text: str):
    """``-p`` values as papermill's CLI reads them: JSON where it parses (3, 0.5, true, null), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="run folder (default: RunConfig.output_dir)")
    parser.add_argument("--model-id", default=None, help="hub id or local path (default: the tiny offline model)")
    parser.add_argument("--train-size", type=int, default=None, help="number of training examples")
    parser.add_argument("--notebook", nargs="+", default=list(DEFAULT_NOTEBOOKS),
                        help="notebooks to run, in order (names under notebooks/, without .ipynb)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter (a RunConfig field), e.g. -p max_steps 20")
    parser.add_argument("--fresh", action="store_true",
                        help="start the run folder over: delete its checkpoints, adapter and results first")
    return parser


def collect_parameters(args) -> dict:
    """The parameters for every notebook, validated once through ``RunConfig``."""
    params = {name: parse_value(value) for name, value in args.parameter}
    secret = [n for n in params if any(word in n.lower() for word in SECRET_WORDS)]
    if secret:
        raise ConfigError(f"parameter(s) {secret} look like secrets: pass tokens through the environment "
                          "(HF_TOKEN), never as parameters (papermill writes parameters into the notebook)")
    for flag, name in (("model_id", "model_id"), ("train_size", "train_size"), ("output_dir", "output_dir")):
        value = getattr(args, flag)
        if value is not None:
            params[name] = value
    # A token's value in any parameter is refused here, before RunConfig, whose errors quote bad values.
    tokens = [os.environ.get(name, "") for name in TOKEN_VARIABLES]
    carrying = [n for n, v in params.items() if any(len(t) >= 8 and t in str(v) for t in tokens)]
    if carrying:  # the parameter is named, the value never echoed
        raise ConfigError(f"parameter(s) {carrying} carry the value of {'/'.join(TOKEN_VARIABLES)}: tokens stay in "
                          "the environment, never in parameters (papermill writes parameters into the notebook)")
    config = RunConfig.from_params(params)
    for name in ("dataset", "class_map_file", "model_id"):  # the notebooks run in notebooks/: paths made absolute
        value = getattr(config, name)
        if value not in (None, DIGITS, *OFFLINE_MODELS) and Path(value).expanduser().exists():
            params[name] = str(Path(value).expanduser().resolve())
    config = RunConfig.from_params(params)
    try:
        check_output_dir(config.output_dir)
    except RunFolderError as err:
        raise ConfigError(str(err)) from None
    if config.model_id not in OFFLINE_MODELS:  # a missing or non-Gemma 4 folder fails here, before any notebook
        from helpers.modeling import ModelLoadError, check_model_source

        try:
            check_model_source(config.model_id)
        except ModelLoadError as err:
            raise ConfigError(f"model_id: {err}") from None
    params["output_dir"] = str(Path(config.output_dir).resolve())
    return params


def check_data(config: RunConfig):
    """The data, read without decoding images and checked (``helpers.data.describe_source``), before any
    model loads; a ``DataError`` becomes a ``ConfigError`` naming the file, split, column or class."""
    from helpers.data import DataError, describe_source

    try:
        return describe_source(config.dataset, **config.data_options())
    except DataError as err:
        raise ConfigError(f"dataset: {err}") from None


def planned_rows(source, config: RunConfig) -> str:
    """How many rows the run will use, said before it starts (bad rows are replaced from the rest)."""
    parts = []
    for role, size in (("train_size", config.train_size), ("eval_size", config.eval_size)):
        rows = source.train if role == "train_size" else source.held_out
        parts.append(f"{role} {size}" if size <= len(rows) else f"{role} {size} > {len(rows)} rows: all {len(rows)}")
    return ("data: " + source.summary() + "\nusing " + "; ".join(parts)
            + " (a bad row is skipped and replaced by another, while there are any)")


def used_rows(output_dir: Path) -> str | None:
    """What notebook 04 kept and skipped (its ``skipped.json``), in one line."""
    path = output_dir / SKIPPED
    if not path.exists():
        return None
    counts = json.loads(path.read_text())
    return "used: " + "; ".join(f"{split} {c['kept']} rows" + (f" ({c['n_skipped']} bad rows skipped: {c['skipped']})"
                                                              if c["n_skipped"] else "") for split, c in counts.items())


def notebook_path(name: str) -> Path:
    path = NOTEBOOK_DIR / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    if not path.exists():
        known = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
        raise RunnerError(f"no notebook {name!r} in {NOTEBOOK_DIR}; known: {known}")
    return path


def execute(name: str, params: dict, output_dir: Path) -> Path:
    """Run one notebook with papermill into ``output_dir``; a failure names the notebook and error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebook_path(name)
    executed = output_dir / source.name
    try:
        papermill.execute_notebook(str(source), str(executed), parameters=params, kernel_name="python3",
                                   cwd=str(NOTEBOOK_DIR), progress_bar=False, log_output=False)
    except PapermillExecutionError as err:
        raise RunnerError(f"notebook {source.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                          f"the executed notebook, up to the failure, is {executed}") from None
    return executed


def run_manifest(config: RunConfig, source) -> dict:
    model = {"model_id": config.model_id}
    return build_manifest(config.to_dict(), source.fingerprint(), model)


def run(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    params = collect_parameters(args)
    config = RunConfig.from_params(params)
    output_dir = Path(params["output_dir"])
    names = [notebook_path(n).stem for n in args.notebook]  # fail early on a mistyped name
    source = check_data(config)
    print(planned_rows(source, config), flush=True)
    with holding_lock(output_dir):
        print(f"run folder: {start_run(output_dir, run_manifest(config, source), TRAINING_NOTEBOOK in names, args.fresh)}",
              flush=True)
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name} ...", flush=True)
            start = time.perf_counter()
            executed = execute(name, params, output_dir)
            print(f"[{i}/{len(names)}] {name} done in {time.perf_counter() - start:.0f} s -> {executed}", flush=True)
            if name == TRAINING_NOTEBOOK and used_rows(output_dir):
                print(used_rows(output_dir), flush=True)
    metrics = output_dir / METRICS
    if metrics.exists():
        summary = json.loads(metrics.read_text()).get("summary", {})
        print("metrics:", json.dumps(summary), flush=True)
    print(f"run folder: {output_dir}", flush=True)
    return output_dir


def main(argv=None) -> int:
    try:
        run(argv)
    except (ConfigError, RunnerError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
