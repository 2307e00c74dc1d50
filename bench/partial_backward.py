"""Benchmark: partial backward (``ntkit.sparse``) — time and executed FLOPs vs the full backward.

Everything is measured side by side in one run: configurations are interleaved within each
repeat; times are medians over repeats, and a time ratio is the median over repeats of the ratio
within a repeat (paired: the VM's speed drifts between repeats by ±20%, which a ratio of medians
carries and a paired ratio cancels). Single layers get 3× the repeats (they are cheap and their
sub-100 ms timings are the noisiest). The baseline (the plain, unattached layer / model with
``torch.optim.AdamW(fused=True)``, torch's fastest) is measured in the same run.

* Per sliced layer type — Linear rows (a fused QKV projection, 50% of heads), Linear columns
  (the output projection, 50% of heads), Conv2d filters (50% of filters; alone, and followed by
  its train-mode BatchNorm whose affine is part of each filter, as in VGG), MoE experts (a
  SwitchFFN, 50% of experts): **backward** time and executed FLOPs (FlopCounterMode:
  matmuls / convolutions) at 50% active over the full backward. Something upstream trains (the
  input requires grad), so input gradients are still computed.
* Per model — ``bert_mlm('small')`` (heads), ``vgg16`` (filters; also channels-last, and at the
  quarter width the ``mat-vgg`` quick recipe trains), ``switch_mlm('small', 4)`` (experts):
  **training-step** time (forward + backward + optimizer step) and FLOPs at 100/75/50/25% of the
  groups active (that fraction of each layer's groups, random, ≥ 1), and at 50% with a new random
  set every step ("50% resampled", the worst case for set changes: Rand draws a set per epoch, MAT
  per interval; the step includes ``set_active``). Every step starts from the same weights.

The floor: only the weight-gradient work of inactive slices is saved. Forward and input
gradients are unchanged (they are needed), and parameters outside the partition (embeddings,
FFNs, norms, the MLM decoder, classifier) train fully, so at 50% active a layer's FLOP ratio is
about 0.75 (fwd 1 + dX 1 + dW ½ over 3 for the step, dX 1 + dW ½ over 2 for the backward) and a
model's is higher. Time can only approach the FLOP ratio: the sliced path adds a gather of the
output gradient for the active slices and a scatter of their weight gradient, elementwise work
(norms, activations, softmax, optimizer) does not shrink, and BLAS / oneDNN efficiency is not
linear in matrix size. Target: time ratio ≤ FLOP ratio + 0.05 at 50%.

The measured floor (model cases, column ``floor``): the same run also times the plain model with
every covered parameter frozen ("0% frozen": native kernels, no weight gradient and no optimizer
update for them; an image input requires grad, so that every layer's input gradient is still
computed, as at any f > 0), t0. A partial backward without overhead, whose weight-gradient and
optimizer work were linear in the active fraction f, would take t0 + f·(t_plain − t0); ``floor`` is
that over t_plain (from the paired ratio r0 = t0 / t_plain: r0 + f·(1 − r0)). Time above the
floor is overhead (gathers, scatters, Python) or kernels that do not scale with the active slices;
a FLOP ratio below the floor means the step's time is not its FLOPs (elementwise and memory-bound
work the FLOP counter does not see).

Memory format: the convolution cases run twice, NCHW (PyTorch's default) and channels-last
(``*_nhwc``: model and input ``.to(memory_format=torch.channels_last)``; plain and sliced alike).
In NCHW, oneDNN converts layouts inside every convolution call, so the split backward (input
gradient, then a subset's weight gradient) pays conversions the fused full backward pays once:
the kernels alone (``bench/conv_backward_parts.py --memory-format both``) sit at ≈ 0.80 for the
Conv2d layer. Channels-last is oneDNN's native layout, faster for the plain layer too, and there
the kernels follow the FLOPs.

Convolution kernels: a convolution with inactive filters runs one of two backward kernels of equal
FLOPs (``$NTKIT_CONV_WGRAD``; default ``tune``: timed once per problem in the warm-up, see
:func:`ntkit.sparse._functions._conv_kernel`). With ``NTKIT_CONV_WGRAD=tune-dense`` a third, the
full backward with the inactive rows zeroed, competes where slicing cannot pay; it computes the
inactive filters' gradient, and the FLOP ratio, which counts what ran, rises accordingly. The
results JSON lists each problem's choice (``conv_weight_grad_kernels``).

CPU memory: the benchmark calls :func:`ntkit.train.tune_cpu_allocator` first (glibc keeps freed
memory for reuse; ``NTKIT_MALLOC=system`` opts out): with the default, every configuration's
multi-MB tensors are page-faulted back in on each call, which adds ±20% noise to single-layer
timings and a cost per byte allocated that is not compute.

    python bench/partial_backward.py --quick          # smoke test (seconds)
    python bench/partial_backward.py                   # full sizes; writes bench/results/partial_backward.json
    ntkit bench backward --repeats 9 --out my.json

``--quick`` writes a JSON file only when ``--out`` is given (the committed results stay the full
run's). :func:`main` returns the exit code (0).

The last stdout line is JSON: ``{name: {"flops_ratio_50": …, "time_ratio_50": …}}`` (model cases
also ``"floor_ratio_50"``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ntkit import partition as P
from ntkit.models import build_model, mlm_loss
from ntkit.models.layers import MultiHeadSelfAttention, SwitchFFN
from ntkit.partition import Partition
from ntkit.sparse import SlicedAdamW, _functions, attach
from ntkit.train.allocator import tune_cpu_allocator

__all__ = ["main"]

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
# Same hyper-parameters for the plain torch AdamW and SlicedAdamW (their weight_decay defaults differ).
OPT = {"lr": 1e-4, "weight_decay": 0.01}
# The plain baselines use torch's fused AdamW kernel, as SlicedAdamW does for its dense tensors
# (CPU: 0.9 against 4.1 ms for the quarter-width VGG-16's parameters with the default per-tensor loop).
PLAIN_OPT = {**OPT, "fused": True}
NHWC = torch.channels_last
_CLOCK: Callable[[], float] = time.perf_counter
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "partial_backward.json"
FROZEN = "0% frozen"  # the plain model, covered parameters frozen: the floor's anchor


# ----------------------------------------------------------------------------------- helpers
def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _active_fraction(part: Partition, frac: float, seed: int = 0) -> Tensor:
    """``frac`` of each layer's groups active (random, at least one per layer)."""
    g = torch.Generator().manual_seed(seed)
    active = torch.zeros(len(part), dtype=torch.bool)
    by_layer: dict[str, list[int]] = {}
    for i, lay in enumerate(part.layers):
        by_layer.setdefault(lay, []).append(i)
    for idx in by_layer.values():
        k = max(1, round(frac * len(idx)))
        pick = torch.randperm(len(idx), generator=g)[:k]
        active[torch.tensor(idx)[pick]] = True
    return active


