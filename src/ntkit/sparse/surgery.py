"""Physical surgery: remove pruned heads / experts / filters, so the model really gets smaller.

The contract with the training loop (see :mod:`ntkit.methods.base`): a method that removes
modules hands the loop a :class:`StructureChange`; the loop rebuilds the sparse controller and
the optimizer (carrying each surviving slice's state over with :attr:`StructureChange.kept`) and
re-binds the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ntkit.partition import Partition

__all__ = ["StructureChange"]


@dataclass
class StructureChange:
    """The result of surgery.

    Attributes:
        model: the model after surgery (usually the same object, its parameters replaced).
        partition: the partition of the new model (removed groups gone, the others re-indexed).
        kept: parameter name (unchanged by surgery) → ``(dim, indices)``: the new parameter is the
            old one's ``index_select(dim, indices)``. Parameters whose shape did not change are
            absent; parameters removed entirely map to ``(dim, empty indices)``.
        removed: names of the partition groups that were removed (JSON-able; replaying the same
            removals on a freshly built model reproduces the structure, e.g. to load a pruned
            checkpoint).
    """

    model: nn.Module
    partition: Partition
    kept: dict[str, tuple[int, Tensor]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
