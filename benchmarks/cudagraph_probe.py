"""CUDA graphs under regional (per-layer) compilation: does a stack of separately compiled blocks train?

``helpers.speed.compile_layers`` compiles each decoder layer on its own. Inductor's CUDA graphs (``mode=
"reduce-overhead"``) fail under it on the 31B with ``accessing tensor output of CUDAGraphs that has been
overwritten by a subsequent run``. This probe trains a toy stack with the same structure (a frozen linear and a
LoRA pair per block, each block compiled alone, two micro-batches a step); it runs in a few seconds, so that each
way of running the graphs can be tried without building a 31B:

- ``eager``, ``compiled``: no graphs; the losses the other modes must reproduce (up to bf16 rounding).
- ``graphs``: CUDA graphs, nothing else.
- ``graphs-marked``: ``torch.compiler.cudagraph_mark_step_begin()`` before each micro-batch's forward.
- ``graphs-marked-one-micro-batch``: the same with one micro-batch a step (no gradient accumulation; its
  inputs differ from the two-micro-batch modes', so its losses are not comparable to theirs).
- ``graphs-marked-clone-grads``: marked, and each trainable gradient copied (a tensor hook) before autograd
  accumulates it: the first micro-batch's ``.grad`` is otherwise a graph output that the next replay overwrites.

Run on a GPU from the repository root: ``python -m benchmarks.cudagraph_probe``. Each mode prints its losses (or
the error) and seconds per step after the first.
"""

from __future__ import annotations

import time

import torch
from torch import nn

MODES = ["eager", "compiled", "graphs", "graphs-marked", "graphs-marked-one-micro-batch",
         "graphs-marked-clone-grads"]


class Block(nn.Module):
    """A residual block: a frozen linear with a trainable low-rank pair beside it, as LoRA wraps a layer."""

    def __init__(self, width: int, rank: int = 16):
        super().__init__()
        self.frozen = nn.Linear(width, width, bias=False).requires_grad_(False)
        self.down, self.up = nn.Linear(width, rank, bias=False), nn.Linear(rank, width, bias=False)
        nn.init.normal_(self.up.weight, std=0.02)  # LoRA starts B at zero; non-zero here so ``down`` gets gradients

    def forward(self, x):
        h = nn.functional.rms_norm(x, (x.shape[-1],))
        return x + nn.functional.gelu(self.frozen(h) + self.up(self.down(h)))


def train(mode: str, steps: int = 4, width: int = 512, depth: int = 6) -> tuple[list[float], float]:
    """Losses of ``steps`` (at least 2) optimizer steps in ``mode``, and seconds per step after the first."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (the first one compiles and is not timed), got {steps}")
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(width) for _ in range(depth)).cuda().bfloat16()
    if mode != "eager":
        for block in blocks:
            block.compile(options={"triton.cudagraphs": mode.startswith("graphs")})
    trainable = [p for p in blocks.parameters() if p.requires_grad]
    if mode.endswith("clone-grads"):
        for p in trainable:
            p.register_hook(torch.Tensor.clone)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    micro_batches = 1 if mode.endswith("one-micro-batch") else 2
    losses, started = [], None
    for step in range(steps):
        if step == 1:
            torch.cuda.synchronize()
            started = time.perf_counter()
        for _ in range(micro_batches):
            if "marked" in mode:
                torch.compiler.cudagraph_mark_step_begin()
            x = torch.randn(4, 64, width, device="cuda", dtype=torch.bfloat16)
            for block in blocks:
                x = block(x)
            loss = x.float().pow(2).mean()
            loss.backward()
            losses.append(loss.detach())  # read after the loop: .item() here would wait for the GPU every time
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / (steps - 1)
    return [round(loss.item(), 5) for loss in losses], seconds


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.cudagraph_probe needs a CUDA GPU: CUDA graphs exist only there")
    for mode in MODES:
        torch._dynamo.reset()
        try:
            losses, seconds = train(mode)
            print(f"{mode:<32} ok      {seconds * 1e3:7.2f} ms/step  losses {losses}", flush=True)
        except RuntimeError as error:  # a mode that fails is the finding; the next mode still runs
            print(f"{mode:<32} FAILED  {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
