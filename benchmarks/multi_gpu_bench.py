"""Several GPUs: training samples/s on 1 vs 2 GPUs in one run, scaling efficiency, peak memory per GPU.

Real-shape Gemma 4 (``helpers.teaching.presets``) with random weights (``benchmarks.realshape``): speed and memory
are real, accuracy is not. Each worker trains as ``helpers.launch`` trains a process (``worker``):
``helpers.modeling.apply_lora``, ``helpers.training.training_arguments``, ``helpers.speed.switch_on``, the
adapters image training never runs frozen, ``helpers.training.build_trainer`` (``answer_only_loss`` and the two
callbacks; DDP or FSDP from accelerate), on a synthetic stream shaped like Oxford-IIIT Pet (one 224×224 image ->
256 soft tokens, 2,520 padded patches; a short prompt; a 1-4 token class name). Cases:

- ``E4B-qlora`` and ``31B-qlora``: NF4 QLoRA, one 4-bit copy per GPU, DDP (``torchrun``), weak scaling:
  the same micro-batch per GPU on 1 and 2 GPUs. Target: 2 GPUs >= 1.8x one GPU.
- ``31B-bf16-fsdp``: bf16 LoRA, sharded with FSDP2 (``accelerate launch --config_file
  configs/fsdp_bf16_lora.yaml``) on 2 GPUs; the 1-GPU row is plain bf16 on one GPU (FSDP over one GPU shards
  nothing). Target: it runs on 2 x 80 GB, i.e. the peak per GPU stays under 80 GB.

samples/s = GPUs x micro-batch x accumulation x timed steps / their wall time (the micro-batch and accumulation
as trained: ``switch_on`` plans them for a published size on one GPU; step times from a callback with
``cuda.synchronize``, first steps dropped as warm-up); efficiency = samples/s(2) / (2 x samples/s(1));
peak = ``torch.cuda.max_memory_allocated`` on each rank (reset after the build, before training).

Run from the repository root of a 2-GPU host (workers inherit NCCL_NVLS_ENABLE=0 etc.; this script sets them
when unset):
    python3 -m benchmarks.multi_gpu_bench --out $OUT                       # every case
    python3 -m benchmarks.multi_gpu_bench --cases E4B-qlora --out $OUT     # one case
CPU smoke test of the orchestration (shrunk configs, gloo, FSDP falls back to DDP without GPUs):
    python -m benchmarks.multi_gpu_bench --shrink --cases E4B-qlora --out /tmp/mgb
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.gpu_train_bench import collate_answer_only  # right-pads token tensors, stacks image tensors

REPO = Path(__file__).resolve().parent.parent
FSDP_CONFIG = REPO / "configs" / "fsdp_bf16_lora.yaml"
CASES = {
    "E4B-qlora": {"size": "E4B", "quant": "4bit", "fsdp": False, "mb": 8, "ckpt": False},
    "31B-qlora": {"size": "31B", "quant": "4bit", "fsdp": False, "mb": 4, "ckpt": False},
    "31B-bf16-fsdp": {"size": "31B", "quant": "none", "fsdp": True, "mb": 2, "ckpt": True},
}
# NVLink multicast can take a shared host's GPUs out of service (the device notes): keep it off.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TARGET_SPEEDUP = 1.8
GIB = 2**30


# ----------------------------------------------------------------------------------------------- worker
def synthetic_rows(config, n_unique: int) -> list[dict]:
    """Per-sample tensors (unpadded) from ``benchmarks.realshape.synthetic_batch``."""
    from benchmarks.realshape import synthetic_batch

    batch = synthetic_batch(config, n_unique)
    rows = []
    for i in range(n_unique):
        n = int(batch["attention_mask"][i].sum())
        rows.append({k: v[i, :n] if v.dim() == 2 else v[i] for k, v in batch.items()})  # 2-D: per token
    return rows


def step_timer(progress_path=None):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, the GPU's queue drained at both ends."""

        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            if progress_path is not None and state.is_world_process_zero:  # kept if the run dies later
                peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
                Path(progress_path).write_text(json.dumps({"step_seconds": self.times, "peak_allocated_rank0": peak}))

    return StepTimer()


