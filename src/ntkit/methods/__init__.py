"""Training methods: MAT, its baselines and the pruning methods, registered by name.

Each method is a small object with loop hooks (:mod:`ntkit.methods.base`), built from a validated
config dataclass::

    from ntkit.methods import build_method, list_methods
    list_methods()  # ['mat', 'mat_prune', 'multirate', 'rand', 'snip_struct', 'vanilla']
    mat = build_method("mat", alpha={"head": 0.1}, beta=1e-3, start_epoch=5, interval=8)
    cfg = method_config("mat", {"alpha": 0.2})   # the validated MATConfig; one-line ConfigError if bad

Pure decision rules live in :mod:`ntkit.methods.policies`, importance scores in
:mod:`ntkit.methods.scores`.
"""

from __future__ import annotations

from ntkit.methods import masks, policies, scores
from ntkit.methods.base import (
    METHODS,
    LoopContext,
    MethodInfo,
    TrainingMethod,
    build_method,
    list_methods,
    method_config,
    method_info,
    register_method,
)
from ntkit.methods.lth import LTH, LTHConfig
from ntkit.methods.mat import MAT, MATConfig
from ntkit.methods.mat_prune import MATPrune, MATPruneConfig
from ntkit.methods.multirate import Multirate, MultirateConfig
from ntkit.methods.ntt import NTT, NTTConfig
from ntkit.methods.plreg import PLReg, PLRegConfig
from ntkit.methods.policies import modular_policy, protect, prune_lowest, temporal_policy
from ntkit.methods.random_modules import Rand, RandConfig, RandReplay, RandReplayConfig
from ntkit.methods.scores import ntk_lambda_max, snip_scores
from ntkit.methods.snip_struct import SnipStruct, SnipStructConfig
from ntkit.methods.structured_prune import StructuredPrune, StructuredPruneConfig
from ntkit.methods.vanilla import Vanilla, VanillaConfig

__all__ = [
    "LTH",
    "MAT",
    "METHODS",
    "NTT",
    "LTHConfig",
    "LoopContext",
    "MATConfig",
    "MATPrune",
    "MATPruneConfig",
    "MethodInfo",
    "Multirate",
    "MultirateConfig",
    "NTTConfig",
    "PLReg",
    "PLRegConfig",
    "Rand",
    "RandConfig",
    "RandReplay",
    "RandReplayConfig",
    "SnipStruct",
    "SnipStructConfig",
    "StructuredPrune",
    "StructuredPruneConfig",
    "TrainingMethod",
    "Vanilla",
    "VanillaConfig",
    "build_method",
    "list_methods",
    "masks",
    "method_config",
    "method_info",
    "modular_policy",
    "ntk_lambda_max",
    "policies",
    "protect",
    "prune_lowest",
    "register_method",
    "scores",
    "snip_scores",
    "temporal_policy",
]
