"""Benchmark: one NTT step with the layer-wise structured kernel against torch.func Jacobians.

One step = the NTT loss of :func:`ntkit.methods.ntt.ntt_loss` (target distance + γ² · full
cross-NTK distance + (β / density) · ‖m ⊙ θ̃‖², student kernel ``"effective"`` as in the authors'
code) and its backward to the raw weights θ̃, second order through the kernel. Two kernels, the
rest of the step identical:

* ``structured`` — :func:`ntkit.ntk.empirical_ntk` ``implementation="structured"``: per layer
  (input Gram) ⊙ (back-propagated-signal Gram), never a per-parameter Jacobian;
* ``torch.func`` (the reference) — ``implementation="jacobian"``: ``torch.func.jacrev`` of
  ``functional_call`` w.r.t. every parameter for the batch's N·k outputs, Θ = Σ_θ J₁ J₂ᵀ,
  differentiated by ordinary autograd.

Setup per model (LeNet-300-100 and LeNet-5-caffe on 1×28×28 inputs, 10 logits): the authors'
init (:func:`ntkit.methods.ntt.glorot_truncated_init_`), the student's raw weights = teacher +
small noise, a layerwise magnitude mask at density 0.05, γ² = 1e-3, β of seed 003 Table 2,
random inputs, batch B = 64 (halves of 32: Θ is [320, 320]).

Measured:

* time — float32, both kernels interleaved in each repeat (order alternating), one warm-up each,
  median over the repeats; ratio = torch.func / structured;
* agreement — float64 at B = 4: the relative error of the loss and the max over parameters of
  max|g_s − g_ref| / max(1, max|g_ref|) must be ≤ 1e-8 (else the exit code is 1);
* NTT phase per epoch — EXTRAPOLATED, not run: median step time × ⌈54 000 / B⌉ steps (844 at
  B = 64: an epoch of MNIST's 54k training samples after the 10% validation hold-out);
* allocator — ``ntkit.train.tune_cpu_allocator()`` first, as the ``ntkit`` commands do
  (``NTKIT_MALLOC=system`` opts out);
* peak memory — each kernel's step runs once more in a fresh subprocess; the figure is the rise of
  the process's peak resident set (Linux VmHWM, reset through ``/proc/self/clear_refs``) over its
  resident set just before the step (``ru_maxrss`` where VmHWM cannot be reset). ``tracemalloc``
  does not see torch's CPU allocator, and torch keeps no CPU allocator statistics.

    python bench/ntt_step.py --quick            # smoke test: B = 4 (agreement B = 2), 1 repeat, no subprocesses
    python bench/ntt_step.py                    # full; writes bench/results/ntt_step.json
    ntkit bench ntt --threads 1 --repeats 3

Prints a table; writes JSON (``--out``; the full run defaults to ``bench/results/ntt_step.json``,
``--quick`` writes only when ``--out`` is given). Returns exit code 0 when every agreement check
passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ntkit.methods.masks import magnitude_mask, maskable_weights
from ntkit.methods.ntt import glorot_truncated_init_, ntt_loss, ntt_targets
from ntkit.models import build_model
from ntkit.train.allocator import tune_cpu_allocator

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ntt_step.json"
MODELS = ("lenet300_100", "lenet5_caffe")
IMPLS = {"structured": "structured", "torch.func": "jacobian"}
#: β of seed 003 Table 2 per model.
BETA = {"lenet300_100": 1e-4, "lenet5_caffe": 1e-5}
DENSITY = 0.05
GAMMA2 = 1e-3
#: MNIST's 60k training images less the 10% validation hold-out.
TRAIN_SAMPLES = 54_000
TOL = 1e-8


def setup(model_name: str, batch: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """Model (eval), inputs [batch, 1, 28, 28], teacher targets, raw weights (leaf tensors with
    grad) and layerwise masks, all in ``dtype``."""
    torch.manual_seed(seed)
    model = build_model(model_name).to(dtype).eval()
    glorot_truncated_init_(model, torch.Generator().manual_seed(seed))
    x = torch.randn(batch, 1, 28, 28, dtype=dtype)
    g_out, g_ntk = ntt_targets(model, x)
    gen = torch.Generator().manual_seed(seed + 1)
    raw = {n: (p.detach() + 0.05 * p.detach().std() * torch.randn(p.shape, generator=gen, dtype=dtype))
           .requires_grad_(True) for n, p in model.named_parameters()}
    masks = {n: m.to(dtype) for n, m in magnitude_mask({n: raw[n] for n in maskable_weights(model)},
                                                          DENSITY, "layerwise").items()}
    return {"model": model, "x": x, "g_out": g_out, "g_ntk": g_ntk, "raw": raw, "masks": masks,
            "beta": BETA[model_name]}


def step(s: dict[str, Any], impl: str) -> tuple[Tensor, list[Tensor]]:
    """One NTT step's loss and gradients w.r.t. the raw weights (kernel ``impl``)."""
    loss, _ = ntt_loss(s["model"], s["x"], s["g_out"], s["g_ntk"], s["raw"], s["masks"], gamma2=GAMMA2,
                       beta=s["beta"], density=DENSITY, kernel="effective", implementation=IMPLS[impl])
    grads = torch.autograd.grad(loss, list(s["raw"].values()))
    return loss.detach(), list(grads)


