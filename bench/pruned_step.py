"""Benchmark: training-step time of a surgically pruned model vs the dense one, against their FLOP ratio.

What ``plreg`` (and every pruning method with ``surgery=True``) leaves behind is a physically
smaller model (:func:`ntkit.sparse.surgery.remove_groups`); its saving is real only if the step
time falls with the executed FLOPs. Cases (seed 002's settings):

* ``bert_small_heads_75``: ``bert_mlm('small')``, 75 % of the heads removed (≥ 1 kept per layer),
  batch 32 × T 128 (MLM head at the masked positions).
* ``vgg16_filters_50``: ``vgg16`` (width 1), 50 % of every conv layer's filters removed,
  batch 128 of 32×32 images.
* ``switch_small_experts_50``: ``switch_mlm('small')`` (4 experts per block), 50 % of each block's
  experts removed, batch 32 × T 128. Top-1 routing sends every token through one expert either
  way, so the FLOP ratio stays near 1: expert pruning saves parameters, not step compute.
* ``resnet56_filters_25``: ``resnet56`` (width 1), 25 % of the filters of every residual block's
  first conv removed (the structures pl-resnet prunes; the block's second conv loses the matching
  input channels), batch 128 of 32×32 images.

Per case, the dense and the pruned model are built side by side; a training step (forward +
backward + AdamW step) is timed interleaved (dense, pruned, dense, …), the median over repeats
is reported, and the forward+backward FLOPs of each are counted by
:class:`ntkit.train.flops.FlopCounter`. Target: time ratio ≤ FLOP ratio + 0.05.

Where the time goes: a few more steps of each model run under ``torch.profiler`` and the time of
the ops that carry the counted FLOPs (convolutions, matmuls: :data:`KERNEL_OPS`, forward and
backward) is summed per step; ``kernel_ratio`` is the pruned / dense ratio of that time and
``other_s`` the rest of the profiled step (norms, activations, residual adds, the optimizer). A case whose
``kernel_ratio`` alone exceeds the FLOP ratio + 0.05 misses because the library's kernels do not
scale with the removed channels at those widths, not because of what surgery left behind.

Usage: ``python bench/pruned_step.py [--quick] [--reps N] [--out FILE.json]``; ``--quick`` runs tiny
models for a smoke test. Writes a JSON result next to this file (``bench/results/pruned_step.json``)
and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ntkit.models import build_model
from ntkit.partition import attention_heads, conv_filters, moe_experts
from ntkit.recipes.pl import resnet_block_filters
from ntkit.sparse.surgery import remove_groups
from ntkit.train.flops import FlopCounter

TARGET_SLACK = 0.05
#: aten ops that carry the counted FLOPs (their self time is the "kernel" time of a step)
KERNEL_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::thnn_conv2d",
              "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _every_layer(partition: Any, frac: float) -> list[str]:
    """``frac`` of each layer's groups (the first ones, ≥ 1 kept per layer)."""
    by: dict[str, list[str]] = {}
    for g in partition:
        by.setdefault(g.layer, []).append(g.name)
    out = []
    for names in by.values():
        k = min(round(frac * len(names)), len(names) - 1)
        out += names[:k]
    return out


def _mlm_case(model: str, quick: bool, partition: Any) -> tuple[Any, Any, Any]:
    size, b, t, vocab = ("tiny", 8, 32, 500) if quick else ("small", 32, 128, 8000)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(model, size=size, vocab_size=vocab, max_len=t, dropout=0.0)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    sel = torch.rand(b, t, generator=g) < 0.15
    labels = torch.randint(0, vocab, (int(sel.sum()),), generator=g)

    def loss(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(ids, positions=sel), labels)

    return build, partition, loss


def _image_case(model: str, quick: bool, partition: Any) -> tuple[Any, Any, Any]:
    width, b = (0.125, 16) if quick else (1.0, 128)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(model, num_classes=10, in_channels=3, width=width)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)

    def loss(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    return build, partition, loss


def _flops(model: torch.nn.Module, loss: Any) -> float:
    c = FlopCounter()
    with c.phase("step"):
        loss(model).backward()
    model.zero_grad(set_to_none=True)
    return float(c.totals()["step"])


def _profiled_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: Any, steps: int = 5) -> tuple[float, float]:
    """Seconds per training step under torch.profiler: the whole step and the part spent in
    :data:`KERNEL_OPS` (their self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss(model).backward()
            opt.step()
        wall = time.perf_counter() - t0
    us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in KERNEL_OPS)
    return wall / steps, us / 1e6 / steps


def run_case(name: str, case: Any, frac: float, reps: int) -> dict:
    build, part_fn, loss = case
    dense = build().train()
    pruned = build().train()
    part = part_fn(pruned)
    names = _every_layer(part, frac)
    remove_groups(pruned, part, names)
    models = {"dense": dense, "pruned": pruned}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    flops = {k: _flops(m, loss) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(reps + 1):
        for k, m in models.items():
            opts[k].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss(m).backward()
            opts[k].step()
            if i:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    prof = {k: _profiled_step(m, opts[k], loss) for k, m in models.items()}  # (step, kernels) seconds
    kern = {k: v[1] for k, v in prof.items()}
    res = {
        "case": name,
        "removed_groups": len(names),
        "groups": len(part),
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        "fwd_bwd_flops": flops,
        "step_s": med,
        "flop_ratio": flops["pruned"] / flops["dense"],
        "time_ratio": med["pruned"] / med["dense"],
        "kernel_s": kern,
        "other_s": {k: prof[k][0] - kern[k] for k in models},
        "kernel_ratio": kern["pruned"] / kern["dense"],
    }
    res["meets_target"] = res["time_ratio"] <= res["flop_ratio"] + TARGET_SLACK
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    ap.add_argument("--reps", type=int, default=0, help="timed repeats per model (default 10, quick 2)")
    ap.add_argument("--out", default="", help="result JSON (default bench/results/pruned_step[_quick].json)")
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 10)
    cases = [("bert_small_heads_75", _mlm_case("bert_mlm", args.quick, attention_heads), 0.75),
             ("vgg16_filters_50", _image_case("vgg16", args.quick, conv_filters), 0.5),
             ("switch_small_experts_50", _mlm_case("switch_mlm", args.quick, moe_experts), 0.5),
             ("resnet56_filters_25", _image_case("resnet56", args.quick, resnet_block_filters), 0.25)]
    results = [run_case(n, c, f, reps) for n, c, f in cases]
    for r in results:
        print(f"{r['case']}: params {r['params']['pruned']:,}/{r['params']['dense']:,}; "
              f"FLOP ratio {r['flop_ratio']:.3f}, time ratio {r['time_ratio']:.3f} "
              f"(dense {1000 * r['step_s']['dense']:.1f} ms, pruned {1000 * r['step_s']['pruned']:.1f} ms) — "
              f"{'meets' if r['meets_target'] else 'misses'} time ≤ FLOPs + {TARGET_SLACK}; "
              f"FLOP-carrying kernels {r['kernel_ratio']:.3f} ({1000 * r['kernel_s']['dense']:.1f} → "
              f"{1000 * r['kernel_s']['pruned']:.1f} ms), the rest {1000 * r['other_s']['dense']:.1f} → "
              f"{1000 * r['other_s']['pruned']:.1f} ms")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "pruned_step_quick.json" if args.quick else "pruned_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": {"quick": args.quick, "reps": reps, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}, "results": results}
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
