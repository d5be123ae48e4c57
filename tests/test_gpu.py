"""GPU tests (``-m gpu``; deselected by default, run on the device by ``benchmarks/run_gpu.sh``)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_31b_nf4_builds_without_a_bf16_copy():
    """31B in NF4: weights in the expected range, and the build never held much more than them."""
    from benchmarks.realshape import build_model
    from helpers.teaching.presets import preset_config

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_model(preset_config("31B"), "4bit")
    weights = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    assert 16e9 < weights < 21e9, weights
    # never a bf16 copy of the model (62 GB): the transient is at most the largest single bf16 tensor, the
    # 262,144 x 5,376 embedding (2.8 GB) while it is initialised (measured on an H200: 21.9 GB peak, 19.1 GB)
    assert peak < weights + 3.5e9, (peak, weights)
    assert model.is_loaded_in_4bit and model.is_quantized
    del model
    torch.cuda.empty_cache()


def test_lora_trains_on_shrunk_nf4_model():
    from peft import LoraConfig, get_peft_model

    from benchmarks.realshape import answer_loss, build_model, shrunk_config, synthetic_batch

    config = shrunk_config("31B")
    model = build_model(config, "4bit")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    batch = synthetic_batch(config, 2, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = answer_loss(model, batch)
    loss.backward()
    # lora_B starts at zero, so only lora_B gets a gradient on the first step
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None]
    assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("size", ["E4B", "26B-A4B", "31B"])
def test_labelled_loss_equals_full_logits_loss_on_gpu(size):
    from benchmarks.realshape import answer_loss, build_model, shrunk_config, synthetic_batch
    from tests.reference import full_logits_loss

    config = shrunk_config(size)
    model = build_model(config, "none", dtype=torch.float32)
    batch = synthetic_batch(config, 3, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, batch), full_logits_loss(model, batch), atol=2e-4, rtol=2e-4)


def test_cached_scoring_equals_naive_on_gpu():
    from benchmarks.gpu_eval_bench import prompt_batch
    from benchmarks.realshape import build_model, shrunk_config
    from helpers.data import PET_BREEDS
    from helpers.scoring import score_class_names
    from helpers.tiny import build_tokenizer
    from tests.reference import naive_class_scores

    config = shrunk_config("31B")
    model = build_model(config, "none", dtype=torch.float32)
    tokenizer = build_tokenizer()
    batch = {k: v.cuda() for k, v in prompt_batch(config, 2, "31B").items()}
    names = list(PET_BREEDS[:8])
    fast = score_class_names(model, tokenizer, batch, names)
    for b in range(2):
        extra = {k: batch[k][b:b + 1] for k in ("pixel_values", "image_position_ids", "mm_token_type_ids")}
        slow = naive_class_scores(model, tokenizer, batch["input_ids"][b], extra, names)
        torch.testing.assert_close(fast[b], slow, atol=2e-3, rtol=1e-3)


def test_train_with_compiled_layers_matches_eager_on_gpu(tmp_path):
    """The notebook path on a GPU: training compiles each layer (bf16 LoRA), trains, and leaves them eager."""
    from accelerate import PartialState
    from transformers import AutoProcessor

    from benchmarks.realshape import answer_loss
    from helpers.collator import VisionChatCollator
    from helpers.data import load_examples
    from helpers.launch import train_on_this_rank
    from helpers.modeling import apply_lora, load_model
    from helpers.run.config import RunConfig, resolve_model_id
    from helpers.speed import compile_layers, uncompile_layers

    path = resolve_model_id("tiny")
    processor = AutoProcessor.from_pretrained(path)
    data = load_examples("digits", "train", size=32)
    collator = VisionChatCollator(processor, data.class_names)
    batch = {k: v.cuda() for k, v in collator(data.examples[:8]).items()}
    model = apply_lora(load_model(path, device_map={"": 0}))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = answer_loss(model, batch)
        compile_layers(model)
        compiled = answer_loss(model, batch)
        uncompile_layers(model)
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)  # bf16: fused kernels round differently
    config = RunConfig(train_size=32, batch_size=8, max_steps=4, save_steps=2, output_dir=str(tmp_path))
    result = train_on_this_rank(config, model, processor, PartialState(), path)["train"]
    assert result["global_step"] == 4
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result["loss_history"])
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


def test_eight_bit_optimizer_trains_on_gpu(tmp_path):
    from accelerate import PartialState
    from transformers import AutoProcessor

    from helpers.launch import train_on_this_rank
    from helpers.modeling import apply_lora, load_model
    from helpers.run.config import RunConfig, resolve_model_id

    path = resolve_model_id("tiny")
    model = apply_lora(load_model(path, device_map={"": 0}))
    config = RunConfig(train_size=16, batch_size=8, max_steps=2, save_steps=2, optimizer="adamw_8bit",
                       compile_layers=False, output_dir=str(tmp_path))
    result = train_on_this_rank(config, model, AutoProcessor.from_pretrained(path), PartialState(), path)["train"]
    assert result["global_step"] == 2
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result["loss_history"])


def test_liger_kernels_give_the_stock_loss_on_gpu():
    """benchmarks.liger.use_liger_kernels: the same loss as transformers' forwards (bf16 tolerance), undone exactly."""
    pytest.importorskip("liger_kernel")
    from benchmarks.liger import use_liger_kernels, use_stock_kernels
    from benchmarks.realshape import answer_loss, build_model, shrunk_config, synthetic_batch

    config = shrunk_config("31B")
    model = build_model(config, "none", dtype=torch.float32)
    batch = synthetic_batch(config, 3, device="cuda")
    with torch.no_grad():
        stock = answer_loss(model, batch)
        assert use_liger_kernels(model) > 0
        liger = answer_loss(model, batch)
        assert use_stock_kernels(model) > 0
        again = answer_loss(model, batch)
    torch.testing.assert_close(liger, stock, atol=2e-3, rtol=2e-3)
    assert torch.equal(again, stock)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no checkpointing", "activation checkpointing"])
