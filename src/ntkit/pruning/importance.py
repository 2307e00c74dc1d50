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
:class:`LambdaMax` (``"lambda_max"``), and the structured-pruning baselines of seed 002:
:class:`FPGM` (``"fpgm"``), :class:`Chip` (``"chip"``), :class:`DPFPS` (``"dpfps"``),
:class:`GateScore` (``"att_score"`` for heads, ``"exp_score"`` for experts) and :class:`GraSP`
(``"grasp"``). Gradient-based scorers run through ``data.controller``'s dense view when one is
given (native layers, every original ``requires_grad`` flag, pruned slices zeroed), so every
unpruned module is scored whatever the active set, and GraSP's double backward works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.partition import ModuleGroup, ParamSlice, Partition

__all__ = [
    "DPFPS",
    "FPGM",
    "SCORERS",
    "Chip",
    "GateScore",
    "GraSP",
    "LambdaMax",
    "Magnitude",
    "RandomScore",
    "ScoreData",
    "Scorer",
    "Snip",
    "chip_independence",
    "get_scorer",
    "ntk_lambda_max",
    "output_slices",
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


# ----------------------------------------------------------------- structured-pruning baselines
def _native(controller: Any) -> contextlib.AbstractContextManager[Any]:
    """``controller.dense_view()`` (native layers, original ``requires_grad``, pruned slices zeroed)
    when a controller is given, else a no-op."""
    view = getattr(controller, "dense_view", None)
    return view() if view is not None else contextlib.nullcontext()


def _need_loss(data: ScoreData | None, who: str) -> ScoreData:
    if data is None or data.loss_fn is None:
        raise ConfigError(f"data.loss_fn=None: expected a callable model -> scalar loss ({who} needs labels)")
    return data


def _batch_grads(model: nn.Module, names: list[str], loss_fn: Callable[[nn.Module], Tensor]) -> Iterator[list[Tensor]]:
    """Endless ``[∂L_b/∂θ for θ in names]`` (float64, zeros where a parameter gets none), one list
    per call of ``loss_fn`` (one labelled batch each)."""
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    live = [i for i, p in enumerate(tensors) if p.requires_grad]
    while True:
        loss = loss_fn(model)
        check(loss.dim() == 0, "loss_fn", tuple(loss.shape), "a scalar loss tensor")
        gs = torch.autograd.grad(loss, [tensors[i] for i in live], allow_unused=True)
        out = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
        for i, g in zip(live, gs):
            if g is not None:
                out[i] = g.detach().to(torch.float64)
        yield out


def _theta_dot_grad(partition: Partition, params: dict[str, Tensor], grads: dict[str, Tensor],
                    slices_of: Callable[[Any], list[ParamSlice]]) -> Tensor:
    """float64 [M]: Σ over ``slices_of(group)`` of Σ θ ⊙ g (signed)."""
    out = torch.zeros(len(partition), dtype=torch.float64)
    for gi, group in enumerate(partition):
        tot = 0.0
        for s in slices_of(group):
            tot += float((s.select(params[s.param].detach().to(torch.float64)) * s.select(grads[s.param])).sum())
        out[gi] = tot
    return out


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def output_slices(group: ModuleGroup) -> list[ParamSlice]:
    """The slices of ``group``'s *last* parameter-owning module in slice order: the parameters a
    gate ξ on the structure's output multiplies, so that ∂L/∂ξ at ξ = 1 is Σ θ ⊙ ∂L/∂θ over them
    (the output is affine in them: y = ξ·(W x + b)).

    Heads: the output projection's columns of the head (ξ_h scales the head's context vector,
    Michel et al. 2019). Experts: the expert's last Linear (weight and bias: ξ_e scales the
    expert's output). Filters: the BatchNorm affine channel (ξ·(γ x̂ + β)), or the conv row and
    bias without a BatchNorm.
    """
    last = _module_of(group.slices[-1].param)
    return [s for s in group.slices if _module_of(s.param) == last]


def _gate_scores(model: nn.Module, partition: Partition, data: ScoreData) -> Tensor:
    """float64 [num_batches, M]: ∂L_b/∂ξ per batch and group (signed)."""
    names = partition.covered_params()
    rows = []
    with _native(data.controller):
        params = dict(model.named_parameters())
        it = _batch_grads(model, names, data.loss_fn)  # type: ignore[arg-type]
        for _ in range(data.num_batches):
            grads = dict(zip(names, next(it)))
            rows.append(_theta_dot_grad(partition, params, grads, output_slices))
    return torch.stack(rows)


@dataclass(frozen=True)
class GateScore:
    """Att-Score / Exp-Score (Michel et al. 2019, "Are sixteen heads really better than one?").

    With a gate ξ_i = 1 on each structure's output (:func:`output_slices`), the importance is
    I_i = (1/B) Σ_b |∂L_b/∂ξ_i| over ``data.num_batches`` = B labelled batches (each L_b a mean
    over its tokens / samples, i.e. already divided by the token count), computed exactly as
    ∂L_b/∂ξ_i = Σ_{θ ∈ output slices of i} θ ⊙ ∂L_b/∂θ. With ``normalize`` (Michel et al.'s code,
    ``paper_numbers.json`` → ``plreg_baseline_protocols.att_exp_score``) the scores of each
    (layer, kind) are divided by their L2 norm (+1e-20), so that global ranking compares layers
    on an equal footing.

    Where we differ: the original takes the absolute value per *batch* of the gradient summed over
    the batch, as here; it measures heads of a fine-tuned model, we score at the pruning epoch of
    a model in training. The gate applies to any structure whose output is affine in its last
    module's parameters (heads, experts, filters); ``att_score`` and ``exp_score`` are the same
    computation under the names the seed gives it for heads and experts.

    Returns float64 [M] on CPU, ≥ 0.
    """

    name: str = "att_score"
    normalize: bool = True

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        data = _need_loss(data, self.name)
        scores = _gate_scores(model, partition, data).abs().mean(0)
        if self.normalize:
            keys = [(g.layer, g.kind) for g in partition]
            for key in dict.fromkeys(keys):
                idx = torch.tensor([k == key for k in keys])
                scores[idx] = scores[idx] / (scores[idx].square().sum().sqrt() + 1e-20)
        return scores


@dataclass(frozen=True)
class DPFPS:
    """DPFPS channel sensitivity (Ruan et al. 2021, "Dynamic and progressive filter pruning ...").

    The first-order Taylor estimate of the loss change when structure i is removed (all its
    slices set to zero): S_i = |Σ_{θ ∈ slices of i} θ ⊙ ḡ|, ḡ = (1/B) Σ_b ∂L_b/∂θ the gradient
    averaged over ``data.num_batches`` = B labelled batches.

    Where we differ: DPFPS takes the Taylor sensitivity of a channel's BatchNorm scale and pairs
    it with a structured-sparsity penalty on the structures expected to be pruned, with per-layer
    ratios allocated dynamically; here the sensitivity covers every slice of the structure (conv
    row, bias and BN affine for a filter; the whole head or expert otherwise), the dynamic
    per-layer allocation is the global ranking of the pruner (``scope="global"``), and there is
    no sparsity penalty (a scorer only ranks; the structures are removed at once by the schedule).

    Returns float64 [M] on CPU, ≥ 0.
    """

    name: str = "dpfps"

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        data = _need_loss(data, self.name)
        names = partition.covered_params()
        with _native(data.controller):
            params = dict(model.named_parameters())
            it = _batch_grads(model, names, data.loss_fn)  # type: ignore[arg-type]
            acc = next(it)
            for _ in range(data.num_batches - 1):
                acc = [a + g for a, g in zip(acc, next(it))]
            grads = {n: a / data.num_batches for n, a in zip(names, acc)}
            return _theta_dot_grad(partition, params, grads, lambda g: list(g.slices)).abs()


@dataclass(frozen=True)
class GraSP:
    """Structured GraSP at initialisation (Wang et al. 2020, "Picking winning tickets before
    training by preserving gradient flow").

    Per parameter GraSP scores S(θ) = −θ ⊙ Hg and removes the *largest* (the weights whose removal
    reduces the gradient norm least, or increases it); as an importance (higher = keep) we return
    I_i = Σ_{θ ∈ slices of i} θ ⊙ Hg, summed over each structure's slices (seed 002 appendix: "sum
    up the relative indicators in those components"). g = (1/B) Σ_b ∇L_b over B =
    ``data.num_batches`` labelled batches, then Hg = (1/B) Σ_{b'} ∇(∇L_{b'} · g) over B further
    batches (each ``loss_fn`` call draws a new batch); g and H cover every parameter the partition
    slices (whole tensors), with g held constant.

    Where we differ: the original computes g and Hg over all weights (conv / linear, not biases or
    norms) and divides the logits by a temperature T = 200 before the loss; we keep the task loss
    as the method trains with it, and score the structures' own parameters (biases and norm affine
    included). Attention runs on SDPA's math backend here (fused kernels have no double backward).

    Returns float64 [M] on CPU (signed).
    """

    name: str = "grasp"

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        data = _need_loss(data, self.name)
        names = partition.covered_params()
        b = data.num_batches
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # fused attention kernels have no double backward: the math backend for the Hg product
        with _native(data.controller), sdpa_kernel(SDPBackend.MATH):
            params = dict(model.named_parameters())
            tensors = [params[n] for n in names]
            live = [i for i, p in enumerate(tensors) if p.requires_grad]
            it = _batch_grads(model, names, data.loss_fn)  # type: ignore[arg-type]
            g = next(it)
            for _ in range(b - 1):
                g = [a + x for a, x in zip(g, next(it))]
            g = [x / b for x in g]
            hg = [torch.zeros_like(x) for x in g]
            for _ in range(b):
                loss = data.loss_fn(model)  # type: ignore[misc]
                check(loss.dim() == 0, "loss_fn", tuple(loss.shape), "a scalar loss tensor")
                grads = torch.autograd.grad(loss, [tensors[i] for i in live], create_graph=True, allow_unused=True)
                z = sum((gr * g[i].to(gr.dtype)).sum() for i, gr in zip(live, grads) if gr is not None)
                if not isinstance(z, Tensor) or not z.requires_grad:
                    continue  # a loss that is linear in the parameters: Hg = 0
                h = torch.autograd.grad(z, [tensors[i] for i in live], allow_unused=True)
                for i, x in zip(live, h):
                    if x is not None:
                        hg[i] += x.detach().to(torch.float64) / b
            return _theta_dot_grad(partition, params, dict(zip(names, hg)), lambda gr: list(gr.slices))


def _weight_vector(group: ModuleGroup, params: dict[str, Tensor]) -> Tensor:
    """float64 [D]: the group's slices of parameters with ≥ 2 dims (the filter / head weights, no
    biases or norm affine), flattened and concatenated — all slices when it has none."""
    sl = [s for s in group.slices if params[s.param].dim() >= 2] or list(group.slices)
    return torch.cat([s.select(params[s.param].detach()).to(torch.float64).reshape(-1) for s in sl]).cpu()


@dataclass(frozen=True)
class FPGM:
    """Filter pruning via the geometric median (He et al. 2019, CVPR).

    Within each (layer, kind) the structures near the geometric median of their layer are the
    most replaceable: I_i = Σ_{j in i's layer, j ≠ i} ‖w_i − w_j‖₂, with w_i the structure's weight
    slices (parameters with ≥ 2 dims: a filter's conv kernel; a head's q/k/v rows and output
    columns) flattened into one vector. When ``data.controller`` is given, structures it has
    pruned are left out of the other structures' sums (their score is computed the same way).

    Where we differ: FPGM proper prunes every layer by the same rate (here: ``scope="layer"`` of
    the pruner) and soft-prunes (zeroes, lets regrow) every epoch; seed 002's 90% VGG run first
    prunes 50% by norm, then 40% by distance — compose two pruning steps for that.

    Returns float64 [M] on CPU, ≥ 0.
    """

    name: str = "fpgm"

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        params = dict(model.named_parameters())
        pruned = None if data is None or data.controller is None else _pruned_of(data.controller, len(partition))
        keys = [(g.layer, g.kind) for g in partition]
        out = torch.zeros(len(partition), dtype=torch.float64)
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            w = torch.stack([_weight_vector(partition[i], params) for i in idx])
            d = torch.cdist(w, w)  # [n, n] Euclidean
            if pruned is not None:
                d = d[:, ~pruned[idx]]
            out[idx] = d.sum(1)
        return out


def _pruned_of(controller: Any, m: int) -> Tensor:
    pr = getattr(controller, "pruned", None)
    return torch.zeros(m, dtype=torch.bool) if pr is None else torch.as_tensor(pr, dtype=torch.bool).cpu()


@dataclass(frozen=True)
class Chip:
    """CHIP: channel independence (Sui et al. 2021, NeurIPS).

    For each filter c of a layer with feature maps A ∈ R^{C×HW} (one image; the structure's
    output channel after its BatchNorm when it has one, else the conv output, through a ReLU
    when ``relu``), CI_c = ‖A‖_* − ‖A with row c zeroed‖_*, averaged over the S images of
    ``data.inputs`` (run through the model in eval mode, no gradient). A channel whose feature map
    is close to the span of the others changes the nuclear norm little and goes first.

    Where we differ: CHIP hooks the activation after BN + ReLU; we hook the BatchNorm (or conv)
    output and apply the ReLU ourselves (the same map for VGG; for a ResNet block's second conv
    the residual sum comes before the ReLU). CHIP measures a *pre-trained* network and then
    fine-tunes; seed 002's per-layer ratios (20%/60%, 75%/95%) are the pruner's business. Filters
    only (the layer output must be [S, C, H, W]).

    Returns float64 [M] on CPU.
    """

    name: str = "chip"
    relu: bool = True

    def __call__(self, model: nn.Module, partition: Partition, data: ScoreData | None = None) -> Tensor:
        if data is None or data.inputs is None:
            raise ConfigError("data.inputs=None: expected the images CHIP measures feature maps on")
        bad = sorted({g.kind for g in partition if g.kind != "filter"})
        check(not bad, "kind", bad[0] if bad else None, "'filter' (CHIP scores conv filters only)")
        modules = dict(model.named_modules())
        chan: dict[str, list[tuple[int, int]]] = {}  # module → [(group index, channel)]
        for gi, g in enumerate(partition):
            s = output_slices(g)[0]
            chan.setdefault(_module_of(s.param), []).append((gi, s.start))
        maps: dict[str, Tensor] = {}
        hooks = [modules[name].register_forward_hook(
            lambda mod, inp, out, name=name: maps.__setitem__(name, out.detach())) for name in chan]
        was = model.training
        model.eval()
        try:
            with _native(data.controller), torch.no_grad():
                model(data.inputs)
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        out = torch.zeros(len(partition), dtype=torch.float64)
        for name, pairs in chan.items():
            a = maps[name].to(torch.float64).cpu()
            check(a.dim() == 4, "kind", "filter", f"a conv layer output [S, C, H, W] at {name!r}, got {tuple(a.shape)}")
            out[[gi for gi, _ in pairs]] = chip_independence(a.clamp_min(0) if self.relu else a)[
                [c for _, c in pairs]]
        return out


def chip_independence(feature_maps: Tensor) -> Tensor:
    """Channel independence of every channel: CI_c = mean over images of ‖A‖_* − ‖A^{(c)}‖_*,
    A = the image's [C, H·W] feature-map matrix, A^{(c)} = A with row c zeroed.

    Args:
        feature_maps: [S, C, H, W] (float64 recommended).

    Returns:
        [C], the dtype of ``feature_maps``.
    """
    s, c = feature_maps.shape[:2]
    a = feature_maps.reshape(s, c, -1)
    full = torch.linalg.matrix_norm(a, ord="nuc")  # [S]
    eye = torch.eye(c, dtype=torch.bool, device=a.device)
    ci = torch.zeros(c, dtype=a.dtype, device=a.device)
    for i in range(s):
        zeroed = a[i].unsqueeze(0).expand(c, c, a.shape[-1]).masked_fill(eye.unsqueeze(-1), 0.0)
        ci += full[i] - torch.linalg.matrix_norm(zeroed, ord="nuc")
    return ci / max(s, 1)


#: name → scorer factory (keyword arguments as the class takes).
SCORERS: dict[str, Callable[..., Scorer]] = {
    "l1": lambda **kw: Magnitude(p=1, **kw),
    "l2": lambda **kw: Magnitude(p=2, **kw),
    "random": RandomScore,
    "snip": Snip,
    "lambda_max": LambdaMax,
    "fpgm": FPGM,
    "chip": Chip,
    "dpfps": DPFPS,
    "att_score": lambda **kw: GateScore(**{"name": "att_score", **kw}),
    "exp_score": lambda **kw: GateScore(**{"name": "exp_score", **kw}),
    "grasp": GraSP,
}


def get_scorer(name: str, **kw: Any) -> Scorer:
    """The built-in scorer ``name`` (one of :data:`SCORERS`) built with ``kw``."""
    check(name in SCORERS, "criterion", name, f"one of {sorted(SCORERS)}")
    return SCORERS[name](**kw)
