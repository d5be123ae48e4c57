"""The speed switches, in one place: each changes a forward or the batch, is printed when applied, and what
evaluation should not see is undone here. Notebook 04 and the launcher call ``switch_on`` before building the
``Trainer`` and ``switch_off`` after training; what each buys is measured in ``benchmarks/README.md``, and what
was measured and left off (CUDA graphs, Liger under compilation, compiled evaluation) is listed in docs/one-gpu.md.

- **fast clamps** (``fast_clamps``, on by default): ``Gemma4ClippableLinear``'s clamps (E2B/E4B's vision and
  audio towers) with a backward of one multiply; the same values and gradients as transformers' forward.
- **compiled layers** (``compile_layers``; ``None``: on for one GPU without checkpointing, bf16 and 4-bit):
  ``torch.compile`` per decoder and vision-encoder layer, during training only.
- **the planned micro-batch** (``plan_micro_batch``, on by default; it acts on a GPU, for a published size): the
  largest micro-batch that ``helpers.teaching.memory.plan`` fits, gradient accumulation raised to keep the step's
  batch.
- **data-loader workers** (``dataloader_workers``; ``None``: up to 4 on a GPU, 0 on a CPU): the collator runs in
  worker processes, so batches are ready before each step.
- **no NaN filter** (with ``helpers.training.StopOnNonFiniteLoss``, always): transformers' ``logging_nan_inf_filter``
  reads every micro-batch's loss on the host (a device sync each time); the callback reads the gradients once a
  step instead, and stops on a non-finite loss.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import TrainingArguments

from helpers.modeling import CLIP_BUFFERS, clipping_modules, unwrap_gemma4
from helpers.teaching.memory import run_batch

# -- fast clamps -----------------------------------------------------------------------------------------------

class _MaskedClamp(torch.autograd.Function):
    """``x.clamp(low, high)`` whose backward is one multiply by a saved boolean mask.

    Same values and gradients as ``torch.clamp`` with tensor bounds (the gradient passes where
    ``low <= x <= high``), but autograd's own backward for tensor bounds runs about six elementwise
    kernels over the activation; on the tiny model's CPU step they were a quarter of the time.
    """

    @staticmethod
    def forward(ctx, x, low: float, high: float):
        ctx.save_for_backward((x >= low) & (x <= high))
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def _clamp_or_skip(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    if low == float("-inf") and high == float("inf"):
        return x  # clamp(x, -inf, inf) is x, NaN included
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.clamp(low, high)
    return _MaskedClamp.apply(x, low, high)


def _bounds_as_floats(module) -> tuple[float, float, float, float]:
    """The four bounds as Python floats, re-read only when a buffer changes.

    The cache key is each buffer's identity and in-place version counter, so ``set_clip_bounds``,
    ``load_state_dict`` or ``.to(device)`` are seen, while a forward pass costs no device sync.
    """
    buffers = [getattr(module, name) for name in CLIP_BUFFERS]
    key = tuple((id(b), b._version) for b in buffers)
    cached = module.__dict__.get("_fast_clamp_bounds")
    if cached is None or cached[0] != key:
        cached = (key, tuple(float(b) for b in buffers))
        module.__dict__["_fast_clamp_bounds"] = cached
    return cached[1]


def _fast_clippable_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_min, input_max, output_min, output_max = _bounds_as_floats(self)
    hidden_states = _clamp_or_skip(hidden_states, input_min, input_max)
    return _clamp_or_skip(self.linear(hidden_states), output_min, output_max)


def use_fast_clamps(model) -> int:
    """Give every clipping ``Gemma4ClippableLinear`` a cheaper forward with the same numbers; returns how many.

    A clamp whose bounds are both infinite (the large models' towers, the tiny model's) is skipped; a finite one
    clamps with a one-multiply backward. The bounds stay the module's buffers, so changed bounds still act. Only
    the instance's ``forward`` changes: the class, the buffers and PEFT's view of the module are transformers'
    own. ``use_stock_clamps`` undoes it."""
    patched = 0
    for module in clipping_modules(model):
        if module.use_clipped_linears:
            module.forward = _fast_clippable_forward.__get__(module)
            patched += 1
    return patched


def use_stock_clamps(model) -> int:
    """Undo ``use_fast_clamps``: transformers' own forward again; returns how many were restored."""
    restored = 0
    for module in clipping_modules(model):
        if "forward" in module.__dict__:
            del module.forward
            module.__dict__.pop("_fast_clamp_bounds", None)
            restored += 1
    return restored


