"""Structured pruning by any importance criterion on a schedule — the seed-002 baselines.

``structured_prune`` scores the structures of one ``kind`` (heads, experts, filters) with a scorer
of :mod:`ntkit.pruning.importance` (``criterion``: ``"fpgm"``, ``"chip"``, ``"dpfps"``,
``"att_score"``, ``"exp_score"``, ``"grasp"``, ``"snip"``, ``"l1"``, ``"l2"``, ``"random"``,
``"lambda_max"``), removes the lowest through :class:`ntkit.pruning.Pruner` (≥ 1 per layer with
``protect``) and, with ``surgery`` (default), physically removes them
(:func:`ntkit.sparse.surgery.remove_groups` → ``ctx.change_structure``: the loop rebuilds the
controller and the optimizer, moments carried over), so the rest of the run trains a smaller model.

When it prunes:

* ``at_init=True``: once, in :meth:`~ntkit.methods.base.TrainingMethod.at_init` (SNIP, GraSP at
  initialisation), to ``ratio``; the schedule must then be ``"oneshot"`` (its ``t`` is unused).
* ``schedule="oneshot"``: at the end of epoch ``t`` (0-based), to ``ratio``.
* ``schedule="linear"``: at the end of every epoch ``t0 … t_end`` (``t_end=-1``: = ``t0``), equal
  shares, total ``ratio`` after ``t_end`` (seed 002's VGG/ResNet schedule).
* ``schedule="iterative"``: ``rounds`` rounds from the end of epoch ``t0``, one every ``every``
  epochs, each removing the same share of the structures still there (total 1 − (1 − p)^k after
  round k, ``ratio`` after the last) — "pruned by the same iterative strategy as IMP" (seed 002's
  Att-Score / Exp-Score), without rewinding (that is :mod:`ntkit.methods.lth`).

The pruned count is by **structure count** of the kind's **original** number n₀ (before any
surgery): after a step the total pruned is ``round(ratio_at(epoch) · n₀)`` (Python's round), so
each step prunes the difference to what is already gone. ``protect`` may leave fewer pruned when
a layer would otherwise empty (the record's ``pruned`` lists what went).

Scoring runs inside ``ctx.count_overhead()`` (booked as the method's overhead, not training);
labelled batches come from ``ctx.sample_batch`` / ``ctx.loss_fn`` (gradient-based criteria),
unlabelled samples from ``ctx.ntk_batch`` (CHIP, λmax), both from a generator seeded by
(run seed, ``seed``, pruning step) so a resumed run draws the same. Every unpruned structure is
active (trains); a pruned one never comes back. Without ``ctx.change_structure`` (a loop that does
not support surgery) the structures stay masked (``controller.set_pruned``) and the record says
``"surgery": false``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.methods._common import apply_active, broadcast_from_rank0, overhead
from ntkit.methods.base import LoopContext, TrainingMethod, make_config, register_method
from ntkit.partition import Partition
from ntkit.pruning.importance import SCORERS, ScoreData, get_scorer
from ntkit.pruning.pruner import Pruner
from ntkit.pruning.schedules import Iterative, Linear, OneShot

__all__ = ["SCHEDULES", "StructuredPrune", "StructuredPruneConfig"]

SCHEDULES = ("oneshot", "linear", "iterative")
#: criteria that need labelled batches (``ctx.loss_fn``) / unlabelled samples (``ctx.ntk_batch``)
_LABELLED = frozenset({"snip", "grasp", "att_score", "exp_score", "dpfps"})
_INPUTS = frozenset({"chip", "lambda_max"})


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: object, field: str, lo: int, hi: int | None = None) -> None:
    rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    check(_is_int(v) and v >= lo and (hi is None or v <= hi), field, v, rng)  # type: ignore[operator]


def _ratio(v: object, field: str) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    check(ok and 0.0 <= v < 1.0, field, v, "a number in [0, 1)")  # type: ignore[operator]


def _bool(v: object, field: str) -> None:
    check(isinstance(v, bool), field, v, "a bool")


@dataclass
class StructuredPruneConfig:
    """Settings of ``structured_prune``.

    Attributes:
        criterion: the importance scorer, a name of :data:`ntkit.pruning.SCORERS`.
        kind: the structure kind scored and pruned (``"head"``, ``"expert"``, ``"filter"``).
        ratio: total share of the kind's original structures pruned, in [0, 1) (by count).
        schedule: ``"oneshot"`` | ``"linear"`` | ``"iterative"`` (see the module docstring).
        t: epoch (0-based) at whose end the one-shot pruning happens.
        t0: first pruning epoch of the linear and iterative schedules.
        t_end: last pruning epoch of the linear schedule (-1: = ``t0``, one step), ≥ ``t0``.
        rounds: iterative rounds, ≥ 1.
        every: epochs between iterative rounds, ≥ 1.
        at_init: score and prune once at initialisation (SNIP, GraSP); ``schedule`` must be "oneshot".
        surgery: physically remove the pruned structures (False: keep them masked).
        protect: keep ≥ 1 structure per layer (required with ``surgery``: a layer cannot be emptied).
        scope: ``"global"`` — rank over all layers; ``"layer"`` — the same share in every layer.
        num_batches: labelled batches per scoring (gradient-based criteria), ≥ 1.
        num_samples: unlabelled samples per scoring (CHIP, λmax), ≥ 2.
        batch_size: samples per labelled scoring batch (0 = the loop's batch size).
        seed: seed of the scoring draws (and of ``"random"``), in [0, 2**64 - 1].
    """

    criterion: str = "l1"
    kind: str = "head"
    ratio: float = 0.5
    schedule: str = "oneshot"
    t: int = 0
    t0: int = 0
    t_end: int = -1
    rounds: int = 1
    every: int = 1
    at_init: bool = False
    surgery: bool = True
    protect: bool = True
    scope: str = "global"
    num_batches: int = 1
    num_samples: int = 64
    batch_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.criterion, str) and self.criterion in SCORERS, "criterion", self.criterion,
              f"one of {sorted(SCORERS)}")
        check(isinstance(self.kind, str) and bool(self.kind), "kind", self.kind, "a module kind name")
        _ratio(self.ratio, "ratio")
        check(isinstance(self.schedule, str) and self.schedule in SCHEDULES, "schedule", self.schedule,
              f"one of {list(SCHEDULES)}")
        _int(self.t, "t", 0)
        _int(self.t0, "t0", 0)
        _int(self.t_end, "t_end", -1)
        check(self.t_end == -1 or self.t_end >= self.t0, "t_end", self.t_end, f"-1 or an epoch >= t0={self.t0}")
        _int(self.rounds, "rounds", 1)
        _int(self.every, "every", 1)
        for f in ("at_init", "surgery", "protect"):
            _bool(getattr(self, f), f)
        check(not self.at_init or self.schedule == "oneshot", "schedule", self.schedule,
              "'oneshot' with at_init=True (pruning at initialisation happens once)")
        check(self.protect or not self.surgery, "protect", self.protect,
              "True with surgery=True (surgery cannot empty a layer; set surgery=False)")
        check(self.scope in ("global", "layer") if isinstance(self.scope, str) else False, "scope", self.scope,
              "'global' or 'layer'")
        _int(self.num_batches, "num_batches", 1)
        _int(self.num_samples, "num_samples", 2)
        _int(self.batch_size, "batch_size", 0)
        _int(self.seed, "seed", 0, 2**64 - 1)

    def plan(self) -> OneShot | Linear | Iterative | None:
        """The schedule object (None with ``at_init`` or ``ratio == 0``)."""
        if self.at_init or self.ratio == 0:
            return None
        if self.schedule == "oneshot":
            return OneShot(self.t, float(self.ratio))
        if self.schedule == "linear":
            end = self.t0 if self.t_end == -1 else self.t_end
            return Linear(self.t0, float(self.ratio), end - self.t0 + 1)
        # 1 − (1 − ratio)^(1/rounds) without cancellation: a tiny ratio keeps a positive share
        p = -math.expm1(math.log1p(-float(self.ratio)) / self.rounds)
        if p <= 0.0:  # below float resolution per round: nothing to prune
            return None
        return Iterative(p, self.rounds, self.every, t0=self.t0)


class StructurePruning(TrainingMethod):
    """What ``structured_prune`` and ``lth`` share: the kind's original count, the names pruned
    so far (stable across surgery), re-applying the mask at bind, one scored pruning step with
    optional surgery, and a JSON-able state. Subclasses set ``self.config`` (with ``kind``,
    ``protect``, ``surgery``, ``scope``-like fields) before calling :meth:`prune_to`."""

    config: Any

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None
        self.n0: int | None = None  # the kind's structure count before any pruning
        self.pruned_names: list[str] = []  # every structure pruned so far, in pruning order
        self.pruned_layers: dict[str, str] = {}  # pruned name → its layer
        self.n0_layers: dict[str, int] = {}  # the kind's original count per layer
        self.steps_done = 0  # pruning steps taken (seeds the scoring draws)

    # ------------------------------------------------------------------ binding / state
    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        self.model = model
        n = sum(g.kind == self.config.kind for g in partition)
        check(n > 0 or self.n0 is not None, f"{self.name}.kind", self.config.kind,
              f"a kind present in the partition {sorted(set(partition.kinds))}")
        if self.n0 is None:
            self.n0 = n
            self.n0_layers = {lay: len(idx) for lay, idx in partition.groups_by_layer(self.config.kind).items()}
        self._apply_mask()

    def _mask(self) -> Tensor:
        assert self.partition is not None, "bind() first"
        gone = set(self.pruned_names)
        return torch.tensor([g.name in gone for g in self.partition], dtype=torch.bool)

    def _apply_mask(self) -> None:
        if self.controller is None or self.partition is None:
            return
        pruned = self._mask()
        self.controller.set_pruned(pruned.clone())
        apply_active(self.controller, ~pruned)  # every structure still there trains

    def state_dict(self) -> dict:
        return {**super().state_dict(), "n0": self.n0, "n0_layers": dict(self.n0_layers),
                "pruned_names": list(self.pruned_names), "pruned_layers": dict(self.pruned_layers),
                "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.n0 = None if state.get("n0") is None else int(state["n0"])
        self.n0_layers = {str(k): int(v) for k, v in state.get("n0_layers", {}).items()}
        self.pruned_names = [str(n) for n in state.get("pruned_names", [])]
        self.pruned_layers = {str(k): str(v) for k, v in state.get("pruned_layers", {}).items()}
        self.steps_done = int(state.get("steps_done", 0))
        self._apply_mask()

    # ------------------------------------------------------------------ one pruning step
    def pruned_total(self) -> int:
        """Structures of the kind pruned so far (removed or masked)."""
        return len(self.pruned_names)

    def target(self, ratio: float) -> int:
        """Total pruned count due at ``ratio`` of the original count n₀."""
        assert self.n0 is not None, "bind() first"
        return round(float(ratio) * self.n0)

    def prune_to(self, ctx: LoopContext, ratio: float, scores_fn: Any, criterion: str,
                 extra: Mapping[str, Any] | None = None, before_surgery: Any = None) -> list[str]:
        """Prune down to ``round(ratio · n₀)`` structures of the kind in total (``scope="layer"``:
        ``round(ratio · n₀ of the layer)`` in every layer).

        ``scores_fn()`` → float64 [M] for the current partition (called inside the overhead
        booking, after every unpruned structure was made active); ``before_surgery()`` runs
        after the mask is set and before surgery (LTH rewinds there). A non-finite eligible score
        refuses the whole step (warned by the pruner; nothing changes). Returns the names pruned now.
        """
        assert self.partition is not None and self.model is not None, "bind() first"
        scope = getattr(self.config, "scope", "global")
        layers = self.partition.layers
        if scope == "global":
            due: dict[str | None, int] = {None: self.target(ratio) - self.pruned_total()}
        else:
            done: dict[str, int] = {}
            for n in self.pruned_names:
                done[self.pruned_layers[n]] = done.get(self.pruned_layers[n], 0) + 1
            due = {lay: round(float(ratio) * n) - done.get(lay, 0) for lay, n in self.n0_layers.items()}
        if all(k <= 0 for k in due.values()):
            return []
        old = self._mask()
        apply_active(self.controller, ~old)
        with overhead(ctx):
            scores = scores_fn()
        scores = broadcast_from_rank0(torch.as_tensor(scores, dtype=torch.float64).cpu())
        pruner = Pruner(_Named(criterion), kind=self.config.kind, protect=self.config.protect)
        self.steps_done += 1
        total, names, seen = old.clone(), [], {}
        for lay, k in due.items():
            if k <= 0:
                continue
            pool = old if lay is None else old | torch.tensor([x != lay for x in layers])
            elig = int(pruner.eligible(self.partition, pool).sum()) if bool((~pool).any()) else 0
            if elig == 0:
                continue
            res = pruner.apply(scores, self.partition, None, pruned=pool, count=min(k, elig))
            if res.record is None:  # non-finite scores: refused (warned), nothing changes
                return []
            total |= res.new
            names += res.record["pruned"]
            seen.update(res.record["scores"])
        if self.controller is not None:
            self.controller.set_pruned(total.clone())
        for n in names:
            self.pruned_layers[n] = layers[self.partition.names.index(n)]
        self.pruned_names += names
        if before_surgery is not None:
            before_surgery()
        surgery = bool(self.config.surgery) and ctx.change_structure is not None and bool(names)
        rec = {"event": "prune", "epoch": int(ctx.epoch), "step": int(ctx.step), "criterion": criterion,
               "scores": seen, "pruned": names, "target": self.target(ratio), "pruned_total": self.pruned_total(),
               "surgery": surgery, **dict(extra or {})}
        self.history.append(rec)
        ctx.log(rec)
        if self.config.surgery and ctx.change_structure is None and names:
            warnings.warn(f"{self.name}: the loop has no change_structure; the pruned structures stay masked",
                          RuntimeWarning, stacklevel=2)
        if surgery:
            from ntkit.sparse.surgery import remove_groups

            gone = set(names)
            change = remove_groups(self.model, self.partition, [g.name for g in self.partition if g.name in gone],
                                   controller=self.controller)
            ctx.change_structure(change)  # type: ignore[misc]  # the loop re-binds: mask, model, partition
        else:
            apply_active(self.controller, ~self._mask())
        return names


class _Named:
    """A stand-in scorer carrying only the name (scores are handed to ``Pruner.apply``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *a: Any, **k: Any) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("scores are passed to Pruner.apply")


@register_method("structured_prune", config=StructuredPruneConfig)
class StructuredPrune(StructurePruning):
    """Structured pruning by ``config.criterion`` on ``config.schedule`` (module docstring).

    Args:
        config: a :class:`StructuredPruneConfig` or a mapping of its fields (or the fields as keywords).

    ``history`` gets one ``{"event": "prune", "epoch", "step", "criterion", "scores": {name: s}
    (eligible structures), "pruned": [names], "target", "pruned_total", "surgery"}`` per step.
    """

    name = "structured_prune"

    def __init__(self, config: StructuredPruneConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(StructuredPruneConfig, config, kw, self.name)
        self.schedule = self.config.plan()

    def at_init(self, ctx: LoopContext) -> None:
        if self.config.at_init and self.config.ratio > 0:
            self._step(ctx, float(self.config.ratio))

    def on_epoch_end(self, ctx: LoopContext) -> None:
        if self.schedule is not None and self.schedule.due(int(ctx.epoch)):
            self._step(ctx, self.schedule.ratio_at(int(ctx.epoch)))

    def _step(self, ctx: LoopContext, ratio: float) -> None:
        cfg = self.config
        gen = torch.Generator().manual_seed((int(ctx.seed) * 1_000_003 + int(cfg.seed) + 7_919 * self.steps_done)
                                            % 2**63)
        crit = cfg.criterion
        kw = {"seed": (int(cfg.seed) + self.steps_done) % 2**63} if crit == "random" else {}
        scorer = get_scorer(crit, **kw)

        def scores() -> Tensor:
            assert self.model is not None and self.partition is not None
            data = ScoreData(num_batches=cfg.num_batches, controller=self.controller)
            if crit in _LABELLED:
                if ctx.loss_fn is None or ctx.sample_batch is None:
                    raise ConfigError(f"{self.name}.criterion={crit!r}: the loop context has no loss_fn / "
                                      "sample_batch (this criterion needs labels)")
                n = cfg.batch_size or ctx.batch_size
                data.loss_fn = lambda m: ctx.loss_fn(m, ctx.sample_batch(n, gen))  # type: ignore[misc]
            if crit in _INPUTS:
                if ctx.ntk_batch is None:
                    raise ConfigError(f"{self.name}.criterion={crit!r}: the loop context has no ntk_batch")
                data.inputs, data.output_mask = ctx.ntk_batch(cfg.num_samples, gen)
            return scorer(self.model, self.partition, data)

        self.prune_to(ctx, ratio, scores, crit, extra={"schedule": cfg.schedule if not cfg.at_init else "at_init"})
