"""MAT — Modular Adaptive Training (seed 000 §B.1, seed 001 Eq. 4–7; DESIGN.md §3).

Every ``interval`` epochs from ``start_epoch`` on, MAT measures the principal eigenvalue λmax of
each module's mNTK on S random training samples (:func:`ntkit.methods.scores.ntk_lambda_max`,
booked as overhead), then per module kind:

1. modular policy — active iff λmax > λ_α = min + (max − min)·α (:func:`policies.modular_policy`),
   the min / max taken per kind (``threshold_scope="global"``) or per kind and layer
   (``threshold_scope="layer"``);
2. temporal policy — retire for good once Δ_t/Δ_1 < β (:func:`policies.temporal_policy`);
3. protecting strategy — ≥ 1 active module per layer (:func:`policies.protect`).

The decision goes to the sparse controller (``set_active``): inactive modules are skipped by the
partial backward (their weight gradients are never computed and their optimizer state is not
touched); they still run forward. Modules whose kind has no α are not governed: always active.
Pruned modules (``controller.pruned``) are never measured and never active.

Two readings of the paper are options (``MATConfig.threshold_scope`` and ``MATConfig.probes``;
DESIGN.md §3 says what our runs showed):

* **Threshold scope.** Eq. 4 sets λ_α from the min and max λmax over "the modules". One literal
  reading is all modules of a kind in the network (``"global"``). With BatchNorm (a filter's λmax
  scales with 1/‖w‖²) or post-LN attention, λmax spreads over 10³–10⁴× across layers, so a global
  threshold leaves only the top layer training; ``"layer"`` (the default) applies the same α within
  each (kind, layer), an equally literal reading of "the modules" of a layer. Chosen by evidence
  (VGG-16 width 0.25 on the CIFAR-10 subset, 20 epochs, test top-1): with AdamW, seeds 0–2,
  vanilla 67.7 ± 1.1%, global 54.5 ± 1.3%, layer 64.0 ± 0.8%; with the paper's SGD, seeds 0–2
  (``docs/runs/mat-vgg-variants``), vanilla 65.2 ± 0.9%, global 44.8 ± 2.3%, layer 60.6 ± 1.7%.
* **Probe set.** seed 000 §B.1: "MAT first randomly samples 64 data samples". ``"fresh"`` draws
  S new samples at every evaluation; ``"fixed"`` draws them once, at the first evaluation, and
  reuses them (the generator state of that draw is kept and replayed, so the same indices — and
  for MLM the same masking — come back, also after a resume). With fresh probes Δ_t of the temporal
  policy is dominated by sampling noise (per-filter λmax varies 14–30% between draws); with a fixed
  probe set Δ_t measures the kernel's change only. The runs showed no difference (VGG-16 as above,
  per layer, seeds 0–2: fixed 61.0 ± 2.2%, fresh 60.6 ± 1.7%, the same backward sparsity), so the
  default stays ``"fresh"``.

Faults: a module whose λmax comes out non-finite (NaN / ±Inf from a diverged model, or an
eigen-decomposition that failed — :class:`torch.linalg.LinAlgError` makes every module of that
measurement non-finite) keeps its previous active status and temporal state; the thresholds are
taken over the finite measurements only; a ``RuntimeWarning`` names the modules and the history
record lists them under ``"nonfinite"``. The next finite evaluation proceeds normally.

Example::

    method = build_method("mat", alpha={"head": 0.1}, beta=1e-3, start_epoch=5, interval=8)
    method.bind(model, partition, ctl)
    # ... the loop calls the hooks (see ntkit.methods.base)
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.methods import scores
from ntkit.methods._common import (
    apply_active,
    bool_list,
    broadcast_from_rank0,
    check_per_kind,
    controller_pruned,
    generator_state,
    overhead,
    per_kind,
    set_generator_state,
    unwrap,
)
from ntkit.methods._selection import check_seed
from ntkit.methods.base import LoopContext, TrainingMethod, make_config, register_method
from ntkit.methods.policies import modular_policy, protect, temporal_policy
from ntkit.partition import Partition

__all__ = ["MAT", "MATConfig"]


def _default_alpha() -> dict[str, float]:
    return {"head": 0.1, "expert": 0.2, "filter": 0.2}


@dataclass
class MATConfig:
    """Settings of MAT (defaults: the paper's BERT / Switch / VGG values, seed 000 §B.1).

    Attributes:
        alpha: α ∈ [0, 1] per module kind, e.g. ``{"head": 0.1, "expert": 0.2, "filter": 0.2}``;
            a single number applies to every kind. Kinds without an α are not governed (always
            active). Larger α = higher threshold = fewer active modules.
        beta: finite β ≥ 0 of the temporal policy (a number, or a mapping per kind); a module retires
            once Δ_t/Δ_1 < β. 0 disables retirement.
        num_samples: S ≥ 2, training samples drawn for each mNTK evaluation (Grams are S×S).
        start_epoch: ≥ 1; the first evaluation runs at the end of epoch ``start_epoch − 1``
            (0-based), i.e. after ``start_epoch`` full epochs; before it every module is active.
        interval: ≥ 1, epochs between evaluations (evaluate when ``epoch + 1 ≥ start_epoch`` and
            ``(epoch + 1 − start_epoch) % interval == 0``).
        protect: keep ≥ 1 active module per layer (the protecting strategy).
        seed: seed of the generator that draws the S samples, an integer in [0, 2**64 − 1]
            (the generator state is saved in ``state_dict``).
        threshold_scope: "layer" (default) — λ_α over the modules of a kind within each layer
            (depth-independent); "global" — λ_α over all modules of a kind in the network.
        probes: "fresh" — S new samples at every evaluation; "fixed" — S samples drawn at the
            first evaluation and reused at every later one (the paper's "first samples 64").
    """

    alpha: float | dict[str, float] = field(default_factory=_default_alpha)
    beta: float | dict[str, float] = 1e-3
    num_samples: int = 64
    start_epoch: int = 5
    interval: int = 8
    protect: bool = True
    seed: int = 0
    threshold_scope: str = "layer"
    probes: str = "fresh"

    def __post_init__(self) -> None:
        check_per_kind(self.alpha, "alpha", 0.0, 1.0)
        check_per_kind(self.beta, "beta", 0.0, None)
        betas = list(self.beta.values()) if isinstance(self.beta, Mapping) else [self.beta]
        check(all(abs(b) <= sys.float_info.max for b in betas), "beta", self.beta, "finite numbers >= 0")
        _check_int(self.num_samples, "num_samples", 2)
        _check_int(self.start_epoch, "start_epoch", 1)
        _check_int(self.interval, "interval", 1)
        check(isinstance(self.protect, bool), "protect", self.protect, "a bool")
        check_seed(self.seed, "seed")
        check(
            self.threshold_scope in ("global", "layer"),
            "threshold_scope",
            self.threshold_scope,
            "'global' or 'layer'",
        )
        check(self.probes in ("fresh", "fixed"), "probes", self.probes, "'fresh' or 'fixed'")


def _check_int(value: object, name: str, lo: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo)
    check(ok, name, value, "an integer" + (f" >= {lo}" if lo is not None else ""))


def _nan(m: int) -> Tensor:
    return torch.full((m,), float("nan"), dtype=torch.float64)


def _floats(t: Tensor) -> list[float | None]:
    """float tensor → JSON-able list (NaN → None)."""
    return [None if math.isnan(x) else float(x) for x in t.tolist()]


def _tensor(xs: list[float | None]) -> Tensor:
    return torch.tensor([float("nan") if x is None else float(x) for x in xs], dtype=torch.float64)


@register_method("mat", config=MATConfig)
class MAT(TrainingMethod):
    """Modular Adaptive Training.

    Args:
        config: a :class:`MATConfig` or a mapping of its fields; or pass the fields as keywords.

    State (all [M], in partition order): ``active`` (bool, the current decision), ``retired``
    (bool), ``prev_lmax`` (float64, λmax at the last evaluation, NaN if none), ``delta1``
    (float64, Δ_1, NaN until the 2nd evaluation). ``history`` holds one record per evaluation:
    ``{"event": "mat", "epoch", "step", "evaluation", "lambda_max": {module: λ},
    "threshold": {kind: λ_α}, "active": [module, …], "retired": [newly retired module, …],
    "nonfinite": [module whose λmax was NaN / ±Inf, …], "num_active": {kind: n}}``
    (``lambda_max`` holds the finite measurements only; with ``threshold_scope="layer"`` the
    ``threshold`` keys are ``"kind/layer"``). ``probe_state`` holds the generator state of the fixed
    probe draw (``probes="fixed"``; None until the first evaluation).
    """

    name = "mat"
    config_class: type[MATConfig] = MATConfig

    def __init__(self, config: MATConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(self.config_class, config, kw, self.name)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.active: Tensor | None = None
        self.retired: Tensor | None = None
        self.prev_lmax: Tensor | None = None
        self.delta1: Tensor | None = None
        self.evaluations = 0
        self.probe_state: Tensor | None = None
        self._alpha: dict[str, float] = {}
        self._beta: Tensor | None = None
        self._dirty = False

    # ------------------------------------------------------------------ binding
    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        kinds = list(dict.fromkeys(partition.kinds))
        self._alpha = {k: a for k in kinds if (a := per_kind(self.config.alpha, k)) is not None}
        if not self._alpha:
            raise ConfigError(
                f"{self.name}.alpha={self.config.alpha!r}: no key matches the partition kinds {kinds}"
            )
        self._beta = torch.tensor(
            [per_kind(self.config.beta, g.kind) or 0.0 for g in partition], dtype=torch.float64
        )
        m = len(partition)
        if self.active is None:
            self.active = ~controller_pruned(controller, m)
            self.retired = torch.zeros(m, dtype=torch.bool)
            self.prev_lmax, self.delta1 = _nan(m), _nan(m)
        else:
            check(
                self.active.numel() == m,
                f"{self.name}.state.active",
                self.active.numel(),
                f"{m} modules (the partition's M)",
            )
        self._dirty = True
        self._sync()

    @property
    def governed(self) -> Tensor:
        """bool [M]: modules whose kind has an α (the ones MAT decides about)."""
        assert self.partition is not None, "bind() first"
        return torch.tensor([g.kind in self._alpha for g in self.partition], dtype=torch.bool)

    def _sync(self) -> None:
        if self._dirty and self.controller is not None and self.active is not None:
            apply_active(self.controller, self.active)
            self._dirty = False

    # ------------------------------------------------------------------ hooks
    def before_step(self, ctx: LoopContext) -> None:
        self._sync()

    def due(self, epoch: int) -> bool:
        """Whether an evaluation runs at the end of (0-based) ``epoch``."""
        e, c = epoch + 1, self.config
        return e >= c.start_epoch and (e - c.start_epoch) % c.interval == 0

    def on_epoch_end(self, ctx: LoopContext) -> None:
        if self.due(ctx.epoch):
            self.decide(ctx, self.measure(ctx, self.governed))

    # ------------------------------------------------------------------ the algorithm
    def measure(self, ctx: LoopContext, which: Tensor) -> Tensor:
        """λmax of the unpruned modules selected by ``which`` (bool [M]); float64 [M], NaN elsewhere.

        Draws S samples with ``ctx.ntk_batch(S, self.generator)``; the engine call runs inside
        ``ctx.count_overhead()``. During the measurement every unpruned module is made active
        (so no strategy of the engine sees a partial backward), the controller's sliced layers
        run as their native classes with pruned slices zeroed (:func:`_common.native_layers`, so
        the engine's fast hook strategy applies), and everything is restored after. Under
        ``torch.distributed`` the λmax of rank 0 are broadcast, so all ranks decide the same.
        If the engine raises :class:`torch.linalg.LinAlgError` (an eigen-decomposition that did
        not converge, e.g. on a Gram with NaN / Inf), every selected module gets NaN (a
        ``RuntimeWarning`` says so) and :meth:`decide` keeps their previous decision.
        """
        assert self.partition is not None, "bind() first"
        check(ctx.ntk_batch is not None, "LoopContext.ntk_batch", None, f"a sampler; {self.name} needs one")
        m = len(self.partition)
        pruned = controller_pruned(self.controller, m)
        idx = (which & ~pruned).nonzero(as_tuple=True)[0]
        out = _nan(m)
        if idx.numel() == 0:
            return out
        inputs, output_mask = ctx.ntk_batch(self.config.num_samples, self._probe_generator())  # type: ignore[misc]
        with overhead(ctx):
            if self.controller is not None:
                apply_active(self.controller, ~pruned)
            try:
                part = self.partition.subset(idx.tolist())
                try:
                    lmax = scores.ntk_lambda_max(
                        unwrap(ctx.model), inputs, part, output_mask, controller=self.controller
                    )
                except torch.linalg.LinAlgError as e:  # e.g. eigvalsh on a Gram with NaN / Inf
                    warnings.warn(
                        f"{self.name}: the mNTK eigen-decomposition failed "
                        f"({' '.join(str(e).split())}); every measured module counts as non-finite",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    lmax = _nan(idx.numel())
                lmax = broadcast_from_rank0(lmax)  # every rank reaches it, failed or not
            finally:
                self._dirty = True
                self._sync()
        out[idx] = lmax
        return out

    def _probe_generator(self) -> torch.Generator:
        """The generator the probe draw consumes: the method's own (``probes="fresh"``), or a copy
        of the state it had at the first fixed draw (``probes="fixed"``: same samples every time)."""
        if self.config.probes == "fresh":
            return self.generator
        if self.probe_state is None:
            self.probe_state = self.generator.get_state()
        g = torch.Generator()
        g.set_state(self.probe_state)
        return g

    def decide(self, ctx: LoopContext, lmax: Tensor, measured: Tensor | None = None) -> Tensor:
        """Apply the three policies to a measurement, update the state, send the active set to the
        controller, log, and return it (bool [M]).

        Args:
            lmax: float64 [M], λmax per module; NaN where not measured.
            measured: bool [M], the modules the measurement covered (default: every governed,
                unpruned module — what :meth:`on_epoch_end` measures). A non-finite ``lmax``
                (NaN / ±Inf) of a covered governed module is a fault: the module keeps its previous
                active status and temporal state, is left out of the thresholds, is named in a
                ``RuntimeWarning`` and listed in the record's ``"nonfinite"``. Governed modules not
                covered keep their previous status silently.
        """
        assert self.partition is not None and self._beta is not None, "bind() first"
        assert self.active is not None and self.retired is not None
        assert self.prev_lmax is not None and self.delta1 is not None
        m = len(self.partition)
        lmax = lmax.detach().to(device="cpu", dtype=torch.float64).reshape(m)
        pruned = controller_pruned(self.controller, m)
        governed = self.governed
        covered = governed & ~pruned
        if measured is not None:
            covered = covered & torch.as_tensor(measured, dtype=torch.bool).reshape(m)
        finite = torch.isfinite(lmax)
        faulty = covered & ~finite
        names = self.partition.names
        nonfinite = [names[i] for i in faulty.nonzero(as_tuple=True)[0].tolist()]
        if nonfinite:
            idx = faulty.nonzero(as_tuple=True)[0].tolist()
            what = ", ".join(f"{names[i]} ({float(lmax[i])})" for i in idx)
            warnings.warn(
                f"{self.name}: non-finite λmax for {what}; keeping "
                + ("its previous decision" if len(nonfinite) == 1 else "their previous decisions"),
                RuntimeWarning,
                stacklevel=2,
            )
        measured = finite & governed & ~pruned  # what the policies see
        lmax = torch.where(measured, lmax, torch.tensor(float("nan"), dtype=torch.float64))
        # temporal policy (before the modular one: a module retired now is inactive now);
        # NaN in lmax leaves Δ_1 and prev untouched and retires nothing
        step = temporal_policy(lmax, self.prev_lmax, self.delta1, self._beta)
        newly = step.retire & ~self.retired & governed
        self.retired = self.retired | (step.retire & governed)
        self.prev_lmax = torch.where(measured, lmax, self.prev_lmax)
        self.delta1 = step.delta1
        # modular policy per kind, over the finite measurements of the kind; governed modules
        # without one keep their previous status
        kept = governed & ~pruned & ~measured
        active = (~pruned & ~governed) | (kept & self.active)
        thresholds: dict[str, float] = {}
        by_layer = self.config.threshold_scope == "layer"
        layers = self.partition.layers
        for kind, alpha in self._alpha.items():
            kind_sel = self.partition.kind_mask(kind) & measured
            idx = kind_sel.nonzero(as_tuple=True)[0].tolist()
            scopes = list(dict.fromkeys(layers[i] for i in idx)) if by_layer else [None]
            for layer in scopes:
                sel = kind_sel
                if layer is not None:
                    sel = kind_sel & torch.tensor([lay == layer for lay in layers], dtype=torch.bool)
                if not bool(sel.any()):
                    continue
                act, thresholds[kind if layer is None else f"{kind}/{layer}"] = modular_policy(
                    lmax[sel], alpha
                )
                active[sel] = act & ~self.retired[sel]
        if self.config.protect:
            # kept active modules count as the layer's active one; kept inactive ones are never
            # switched on by the protection (their score is unknown)
            score = torch.where(measured, lmax, torch.tensor(float("-inf"), dtype=torch.float64))
            eligible = governed & ~pruned & (measured | active)
            active = protect(active, score, self.partition.layers, eligible=eligible, preferred=~self.retired)
        self.active = active & ~pruned
        self.evaluations += 1
        self._dirty = True
        self._sync()
        rec = {
            "event": "mat",
            "epoch": int(ctx.epoch),
            "step": int(ctx.step),
            "evaluation": self.evaluations,
            "lambda_max": {names[i]: float(lmax[i]) for i in measured.nonzero(as_tuple=True)[0].tolist()},
            "threshold": thresholds,
            "active": [names[i] for i in self.active.nonzero(as_tuple=True)[0].tolist()],
            "retired": [names[i] for i in newly.nonzero(as_tuple=True)[0].tolist()],
            "nonfinite": nonfinite,
            "num_active": {
                k: int(sum(1 for i, g in enumerate(self.partition) if g.kind == k and bool(self.active[i])))
                for k in self._alpha
            },
        }
        self.history.append(rec)
        ctx.log(rec)
        return self.active.clone()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """JSON-able state for exact resume (history, RNG, decision and temporal state)."""
        st: dict[str, Any] = {
            **super().state_dict(),
            "generator": generator_state(self.generator),
            "evaluations": self.evaluations,
            "probe_state": None if self.probe_state is None else self.probe_state.tolist(),
        }
        if self.active is not None:
            assert self.retired is not None and self.prev_lmax is not None and self.delta1 is not None
            st.update(
                active=bool_list(self.active),
                retired=bool_list(self.retired),
                prev_lmax=_floats(self.prev_lmax),
                delta1=_floats(self.delta1),
            )
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        set_generator_state(self.generator, state["generator"])
        self.evaluations = int(state.get("evaluations", 0))
        ps = state.get("probe_state")
        self.probe_state = None if ps is None else torch.tensor(ps, dtype=torch.uint8)
        if "active" in state:
            self.active = torch.tensor(state["active"], dtype=torch.bool)
            self.retired = torch.tensor(state["retired"], dtype=torch.bool)
            self.prev_lmax = _tensor(state["prev_lmax"])
            self.delta1 = _tensor(state["delta1"])
            self._dirty = True
            self._sync()
