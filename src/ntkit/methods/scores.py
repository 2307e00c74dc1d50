"""Importance scores used by the methods (their home is :mod:`ntkit.pruning.importance`).

* :func:`ntk_lambda_max` — principal eigenvalue of each module's mNTK (MAT's criterion), computed
  by the engine :func:`ntkit.modular_ntk` + :func:`ntkit.spectrum`.
* :func:`snip_scores` — structured SNIP (Lee et al. 2019, applied per module as in seed 000
  Table 5): Σ |θ ⊙ ∂L/∂θ| over the module's parameter slices.

Both are re-exported here so ``ntkit.methods.scores.<name>`` stays importable (and patchable:
the methods call them through this module).
"""

from __future__ import annotations

from ntkit.pruning.importance import ntk_lambda_max, snip_scores

__all__ = ["ntk_lambda_max", "snip_scores"]
