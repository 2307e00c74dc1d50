"""The modular NTK engine: per-module Gram matrices and their spectra.

* :func:`modular_ntk` → :class:`ModularNTK` (``.grams`` Tensor [M, S, S]).
* :func:`spectrum` → :class:`Spectrum` (λmax, λmin, entropy, effective rank, condition number).
* :func:`top_eigenvalues` — Lanczos / power iteration for large S.
"""

from __future__ import annotations

from ntkit.ntk.empirical import NTKImplementation, NTKPlan, empirical_ntk, explain_empirical_ntk
from ntkit.ntk.engine import ModularNTK, Strategy, modular_ntk
from ntkit.ntk.hessian import HessianTrace, hessian_trace, hessian_trace_estimate
from ntkit.ntk.spectrum import Spectrum, spectrum, top_eigenvalues

__all__ = [
    "HessianTrace",
    "ModularNTK",
    "NTKImplementation",
    "NTKPlan",
    "Spectrum",
    "Strategy",
    "empirical_ntk",
    "explain_empirical_ntk",
    "hessian_trace",
    "hessian_trace_estimate",
    "modular_ntk",
    "spectrum",
    "top_eigenvalues",
]