def _interleaved(fns: dict[str, Callable[[], float]], repeats: int, base: str) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per configuration, and each configuration's time ratio to ``base``: the
    median over repeats of the ratio within a repeat (the configurations of one repeat run back to
    back, so the ratio cancels the VM's drift between repeats, which moved single medians by ±20%
    here). Each fn returns the seconds it measured."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(fn())
    ratios = {k: statistics.median(a / b for a, b in zip(v, times[base], strict=True)) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}, ratios


def _strip(part: Partition, prefix: str) -> Partition:
    """Partition built on a wrapper ``nn.Sequential(layer)`` → names relative to ``layer``."""
    spec = {g.name: [(s.param[len(prefix):], s.dim, range(s.start, s.stop)) for s in g.slices] for g in part}
    return Partition.from_slices(spec, kind={g.name: g.kind for g in part}, layer={g.name: g.layer for g in part})


# ----------------------------------------------------------------------------------- layers
def _layer_cases(quick: bool) -> dict[str, tuple[nn.Module, Partition, Callable[[], Tensor]]]:
    torch.manual_seed(0)  # the same layers (and MoE routing) in every run
    n_tok = 256 if quick else 4096
    d, heads = (128, 4) if quick else (512, 8)
    cases: dict[str, tuple[nn.Module, Partition, Callable[[], Tensor]]] = {}
    attn = MultiHeadSelfAttention(d, heads)
    hp = P.attention_heads(nn.Sequential(attn))
    rows = _strip(Partition([type(g)(g.name, g.kind, g.layer, tuple(s for s in g.slices if "qkv" in s.param))
                             for g in hp]), "0.qkv.")
    cols = _strip(Partition([type(g)(g.name, g.kind, g.layer, tuple(s for s in g.slices if "proj" in s.param))
                             for g in hp]), "0.proj.")
    cases["linear_rows"] = (attn.qkv, rows.bind(attn.qkv), lambda: torch.randn(n_tok, d, requires_grad=True))
    cases["linear_columns"] = (attn.proj, cols.bind(attn.proj), lambda: torch.randn(n_tok, d, requires_grad=True))
    c, hw, b = (32, 16, 16) if quick else (64, 32, 64)
    conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1))
    cases["conv2d_filters"] = (conv, P.conv_filters(conv), lambda: torch.randn(b, c, hw, hw, requires_grad=True))
    conv_bn = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
    cases["conv2d_filters+bn"] = (conv_bn, P.conv_filters(conv_bn), lambda: torch.randn(b, c, hw, hw, requires_grad=True))
    for name in ("conv2d_filters", "conv2d_filters+bn"):  # the same layers stored channels-last (NHWC)
        layer, part, make_x = cases[name]
        cases[f"{name}_nhwc"] = (copy.deepcopy(layer).to(memory_format=NHWC), part,
                                 lambda make_x=make_x: make_x().detach().to(memory_format=NHWC).requires_grad_())
    moe = SwitchFFN(d, 4 * d, 4)
    ep = _strip(P.moe_experts(nn.Sequential(moe)), "0.")
    cases["moe_experts"] = (moe, ep.bind(moe), lambda: torch.randn(n_tok // 64, 64, d, requires_grad=True))
    return cases


def bench_layer(name: str, layer: nn.Module, part: Partition, make_x: Callable[[], Tensor],
                repeats: int) -> dict[str, Any]:
    """Backward time / FLOPs of ``layer`` at 50% active vs the plain layer."""
    torch.manual_seed(0)
    x = make_x()
    full = layer
    sliced = copy.deepcopy(layer)
    ctl = attach(sliced, copy.deepcopy(part))
    ctl.set_active(_active_fraction(part, 0.5))
    gy = torch.randn_like(full(x))

    def bwd_time(m: nn.Module) -> Callable[[], float]:
        def run() -> float:
            y = m(x)
            x.grad = None
            m.zero_grad(set_to_none=True)
            t0 = _CLOCK()
            y.backward(gy)
            return _CLOCK() - t0

        return run

    def bwd_flops(m: nn.Module) -> int:
        y = m(x)
        return _flops(lambda: y.backward(gy))

    t, ratio = _interleaved({"full": bwd_time(full), "half": bwd_time(sliced)}, repeats, "full")
    f_full, f_half = bwd_flops(full), bwd_flops(sliced)
    return {
        "what": "backward",
        "time_full_s": t["full"], "time_50_s": t["half"],
        "flops_full": f_full, "flops_50": f_half,
        "flops_ratio_50": f_half / f_full, "time_ratio_50": ratio["half"],
    }


# ----------------------------------------------------------------------------------- models
def _model_cases(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Partition],
                                               Callable[[], tuple[Tensor, ...]], str]]:
    b, t = (2, 32) if quick else (8, 128)
    vocab = 8000

    def mlm_batch() -> tuple[Tensor, ...]:
        ids = torch.randint(vocab, (b, t))
        labels = torch.where(torch.rand(b, t) < 0.15, ids, torch.full_like(ids, -100))
        return ids, labels

    vb, width = (4, 0.25) if quick else (64, 1.0)
    return {
        "bert_mlm_small_heads": (lambda: build_model("bert_mlm", size="small", vocab_size=vocab),
                                 P.attention_heads, mlm_batch, "mlm"),
        "vgg16_filters": (lambda: build_model("vgg16", width=width), P.conv_filters,
                          lambda: (torch.randn(vb, 3, 32, 32), torch.randint(10, (vb,))), "cls"),
        "vgg16_filters_nhwc": (lambda: build_model("vgg16", width=width).to(memory_format=NHWC), P.conv_filters,
                               lambda: (torch.randn(vb, 3, 32, 32).to(memory_format=NHWC), torch.randint(10, (vb,))),
                               "cls"),
        "vgg16_w0.25_filters_nhwc": (lambda: build_model("vgg16", width=width / 4).to(memory_format=NHWC),
                                     P.conv_filters,
                                     lambda: (torch.randn(vb, 3, 32, 32).to(memory_format=NHWC), torch.randint(10, (vb,))),
                                     "cls"),
        "switch_mlm_small_experts": (lambda: build_model("switch_mlm", size="small", num_experts=4, vocab_size=vocab),
                                     P.moe_experts, mlm_batch, "mlm"),
    }


