"""benchmarks/nf4_in_graph.py: bitsandbytes' NF4 bytes dequantized by torch ops give bitsandbytes' numbers, eager and
compiled, keep no 16-bit weight for the backward, and are undone exactly (CPU; on a GPU, ``tests/test_gpu.py`` and the
training bench's ``*-nf4-in-graph`` variants, whose rows give the same comparison on the device)."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit

from benchmarks.nf4_in_graph import (
    dequantize_in_graph,
    dequantize_in_kernels,
    dequantize_nf4,
    keep_packed_for_backward,
    largest_difference,
)


def four_bit_linear(out_features, in_features, nested, bias=False, seed=0, compute_dtype=torch.bfloat16):
    """A bitsandbytes NF4 layer quantized on the CPU from a bf16 weight (the stored dtype, as the models')."""
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=nested, quant_type="nf4")
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=nested,
                                     quant_type="nf4")._quantize("cpu")
    layer.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU repacking is refused (test below)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features) * 0.1)
    return layer


# 128 x 192: 384 blocks of 64, one and a half of the 256 that each float scale of the nested absmax covers;
# 100 x 30: 3,000 weights, whose last block is partial
@pytest.mark.parametrize("shape,nested", [((128, 192), True), ((320, 256), True), ((128, 192), False),
                                          ((100, 30), True)])
def test_dequantize_nf4_reads_bitsandbytes_bytes(shape, nested):
    layer = four_bit_linear(*shape, nested)
    state = layer.weight.quant_state
    assert state.nested is nested
    assert state.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(layer.weight, state, state.dtype), dequantize_4bit(layer.weight, state))
    assert largest_difference(layer) == 0.0


def test_compiled_dequantization_is_one_kernel():
    """What the layer's wrapper launches per weight: one generated kernel, reading the bytes and writing the
    16-bit weight (no unpacked intermediate, no extern op)."""
    from torch._inductor import metrics

    layer = four_bit_linear(128, 192, nested=True)
    state = layer.weight.quant_state
    torch._dynamo.reset()
    metrics.reset()
    weight = torch.compile(lambda packed: dequantize_nf4(packed, state, torch.bfloat16), fullgraph=True)(layer.weight)
    assert metrics.generated_kernel_count == 1
    assert torch.equal(weight, dequantize_4bit(layer.weight, state).to(torch.bfloat16))


# bf16 compute, as the project's models; float32 compute, where bitsandbytes' backward dequantizes to the stored bf16
# before casting (its forward does not)
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["bf16 compute", "fp32 compute"])
def test_patched_layer_gives_bitsandbytes_output_and_gradients_eager_and_compiled(monkeypatch, compute_dtype):
    layer = four_bit_linear(96, 128, nested=True, bias=True, compute_dtype=compute_dtype)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 128, dtype=compute_dtype, requires_grad=True)

    def outputs(module):
        x.grad, layer.bias.grad = None, None
        y = module(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.detach(), x.grad.clone(), layer.bias.grad.clone()

    expected = outputs(layer)
    assert dequantize_in_graph(layer) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("bitsandbytes' matmul ran")

    monkeypatch.setattr(bnb, "matmul_4bit", refuse)
    for compiled in (False, True):
        y, grad_x, grad_bias = outputs(torch.compile(layer, fullgraph=True) if compiled else layer)  # no graph break
        assert torch.equal(y, expected[0])
        if compiled and compute_dtype == torch.float32:
            # inductor drops the backward's round trip through the stored bf16 (it keeps such casts only with
            # torch._inductor.config.emulate_precision_casts), so the weight there is float32: bf16's rounding apart
            torch.testing.assert_close(grad_x, expected[1], rtol=1.6e-2, atol=1e-2 * float(expected[1].abs().max()))
        else:
            assert torch.equal(grad_x, expected[1])
        # the bias's gradient: summed over 15 rows in float32 here, in bf16 by bitsandbytes (one bf16 step apart)
        torch.testing.assert_close(grad_bias, expected[2], atol=0.07, rtol=0.01)
    monkeypatch.undo()
    assert dequantize_in_kernels(layer) == 1 and "forward" not in layer.__dict__
    assert all(torch.equal(a, b) for a, b in zip(outputs(layer), expected))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_keeps_the_packed_weight_not_a_16_bit_copy(compiled):
    layer = four_bit_linear(384, 256, nested=True)
    dequantize_in_graph(layer)
    torch._dynamo.reset()
    run = torch.compile(layer) if compiled else layer
    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with keep_packed_for_backward():  # on a GPU, without it the compiled backward kept the bf16 weight
        run(x)  # compiles outside the hooks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            run(x)
    assert saved and all(t.numel() < 384 * 256 for t in saved), [tuple(t.shape) for t in saved]
    assert any(t.data_ptr() == layer.weight.data_ptr() for t in saved)  # the packed parameter itself


def test_repacked_cpu_weights_are_refused():
    layer = four_bit_linear(64, 64, nested=True)
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="AVX512-BF16"):
        dequantize_in_graph(layer)


def test_shrunk_31b_compiled_layers_train_as_with_bitsandbytes_matmul():
    """The training bench's model (shrunk 31B in NF4, the bench's LoRA, ``helpers.speed.compile_layers``): loss and
    every LoRA gradient equal bitsandbytes' compiled step, with no graph break; after an eval forward (the bench's
    FLOP count) the weights keep the layout they were quantized in."""
    from torch._dynamo.utils import counters

    from benchmarks.gpu_train_bench import build, ours_lora, variants_for
    from benchmarks.realshape import answer_loss, shrunk_config, synthetic_batch
    from helpers.speed import compile_layers, uncompile_layers

    config = shrunk_config("31B")
    model = ours_lora(build("31B", "nf4", True, "cpu"), next(v for v in variants_for("31B") if v["name"] == "default"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)  # nonzero, so that gradients reach every layer's input
    batch = synthetic_batch(config, 2, device="cpu")
    model.eval()
    with torch.no_grad():
        answer_loss(model, batch)
    assert largest_difference(model) == 0.0
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        loss = answer_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    compile_layers(model)
    try:
        loss, grads = step()
        torch._dynamo.reset()
        counters.clear()
        assert dequantize_in_graph(model) > 0
        ours_loss, ours_grads = step()
        assert sum(counters["graph_break"].values()) == 0
    finally:
        uncompile_layers(model)
        dequantize_in_kernels(model)
        torch._dynamo.reset()
    assert torch.equal(ours_loss, loss)
    assert grads.keys() == ours_grads.keys() and len(grads) > 0
    assert all(torch.equal(ours_grads[n], grads[n]) for n in grads)