def fast_clamp_count(model) -> int:
    """How many clippable linears run the fast forward now."""
    return sum("forward" in module.__dict__ for module in clipping_modules(model))


# -- compiled layers -------------------------------------------------------------------------------------------

# Dynamo's recompile limit while the layers are compiled. Every layer's compiled call is the same code
# (``nn.Module._call_impl``), so its graphs count against one limit, 8 by default: E4B's seven layer kinds at one
# sequence length, then a second length (real images give 253-266 soft tokens, so a batch's length varies), would
# pass it, and layers would fall back to eager. E4B needs 14 graphs (each kind static, then dynamic).
COMPILED_RECOMPILE_LIMIT = 64


def should_compile_layers(config) -> bool:
    """``compile_layers`` as asked; ``None`` means on for one GPU without checkpointing, in bf16 and in 4-bit:
    measured faster there for every size (benchmarks/README.md, "How fast does each size train?"). Checkpointing and
    several processes are not measured compiled, so they stay eager."""
    if config.compile_layers is not None:
        return config.compile_layers
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    return torch.cuda.is_available() and not config.gradient_checkpointing and one_process


def compile_layers(model, dynamic: bool | None = None) -> int:
    """``torch.compile`` every decoder and vision-encoder layer in place; returns how many.

    Regional compilation: layers of one kind share one compiled graph, so compiling takes a minute, not one per
    layer, and the rest of the model (the answer-only ``lm_head``) stays eager. It fuses the float32 RMSNorm casts
    and the clamps, which also makes larger micro-batches fit. The clamps go back to transformers' own forward,
    which the compiler fuses better than it traces ours. ``dynamic``: ``torch.compile``'s; ``None`` compiles a
    layer kind for the first sequence length and once more, dynamic, when a second one comes (``True`` from the
    start compiled longer and ran slower: benchmarks/README.md, "What was tried and is not used"). Dynamo's
    recompile limit is raised to ``COMPILED_RECOMPILE_LIMIT`` until ``uncompile_layers``."""
    inner = unwrap_gemma4(model).model
    model._fast_clamps_were_on = use_stock_clamps(inner) > 0  # uncompile_layers puts them back
    layers = list(inner.language_model.layers)
    if getattr(inner, "vision_tower", None) is not None:
        layers += list(inner.vision_tower.encoder.layers)
    for layer in layers:
        layer.compile(**({} if dynamic is None else {"dynamic": dynamic}))
    model._compiled_layers = layers  # what uncompile_layers undoes, and nothing a user compiled
    if getattr(model, "_recompile_limit_before", None) is None:  # compiled twice: keep the first "before"
        model._recompile_limit_before = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_RECOMPILE_LIMIT)
    return len(layers)


def uncompile_layers(model) -> int:
    """Undo ``compile_layers`` (evaluation and generation then run eager); returns how many layers.

    Only the layers ``compile_layers`` compiled: a module the user compiled stays compiled. The fast clamps come
    back if ``compile_layers`` had switched them off."""
    layers = getattr(model, "_compiled_layers", [])
    for layer in layers:
        layer._compiled_call_impl = None
    model._compiled_layers = []
    if getattr(model, "_recompile_limit_before", None) is not None:
        torch._dynamo.config.recompile_limit = model._recompile_limit_before
        model._recompile_limit_before = None
    if getattr(model, "_fast_clamps_were_on", False):
        use_fast_clamps(unwrap_gemma4(model).model)
        model._fast_clamps_were_on = False
    return len(layers)


# -- the micro-batch and the data-loader workers ---------------------------------------------------------------

