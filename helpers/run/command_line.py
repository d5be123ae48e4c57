"""The command line of the runner and the launcher: ``-p NAME VALUE`` pairs and the seed's flags, validated once.

Tokens never travel as parameters (papermill writes parameters into the executed notebook). Local paths are made
absolute, the output folder is proven writable, a local model folder is checked to be Gemma 4, and ``max_length``,
``lora_r`` and the prompt's length are checked against the model's processor and config (``check_against_model``), all
before any weights load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers.data import DIGITS, DataError, describe_source
from helpers.run.config import OFFLINE_MODELS, ConfigError, RunConfig, check_against_model, resolve_model_id
from helpers.run.folder import RunFolderError, check_output_dir

SECRET_WORDS = ("token", "secret", "password", "api_key")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def parse_value(text: str):
    """``-p`` values as papermill's CLI reads them: JSON where it parses (3, 0.5, true, null), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parameters_from_command_line(pairs, output_dir=None, model_id=None, train_size=None) -> dict:
    """``-p NAME VALUE`` pairs and the seed's flags as parameters, validated through ``RunConfig``.

    Tokens never travel as parameters (papermill writes parameters into the executed notebook): an unknown
    name that looks like a secret is refused as one, and so is any parameter carrying the value of ``HF_TOKEN``
    (named, its value never echoed). Local paths are made absolute, the output folder is proven writable, a
    local model folder is checked to be Gemma 4 and the run's lengths and rank against the model
    (``check_run_against_model``), all before any weights load."""
    params = {name: parse_value(value) for name, value in pairs}
    secret = [n for n in params if n not in RunConfig.field_names() and any(w in n.lower() for w in SECRET_WORDS)]
    if secret:
        raise ConfigError(f"parameter(s) {secret} look like secrets: pass tokens through the environment "
                          "(HF_TOKEN), never as parameters (papermill writes parameters into the notebook)")
    for name, value in (("model_id", model_id), ("train_size", train_size), ("output_dir", output_dir)):
        if value is not None:
            params[name] = value
    tokens = [os.environ.get(name, "") for name in TOKEN_VARIABLES]
    carrying = [n for n, v in params.items() if any(len(t) >= 8 and t in str(v) for t in tokens)]
    if carrying:
        raise ConfigError(f"parameter(s) {carrying} carry the value of {'/'.join(TOKEN_VARIABLES)}: tokens stay in "
                          "the environment, never in parameters (papermill writes parameters into the notebook)")
    config = RunConfig.from_params(params)
    for name in ("dataset", "class_map_file", "model_id"):  # the notebooks run in notebooks/: paths made absolute
        value = getattr(config, name)
        if value not in (None, DIGITS, *OFFLINE_MODELS) and Path(value).expanduser().exists():
            params[name] = str(Path(value).expanduser().resolve())
    config = RunConfig.from_params(params)
    try:
        params["output_dir"] = str(check_output_dir(config.output_dir))
    except RunFolderError as err:
        raise ConfigError(str(err)) from None
    check_device(config)
    if config.model_id not in OFFLINE_MODELS:  # a missing or non-Gemma 4 folder fails here, before any notebook
        from helpers.modeling import ModelLoadError, check_model_source  # transformers: only for a real model

        try:
            check_model_source(config.model_id)
        except ModelLoadError as err:
            raise ConfigError(f"model_id: {err}") from None
    if os.environ.get("LOCAL_RANK", "0") == "0":
        check_run_against_model(config)
    return params


def check_data(config: RunConfig):
    """The data, read without decoding images and checked (``helpers.data.describe_source``), before any
    model loads; a ``DataError`` becomes a ``ConfigError`` naming the file, split, column or class."""
    try:
        return describe_source(config.dataset, **config.data_options())
    except DataError as err:
        raise ConfigError(f"dataset: {err}") from None


def check_run_against_model(config: RunConfig) -> int:
    """``check_against_model`` with what it needs, none of it model weights: the model's processor and config (an
    offline tiny model is built first) and the data's class names (``helpers.data.describe_source``, which
    decodes no image). Returns the longest training sequence, in tokens.

    Under a launcher with several processes only the first of each machine checks (the parameters are the same
    for all): the others would build the tiny checkpoint into the same folder at the same time."""
    from helpers.modeling import load_processor

    class_names = check_data(config).class_names
    model_path = resolve_model_id(config.model_id)
    try:
        processor = load_processor(model_path, config.image_soft_tokens)
    except (OSError, ValueError) as err:  # a hub id not in the cache and not reachable, a folder without one
        raise ConfigError(f"model_id: could not load the processor of {config.model_id!r} "
                          f"({' '.join(str(err).split())})") from None
    return check_against_model(config, processor, class_names, model_path)


def check_device(config: RunConfig) -> None:
    """4-bit loading and 8-bit AdamW run on CUDA only (bitsandbytes): refused before any notebook starts."""
    needs = [f"{name}={value!r}" for name, value in (("quantization", "4bit"), ("optimizer", "adamw_8bit"))
             if getattr(config, name) == value]
    if needs:
        import torch  # deferred: seconds to import, and only these settings need it here

        if not torch.cuda.is_available():
            raise ConfigError(f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} a CUDA GPU "
                              "(bitsandbytes); on a CPU use quantization='none' and optimizer='adamw_torch'")
