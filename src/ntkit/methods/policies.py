"""Pure decision rules shared by MAT and its baselines (no model, no controller, no state).

Every function maps tensors to tensors so it can be tested on hand-computed cases. Conventions:
``M`` is the number of modules in the partition, boolean tensors are ``torch.bool`` of shape
``[M]``, scores and eigenvalues are float tensors of shape ``[M]`` (float64 recommended).

Readings of the papers (seed 000 §B.1, seed 001 Eq. 4–7) that these rules fix:

* **Modular policy** (Eq. 4–5): λ_α = min λmax + (max λmax − min λmax)·α over the modules of one
  kind; a module is active iff λmax > λ_α (strict, as Eq. 5 puts λmax = λ_α in the inactive set).
  When all λmax are equal no module passes; the protecting strategy then keeps one per layer.
* **Temporal policy** (Eq. 6–7): Δ_t = |λmax(t) − λmax(t−1)| between consecutive evaluations.
  Δ_1 is the *first* difference, available after the 2nd evaluation of a module; the ratio
  Δ_t / Δ_1 is tested from the 3rd evaluation on (at the 2nd it is 1 by definition). A module
  is retired when Δ_t / Δ_1 < β and stays retired. 0/0 reads as 0 (a kernel that never moved is
  converged), x/0 with x > 0 as +∞ (never retire on that evaluation).
* **Protecting strategy** (seed 000 §B.1: "maintains the gradient of at least one head or expert
  in each layer"): the rule is *at least one* active module per layer. Only a layer left with no
  active module is touched: its eligible module with the largest score is switched on, preferring
  modules that are not retired (a retired module is only revived when the whole layer is
  retired — otherwise the layer would stop learning, which the strategy exists to prevent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkit.errors import check

__all__ = [
    "TemporalStep",
    "layer_index",
    "modular_policy",
    "protect",
    "prune_lowest",
    "random_subset",
    "temporal_policy",
]


def layer_index(layers: Sequence[str]) -> Tensor:
    """Map layer names to consecutive ids: ``["a", "b", "a"]`` → ``tensor([0, 1, 0])`` (int64 [M])."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(lay, len(ids)) for lay in layers], dtype=torch.long)


def modular_policy(lmax: Tensor, alpha: float) -> tuple[Tensor, float]:
    """Modular policy for the modules of one kind.

    Args:
        lmax: principal mNTK eigenvalues λmax, float [n] (n ≥ 1).
        alpha: α ∈ [0, 1], the position of the threshold between the smallest and largest λmax.

    Returns:
        ``(active, threshold)``: bool [n], True iff λmax > λ_α; and λ_α (a Python float, in the
        units of λmax).
    """
    check(lmax.dim() == 1 and lmax.numel() >= 1, "lmax", tuple(lmax.shape), "a non-empty 1-D tensor")
    check(0.0 <= alpha <= 1.0, "alpha", alpha, "a number in [0, 1]")
    lo, hi = lmax.min(), lmax.max()
    threshold = lo + (hi - lo) * alpha
    return lmax > threshold, float(threshold)


@dataclass(frozen=True)
class TemporalStep:
    """Result of one temporal-policy evaluation (all float64 [M] unless stated; NaN = undefined).

    Attributes:
        delta: Δ_t = |λmax(t) − λmax(t−1)| (NaN where there is no previous evaluation).
        delta1: Δ_1 after this evaluation (set from ``delta`` where it was still undefined).
        ratio: Δ_t / Δ_1 where Δ_1 existed *before* this evaluation, NaN elsewhere.
        retire: bool [M], True where ratio < β (modules to retire now; OR it into the state).
    """

    delta: Tensor
    delta1: Tensor
    ratio: Tensor
    retire: Tensor


def temporal_policy(lmax: Tensor, prev: Tensor, delta1: Tensor, beta: Tensor | float) -> TemporalStep:
    """One step of the temporal policy.

    Args:
        lmax: λmax at this evaluation, float [M]; NaN for modules not evaluated now.
        prev: λmax at the module's previous evaluation, float [M]; NaN if none.
        delta1: Δ_1 so far, float [M]; NaN if not yet defined.
        beta: β ≥ 0, a float or a float tensor [M] (per-kind β broadcast to modules).

    Returns:
        :class:`TemporalStep`. The caller stores ``lmax`` (where not NaN) as the new ``prev`` and
        ``step.delta1`` as the new Δ_1.
    """
    lmax, prev, delta1 = (t.to(torch.float64) for t in (lmax, prev, delta1))
    beta_t = torch.as_tensor(beta, dtype=torch.float64).expand_as(lmax)
    delta = (lmax - prev).abs()
    had_d1 = ~torch.isnan(delta1)
    new_d1 = torch.where(had_d1, delta1, delta)
    ratio = torch.full_like(lmax, float("nan"))
    ok = had_d1 & ~torch.isnan(delta)
    zero_d1 = ok & (delta1 == 0)
    ratio = torch.where(ok & ~zero_d1, delta / torch.where(delta1 == 0, 1.0, delta1), ratio)
    ratio = torch.where(zero_d1 & (delta == 0), 0.0, ratio)
    ratio = torch.where(zero_d1 & (delta > 0), float("inf"), ratio)
    retire = ok & (ratio < beta_t)
    return TemporalStep(delta=delta, delta1=new_d1, ratio=ratio, retire=retire)


