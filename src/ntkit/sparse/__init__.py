"""Structured sparsity that saves real compute.

* :func:`attach` / :class:`SparseController` — partial backward: weight gradients are computed
  only for the active partition groups (custom autograd, not a full backward then zeroing), and
  structured pruning (pruned groups act as zero in the forward pass and cost nothing). The one
  exception is measured: where a convolution's sliced backward runs slower than its full one on
  this machine, the full one runs (``$NTKIT_CONV_WGRAD``, :func:`conv_kernel_choices`), and the
  FLOP counter counts its work.
* :class:`SlicedAdamW` — AdamW that updates only the active slices, with per-slice step counts
  and an optional per-group learning-rate multiplier; :class:`SlicedSGD` — SGD with momentum and
  weight decay with the same sliced semantics (the paper's VGG optimizer).
* :func:`remove_groups` / :func:`replay` / :func:`carry_optimizer_state` — surgery that physically
  removes pruned heads, experts and filters (:class:`StructureChange`).
"""

from __future__ import annotations

from ntkit.sparse._functions import conv_kernel_choices, load_conv_kernel_choices
from ntkit.sparse.controller import ParamSlicing, SparseController, attach
from ntkit.sparse.optim import SlicedAdamW, SlicedSGD
from ntkit.sparse.surgery import StructureChange, carry_optimizer_state, remove_groups, replay

__all__ = [
    "ParamSlicing",
    "SlicedAdamW",
    "SlicedSGD",
    "SparseController",
    "StructureChange",
    "attach",
    "carry_optimizer_state",
    "conv_kernel_choices",
    "load_conv_kernel_choices",
    "remove_groups",
    "replay",
]
