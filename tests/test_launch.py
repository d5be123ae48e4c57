"""helpers.launch: two processes on the gloo backend (torchrun, CPU) train the tiny model like one process.

What a rank that skipped DDP's gradient sync would break (it did: the loss once called ``lm_head``
outside the DDP forward), the tests check: both ranks end with the same adapter; two ranks of batch 2,
stopped after step 2 and resumed, equal one process of batch 4 run straight through (global
labelled-token mean, per-rank RNG and data position restored); metrics cover every held-out example once.
Each process start costs ~15 s of imports on a busy two-core machine, so there are two torchrun launches
and the one-process run is in-process (the same ``main()`` that ``python -m helpers.launch`` calls).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from helpers.launch import main as launch_main

STEPS = ["-p", "train_size", "16", "-p", "eval_size", "8", "-p", "save_steps", "2", "-p", "learning_rate", "0.002"]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_args(out, tiny_path, batch_size: int, max_steps: int, *extra) -> list[str]:
    return ["--output-dir", str(out), "--model-id", str(tiny_path), *STEPS, "-p", "batch_size", str(batch_size),
            "-p", "max_steps", str(max_steps), "--dump-rank-weights", *extra]


def torchrun(out, tiny_path, batch_size: int, max_steps: int, *extra) -> subprocess.CompletedProcess:
    """The launcher as a user runs it on several GPUs, here two CPU processes (gloo)."""
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "helpers.launch",
            *launcher_args(out, tiny_path, batch_size, max_steps, *extra)]
    # one thread per process: two ranks on a busy two-core machine are slower with more
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def lora(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_path):
    """Two ranks, batch 2 each: two steps (checkpoint-2), then the same command with three steps resumes."""
    out = tmp_path_factory.mktemp("two-ranks")
    torchrun(out, tiny_path, 2, 2, "--skip-eval")
    torchrun(out, tiny_path, 2, 3)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun does per process; more threads are slower on a busy machine
    try:
        assert launch_main(launcher_args(out, tiny_path, 4, 3)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_both_ranks_end_with_the_same_adapter(two_ranks):
    rank0, rank1 = lora(two_ranks / "rank0_lora.pt"), lora(two_ranks / "rank1_lora.pt")
    assert rank0.keys() == rank1.keys() and any("vision_tower" in name for name in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_two_ranks_of_two_equal_one_process_of_four(two_ranks, one_process):
    """Same global batch, same data order: the same losses and weights (a per-rank mean or a missing
    gradient sync would not give this)."""
    two, one = lora(two_ranks / "rank0_lora.pt"), lora(one_process / "rank0_lora.pt")
    assert any(not torch.equal(t, torch.zeros_like(t)) for name, t in two.items() if "lora_B" in name)
    for name in two:
        assert torch.allclose(two[name], one[name], atol=1e-4, rtol=1e-3), name
    losses = [json.loads((d / "train_result.json").read_text())["train"]["loss_history"] for d in (two_ranks, one_process)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [1, 2, 3]
    assert [loss for _, loss in losses[0]] == pytest.approx([loss for _, loss in losses[1]], rel=1e-4)


def test_metrics_cover_every_example_once(two_ranks, one_process):
    report = json.loads((two_ranks / "metrics.json").read_text())
    assert report["processes"] == 2 and report["summary"]["n_eval"] == 8
    assert report["summary"]["n_skipped"] == 0 and report["skipped"]["test"]["kept"] == 8
    assert [row["index"] for row in report["predictions"]] == list(range(8))
    assert {row["rank"] for row in report["predictions"]} == {0, 1}
    single = json.loads((one_process / "metrics.json").read_text())
    assert single["processes"] == 1 and single["summary"]["n_eval"] == 8
    assert {row["rank"] for row in single["predictions"]} == {0}


def test_checkpoint_written_once_with_every_rank_state(two_ranks):
    checkpoint = two_ranks / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "COMPLETE").exists()
    assert (two_ranks / "adapter" / "adapter_model.safetensors").exists()
    assert not (two_ranks / "adapter.tmp").exists()


def test_rerun_resumed_from_the_checkpoint(two_ranks):
    result = json.loads((two_ranks / "train_result.json").read_text())["train"]
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 3


def test_a_finished_run_launched_again_keeps_its_training_record(one_process, tiny_path, capsys):
    before = json.loads((one_process / "train_result.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert launch_main(launcher_args(one_process, tiny_path, 4, 3, "--skip-eval")) == 0
    finally:
        torch.set_num_threads(threads)
    assert "trained no step (the run had finished at step 3): its training record is kept" in capsys.readouterr().out
    assert json.loads((one_process / "train_result.json").read_text()) == before


def test_bad_parameter_fails_before_any_process_work(capsys):
    assert launch_main(["-p", "lora_rank", "8"]) == 2
    assert "lora_rank" in capsys.readouterr().err


def test_audio_adapters_are_frozen_before_training():
    # E2B/E4B's audio tower gets "all-linear" LoRA too, but image training never runs it
    from helpers.launch import freeze_unused_adapters

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

    from helpers.launch import gathered_lora_state

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
