"""MAT + pruning (seed 000 §B.2, Table 5): prune by λmax rank once, then MAT on the rest.

At the end of epoch ``prune_epoch − 1`` (0-based; after ``prune_epoch`` epochs — the paper prunes
"at the 15th epoch") the λmax of every unpruned module of ``prune_kind`` is measured and the
lowest ``prune_fraction`` of them are pruned (``controller.set_pruned``), keeping ≥ 1 per layer
when ``protect``. MAT (α = 0.2 by default) governs the training of the remaining modules over the
whole run, before and after the pruning; a measurement due for both reuses one engine call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import check
from ntkit.methods._common import apply_active, bool_list, controller_pruned
from ntkit.methods.base import LoopContext, register_method
from ntkit.methods.mat import MAT, MATConfig
from ntkit.partition import Partition
from ntkit.pruning.importance import LambdaMax
from ntkit.pruning.pruner import Pruner

__all__ = ["MATPrune", "MATPruneConfig"]


def _prune_alpha() -> dict[str, float]:
    return {"head": 0.2}


@dataclass
class MATPruneConfig(MATConfig):
    """:class:`MATConfig` plus the pruning step (every MAT field keeps its meaning).

    Attributes:
        alpha: as in MAT; default ``{"head": 0.2}`` (seed 000 §B.2).
        prune_epoch: ≥ 1; prune at the end of epoch ``prune_epoch − 1`` (0-based).
        prune_fraction: share of ``prune_kind``'s unpruned modules to prune, in [0, 1).
        prune_kind: the module kind ranked and pruned (e.g. ``"head"``).
    """

    alpha: float | dict[str, float] = field(default_factory=_prune_alpha)
    prune_epoch: int = 15
    prune_fraction: float = 0.5
    prune_kind: str = "head"

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.prune_epoch, int) and not isinstance(self.prune_epoch, bool)
        check(ok and self.prune_epoch >= 1, "prune_epoch", self.prune_epoch, "an integer >= 1")
        ok = isinstance(self.prune_fraction, (int, float)) and not isinstance(self.prune_fraction, bool)
        check(
            ok and 0.0 <= self.prune_fraction < 1.0,
            "prune_fraction",
            self.prune_fraction,
            "a number in [0, 1)",
        )
        check(
            isinstance(self.prune_kind, str) and bool(self.prune_kind),
            "prune_kind",
            self.prune_kind,
            "a module kind name",
        )


@register_method("mat_prune", config=MATPruneConfig)
class MATPrune(MAT):
    """λmax-rank pruning at ``prune_epoch`` followed by MAT on the remaining modules.

    ``history`` adds one record for the pruning: ``{"event": "prune", "epoch", "step",
    "criterion": "lambda_max", "scores": {module: λ}, "pruned": [module, …]}``.
    """

    name = "mat_prune"
    config_class = MATPruneConfig
    config: MATPruneConfig

    def __init__(self, config: MATPruneConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(config, **kw)
        self.pruned_done = False
        self._pruned_mask = torch.zeros(0, dtype=torch.bool)

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        if self.pruned_done and controller is not None:
            check(
                self._pruned_mask.numel() == len(partition),
                "state.pruned",
                self._pruned_mask.numel(),
                f"{len(partition)} modules",
            )
            controller.set_pruned(self._pruned_mask.clone())
        super().bind(model, partition, controller)

    def _prune_kind_mask(self) -> Tensor:
        assert self.partition is not None, "bind() first"
        mask = self.partition.kind_mask(self.config.prune_kind)
        check(
            bool(mask.any()),
            "prune_kind",
            self.config.prune_kind,
            f"a kind present in the partition {sorted(set(self.partition.kinds))}",
        )
        return mask

    def on_epoch_end(self, ctx: LoopContext) -> None:
        prune_now = not self.pruned_done and ctx.epoch + 1 == self.config.prune_epoch
        mat_now = self.due(ctx.epoch)
        if not (prune_now or mat_now):
            return
        which = (self.governed | self._prune_kind_mask()) if prune_now else self.governed
        lmax = self.measure(ctx, which)
        if prune_now:
            lmax = self.prune(ctx, lmax)
        if mat_now:
            self.decide(
                ctx, torch.where(self.governed, lmax, torch.tensor(float("nan"), dtype=torch.float64))
            )

    def prune(self, ctx: LoopContext, lmax: Tensor) -> Tensor:
        """Prune the lowest-λmax share of ``prune_kind`` through :class:`ntkit.pruning.Pruner`;
        returns ``lmax`` with pruned modules NaN. A non-finite λmax of an eligible module refuses
        the step (previous mask kept, ``RuntimeWarning``; ``pruned_done`` stays False)."""
        assert self.partition is not None and self.active is not None
        self._prune_kind_mask()
        pruner = Pruner(LambdaMax(), kind=self.config.prune_kind, protect=self.config.protect)
        old = controller_pruned(self.controller, len(self.partition))
        res = pruner.apply(lmax, self.partition, self.controller, pruned=old, fraction=self.config.prune_fraction)
        if res.record is None:
            return lmax
        pruned = res.pruned
        self.active = self.active & ~pruned
        apply_active(self.controller, self.active)
        self.pruned_done = True
        rec = {"event": "prune", "epoch": int(ctx.epoch), "step": int(ctx.step), **res.record}
        self.history.append(rec)
        ctx.log(rec)
        self._pruned_mask = pruned
        return torch.where(pruned, torch.tensor(float("nan"), dtype=torch.float64), lmax)

    def state_dict(self) -> dict:
        st = super().state_dict()
        st["pruned_done"] = self.pruned_done
        if self.pruned_done:
            st["pruned"] = bool_list(self._pruned_mask)
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pruned_done = bool(state.get("pruned_done", False))
        if "pruned" in state:
            self._pruned_mask = torch.tensor(state["pruned"], dtype=torch.bool)
            if self.controller is not None:
                self.controller.set_pruned(self._pruned_mask.clone())
                self._dirty = True
                self._sync()
