"""Which modules a random baseline governs (Rand, Multirate), and config validators shared with
MAT (private)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ntkit.errors import check
from ntkit.partition import Partition

__all__ = ["SEED_MAX", "check_kinds", "check_seed", "governed_mask"]

SEED_MAX = 2**64 - 1  # the largest seed torch.Generator.manual_seed accepts


def check_seed(seed: object, field: str) -> None:
    """A generator seed: an integer in [0, 2**64 − 1] (what ``torch.Generator.manual_seed`` takes)."""
    ok = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX
    check(ok, field, seed, "an integer in [0, 2**64 - 1]")


def check_kinds(kinds: object, field: str) -> None:
    ok = kinds is None or (
        isinstance(kinds, (list, tuple)) and len(kinds) > 0 and all(isinstance(k, str) for k in kinds)
    )
    check(ok, field, kinds, "None (all kinds) or a non-empty list of kind names")


def governed_mask(partition: Partition, kinds: Sequence[str] | None, field: str) -> Tensor:
    """bool [M]: modules of the selected kinds (all when ``kinds`` is None); at least one."""
    sel = partition.kind_mask(kinds)
    check(bool(sel.any()), field, kinds, f"kinds present in the partition {sorted(set(partition.kinds))}")
    return sel
