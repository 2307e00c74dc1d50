"""Importance scores: callables that map a model's module groups to numbers (STYLE.md §6).

Scoring is kept apart from masking (the controller) and from decisions (``policies``):

* :func:`ntk_lambda_max` — principal eigenvalue of each module's mNTK (MAT's criterion), computed
  by the engine :func:`ntkit.modular_ntk` + :func:`ntkit.spectrum`.
* :func:`snip_scores` — structured SNIP (Lee et al. 2019, applied per module as in seed 000
  Table 5): Σ |θ ⊙ ∂L/∂θ| over the module's parameter slices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import check
from ntkit.methods._common import native_layers
from ntkit.partition import Partition

__all__ = ["ntk_lambda_max", "snip_scores"]


def ntk_lambda_max(
    model: nn.Module,
    inputs: object,
    partition: Partition,
    output_mask: Tensor | None = None,
    *,
    controller: Any = None,
) -> Tensor:
    """λmax of each module's mNTK on the given samples (scalar output: sum of logits).

    The model is put in eval mode for the measurement (the engine needs samples that do not
    interact: no dropout, eval-mode norms, unlimited MoE capacity) and restored afterwards.

    Args:
        model: the network.
        inputs: S samples in the form :func:`ntkit.modular_ntk` takes.
        partition: the modules to measure (M groups).
        output_mask: MLM masked positions [S, T] (bool), or None for classifiers.
        controller: the :class:`ntkit.sparse.SparseController` attached to ``model``, if any: the
            measurement then runs on native layers with pruned slices zeroed (the same function as
            the pruned forward; see ``ntkit.methods._common.native_layers``), whatever the active set.

    Returns:
        float64 [M] on CPU, λmax per module (units: logit², an NTK eigenvalue; MAT only compares
        values within a kind).
    """
    import ntkit

    was_training = model.training
    model.eval()
    try:
        with native_layers(controller, model):
            res = ntkit.modular_ntk(model, inputs, partition, output="sum_logits", output_mask=output_mask)
            lmax = ntkit.spectrum(res.grams).lambda_max
    finally:
        model.train(was_training)
    return torch.as_tensor(lmax).detach().to(device="cpu", dtype=torch.float64).reshape(len(partition))


def snip_scores(
    model: nn.Module,
    partition: Partition,
    loss_fn: Callable[[nn.Module], Tensor],
    *,
    num_batches: int = 1,
) -> Tensor:
    """Structured SNIP connection sensitivity per module.

    score_l = Σ_{slices s of l} Σ |θ_s ⊙ ḡ_s|, with ḡ = (1/num_batches) Σ_b ∂L_b/∂θ the gradient
    of the loss averaged over ``num_batches`` calls of ``loss_fn`` (each call draws and scores one
    labelled batch). A plain full backward: SNIP's own cost, to be booked as overhead by the
    caller. Parameter ``.grad`` fields are left untouched (``torch.autograd.grad``); parameters
    that do not require grad (frozen, or switched off by a sparse controller) score 0 — make the
    modules to score active first.

    Args:
        model: the network (its current train/eval mode is used).
        partition: M module groups.
        loss_fn: ``loss_fn(model)`` → scalar loss tensor on one labelled batch.
        num_batches: number of ``loss_fn`` calls to average (≥ 1).

    Returns:
        float64 [M] on CPU, ≥ 0.
    """
    check(isinstance(num_batches, int) and num_batches >= 1, "num_batches", num_batches, "an integer >= 1")
    params = dict(model.named_parameters())
    names = partition.covered_params()
    tensors = [params[n] for n in names]
    grads = [torch.zeros_like(p) for p in tensors]
    live = [i for i, p in enumerate(tensors) if p.requires_grad]
    for _ in range(num_batches):
        loss = loss_fn(model)
        check(loss.dim() == 0, "loss_fn", tuple(loss.shape), "a scalar loss tensor")
        gs = torch.autograd.grad(loss, [tensors[i] for i in live], allow_unused=True)
        for i, g in zip(live, gs):
            if g is not None:
                grads[i].add_(g.detach())
    sens = {n: (p.detach() * g / num_batches).abs() for n, p, g in zip(names, tensors, grads)}
    out = torch.zeros(len(partition), dtype=torch.float64)
    for gi, group in enumerate(partition):
        out[gi] = sum(float(s.select(sens[s.param]).sum(dtype=torch.float64)) for s in group.slices)
    return out
