"""Unstructured weight masks: builders at a given density, and keeping a mask applied in training.

A mask set is ``{param_name: 0/1 tensor shaped like the parameter}`` over the *weight* tensors of
a model — every parameter with ≥ 2 dimensions (Linear / Conv weights); biases and norm affine
parameters are never masked. Builders (all return float masks in the parameter's dtype/device):

* :func:`magnitude_mask` — keep the largest |w| (``scope="layerwise"``: per weight tensor;
  ``"global"``: pooled over all weight tensors).
* :func:`snip_mask` — SNIP (Lee et al. 2019): keep the largest |θ ⊙ ∂L/∂θ| for a labelled
  batch; ``scope="layerwise"`` is Layerwise-SNIP.
* :func:`logit_snip_mask` — Logit-SNIP (seed 003): |θ ⊙ ∂Z/∂θ| with Z = Σ_i ‖f(x_i)‖², label-free.
* :func:`random_mask` — a uniformly random mask with exact density per weight tensor; pair it
  with :func:`rescale_weights_` (× √(1/density)) for the "random-rescaled" baseline.

Selection rule (:func:`mask_from_scores`): keep exactly ``k = max(1, round(density · n))``
entries with the largest scores (per tensor, or over the pool). For distinct scores this is the
authors' rule "keep scores strictly above the (1 − density) quantile", with the count made exact;
ties at the threshold are broken by position (lowest flat index first).

Training with a fixed mask (:class:`WeightMask`): masked gradients are zeroed by tensor hooks
*before* the optimizer step and the weights are multiplied by the mask *after* it (an optimizer
step post-hook). We do this rather than a ``torch.nn.utils.parametrize`` parametrisation because
it keeps parameter names, ``state_dict`` keys, the sparse controller's view and the forward cost
of the model unchanged; zero gradients from the first step keep Adam's moments of masked entries
at 0, and the post-step re-masking makes the guarantee exact for any optimizer (weight decay,
momentum carried over from before the mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ntkit.errors import ConfigError, check

__all__ = [
    "SCOPES",
    "WeightMask",
    "apply_mask_",
    "logit_snip_mask",
    "magnitude_mask",
    "mask_density",
    "mask_from_scores",
    "maskable_weights",
    "random_mask",
    "rescale_weights_",
    "snip_mask",
]

#: Where a density applies: per weight tensor, or pooled over all weight tensors.
SCOPES = ("layerwise", "global")

Masks = dict[str, Tensor]


def _check_density(density: float) -> None:
    ok = isinstance(density, (int, float)) and not isinstance(density, bool)
    check(ok and 0.0 < density <= 1.0, "density", density, "a number in (0, 1]")


def _check_scope(scope: str) -> None:
    check(scope in SCOPES, "scope", scope, f"one of {', '.join(SCOPES)}")


def maskable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the model's weight tensors (parameters with ≥ 2 dims), in order."""
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2}


def _keep_count(n: int, density: float) -> int:
    return min(n, max(1, round(density * n)))


def _top_mask(score: Tensor, k: int) -> Tensor:
    """0/1 mask [score.shape] keeping the k largest (ties: lowest flat index first)."""
    flat = score.detach().reshape(-1)
    # a stable descending sort breaks ties by position, so the kept set is deterministic
    idx = torch.sort(flat, descending=True, stable=True).indices[:k]
    m = torch.zeros_like(flat)
    m[idx] = 1.0
    return m.view_as(score)


def mask_from_scores(scores: Mapping[str, Tensor], density: float, scope: str = "layerwise") -> Masks:
    """Keep the highest scores at ``density``.

    Args:
        scores: ``{name: Tensor shaped like the weight}`` (any float dtype), e.g. |w|.
        density: kept fraction in (0, 1].
        scope: ``"layerwise"`` keeps ``max(1, round(density · n_l))`` per tensor;
            ``"global"`` keeps ``max(1, round(density · Σ n_l))`` over all tensors pooled.

    Returns:
        ``{name: 0/1 Tensor}`` in each score's shape, dtype and device.
    """
    _check_density(density)
    _check_scope(scope)
    check(len(scores) > 0, "scores", "{}", "at least one weight tensor")
    if scope == "layerwise":
        return {n: _top_mask(s, _keep_count(s.numel(), density)) for n, s in scores.items()}
    names = list(scores)
    dev = next(iter(scores.values())).device
    pooled = torch.cat([scores[n].detach().reshape(-1).to(device=dev, dtype=torch.float64) for n in names])
    flat = _top_mask(pooled, _keep_count(pooled.numel(), density))
    out: Masks = {}
    start = 0
    for n in names:
        s = scores[n]
        out[n] = flat[start:start + s.numel()].view_as(s).to(device=s.device, dtype=s.dtype)
        start += s.numel()
    return out


def mask_density(masks: Mapping[str, Tensor]) -> float:
    """Overall kept fraction Σ mask / Σ numel."""
    kept = sum(float(m.sum()) for m in masks.values())
    return kept / max(1, sum(m.numel() for m in masks.values()))


