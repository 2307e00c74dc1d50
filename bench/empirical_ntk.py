"""Benchmark: structured vs generic (torch.func Jacobian) full empirical NTK.

Times :func:`ntkit.ntk.empirical_ntk` on the NTT models for N1 = N2 samples and k = 10 logits,
with layerwise 10%-density masks (as NTT's student) and without, with and without
``create_graph`` (+ the backward of ‖Θ − Θ₀‖², which is what an NTT step pays). Prints the time
ratio generic / structured measured in the same run and optionally writes JSON.

    python bench/empirical_ntk.py                       # LeNet-300-100, N1 = N2 = 32
    python bench/empirical_ntk.py --model lenet5_caffe --n 16 --out bench/empirical_ntk.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ntkit.models import build_model
from ntkit.ntk.empirical import empirical_ntk, explain_empirical_ntk

_SHAPES = {"lenet300_100": (1, 28, 28), "lenet5_caffe": (1, 28, 28), "conv4": (3, 32, 32)}


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _layerwise_masks(model: torch.nn.Module, density: float) -> dict[str, torch.Tensor]:
    masks = {}
    for n, p in model.named_parameters():
        if n.endswith("weight"):
            keep = max(1, round(density * p.numel()))
            thr = p.detach().abs().flatten().kthvalue(p.numel() - keep + 1).values
            masks[n] = (p.detach().abs() >= thr).to(p.dtype)
    return masks


def run(model_name: str, n: int, reps: int, density: float) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name).eval()
    x1 = torch.randn(n, *_SHAPES[model_name])
    x2 = torch.randn(n, *_SHAPES[model_name])
    masks = _layerwise_masks(model, density)
    theta0 = empirical_ntk(model, x1, x2).detach()
    rows = []
    for masked in (False, True):
        for grad in (False, True):
            ms = masks if masked else None

            def step(impl: str, ms=ms, grad=grad) -> None:
                th = empirical_ntk(model, x1, x2, masks=ms, create_graph=grad, implementation=impl)
                if grad:
                    ((th - theta0) ** 2).mean().backward()
                    model.zero_grad(set_to_none=True)

            ts = _time(lambda: step("structured"), reps)
            tj = _time(lambda: step("jacobian"), reps)
            rows.append({"masks": masked, "create_graph_and_backward": grad, "structured_s": ts,
                         "jacobian_s": tj, "ratio_jacobian_over_structured": tj / ts})
            print(f"{model_name} N1=N2={n} k=10 masks={masked!s:5} grad={grad!s:5}  structured {ts * 1e3:8.1f} ms"
                  f"  jacobian {tj * 1e3:8.1f} ms  ratio {tj / ts:6.1f}x")
    plan = explain_empirical_ntk(model, x1, x2, masks=masks)
    return {"model": model_name, "n1": n, "n2": n, "k": 10, "density": density, "reps": reps,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "plan": {"implementation": plan.implementation.value, "layers": plan.layers}, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet300_100", choices=sorted(_SHAPES))
    ap.add_argument("--n", type=int, default=32, help="N1 = N2 samples")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    res = run(args.model, args.n, args.reps, args.density)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
