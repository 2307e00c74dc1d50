"""Rand — random module selection baseline (seed 000 §B.1: "BERT-Rand randomly selects and updates
50% heads in every epoch").

At the start of every epoch a fresh random ``fraction`` of each kind's unpruned modules is made
active (per kind over the whole network, or per (kind, layer) with ``per_layer`` — the VGG
reading, "50% filters … in each layer"), then the protecting strategy switches on one random
module in any layer left with none. The draw uses the method's own seeded generator, saved in
``state_dict``. Modules of kinds not selected by ``kinds`` are always active.

:class:`RandReplay` (``rand_replay``) is the control for MAT: random modules with MAT's exact
per-layer active counts, at MAT's decision epochs, from MAT's decision log of the same seed.
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["Rand", "RandConfig", "RandReplay", "RandReplayConfig"]


class _DrawnActiveSet(TrainingMethod):
    """What ``rand`` and ``rand_replay`` share: a drawn active set applied, recorded and, with
    the generator, saved and restored."""

    generator: torch.Generator
    active: Tensor | None

    def _use(self, ctx: LoopContext, active: Tensor, event: str) -> None:
        assert self.partition is not None, "bind() first"
        self.active = active
        apply_active(self.controller, active)
        names = self.partition.names
        rec = {"event": event, "epoch": int(ctx.epoch),
               "active": [names[i] for i in active.nonzero(as_tuple=True)[0].tolist()]}
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
class Rand(_DrawnActiveSet):
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
        self._use(ctx, self.draw(), "rand")


@dataclass
class RandReplayConfig:
    """Settings of the replayed random control (``rand_replay``).

    Attributes:
        source: label of the comparison run whose decisions are replayed (same seed), default
            "mat"; it must come before this method in the comparison's order.
        schedule: the source's decisions, ``[{"epoch": e, "active": [module, …]}, …]`` (one per
            MAT evaluation, in order). Filled in by :func:`ntkit.harness.compare` from the source
            run's ``method_history`` (:meth:`RandReplay.configure_from_source`); None = not yet.
        seed: seed of the random choice, an integer in [0, 2**64 − 1].
    """

    source: str = "mat"
    schedule: list[dict] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.source, str) and self.source != "", "source", self.source, "a method label")
        ok = self.schedule is None or (
            isinstance(self.schedule, list)
            and all(
                isinstance(d, Mapping)
                and isinstance(d.get("epoch"), int)
                and isinstance(d.get("active"), list)
                and all(isinstance(n, str) for n in d["active"])
                for d in self.schedule
            )
        )
        check(ok, "schedule", self.schedule, 'None or a list of {"epoch": int, "active": [module name, ...]}')
        check_seed(self.seed, "seed")


@register_method("rand_replay", config=RandReplayConfig)
class RandReplay(_DrawnActiveSet):
    """Random control with MAT's exact per-layer active counts (issue 14's control).

    MAT's saving could come from training fewer modules per layer rather than from choosing them
    by λmax. This control keeps everything but the choice: at the end of the same epochs at which
    the source run (MAT, same seed) decided, it activates, in every (kind, layer), exactly as many
    modules as MAT's decision had active there, drawn uniformly at random among the unpruned ones
    (so the active counts per step, hence the backward FLOPs, match MAT's). Before the first
    decision every module is active, as in MAT; the set is held until the next decision.

    How it gets MAT's counts: :func:`ntkit.harness.compare` trains the comparison's methods in
    order per seed; for a method whose class has ``configure_from_source`` it takes the finished
    record of the ``source`` label of the same seed and builds the config from it (here: the
    ``"mat"`` events of its ``method_history``, each ``{"epoch", "active"}``). The schedule is part
    of the resolved config, so it is written into the run record and survives a resume. Without a
    schedule (used outside ``compare``), :meth:`bind` raises a one-line ``ConfigError``.

    ``history`` gets one record per draw: ``{"event": "rand_replay", "epoch", "active": [module, …]}``.
    """

    name = "rand_replay"

    def __init__(self, config: RandReplayConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(RandReplayConfig, config, kw, self.name)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.active: Tensor | None = None

    @staticmethod
    def configure_from_source(config: RandReplayConfig, record: Mapping[str, Any]) -> RandReplayConfig:
        """``config`` with ``schedule`` taken from the source run's record (its ``"mat"`` events)."""
        events = [h for h in record.get("method_history", []) if h.get("event") == "mat"]
        schedule = [{"epoch": int(h["epoch"]), "active": list(h["active"])} for h in events]
        return dataclasses.replace(config, schedule=schedule)

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        check(
            self.config.schedule is not None,
            f"{self.name}.schedule",
            None,
            f"the decisions of the source run '{self.config.source}' (run it through harness.compare after it)",
        )
        names = set(partition.names)
        unknown = sorted({n for d in self.config.schedule or [] for n in d["active"]} - names)
        check(not unknown, f"{self.name}.schedule", unknown[:3], "module names of this partition")
        if self.active is None:
            self.active = ~controller_pruned(controller, len(partition))
        apply_active(controller, self.active)

    def draw(self, source_active: list[str]) -> Tensor:
        """bool [M]: per (kind, layer), as many random unpruned modules as ``source_active`` has
        there (capped at the unpruned count); consumes the generator."""
        assert self.partition is not None, "bind() first"
        part = self.partition
        pruned = controller_pruned(self.controller, len(part))
        want = torch.tensor([n in set(source_active) for n in part.names], dtype=torch.bool)
        ids = kind_ids(part, per_layer=True)
        out = torch.zeros(len(part), dtype=torch.bool)
        for g in torch.unique(ids).tolist():
            in_g = ids == g
            k = int((want & in_g).sum())
            idx = (in_g & ~pruned).nonzero(as_tuple=True)[0]
            perm = torch.randperm(idx.numel(), generator=self.generator)
            out[idx[perm[:k]]] = True
        return out

    def on_epoch_end(self, ctx: LoopContext) -> None:
        assert self.partition is not None, "bind() first"
        for d in self.config.schedule or []:
            if d["epoch"] != ctx.epoch:
                continue
            self._use(ctx, self.draw(d["active"]), "rand_replay")

