"""train(): steps, atomic checkpoints, resume, a loadable adapter, and a stop on non-finite loss."""

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForMultimodalLM

from helpers.collator import VisionChatCollator
from helpers.config import RunConfig
from helpers.data import load_examples
from helpers.modeling import apply_lora
from helpers.training import (
    COMPLETE_MARKER,
    NonFiniteLossError,
    freeze_unused_adapters,
    gathered_lora_state,
    last_complete_checkpoint,
    train,
    training_arguments,
)


def _setup(tiny_path, tiny_processor, **overrides):
    params = {"train_size": 16, "eval_size": 8, "batch_size": 4, "max_steps": 4, "save_steps": 2, "learning_rate": 1e-3}
    params.update(overrides)
    config = RunConfig(**params)
    data = load_examples("digits", "train", size=config.train_size)
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    return config, data, model, VisionChatCollator(tiny_processor, data.class_names)


def test_trains_saves_and_resumes(tmp_path, tiny_path, tiny_processor):
    config, data, model, collator = _setup(tiny_path, tiny_processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, collator, data.examples, config, tmp_path)
    assert result.global_step == 4 and result.resumed_from is None
    assert result.loss_history and all(math.isfinite(loss) for _, loss in result.loss_history)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "checkpoints" / ".staging").exists()
    # the adapter loads back onto a fresh base model and reproduces the trained weights
    loaded = PeftModel.from_pretrained(AutoModelForMultimodalLM.from_pretrained(tiny_path), result.adapter_dir)
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            assert torch.allclose(param, trained[name])
    # rerunning with more steps continues from checkpoint-4 instead of starting over
    config2, _, model2, _ = _setup(tiny_path, tiny_processor, max_steps=6)
    again = train(model2, collator, data.examples, config2, tmp_path)
    assert again.resumed_from.endswith("checkpoint-4")
    assert again.global_step == 6
    state = json.loads((Path(again.resumed_from).parent / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_audio_adapters_are_frozen_before_training():
    # E2B/E4B's audio tower gets "all-linear" LoRA too, but image training never runs it
    model = torch.nn.ModuleDict({"audio_tower": torch.nn.Linear(2, 2), "embed_audio": torch.nn.Linear(2, 2),
                                 "language_model": torch.nn.Linear(2, 2)})
    model.requires_grad_(True)
    assert freeze_unused_adapters(model) == 4  # weight and bias of the two audio modules
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["language_model.weight",
                                                                          "language_model.bias"]


def test_fsdp_sharded_lora_weights_are_gathered_whole(tmp_path):
    # FSDP2 on one CPU process (gloo): parameters become DTensors; the saved adapter must hold plain tensors
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # a file store: one process needs no free port
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)),
                               LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
        want = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())
        got = gathered_lora_state(model)
        assert sorted(got) == sorted(want) and len(want) == 4  # A and B of two layers, nothing else
        assert all(type(got[k]) is torch.Tensor and torch.equal(got[k], want[k]) for k in want)
    finally:
        dist.destroy_process_group()


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoints" / ".staging" / "checkpoint-9").mkdir(parents=True)
    assert last_complete_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).write_text("complete\n")
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir()  # in place but unmarked: a kill during its copy
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-3")


