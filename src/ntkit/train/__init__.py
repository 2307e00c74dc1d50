"""The small shared pieces of a training loop.

* :mod:`ntkit.train.flops` — :class:`FlopCounter`: executed FLOPs per phase (forward / backward /
  overhead), :func:`format_flops`.
* :mod:`ntkit.train.log` — :class:`MetricsLogger` (JSONL + optional TensorBoard), :func:`read_jsonl`.
* :mod:`ntkit.train.checkpoint` — atomic :func:`save_checkpoint` / :func:`load_checkpoint`,
  :class:`CheckpointManager` (keep last k), RNG capture, :func:`seed_everything`.
* :mod:`ntkit.train.dist` — ``torch.distributed`` helpers (rank, broadcast of decisions, mean
  all-reduce), identity in a single process.
* :mod:`ntkit.train.sampler` — :class:`SeededBatchSampler`, a deterministic batch order whose
  position is saved in checkpoints.
* :mod:`ntkit.train.allocator` — :func:`tune_cpu_allocator`: glibc keeps freed CPU memory for
  reuse instead of page-faulting every step's multi-MB tensors back in (``ntkit`` commands and
  the benchmarks call it; ``NTKIT_MALLOC=system`` opts out).

A loop with exact resume::

    sampler = SeededBatchSampler(len(x), 64, seed=0)
    ckpt = CheckpointManager(out_dir / "ckpt", keep_last=2)
    state = ckpt.resume(model, opt, sched, stateful={"sampler": sampler})
    step = state.step + 1 if state else 0
    while step < total_steps:
        for idx in sampler:
            ...  # forward, backward, opt.step(), sched.step()
            ckpt.save(model, opt, sched, step, stateful={"sampler": sampler})
            step += 1
            if step == total_steps:
                break
"""

from __future__ import annotations

from ntkit.train import dist
from ntkit.train.allocator import tune_cpu_allocator
from ntkit.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    atomic_write,
    atomic_write_text,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from ntkit.train.flops import FlopCounter, PhaseStats, format_flops, reference_flops
from ntkit.train.log import MetricsLogger, read_jsonl
from ntkit.train.sampler import SeededBatchSampler

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "FlopCounter",
    "MetricsLogger",
    "PhaseStats",
    "SeededBatchSampler",
    "atomic_write",
    "atomic_write_text",
    "dist",
    "format_flops",
    "get_rng_state",
    "load_checkpoint",
    "read_jsonl",
    "reference_flops",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "tune_cpu_allocator",
]
