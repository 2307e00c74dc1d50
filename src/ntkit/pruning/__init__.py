"""Structured pruning building blocks (Torch-Pruning style, STYLE.md §6): importance criteria,
schedules and one pruner; physical removal lives in :mod:`ntkit.sparse.surgery`.

>>> from ntkit.pruning import Pruner, ScoreData, OneShot
>>> pruner = Pruner("l1", kind="head", scope="global", protect=True)
>>> result = pruner(model, partition, controller=ctl, fraction=0.5)   # doctest: +SKIP
>>> result.record   # {"event": "prune", "criterion": "l1", "scores": {...}, "pruned": [...]}
"""

from __future__ import annotations

from ntkit.pruning.dependency import CouplingSet, coupled_channel_groups, coupling_sets
from ntkit.pruning.importance import (
    DPFPS,
    FPGM,
    SCORERS,
    Chip,
    GateScore,
    GraSP,
    LambdaMax,
    Magnitude,
    RandomScore,
    ScoreData,
    Scorer,
    Snip,
    chip_independence,
    get_scorer,
    ntk_lambda_max,
    output_slices,
    snip_scores,
)
from ntkit.pruning.pruner import Pruner, PruneResult
from ntkit.pruning.schedules import Iterative, Linear, OneShot

__all__ = [
    "DPFPS",
    "FPGM",
    "SCORERS",
    "Chip",
    "CouplingSet",
    "GateScore",
    "GraSP",
    "Iterative",
    "LambdaMax",
    "Linear",
    "Magnitude",
    "OneShot",
    "PruneResult",
    "Pruner",
    "RandomScore",
    "ScoreData",
    "Scorer",
    "Snip",
    "chip_independence",
    "coupled_channel_groups",
    "coupling_sets",
    "get_scorer",
    "ntk_lambda_max",
    "output_slices",
    "snip_scores",
]