AUTO_DATALOADER_WORKERS = 4  # at most, on a GPU (an H200 host of 16 cores: 4 kept the GPU fed)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as containers set it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def dataloader_worker_count(config) -> int:
    """How many processes run the collator (the image processor, the tokenizer) beside training.

    ``config.dataloader_workers`` when set; otherwise, on a GPU, up to ``AUTO_DATALOADER_WORKERS``, leaving two
    CPUs per training process, and on a CPU 0 (training already uses every core there). With 0 the collator runs
    between steps while the GPU waits: E4B bf16 LoRA on JPEG files trained 1.65x faster with 4 workers on an H200
    (benchmarks/README.md)."""
    if config.dataloader_workers is not None:
        return config.dataloader_workers
    if not torch.cuda.is_available():
        return 0
    per_process = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(AUTO_DATALOADER_WORKERS, per_process - 2))


def gpu_memory_bytes() -> int:
    """The current GPU's memory (what the memory plan is made against)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def planned_batch(model, config, compiled: bool = False, liger: bool = False) -> tuple[int, int, str]:
    """(micro-batch, gradient accumulation, how chosen): on a GPU ``helpers.teaching.memory.run_batch`` (the
    largest micro-batch the memory plan fits, the step's batch as configured); on a CPU, or with
    ``plan_micro_batch`` off, the config's."""
    if not config.plan_micro_batch:
        return config.batch_size, config.gradient_accumulation, "as configured (plan_micro_batch off)"
    if not torch.cuda.is_available():
        return config.batch_size, config.gradient_accumulation, "as configured (CPU)"
    trainable = next((p for p in model.parameters() if p.requires_grad), None)
    lora_dtype = "fp32" if trainable is not None and trainable.dtype == torch.float32 else "bf16"
    return run_batch(unwrap_gemma4(model).config, config, gpu_memory_bytes(), lora_dtype=lora_dtype,
                     compiled=compiled, liger=liger)


# -- all of them -----------------------------------------------------------------------------------------------

def switch_on(model, args: TrainingArguments, config, liger: bool = False) -> tuple[TrainingArguments, str]:
    """Apply every switch ``config`` asks for to ``model`` and to a copy of ``args``; returns (the arguments to
    build the ``Trainer`` with, a description of each switch). ``switch_off`` undoes what changes the model.
    ``liger``: liger-kernel's forwards are on (the benchmarks' option), which the memory plan counts."""
    fast = use_fast_clamps(model) if config.fast_clamps else 0
    compiled = compile_layers(model) if should_compile_layers(config) else 0
    micro, accumulation, how = planned_batch(model, config, compiled=compiled > 0, liger=liger)
    workers = dataloader_worker_count(config)
    args = copy.deepcopy(args)  # the caller's arguments stay as they were written
    args.per_device_train_batch_size, args.gradient_accumulation_steps = micro, accumulation
    args.dataloader_num_workers, args.dataloader_persistent_workers = workers, workers > 0
    args.logging_nan_inf_filter = False
    args.dataloader_pin_memory = torch.cuda.is_available()  # pinned host memory only helps a copy to a GPU
    clamps = (f"off while compiled (the compiler fuses transformers' own clamps), {fast} back after training"
              if fast and compiled else f"{'on' if fast else 'off'} ({fast} Gemma4ClippableLinear forwards patched)")
    lines = [f"fast clamps: {clamps}",
             f"compiled layers: {f'on ({compiled} layers, during training; dynamo recompile limit {COMPILED_RECOMPILE_LIMIT})' if compiled else 'off'}",
             f"micro-batch: {micro} x gradient accumulation {accumulation} ({how})",
             f"data-loader workers: {workers}",
             "NaN filter: off (StopOnNonFiniteLoss reads the gradients once a step)"]
    return args, "\n".join(lines)


def switch_off(model) -> str:
    """Undo what ``switch_on`` changed in the model that evaluation should not see: compiled layers run eager
    again (no recompiles per prompt length). The fast clamps stay: same numbers."""
    compiled = uncompile_layers(model)
    return f"compiled layers: {f'{compiled} back to eager' if compiled else 'none'}"
