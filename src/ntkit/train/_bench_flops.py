"""Benchmark: the cost of FLOP counting during training, as a ratio to a plain step.

``python -m ntkit.train._bench_flops [--model vit_tiny] [--batch 64] [--rounds 12] [--out FILE.json]``

Variants, measured in interleaved rounds in the same process (min per variant, so a busy machine
inflates all of them alike): a plain training step; :class:`FlopCounter` counting every step;
with ``key=`` the batch shape (counted once, re-used); with ``sample_every=10``; and
``torch.utils.flop_counter.FlopCounterMode`` entered around forward and backward. Prints the
ratio of each to the plain step and the FLOPs each counted.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ntkit.train.flops import FlopCounter, format_flops

__all__ = ["main"]


def _step_fn(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    variant: str,
    counter: FlopCounter | None,
    fcm_total: list[int],
) -> Callable[[], None]:
    def plain() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def counted() -> None:
        assert counter is not None
        key = tuple(x.shape) if variant == "key" else None
        with counter.phase("forward", key=key):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        with counter.phase("backward", key=key):
            loss.backward()
        opt.step()

    def fcm() -> None:
        with FlopCounterMode(display=False) as m1:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        with FlopCounterMode(display=False) as m2:
            loss.backward()
        opt.step()
        fcm_total[0] += m1.get_total_flops() + m2.get_total_flops()

    return {"plain": plain, "fcm": fcm}.get(variant, counted)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ntkit.train._bench_flops", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="vit_tiny", help="registered model (image input [B, 1, 8, 8])")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds (min per variant)")
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    from ntkit.models import build_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(a.model)
    x = torch.randn(a.batch, 1, 8, 8)
    y = torch.randint(0, 10, (a.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    labels = {
        "plain": "plain step",
        "every": "FlopCounter, every step",
        "key": "FlopCounter, key=batch shape",
        "sampled": "FlopCounter, sample_every=10",
        "fcm": "FlopCounterMode per phase",
    }
    counters = {"every": FlopCounter(), "key": FlopCounter(), "sampled": FlopCounter(sample_every=10)}
    fcm_total = [0]
    steps = {v: _step_fn(model, x, y, opt, v, counters.get(v), fcm_total) for v in labels}
    best = dict.fromkeys(labels, float("inf"))
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(a.rounds):
        for v, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            best[v] = min(best[v], (time.perf_counter() - t0) / a.steps)
    calls = 1 + a.rounds * a.steps
    flops = {v: c.training_flops / calls for v, c in counters.items()}
    flops["fcm"] = fcm_total[0] / calls
    rows = []
    print(f"{a.model}, batch {a.batch}, {a.threads} thread(s); plain step {best['plain'] * 1e3:.2f} ms")
    for v, label in labels.items():
        ratio = best[v] / best["plain"]
        rows.append(
            {
                "variant": label,
                "seconds_per_step": best[v],
                "ratio_vs_plain": ratio,
                "flops_per_step": flops.get(v),
            }
        )
        extra = f"  {format_flops(flops[v])}/step" if v in flops else ""
        print(f"  {label:32s} {ratio:6.3f}x{extra}")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps({"config": vars(a) | {"out": str(a.out)}, "results": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
