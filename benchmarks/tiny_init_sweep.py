"""Why the tiny offline Gemma 4 is initialised the way it is: a learning sweep over init and LoRA settings.

A random model learns the digits only if the image reaches the answer position and the answer's logits can grow;
the scales transformers initialises a model with (meant to be overwritten by a checkpoint) allow neither. Each
run builds the tiny checkpoint with one seed, then sets the scales under study: the (tied) token embeddings, the
q/k norm scales (``qk``) and the vision position table (``pos_std``). Every variant sets the last two itself:
``BASE`` has transformers' own (norms at ones, i.e. ``qk = 32**0.25``; positions redrawn at std 0.02), so each
variant stays reproducible whatever ``helpers.tiny`` builds (it builds the scales of the ``v3_1l_pos2_*``
variants: embeddings at std 1/sqrt(width), ``qk`` 1, positions at std 0.2).
It wraps the model with LoRA all-linear and trains on 1,000 digits (``train_size`` None: all 1,347) with the
shipped loss (logits at the answer's positions, ``helpers.training.answer_only_loss``), printing held-out
accuracy (constrained: the argmax over the ten single-token class names) every ``--eval-every`` steps. Batches
are collated once up front with the real collator, so the loop measures learning, not image preprocessing.

From the repository root:

    python -m benchmarks.tiny_init_sweep --variants main qk1_pos1 --seeds 0 1 2 --steps 516 --parallel 2

Runs on the CPU or, much faster for a sweep, on a GPU (``--device cuda``); the learning curves per
step are the same computation either way (float32). Results: benchmarks/README.md, by variant name.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASE = {"emb_std": None, "lr": 2e-3, "r": 16, "alpha": 16, "batch": 32, "train_size": 1000, "augment": False,
        "dropout": 0.0, "patch_std": None, "soft_token_std": None, "vision_post_norm": None, "text_post_norm": None,
        "answer_tokens": False, "vision_layers": 2, "rslora": False, "loraplus": None, "warmup": 10,
        "text_hidden": 64, "vision_hidden": 64, "vision_heads": 2, "qk": 32 ** 0.25, "pos_std": 0.02}  # qk, pos_std: transformers' scales
VARIANTS = {  # name: the settings that differ from BASE (emb_std None keeps transformers' 0.02)
    "base": {},
    "emb125": {"emb_std": 0.125},
    "emb125_lr4": {"emb_std": 0.125, "lr": 4e-3},
    "emb125_lr1": {"emb_std": 0.125, "lr": 1e-3},
    "emb125_a32": {"emb_std": 0.125, "alpha": 32},
    "emb125_bs16": {"emb_std": 0.125, "batch": 16},
    "emb25": {"emb_std": 0.25},
    "emb06": {"emb_std": 0.0625},
    # more data, one-pixel-shift augmentation, LoRA dropout
    "e125_lr1_all": {"emb_std": 0.125, "lr": 1e-3, "train_size": None},
    "e125_lr1_all_do": {"emb_std": 0.125, "lr": 1e-3, "train_size": None, "dropout": 0.1},
    "e125_lr1_aug": {"emb_std": 0.125, "lr": 1e-3, "train_size": None, "augment": True},
    "e125_lr2_aug": {"emb_std": 0.125, "lr": 2e-3, "train_size": None, "augment": True},
    "e125_lr1_aug_do": {"emb_std": 0.125, "lr": 1e-3, "train_size": None, "augment": True, "dropout": 0.1},
    "e25_lr1_aug": {"emb_std": 0.25, "lr": 1e-3, "train_size": None, "augment": True},
    "e06_lr1_aug": {"emb_std": 0.0625, "lr": 1e-3, "train_size": None, "augment": True},
    "e125_lr1_aug_r8": {"emb_std": 0.125, "lr": 1e-3, "train_size": None, "augment": True, "r": 8, "alpha": 8},
    "e125_lr2_aug_bs64": {"emb_std": 0.125, "lr": 2e-3, "train_size": None, "augment": True, "batch": 64},
    "e125_lr15_aug_do05": {"emb_std": 0.125, "lr": 1.5e-3, "train_size": None, "augment": True, "dropout": 0.05},
    # keep the pixels visible through the sandwich norms (patch embedding and soft-token scale)
    "fix": {"emb_std": 0.125, "patch_std": 0.5, "soft_token_std": 0.125},
    "fix_lr1": {"emb_std": 0.125, "patch_std": 0.5, "soft_token_std": 0.125, "lr": 1e-3},
    "fix_patch": {"emb_std": 0.125, "patch_std": 0.5},
    # a quieter residual branch (post-norm weights) so each patch keeps its identity
    "patch_lr1": {"emb_std": 0.125, "patch_std": 0.5, "lr": 1e-3, "train_size": None},
    "patch_lr2": {"emb_std": 0.125, "patch_std": 0.5, "lr": 2e-3, "train_size": None},
    "vpost25_lr1": {"emb_std": 0.125, "vision_post_norm": 0.25, "lr": 1e-3, "train_size": None},
    "vpost25_patch_lr1": {"emb_std": 0.125, "vision_post_norm": 0.25, "patch_std": 0.5, "lr": 1e-3,
                          "train_size": None},
    "allpost25_lr1": {"emb_std": 0.125, "vision_post_norm": 0.25, "text_post_norm": 0.25, "lr": 1e-3,
                      "train_size": None},
    # also train the (tied) embedding rows of the answer tokens
    "tti_lr1": {"emb_std": 0.125, "lr": 1e-3, "train_size": None, "answer_tokens": True},
    "tti_lr2": {"emb_std": 0.125, "lr": 2e-3, "train_size": None, "answer_tokens": True},
    # one vision layer (half the CPU step) with the recipe of "main"
    "v1_lr1_all": {"emb_std": 0.125, "lr": 1e-3, "train_size": None, "vision_layers": 1},
    "v2_lr1_all": {"emb_std": 0.125, "lr": 1e-3, "train_size": None, "vision_layers": 2},
    "allpost25_lr2": {"emb_std": 0.125, "vision_post_norm": 0.25, "text_post_norm": 0.25, "lr": 2e-3,
                      "train_size": None},
}
# at 516 steps of 32 (12 epochs of the 1,347 digits), around the recipe "main": rank, LoRA+, rsLoRA, the answer
# tokens' embedding rows, warm-up
MAIN = {"emb_std": 0.125, "lr": 1e-3, "train_size": None}
VARIANTS.update({
    "main": MAIN,
    "main_r64": {**MAIN, "r": 64, "alpha": 64},
    "main_r64_lr5": {**MAIN, "r": 64, "alpha": 64, "lr": 5e-4},
    "main_lr15": {**MAIN, "lr": 1.5e-3},
    "main_tti": {**MAIN, "answer_tokens": True},
    "main_tti_r64": {**MAIN, "answer_tokens": True, "r": 64, "alpha": 64},
    "main_lp4": {**MAIN, "loraplus": 4},
    "main_lp16": {**MAIN, "loraplus": 16},
    "main_lp16_lr5": {**MAIN, "loraplus": 16, "lr": 5e-4},
    "main_rs_r64": {**MAIN, "r": 64, "alpha": 16, "rslora": True},
    "main_lr2_w50": {**MAIN, "lr": 2e-3, "warmup": 50},
})
# around a higher rate with a longer warm-up (lr 2e-3, 50 steps)
VARIANTS.update({
    "lr2_w50": {**MAIN, "lr": 2e-3, "warmup": 50},
    "lr2_w100": {**MAIN, "lr": 2e-3, "warmup": 100},
    "lr3_w100": {**MAIN, "lr": 3e-3, "warmup": 100},
    "lr3_w50": {**MAIN, "lr": 3e-3, "warmup": 50},
    "lr15_w50": {**MAIN, "lr": 1.5e-3, "warmup": 50},
    "lr25_w75": {**MAIN, "lr": 2.5e-3, "warmup": 75},
    "lr2_w50_tti": {**MAIN, "lr": 2e-3, "warmup": 50, "answer_tokens": True},
    "lr2_w50_a32": {**MAIN, "lr": 2e-3, "warmup": 50, "alpha": 32},
    "lr2_w50_s650": {**MAIN, "lr": 2e-3, "warmup": 50, "steps": 650},
    "lr2_w50_s800": {**MAIN, "lr": 2e-3, "warmup": 50, "steps": 800},
})
# a wider text model (128: the last position's state is 64 numbers at the default), and one vision layer with
# the steps its faster CPU step buys (text 64: ~1.4x; text 128 + one layer vs text 128: ~1.4x)
T128 = {**MAIN, "text_hidden": 128, "emb_std": 128 ** -0.5}
VARIANTS.update({
    "t128": T128,
    "t128_lr2_w50": {**T128, "lr": 2e-3, "warmup": 50},
    "t128_lr15_w50": {**T128, "lr": 1.5e-3, "warmup": 50},
    "t128_tti": {**T128, "answer_tokens": True},
    "t128_lr2_w50_tti": {**T128, "lr": 2e-3, "warmup": 50, "answer_tokens": True},
    "t128_r32": {**T128, "r": 32, "alpha": 32},
    "t128_v1_lr2_w50_s700": {**T128, "lr": 2e-3, "warmup": 50, "vision_layers": 1, "steps": 700},
    "v1_lr2_w50_s700": {**MAIN, "lr": 2e-3, "warmup": 50, "vision_layers": 1, "steps": 700},
    "v1_lr1_s700": {**MAIN, "vision_layers": 1, "steps": 700},
})

# attention temperature: Gemma 4 scales attention logits by 1.0 and relies on learned q/k norm scales; at ones
# the logits have std sqrt(head_dim) = 5.7 and attention piles onto a few tokens. "qk" sets both norm scales to
# qk * head_dim**-0.25 (qk 1: the usual 1/sqrt(head_dim) temperature); "pos_std" redraws the vision positions.
VARIANTS.update({
    "qk1": {**MAIN, "qk": 1.0},
    "qk07": {**MAIN, "qk": 0.7},
    "qk14": {**MAIN, "qk": 1.4},
    "qk1_lr2_w50": {**MAIN, "qk": 1.0, "lr": 2e-3, "warmup": 50},
    "qk1_lr5": {**MAIN, "qk": 1.0, "lr": 5e-4},
    "qk1_pos1": {**MAIN, "qk": 1.0, "pos_std": 0.1},
    "pos3": {**MAIN, "pos_std": 0.3},
    "qk1_r64_lr5": {**MAIN, "qk": 1.0, "r": 64, "alpha": 64, "lr": 5e-4},
})
# around qk 1 with the vision positions at std 0.1 (QK1_POS1), more seeds: the scales helpers.tiny sets
# (scale_attention_norms; reinit_vision_positions, at 0.2 for its 8-pixel patches)
QK1_POS1 = {**MAIN, "qk": 1.0, "pos_std": 0.1}
VARIANTS.update({
    "qk1_pos3": {**MAIN, "qk": 1.0, "pos_std": 0.3},
    "qk1_pos05": {**MAIN, "qk": 1.0, "pos_std": 0.05},
    "qk1_pos1_lr2_w50": {**QK1_POS1, "lr": 2e-3, "warmup": 50},
    "qk14_pos1": {**QK1_POS1, "qk": 1.4},
})
# fewer epochs (43 steps of 32 per epoch), for the main job's time budget on 2 CPU cores
VARIANTS.update({
    "e8": {**QK1_POS1, "steps": 344},
    "e10": {**QK1_POS1, "steps": 430},
    "lr2_w50_e6": {**QK1_POS1, "lr": 2e-3, "warmup": 50, "steps": 258},
    "lr2_w50_e8": {**QK1_POS1, "lr": 2e-3, "warmup": 50, "steps": 344},
    "lr2_w50_e10": {**QK1_POS1, "lr": 2e-3, "warmup": 50, "steps": 430},
    "lr15_w30_e8": {**QK1_POS1, "lr": 1.5e-3, "warmup": 30, "steps": 344},
})

# the tiny model's present shapes (released chat templates, Gemma-style tokenizer, pooling 3 at patch 8 so 630
# patches per image, a 64-wide full-attention head): the recipe's learning, fewer steps (the CPU step is
# slower), and a narrower or shallower vision tower
V3 = {**QK1_POS1, "lr": 1.5e-3, "warmup": 30, "train_size": None}
VARIANTS.update({
    "v3_e8": {**V3, "steps": 344},
    "v3_e6": {**V3, "steps": 258},
    "v3_1l_e8": {**V3, "vision_layers": 1, "steps": 344},
    "v3_1l_e6": {**V3, "vision_layers": 1, "steps": 258},
    "v3_1l_e5": {**V3, "vision_layers": 1, "steps": 215},
    "v3_1l_lr2_e6": {**V3, "vision_layers": 1, "lr": 2e-3, "steps": 258},
    "v3_1l_vh32_e8": {**V3, "vision_layers": 1, "vision_hidden": 32, "steps": 344},
    "v3_1l_vh32_e6": {**V3, "vision_layers": 1, "vision_hidden": 32, "steps": 258},
    "v3_1l_vh32_lr2_e6": {**V3, "vision_layers": 1, "vision_hidden": 32, "lr": 2e-3, "steps": 258},
    "v3_1l_h1_e8": {**V3, "vision_layers": 1, "vision_heads": 1, "steps": 344},
    # patch 8 gives 192 pixel values per patch (48 at patch 4): the pixels' projection is ~2x larger, so the
    # positions at std 0.2 keep the ratio that std 0.1 had
    "v3_1l_pos2_e8": {**V3, "vision_layers": 1, "pos_std": 0.2, "steps": 344},
    "v3_1l_h1_pos2_e10": {**V3, "vision_layers": 1, "vision_heads": 1, "pos_std": 0.2, "steps": 430},
    "v3_1l_th128_e8": {**V3, "vision_layers": 1, "text_hidden": 128, "emb_std": 128 ** -0.5, "steps": 344},
    "v3_1l_h1_th128_e8": {**V3, "vision_layers": 1, "vision_heads": 1, "text_hidden": 128, "emb_std": 128 ** -0.5,
                          "steps": 344},
})

# One-pixel shifts of an 8x8 digit (dy, dx): the sweep's augmentation (variants with "augment")
ONE_PIXEL_SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def shift_digit(image, dy: int, dx: int):
    """A digit image (``helpers.data.digit_image``: an 8x8 digit upscaled by nearest neighbour, white on black)
    moved by (dy, dx) of its 8x8 pixels, black where it moved away from (no wrap-around): the same image as
    shifting the 8x8 digit before upscaling."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image)
    step = pixels.shape[0] // 8  # image pixels per digit pixel
    dy, dx = dy * step, dx * step
    height, width = pixels.shape[:2]
    out = np.zeros_like(pixels)
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        pixels[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return Image.fromarray(out)


def with_shifted_copies(examples: list[dict]) -> list[dict]:
    """The training digits, then four copies of each moved by one pixel (``ONE_PIXEL_SHIFTS``), shift by shift.
    Only ever the training split: the held-out digits stay as they are."""
    return examples + [{**example, "image": shift_digit(example["image"], dy, dx)}
                       for dy, dx in ONE_PIXEL_SHIFTS for example in examples]


def run_one(variant: str, seed: int, steps: int, eval_every: int, device: str, test_size: int | None = 300) -> list[dict]:
    import torch

    from benchmarks.realshape import answer_loss
    from helpers.collator import VisionChatCollator
    from helpers.data import load_digits_examples, load_examples
    from helpers.modeling import apply_lora, load_model, load_processor, unwrap_gemma4
    from helpers.scoring import softcapped_logits
    from helpers.tiny import build_tiny_gemma4, reinit_vision_positions, scale_attention_norms

    settings = {**BASE, **VARIANTS[variant]}
    steps = settings.get("steps", steps)
    emb_std, lr, batch_size = settings["emb_std"], settings["lr"], settings["batch"]
    torch.manual_seed(seed)
    path = build_tiny_gemma4(tempfile.mkdtemp(), seed=seed, vision_layers=settings["vision_layers"],
                             text_hidden=settings["text_hidden"], vision_hidden=settings["vision_hidden"],
                             vision_heads=settings["vision_heads"])
    processor = load_processor(str(path))
    model = load_model(str(path), dtype=torch.float32)
    if emb_std is not None:
        with torch.no_grad():
            weight = model.model.language_model.embed_tokens.weight
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * emb_std)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for key, module in (("patch_std", model.model.vision_tower.patch_embedder.input_proj),
                            ("soft_token_std", model.model.embed_vision.embedding_projection)):
            if settings[key] is not None:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * settings[key])
    with torch.no_grad():
        for key, tower in (("vision_post_norm", model.model.vision_tower), ("text_post_norm", model.model.language_model)):
            if settings[key] is not None:
                for name, param in tower.named_parameters():
                    if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                        param.fill_(settings[key])
    # qk 32**0.25 gives transformers' ones; qk 1 the usual 1/sqrt(head_dim) temperature
    scale_attention_norms(model, settings["qk"])
    reinit_vision_positions(model, settings["pos_std"], generator=gen)
    if settings["answer_tokens"]:
        from peft import LoraConfig, get_peft_model

        ids = sorted({i for n in load_examples("digits", "train", size=1).class_names + ["<turn|>"]
                      for i in processor.tokenizer(n, add_special_tokens=False).input_ids})
        model = get_peft_model(model, LoraConfig(
            r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
            target_modules="all-linear", trainable_token_indices={"embed_tokens": ids}, ensure_weight_tying=True,
            use_rslora=settings["rslora"], task_type="CAUSAL_LM")).to(device)
    elif settings["rslora"]:
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], use_rslora=True,
                                                 lora_dropout=settings["dropout"], target_modules="all-linear")).to(device)
    else:
        model = apply_lora(model, r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"]).to(device)
    train = load_digits_examples("train", size=settings["train_size"])
    train_examples = with_shifted_copies(train.examples) if settings["augment"] else train.examples
    test = load_examples("digits", "test", size=test_size)
    names = train.class_names
    train_batch = VisionChatCollator(processor, names)(train_examples)
    test_batch = VisionChatCollator(processor, names, mode="eval")(test.examples)
    name_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(n) for n in names], device=device)
    test_labels = torch.tensor([e["label"] for e in test.examples], device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    if settings["loraplus"]:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=settings["loraplus"],
                                        weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = settings["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def accuracy():
        model.eval()
        gemma, correct = unwrap_gemma4(model), 0
        for start in range(0, len(test_labels), 100):
            part = {k: v[start:start + 100].to(device) for k, v in test_batch.items()}
            hidden = gemma.model(**part, use_cache=False).last_hidden_state[:, -1]
            logits = softcapped_logits(model, hidden)[:, name_ids]
            correct += (logits.argmax(-1) == test_labels[start:start + 100]).sum().item()
        model.train()
        return correct / len(test_labels)

    rows, start = [{"variant": variant, "seed": seed, "step": 0, "acc": accuracy(), "s": 0.0}], time.time()
    print(json.dumps(rows[-1]), flush=True)
    for step in range(1, steps + 1):
        idx = torch.randperm(len(train_examples), generator=generator)[:batch_size]
        batch = {k: v[idx].to(device) for k, v in train_batch.items()}
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % eval_every == 0 or step == steps:
            rows.append({"variant": variant, "seed": seed, "step": step, "loss": round(loss.item(), 4),
                         "acc": accuracy(), "s": round(time.time() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiny_init_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["base", "emb125"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--test-size", type=int, default=300, help="held-out digits scored (0: all 450)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.steps, args.eval_every, args.device, args.test_size or None)
        return
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    running, lines = [], []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            v, s = jobs.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.tiny_init_sweep", "--one", v, str(s), "--steps", str(args.steps),
                   "--eval-every", str(args.eval_every), "--device", args.device, "--test-size", str(args.test_size)]
            running.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO))
        for proc in list(running):
            if proc.poll() is not None:
                out = proc.stdout.read()
                lines += [json.loads(x) for x in out.splitlines() if x.startswith("{")]
                print(out, end="", flush=True)
                running.remove(proc)
        time.sleep(0.5)
    print("\nvariant       seed  " + "  ".join(f"{r['step']:>5}" for r in lines if r["variant"] == lines[0]["variant"]
                                              and r["seed"] == lines[0]["seed"]))
    for v in args.variants:
        for s in args.seeds:
            accs = [r["acc"] for r in lines if r["variant"] == v and r["seed"] == s]
            print(f"{v:<13} {s:>4}  " + "  ".join(f"{a:5.3f}" for a in accs))


if __name__ == "__main__":
    main()
