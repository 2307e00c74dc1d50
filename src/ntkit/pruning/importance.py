"""Importance criteria: callables that map a model's module groups to scores (STYLE.md §6).

Every scorer is called as ``scorer(model, partition, data)`` and returns a float64 CPU tensor
[M] (one score per partition group, M = ``len(partition)``; **higher = more important**). What a
scorer needs beyond the model is in ``data``, a :class:`ScoreData`:

* ``loss_fn(model)`` → the scalar loss of one labelled batch (each call may draw a new batch);
  ``num_batches`` calls are averaged (SNIP);
* ``inputs`` / ``output_mask``: S samples in the form :func:`ntkit.modular_ntk` takes, and the MLM
  masked positions [S, T] bool (None for classifiers) (λmax of the mNTK);
* ``controller``: the :class:`ntkit.sparse.SparseController` attached to the model, if any (the
  λmax measurement then runs on native layers with pruned slices zeroed).

Scorers never decide and never mask: :class:`ntkit.pruning.Pruner` takes their scores, and it
refuses to act on a non-finite eligible score (a scorer may return NaN / ±Inf, e.g. a
diverged model; nothing here hides that).

Built-in scorers (also by name through :func:`get_scorer`): :class:`Magnitude` (``"l1"``,
``"l2"``), :class:`RandomScore` (``"random"``), :class:`Snip` (``"snip"``),
:class:`LambdaMax` (``"lambda_max"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.partition import Partition

__all__ = [
    "SCORERS",
    "LambdaMax",
    "Magnitude",
    "RandomScore",
    "ScoreData",
    "Scorer",
    "Snip",
    "get_scorer",
    "ntk_lambda_max",
    "snip_scores",
]


@dataclass
class ScoreData:
    """What data-driven scorers read (each field only by the scorers that need it).

    Attributes:
        loss_fn: ``loss_fn(model)`` → scalar loss tensor on one labelled batch (SNIP).
        num_batches: ≥ 1 calls of ``loss_fn`` whose gradients are averaged (SNIP).
        inputs: S samples in the form :func:`ntkit.modular_ntk` takes (λmax).
        output_mask: MLM masked positions [S, T] bool, None for classifiers (λmax).
        controller: the sparse controller attached to the model, or None (λmax).
    """

    loss_fn: Callable[[nn.Module], Tensor] | None = None
    num_batches: int = 1
    inputs: object = None
    output_mask: Tensor | None = None
    controller: Any = None

    def __post_init__(self) -> None:
        ok = isinstance(self.num_batches, int) and not isinstance(self.num_batches, bool)
        check(ok and self.num_batches >= 1, "num_batches", self.num_batches, "an integer >= 1")


class Scorer(Protocol):
    """``scorer(model, partition, data)`` → float64 [M] on CPU, higher = more important;
    ``name`` is what pruning records call the criterion."""

    name: str

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor: ...


# ----------------------------------------------------------------------------------- functions
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
            measurement then runs inside its ``dense_view`` (native layers, pruned slices zeroed:
            the same function as the pruned forward), whatever the active set.

    Returns:
        float64 [M] on CPU, λmax per module (units: logit², an NTK eigenvalue; compare values
        within a kind only).
    """
    import ntkit

    view = getattr(controller, "dense_view", None)
    was_training = model.training
    model.eval()
    try:
        with view() if view is not None else contextlib.nullcontext():
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
    """Structured SNIP connection sensitivity per module (Lee et al. 2019, per module as in
    seed 000 Table 5).

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
        float64 [M] on CPU, ≥ 0 (NaN where the loss or its gradient is).
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
    return _group_sums(partition, sens)


def _group_sums(partition: Partition, per_elem: dict[str, Tensor]) -> Tensor:
    """Σ over each group's slices of ``per_elem[param]`` (float64 [M] on CPU)."""
    out = torch.zeros(len(partition), dtype=torch.float64)
    for gi, group in enumerate(partition):
        out[gi] = sum(float(s.select(per_elem[s.param]).sum(dtype=torch.float64)) for s in group.slices)
    return out


# ----------------------------------------------------------------------------------- scorers
@dataclass(frozen=True)
class Magnitude:
    """Norm of a group's weights: ``p = 1`` → Σ |θ| over all its slices; ``p = 2`` →
    sqrt(Σ θ²) over all its slices (one norm of the concatenated slices, not a sum of norms).
    Data-free (``data`` is ignored)."""

    p: int = 1

    def __post_init__(self) -> None:
        check(self.p in (1, 2), "p", self.p, "1 or 2")

    @property
    def name(self) -> str:
        return f"l{self.p}"

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        params = dict(model.named_parameters())
        names = partition.covered_params()
        with torch.no_grad():
            per = {n: params[n].detach().abs() if self.p == 1 else params[n].detach().square() for n in names}
        out = _group_sums(partition, per)
        return out if self.p == 1 else out.sqrt()


@dataclass(frozen=True)
class RandomScore:
    """Uniform [0, 1) scores from a fresh CPU generator seeded ``seed`` at every call (the same
    partition size gives the same scores). Data-free."""

    seed: int = 0
    name: str = "random"

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        g = torch.Generator().manual_seed(int(self.seed))
        return torch.rand(len(partition), generator=g, dtype=torch.float64)


@dataclass(frozen=True)
class Snip:
    """Structured SNIP (:func:`snip_scores`) on ``data.loss_fn`` × ``data.num_batches``."""

    name: str = "snip"

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        if data is None or data.loss_fn is None:
            raise ConfigError("data.loss_fn=None: expected a callable model -> scalar loss (SNIP needs labels)")
        return snip_scores(model, partition, data.loss_fn, num_batches=data.num_batches)


@dataclass(frozen=True)
class LambdaMax:
    """λmax of each module's mNTK (:func:`ntk_lambda_max`) on ``data.inputs`` /
    ``data.output_mask``, through ``data.controller``'s dense view when given."""

    name: str = "lambda_max"

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        if data is None or data.inputs is None:
            raise ConfigError("data.inputs=None: expected the samples the mNTK is measured on")
        return ntk_lambda_max(model, data.inputs, partition, data.output_mask, controller=data.controller)


#: name → scorer factory (keyword arguments as the class takes).
SCORERS: dict[str, Callable[..., Scorer]] = {
    "l1": lambda **kw: Magnitude(p=1, **kw),
    "l2": lambda **kw: Magnitude(p=2, **kw),
    "random": RandomScore,
    "snip": Snip,
    "lambda_max": LambdaMax,
}


def get_scorer(name: str, **kw: Any) -> Scorer:
    """The built-in scorer ``name`` (one of :data:`SCORERS`) built with ``kw``."""
    check(name in SCORERS, "criterion", name, f"one of {sorted(SCORERS)}")
    return SCORERS[name](**kw)
