"""Training throughput and memory on one GPU: the seed's recipe vs our path, side by side, in one run.

Real-shape Gemma 4 (``helpers.presets``) with random weights (``helpers.realshape``): memory and speed are
real, accuracy is not. Every variant trains the same synthetic stream (one 224×224 image per sample at the
default 280-soft-token budget -> 256 soft tokens, 2,520 padded patches; a 12-token prompt; a 1-4 token class
name; labels from the model turn on, as the seed's collator sets them).

Variants (see ``variants_for``):
- ``ref``: the seed's recipe with transformers' ``Trainer`` (TRL 1.16's ``SFTTrainer`` now computes its loss
  with a fused LM head at labelled positions only, which is no longer the seed's full-vocabulary loss; it is
  measured separately as ``ref-trl``): NF4 double quant, bf16 compute and storage, transformers' default skip
  list (the vision tower is quantized); LoRA r=64 α=64 dropout 0.05 all-linear, adapters cast to bf16 as
  TRL does; micro-batch 1 × accumulation 16; activation checkpointing (TRL's default); the model's own loss
  over full-vocabulary logits at every position; AdamW (fused), lr 5e-5, weight decay 0.01, linear schedule,
  10% warm-up, bf16 autocast.
- ``ours-*``: loss at labelled positions only (``helpers.losses.labelled_positions_loss``), LoRA dropout 0,
  SDPA, the largest micro-batch that fits (tried largest first, falling back on out-of-memory), activation
  checkpointing off unless named, NF4 (``helpers.modeling.nf4_config``) or bf16 base, Liger kernels on/off.

MFU: useful FLOPs per sample = 2 × (forward FLOPs of the vision tower, the decoder and ``lm_head`` at the
labelled positions), counted by ``torch.utils.flop_counter.FlopCounterMode`` on one sample: the frozen
base costs one forward and one input-gradient pass of the same size (the "4·N·T" rule; LoRA's own weight
gradients are ignored). HFU adds one more forward when every layer is checkpointed (the recompute). The
ratio is taken against the H200's datasheet dense bf16 peak, 989 TFLOP/s, and also shown against the
~790 TFLOP/s that an 8192³ bf16 matmul reaches on this machine (KINDS.md).

Run: ``python benchmarks/gpu_train_bench.py --sizes E4B,31B --out $OUT`` (``--shrink`` for a CPU smoke test;
``--sizes 12B`` for the encoder-free 12B, whose rows are not measured yet).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.losses import labelled_positions_loss
from helpers.realshape import build_model, reference_nf4_config, shrunk_config, synthetic_batch

PEAK_DATASHEET = 989e12
PEAK_MEASURED = 790e12
GLOBAL_BATCH = 16

# Micro-batch candidates for "the largest that fits", tried in order; first that trains wins.
BEST_MB = {
    ("E2B", "bf16"): (32, 16, 8), ("E4B", "bf16"): (32, 16, 8), ("E4B", "nf4"): (32, 16, 8),
    ("12B", "bf16"): (16, 8, 4), ("12B", "nf4"): (32, 16, 8),  # not measured yet: a first guess, tried in order
    ("26B-A4B", "bf16"): (16, 8, 4), ("26B-A4B", "nf4"): (16, 8, 4),
    ("31B", "bf16"): (8, 4, 2), ("31B", "nf4"): (16, 8, 4),
}


def variants_for(size: str, quick: bool = False) -> list[dict]:
    """The variants of one size, most important first (a deadline skips the tail)."""
    def ours(name, quant, mb, **kw):
        v = {"name": name, "quant": quant, "mb": mb, "ga": None, "ckpt": 0, "dropout": 0.0, "loss": "labelled",
             "lora_dtype": "bf16", "trainer": "trainer", "r": 64, "steps": 3}
        v.update(kw)
        return v

    ref = {"name": "ref", "quant": "ref4", "mb": (1,), "ga": 16, "ckpt": 1, "dropout": 0.05, "loss": "full",
           "lora_dtype": "bf16", "trainer": "trainer", "r": 64, "steps": 2}
    if size == "31B":
        out = [
            ref,
            ours("ours-q-mb1-r64", "nf4", (1,), ga=16, ckpt=1, steps=1),
            ours("ours-q", "nf4", BEST_MB[(size, "nf4")], profile=True),
            ours("ours-bf16", "bf16", BEST_MB[(size, "bf16")]),
            ours("ours-q-mb1-r16", "nf4", (1,), ga=16, ckpt=1, steps=1, r=16),
            ours("ours-q-liger", "nf4", (16, 8), liger=True),
            dict(ref, name="ref-trl", loss="trl", trainer="trl"),
            # the memory target (peak at micro-batch 1): 8-bit AdamW states, and/or the vision tower in NF4
            ours("ours-q-mb1-r16-adam8", "nf4", (1,), ga=4, ckpt=1, steps=2, r=16, optim="adamw_bnb_8bit"),
            ours("ours-qv-mb1-r16", "nf4-towers", (1,), ga=4, ckpt=1, steps=2, r=16),
            ours("ours-qv-mb1-r16-adam8", "nf4-towers", (1,), ga=4, ckpt=1, steps=2, r=16, optim="adamw_bnb_8bit"),
            ours("ours-qv-mb1-r64-adam8", "nf4-towers", (1,), ga=4, ckpt=1, steps=2, r=64, optim="adamw_bnb_8bit"),
            ours("ours-q-mb1-r16-2", "nf4", (1,), ga=4, ckpt=1, steps=2, r=16),
        ]
    elif size == "12B":  # no Liger variant: its Gemma 4 patches target models/gemma4, not gemma4_unified
        out = [
            ref,
            ours("ours-q-mb1-r16", "nf4", (1,), ga=16, ckpt=1, steps=1, r=16),  # peak at micro-batch 1 (QLoRA)
            ours("ours-q", "nf4", BEST_MB[(size, "nf4")], profile=True),
            ours("ours-bf16", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=4),
            ours("ours-bf16-compile", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=5, compile=True),
        ]
    else:
        out = [
            ref,
            ours("ours-bf16", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=4, profile=True),
            ours("ours-bf16-liger", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=4, liger=True),
            ours("ours-q", "nf4", BEST_MB[(size, "nf4")]),
            ours("ours-bf16-ckpt", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", ckpt=1),
            ours("ours-bf16-compile", "bf16", BEST_MB[(size, "bf16")], lora_dtype="fp32", steps=5, compile=True),
            ours("ours-bf16-lora16", "bf16", BEST_MB[(size, "bf16")], steps=4),
        ]
    if quick:
        for v in out:
            v["steps"] = min(v["steps"], 2)
            v["ga"] = min(v["ga"] or 2, 2)
            v["mb"] = tuple(min(m, 2) for m in v["mb"])
    return out


# ----------------------------------------------------------------------------------------------- data
class Rows(torch.utils.data.Dataset):
    """Per-sample tensors (unpadded); ``collate`` right-pads them like the seed's processor call."""

    def __init__(self, batch: dict):
        self.rows = []
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            self.rows.append({k: (v[i, :n] if k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
                                  else v[i]) for k, v in batch.items()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i % len(self.rows)]


def collate(rows: list[dict], pad_id: int = 0) -> dict:
    length = max(r["input_ids"].shape[0] for r in rows)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}
    out = {}
    for key in rows[0]:
        if key in fill:
            t = torch.full((len(rows), length), fill[key], dtype=torch.long)
            for i, r in enumerate(rows):
                t[i, : r[key].shape[0]] = r[key]
            out[key] = t
        else:
            out[key] = torch.stack([r[key] for r in rows])
    return out


