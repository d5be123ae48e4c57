"""The vision tower's attention alone, forward and backward, by kernel: what a faster kernel could buy E4B's step.

E2B/E4B's vision encoder attends over every padded patch of an image (2,520 at the default 280-soft-token
budget; a 224×224 image fills 2,304 of them) with 12 heads of dimension 64, 16 layers. transformers gives SDPA a
boolean padding mask (``create_bidirectional_mask``), which rules out SDPA's flash kernel. Rows, each timed on
the same random q, k, v (bf16):

- ``sdpa-mask`` / ``sdpa-mask-cudnn`` / ``sdpa-mask-efficient``: the masked call as transformers makes it, with
  torch's choice of kernel, then each kernel that takes a mask forced;
- ``flex-mask``: ``torch.nn.attention.flex_attention`` (compiled) with a block mask of the same padding;
- ``sdpa-flash-valid``: SDPA's flash kernel on the valid patches only, as if the padding were dropped (what
  packing the patches, or a varlen kernel, could reach: a bound, not a drop-in).

Per row: ms for the forward and for forward + backward of one layer at the micro-batch, TFLOP/s over the whole
padded square (4·B·H·N²·D forward, 2.5× that backward), and the 16 layers' forward + backward in ms (what the
profile of a compiled E4B step calls "attention").

Run from the repository root: ``python -m benchmarks.vision_attention --batch 32`` (GPU; ``--shrink`` on a CPU
checks that it runs).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_backward(attend, q, k, v):
    """(forward, forward + backward) callables for ``attend(q, k, v)``."""
    grad = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def both():
        out = attend(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return forward, both


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vision_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patches", type=int, default=2520, help="padded patches per image (9 x the budget)")
    parser.add_argument("--valid", type=int, default=2304, help="real patches of a 224x224 image")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shrink", action="store_true", help="small shapes on a CPU: checks that it runs")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shrink:
        args.batch, args.patches, args.valid, args.repeats = 2, 144, 128, 2
    b, n, h, d = args.batch, args.patches, args.heads, args.head_dim
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def tensors(length):
        return [torch.randn(b, h, length, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]

    q, k, v = tensors(n)
    keep = torch.arange(n, device=device) < args.valid  # padding at the end, as the image processor pads
    mask = keep.view(1, 1, 1, n).expand(b, 1, n, n)  # keys only: every query row sees the valid patches

    def sdpa_masked(backend=None):
        def attend(q, k, v):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return attend

    rows = {"sdpa-mask": (sdpa_masked(), (q, k, v))}
    if device == "cuda":
        rows["sdpa-mask-cudnn"] = (sdpa_masked(SDPBackend.CUDNN_ATTENTION), (q, k, v))
        rows["sdpa-mask-efficient"] = (sdpa_masked(SDPBackend.EFFICIENT_ATTENTION), (q, k, v))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda _b, _h, _q, kv: kv < args.valid, None, None, n, n, device=device)
        flex = torch.compile(flex_attention)
        rows["flex-mask"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=1.0), (q, k, v))
    except Exception as err:  # noqa: BLE001
        print(json.dumps({"flex-mask": f"not run: {err!r}"[:200]}), flush=True)
    if device == "cuda":
        valid = tensors(args.valid)

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, scale=1.0)
        rows["sdpa-flash-valid"] = (flash, valid)
    forward_flop = 4 * b * h * n * n * d
    results = []
    for name, (attend, (qq, kk, vv)) in rows.items():
        try:
            forward, both = forward_backward(attend, qq, kk, vv)
            f, fb = timed(forward, args.repeats), timed(both, args.repeats)
            row = {"kernel": name, "forward_ms": round(1e3 * f, 3), "forward_backward_ms": round(1e3 * fb, 3),
                   "forward_tflops": round(forward_flop / f / 1e12, 1),
                   "forward_backward_tflops": round(3.5 * forward_flop / fb / 1e12, 1),
                   "all_layers_ms": round(1e3 * fb * args.layers, 1)}
        except Exception as err:  # noqa: BLE001
            row = {"kernel": name, "error": repr(err)[:200]}
        results.append(row)
        print(json.dumps(row), flush=True)
    if device == "cuda":  # a check: flex's answer on the valid patches against the masked SDPA's
        ref = sdpa_masked()(q, k, v)[:, :, : args.valid]
        if "flex-mask" in rows:
            got = rows["flex-mask"][0](q, k, v)[:, :, : args.valid]
            print(json.dumps({"flex_vs_sdpa_max_abs_diff": float((got - ref).abs().max())}), flush=True)
    print(json.dumps({"batch": b, "patches": n, "valid": args.valid, "heads": h, "head_dim": d,
                      "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                      "torch": torch.__version__}), flush=True)
    return results


if __name__ == "__main__":
    main()
