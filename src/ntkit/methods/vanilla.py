"""Vanilla training: every (unpruned) module is active at every step — the reference baseline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ntkit.methods._common import apply_active, controller_pruned
from ntkit.methods.base import TrainingMethod, make_config, register_method
from ntkit.partition import Partition

__all__ = ["Vanilla", "VanillaConfig"]


@dataclass
class VanillaConfig:
    """Vanilla has no settings (the dataclass exists so every method is built the same way)."""


@register_method("vanilla", config=VanillaConfig)
class Vanilla(TrainingMethod):
    """Full training: at ``bind`` every unpruned module is made active; nothing changes after."""

    name = "vanilla"

    def __init__(self, config: VanillaConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(VanillaConfig, config, kw, self.name)

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        super().bind(model, partition, controller)
        apply_active(controller, ~controller_pruned(controller, len(partition)))