def build_lora_model(case: dict, shrink: bool, local_rank: int):
    """Real-shape random model on this rank's GPU (on the CPU for FSDP, which shards it), then our LoRA
    (checkpointing is a training argument: ``worker``'s config)."""
    from benchmarks.realshape import build_model, shrunk_config
    from helpers.modeling import apply_lora
    from helpers.teaching.presets import preset_config

    config = shrunk_config(case["size"]) if shrink else preset_config(case["size"])
    on_gpu = torch.cuda.is_available()
    device = f"cuda:{local_rank}" if on_gpu and not case["fsdp"] else "cpu"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    quant = case["quant"] if on_gpu else "none"  # NF4 needs CUDA; the CPU smoke test runs fp32
    # FSDP shards a model that starts on the CPU; its random values are still drawn on the GPU (seconds, not
    # the ~10 minutes the CPU took for the 31B), one module at a time.
    init_device = f"cuda:{local_rank}" if on_gpu else None
    model = build_model(config, quant, device=device, dtype=torch.bfloat16 if on_gpu else torch.float32,
                        init_device=init_device)
    torch.manual_seed(0)  # the same initial adapter on every rank, as the launcher seeds it
    return config, apply_lora(model, r=16, alpha=16)


def worker(name: str, args) -> None:
    """One process of one case: train a few steps as ``helpers.launch.train_on_this_rank`` does (its data
    and adapter saving aside), gather per-rank numbers; rank 0 writes."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from helpers import speed
    from helpers.launch import freeze_unused_adapters, fsdp_launch
    from helpers.run.config import RunConfig
    from helpers.training import TrainResult, build_trainer, training_arguments

    case = CASES[name]
    start = time.perf_counter()
    state = PartialState(cpu=not torch.cuda.is_available())  # the Trainer reuses this process state
    processes = state.num_processes
    config, model = build_lora_model(case, args.shrink, state.local_process_index)
    build_seconds = time.perf_counter() - start
    print(f"rank {state.process_index}: model built in {build_seconds:.1f} s", flush=True)
    steps = args.warmup + args.steps
    n = case["mb"] * args.accumulation * processes * steps
    rows = synthetic_rows(config, min(n, 16))
    # The case's own quantization and checkpointing, and no compiled layers: 1 and 2 GPUs run the same code
    # (compile_layers=None would compile on one process only, and read "none" for the NF4 model).
    run = RunConfig(train_size=n, batch_size=case["mb"], gradient_accumulation=args.accumulation, max_steps=steps,
                    save_steps=10**6, learning_rate=1e-4, output_dir=str(args.run_dir),
                    quantization=case["quant"] if torch.cuda.is_available() else "none",
                    gradient_checkpointing=case["ckpt"], compile_layers=False)
    timer = step_timer(Path(args.result).with_suffix(".progress.json"))
    training_args, switched = speed.switch_on(model, training_arguments(run, args.run_dir), run)
    training_args.ddp_find_unused_parameters = False  # freeze_unused_adapters leaves none without a gradient
    freeze_unused_adapters(model)
    if state.is_main_process:
        print(switched, flush=True)
    trainer = build_trainer(model, training_args, [rows[i % len(rows)] for i in range(n)], collate_answer_only,
                            [timer])
    if training_args.world_size != processes:  # else each process would train alone, and the row would lie
        raise RuntimeError(f"the training arguments see {training_args.world_size} process(es) of the "
                           f"{processes} launched ({training_args.parallel_mode}): no data parallelism")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    speed.switch_off(model)
    result = TrainResult.of(trainer)
    per_rank = gather_object([{"rank": state.process_index, "peak_allocated": result.peak_memory_bytes,
                               "peak_reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None,
                               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}])
    if state.is_main_process:
        timed = timer.times[args.warmup:]
        micro, accumulation = result.micro_batch, result.gradient_accumulation  # as trained
        samples = micro * accumulation * processes * len(timed)
        report = {"case": name, "gpus": processes, "fsdp": fsdp_launch(),  # False: DDP on the CPU
                  "micro_batch": micro, "accumulation": accumulation, "micro_batch_asked": case["mb"],
                  "accumulation_asked": args.accumulation, "build_seconds": build_seconds,
                  "train_seconds": result.wall_seconds, "step_seconds": timer.times,
                  "warmup": args.warmup, "samples_per_second": samples / sum(timed),
                  "median_samples_per_second": samples / len(timed) / statistics.median(timed),
                  "ranks": per_rank, "shrink": args.shrink}
        Path(args.result).write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------------------------- parent
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(name: str, gpus: int, worker_args: list[str]) -> list[str]:
    """torchrun for DDP (and for one process); accelerate launch with the FSDP config for FSDP on 2+ GPUs."""
    module = ["-m", "benchmarks.multi_gpu_bench", "--worker", name, *worker_args]
    if CASES[name]["fsdp"] and gpus > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                "--num_processes", str(gpus), "--main_process_port", str(free_port()), *module]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *module]


def run_case(name: str, gpus: int, args) -> dict:
    """One (case, GPU count) in its own processes; a failure (e.g. out of memory) becomes a row, not a crash."""
    tag = f"{name}-{gpus}gpu"
    result = args.out / f"{tag}.json"
    worker_args = ["--run-dir", str((args.runs or args.out / "runs") / tag), "--result", str(result), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--accumulation", str(args.accumulation)]
    worker_args += ["--shrink"] if args.shrink else []
    env = {**NCCL_SAFE_ENV, **os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    # torchrun would set 1 thread per process: building the 31B's random weights on the CPU (FSDP) then takes
    # minutes. Give each process its share of the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // gpus)) if torch.cuda.is_available() else "1")
    start = time.perf_counter()
    with open(args.out / f"{tag}.log", "w") as log:
        try:
            proc = subprocess.run(launch_command(name, gpus, worker_args), cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=args.case_timeout, check=False)
            status = "ok" if proc.returncode == 0 and result.exists() else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.case_timeout} s"
    row = json.loads(result.read_text()) if status == "ok" else {"case": name, "gpus": gpus}
    row.update(status=status, wall_seconds=time.perf_counter() - start)
    print(f"{tag}: {status}, {row.get('samples_per_second', float('nan')):.2f} samples/s", flush=True)
    return row


def peak_text(row: dict) -> str:
    ranks = row.get("ranks") or []
    return " / ".join(f"{r['peak_allocated'] / GIB:.1f}" for r in ranks if r.get("peak_allocated")) or "-"


HEADER = ("| case | 1 GPU samples/s | 2 GPUs samples/s | speed-up | efficiency | target | speed-up, median steps "
          "| peak GiB 1 GPU | peak GiB per GPU (2) |")


def number(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def target_text(name: str, speedup: float | None, two: dict) -> str:
    """DDP: speed-up >= 1.8x; FSDP: the peak of every GPU under 80 GB (2 x 80 GB cards)."""
    if CASES[name]["fsdp"]:
        peak = max((r["peak_allocated"] for r in two.get("ranks", []) if r.get("peak_allocated")), default=None)
        return "-" if peak is None else ("met" if peak < 80e9 else "missed") + " (< 80 GB per GPU)"
    return "-" if speedup is None else ("met" if speedup >= TARGET_SPEEDUP else "missed") + " (>= 1.8x)"


def median_speedup(one: dict, two: dict) -> str:
    """The speed-up from each row's median step: on a shared host a single 3-5 s step moves the mean."""
    m1, m2 = one.get("median_samples_per_second"), two.get("median_samples_per_second")
    return f"{m2 / m1:.2f}x" if m1 and m2 else "-"


