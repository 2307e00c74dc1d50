"""Structured SNIP at initialisation (Lee et al. 2019, per module as in seed 000 Table 5).

Before the first optimizer step, each module of ``kind`` is scored by
:func:`ntkit.methods.scores.snip_scores` (Σ |θ ⊙ ∂L/∂θ| over its slices, on ``num_batches``
labelled batches, booked as overhead) and the lowest ``fraction`` are pruned
(``controller.set_pruned``), keeping ≥ 1 per layer when ``protect``. The rest train normally.

SNIP needs labels: at initialisation (:meth:`SnipStruct.at_init`) it draws ``num_batches``
labelled batches of ``batch_size`` samples with ``ctx.sample_batch`` (its own generator, seeded
``ctx.seed · 1000 + 777``, so the training data order is unaffected) and scores them with
``ctx.loss_fn``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.methods._common import (
    apply_active,
    bool_list,
    broadcast_from_rank0,
    controller_pruned,
    overhead,
    unwrap,
)
from ntkit.methods.base import LoopContext, TrainingMethod, make_config, register_method
from ntkit.partition import Partition
from ntkit.pruning.importance import ScoreData, Snip
from ntkit.pruning.pruner import Pruner

__all__ = ["SnipStruct", "SnipStructConfig"]


@dataclass
class SnipStructConfig:
    """Settings of structured SNIP.

    Attributes:
        fraction: share of ``kind``'s modules pruned at step 0, in [0, 1) (paper: 0.5 and 0.75).
        kind: the module kind scored and pruned (e.g. ``"head"``).
        num_batches: ≥ 1 labelled batches whose averaged gradient gives the scores.
        protect: keep ≥ 1 module per layer.
        batch_size: samples per scoring batch (0 = the loop's batch size).
    """

    fraction: float = 0.5
    kind: str = "head"
    num_batches: int = 1
    protect: bool = True
    batch_size: int = 0

    def __post_init__(self) -> None:
        ok = isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool)
        check(ok and 0.0 <= self.fraction < 1.0, "fraction", self.fraction, "a number in [0, 1)")
        check(isinstance(self.kind, str) and bool(self.kind), "kind", self.kind, "a module kind name")
        ok = isinstance(self.num_batches, int) and not isinstance(self.num_batches, bool)
        check(ok and self.num_batches >= 1, "num_batches", self.num_batches, "an integer >= 1")
        check(isinstance(self.protect, bool), "protect", self.protect, "a bool")
        ok = isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
        check(ok and self.batch_size >= 0, "batch_size", self.batch_size, "an integer >= 0")


@register_method("snip_struct", config=SnipStructConfig)
class SnipStruct(TrainingMethod):
    """Prune the lowest-SNIP-score modules once, at initialisation.

    Args:
        config: a :class:`SnipStructConfig` or a mapping of its fields (or the fields as keywords).

    ``history`` gets ``{"event": "prune", "epoch", "step", "criterion": "snip", "scores":
    {module: s}, "pruned": [module, …]}``.
    """

    name = "snip_struct"

    def __init__(
        self,
        config: SnipStructConfig | Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__()
        self.config = make_config(SnipStructConfig, config, kw, self.name)
        self.done = False
        self.pruned: Tensor | None = None

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        self._kind_mask()
        if self.pruned is not None and controller is not None:
            controller.set_pruned(self.pruned.clone())
        apply_active(controller, ~controller_pruned(controller, len(partition)))

    def _kind_mask(self) -> Tensor:
        assert self.partition is not None, "bind() first"
        mask = self.partition.kind_mask(self.config.kind)
        check(
            bool(mask.any()),
            "kind",
            self.config.kind,
            f"a kind present in the partition {sorted(set(self.partition.kinds))}",
        )
        return mask

    def at_init(self, ctx: LoopContext) -> None:
        if not self.done:
            self.prune(ctx)

    def prune(self, ctx: LoopContext) -> Tensor:
        """Score, prune and activate the rest; returns the pruned set (bool [M])."""
        assert self.partition is not None, "bind() first"
        if ctx.loss_fn is None or ctx.sample_batch is None:
            raise ConfigError("snip_struct: the loop context has no loss_fn / sample_batch (SNIP needs labels)")
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + 777)
        n = self.config.batch_size or ctx.batch_size

        def loss_fn(model: nn.Module) -> Tensor:
            return ctx.loss_fn(model, ctx.sample_batch(n, gen))  # type: ignore[misc]
        m = len(self.partition)
        old = controller_pruned(self.controller, m)
        self._kind_mask()
        apply_active(self.controller, ~old)  # every unpruned module gets its gradient scored
        with overhead(ctx):
            score = Snip()(unwrap(ctx.model), self.partition, ScoreData(loss_fn, self.config.num_batches))
        score = broadcast_from_rank0(score)
        pruner = Pruner(Snip(), kind=self.config.kind, protect=self.config.protect)
        res = pruner.apply(score, self.partition, self.controller, pruned=old, fraction=self.config.fraction)
        self.done = True
        if res.record is None:  # non-finite scores: nothing pruned (warned), the previous mask stays
            return old
        self.pruned = res.pruned
        apply_active(self.controller, ~self.pruned)
        rec = {"event": "prune", "epoch": int(ctx.epoch), "step": int(ctx.step), **res.record}
        self.history.append(rec)
        ctx.log(rec)
        return self.pruned.clone()

    def state_dict(self) -> dict:
        st: dict[str, Any] = {**super().state_dict(), "done": self.done}
        if self.pruned is not None:
            st["pruned"] = bool_list(self.pruned)
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.done = bool(state.get("done", False))
        if "pruned" in state:
            self.pruned = torch.tensor(state["pruned"], dtype=torch.bool)
            if self.controller is not None:
                self.controller.set_pruned(self.pruned.clone())
                apply_active(self.controller, ~self.pruned)