def test_e4b_training_forward_gives_the_served_logits_on_the_real_shape(checkpointing):
    """E4B's released shape (42 layers, the last 18 sharing keys and values), random weights in float32: the
    training forward's logits at the labelled positions equal the cached forward's
    (tests/test_training_equals_serving.py on the miniatures)."""
    from benchmarks.realshape import build_model, synthetic_batch
    from helpers.collator import answer_logit_positions
    from helpers.teaching.presets import preset_config
    from tests.test_training_equals_serving import labelled_logits, with_random_lora

    config = preset_config("E4B")
    assert config.text_config.num_kv_shared_layers == 18
    torch.manual_seed(0)
    model = with_random_lora(build_model(config, "none", device="cuda", dtype=torch.float32))
    batch = synthetic_batch(config, 2, device="cuda")
    batch["logits_to_keep"] = answer_logit_positions(batch["labels"])
    trained, served = labelled_logits(model, batch, checkpointing)
    difference = float((trained - served).abs().max())
    print(f"E4B, checkpointing {checkpointing}: max |training - serving| logit {difference:.3g}")
    assert difference <= 1e-3 * max(1.0, float(served.abs().max()))


def test_nf4_in_graph_gives_bitsandbytes_numbers_on_gpu():
    """benchmarks/nf4_in_graph.py on CUDA: the shrunk 31B's NF4 weights dequantize to bitsandbytes' own numbers, and
    at a training batch (more than 1,536 rows, where bitsandbytes also dequantizes and calls cuBLAS) a patched
    layer's output and input gradient equal bitsandbytes' eagerly. Compiled, within bf16's rounding: Triton may
    fuse the nested scale's multiply and add into one FMA, which bitsandbytes runs as two kernels."""
    import bitsandbytes as bnb

    from benchmarks.nf4_in_graph import (
        dequantize_in_graph,
        dequantize_in_kernels,
        keep_packed_for_backward,
        largest_difference,
    )
    from benchmarks.realshape import build_model, shrunk_config

    model = build_model(shrunk_config("31B"), "4bit")
    assert largest_difference(model) == 0.0
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(2048, layer.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def outputs(module):
        x.grad = None
        y = module(x)
        y.float().square().sum().backward()
        return y.detach(), x.grad.clone()

    expected = outputs(layer)
    dequantize_in_graph(layer)
    assert all(torch.equal(a, b) for a, b in zip(outputs(layer), expected))
    with keep_packed_for_backward():
        compiled = outputs(torch.compile(layer, fullgraph=True))
    for got, want in zip(compiled, expected):
        print(f"compiled against bitsandbytes: max |difference| {float((got - want).abs().max()):.3g}")
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3 * float(want.abs().max()))
    dequantize_in_kernels(layer)


def test_sync_free_images_do_not_wait_between_the_towers():
    """benchmarks/sync_free_images.py on CUDA, the shrunk 31B: between the vision tower's last layer and the language
    model's first, transformers' forward waits for the GPU (torch's sync debug mode warns) and the hook's does not;
    the model's logits are the same either way."""
    import warnings

    from benchmarks.realshape import build_model, shrunk_config, synthetic_batch
    from benchmarks.sync_free_images import core_model, merge_images_without_sync

    config = shrunk_config("31B")
    model = build_model(config, device="cuda")
    core = core_model(model)
    batch = synthetic_batch(config, 4, device="cuda")
    batch.pop("labels")

    def logits_and_waits_between_towers():
        marks = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hooks = [core.vision_tower.encoder.layers[-1].register_forward_hook(lambda *_: marks.append(len(caught))),
                     core.language_model.layers[0].register_forward_pre_hook(lambda *_: marks.append(len(caught)))]
            torch.cuda.set_sync_debug_mode("warn")
            try:
                logits = model(**batch).logits
            finally:
                torch.cuda.set_sync_debug_mode("default")
                for hook in hooks:
                    hook.remove()
        vision_done, text_starts = marks
        return logits, sum("synchroniz" in str(w.message) for w in caught[vision_done:text_starts])

    with torch.no_grad():
        want, transformers_waits = logits_and_waits_between_towers()
        handle = merge_images_without_sync(model)
        got, hook_waits = logits_and_waits_between_towers()
        handle.remove()
    print(f"waits for the GPU between the towers: transformers {transformers_waits}, the hook {hook_waits}")
    assert transformers_waits >= 2 and hook_waits == 0
    # embed_vision's matmul runs over the padding rows too, which may change cuBLAS's kernel for the real ones
    print(f"logits, largest |difference| from transformers' merge: {float((got - want).abs().max()):.3g}")
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2 * float(want.abs().max()))