def table(rows: list[dict]) -> str:
    """Markdown: per case, 1 vs 2 GPUs, speed-up, efficiency, peak GiB per GPU (rank 0 / rank 1)."""
    lines = [HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["case"] for r in rows):
        one = next((r for r in rows if r["case"] == name and r["gpus"] == 1), {})
        two = next((r for r in rows if r["case"] == name and r["gpus"] == 2), {})
        s1, s2 = one.get("samples_per_second"), two.get("samples_per_second")
        speedup = s2 / s1 if s1 and s2 else None
        lines.append(f"| {name} | {number(s1, '.2f') if s1 else one.get('status', '-')} "
                     f"| {number(s2, '.2f') if s2 else two.get('status', '-')} | {number(speedup, '.2f')}x "
                     f"| {number(speedup and speedup / 2, '.0%')} | {target_text(name, speedup, two)} "
                     f"| {median_speedup(one, two)} "
                     f"| {peak_text(one)} | {peak_text(two)} |")
    return "\n".join(lines)


def parent(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        print(f"unknown case(s) {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        print("device:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(), flush=True)
    counts = [int(n) for n in args.gpu_counts.split(",")]
    rows = [run_case(name, gpus, args) for name in names for gpus in counts]
    text = table(rows)
    print(text)
    (args.out / "multi_gpu.md").write_text(text + "\n")
    (args.out / "multi_gpu.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multi_gpu_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation per step")
    parser.add_argument("--case-timeout", type=int, default=420, help="seconds per (case, GPU count)")
    parser.add_argument("--shrink", action="store_true", help="shrunk configs: a CPU smoke test")
    parser.add_argument("--gpu-counts", default="1,2", help="GPU counts to run, in this order (e.g. 2,1)")
    parser.add_argument("--runs", type=Path, default=None, help="where the training runs go (default OUT/runs)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
