"""``torch.distributed`` helpers for running the same loops under ``torchrun`` (DESIGN.md §7).

Every helper is the identity / a no-op when no process group is initialised, so a loop written
with them runs unchanged in a single process. Decisions that must be identical on all ranks
(MAT's active set, a pruning mask) are made on rank 0 and sent with :func:`broadcast_object` /
:func:`broadcast_tensor`, or computed from all-reduced statistics (:func:`all_reduce_mean_`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_mean_",
    "barrier",
    "broadcast_object",
    "broadcast_tensor",
    "init_from_env",
    "is_distributed",
    "is_main",
    "main_process_first",
    "rank",
    "world_size",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process' global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 — the process that writes reports, checkpoints and logs."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment variables.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, or when already initialised.
    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise; on CUDA the current device
    is set to ``LOCAL_RANK``.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    return True


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Every rank receives ``src``'s ``obj`` (any picklable object; tensors come back on CPU)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``src``'s copy of ``t`` on every rank, on ``t``'s device (``t`` itself when not distributed
    or with one process). Shape and dtype must agree on all ranks.

    Measurements can differ in the last bits between ranks (different data shards or kernels), so
    the scores a decision is taken from (λmax for MAT's active set, saliencies for a mask) are
    broadcast before deciding. NCCL needs a CUDA buffer: the tensor travels through the current
    CUDA device there, through the CPU otherwise.
    """
    if not is_distributed() or world_size() == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.detach().to(dev).contiguous()
    dist.broadcast(buf, src=src)
    return buf.to(t.device)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean of ``tensor`` over ranks (e.g. per-module Grams or λ estimates); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


@contextmanager
def main_process_first() -> Iterator[Any]:
    """Rank 0 runs the block first (e.g. downloading / tokenising a dataset), the others after."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