def _step_fn(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, ...], task: str,
             opt_times: list[float]) -> Callable[[], None]:
    """One training step; appends the seconds ``opt.step()`` took to ``opt_times``."""
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(batch[0])
        if task == "mlm":
            loss = mlm_loss(out, batch[1]) + 0.01 * model.aux_loss()
        else:
            loss = nn.functional.cross_entropy(out, batch[1])
        loss.backward()
        t0 = _CLOCK()
        opt.step()
        opt_times.append(_CLOCK() - t0)

    return step


def bench_model(name: str, build: Callable[[], nn.Module], make_part: Callable[[nn.Module], Partition],
                make_batch: Callable[[], tuple[Tensor, ...]], task: str, repeats: int) -> dict[str, Any]:
    """Training-step time / FLOPs at each active fraction vs the plain model + torch AdamW."""
    torch.manual_seed(0)
    base = build().train()
    batch = make_batch()
    known = set(_functions.conv_kernel_choices())
    opt_t: dict[str, list[float]] = {}  # seconds of each optimizer step, per configuration
    steps: dict[str, Callable[[], None]] = {
        "full": _step_fn(base, torch.optim.AdamW(base.parameters(), **PLAIN_OPT), batch, task, opt_t.setdefault("full", []))
    }
    models: dict[str, nn.Module] = {"full": base}
    for frac in FRACTIONS:
        m = copy.deepcopy(base)
        part = make_part(m)
        ctl = attach(m, part)
        ctl.set_active(_active_fraction(part, frac))
        key = f"{int(frac * 100)}%"
        steps[key] = _step_fn(m, SlicedAdamW(m, ctl, **OPT), batch, task, opt_t.setdefault(key, []))
        models[key] = m
    # 50% with a new random set every step, the worst case for set changes (Rand draws a set per
    # epoch, MAT per interval): the step then also pays set_active and the optimizer's write-back
    # and re-gather of the Adam moments
    m = copy.deepcopy(base)
    part = make_part(m)
    ctl = attach(m, part)
    masks = itertools.cycle([_active_fraction(part, 0.5, seed=s) for s in range(8)])
    step50 = _step_fn(m, SlicedAdamW(m, ctl, **OPT), batch, task, opt_t.setdefault("50% resampled", []))

    def resampled(ctl: Any = ctl) -> None:
        ctl.set_active(next(masks))
        step50()

    steps["50% resampled"], models["50% resampled"] = resampled, m
    # The floor: the plain model with every covered parameter frozen (native kernels, no weight
    # gradient and no update for them). A partial backward with no overhead, whose weight-gradient
    # and optimizer work were linear in the active fraction f, would take t0 + f·(t_plain − t0).
    # The configurations above compute every layer's input gradient (each layer keeps an active
    # group); so does the anchor: an image input requires grad (else a network whose covered
    # parameters are all frozen would stop its backward at the classifier). That adds the first
    # layer's input gradient, which the others skip: the floor errs high.
    m = copy.deepcopy(base)
    covered = {s.param for g in make_part(m) for s in g.slices}
    for n, p in m.named_parameters():
        p.requires_grad_(n not in covered)
    x0 = batch[0].detach().requires_grad_(batch[0].is_floating_point())
    anchor = _step_fn(m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], **PLAIN_OPT),
                      (x0, *batch[1:]), task, opt_t.setdefault(FROZEN, []))

    def frozen(x0: Tensor = x0) -> None:
        x0.grad = None
        anchor()

    steps[FROZEN], models[FROZEN] = frozen, m

    # Every step (timed or counted) starts from the initial weights: the steps train, and a MoE
    # routes by its weights, so without the reset the counted FLOPs would not be those timed (and
    # would depend on the repeat count). Optimizer moments are left to evolve (they do not change
    # the work done).
    start = [t.detach().clone() for t in (*base.parameters(), *base.buffers())]

    def reset(m: nn.Module) -> None:
        with torch.no_grad():
            for t, t0 in zip((*m.parameters(), *m.buffers()), start, strict=True):
                t.copy_(t0)
        torch.manual_seed(1)  # same dropout / routing randomness for every configuration

    def timed(k: str) -> Callable[[], float]:
        def run() -> float:
            reset(models[k])
            t0 = _CLOCK()
            steps[k]()
            return _CLOCK() - t0

        return run

    t, ratio = _interleaved({k: timed(k) for k in steps}, repeats, "full")
    opt_s = {k: statistics.median(v[-repeats:]) for k, v in opt_t.items()}  # the timed repeats
    flops = {}
    for k, fn in steps.items():
        reset(models[k])
        flops[k] = _flops(fn)
    res: dict[str, Any] = {"what": "training step", "time_s": t, "opt_time_s": opt_s, "flops": flops,
                           "conv_weight_grad_kernels": _kernel_choices(known)}
    res["flops_ratio"] = {k: flops[k] / flops["full"] for k in steps}
    res["time_ratio"] = ratio
    r0 = ratio[FROZEN]  # the anchor's time over the plain step's (paired, as the time ratios)
    res["floor_ratio"] = {k: r0 + _fraction(k) * (1 - r0) for k in steps if k != FROZEN}
    res["flops_ratio_50"], res["time_ratio_50"] = res["flops_ratio"]["50%"], res["time_ratio"]["50%"]
    res["floor_ratio_50"] = res["floor_ratio"]["50%"]
    return res


