"""bitsandbytes' NF4 weights dequantized by plain torch ops, which inductor fuses into a compiled layer.

Why: the compiled 31B QLoRA step idles while the CPU launches the language model's work
(``benchmarks/README.md``, "Where does a compiled step's time go?"), and bitsandbytes' 4-bit matmul is a large
part of that CPU time per decoder layer (the profile in ``benchmarks/results/RECORD.md``). At a training batch
(more than 1,536 rows) that op dequantizes the weight with a CUDA kernel and multiplies with cuBLAS, but it
reaches both through Python (``bitsandbytes/backends/cuda/ops.py``, called via ctypes), which ``torch.compile``
cannot trace into. Here the same bytes are dequantized by indexing, shifts and multiplies, which inductor
compiles into the layer: on a CPU one generated kernel per weight (``tests/test_nf4_in_graph.py``); on a GPU
not profiled (a Triton kernel's name would hold ``rshift``, which the bench's profile counts as "4-bit
dequantize").

Nothing is re-quantized: the model keeps bitsandbytes' packed weights and ``QuantState`` (two 4-bit codes a
byte, the high nibble first; one absmax per 64 weights, itself stored in 8 bits with one float per 256
absmax and an offset when ``compress_statistics`` is on, as the project's ``nf4_config`` sets). Each
``Linear4bit``'s forward is swapped on the instance (``dequantize_in_graph``) and put back
(``dequantize_in_kernels``), as ``benchmarks/liger.py`` does for Liger's kernels.

The training bench's ``*-nf4-in-graph`` variants measure it against the defaults. On one H100 the 31B trained
no faster with it (``benchmarks/README.md``, "What was tried and is not used"), so the shipped recipe does not
use it. Like bitsandbytes' own matmul, the backward dequantizes again rather than keep a 16-bit copy of the
weight for it, provided the patched layers compile under ``keep_packed_for_backward``. It is meant for compiled
layers: run eagerly, each op materializes a weight-sized intermediate (the positions, the indices, the float32
values) that bitsandbytes' kernel never holds.
"""

from __future__ import annotations

import types

import torch


def nested_absmax(state, block: torch.Tensor) -> torch.Tensor:
    """The float32 scale of each block number in ``block``: read as stored, or decoded from its 8-bit code
    (``state.state2``: one float scale per 256 codes) plus ``state.offset``."""
    if not state.nested:
        return state.absmax[block].float()
    return state.state2.code[state.absmax[block].int()] * state.state2.absmax[block // state.state2.blocksize] + state.offset


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The ``state.shape`` weight that bitsandbytes' ``dequantize_4bit(packed, state)`` returns, in ``dtype``,
    from torch ops only: weight ``i`` is the high (even ``i``) or low (odd ``i``) 4 bits of byte ``i // 2``, an
    index into ``state.code``, scaled by the absmax of block ``i // state.blocksize``, in float32 as bitsandbytes
    does. Written per weight, with no intermediate tensor of its own, so that inductor makes it one kernel."""
    i = torch.arange(state.shape.numel(), device=packed.device)
    byte = packed.reshape(-1).view(torch.uint8)[i // 2].int()
    index = (byte >> (4 - 4 * (i % 2))) & 0xF
    weight = state.code[index] * nested_absmax(state, i // state.blocksize)
    return weight.reshape(state.shape).to(dtype)


class LinearNF4InGraph(torch.autograd.Function):
    """``x @ W.T`` for a bitsandbytes 4-bit ``W``, dequantized by ``dequantize_nf4`` in the forward and again in
    the backward: what is kept for the backward is the packed weight (a parameter, so no extra memory), never
    the 16-bit copy. The weight is frozen (QLoRA), so it gets no gradient; a bias that trains gets one. Dtypes as
    bitsandbytes' ``MatMul4Bit``: the forward dequantizes to the input's dtype, the backward to the weight's
    stored dtype and then casts to the gradient's."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        ctx.save_for_backward(packed)
        ctx.state = state
        return torch.nn.functional.linear(x, dequantize_nf4(packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = rows.float().sum(0).to(grad_out.dtype) if ctx.needs_input_grad[3] else None
        weight = dequantize_nf4(packed, ctx.state, ctx.state.dtype).to(grad_out.dtype)
        return grad_out @ weight, None, None, grad_bias


def traced_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``bitsandbytes.nn.Linear4bit.forward`` for training: the input and bias in the compute dtype (the input's
    own when none is set, where bitsandbytes would pick one at the first call), the 4-bit matmul through
    ``LinearNF4InGraph``, the output in the input's dtype. bitsandbytes' CPU repacking and its quant-state repair
    for sharded (FSDP) weights are left out: this is for one GPU."""
    dtype = x.dtype
    x = x.to(self.compute_dtype or dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return LinearNF4InGraph.apply(x, self.weight, self.weight.quant_state, bias).to(dtype)


def keep_packed_for_backward():
    """The settings to compile and train the patched layers under: AOTAutograd's common-subexpression elimination
    off. With it on, the backward's dequantization is merged with the forward's, and on a GPU the partitioner then
    keeps each layer's bf16 weight for the backward (a 21,504 x 5,376 weight is 231 MB in bf16 against 58 MB
    packed), which runs the 31B out of memory. Without it, the backward dequantizes again, as bitsandbytes does."""
    import torch._functorch.config

    return torch._functorch.config.patch(cse=False)


def four_bit_linears(model) -> list:
    """The bitsandbytes ``Linear4bit`` modules of ``model``."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def dequantize_in_graph(model) -> int:
    """Every bitsandbytes ``Linear4bit`` of ``model`` (NF4) runs ``traced_forward``, in place; returns how many.
    Undone by ``dequantize_in_kernels``."""
    linears = four_bit_linears(model)
    for module in linears:
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(f"{module}: bitsandbytes has repacked this weight for its AVX512-BF16 CPU kernel (at an "
                             "inference forward on a CPU); dequantize_nf4 reads the layout it was quantized in")
        if state.quant_type != "nf4":
            raise ValueError(f"{module}: dequantize_nf4 reads NF4 weights, not {state.quant_type}")
        module.forward = types.MethodType(traced_forward, module)
    return len(linears)


def dequantize_in_kernels(model) -> int:
    """Undo ``dequantize_in_graph``: bitsandbytes' own forward again; returns how many modules."""
    linears = [m for m in four_bit_linears(model) if "forward" in m.__dict__]
    for module in linears:
        del module.forward
    return len(linears)


def largest_difference(model) -> float:
    """The largest |``dequantize_nf4`` - bitsandbytes' ``dequantize_4bit``| over ``model``'s 4-bit weights, on
    their device and eagerly: the training benchmark prints it with the variant's row (0.0: the same numbers)."""
    from bitsandbytes.functional import dequantize_4bit

    worst = 0.0
    for module in four_bit_linears(model):
        weight = module.weight
        ours = dequantize_nf4(weight, weight.quant_state, torch.bfloat16)
        theirs = dequantize_4bit(weight, weight.quant_state).to(torch.bfloat16)
        worst = max(worst, float((ours.float() - theirs.float()).abs().max()))
    return worst
