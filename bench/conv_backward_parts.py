"""Benchmark: where a Conv2d filter-sliced backward spends its time (kernel level).

Splits the backward of one 3×3 convolution (default 64→64 channels, 32×32, batch 64) into its
kernels and times each side by side in one run (medians of interleaved repeats):

* ``both``      — the fused native backward (input grad + all filters' weight and bias grads), the
  baseline (what the plain ``nn.Conv2d`` runs);
* ``gx``        — the input gradient alone (the partial backward still needs it);
* ``gw_half``   — the weight and bias gradients of 50% of the filters from the gathered output
  gradient (what ``ntkit.sparse`` runs for the active filters);
* ``gather``    — the gather of the active channels of the output gradient.

* ``bn``        — the train-mode BatchNorm backward after it (input grad + affine grads), which
  full and partial paths pay alike (a VGG filter is conv + BN).

Floor at 50% active: (gx + gw/2) / (gx + gw) = 0.75 of the FLOPs. The printed kernel ratios
``(gx + gw_half + gather) / both`` (the Conv2d layer) and ``(… + bn) / (both + bn)`` (Conv2d + BN)
are what the partial backward can reach at best on this machine: the layer-level ratios of
``bench/partial_backward.py`` add only autograd bookkeeping on top.

    python bench/conv_backward_parts.py [--c 64] [--hw 32] [--b 64] [--repeats 20] [--memory-format both]

Both memory formats are timed by default: NCHW (PyTorch's default; oneDNN converts layouts inside
each call, so splitting the backward into two calls pays extra conversions) and channels-last
(NHWC, oneDNN's native layout; the channel gather runs on the [N·H·W, C] matrix view).

Allocator (measured here): with glibc's default malloc, interleaving kernels of different output
sizes returns the multi-MB buffers to the OS and page-faults them back on every call, which
inflates every kernel (``both`` 44 ms instead of 27 ms) and hides the saving (ratio ≈ 0.96). The
benchmark therefore calls :func:`ntkit.train.tune_cpu_allocator` first, as the ``ntkit`` commands
do (``NTKIT_MALLOC=system`` to see the default).

Last stdout line: JSON ``{"flops_ratio_50": 0.75, "malloc": …, "nchw": {"kernel_ratio_50": …,
"kernel_ratio_50_with_bn": …, "ms": {...}}, "nhwc": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ntkit.sparse._functions import Idx, _take_channels
from ntkit.train.allocator import tune_cpu_allocator

__all__ = ["main"]


def _time_parts(c: int, hw: int, b: int, repeats: int, fmt: torch.memory_format) -> dict[str, float]:
    """Median ms of each kernel, ``fmt`` the memory format of activations and weights."""
    torch.manual_seed(0)
    x, w, gy = (t.contiguous(memory_format=fmt) for t in
                (torch.randn(b, c, hw, hw), torch.randn(c, c, 3, 3), torch.randn(b, c, hw, hw)))
    active = Idx(torch.arange(0, c, 2), c)  # every other filter: the gather is a real gather
    gy_half = _take_channels(active, gy)
    bn_w, bn_mean, bn_invstd = torch.ones(c), x.mean((0, 2, 3)), x.var((0, 2, 3)).add(1e-5).rsqrt()
    conv_bwd = torch.ops.aten.convolution_backward
    conf = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)

    cases: dict[str, Callable[[], object]] = {
        "both": lambda: conv_bwd(gy, x, w, [c], *conf, [True, True, True]),
        "gx": lambda: conv_bwd(gy, x, w, None, *conf, [True, False, False]),
        "gw_half": lambda: conv_bwd(gy_half, x, w.narrow(0, 0, len(active)), [len(active)], *conf, [False, True, True]),
        "gather": lambda: _take_channels(active, gy),
        "bn": lambda: torch.ops.aten.native_batch_norm_backward(
            gy, x, bn_w, None, None, bn_mean, bn_invstd, True, 1e-5, [True, True, True]
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm-up
        f()
    for _ in range(repeats):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="conv_backward_parts", description=__doc__.split("\n")[0])
    ap.add_argument("--c", type=int, default=64)
    ap.add_argument("--hw", type=int, default=32)
    ap.add_argument("--b", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--memory-format", choices=("nchw", "nhwc", "both"), default="both")
    args = ap.parse_args(argv)
    if min(args.c, args.hw, args.b, args.repeats) < 1:
        ap.error(f"--c/--hw/--b/--repeats must be >= 1, got {args.c}/{args.hw}/{args.b}/{args.repeats}")
    malloc = "glibc, freed memory kept for reuse" if tune_cpu_allocator() else "system default"
    print(f"malloc: {malloc}")
    formats = ("nchw", "nhwc") if args.memory_format == "both" else (args.memory_format,)
    out: dict[str, object] = {"flops_ratio_50": 0.75, "malloc": malloc}
    for name in formats:
        fmt = torch.channels_last if name == "nhwc" else torch.contiguous_format
        ms = _time_parts(args.c, args.hw, args.b, args.repeats, fmt)
        half = ms["gx"] + ms["gw_half"] + ms["gather"]
        ratio, ratio_bn = half / ms["both"], (half + ms["bn"]) / (ms["both"] + ms["bn"])
        print(f"[{name}]")
        for k, v in ms.items():
            print(f"  {k:10s} {v:8.2f} ms")
        print(f"  kernel ratio at 50% active: Conv2d {ratio:.3f}, Conv2d + BN {ratio_bn:.3f} (FLOP ratio 0.750)")
        out[name] = {"kernel_ratio_50": round(ratio, 4), "kernel_ratio_50_with_bn": round(ratio_bn, 4),
                     "ms": {k: round(v, 3) for k, v in ms.items()}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