def _kernel_choices(before: set[str]) -> dict[str, Any]:
    """The convolution kernel setting (``$NTKIT_CONV_WGRAD``) and, under ``tune``, the kernel chosen
    for each problem first met since ``before`` (signature: input shape / layouts / weight shape /
    active eighths / … → native, gemm or dense) with how many problems went to each."""
    new = {k: v for k, v in _functions.conv_kernel_choices().items() if k not in before}
    return {"setting": os.environ.get("NTKIT_CONV_WGRAD") or "tune",
            "counts": {k: sum(v == k for v in new.values()) for k in ("native", "gemm", "dense")},
            "tuned": dict(sorted(new.items()))}


def _fraction(key: str) -> float:
    """The active fraction of a configuration key ("full" → 1, "50% resampled" → 0.5)."""
    return 1.0 if key == "full" else int(key.split("%")[0]) / 100


# ----------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ntkit bench backward", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    names = list(_layer_cases(True)) + list(_model_cases(True))
    ap.add_argument("--only", nargs="+", default=None, choices=names, metavar="CASE",
                    help=f"subset of cases to run: {', '.join(names)}")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time (steadier on a busy machine)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON output path (default {DEFAULT_OUT.relative_to(DEFAULT_OUT.parents[2])}; "
                         "with --quick, none unless given)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats={args.repeats}: expected an integer >= 1")
    repeats = args.repeats or (3 if args.quick else 7)
    global _CLOCK
    _CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    malloc = "glibc, freed memory kept for reuse" if tune_cpu_allocator() else "system default"
    results: dict[str, dict[str, Any]] = {}
    for name, (layer, part, make_x) in _layer_cases(args.quick).items():
        if args.only is None or name in args.only:
            results[name] = bench_layer(name, layer, part, make_x, 3 * repeats)  # cheap: more repeats
    for name, (build, make_part, make_batch, task) in _model_cases(args.quick).items():
        if args.only is None or name in args.only:
            results[name] = bench_model(name, build, make_part, make_batch, task, repeats)

    print(f"partial backward, torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {malloc}, "
          f"{repeats} interleaved repeats (time: medians; ratios: paired per repeat), {args.clock} clock{' [quick]' if args.quick else ''}")
    print(f"{'case':<28}{'measured':<15}{'active':>14}{'time s':>10}{'time ratio':>12}{'FLOP ratio':>12}{'ok':>5}"
          f"{'optimizer s':>13}{'floor':>8}")
    for name, r in results.items():
        if r["what"] == "backward":
            rows = [("100%", r["time_full_s"], 1.0, 1.0, None, None),
                    ("50%", r["time_50_s"], r["time_ratio_50"], r["flops_ratio_50"], None, None)]
        else:
            rows = [(k, r["time_s"][k], r["time_ratio"][k], r["flops_ratio"][k], r["opt_time_s"][k],
                     r["floor_ratio"].get(k)) for k in r["time_s"] if k != "full"]
            rows.insert(0, ("plain", r["time_s"]["full"], 1.0, 1.0, r["opt_time_s"]["full"], 1.0))
        for k, ts, tr, fr, os_, fl in rows:
            ok = "" if k != "50%" else ("yes" if tr <= fr + 0.05 else "NO")
            opt_col = "" if os_ is None else f"{os_:.4f}"
            fl_col = "" if fl is None else f"{fl:.3f}"
            print(f"{name:<28}{r['what']:<15}{k:>14}{ts:>10.4f}{tr:>12.3f}{fr:>12.3f}{ok:>5}{opt_col:>13}{fl_col:>8}")
    summary = {k: {key: round(v[key], 4) for key in ("flops_ratio_50", "time_ratio_50", "floor_ratio_50") if key in v}
               for k, v in results.items()}
    payload = {
        "config": {"quick": args.quick, "repeats": repeats, "clock": args.clock, "threads": torch.get_num_threads(),
                   "malloc": malloc, "torch": torch.__version__, "platform": platform.platform(), "only": args.only},
        "results": results,
        "summary": summary,
    }
    out = args.out if args.out is not None or args.quick else DEFAULT_OUT
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
