"""A tiny training job used by the exact-resume tests, in-process and as a subprocess.

Everything that must be restored is exercised: dropout (torch RNG), numpy and Python ``random``
draws, Adam state, a StepLR schedule, and a shuffled, ragged batch order (50 samples, batch 8).

As a script: ``python train_resume_job.py OUT_DIR TOTAL_STEPS THREADS [--slow-after K]`` trains
(resuming from OUT_DIR's checkpoints if any), prints ``saved <step>`` after every checkpoint and
writes ``final.pt`` (the model's state_dict) at the end.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ntkit.train import CheckpointManager, SeededBatchSampler


def train(
    out_dir: Path, total_steps: int, stop_after: int | None = None, slow_after: int | None = None
) -> nn.Module:
    """Train to ``total_steps`` (or return after ``stop_after`` steps of this call's counting)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    sampler = SeededBatchSampler(50, 8, seed=3)
    mgr = CheckpointManager(out_dir, keep_last=2)
    state = mgr.resume(model, opt, sched, stateful={"sampler": sampler})
    step = state.step + 1 if state is not None else 0
    while step < total_steps:
        for idx in sampler:
            noise = float(np.random.randn()) * 1e-2
            scale = 1.0 + random.random() * 1e-2
            loss = F.cross_entropy(model(x[idx] + noise), y[idx]) * scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            mgr.save(model, opt, sched, step, stateful={"sampler": sampler})
            print(f"saved {step}", flush=True)
            step += 1
            if step == total_steps or (stop_after is not None and step == stop_after):
                return model
            if slow_after is not None and step > slow_after:
                time.sleep(0.2)
    return model


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir", type=Path)
    p.add_argument("total_steps", type=int)
    p.add_argument("threads", type=int)
    p.add_argument("--slow-after", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = train(a.out_dir, a.total_steps, slow_after=a.slow_after)
    torch.save(model.state_dict(), a.out_dir / "final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