def agreement(model_name: str, batch: int = 4) -> dict[str, float]:
    """Float64: structured against torch.func on the loss and every gradient."""
    s = setup(model_name, batch, torch.float64)
    (la, ga), (lb, gb) = step(s, "structured"), step(s, "torch.func")
    loss_err = abs(float(la - lb)) / max(1.0, abs(float(lb)))
    grad_err = max(float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in zip(ga, gb))
    return {"batch": batch, "loss": float(lb), "loss_rel_err": loss_err, "grad_rel_err": grad_err}


def timing(model_name: str, batch: int, repeats: int) -> dict[str, list[float]]:
    """Float32 step times (s) per kernel: one warm-up each, then ``repeats`` interleaved runs."""
    s = setup(model_name, batch, torch.float32)
    for impl in IMPLS:
        step(s, impl)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    order = list(IMPLS)
    for r in range(repeats):
        for impl in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            step(s, impl)
            times[impl].append(time.perf_counter() - t0)
    return times


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rise_mib(model_name: str, impl: str, batch: int) -> dict[str, Any]:
    """In this process: the rise of the peak resident set during one step over the resident set
    before it (see the module docstring)."""
    s = setup(model_name, batch, torch.float32)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before, how = _status_mib("VmRSS"), "VmHWM"
    except OSError:
        before, how = None, "ru_maxrss"
    if before is None:
        before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"
    step(s, impl)
    peak = _status_mib("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rise_mib": (peak or 0.0) - before, "how": how}


def _isolated_peak(model_name: str, impl: str, batch: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem", model_name, impl, str(batch),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600).stdout
    return json.loads(out.strip().splitlines()[-1])


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'model':<13} {'kernel':<11} {'step ms':>9} {'ratio':>7} {'epoch s*':>9} {'peak MiB':>9} "
            f"{'f64 loss err':>12} {'f64 grad err':>12}")
    lines = [head]
    for r in rows:
        for impl in IMPLS:
            k = r["kernels"][impl]
            mem = "-" if k["peak_rise_mib"] is None else f"{k['peak_rise_mib']:.0f}"
            ratio = f"{r['ratio']:.1f}x" if impl == "structured" else "ref"
            errs = (f"{r['agreement']['loss_rel_err']:12.1e} {r['agreement']['grad_rel_err']:12.1e}"
                    if impl == "structured" else f"{'ref':>12} {'ref':>12}")
            lines.append(f"{r['model']:<13} {impl:<11} {1e3 * k['step_s']:9.1f} {ratio:>7} "
                         f"{k['epoch_s_extrapolated']:9.0f} {mem:>9} {errs}")
    b = rows[0]["batch"] if rows else 64
    lines.append(f"* NTT phase per epoch EXTRAPOLATED: median step time x {math.ceil(TRAIN_SAMPLES / b)} steps "
                 f"({TRAIN_SAMPLES} MNIST training samples at batch {b}), not measured end to end.")
    lines.append("  peak MiB: rise of the peak resident set (VmHWM) during one step in a fresh process.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (module docstring); returns the exit code (0: every agreement check passed)."""
    ap = argparse.ArgumentParser(prog="ntkit bench ntt", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, 1 repeat, no memory subprocesses (smoke test)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=None, help="timing batch (default 64; quick 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per kernel (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON result (default {DEFAULT_OUT}; quick: none)")
    ap.add_argument("--_mem", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    malloc = "glibc, freed memory kept for reuse" if tune_cpu_allocator() else "system default"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._mem:
        name, impl, batch = args._mem
        print(json.dumps(peak_rise_mib(name, impl, int(batch))))
        return 0
    batch = args.batch or (4 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    if batch < 2 or batch % 2:
        ap.error(f"--batch {batch}: expected an even integer >= 2")
    load_start = _loadavg()
    steps_per_epoch = math.ceil(TRAIN_SAMPLES / batch)
    rows = []
    for name in args.models:
        agree = agreement(name, 2 if args.quick else 4)
        times = timing(name, batch, repeats)
        kernels = {}
        for impl in IMPLS:
            med = statistics.median(times[impl])
            mem = None if args.quick else _isolated_peak(name, impl, batch, torch.get_num_threads())
            kernels[impl] = {"step_s": med, "times_s": times[impl], "epoch_s_extrapolated": med * steps_per_epoch,
                             "peak_rise_mib": None if mem is None else mem["peak_rise_mib"],
                             "peak_how": None if mem is None else mem["how"]}
        ratio = kernels["torch.func"]["step_s"] / kernels["structured"]["step_s"]
        ok = agree["loss_rel_err"] <= TOL and agree["grad_rel_err"] <= TOL
        rows.append({"model": name, "batch": batch, "ratio": ratio, "target_ratio": 3.0, "agreement": agree,
                     "agreement_ok": ok, "kernels": kernels})
    print(_table(rows))
    payload = {
        "config": {"quick": args.quick, "batch": batch, "repeats": repeats, "density": DENSITY, "gamma2": GAMMA2,
                   "kernel": "effective", "threads": torch.get_num_threads(), "malloc": malloc, "torch": torch.__version__,
                   "platform": platform.platform(), "cpus": os.cpu_count(), "steps_per_epoch": steps_per_epoch,
                   "loadavg_start": load_start, "loadavg_end": _loadavg(),
                   "argv": list(argv) if argv is not None else sys.argv[1:]},
        "results": rows,
    }
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
    summary = {r["model"]: {"ratio": round(r["ratio"], 2), "agreement_ok": r["agreement_ok"]} for r in rows}
    print(json.dumps(summary))
    return 0 if all(r["agreement_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
