"""PL-regularisation-driven structured pruning (seed 002, Algorithm 2): ``plreg``.

At each pruning time t_j of a schedule ({t, r} one-shot or linear):

1. **Features** (engine, label-free): for each unpruned structure i of a pruned kind (heads,
   experts, filters) on S random training samples, the mNTK Θᵢ = JᵢJᵢᵀ [S, S] from
   :func:`ntkit.modular_ntk` (scalar output: the sum of logits, float64) and its spectrum
   (:func:`ntkit.spectrum`): d[i] = [λmin(Θᵢ), ρ(Θᵢ)] (ρ the eigen-entropy). Computed in eval mode
   inside the controller's ``dense_view`` and ``ctx.count_overhead()``.
2. **Gate**: one two-layer MLP per kind, FN_v: R² → R (shared weights across the structures of
   the kind), g = softmax over the kind's structures of FN_v(d̂[i]) (d̂: normalised features,
   ``feature_norm``).
3. **Gate training, weights frozen** (α = ``alpha``, the seed's α = 1): for ``gate_steps`` labelled
   batches (``ctx.sample_batch``) minimise L_S(m ⊙ w) + α·Tr(H) over v only, where m is the
   relaxed TopK mask of g (below) and Tr(H) is the Hutchinson estimate of the Hessian trace of
   the loss w.r.t. the pruned kinds' parameters at m ⊙ w
   (:func:`ntkit.ntk.hessian.hessian_trace_estimate` with ``create_graph=True``: one
   Hessian-vector product per probe gives every structure's trace; differentiable w.r.t. m, hence
   v). The weights get no update (only the gate's parameters are differentiated).
4. **Fix the mask**: m = TopK(g, k) through :meth:`ntkit.pruning.Pruner.apply` with the gate's
   scores (lowest g pruned, ≥ 1 structure per layer kept: the protecting strategy), then
   ``controller.set_pruned`` and — ``surgery=True`` — physical removal
   (:func:`ntkit.sparse.surgery.remove_groups` + ``ctx.change_structure``: the loop rebuilds the
   controller and optimizer with state carried over). Training of w then continues (α = 0: no
   penalty during weight training).

Diagnostics (seed 002 Figs 2, 3, 5): every ``track_every`` epochs the method logs, per kind, the
condition number λmax/λmin of the kind's NTK (Σᵢ Θᵢ, the Gram of all the kind's parameters),
the mean per-structure condition number (finite ones), each structure's condition number, and
the Hutchinson Tr(H) of the loss (mean over structures, ``track_probes`` probes on a labelled batch),
into ``self.history`` and ``ctx.log`` (``{"event": "pl_track", ...}``). ``ratio = 0`` runs the
diagnostics only (no gate, no pruning): the dense reference curve of Fig. 3. Wall-clock of the
decision (features + gate training + TopK) and of the diagnostics are recorded separately
(``decision_s``, ``track_s`` in the records) so a recipe can report the gate's share of the run;
``decision_s`` splits into ``features_s`` (step 1), ``gate_s`` (step 3) and the rest (TopK, surgery,
logging — the pruning mechanics every pruning method pays).

Choices the seed leaves open (DESIGN.md §4; options where they matter):

* **Mask relaxation** (``relaxation``): the softmax g sums to 1, so using g itself as the mask
  would shrink every structure's output by ~1/p. ``"ste"`` (default): the forward pass uses the
  *hard* TopK mask (exactly the model that would result), the backward pass the gradient of a
  sigmoid around the TopK threshold, σ((zᵢ − τ)/(T·std(z))), zᵢ = FN_v(d̂ᵢ) the softmax logits
  (TopK of g = TopK of z, softmax being monotone), τ the midpoint of the k-th and (k+1)-th largest
  z. The loss is thus always evaluated on a real k-structure model (no train/test mismatch of a
  soft mask), and each structure gets a gradient — kept ones how much removing them would cost,
  pruned ones how much bringing them back would gain — which the sigmoid turns into a push on z
  concentrated on the structures near the cut. ``"sigmoid"``: the soft mask itself in the forward.
* **Which Hessian**: of the training loss (not of the summed output) w.r.t. the pruned kinds'
  parameters, by Hutchinson with Rademacher probes (``num_probes`` per gate step). Parameters
  outside the structures (embeddings, FFN, norms) are not in the trace.
* **TopK scope** (``scope``): ``"global"`` (the seed: TopK over all p structures of a kind) or
  ``"layer"`` (the ratio within each layer). Pruned structures never return (surgery removes
  them; without surgery the mask is monotone too, so both settings give the same model). The
  default stays the seed's global TopK; on VGG-16's filters it cut the first layers to 1–3 of
  16–64 filters (pl-vgg cpu, seed 0: 32% test accuracy at 50% pruned, chance at 90%), so the
  image recipes run ``plreg_layer`` (``scope="layer"``) beside it.
* **Linear schedule length**: ``t0`` … ``t_end`` epochs, equal shares per epoch
  (:class:`ntkit.pruning.Linear`); the seed's "r_f/t_max per iteration" is read per epoch.
* **Ratio**: by structure count per kind (the seed's "number of disabled parameters divided by
  the parameter counts of the corresponding structure" equals it for equal-sized heads/experts;
  for VGG filters of different layers it is a count, not a parameter share).
* **Gate**: ``gate_hidden`` tanh units, Adam with ``gate_lr``; features normalised per kind
  (``feature_norm="log_zscore"``: log λmin then z-score across the kind's structures — λmin spans
  orders of magnitude across layers); the gate's weights persist across pruning times.
* **Gate pass length**: the seed trains v for one pass over the training set; here
  ``gate_steps`` batches of ``gate_batch`` samples (``gate_steps=0``: one full pass), since each
  gate step costs a third-order backward and the paper reports the gate at 2-3 % of training.
* **Gradient of the penalty** (``trace``). The value is exact either way: at a hard mask m the
  trace w.r.t. the weights of the masked model is Tr(D_m H_θ D_m) = Σᵢ mᵢ·tᵢ, tᵢ the trace of
  structure i's diagonal block of the Hessian at θ = m ⊙ w. ``"differentiated"`` (default, the
  literal objective): the Hutchinson estimate is recomputed at every gate step with its graph and
  differentiated w.r.t. m, which also carries ∂tⱼ/∂mᵢ (how removing i changes the curvature of the
  others: third derivatives of the loss) — a gate step costs 10–13 training steps of the same
  batch (quarter-width VGG-16 on CPU). ``"frozen"``: tᵢ is measured once per pruning time (the
  engine's Hutchinson estimate at the current mask, ``num_probes`` probes on one gate batch, no
  graph) and held fixed while the gate trains, so the penalty's gradient is tᵢ (first order in
  the mask, the same order as the straight-through relaxation) and a gate step costs one forward
  and backward. The seed reports the gate at 2–3 % of BERT's training time for one pass over the
  training set per pruning time (Algorithm 2), i.e. a gate step about as cheap as a training
  step: one pass per 30 epochs costs ≈ 3 % frozen and ≈ 30 % differentiated, so the claim fits the
  frozen reading; the seed's Appendix E.2, which would say, is missing.
* **Samples**: S = ``num_samples`` fresh random training samples per measurement.

Non-finite features (λmin, ρ) or gate outputs of a kind: its previous mask is kept for that
pruning time, a ``RuntimeWarning`` names the modules, and the history gets ``{"event":
"nonfinite", ...}``; the schedule's total is caught up at the next pruning time.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import check
from ntkit.methods._common import (
    broadcast_from_rank0,
    generator_state,
    native_layers,
    overhead,
    set_generator_state,
    unwrap,
)
from ntkit.methods.base import LoopContext, TrainingMethod, make_config, register_method
from ntkit.partition import Partition

__all__ = ["Gate", "PLReg", "PLRegConfig", "mask_index", "masked_params", "normalise_features", "relaxed_topk",
           "structure_features"]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class PLRegConfig:
    """Configuration of :class:`PLReg` (see the module docstring for the algorithm and choices).

    Attributes:
        kind: the structure kind(s) pruned: a partition kind (``"head"``, ``"expert"``,
            ``"filter"``) or several joined by ``+`` (``"head+expert"``); each kind has its own
            gate, softmax and TopK, at the same ``ratio``.
        ratio: total share of each kind's structures pruned at the end of the schedule, in
            [0, 1), by count; 0 = diagnostics only (no gate, no pruning).
        schedule: ``"oneshot"`` ({t, ratio}) or ``"linear"`` (equal shares at the ends of epochs
            t0 … t_end).
        t: one-shot: prune after ``t`` epochs (end of 0-based epoch t − 1), ≥ 1.
        t0, t_end: linear: first / last pruning after ``t0`` / ``t_end`` epochs (1 ≤ t0; t_end = 0
            means t0: a single step; otherwise t_end ≥ t0).
        scope: ``"global"`` TopK over a kind's structures, or ``"layer"`` within each layer.
        protect: keep ≥ 1 structure per layer (the seed's protecting strategy).
        surgery: physically remove pruned structures (smaller model, rebuilt optimizer); False
            keeps them masked (``controller.set_pruned``).
        alpha: weight of the Tr(H) penalty while the gate trains (seed: 1), ≥ 0.
        num_samples: S, samples of the mNTK features, ≥ 2.
        gate_hidden: hidden width of the gate MLP, ≥ 1.
        gate_lr: Adam learning rate of the gate, > 0.
        gate_steps: gate batches per pruning time (0 = one pass over the training set).
        gate_batch: samples per gate batch (0 = the loop's batch size).
        num_probes: Hutchinson probes per gate step (``trace="differentiated"``) or of the one
            estimate per pruning time (``"frozen"``), ≥ 1.
        trace: how the Tr(H) penalty enters gate training: ``"differentiated"`` (re-estimated at
            every gate step and differentiated through the mask: a third-order backward) or
            ``"frozen"`` (each structure's trace measured once per pruning time, the penalty
            Σ mᵢ·tᵢ over the kept structures; see the module docstring).
        relaxation: ``"ste"`` (hard TopK forward, sigmoid gradient) or ``"sigmoid"``.
        temperature: T of the sigmoid around the TopK threshold, in units of std(z), > 0.
        feature_norm: ``"log_zscore"``, ``"zscore"`` or ``"none"``.
        track_every: diagnostics every this many epochs (0 = never; pruning epochs always log).
        track_samples: S of the diagnostic mNTK (≥ 2).
        track_probes: Hutchinson probes of the diagnostic Tr(H) (0 = no Tr(H)).
        track_batch: labelled samples of the diagnostic Tr(H) (0 = the loop's batch size).
        seed: seeds the gate's init, sample draws and probes (the run's seed when run by the harness).
    """

    kind: str = "head"
    ratio: float = 0.75
    schedule: str = "oneshot"
    t: int = 5
    t0: int = 15
    t_end: int = 0
    scope: str = "global"
    protect: bool = True
    surgery: bool = True
    alpha: float = 1.0
    num_samples: int = 64
    gate_hidden: int = 16
    gate_lr: float = 0.05
    gate_steps: int = 4
    gate_batch: int = 0
    num_probes: int = 1
    trace: str = "differentiated"
    relaxation: str = "ste"
    temperature: float = 0.5
    feature_norm: str = "log_zscore"
    track_every: int = 1
    track_samples: int = 32
    track_probes: int = 2
    track_batch: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        kinds = self.kind.split("+") if isinstance(self.kind, str) else []
        check(bool(kinds) and all(kinds) and len(set(kinds)) == len(kinds), "kind", self.kind,
              "a module kind or distinct kinds joined by '+' (e.g. 'head+expert')")
        check(_is_num(self.ratio) and 0.0 <= self.ratio < 1.0, "ratio", self.ratio, "a number in [0, 1)")
        check(self.schedule in ("oneshot", "linear"), "schedule", self.schedule, "'oneshot' or 'linear'")
        for name in ("t", "t0"):
            v = getattr(self, name)
            check(_is_int(v) and v >= 1, name, v, "an integer >= 1 (epochs trained before pruning)")
        check(_is_int(self.t_end) and (self.t_end == 0 or self.t_end >= self.t0), "t_end", self.t_end,
              f"0 or an integer >= t0={self.t0}")
        check(self.scope in ("global", "layer"), "scope", self.scope, "'global' or 'layer'")
        for name in ("protect", "surgery"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        check(_is_num(self.alpha) and self.alpha >= 0, "alpha", self.alpha, "a finite number >= 0")
        check(_is_int(self.num_samples) and self.num_samples >= 2, "num_samples", self.num_samples, "an integer >= 2")
        check(_is_int(self.gate_hidden) and self.gate_hidden >= 1, "gate_hidden", self.gate_hidden, "an integer >= 1")
        check(_is_num(self.gate_lr) and self.gate_lr > 0, "gate_lr", self.gate_lr, "a finite number > 0")
        for name in ("gate_steps", "gate_batch", "track_every", "track_probes", "track_batch"):
            v = getattr(self, name)
            check(_is_int(v) and v >= 0, name, v, "an integer >= 0")
        check(_is_int(self.num_probes) and self.num_probes >= 1, "num_probes", self.num_probes, "an integer >= 1")
        check(self.trace in ("differentiated", "frozen"), "trace", self.trace, "'differentiated' or 'frozen'")
        check(self.relaxation in ("ste", "sigmoid"), "relaxation", self.relaxation, "'ste' or 'sigmoid'")
        check(_is_num(self.temperature) and self.temperature > 0, "temperature", self.temperature,
              "a finite number > 0")
        check(self.feature_norm in ("log_zscore", "zscore", "none"), "feature_norm", self.feature_norm,
              "'log_zscore', 'zscore' or 'none'")
        check(_is_int(self.track_samples) and self.track_samples >= 2, "track_samples", self.track_samples,
              "an integer >= 2")
        check(_is_int(self.seed) and 0 <= self.seed < 2**64, "seed", self.seed, "an integer in [0, 2**64 - 1]")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.kind.split("+"))

    def pruning_schedule(self) -> Any:
        """The :mod:`ntkit.pruning.schedules` object (0-based epochs)."""
        from ntkit.pruning import Linear, OneShot

        if self.schedule == "oneshot":
            return OneShot(t=self.t - 1, r=float(self.ratio))
        end = self.t_end or self.t0
        return Linear(t0=self.t0 - 1, r_final=float(self.ratio), steps=end - self.t0 + 1)


# ------------------------------------------------------------------------------ building blocks
def structure_features(
    model: nn.Module, inputs: Any, partition: Partition, output_mask: Tensor | None = None
) -> tuple[Tensor, Any]:
    """d[i] = [λmin(Θᵢ), ρ(Θᵢ)] per group of ``partition`` from the engine.

    Args:
        model: the network, in a mode whose samples are independent (eval); native layers.
        inputs: S samples in the form :func:`ntkit.modular_ntk` takes.
        partition: the M structures.
        output_mask: MLM masked positions [S, T] (bool) or None.

    Returns:
        ``(features, (spectrum, grams))``: features Tensor [M, 2] float64 on CPU = (λmin, ρ) of
        each structure's mNTK (scalar output = sum of logits, Grams accumulated in float64); the
        :class:`ntkit.ntk.Spectrum` of the Grams (λmax, condition number, …); the Grams
        Tensor [M, S, S] float64.
    """
    import ntkit

    res = ntkit.modular_ntk(model, inputs, partition, output="sum_logits", output_mask=output_mask,
                            dtype=torch.float64)
    spec = ntkit.spectrum(res.grams)
    feats = torch.stack([spec.lambda_min, spec.entropy], dim=1).detach().to("cpu", torch.float64)
    return feats, (spec, res.grams)


def normalise_features(features: Tensor, how: str) -> Tensor:
    """Normalise features [p, 2] (λmin, ρ) across the p structures of one kind → float64 [p, 2].

    ``"log_zscore"``: log(max(λmin, tiny)) then per-column z-score; ``"zscore"``: z-score only;
    ``"none"``: unchanged. A constant column becomes 0 (no NaN from a zero std)."""
    f = features.to(torch.float64).clone()
    if how == "none":
        return f
    if how == "log_zscore":
        f[:, 0] = f[:, 0].clamp_min(torch.finfo(torch.float64).tiny).log()
    mu = f.mean(0, keepdim=True)
    sd = f.std(0, unbiased=False, keepdim=True) if f.shape[0] > 1 else torch.zeros_like(mu)
    return torch.where(sd > 0, (f - mu) / torch.where(sd > 0, sd, torch.ones_like(sd)), torch.zeros_like(f))


class Gate(nn.Module):
    """FN_v: a two-layer MLP R² → R applied to every structure of a kind (shared weights).

    ``forward(d [p, 2]) → z [p]`` (logits; the seed's g = softmax(z))."""

    def __init__(self, hidden: int = 16, in_features: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, d: Tensor) -> Tensor:
        return self.net(d).squeeze(-1)


def relaxed_topk(z: Tensor, hard_keep: Tensor, temperature: float, mode: str = "ste") -> Tensor:
    """Differentiable relaxation of the TopK mask of logits ``z`` [p].

    Args:
        z: gate logits [p] (float, differentiable).
        hard_keep: bool [p], the hard TopK decision (k = ``hard_keep.sum()``; may differ from the
            plain TopK of z where protection kept a structure).
        temperature: T > 0; the sigmoid is σ((zᵢ − τ)/(T·std(z))), τ the midpoint between the
            smallest kept and the largest dropped z (detached).
        mode: ``"ste"`` — value = hard mask, gradient = the sigmoid's; ``"sigmoid"`` — the sigmoid.

    Returns:
        Tensor [p], z's dtype: the relaxed mask (values in [0, 1]).
    """
    keep = hard_keep.to(device=z.device, dtype=torch.bool)
    zd = z.detach()
    if bool(keep.all()) or not bool(keep.any()):
        tau = zd.min() - 1.0 if bool(keep.all()) else zd.max() + 1.0
    else:
        tau = 0.5 * (zd[keep].min() + zd[~keep].max())
    scale = zd.std(unbiased=False).clamp_min(1e-6) * temperature if z.numel() > 1 else torch.ones((), dtype=z.dtype)
    soft = torch.sigmoid((z - tau) / scale)
    if mode == "sigmoid":
        return soft
    return keep.to(z.dtype) + (soft - soft.detach())  # exactly the hard mask in value


class _Masked(nn.Module):
    """Presents ``inner`` with each covered parameter replaced by ``p · mult`` (mult broadcast
    along the sliced dim), through ``torch.func.functional_call``; ``aux_loss`` delegates."""

    def __init__(self, inner: nn.Module, masked: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a registered submodule
        self.masked = masked

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.inner, self.masked, args, kwargs, strict=False)

    def aux_loss(self) -> Tensor:
        fn = getattr(self.inner, "aux_loss", None)
        return fn() if fn is not None else torch.zeros(())


def mask_index(model: nn.Module, partition: Partition) -> dict[str, tuple[list[int], Tensor]]:
    """What :func:`masked_params` needs, computed once per partition: per covered parameter the
    broadcast shape of its factor (−1 on the sliced dim) and each position's group index, ``M``
    (one past the last group) where no group owns it."""
    out = {}
    params = dict(model.named_parameters())
    for pname, (dim, seg) in partition.group_index(model).items():
        shape = [1] * params[pname].dim()
        shape[dim] = -1
        out[pname] = (shape, torch.where(seg >= 0, seg, torch.full_like(seg, len(partition))))
    return out


def masked_params(model: nn.Module, partition: Partition, mask: Tensor,
                  index: dict[str, tuple[list[int], Tensor]] | None = None) -> dict[str, Tensor]:
    """``{name: p · m[group]}`` for every parameter ``partition`` covers (positions no group owns
    keep factor 1); ``mask`` float [M], differentiable. ``index``: :func:`mask_index` of the same
    model and partition, when the caller applies many masks (it costs more than the products)."""
    params = dict(model.named_parameters())
    ext = torch.cat([mask, mask.new_ones(1)])
    index = mask_index(model, partition) if index is None else index
    return {pname: params[pname] * ext[idx.to(mask.device)].to(params[pname].dtype).view(shape)
            for pname, (shape, idx) in index.items()}


# ------------------------------------------------------------------------------ the method
@register_method("plreg", config=PLRegConfig)
class PLReg(TrainingMethod):
    """PL-regularisation-driven structured pruning (module docstring). ``history`` records:
    ``{"event": "pl_prune", "epoch", "step", "kind", "pruned": [...], "scores", "lambda_min",
    "entropy", "cond", "gate_loss": [...], "decision_s"}``, ``{"event": "pl_track", "epoch",
    "step", "kind", "cond", "cond_mean", "cond_structures": {name: c}, "trace_mean", "track_s"}``
    and ``{"event": "nonfinite", ...}``."""

    name = "plreg"
    config_class = PLRegConfig
    config: PLRegConfig

    def __init__(self, config: PLRegConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(PLRegConfig, config, kw, "plreg")
        self.schedule = self.config.pruning_schedule()
        g = torch.Generator().manual_seed(self.config.seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        self.gates = nn.ModuleDict({k: Gate(self.config.gate_hidden) for k in self.config.kinds})
        torch.random.set_rng_state(torch_state)  # the model's init RNG stream is not touched
        self.gen = g
        self.pruned_names: list[str] = []
        self._pruned_kind: dict[str, str] = {}  # pruned name -> its kind
        self.decision_s = 0.0
        self.features_s = 0.0
        self.gate_s = 0.0
        self.track_s = 0.0

    # ---------------------------------------------------------------- binding / state
    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        for k in self.config.kinds:
            check(k in partition.kinds, "plreg.kind", self.config.kind,
                  f"kinds present in the partition {sorted(set(partition.kinds))}")
        if controller is not None and self.pruned_names:
            present = set(self.pruned_names)
            mask = torch.tensor([n in present for n in partition.names], dtype=torch.bool)
            if bool(mask.any()):
                controller.set_pruned(controller.pruned | mask)

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "pruned_names": list(self.pruned_names),
            # JSON-able (the method contract): the gate's tensors as nested lists
            "gates": {k: v.detach().cpu().tolist() for k, v in self.gates.state_dict().items()},
            "gen": generator_state(self.gen),
            "decision_s": self.decision_s,
            "features_s": self.features_s,
            "gate_s": self.gate_s,
            "track_s": self.track_s,
            "pruned_kind": dict(self._pruned_kind),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pruned_names = list(state.get("pruned_names", []))
        if "gates" in state:
            ref = self.gates.state_dict()
            self.gates.load_state_dict({k: torch.as_tensor(v, dtype=ref[k].dtype) if k in ref else torch.as_tensor(v)
                                        for k, v in state["gates"].items()})
        if "gen" in state:
            set_generator_state(self.gen, state["gen"])
        self.decision_s = float(state.get("decision_s", 0.0))
        self.features_s = float(state.get("features_s", 0.0))
        self.gate_s = float(state.get("gate_s", 0.0))
        self.track_s = float(state.get("track_s", 0.0))
        self._pruned_kind = dict(state.get("pruned_kind", {}))

    # ---------------------------------------------------------------- helpers
    def _kind_mask(self, kind: str) -> Tensor:
        assert self.partition is not None
        return self.partition.kind_mask(kind)

    def _pruned_now(self) -> Tensor:
        assert self.partition is not None
        pr = getattr(self.controller, "pruned", None)
        if pr is not None:
            return torch.as_tensor(pr, dtype=torch.bool).clone()
        present = set(self.pruned_names)
        return torch.tensor([n in present for n in self.partition.names], dtype=torch.bool)

    def _original_count(self, kind: str) -> int:
        """Structures of ``kind`` before any pruning (present ones ∪ pruned names of the kind)."""
        assert self.partition is not None
        names = {g.name for g in self.partition if g.kind == kind}
        return len(names | {n for n in self.pruned_names if self._pruned_kind.get(n) == kind})

    def _measure(self, ctx: LoopContext, kinds: tuple[str, ...], samples: int) -> dict[str, dict]:
        """Per kind: features [p, 2], spectrum, Grams and the group indices (unpruned only)."""
        assert self.partition is not None
        model = unwrap(ctx.model)
        pruned = self._pruned_now()
        inputs, omask = ctx.ntk_batch(samples, self.gen)  # type: ignore[misc]
        idx = {k: (self._kind_mask(k) & ~pruned).nonzero(as_tuple=True)[0] for k in kinds}
        sub = Partition([self.partition[int(i)] for k in kinds for i in idx[k]])
        was = model.training
        model.eval()
        try:
            with native_layers(self.controller, model):
                feats, (spec, grams) = structure_features(model, inputs, sub, omask)
        finally:
            model.train(was)
        out, at = {}, 0
        for k in kinds:
            n = len(idx[k])
            sl = slice(at, at + n)
            out[k] = {"idx": idx[k], "features": feats[sl], "lambda_max": spec.lambda_max[sl].cpu(),
                      "cond": spec.condition_number[sl].cpu(), "grams": grams[sl]}
            at += n
        return out

    def _loss_batch(self, ctx: LoopContext, n: int) -> Any:
        return ctx.sample_batch(n, self.gen)  # type: ignore[misc]

    # ---------------------------------------------------------------- hooks
    def on_epoch_end(self, ctx: LoopContext) -> None:
        cfg = self.config
        e = int(ctx.epoch)
        prune = cfg.ratio > 0 and self.schedule.due(e)
        track = cfg.track_every > 0 and (e + 1) % cfg.track_every == 0
        if not (prune or track):
            return
        meas = None
        if prune:
            t0 = time.perf_counter()
            with overhead(ctx):
                meas = self._measure(ctx, cfg.kinds, cfg.num_samples)
                self.features_s += time.perf_counter() - t0
                self._log_before(ctx, meas)
                self._prune(ctx, meas)
            self.decision_s += time.perf_counter() - t0
        if track or prune:
            t0 = time.perf_counter()
            with overhead(ctx):
                self._track(ctx)
            self.track_s += time.perf_counter() - t0
        ctx.log({"event": "pl_time", "epoch": e, "decision_s": self.decision_s, "features_s": self.features_s,
                 "gate_s": self.gate_s, "track_s": self.track_s})

    def _log_before(self, ctx: LoopContext, meas: dict[str, dict]) -> None:
        """The condition numbers right before pruning (``"phase": "before"``; no Tr(H)), from the
        features' own measurement: the drop at a pruning time (seed 002 Fig. 3's red lines)."""
        from ntkit.ntk.spectrum import spectrum

        assert self.partition is not None
        names = self.partition.names
        for k, m in meas.items():
            whole = spectrum(m["grams"].sum(0))
            rec = {"event": "pl_track", "phase": "before", "epoch": int(ctx.epoch), "step": int(ctx.step), "kind": k,
                   "cond": float(whole.condition_number[0]),
                   "cond_structures": {names[int(i)]: float(c) for i, c in zip(m["idx"], m["cond"])},
                   "num_structures": len(m["idx"])}
            self.history.append(rec)
            ctx.log(rec)

    def _track(self, ctx: LoopContext) -> None:
        """Condition numbers and Tr(H) per kind of the current (pruned) model → history / log."""
        from ntkit.ntk.hessian import hessian_trace_estimate
        from ntkit.ntk.spectrum import spectrum

        cfg = self.config
        assert self.partition is not None
        meas = self._measure(ctx, cfg.kinds, cfg.track_samples)
        traces: dict[str, float | None] = dict.fromkeys(cfg.kinds)
        if cfg.track_probes and ctx.sample_batch is not None and ctx.loss_fn is not None:
            model = unwrap(ctx.model)
            batch = self._loss_batch(ctx, cfg.track_batch or ctx.batch_size)
            sub_groups = [self.partition[int(i)] for k in cfg.kinds for i in meas[k]["idx"]]
            sub = Partition(sub_groups)
            was = model.training
            model.eval()
            try:
                with native_layers(self.controller, model):
                    est = hessian_trace_estimate(lambda: ctx.loss_fn(model, batch), model, sub,  # type: ignore[misc]
                                                 num_probes=cfg.track_probes, generator=self.gen)
            finally:
                model.train(was)
            at = 0
            for k in cfg.kinds:
                n = len(meas[k]["idx"])
                traces[k] = float(est.trace[at : at + n].mean()) if n else None
                at += n
        names = self.partition.names
        for k in cfg.kinds:
            m = meas[k]
            whole = spectrum(m["grams"].sum(0))
            cond = m["cond"]
            fin = cond[torch.isfinite(cond)]
            rec = {
                "event": "pl_track", "epoch": int(ctx.epoch), "step": int(ctx.step), "kind": k,
                "cond": float(whole.condition_number[0]),
                "lambda_max": float(whole.lambda_max[0]), "lambda_min": float(whole.lambda_min[0]),
                "cond_mean": float(fin.mean()) if fin.numel() else None,
                "cond_structures": {names[int(i)]: float(c) for i, c in zip(m["idx"], cond)},
                "trace_mean": traces[k],
                "num_structures": len(m["idx"]),
            }
            self.history.append(rec)
            ctx.log(rec)

    def _prune(self, ctx: LoopContext, meas: dict[str, dict]) -> None:
        """Algorithm 2 at one pruning time: train the gates (weights frozen), fix the TopK mask,
        apply it (and surgery)."""
        from ntkit.pruning import Pruner

        cfg = self.config
        assert self.partition is not None
        names = self.partition.names
        e = int(ctx.epoch)
        target = float(self.schedule.ratio_at(e))
        counts: dict[str, int] = {}
        usable: dict[str, Tensor] = {}
        for k in cfg.kinds:
            f = meas[k]["features"]
            bad = [names[int(i)] for i, ok in zip(meas[k]["idx"], torch.isfinite(f).all(1)) if not ok]
            if bad:
                self._nonfinite(ctx, k, bad, "features")
                continue
            p0 = self._original_count(k)
            already = p0 - len(meas[k]["idx"])
            counts[k] = max(0, min(round(target * p0) - already, len(meas[k]["idx"])))
            if counts[k] > 0:
                usable[k] = normalise_features(f, cfg.feature_norm).to(torch.float32)
        if not usable:
            return
        pruners = {k: Pruner("random", kind=k, scope=cfg.scope, protect=cfg.protect) for k in usable}
        old = self._pruned_now()
        t0 = time.perf_counter()
        gate_loss = self._train_gates(ctx, meas, usable, counts, pruners, old)
        self.gate_s += time.perf_counter() - t0
        new_names: list[str] = []
        for k, d in usable.items():
            with torch.no_grad():
                z = self.gates[k](d).double()
            g = torch.softmax(z, 0)
            scores = torch.full((len(self.partition),), math.nan, dtype=torch.float64)
            scores[meas[k]["idx"]] = g
            scores = broadcast_from_rank0(scores)
            if not bool(torch.isfinite(g).all()):
                bad = [names[int(i)] for i, v in zip(meas[k]["idx"], g) if not math.isfinite(float(v))]
                self._nonfinite(ctx, k, bad or [names[int(i)] for i in meas[k]["idx"]], "gate output")
                continue
            cur = self._pruned_now()
            kw = self._amount(pruners[k], cur, k, counts[k])
            res = pruners[k].apply(scores, self.partition, self.controller, pruned=cur, **kw)
            if res.record is None:
                continue
            pr = [names[int(i)] for i in res.new.nonzero(as_tuple=True)[0]]
            new_names += pr
            ids = [names[i] for i in meas[k]["idx"].tolist()]
            feat = meas[k]["features"].double()
            rec = {
                "event": "pl_prune", "epoch": e, "step": int(ctx.step), "kind": k, "ratio_due": target,
                "pruned": pr,
                "scores": dict(zip(ids, g.double().tolist())),
                "lambda_min": dict(zip(ids, feat[:, 0].tolist())),
                "entropy": dict(zip(ids, feat[:, 1].tolist())),
                "cond": dict(zip(ids, meas[k]["cond"].double().tolist())),
                "gate_loss": gate_loss,
            }
            self.history.append(rec)
            ctx.log({kk: v for kk, v in rec.items() if kk not in ("scores", "lambda_min", "entropy", "cond")})
        if not new_names:
            return
        kinds_of = dict(zip(names, self.partition.kinds))
        for n in new_names:
            self._pruned_kind[n] = kinds_of[n]
        self.pruned_names += new_names
        if cfg.surgery and ctx.change_structure is not None:
            from ntkit.sparse.surgery import remove_groups

            pruned_set = set(self.pruned_names)
            gone = [n for n in self.partition.names if n in pruned_set]
            change = remove_groups(unwrap(ctx.model), self.partition, gone, controller=self.controller)
            ctx.change_structure(change)  # the loop re-binds us with the smaller model

    def _amount(self, pruner: Any, pruned: Tensor, kind: str, count: int) -> dict:
        """``count=`` for global TopK; for per-layer TopK the equivalent share of the eligible."""
        if self.config.scope == "global":
            return {"count": count}
        elig = int(pruner.eligible(self.partition, pruned).sum())
        return {"fraction": count / max(elig, 1)}

    def _train_gates(self, ctx: LoopContext, meas: dict[str, dict], feats: dict[str, Tensor],
                     counts: dict[str, int], pruners: dict[str, Any], old: Tensor) -> list[float]:
        """Train every usable kind's gate on L(m ⊙ w) + α·Tr(H) with w frozen; the loss per step."""
        from ntkit.ntk.hessian import hessian_trace_estimate

        cfg = self.config
        if ctx.sample_batch is None or ctx.loss_fn is None:
            return []
        model = unwrap(ctx.model)
        assert self.partition is not None
        m_all = len(self.partition)
        params = [p for k in feats for p in self.gates[k].parameters()]
        opt = torch.optim.Adam(params, lr=cfg.gate_lr)
        bs = cfg.gate_batch or ctx.batch_size
        steps = cfg.gate_steps or max(1, math.ceil(ctx.steps_per_epoch * ctx.batch_size / bs))
        index = mask_index(model, self.partition)
        sub_idx = torch.cat([meas[k]["idx"] for k in feats])
        sub = Partition([self.partition[int(i)] for i in sub_idx.tolist()])
        losses: list[float] = []
        was = model.training
        model.eval()  # the weights' own stochasticity (dropout) off: the gate sees the function
        try:
            with native_layers(self.controller, model):
                frozen = None
                if cfg.alpha > 0 and cfg.trace == "frozen":  # tᵢ at the current mask, held fixed
                    now = _Masked(model, masked_params(model, self.partition, (~old).to(torch.float32), index))
                    b0 = self._loss_batch(ctx, bs)
                    frozen = hessian_trace_estimate(lambda: ctx.loss_fn(now, b0), model, sub,  # type: ignore[misc]
                                                    num_probes=cfg.num_probes, generator=self.gen).trace
                for _ in range(steps):
                    batch = self._loss_batch(ctx, bs)
                    mask = torch.ones(m_all, dtype=torch.float32)
                    mask = torch.where(old, torch.zeros_like(mask), mask)
                    for k, d in feats.items():
                        z = self.gates[k](d)
                        keep = self._hard_keep(pruners[k], z.detach().double(), meas[k]["idx"], old, counts[k])
                        m = relaxed_topk(z, keep, cfg.temperature, cfg.relaxation)
                        mask = mask.index_put((meas[k]["idx"],), m)
                    wrapped = _Masked(model, masked_params(model, self.partition, mask, index))
                    held: dict[str, Tensor] = {}

                    def closure(w: nn.Module = wrapped, b: Any = batch, h: dict = held) -> Tensor:
                        h["loss"] = ctx.loss_fn(w, b)  # type: ignore[misc]
                        return h["loss"]

                    if frozen is not None:
                        loss = closure()
                        total = loss + cfg.alpha * (mask[sub_idx].double() * frozen).sum().to(loss.dtype)
                    elif cfg.alpha > 0:
                        est = hessian_trace_estimate(closure, model, sub, num_probes=cfg.num_probes,
                                                     generator=self.gen, create_graph=True)
                        total = held["loss"] + cfg.alpha * est.trace.sum().to(held["loss"].dtype)
                    else:
                        total = closure()
                    grads = torch.autograd.grad(total, params, allow_unused=True)
                    if not bool(torch.isfinite(total.detach())):
                        break  # keep the gate as it is; non-finite outputs are caught after
                    for p, gr in zip(params, grads):
                        p.grad = gr
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(float(total.detach()))
        finally:
            model.train(was)
        return losses

    def _hard_keep(self, pruner: Any, z: Tensor, idx: Tensor, old: Tensor, count: int) -> Tensor:
        """bool [p]: the structures (``idx``) the hard TopK of ``z`` keeps, with protection."""
        assert self.partition is not None
        scores = torch.full((len(self.partition),), math.nan, dtype=torch.float64)
        scores[idx] = z
        if not bool(torch.isfinite(z).all()):
            return torch.ones(len(idx), dtype=torch.bool)
        new = pruner.select(scores, self.partition, pruned=old, **self._amount(pruner, old, "", count))
        return ~new[idx]

    def _nonfinite(self, ctx: LoopContext, kind: str, bad: list[str], what: str) -> None:
        shown = ", ".join(bad[:8]) + (f", … ({len(bad)} in all)" if len(bad) > 8 else "")
        warnings.warn(f"plreg: non-finite {what} for {shown}; the previous {kind} mask is kept",
                      RuntimeWarning, stacklevel=3)
        rec = {"event": "nonfinite", "epoch": int(ctx.epoch), "step": int(ctx.step), "kind": kind,
               "what": what, "modules": bad}
        self.history.append(rec)
        ctx.log(rec)
