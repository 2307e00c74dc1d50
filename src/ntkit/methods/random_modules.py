"""Rand — random module selection baseline (seed 000 §B.1: "BERT-Rand randomly selects and updates
50% heads in every epoch").

At the start of every epoch a fresh random ``fraction`` of each kind's unpruned modules is made
active (per kind over the whole network, or per (kind, layer) with ``per_layer`` — the VGG
reading, "50% filters … in each layer"), then the protecting strategy switches on one random
module in any layer left with none. The draw uses the method's own seeded generator, saved in
``state_dict``. Modules of kinds not selected by ``kinds`` are always active.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import check
from ntkit.methods._common import (
    apply_active,
    bool_list,
    controller_pruned,
    generator_state,
    kind_ids,
    set_generator_state,
)
from ntkit.methods._selection import check_kinds, check_seed, governed_mask
from ntkit.methods.base import LoopContext, TrainingMethod, make_config, register_method
from ntkit.methods.policies import protect, random_subset
from ntkit.partition import Partition

__all__ = ["Rand", "RandConfig"]


@dataclass
class RandConfig:
    """Settings of the Rand baseline.

    Attributes:
        fraction: share of each kind's modules active in an epoch, in (0, 1] (paper: 0.5).
        kinds: module kinds to randomise (None = every kind in the partition).
        per_layer: draw ``fraction`` within each layer instead of over the whole network.
        protect: keep ≥ 1 active module per layer (protecting strategy, applied to all baselines).
        seed: seed of the draw, an integer in [0, 2**64 − 1] (the generator state is saved in
            ``state_dict``).
    """

    fraction: float = 0.5
    kinds: list[str] | None = None
    per_layer: bool = False
    protect: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        ok = isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool)
        check(ok and 0.0 < self.fraction <= 1.0, "fraction", self.fraction, "a number in (0, 1]")
        check_kinds(self.kinds, "kinds")
        check(isinstance(self.per_layer, bool), "per_layer", self.per_layer, "a bool")
        check(isinstance(self.protect, bool), "protect", self.protect, "a bool")
        check_seed(self.seed, "seed")


@register_method("rand", config=RandConfig)
class Rand(TrainingMethod):
    """Random ``fraction`` of modules active, redrawn at each epoch start.

    ``history`` gets one record per draw: ``{"event": "rand", "epoch", "active": [module, …]}``.
    """

    name = "rand"

    def __init__(self, config: RandConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(RandConfig, config, kw, self.name)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.active: Tensor | None = None

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        governed_mask(partition, self.config.kinds, f"{self.name}.kinds")  # validate early
        if self.active is None:
            self.active = ~controller_pruned(controller, len(partition))
        apply_active(controller, self.active)

    def draw(self) -> Tensor:
        """A fresh active set (bool [M]); consumes the generator."""
        assert self.partition is not None, "bind() first"
        part = self.partition
        pruned = controller_pruned(self.controller, len(part))
        gov = governed_mask(part, self.config.kinds, f"{self.name}.kinds")
        eligible = gov & ~pruned
        drawn = random_subset(
            kind_ids(part, self.config.per_layer), self.config.fraction, self.generator, eligible=eligible
        )
        active = (drawn | ~gov) & ~pruned
        if self.config.protect:
            score = torch.rand(len(part), generator=self.generator, dtype=torch.float64)
            active = protect(active, score, part.layers, eligible=eligible)
        return active

    def on_epoch_start(self, ctx: LoopContext) -> None:
        assert self.partition is not None, "bind() first"
        self.active = self.draw()
        apply_active(self.controller, self.active)
        names = self.partition.names
        rec = {
            "event": "rand",
            "epoch": int(ctx.epoch),
            "active": [names[i] for i in self.active.nonzero(as_tuple=True)[0].tolist()],
        }
        self.history.append(rec)
        ctx.log(rec)

    def state_dict(self) -> dict:
        st: dict[str, Any] = {**super().state_dict(), "generator": generator_state(self.generator)}
        if self.active is not None:
            st["active"] = bool_list(self.active)
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        set_generator_state(self.generator, state["generator"])
        if "active" in state:
            self.active = torch.tensor(state["active"], dtype=torch.bool)
            apply_active(self.controller, self.active)
