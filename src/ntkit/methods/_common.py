"""Small helpers shared by the method implementations (private)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ntkit.errors import check
from ntkit.partition import Partition
from ntkit.pruning.pruner import controller_pruned
from ntkit.train.dist import broadcast_tensor as broadcast_from_rank0  # rank 0's scores on every rank

__all__ = [
    "apply_active",
    "bool_list",
    "broadcast_from_rank0",
    "check_per_kind",
    "controller_pruned",
    "generator_state",
    "kind_ids",
    "native_layers",
    "overhead",
    "per_kind",
    "set_generator_state",
    "unwrap",
]

def per_kind(value: float | Mapping[str, float], kind: str) -> float | None:
    """Resolve a per-kind setting: a number applies to every kind; a mapping to its keys only."""
    if isinstance(value, Mapping):
        v = value.get(kind)
        return None if v is None else float(v)
    return float(value)


def check_per_kind(value: object, field: str, lo: float, hi: float | None) -> None:
    """Validate a number or ``{kind: number}`` mapping with every value in ``[lo, hi]``."""
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    expected = f"a number {rng} or a mapping kind -> number {rng}"
    vals = list(value.values()) if isinstance(value, Mapping) else [value]
    if isinstance(value, Mapping):
        check(len(value) > 0 and all(isinstance(k, str) for k in value), field, value, expected)
    for v in vals:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        check(ok, field, value, expected)


def apply_active(controller: Any, active: Tensor) -> None:
    """Send an active set (bool [M]) to the controller, if bound."""
    if controller is not None:
        controller.set_active(active.clone())


def overhead(ctx: Any) -> contextlib.AbstractContextManager:
    """``ctx.count_overhead()`` when the loop provides it, else a no-op context."""
    fn = getattr(ctx, "count_overhead", None)
    return fn() if fn is not None else contextlib.nullcontext()


def generator_state(g: torch.Generator) -> list[int]:
    """A CPU generator's state as a JSON-able list of bytes."""
    return g.get_state().tolist()


def set_generator_state(g: torch.Generator, state: list[int] | Tensor) -> None:
    g.set_state(torch.as_tensor(state, dtype=torch.uint8))


def bool_list(t: Tensor) -> list[bool]:
    return [bool(x) for x in t.tolist()]


def kind_ids(partition: Partition, per_layer: bool) -> Tensor:
    """int64 [M]: one id per kind (or per (kind, layer) when ``per_layer``)."""
    ids: dict[tuple[str, str], int] = {}
    keys = [(g.kind, g.layer if per_layer else "") for g in partition]
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def native_layers(controller: Any, model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    """The controller's :meth:`~ntkit.sparse.SparseController.dense_view` (native layer classes,
    pruned slices zeroed, restored bit for bit on exit) — so the mNTK engine measures with its
    fast per-sample rules the function the pruned forward computes; a no-op without a controller."""
    view = getattr(controller, "dense_view", None)
    return view() if view is not None else contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model
