"""ntkit — neural-tangent-kernel tools for faster, better training of over-parameterised models.

Public entry points (imported lazily so ``import ntkit`` stays cheap):

* :func:`ntkit.modular_ntk` — per-module NTK Gram matrices [M, S, S] (``ntkit.ntk``).
* :func:`ntkit.spectrum` — λmax, λmin, eigen-entropy, effective rank, condition number.
* :mod:`ntkit.partition` — how a model divides into modules (heads, experts, filters, …).
* :mod:`ntkit.sparse` — partial backward that executes only active modules' work.
* :mod:`ntkit.methods` — MAT, its baselines, PL pruning, NTT.
* :mod:`ntkit.models`, :mod:`ntkit.data`, :mod:`ntkit.train`, :mod:`ntkit.recipes`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "ModularNTK",
    "NtkitError",
    "Spectrum",
    "__version__",
    "data",
    "methods",
    "models",
    "modular_ntk",
    "ntk",
    "partition",
    "recipes",
    "sparse",
    "spectrum",
    "train",
]

_LAZY = {
    "modular_ntk": "ntkit.ntk",
    "spectrum": "ntkit.ntk",
    "ModularNTK": "ntkit.ntk",
    "Spectrum": "ntkit.ntk",
    "NtkitError": "ntkit.errors",
}
_SUBMODULES = {"partition", "ntk", "sparse", "methods", "models", "data", "train", "recipes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"ntkit.{name}")
    raise AttributeError(f"module 'ntkit' has no attribute {name!r}")
