"""The headless main job: notebook 04 (training) then 05 (evaluation), executed with papermill.

    python -m helpers.runner                                   # the offline default (tiny Gemma 4 + digits)
    python -m helpers.runner --model-id /mnt/gcs/gemma-4-31b-it/ --train-size 4000 -p quantization 4bit

Everything lands in one run folder (``--output-dir``): the executed notebooks, ``metrics.json``, the
adapter, checkpoints and plots. Rerunning the same command resumes from the last checkpoint there.
Parameters are validated before any notebook starts (unknown names and bad values are errors); secrets
such as ``HF_TOKEN`` are never parameters: papermill writes parameters into the executed notebook.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from helpers.config import OFFLINE_MODELS, ConfigError, RunConfig

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
DEFAULT_NOTEBOOKS = ("04_training", "05_evaluation")
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
    if config.model_id not in OFFLINE_MODELS:  # a missing or non-Gemma 4 folder fails here, before any notebook
        from helpers.modeling import ModelLoadError, check_model_source

        try:
            check_model_source(config.model_id)
        except ModelLoadError as err:
            raise ConfigError(f"model_id: {err}") from None
    params["output_dir"] = str(Path(config.output_dir).resolve())
    return params


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


def run(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    params = collect_parameters(args)
    output_dir = Path(params["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [notebook_path(n).stem for n in args.notebook]  # fail early on a mistyped name
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        start = time.perf_counter()
        executed = execute(name, params, output_dir)
        print(f"[{i}/{len(names)}] {name} done in {time.perf_counter() - start:.0f} s -> {executed}", flush=True)
    metrics = output_dir / "metrics.json"
    if metrics.exists():
        summary = json.loads(metrics.read_text()).get("summary", {})
        print("metrics:", json.dumps(summary), flush=True)
    print(f"run folder: {output_dir}", flush=True)
    return output_dir


def main(argv=None) -> int:
    try:
        run(argv)
    except (ConfigError, RunnerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
