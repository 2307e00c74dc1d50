"""Hutchinson estimates of the Hessian trace, per module.

For a loss L(θ) and a Rademacher probe v (entries ±1 with probability ½ each, independent),
E[vᵀHv] = Tr(H). Restricting the product to the coordinates of one module g gives an unbiased
estimate of that module's diagonal block trace:

    E[Σ_{i∈g} v_i (Hv)_i] = Σ_{i∈g} Σ_j H_ij E[v_i v_j] = Σ_{i∈g} H_ii = Tr(H_gg).

So **one Hessian-vector product per probe, over all covered parameters at once,** yields every
module's trace: the elementwise product v ⊙ Hv is summed over each group's parameter slices.
(Cross-module Hessian entries add variance to each group's estimate, never bias.)

The PL pruning method (seed 002) adds α·Tr(H) to a loss whose weights are ``m ⊙ w`` with ``m`` a
relaxed mask produced by a gating network; it needs the estimate to be *differentiable* w.r.t.
the gate parameters. Pass ``create_graph=True`` for that: the returned estimate then carries a
graph through the loss, its gradient and the Hessian-vector products (third-order terms), and
``estimate.sum().backward()`` reaches every tensor the loss depends on — including tensors that
are not among the differentiated parameters (e.g. the mask). With ``create_graph=False``
(default) the result is detached.

Fused scaled-dot-product-attention kernels have no double backward, so the loss closure is
evaluated, and the Hessian-vector products are taken, under the math SDPA backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ntkit.errors import ConfigError, check
from ntkit.partition import Partition

__all__ = ["HessianTrace", "hessian_trace", "hessian_trace_estimate"]


@dataclass(frozen=True)
class HessianTrace:
    """A Hutchinson estimate of per-module Hessian traces.

    Attributes:
        trace: Tensor [M], float64 — the mean over probes (M = number of groups; M = 1, a single
            group ``"all"``, when no partition was given).
        samples: Tensor [P, M], float64 — the per-probe estimates vᵀ(Hv) restricted to each group
            (P = ``num_probes``).
        stderr: Tensor [M], float64 — standard error of the mean, ``std(samples, ddof=1)/√P``
            (NaN for P = 1); always detached.
        names: the group names, in order.
    """

    trace: Tensor
    samples: Tensor
    stderr: Tensor
    names: tuple[str, ...]

    @property
    def total(self) -> Tensor:
        """Tensor [], float64: the sum over groups (the trace over all covered coordinates)."""
        return self.trace.sum()


def _rademacher(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """±1 entries, shaped ``shape`` with ``like``'s dtype/device; drawn on the generator's device."""
    gen_device = generator.device if generator is not None else like.device
    r = torch.randint(0, 2, shape, generator=generator, device=gen_device, dtype=torch.int8)
    return (r.to(device=like.device, dtype=like.dtype) * 2) - 1


_ZERO = torch.zeros(1, dtype=torch.long)


def _hvp(
    grads: Sequence[Tensor | None], ps: Sequence[Tensor], used: list[int], vs: list[Tensor], create_graph: bool
) -> list[Tensor | None]:
    """Hessian-vector products for a batch of probes ``vs[i]`` [b, *shape_i]: returns
    [b, *shape_i] per parameter (None where the loss gradient does not depend on it)."""
    out: list[Tensor | None] = [None] * len(ps)
    if not used:
        return out
    b = vs[0].shape[0]
    res = torch.autograd.grad(
        [grads[i] for i in used],  # type: ignore[misc]
        [ps[i] for i in used],
        grad_outputs=[vs[i] if b > 1 else vs[i][0] for i in used],
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=b > 1,
    )
    for i, h in zip(used, res):
        out[i] = None if h is None else (h if b > 1 else h.unsqueeze(0))
    return out


def hessian_trace_estimate(
    loss_fn: Callable[[], Tensor],
    model: nn.Module,
    partition: Partition | None = None,
    *,
    num_probes: int = 32,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
    params: Sequence[str] | None = None,
    probe_batch: int = 1,
) -> HessianTrace:
    """Hutchinson estimate of Tr(H) per module group, with per-probe samples and standard errors.

    Args:
        loss_fn: closure ``() -> Tensor []`` recomputing the scalar loss from ``model``'s current
            parameters (called once; the same graph serves every probe).
        model: the model whose parameters are differentiated.
        partition: module groups; each group's estimate sums v ⊙ Hv over its slices. ``None``:
            one group ``"all"`` over every differentiated parameter (the total trace).
        num_probes: P ≥ 1 Rademacher probes (one Hessian-vector product each).
        generator: random source for the probes (any device; probes are moved to the
            parameters' device). ``None`` uses the global RNG of the parameters' device.
        create_graph: keep the graph so the estimate is differentiable (see module docstring).
            Costs memory for P Hessian-vector-product graphs.
        params: with ``partition=None``, restrict to these parameter names (default: all
            parameters with ``requires_grad``). With a partition, the differentiated parameters
            are the partition's covered parameters and ``params`` must be None.
        probe_batch: probes per Hessian-vector product call. > 1 vmaps the double backward over
            a batch of probes (``is_grads_batched``), at up to ``probe_batch``× the backward's
            working memory; it can pay off on accelerators, but on CPU (tiny BERT, 2 cores) it
            measured no faster than one probe at a time, hence the default 1. Falls back to one
            probe at a time if an op has no batching rule. Results do not depend on it.

    Returns:
        :class:`HessianTrace` (trace [M], samples [P, M], stderr [M]; float64).

    Raises:
        ConfigError: bad ``num_probes``, unknown parameter names, a loss that is not a scalar
            or that does not depend on the parameters.
    """
    check(isinstance(num_probes, int) and num_probes >= 1, "num_probes", num_probes, "an int >= 1")
    check(isinstance(probe_batch, int) and probe_batch >= 1, "probe_batch", probe_batch, "an int >= 1")
    named = dict(model.named_parameters())
    if partition is not None:
        check(params is None, "params", params, "None when a partition is given")
        partition.validate(model)
        names = partition.covered_params()
        group_names = tuple(partition.names)
        # per covered parameter: (name, dim, group of each position along dim; M = no group, a
        # dump bin dropped at the end)
        segs: list[tuple[str, int | None, Tensor | None]] = [
            (pname, dim, torch.where(owner < 0, len(partition), owner).to(named[pname].device))
            for pname, (dim, owner) in partition.group_index(model).items()
        ]
    else:
        names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
        for n in names:
            check(n in named, "params", n, "names of model.named_parameters()")
        group_names = ("all",)
        segs = [(n, None, None) for n in names]  # whole parameter into group 0
    check(len(names) > 0, "params", names, "at least one parameter to differentiate")
    ps = [named[n] for n in names]
    for n, p in zip(names, ps):
        check(p.requires_grad, f"parameter {n}.requires_grad", p.requires_grad, "True")
    m = len(group_names)
    pos = {n: i for i, n in enumerate(names)}

    with sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn()
        if not (isinstance(loss, Tensor) and loss.dim() == 0):
            raise ConfigError(f"loss_fn() returned shape {getattr(loss, 'shape', type(loss))}: expected a scalar tensor")
        grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        # A parameter the loss does not touch has a zero Hessian block; keep it out of the HVP.
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        samples: list[Tensor] = []
        batch = probe_batch
        done = 0
        while done < num_probes:
            b = min(batch, num_probes - done)
            # Probes are drawn probe by probe, parameter by parameter, whatever the batching,
            # so a given generator state yields the same probes for every probe_batch.
            draws = [[_rademacher(p.shape, p, generator) for p in ps] for _ in range(b)]
            vs = [torch.stack([d[i] for d in draws]) for i in range(len(ps))]  # [b, *shape]
            try:
                hv = _hvp(grads, ps, used, vs, create_graph)
            except RuntimeError:
                if b == 1:
                    raise
                batch = 1  # an op without a vmap rule: one probe at a time from here on
                hv = [None] * len(ps)
                per = [_hvp(grads, ps, used, [v[j : j + 1] for v in vs], create_graph) for j in range(b)]
                for i in used:
                    hs = [h[i] for h in per]
                    hv[i] = None if any(h is None for h in hs) else torch.cat(hs)  # type: ignore[arg-type]
            est = torch.zeros(b, m + 1, dtype=torch.float64, device=ps[0].device)
            for pname, dim, seg in segs:
                i = pos[pname]
                h = hv[i]
                if h is None:
                    continue
                e = (vs[i] * h).to(torch.float64)  # [b, *shape]
                if dim is None or seg is None:
                    est = est.index_add(1, _ZERO.to(e.device), e.reshape(b, -1).sum(1, keepdim=True))
                else:
                    other = [d + 1 for d in range(e.dim() - 1) if d != dim]
                    r = e.sum(dim=other) if other else e  # [b, size along dim]
                    est = est.index_add(1, seg, r)
            samples.append(est[:, :m])
            done += b
    s = torch.cat(samples)  # [P, M]
    if not create_graph:
        s = s.detach()
    trace = s.mean(0)
    if num_probes > 1:
        stderr = s.detach().std(0, unbiased=True) / math.sqrt(num_probes)
    else:
        stderr = torch.full((m,), float("nan"), dtype=torch.float64, device=s.device)
    return HessianTrace(trace=trace, samples=s, stderr=stderr, names=group_names)


def hessian_trace(
    loss_fn: Callable[[], Tensor],
    model: nn.Module,
    partition: Partition | None = None,
    *,
    num_probes: int = 32,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
    probe_batch: int = 1,
) -> Tensor:
    """Hutchinson estimate of each module's Hessian trace Tr(H_gg).

    One Hessian-vector product per Rademacher probe over all covered parameters gives every
    group's estimate at once. See :func:`hessian_trace_estimate` for the arguments and for the
    per-probe samples and standard errors.

    Returns:
        Tensor [M], float64 (M = ``len(partition)``); with ``partition=None``, Tensor [] — the
        trace over all parameters with ``requires_grad``. Differentiable when ``create_graph``.
    """
    est = hessian_trace_estimate(
        loss_fn, model, partition, num_probes=num_probes, generator=generator, create_graph=create_graph,
        probe_batch=probe_batch,
    )
    return est.trace if partition is not None else est.trace[0]
