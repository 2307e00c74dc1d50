"""Which modules a random baseline governs, shared by Rand and Multirate (private)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ntkit.errors import check
from ntkit.partition import Partition

__all__ = ["check_kinds", "governed_mask"]


def check_kinds(kinds: object, field: str) -> None:
    ok = kinds is None or (
        isinstance(kinds, (list, tuple)) and len(kinds) > 0 and all(isinstance(k, str) for k in kinds)
    )
    check(ok, field, kinds, "None (all kinds) or a non-empty list of kind names")


def governed_mask(partition: Partition, kinds: Sequence[str] | None, field: str) -> Tensor:
    """bool [M]: modules of the selected kinds (all when ``kinds`` is None); at least one."""
    sel = torch.tensor([kinds is None or g.kind in kinds for g in partition], dtype=torch.bool)
    check(bool(sel.any()), field, kinds, f"kinds present in the partition {sorted(set(partition.kinds))}")
    return sel
