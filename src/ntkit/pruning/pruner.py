"""One pruning pipeline: scores → protect → select the lowest → mask → record.

:class:`Pruner` is what every pruning method goes through (``snip_struct``, ``mat_prune``, …):

1. **score**: its criterion (a scorer of :mod:`ntkit.pruning.importance`) maps the partition's M
   groups to float64 [M], or the caller hands in scores it measured itself (:meth:`Pruner.apply`);
2. **eligible**: the groups of ``kind`` (all kinds when None) not pruned yet;
3. **refuse on non-finite scores**: if any eligible score is NaN or ±Inf nothing is pruned, the
   previous mask stays, and a ``RuntimeWarning`` names the modules;
4. **select**: the lowest-scoring eligible groups, by count or by fraction, over all eligible
   groups (``scope="global"``) or within each layer (``scope="layer"``), keeping ≥ 1 eligible
   module per layer (``protect``; :func:`ntkit.methods.policies.prune_lowest`);
5. **mask**: ``controller.set_pruned(previous | new)`` — a pruned group acts as zero in the forward
   pass and, pruned implying inactive, gets no gradient (``SparseController.active`` excludes it);
6. **record**: a JSON-able ``{"event": "prune", "criterion", "scores": {name: s} (the eligible
   groups), "pruned": [names pruned now]}``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import check
from ntkit.partition import Partition
from ntkit.pruning.importance import ScoreData, Scorer, get_scorer

__all__ = ["PruneResult", "Pruner"]


@dataclass
class PruneResult:
    """What one pruning step decided.

    Attributes:
        pruned: bool [M], every pruned group after the step (previous ∪ new).
        new: bool [M], the groups pruned by this step (all False when refused).
        scores: float64 [M], the scores the decision was taken from.
        record: the JSON-able log record, or None when the step was refused.
        refused: names of the eligible groups whose score was not finite (empty = not refused).
    """

    pruned: Tensor
    new: Tensor
    scores: Tensor
    record: dict | None
    refused: list[str]


def controller_pruned(controller: Any, m: int) -> Tensor:
    """The controller's pruned set as bool [M] on CPU (all False if it does not track pruning)."""
    pruned = getattr(controller, "pruned", None)
    if pruned is None:
        return torch.zeros(m, dtype=torch.bool)
    return torch.as_tensor(pruned, dtype=torch.bool).detach().cpu().clone()


