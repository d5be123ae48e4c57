"""Every parameter of a run, validated once with clear errors, and read from the command line.

``RunConfig`` is what notebooks 04 and 05, the papermill runner and the multi-GPU launcher all fill in; its
defaults are the offline default (tiny Gemma 4 + digits on a CPU). ``helpers.run.command_line`` reads it from
``-p NAME VALUE`` pairs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from helpers.chat import ALL_SPECIAL_TOKENS, E_SERIES, LARGE, PROMPT_FIELDS, QUESTION
from helpers.data import DIGITS

OFFLINE_MODEL = "tiny"  # resolved to the tiny checkpoint folder, built on first use (helpers.tiny)
TINY_12B = "tiny-12b"  # the 12B's architecture in miniature (Gemma4UnifiedForConditionalGeneration, encoder-free)
TINY_MOE = "tiny-moe"  # the 26B-A4B's in miniature: a block of experts beside each layer's MLP
# The offline model ids and the chat-template family of each (helpers.chat): "tiny" is the large family's
# format (12B, 26B-A4B, 31B, as the seed's 31B), "tiny-e-series" E2B/E4B's (with their KV sharing), "tiny-12b"
# and "tiny-moe" the large family's.
OFFLINE_MODELS = {OFFLINE_MODEL: LARGE, "tiny-e-series": E_SERIES, TINY_12B: LARGE, TINY_MOE: LARGE}
# The image budgets Gemma 4's image processor accepts (max_soft_tokens); 280 is the released default.
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
QUANTIZATIONS = ("none", "4bit")  # bf16 (fp32 on a CPU), or bitsandbytes NF4 (QLoRA)
SEED_LIMIT = 2**32  # numpy's seeds are 0 <= seed < 2**32; transformers' set_seed seeds numpy with it


_FIELD_TYPES = {"model_id": (str,), "dataset": (str,), "output_dir": (str, os.PathLike), "lora_targets": (str, list),
                "learning_rate": (int, float), "epochs": (int, float), "lora_dropout": (int, float),
                "max_steps": (int,), "warmup_steps": (int,), "seed": (int,), "image_soft_tokens": (int,),
                "max_length": (int,), "gradient_checkpointing": (bool,), "lora_experts": (bool,), "quantize_towers": (bool,), "optimizer": (str,),
                "compile_layers": (bool,), "fast_clamps": (bool,), "plan_micro_batch": (bool,), "dataloader_workers": (int,),
                "question": (str,), "system_prompt": (str,), "enable_thinking": (bool,),
                "image_column": (str,), "label_column": (str,), "train_split": (str,), "eval_split": (str,),
                "test_fraction": (int, float), "class_map_file": (str, os.PathLike)}
_OPTIONAL = ("image_soft_tokens", "max_length", "compile_layers", "system_prompt", "eval_split", "class_map_file",
             "dataloader_workers")
# Where the rows come from (helpers.data.describe_source's options): RunConfig.data_options() passes them on.
DATA_OPTIONS = ("image_column", "label_column", "train_split", "eval_split", "test_fraction", "class_map_file")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")


class ConfigError(ValueError):
    """A run parameter has a bad value; the message names the parameter."""


@dataclass
class RunConfig:
    model_id: str = OFFLINE_MODEL
    dataset: str = DIGITS  # "digits", an image folder, a CSV/JSONL/Parquet file, or a hub / local data set
    image_column: str = "image"  # table files and data sets: the column of images (paths or bytes)
    label_column: str = "label"  # ... and the column of labels (class names or indices)
    train_split: str = "train"
    eval_split: str | None = None  # None: "test", else "validation", else a held-out share of the training rows
    test_fraction: float = 0.25  # the held-out share, when the data has no held-out split (seeded, stratified)
    class_map_file: str | None = None  # JSON {"raw label": "class name"}: rename the data's classes
    train_size: int = 1347  # the whole digits training split (the offline default)
    eval_size: int = 450  # the whole held-out split
    image_soft_tokens: int | None = None  # None: the processor's own default (280 real, 70 tiny)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    lora_experts: bool = False  # the 26B-A4B: LoRA on its experts too (PEFT target_parameters; no lora_dropout)
    quantization: str = "none"  # "none" (bf16 on GPU, fp32 on CPU) or "4bit" (NF4, QLoRA)
    quantize_towers: bool = False  # with "4bit": the vision/audio towers in NF4 too (a little less memory)
    optimizer: str = "adamw_torch"  # or "adamw_8bit" (bitsandbytes: 8-bit AdamW states, GPU only)
    compile_layers: bool | None = None  # torch.compile each layer; None: on for one GPU without checkpointing
    fast_clamps: bool = True  # Gemma4ClippableLinear's clamps with a cheaper forward, same numbers (helpers.speed)
    plan_micro_batch: bool = True  # on a GPU, the largest micro-batch the memory plan fits (helpers.speed)
    dataloader_workers: int | None = None  # processes running the collator (image processor); None: up to 4 on a GPU, 0 on a CPU
    # The main job's recipe on the tiny model: 7 epochs of 16 = 595 steps (benchmarks/README.md, "The offline
    # main job on a CPU" and "Gemma 4 in miniature": what it reaches, and the recipes tried beside it).
    learning_rate: float = 1.5e-3
    warmup_steps: int = 30  # linear warm-up, then a cosine decay to zero
    epochs: float = 7.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "runs/offline"
    save_steps: int = 100
    save_total_limit: int = 2
    max_length: int | None = None
    # The prompt (helpers.chat): saved in the run folder, so evaluation and serving use what training used.
    question: str = QUESTION
    system_prompt: str | None = None
    enable_thinking: bool = False  # the released templates' switch; off: the large family's empty thought channel
    shard_index: int = 0  # evaluate shard k of shard_count (notebook 05; Cloud Run parallel tasks)
    shard_count: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name, kinds in _FIELD_TYPES.items():  # "-p max_steps ten" names the parameter, not a TypeError
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ConfigError(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # -p learning_rate Infinity / NaN
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        positive = ["train_size", "eval_size", "lora_r", "lora_alpha", "batch_size", "gradient_accumulation",
                    "save_steps", "save_total_limit"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (self.epochs > 0 or self.max_steps > 0):
            raise ConfigError(f"epochs must be > 0 (or max_steps > 0), got epochs={self.epochs!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_experts and self.lora_dropout:
            raise ConfigError(f"lora_experts takes no lora_dropout (PEFT's LoRA on parameters has none), got "
                              f"{self.lora_dropout!r}: set lora_dropout to 0")
        if self.dataloader_workers is not None and self.dataloader_workers < 0:
            raise ConfigError(f"dataloader_workers must be >= 0 (or null: automatic), got {self.dataloader_workers!r}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be in [0, 2**32) (numpy's range), got {self.seed!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.image_soft_tokens is not None and self.image_soft_tokens not in SOFT_TOKEN_BUDGETS:
            raise ConfigError(f"image_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {self.image_soft_tokens!r}")
        if not isinstance(self.shard_count, int) or self.shard_count < 1:
            raise ConfigError(f"shard_count must be a positive integer, got {self.shard_count!r}")
        if not isinstance(self.shard_index, int) or not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"shard_index must be in [0, shard_count={self.shard_count}), got {self.shard_index!r}")
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError(f"max_length must be positive, got {self.max_length!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        for name in ("dataset", "image_column", "label_column", "train_split", "eval_split", "class_map_file"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise ConfigError(f"{name} must be non-empty" + (" (or null)" if name in _OPTIONAL else ""))
        self._validate_prompt()

    def _validate_prompt(self) -> None:
        """The question and system prompt: non-empty text, with no special token that would fool the template."""
        for name in ("question", "system_prompt"):
            value = getattr(self, name)
            if value is None:
                continue
            if not value.strip():
                raise ConfigError(f"{name} must be non-empty text" + (" (or null for none)" if name != "question" else "")
                                  + f", got {value!r}")
            found = [token for token in ALL_SPECIAL_TOKENS if token in value]
            if found:
                raise ConfigError(f"{name} contains Gemma 4 special token(s) {found}; the chat template writes those")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, params: dict) -> RunConfig:
        """Build from a parameters dict (papermill / CLI); unknown names are an error, not a no-op."""
        unknown = sorted(set(params) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown}; known: {cls.field_names()}")
        return cls(**params)

    @classmethod
    def from_saved(cls, params: dict) -> RunConfig:
        """From a saved config (a manifest, an export record): fields this version no longer has are left out."""
        return cls(**{name: value for name, value in params.items() if name in cls.field_names()})

    def data_options(self) -> dict:
        """Where the rows come from, as ``helpers.data.load_examples`` / ``describe_source`` take it."""
        return {name: getattr(self, name) for name in DATA_OPTIONS}

    def prompt(self) -> dict:
        """The question, system prompt and thinking setting, as ``VisionChatCollator`` and ``chat_format`` take them."""
        return {name: getattr(self, name) for name in PROMPT_FIELDS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_against_model(config: RunConfig, processor, class_names, model_path: str | None = None) -> int:
    """``max_length``, the model's context and ``lora_r`` checked against the model before its weights load;
    returns the longest training sequence, in tokens.

    ``processor`` is set to the run's image budget (``helpers.modeling.load_processor`` does it), ``class_names``
    are the answers the run trains on, ``model_path`` the checkpoint (default: ``resolve_model_id(model_id)``).
    Refused, each naming the parameter to change: a ``max_length`` shorter than the longest training sequence
    (``helpers.collator.longest_training_sequence``: text plus the image at its budget; the collator would stop
    at the first batch that holds it), a sequence longer than the model's context
    (``text_config.max_position_embeddings``), ``lora_experts`` on a model without experts, and a ``lora_r``
    above the narrowest layer LoRA wraps (a rank above a layer's width adds weights, not capacity). What LoRA wraps is PEFT's choice for ``lora_targets``,
    made on the model built without weights (``helpers.modeling.meta_model``, ``lora_layer_widths``)."""
    from helpers.collator import image_sequence_length, longest_training_sequence
    from helpers.modeling import lora_config, lora_layer_widths, meta_model, read_model_config

    model_path = model_path or resolve_model_id(config.model_id)
    longest = longest_training_sequence(processor, class_names, **config.prompt())
    image = image_sequence_length(processor)
    made_of = f"{longest - image} of text for the longest answer, {image} for the image at {image - 2} soft tokens"
    if config.max_length is not None and config.max_length < longest:
        raise ConfigError(f"max_length={config.max_length} is shorter than the longest training sequence of this "
                          f"run, {longest} tokens ({made_of}): set max_length to at least {longest}, or null")
    try:
        model_config = read_model_config(model_path)
    except (OSError, ValueError) as err:  # a hub id out of reach, a config.json transformers cannot read
        raise ConfigError(f"model_id: could not read the config of {model_path!r} "
                          f"({' '.join(str(err).split())})") from None
    text_config = getattr(model_config, "text_config", model_config)
    context = text_config.max_position_embeddings
    if config.lora_experts and not getattr(text_config, "enable_moe_block", False):  # PEFT would only warn
        raise ConfigError(f"lora_experts=True, but {model_path} has no experts (text_config.enable_moe_block is "
                          "off; of the Gemma 4 sizes only the 26B-A4B has them): drop lora_experts")
    if config.max_length is not None and config.max_length > context:
        raise ConfigError(f"max_length={config.max_length} is longer than the model's context, {context} tokens "
                          f"(text_config.max_position_embeddings of {model_path}): set max_length to at most "
                          f"{context}, or null")
    if longest > context:
        raise ConfigError(f"the longest training sequence of this run, {longest} tokens ({made_of}), is longer "
                          f"than the model's context, {context} tokens (text_config.max_position_embeddings of "
                          f"{model_path}): lower image_soft_tokens, or shorten question / system_prompt")
    model = meta_model(model_config)
    try:
        widths = lora_layer_widths(model, lora_config(1, target_modules=config.lora_targets,
                                                      experts=config.lora_experts))
    except ValueError as err:  # PEFT's: a name that matches nothing, or a layer it cannot wrap
        asked = f"lora_targets={config.lora_targets!r}" + (", lora_experts=True" if config.lora_experts else "")
        raise ConfigError(f"{asked}: {' '.join(str(err).split())}") from None
    name, (width_in, width_out) = min(widths.items(), key=lambda item: min(item[1])) if widths else ("", (0, 0))
    if widths and config.lora_r > min(width_in, width_out):
        raise ConfigError(f"lora_r={config.lora_r} is larger than the narrowest layer LoRA wraps ({name}: "
                          f"{width_in} -> {width_out}, with lora_targets={config.lora_targets!r}): set lora_r to at "
                          f"most {min(width_in, width_out)}")
    return longest


def resolve_model_id(model_id: str) -> str:
    """``"tiny"`` / ``"tiny-e-series"`` / ``"tiny-12b"`` / ``"tiny-moe"`` -> that tiny offline checkpoint's
    folder (built once); anything else is returned as is."""
    if model_id == TINY_12B:
        from helpers.tiny import ensure_tiny_gemma4_12b

        return str(ensure_tiny_gemma4_12b())
    if model_id in OFFLINE_MODELS:
        from helpers.tiny import ensure_tiny_gemma4

        return str(ensure_tiny_gemma4(family=OFFLINE_MODELS[model_id], moe=model_id == TINY_MOE))
    return model_id