def protect(
    active: Tensor,
    score: Tensor,
    layers: Sequence[str],
    *,
    eligible: Tensor | None = None,
    preferred: Tensor | None = None,
) -> Tensor:
    """Protecting strategy: every layer keeps at least one active module.

    Args:
        active: bool [M], the decision before protection.
        score: float [M]; in a layer with no active module, the eligible module with the largest
            score is activated (ties: the first in partition order).
        layers: the layer name of each module (len M); only layers with ≥ 1 eligible module are
            protected.
        eligible: bool [M], modules the strategy may consider (default all) — e.g. not pruned,
            of a governed kind.
        preferred: bool [M], modules to choose from first (default all eligible) — e.g. not
            retired; the strategy falls back to all eligible modules when a layer has none.

    Returns:
        bool [M], a copy of ``active`` with at most one extra module per layer switched on.
    """
    m = active.numel()
    check(
        score.numel() == m and len(layers) == m, "score/layers", (score.numel(), len(layers)), f"{m} entries"
    )
    out = active.detach().bool().cpu().clone()
    elig = torch.ones(m, dtype=torch.bool) if eligible is None else eligible.bool().cpu()
    pref = elig if preferred is None else (preferred.bool().cpu() & elig)
    lid = layer_index(layers)
    sc = score.detach().to(torch.float64).cpu()
    for layer in range(int(lid.max()) + 1 if m else 0):
        in_layer = (lid == layer) & elig
        if not bool(in_layer.any()) or bool((out & in_layer).any()):
            continue
        pool = in_layer & pref
        if not bool(pool.any()):
            pool = in_layer
        idx = pool.nonzero(as_tuple=True)[0]
        out[int(idx[torch.argmax(sc[idx])])] = True  # argmax returns the first maximum
    return out


def prune_lowest(
    score: Tensor,
    fraction: float,
    layers: Sequence[str],
    *,
    eligible: Tensor | None = None,
    protect_layers: bool = True,
) -> Tensor:
    """Choose ``round(fraction · n)`` eligible modules with the lowest scores to prune
    (Python's ``round``: halves go to the even neighbour).

    Modules are taken in ascending score order (ties: partition order). With
    ``protect_layers`` a module is skipped when it is the last unpruned eligible module of its
    layer, and the next-lowest one is taken instead, so the count is exact whenever
    ``round(fraction · n) ≤ n − (number of layers)``; otherwise as many as possible are pruned.

    Args:
        score: float [M], importance (higher = keep).
        fraction: share of the eligible modules to prune, in [0, 1].
        layers: layer name of each module (len M).
        eligible: bool [M], the modules that compete (default all); the others are never pruned.
        protect_layers: keep at least one eligible module per layer.

    Returns:
        bool [M], True = prune.
    """
    check(0.0 <= fraction <= 1.0, "fraction", fraction, "a number in [0, 1]")
    m = score.numel()
    elig = torch.ones(m, dtype=torch.bool) if eligible is None else eligible.bool().cpu()
    idx = elig.nonzero(as_tuple=True)[0]
    target = round(fraction * idx.numel())
    lid = layer_index(layers)
    left = torch.bincount(lid[idx], minlength=int(lid.max()) + 1 if m else 0)
    sc = score.detach().to(torch.float64).cpu()[idx]
    order = idx[torch.sort(sc, stable=True).indices]
    pruned = [False] * m  # Python lists: the loop is per module, tensor indexing would dominate
    lid_l, left_l = lid.tolist(), left.tolist()
    count = 0
    for i in order.tolist():
        if count == target:
            break
        if protect_layers and left_l[lid_l[i]] <= 1:
            continue
        pruned[i] = True
        left_l[lid_l[i]] -= 1
        count += 1
    return torch.tensor(pruned, dtype=torch.bool)


def random_subset(
    groups: Tensor, fraction: float, generator: torch.Generator, *, eligible: Tensor | None = None
) -> Tensor:
    """Draw ``round(fraction · n_g)`` modules (half to even) uniformly at random within each group g.

    Args:
        groups: int64 [M], the group id of each module (e.g. one id per kind, or per (kind, layer)).
        fraction: share drawn per group, in [0, 1].
        generator: CPU generator the draw consumes (seeded by the caller → reproducible).
        eligible: bool [M], modules that may be drawn (default all); others are never drawn.

    Returns:
        bool [M], True = drawn.
    """
    check(0.0 <= fraction <= 1.0, "fraction", fraction, "a number in [0, 1]")
    m = groups.numel()
    elig = torch.ones(m, dtype=torch.bool) if eligible is None else eligible.bool().cpu()
    out = torch.zeros(m, dtype=torch.bool)
    for g in torch.unique(groups).tolist():
        idx = ((groups == g) & elig).nonzero(as_tuple=True)[0]
        k = round(fraction * idx.numel())
        perm = torch.randperm(idx.numel(), generator=generator)
        out[idx[perm[:k]]] = True
    return out