# ----------------------------------------------------------------------------------------------- model
def build(size: str, quant: str, shrink: bool, device):
    from helpers.presets import preset_config

    config = shrunk_config(size) if shrink else preset_config(size)
    if quant == "bf16":
        model = build_model(config, "none", device=device)
    elif quant == "ref4":
        model = build_model(config, "4bit", quantization_config=reference_nf4_config(), device=device)
    elif quant == "nf4-towers":  # ours, with the vision tower in NF4 as well (the seed's choice)
        from helpers.modeling import nf4_config

        model = build_model(config, "4bit", quantization_config=nf4_config(quantize_towers=True), device=device)
    else:
        model = build_model(config, "4bit", device=device)
    from helpers.clippable import set_clip_bounds

    # Released E2B/E4B carry finite learned bounds; random init leaves ±inf. Finite (and wide, so they
    # do not change the numbers) keeps every clamp's cost in the measurement, stock or fast.
    set_clip_bounds(model, 1e4, 1e4)
    return model


def add_lora(model, v: dict):
    """LoRA all-linear on a frozen base; activation checkpointing as the variant says.

    Not ``prepare_model_for_kbit_training``: it casts every non-4-bit parameter to fp32 (the 31B's 1.4B
    embedding parameters, the 26B-A4B's 22.8B expert parameters), which the seed's TRL does not do either.
    """
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    if v["ckpt"] and v["loss"] != "full":
        model.activation_checkpointing_enable(every_n_layers=v["ckpt"])
    if v["ckpt"]:
        model.enable_input_require_grads()  # as TRL does; the Trainer turns checkpointing on for `ref`
    config = LoraConfig(r=v["r"], lora_alpha=v["r"], lora_dropout=v["dropout"], target_modules="all-linear",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if v.get("compile"):
        from helpers.modeling import compile_layers

        compile_layers(model)  # what train() does for bf16 LoRA on one GPU (stock clamps, fused)
    elif v["name"].startswith("ours"):
        from helpers.fast_clamps import use_fast_clamps

        use_fast_clamps(model)  # what load_model() does
    if v["lora_dtype"] == "bf16":
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model


def training_args(v: dict, mb: int, ga: int, out_dir: str, cpu: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=mb, gradient_accumulation_steps=ga,
        max_steps=v["steps"], learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="linear",
        warmup_steps=0.1, logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none",
        bf16=not cpu, use_cpu=cpu, remove_unused_columns=False, dataloader_num_workers=0,
        activation_checkpointing=bool(v["ckpt"]) and v["loss"] == "full",
        optim=v.get("optim") or ("adamw_torch_fused" if not cpu else "adamw_torch"), seed=0, disable_tqdm=True,
    )


def make_trainer(model, v, rows, mb, ga, out_dir, cpu, timer):
    from transformers import Trainer

    if v["trainer"] == "trl":
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=mb, gradient_accumulation_steps=ga,
            max_steps=v["steps"], learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="linear",
            warmup_steps=0.1, logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none",
            bf16=not cpu, use_cpu=cpu, max_length=1024, dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
        )
        peft_config = LoraConfig(r=v["r"], lora_alpha=v["r"], lora_dropout=v["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        from datasets import Dataset

        from helpers.tiny import build_tokenizer

        # SFTTrainer wants a datasets.Dataset: an index column, and a collator that looks the rows up
        # (the seed's collator runs the processor; ours hands over the same pre-built tensors)
        index = Dataset.from_dict({"idx": list(range(len(rows)))})
        return SFTTrainer(model=model, args=args, train_dataset=index, peft_config=peft_config,
                          processing_class=build_tokenizer(),
                          data_collator=lambda items: collate([rows[it["idx"]] for it in items]),
                          callbacks=[timer])

    args = training_args(v, mb, ga, out_dir, cpu)
    if v["loss"] == "full":
        class FullLogitsTrainer(Trainer):
            """The model's own loss: logits over the whole vocabulary at every position (the seed's)."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs = dict(inputs, use_cache=False)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        return FullLogitsTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                                 callbacks=[timer])

    class LabelledLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = labelled_positions_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return LabelledLossTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                               callbacks=[timer])


def make_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kw):
            self._sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self._sync()
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


# ----------------------------------------------------------------------------------------------- FLOPs
def forward_flops(model, batch) -> int:
    """FLOPs of one forward through vision tower, decoder and lm_head at the labelled positions.

    Every matmul of the model goes through ``F.linear`` (``nn.Linear``, LoRA, the MoE experts), a
    bitsandbytes ``Linear4bit`` (one custom op: counted with a hook) or SDPA (4·B·H·Lq·Lk·D, the whole
    square, masks ignored): all three are counted; elementwise work is not.
    """
    import torch.nn.functional as F

    total = [0]
    linear, sdpa = F.linear, F.scaled_dot_product_attention

    inside_4bit = [0]

    def counting_linear(x, weight, bias=None):
        if not inside_4bit[0]:  # a 4-bit layer's own dequantize + F.linear is counted by its hook
            total[0] += 2 * (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1]
        return linear(x, weight, bias)

    def pre_hook(mod, args):
        inside_4bit[0] += 1

    def counting_sdpa(q, k, v, *args, **kwargs):
        total[0] += 4 * q.numel() // q.shape[-1] * k.shape[-2] * q.shape[-1]
        return sdpa(q, k, v, *args, **kwargs)

    def hook(mod, args, _out):
        inside_4bit[0] -= 1
        total[0] += 2 * (args[0].numel() // mod.in_features) * mod.in_features * mod.out_features

    dev = next(p.device for p in model.parameters() if not p.is_meta)
    batch = {k: v.to(dev) for k, v in batch.items()}
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    hooks = []
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            hooks += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook)]
    F.linear, F.scaled_dot_product_attention = counting_linear, counting_sdpa
    try:
        with torch.no_grad(), ctx:
            labelled_positions_loss(model, batch)
    finally:
        F.linear, F.scaled_dot_product_attention = linear, sdpa
        for h in hooks:
            h.remove()
    return total[0]


def profile_step(model, v, rows, mb, out_path: Path, top: int = 12) -> list[tuple[str, float]]:
    """One forward+backward of the variant under torch.profiler; the top ops by self device time."""
    from torch.profiler import ProfilerActivity, profile

    batch = {k: t.cuda() for k, t in collate([rows[i] for i in range(mb)]).items()}
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = labelled_positions_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    out_path.write_text(table)
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    return [(e.key[:60], round(100 * getattr(e, "self_device_time_total", 0) / total, 1)) for e in events[:top]]


# ----------------------------------------------------------------------------------------------- run
def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(size, v, rows, args, flops_cache, out_dir: Path) -> dict:
    cpu = not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    result = {"size": size, "variant": v["name"], "quant": v["quant"], "r": v["r"], "ckpt": v["ckpt"], "loss": v["loss"],
                  "dropout": v["dropout"], "liger": bool(v.get("liger"))}
    restore = None
    for mb in v["mb"]:
        ga = v["ga"] if v["ga"] else max(1, GLOBAL_BATCH // mb)
        model = trainer = None
        cleanup()
        try:
            if v.get("liger"):
                restore = patch_liger()
            t_build = time.perf_counter()
            model = build(size, v["quant"], args.shrink, device)
            result["build_s"] = round(time.perf_counter() - t_build, 1)
            result["weights_bytes"] = torch.cuda.memory_allocated() if not cpu else None
            if size not in flops_cache:
                flops_cache[size] = forward_flops(model, collate([rows[0]]))
            if v["trainer"] != "trl":
                model = add_lora(model, v)
            timer = make_timer()
            if not cpu:
                torch.cuda.reset_peak_memory_stats()
            trainer = make_trainer(model, v, rows, mb, ga, "/tmp/gpu_train_bench_trainer", cpu, timer)
            if v["trainer"] == "trl":
                trained = trainer.model
                for p in trained.parameters():
                    if p.requires_grad:
                        result["lora_dtype"] = str(p.dtype)
                        break
            t0 = time.perf_counter()
            trainer.train()
            result["train_s"] = round(time.perf_counter() - t0, 1)
            times = timer.times[1:] or timer.times
            step_s = statistics.median(times)
            result.update(mb=mb, ga=ga, status="ok", step_s=round(step_s, 3), step_times=[round(t, 3) for t in timer.times],
                          samples_per_s=round(mb * ga / step_s, 3))
            if not cpu:
                result["peak_alloc"] = torch.cuda.max_memory_allocated()
                result["peak_reserved"] = torch.cuda.max_memory_reserved()
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            result["trainable"] = trainable
            if v.get("profile") and not cpu and args.profile:
                try:
                    result["profile_top"] = profile_step(trainer.model, v, rows, mb,
                                                         out_dir / f"profile_{size}_{v['name']}.txt")
                except Exception as err:  # noqa: BLE001
                    result["profile_error"] = repr(err)[:200]
            break
        except torch.OutOfMemoryError as err:
            result.update(mb=mb, status="OOM", error=str(err)[:160])
            print(f"  {size} {v['name']} mb={mb}: out of memory, trying a smaller micro-batch", flush=True)
        except Exception as err:  # noqa: BLE001
            result.update(mb=mb, status="error", error=repr(err)[:300])
            traceback.print_exc()
            break
        finally:
            del model, trainer
            if restore:
                restore()
                restore = None
            cleanup()
    flops = flops_cache.get(size)
    if flops and result.get("status") == "ok":
        useful = 2 * flops
        result["fwd_flops_per_sample"] = flops
        result["useful_tflops_per_s"] = round(useful * result["samples_per_s"] / 1e12, 1)
        result["mfu_989"] = round(useful * result["samples_per_s"] / PEAK_DATASHEET, 4)
        result["mfu_790"] = round(useful * result["samples_per_s"] / PEAK_MEASURED, 4)
        hardware = useful + (flops if v["ckpt"] == 1 else 0)
        result["hfu_989"] = round(hardware * result["samples_per_s"] / PEAK_DATASHEET, 4)
    return result


def patch_liger():
    """Liger's Gemma 4 RMSNorm and GeGLU (class-level, as liger does); returns an undo function."""
    from transformers.models.gemma4 import modeling_gemma4 as mg

    saved = (mg.Gemma4RMSNorm, mg.Gemma4TextMLP)
    from liger_kernel.transformers import apply_liger_kernel_to_gemma4

    apply_liger_kernel_to_gemma4(rms_norm=True, geglu=True, fused_linear_cross_entropy=False, cross_entropy=False)

    def restore():
        mg.Gemma4RMSNorm, mg.Gemma4TextMLP = saved

    return restore


def gib(x):
    return f"{x / 2**30:.1f}" if x else "-"


def print_table(results: list[dict]) -> str:
    lines = ["size     variant           q    r  mb×ga  ckpt  samp/s  ×ref   alloc GiB  resv GiB  MFU%989  MFU%790  status"]
    ref = {r["size"]: r.get("samples_per_s") for r in results if r["variant"] == "ref"}
    for r in results:
        sps = r.get("samples_per_s")
        ratio = f"{sps / ref[r['size']]:.2f}" if sps and ref.get(r["size"]) else "-"
        lines.append(
            f"{r['size']:<8} {r['variant']:<17} {r['quant']:<4} {r['r']:>2} {str(r.get('mb'))+'×'+str(r.get('ga')):>6} "
            f"{r['ckpt']:>4}  {sps if sps else '-':>6}  {ratio:>4}   {gib(r.get('peak_alloc')):>8}  "
            f"{gib(r.get('peak_reserved')):>8}  {100 * r.get('mfu_989', 0):>7.1f}  {100 * r.get('mfu_790', 0):>7.1f}  "
            f"{r.get('status')}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="E4B,31B")
    parser.add_argument("--variants", default="", help="comma-separated names to keep (default all)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--shrink", action="store_true", help="shrunk configs (CPU smoke test)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts and micro-batches")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="skip variants once this is passed")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--flops-sizes", default="", help="also count forward FLOPs of these sizes")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from helpers.presets import preset_config

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    import peft
    import transformers
    env.update(transformers=transformers.__version__, peft=peft.__version__)
    try:
        import bitsandbytes
        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    print(json.dumps(env), flush=True)
    results, flops_cache = [], {}
    keep = set(filter(None, args.variants.split(",")))
    for size in args.sizes.split(","):
        config = shrunk_config(size) if args.shrink else preset_config(size)
        rows = Rows(synthetic_batch(config, args.samples))
        for v in variants_for(size, args.quick):
            if keep and v["name"] not in keep and f"{size}:{v['name']}" not in keep and f"{size}:*" not in keep:
                continue
            if time.perf_counter() - start > args.deadline_s:
                results.append({"size": size, "variant": v["name"], "quant": v["quant"], "r": v["r"], "ckpt": v["ckpt"],
                                    "status": "skipped (deadline)"})
                continue
            t = time.perf_counter()
            r = run_variant(size, v, rows, args, flops_cache, out_dir)
            r["wall_s"] = round(time.perf_counter() - t, 1)
            results.append(r)
            print(json.dumps({k: r.get(k) for k in ("size", "variant", "mb", "ga", "status", "samples_per_s",
                                                     "peak_alloc", "mfu_989", "wall_s", "error")}), flush=True)
            (out_dir / "train_results.json").write_text(json.dumps({"env": env, "results": results,
                                                                         "fwd_flops_per_sample": flops_cache}, indent=1))
    for size in filter(None, args.flops_sizes.split(",")):
        if size not in flops_cache:  # FLOPs only (no training): to put MFU on rows measured in another run
            config = shrunk_config(size) if args.shrink else preset_config(size)
            model = build(size, "nf4", args.shrink, "cuda" if torch.cuda.is_available() else "cpu")
            flops_cache[size] = forward_flops(model, collate([Rows(synthetic_batch(config, 1))[0]]))
            del model
            cleanup()
    print("forward FLOPs per sample:", json.dumps(flops_cache), flush=True)
    (out_dir / "train_results.json").write_text(json.dumps({"env": env, "results": results,
                                                             "fwd_flops_per_sample": flops_cache}, indent=1))
    print_table(results)
    return results


if __name__ == "__main__":
    main()
