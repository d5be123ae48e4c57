"""The speed switches: each follows its parameter and its measured rule, is described when applied, and is undone."""

import pytest
import torch
from transformers import AutoModelForMultimodalLM

from helpers import speed
from helpers.modeling import apply_lora, load_model
from helpers.run.config import ConfigError, RunConfig
from helpers.teaching.clippable import find_clippable_linears
from helpers.training import training_arguments


def compiled_layer_count(model) -> int:
    """What compile_layers compiles in the tiny model: each decoder layer and each vision-encoder layer."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return config.text_config.num_hidden_layers + config.vision_config.num_hidden_layers


def test_compile_layers_rule(monkeypatch):
    assert not speed.should_compile_layers(RunConfig())  # no GPU here: eager
    assert speed.should_compile_layers(RunConfig(compile_layers=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert speed.should_compile_layers(RunConfig())  # bf16 LoRA on a GPU: compiled
    assert speed.should_compile_layers(RunConfig(quantization="4bit"))  # 4-bit too: measured faster compiled
    assert not speed.should_compile_layers(RunConfig(gradient_checkpointing=True))
    assert not speed.should_compile_layers(RunConfig(compile_layers=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not speed.should_compile_layers(RunConfig())  # DDP / FSDP: not measured compiled


def test_compile_layers_and_undo(tiny_path):
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    users_own = model.get_base_model().model.embed_vision
    users_own.compile()  # compiled by the user, not by compile_layers: must stay compiled
    layers = compiled_layer_count(model)
    limit = torch._dynamo.config.recompile_limit
    assert speed.compile_layers(model) == layers  # every decoder and vision-encoder layer, compiled on first call
    # all layers share one code object, so one limit: E4B needed 14 graphs (7 layer kinds x 2 lengths)
    assert torch._dynamo.config.recompile_limit == max(limit, speed.COMPILED_RECOMPILE_LIMIT) >= 2 * 7
    assert speed.uncompile_layers(model) == layers and speed.uncompile_layers(model) == 0
    assert torch._dynamo.config.recompile_limit == limit
    assert users_own._compiled_call_impl is not None


def test_uncompiling_puts_the_fast_clamps_back(tiny_e_series_path):
    model = apply_lora(load_model(tiny_e_series_path))
    speed.use_fast_clamps(model)

    def fast():
        return sum("forward" in m.__dict__ for m in find_clippable_linears(model).values())

    before = fast()
    assert before > 0
    speed.compile_layers(model)
    assert fast() == 0  # the compiler gets transformers' own forward
    speed.uncompile_layers(model)
    assert fast() == before


def test_switch_on_applies_describes_and_leaves_the_callers_arguments(tmp_path, tiny_e_series_path, monkeypatch):
    marked = []

    def mark(module):  # stands in for torch.compile (slow on a CPU): routes calls through a wrapper
        module._compiled_call_impl = module._call_impl
        marked.append(module)

    monkeypatch.setattr(torch.nn.Module, "compile", mark)
    model = apply_lora(load_model(tiny_e_series_path))
    config = RunConfig(compile_layers=True, batch_size=3, gradient_accumulation=2, dataloader_workers=0)
    written = training_arguments(config, tmp_path)
    args, described = speed.switch_on(model, written, config)
    assert args is not written and written.logging_nan_inf_filter and not args.logging_nan_inf_filter
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 2)  # CPU: as configured
    assert "fast clamps: off while compiled" in described  # compile_layers takes transformers' own clamps
    assert f"compiled layers: on ({compiled_layer_count(model)} layers" in described
    assert "micro-batch: 3 x gradient accumulation 2 (as configured (CPU))" in described
    assert len(marked) == compiled_layer_count(model)
    assert speed.switch_off(model).startswith(f"compiled layers: {len(marked)} back to eager")
    assert all(layer._compiled_call_impl is None for layer in marked)
    assert speed.fast_clamp_count(model) > 0  # back after compilation, for evaluation
    _, described = speed.switch_on(model, written, RunConfig(fast_clamps=False))
    assert speed.fast_clamp_count(model) > 0 and "fast clamps: off (0 " in described  # off: not applied again


def test_dataloader_workers_rule(monkeypatch):
    assert speed.dataloader_worker_count(RunConfig()) == 0  # no GPU here: the collator in the training process
    assert speed.dataloader_worker_count(RunConfig(dataloader_workers=3)) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(speed, "usable_cpus", lambda: 16)
    assert speed.dataloader_worker_count(RunConfig()) == speed.AUTO_DATALOADER_WORKERS == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 CPUs per training process: 2 workers each
    assert speed.dataloader_worker_count(RunConfig()) == 2
    monkeypatch.setattr(speed, "usable_cpus", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert speed.dataloader_worker_count(RunConfig()) == 0
    with pytest.raises(ConfigError, match="dataloader_workers"):
        RunConfig(dataloader_workers=-1)


def _meta_preset(size: str, adapter_dtype: torch.dtype):
    """A published size on the meta device (no memory), one weight made trainable as an adapter would be."""
    from helpers.teaching.presets import build_meta_model, preset_config

    model = build_meta_model(preset_config(size))
    model.requires_grad_(False)
    weight = model.get_output_embeddings().weight
    weight.data = weight.data.to(adapter_dtype)
    weight.requires_grad_(True)
    return model


H200_BYTES = 143_771 * 2**20  # what torch reports for an H200: 143,771 MiB


@pytest.mark.parametrize("size,adapter_dtype,compiled,settings,gpu_bytes,expected", [
    ("31B", torch.bfloat16, False, {"quantization": "4bit", "lora_r": 64, "batch_size": 32}, H200_BYTES, (8, 4)),
    ("31B", torch.bfloat16, False, {"quantization": "4bit", "lora_r": 64, "batch_size": 4, "gradient_accumulation": 4},
     H200_BYTES, (8, 2)),  # 4 x 4 on an H200: a larger micro-batch, the same 16 samples a step
    ("E4B", torch.float32, True, {"lora_r": 64, "batch_size": 32}, H200_BYTES, (32, 1)),  # bf16 LoRA, compiled
    ("31B", torch.bfloat16, False, {"quantization": "4bit", "lora_r": 16, "gradient_checkpointing": True,
                                    "batch_size": 32}, 24e9, (2, 16)),
])
def test_micro_batch_on_a_gpu_comes_from_the_memory_plan(monkeypatch, size, adapter_dtype, compiled, settings,
                                                        gpu_bytes, expected):
    from helpers.teaching.memory import PLANNER_MARGIN, fits, plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(speed, "gpu_memory_bytes", lambda: int(gpu_bytes))
    config = RunConfig(**settings)
    micro, accumulation, how = speed.planned_batch(_meta_preset(size, adapter_dtype), config, compiled=compiled)
    assert (micro, accumulation) == expected and "helpers.teaching.memory.plan" in how
    assert micro * accumulation == config.batch_size * config.gradient_accumulation  # the step's batch as configured
    kwargs = {"quantization": config.quantization, "lora_r": config.lora_r, "compiled": compiled,
              "lora_dtype": "fp32" if adapter_dtype == torch.float32 else "bf16",
              "gradient_checkpointing": config.gradient_checkpointing}
    assert fits(size, gpu_bytes / 1e9, margin=PLANNER_MARGIN, micro_batch=micro, **kwargs)
    # the next larger divisor of the step's batch would not fit with the margin
    larger = next((d for d in range(micro + 1, micro * accumulation + 1) if (micro * accumulation) % d == 0), None)
    assert larger is None or plan(size, micro_batch=larger, **kwargs)["total"] * (1 + PLANNER_MARGIN) + 1e9 > gpu_bytes


def test_micro_batch_stays_as_configured_on_a_cpu_and_for_other_models(monkeypatch, tiny_path):
    config = RunConfig(batch_size=6, gradient_accumulation=2)
    assert speed.planned_batch(_meta_preset("31B", torch.bfloat16), config)[:2] == (6, 2)  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(speed, "gpu_memory_bytes", lambda: H200_BYTES)
    tiny = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    micro, accumulation, how = speed.planned_batch(tiny, config)
    assert (micro, accumulation) == (6, 2) and "no memory plan" in how
    off = RunConfig(quantization="4bit", lora_r=64, batch_size=32, plan_micro_batch=False)
    assert speed.planned_batch(_meta_preset("31B", torch.bfloat16), off)[:2] == (32, 1)  # as configured