def test_publish_folder_copies_when_directory_renames_are_refused(tmp_path, monkeypatch):
    """A bucket mount that refuses directory renames (gcsfuse, flat bucket): the folder is copied, then marked."""
    from helpers import training

    staging, target = tmp_path / "stage", tmp_path / "final"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.bin").write_bytes(b"a")
    (staging / "sub" / "b.json").write_text("{}")
    (target / "old").mkdir(parents=True)  # a previous, unmarked attempt
    real = os.replace

    def refusing(src, dst):
        if Path(src).is_dir():
            raise OSError(errno.ENOTSUP, "directory rename refused")
        return real(src, dst)

    monkeypatch.setattr(training.os, "replace", refusing)
    training.publish_folder(staging, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == \
        sorted([COMPLETE_MARKER, "a.bin", "sub/b.json"])
    assert not staging.exists() and training.is_complete(target)


def test_non_finite_loss_stops_with_the_step_named(tmp_path, tiny_path, tiny_processor, monkeypatch):
    config, data, model, collator = _setup(tiny_path, tiny_processor, max_steps=6)
    from helpers import training

    real = training.labelled_positions_loss
    calls = {"n": 0}

    def poisoned(model, batch, num_items_in_batch=None):
        calls["n"] += 1
        loss = real(model, batch, num_items_in_batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "labelled_positions_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(model, collator, data.examples, config, tmp_path)
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-2")
    assert not (tmp_path / "adapter").exists()


def compiled_layer_count(model) -> int:
    """What compile_layers compiles in the tiny model: each decoder layer and each vision-encoder layer."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return config.text_config.num_hidden_layers + config.vision_config.num_hidden_layers


def test_compile_layers_auto_rule_and_undo(tiny_path, monkeypatch):
    from helpers.modeling import (
        COMPILED_RECOMPILE_LIMIT,
        compile_layers,
        should_compile_layers,
        uncompile_layers,
    )

    assert not should_compile_layers(RunConfig())  # no GPU here: eager
    assert should_compile_layers(RunConfig(compile_layers=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert should_compile_layers(RunConfig())  # bf16 LoRA on a GPU: compiled
    assert not should_compile_layers(RunConfig(quantization="4bit"))  # not measured in 4-bit: eager
    assert not should_compile_layers(RunConfig(gradient_checkpointing=True))
    assert not should_compile_layers(RunConfig(compile_layers=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not should_compile_layers(RunConfig())  # DDP / FSDP: not measured compiled
    monkeypatch.undo()
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    users_own = model.get_base_model().model.embed_vision
    users_own.compile()  # compiled by the user, not by compile_layers: must stay compiled
    layers = compiled_layer_count(model)
    limit = torch._dynamo.config.recompile_limit
    assert compile_layers(model) == layers  # every decoder and vision-encoder layer; compiled lazily, on first call
    # all layers share one code object, so one limit: E4B needed 14 graphs (7 layer kinds x 2 lengths) on an H200
    assert torch._dynamo.config.recompile_limit == max(limit, COMPILED_RECOMPILE_LIMIT) >= 2 * 7
    assert uncompile_layers(model) == layers and uncompile_layers(model) == 0
    assert torch._dynamo.config.recompile_limit == limit
    assert users_own._compiled_call_impl is not None


def test_uncompiling_puts_the_fast_clamps_back(tiny_e_series_path):
    from helpers.clippable import find_clippable_linears
    from helpers.modeling import compile_layers, load_model, uncompile_layers

    model = apply_lora(load_model(tiny_e_series_path))  # fast clamps on (the E-series clips), as load_model gives them

    def fast():
        return sum("forward" in m.__dict__ for m in find_clippable_linears(model).values())

    before = fast()
    assert before > 0
    compile_layers(model)
    assert fast() == 0  # the compiler gets transformers' own forward
    uncompile_layers(model)
    assert fast() == before


def test_eight_bit_optimizer_needs_a_gpu(tmp_path):
    from helpers.config import ConfigError
    from helpers.training import training_arguments

    with pytest.raises(ConfigError, match="optimizer must be one of"):
        RunConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="adamw_8bit.*needs a CUDA GPU"):
        training_arguments(RunConfig(optimizer="adamw_8bit"), tmp_path)


def test_train_leaves_compiled_layers_eager_again(tmp_path, tiny_path, tiny_processor, monkeypatch):
    marked = []

    def mark(module):  # stands in for torch.compile (slow on a CPU): routes calls through a wrapper
        module._compiled_call_impl = module._call_impl
        marked.append(module)

    monkeypatch.setattr(torch.nn.Module, "compile", mark)
    config, data, model, collator = _setup(tiny_path, tiny_processor, max_steps=2, compile_layers=True)
    assert train(model, collator, data.examples, config, tmp_path).global_step == 2
    assert len(marked) == compiled_layer_count(model) and all(layer._compiled_call_impl is None for layer in marked)


def test_dataloader_workers_rule(tmp_path, monkeypatch):
    from helpers import training
    from helpers.config import ConfigError

    assert training.dataloader_worker_count(RunConfig()) == 0  # no GPU here: the collator in the training process
    assert training.dataloader_worker_count(RunConfig(dataloader_workers=3)) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training, "usable_cpus", lambda: 16)
    assert training.dataloader_worker_count(RunConfig()) == training.AUTO_DATALOADER_WORKERS == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 CPUs per training process: 2 workers each
    assert training.dataloader_worker_count(RunConfig()) == 2
    monkeypatch.setattr(training, "usable_cpus", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert training.dataloader_worker_count(RunConfig()) == 0
    assert training.dataloader_worker_count(RunConfig(dataloader_workers=0)) == 0
    with pytest.raises(ConfigError, match="dataloader_workers"):
        RunConfig(dataloader_workers=-1)


def test_worker_processes_collate_the_same_batches(tmp_path, tiny_path, tiny_processor):
    """The collator in a worker process (RunConfig.dataloader_workers) gives the same run as in the training
    process: same batches, same losses; the workers are kept across epochs."""
    losses = {}
    for workers in (0, 1):
        torch.manual_seed(0)
        config, data, model, collator = _setup(tiny_path, tiny_processor, train_size=4, batch_size=2, max_steps=3,
                                               save_steps=100, dataloader_workers=workers)
        args = training_arguments(config, tmp_path / str(workers))
        assert args.dataloader_num_workers == workers and args.dataloader_persistent_workers == (workers > 0)
        result = train(model, collator, data.examples, config, tmp_path / str(workers))
        losses[workers] = [loss for _, loss in result.loss_history]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def _meta_preset(size: str, adapter_dtype: torch.dtype):
    """A published size on the meta device (no memory), one weight made trainable as an adapter would be."""
    from helpers.presets import build_meta_model, preset_config

    model = build_meta_model(preset_config(size))
    model.requires_grad_(False)
    weight = model.get_output_embeddings().weight
    weight.data = weight.data.to(adapter_dtype)
    weight.requires_grad_(True)
    return model


H200_BYTES = 143_771 * 2**20  # what torch reports for an H200 (benchmarks/README.md: 143,771 MiB)


@pytest.mark.parametrize("size,adapter_dtype,settings,gpu_bytes,expected", [
    ("31B", torch.bfloat16, {"quantization": "4bit", "lora_r": 64, "batch_size": 32}, H200_BYTES, (8, 4)),  # measured: 8 fits, 16 OOM
    ("31B", torch.bfloat16, {"quantization": "4bit", "lora_r": 64, "batch_size": 4, "gradient_accumulation": 4},
     H200_BYTES, (8, 2)),  # the README's 4 x 4 on an H200: a larger micro-batch, the same 16 samples a step
    ("E4B", torch.float32, {"lora_r": 64, "batch_size": 32}, H200_BYTES, (32, 1)),  # bf16, compiled (the GPU default): 32 trained
    ("31B", torch.bfloat16, {"quantization": "4bit", "lora_r": 16, "gradient_checkpointing": True, "batch_size": 32},
     24e9, (2, 16)),
])
def test_micro_batch_on_a_gpu_comes_from_the_memory_plan(monkeypatch, size, adapter_dtype, settings, gpu_bytes,
                                                        expected):
    from helpers import training
    from helpers.memory import PLANNER_MARGIN, fits, plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training, "gpu_memory_bytes", lambda: int(gpu_bytes))
    config = RunConfig(**settings)
    micro, accumulation, how = training.planned_batch(_meta_preset(size, adapter_dtype), config)
    assert (micro, accumulation) == expected and "helpers.memory.plan" in how
    assert micro * accumulation == config.batch_size * config.gradient_accumulation  # the step's batch as configured
    kwargs = {"quantization": config.quantization, "lora_r": config.lora_r, "compiled": size == "E4B",
              "lora_dtype": "fp32" if adapter_dtype == torch.float32 else "bf16",
              "gradient_checkpointing": config.gradient_checkpointing}
    assert fits(size, gpu_bytes / 1e9, margin=PLANNER_MARGIN, micro_batch=micro, **kwargs)
    # the next larger divisor of the step's batch would not fit with the margin
    larger = next((d for d in range(micro + 1, micro * accumulation + 1) if (micro * accumulation) % d == 0), None)
    assert larger is None or plan(size, micro_batch=larger, **kwargs)["total"] * (1 + PLANNER_MARGIN) + 1e9 > gpu_bytes


def test_micro_batch_stays_as_configured_on_a_cpu_and_for_other_models(monkeypatch, tiny_path):
    from helpers import training

    config = RunConfig(batch_size=6, gradient_accumulation=2)
    assert training.planned_batch(_meta_preset("31B", torch.bfloat16), config)[:2] == (6, 2)  # no GPU here
    args = training_arguments(config, "/tmp/unused")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (6, 2)  # CPU runs unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training, "gpu_memory_bytes", lambda: H200_BYTES)
    tiny = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path))
    micro, accumulation, how = training.planned_batch(tiny, config)
    assert (micro, accumulation) == (6, 2) and "no memory plan" in how


def _poison_call(monkeypatch, n: int):
    """Make the n-th training loss NaN (counting compute_loss calls from 1)."""
    from helpers import training

    real, calls = training.labelled_positions_loss, {"n": 0}

    def poisoned(model, batch, num_items_in_batch=None):
        calls["n"] += 1
        loss = real(model, batch, num_items_in_batch)
        return loss * float("nan") if calls["n"] == n else loss

    monkeypatch.setattr(training, "labelled_positions_loss", poisoned)


@pytest.mark.parametrize("accumulation,poisoned_call,step,last_checkpoint", [
    (1, 4, 4, "checkpoint-2"),  # a save step: the check comes before the optimizer step and the save
    (2, 3, 2, "checkpoint-1"),  # the first micro-batch of step 2: read before step 2's optimizer step
])
def test_a_non_finite_loss_stops_before_its_optimizer_step(tmp_path, tiny_path, tiny_processor, monkeypatch,
                                                             accumulation, poisoned_call, step, last_checkpoint):
    """The flags are read asynchronously (FiniteLossCheck), yet the run stops in the step of the bad loss: no
    checkpoint of that step, and the weights in memory untouched by it."""
    config, data, model, collator = _setup(tiny_path, tiny_processor, max_steps=6, batch_size=2,
                                           gradient_accumulation=accumulation, save_steps=2 // accumulation)
    _poison_call(monkeypatch, poisoned_call)
    with pytest.raises(NonFiniteLossError, match=f"at step {step};"):
        train(model, collator, data.examples, config, tmp_path)
    assert last_complete_checkpoint(tmp_path).endswith(last_checkpoint)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_a_non_finite_loss_is_caught_before_its_optimizer_step_at_the_latest():
    """FiniteLossCheck reads the flags without waiting (record) and all of them before the optimizer step (check)."""
    from helpers.training import FiniteLossCheck

    watch = FiniteLossCheck("out")
    watch.record(torch.tensor(1.0), step=1)
    watch.record(torch.tensor(float("nan")), step=2)  # read at the next record, or before the optimizer step
    with pytest.raises(NonFiniteLossError, match=r"\(nan\) at step 2"):
        watch.on_pre_optimizer_step(None, None, None)
    assert watch.pending == []
