"""A cheaper forward for ``Gemma4ClippableLinear``'s clamps, same numbers; switched on by ``load_model``.

``helpers.modeling.load_model(fast_clamps=True)`` (``RunConfig.fast_clamps``) calls ``use_fast_clamps``;
``use_stock_clamps`` undoes it, and ``fast_clamp_count`` says how many modules run it (notebook 04 prints
it). Only the patched modules' instance ``forward`` changes: the class, the buffers and PEFT's view of the
module are transformers' own. The inspection helpers of notebook 02 are in ``helpers.clippable``.
"""

from __future__ import annotations

import torch

CLIP_BUFFERS = ("input_min", "input_max", "output_min", "output_max")


def is_clippable_linear(module) -> bool:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    return isinstance(module, Gemma4ClippableLinear)


def clipping_modules(model) -> list:
    """Every ``Gemma4ClippableLinear`` of ``model`` (PEFT-wrapped or not)."""
    return [module for module in model.modules() if is_clippable_linear(module)]


def fast_clamp_count(model) -> int:
    """How many clippable linears run the fast forward now."""
    return sum("forward" in module.__dict__ for module in clipping_modules(model))


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

    A clamp whose bounds are both infinite (the tiny model's, and any checkpoint that ships clipping
    switched off in value) is skipped; a finite one clamps with a one-multiply backward. The bounds stay
    the module's buffers, so ``set_clip_bounds`` still acts. The class is untouched (PEFT's messages and
    ``repr`` still say ``Gemma4ClippableLinear``); ``use_stock_clamps`` undoes it.
    """
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
