"""Multirate baseline (Vlaar & Leimkuhler 2022, as used in seed 000 §B.1).

Modules are split once, at random (seeded), into fast and slow sets (``slow_fraction`` of each
kind's modules are slow; per layer with ``per_layer``). Fast modules are active at every step
with learning rate η. Slow modules are active only on every k-th step — steps with
``step % k == k − 1`` (0-based global step), i.e. at the end of each block of k steps — and on
those steps :meth:`Multirate.lr_scale` returns k for them (step size k·η). On the other steps the
slow modules are inactive, so the partial backward never computes their weight gradients.

Step size of the slow modules: seed 000 §B.1 says "every k = 5 steps with stepsize kη" for BERT,
Switch and VGG alike — the SGD reasoning of Vlaar & Leimkuhler (k steps' worth of drift in one). Under
Adam(W) the update's size is lr·m̂/√v̂ whatever the gradient's scale, so kη is a k× larger step, not
k steps' worth: on ``mat-bert``'s cpu tier (BERT-mini, AdamW lr 1e-3) it kept the MLM loss on the
unigram floor for 1500 steps in every seed, while the same split with step size η trained like
vanilla (400-step pilot: val 5.909 vs vanilla 5.910). ``scale_lr=True`` (default) is the literal
text; ``scale_lr=False`` updates slow modules with η.

Protecting strategy: a layer whose governed modules all came out slow gets one random module
moved to the fast set, so every layer learns at every step.
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

__all__ = ["Multirate", "MultirateConfig"]


@dataclass
class MultirateConfig:
    """Settings of the Multirate baseline.

    Attributes:
        k: ≥ 1; slow modules update every k steps with step size k·η (paper: 5).
        slow_fraction: share of each kind's modules in the slow set, in [0, 1] (paper: 0.5).
        kinds: module kinds to split (None = all); other kinds are always fast.
        per_layer: draw the split within each layer (VGG reading) instead of per kind overall.
        protect: keep ≥ 1 fast module per layer.
        seed: seed of the split, an integer in [0, 2**64 − 1].
        scale_lr: slow modules step with k·η on their steps (the paper) or with η (False; see the module
            docstring for why that matters under Adam).
    """

    k: int = 5
    slow_fraction: float = 0.5
    kinds: list[str] | None = None
    per_layer: bool = False
    protect: bool = True
    seed: int = 0
    scale_lr: bool = True

    def __post_init__(self) -> None:
        check(
            isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1,
            "k",
            self.k,
            "an integer >= 1",
        )
        ok = isinstance(self.slow_fraction, (int, float)) and not isinstance(self.slow_fraction, bool)
        check(
            ok and 0.0 <= self.slow_fraction <= 1.0, "slow_fraction", self.slow_fraction, "a number in [0, 1]"
        )
        check_kinds(self.kinds, "kinds")
        check(isinstance(self.per_layer, bool), "per_layer", self.per_layer, "a bool")
        check(isinstance(self.protect, bool), "protect", self.protect, "a bool")
        check(isinstance(self.scale_lr, bool), "scale_lr", self.scale_lr, "a bool")
        check_seed(self.seed, "seed")


@register_method("multirate", config=MultirateConfig)
class Multirate(TrainingMethod):
    """Fast/slow module split with slow modules updated every k steps at k·η.

    Attributes:
        slow: bool [M], the slow set (drawn at the first ``bind``; saved in ``state_dict``).
    ``history`` gets one record when the split is drawn:
    ``{"event": "multirate_split", "slow": [module, …], "fast": [module, …]}``.
    """

    name = "multirate"

    def __init__(self, config: MultirateConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(MultirateConfig, config, kw, self.name)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.slow: Tensor | None = None
        self._slow_step = False
        self._applied: Tensor | None = None

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        gov = governed_mask(partition, self.config.kinds, f"{self.name}.kinds")
        if self.slow is None:
            pruned = controller_pruned(controller, len(partition))
            eligible = gov & ~pruned
            slow = random_subset(
                kind_ids(partition, self.config.per_layer),
                self.config.slow_fraction,
                self.generator,
                eligible=eligible,
            )
            if self.config.protect:
                score = torch.rand(len(partition), generator=self.generator, dtype=torch.float64)
                slow = eligible & ~protect(eligible & ~slow, score, partition.layers, eligible=eligible)
            self.slow = slow
            names = partition.names
            self.history.append(
                {
                    "event": "multirate_split",
                    "slow": [names[i] for i in slow.nonzero(as_tuple=True)[0].tolist()],
                    "fast": [names[i] for i in (~slow).nonzero(as_tuple=True)[0].tolist()],
                }
            )
        else:
            check(
                self.slow.numel() == len(partition),
                f"{self.name}.state.slow",
                self.slow.numel(),
                f"{len(partition)} modules",
            )
        self._applied = None

    def is_slow_step(self, step: int) -> bool:
        """Whether the slow modules update at (0-based global) ``step``."""
        return step % self.config.k == self.config.k - 1

    def active_at(self, step: int) -> Tensor:
        """bool [M]: modules active at ``step``."""
        assert self.partition is not None and self.slow is not None, "bind() first"
        pruned = controller_pruned(self.controller, len(self.partition))
        return ~pruned & (~self.slow | self.is_slow_step(step))

    def before_step(self, ctx: LoopContext) -> None:
        self._slow_step = self.is_slow_step(ctx.step)
        active = self.active_at(ctx.step)
        if self._applied is None or not torch.equal(active, self._applied):
            apply_active(self.controller, active)
            self._applied = active

    def lr_scale(self) -> Tensor | None:
        """float32 [M]: k for slow modules on slow steps, 1 elsewhere; None (all 1) on fast-only steps
        and with ``scale_lr=False``."""
        if not self._slow_step or self.slow is None or not self.config.scale_lr:
            return None
        scale = torch.ones(self.slow.numel(), dtype=torch.float32)
        scale[self.slow] = float(self.config.k)
        return scale

    def state_dict(self) -> dict:
        st: dict[str, Any] = {**super().state_dict(), "generator": generator_state(self.generator)}
        if self.slow is not None:
            st["slow"] = bool_list(self.slow)
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        set_generator_state(self.generator, state["generator"])
        if "slow" in state:
            self.slow = torch.tensor(state["slow"], dtype=torch.bool)
            self._applied = None
