"""Structured sparsity that saves real compute.

* :func:`attach` / :class:`SparseController` — partial backward: weight gradients are computed
  only for the active partition groups (custom autograd, never a full backward then zeroing), and
  structured pruning (pruned groups act as zero in the forward pass and cost nothing).
* :class:`SlicedAdamW` — AdamW that updates only the active slices, with per-slice step counts
  and an optional per-group learning-rate multiplier.
"""

from __future__ import annotations

from ntkit.sparse.controller import ParamSlicing, SparseController, attach
from ntkit.sparse.optim import SlicedAdamW

__all__ = ["ParamSlicing", "SlicedAdamW", "SparseController", "attach"]