class Pruner:
    """Structured pruning by the lowest importance scores.

    Args:
        criterion: a scorer (``scorer(model, partition, data)`` → float64 [M], with a ``name``) or
            a built-in scorer's name (``"l1"``, ``"l2"``, ``"random"``, ``"snip"``, ``"lambda_max"``).
        kind: the module kind that competes (e.g. ``"head"``); None = every group.
        scope: ``"global"`` — the lowest over all eligible groups; ``"layer"`` — the count or
            fraction applies within each layer (``Partition.layers``).
        protect: keep ≥ 1 unpruned module of ``kind`` per layer (the count is then exact as long as
            it leaves one per layer; otherwise as many as possible are pruned).
    """

    def __init__(
        self, criterion: Scorer | str, *, kind: str | None = None, scope: str = "global", protect: bool = True
    ) -> None:
        self.criterion: Scorer = get_scorer(criterion) if isinstance(criterion, str) else criterion
        check(kind is None or (isinstance(kind, str) and bool(kind)), "kind", kind, "a module kind name or None")
        check(scope in ("global", "layer"), "scope", scope, "'global' or 'layer'")
        check(isinstance(protect, bool), "protect", protect, "a bool")
        self.kind, self.scope, self.protect = kind, scope, protect

    @property
    def name(self) -> str:
        return str(getattr(self.criterion, "name", type(self.criterion).__name__))

    def __call__(
        self,
        model: nn.Module,
        partition: Partition,
        data: ScoreData | None = None,
        *,
        controller: Any = None,
        count: int | None = None,
        fraction: float | None = None,
    ) -> PruneResult:
        """Score ``model``'s groups with the criterion, then :meth:`apply`."""
        return self.apply(
            self.criterion(model, partition, data), partition, controller, count=count, fraction=fraction
        )

    def eligible(self, partition: Partition, pruned: Tensor) -> Tensor:
        """bool [M]: groups of ``kind`` not in ``pruned``."""
        kind = partition.kind_mask(self.kind)
        check(bool(kind.any()), "kind", self.kind, f"a kind present in the partition {sorted(set(partition.kinds))}")
        return kind & ~pruned

    def select(
        self,
        scores: Tensor,
        partition: Partition,
        *,
        pruned: Tensor | None = None,
        count: int | None = None,
        fraction: float | None = None,
    ) -> Tensor:
        """The groups to prune now (bool [M]) — no refusal check, no side effect.

        Args:
            scores: float [M] (higher = keep); only eligible entries are read.
            partition: the M groups (their ``layer`` names drive protection and ``scope="layer"``).
            pruned: bool [M], groups already pruned (default none); never selected again.
            count: how many to prune (in total for ``"global"``, per layer for ``"layer"``).
            fraction: the share of the eligible groups instead (``round(fraction · n)``, Python's
                half-to-even, of the n eligible — in total, or per layer).
        """
        from ntkit.methods.policies import prune_lowest  # ntkit.methods imports this module

        m = len(partition)
        check(tuple(scores.shape) == (m,), "scores", tuple(scores.shape), f"shape ({m},), one per group")
        check((count is None) != (fraction is None), "count/fraction", (count, fraction), "exactly one of them")
        old = torch.zeros(m, dtype=torch.bool) if pruned is None else pruned.bool().cpu()
        elig = self.eligible(partition, old)
        layers = partition.layers
        pools = (
            [elig]
            if self.scope == "global"
            else [elig & torch.tensor([lay == name for lay in layers]) for name in dict.fromkeys(layers)]
        )
        new = torch.zeros(m, dtype=torch.bool)
        for pool in pools:
            n = int(pool.sum())
            if n == 0:
                continue
            if count is not None:
                ok = isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= n
                check(ok, "count", count, f"an integer in [0, {n}] (eligible modules{'' if self.scope == 'global' else ' per layer'})")
                frac = count / n  # round(count / n · n) == count exactly
            else:
                ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                check(ok and 0.0 <= fraction <= 1.0, "fraction", fraction, "a number in [0, 1]")  # type: ignore[operator]
                frac = float(fraction)  # type: ignore[arg-type]
            new |= prune_lowest(scores, frac, layers, eligible=pool, protect_layers=self.protect)
        return new

    def apply(
        self,
        scores: Tensor,
        partition: Partition,
        controller: Any = None,
        *,
        pruned: Tensor | None = None,
        count: int | None = None,
        fraction: float | None = None,
    ) -> PruneResult:
        """Prune from given ``scores`` (float [M]): refuse on a non-finite eligible score, else
        :meth:`select` and ``controller.set_pruned(previous | new)``.

        ``pruned`` (bool [M]) is the previous mask when there is no controller (default: the
        controller's ``pruned``, or none)."""
        m = len(partition)
        scores = torch.as_tensor(scores).detach().to(device="cpu", dtype=torch.float64)
        old = controller_pruned(controller, m) if pruned is None else pruned.bool().cpu().clone()
        elig = self.eligible(partition, old)
        names = partition.names
        bad = [names[i] for i in (elig & ~torch.isfinite(scores)).nonzero(as_tuple=True)[0].tolist()]
        if bad:
            shown = ", ".join(bad[:8]) + (f", … ({len(bad)} in all)" if len(bad) > 8 else "")
            warnings.warn(
                f"pruning refused: non-finite {self.name} score for {shown}; the previous mask is kept",
                RuntimeWarning,
                stacklevel=2,
            )
            return PruneResult(old, torch.zeros(m, dtype=torch.bool), scores, None, bad)
        new = self.select(scores, partition, pruned=old, count=count, fraction=fraction)
        total = old | new
        if controller is not None:
            controller.set_pruned(total.clone())
        record = {
            "event": "prune",
            "criterion": self.name,
            "scores": {names[i]: float(scores[i]) for i in elig.nonzero(as_tuple=True)[0].tolist()},
            "pruned": [names[i] for i in new.nonzero(as_tuple=True)[0].tolist()],
        }
        return PruneResult(total, new, scores, record, [])