def magnitude_mask(
    model: nn.Module | Mapping[str, Tensor], density: float, scope: str = "layerwise"
) -> Masks:
    """Keep the largest |w| of the model's weight tensors (or of a ``{name: tensor}`` mapping)."""
    weights = maskable_weights(model) if isinstance(model, nn.Module) else dict(model)
    return mask_from_scores({n: w.detach().abs() for n, w in weights.items()}, density, scope)


def _saliency(model: nn.Module, inputs: Tensor, objective: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """|θ ⊙ ∂objective(model(inputs))/∂θ| per weight tensor. Gradients are taken w.r.t. detached
    copies of the weights, so frozen models work and no ``.grad`` is touched."""
    weights = {n: w.detach().requires_grad_(True) for n, w in maskable_weights(model).items()}
    with torch.enable_grad():
        value = objective(functional_call(model, weights, (inputs,)))
        grads = torch.autograd.grad(value, list(weights.values()), allow_unused=True)
    return {
        n: (w.detach() * g).abs() if g is not None else torch.zeros_like(w.detach())
        for (n, w), g in zip(weights.items(), grads)
    }


def snip_mask(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    density: float,
    scope: str = "global",
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Masks:
    """SNIP: keep the largest |θ ⊙ ∂L/∂θ| with L = ``loss_fn(model(inputs), labels)``.

    Args: inputs [N, ...]; labels [N] int64; ``scope="layerwise"`` gives Layerwise-SNIP.
    The model is used as is (call ``model.eval()`` first to score without dropout).
    """
    return mask_from_scores(_saliency(model, inputs, lambda out: loss_fn(out, labels)), density, scope)


def logit_snip_mask(model: nn.Module, inputs: Tensor, density: float, scope: str = "global") -> Masks:
    """Logit-SNIP (label-free): keep the largest |θ ⊙ ∂Z/∂θ|, Z = Σ_i ‖f(x_i)‖² over ``inputs`` [N, ...]."""
    return mask_from_scores(_saliency(model, inputs, lambda out: out.pow(2).sum()), density, scope)


def random_mask(model: nn.Module, density: float, generator: torch.Generator | None = None) -> Masks:
    """Uniformly random mask keeping exactly ``max(1, round(density · n_l))`` entries per weight tensor.

    ``generator`` (CPU) makes it reproducible. This is the paper's random baseline, not the
    authors' code's row-shuffled magnitude mask.
    """
    _check_density(density)
    out: Masks = {}
    for n, w in maskable_weights(model).items():
        perm = torch.randperm(w.numel(), generator=generator)[: _keep_count(w.numel(), density)]
        m = torch.zeros(w.numel(), dtype=w.dtype)
        m[perm] = 1.0
        out[n] = m.view_as(w).to(w.device)
    return out


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    for n, m in masks.items():
        check(n in params, "masks", n, "names of model.named_parameters()")
        check(tuple(m.shape) == tuple(params[n].shape), f"masks[{n!r}].shape", tuple(m.shape),
              f"{tuple(params[n].shape)}")
    return params


@torch.no_grad()
def apply_mask_(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Multiply each masked parameter by its mask, in place."""
    params = _check_masks(model, masks)
    for n, m in masks.items():
        params[n].mul_(m.to(device=params[n].device, dtype=params[n].dtype))


@torch.no_grad()
def rescale_weights_(model: nn.Module, masks: Mapping[str, Tensor], factor: float) -> None:
    """Multiply each masked weight tensor by ``factor`` in place (random-rescaled: √(1/density))."""
    check(math.isfinite(factor) and factor > 0, "factor", factor, "a finite number > 0")
    params = _check_masks(model, masks)
    for n in masks:
        params[n].mul_(factor)


class WeightMask:
    """Keep ``masks`` applied to ``model`` during training.

    ``attach()`` masks the weights now, registers a gradient hook on each masked parameter
    (gradient ← gradient ⊙ mask, so masked entries get zero gradients before the step) and, when
    an ``optimizer`` is given, a step post-hook that re-applies the mask after each
    ``optimizer.step()``. Without an optimizer call :meth:`apply` after each step yourself.
    ``detach()`` removes the hooks.

    Args:
        model: the model whose parameters are masked (by name).
        masks: ``{param_name: 0/1 tensor shaped like it}``; stored in the parameter's dtype/device.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        params = _check_masks(model, masks)
        self.model = model
        self.masks: Masks = {
            n: m.detach().to(device=params[n].device, dtype=params[n].dtype).clone() for n, m in masks.items()
        }
        self._handles: list[Any] = []

    @property
    def density(self) -> float:
        """Overall kept fraction of the masked tensors."""
        return mask_density(self.masks)

    def apply(self) -> None:
        """Zero the masked weights in place."""
        apply_mask_(self.model, self.masks)

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> WeightMask:
        """Mask now and keep masking (see the class docstring); returns self."""
        if self._handles:
            raise ConfigError("WeightMask.attach: already attached; call detach() first")
        self.apply()
        params = dict(self.model.named_parameters())
        for n, m in self.masks.items():
            self._handles.append(params[n].register_hook(lambda g, m=m: g * m))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kw: self.apply()))
        return self

    def detach(self) -> None:
        """Remove the hooks (the weights keep their current values)."""
        for h in self._handles:
            h.remove()
        self._handles = []
