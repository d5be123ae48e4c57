"""Liger-kernel's Triton RMSNorm and GeGLU MLP on one loaded Gemma 4, switched on and off in place.

The training benchmark's Liger rows (``gpu_train_bench``, variants ``*-liger*``) and a GPU test
(``tests/test_gpu.py``) use it; the shipped recipe does not: what the kernels buy is measured in
``benchmarks/README.md``, and ``helpers.speed.switch_on(..., liger=True)`` only tells the memory plan they are on.
Needs ``liger-kernel`` and a CUDA GPU (the kernels are Triton).
"""

from __future__ import annotations

from helpers.modeling import unwrap_gemma4

LIGER_METHODS = ("forward", "extra_repr", "_get_name")  # what liger-kernel binds on a module it patches


def use_liger_kernels(model) -> int:
    """Liger-kernel's RMSNorm and GeGLU MLP in the text decoder of a loaded Gemma 4 (``gemma4``: E2B, E4B,
    26B-A4B's norms, 31B), in place, this model only; returns how many modules. Undone by ``use_stock_kernels``.

    liger-kernel's ``apply_liger_kernel_to_gemma4(model=...)``, without its fused cross-entropy (the loss is
    ``helpers.training.answer_only_loss``, on the answer's positions only). That call also swaps transformers'
    ``Gemma4RMSNorm`` and ``Gemma4TextMLP`` classes for every model built later; those are put back at once.
    The 12B (``gemma4_unified``) is refused: liger-kernel's Gemma 4 patches target ``models/gemma4`` only."""
    from liger_kernel.transformers import apply_liger_kernel_to_gemma4
    from transformers.models.gemma4 import modeling_gemma4

    gemma = unwrap_gemma4(model)
    if gemma.config.model_type != "gemma4":
        raise ValueError(f"liger-kernel patches Gemma 4 (model_type 'gemma4'), not {gemma.config.model_type!r}")
    before = {id(m) for m in gemma.modules() if "forward" in m.__dict__}
    classes = modeling_gemma4.Gemma4RMSNorm, modeling_gemma4.Gemma4TextMLP
    try:
        apply_liger_kernel_to_gemma4(rope=False, cross_entropy=False, fused_linear_cross_entropy=False,
                                     rms_norm=True, geglu=True, model=gemma)
    finally:
        modeling_gemma4.Gemma4RMSNorm, modeling_gemma4.Gemma4TextMLP = classes
    patched = [m for m in gemma.modules() if "forward" in m.__dict__ and id(m) not in before]
    gemma._liger_modules = getattr(gemma, "_liger_modules", []) + patched
    return len(patched)


def use_stock_kernels(model) -> int:
    """Undo ``use_liger_kernels``: transformers' own forwards again; returns how many modules."""
    gemma = unwrap_gemma4(model)
    modules = getattr(gemma, "_liger_modules", [])
    for module in modules:
        for name in LIGER_METHODS:
            module.__dict__.pop(name, None)
    gemma._liger_modules = []
    return len(modules)


def liger_kernel_count(model) -> int:
    """Modules of ``model`` running liger-kernel's forwards (``use_liger_kernels``)."""
    return len(getattr(unwrap_gemma4(model), "_liger_modules", []))
