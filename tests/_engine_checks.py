"""Shared assertion of the engine tests on third-party models (HF, timm): the engine's Grams equal
brute force in float64 and it reports exactly the expected fallbacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ntkit.ntk import modular_ntk
from ntkit.partition import Partition


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_engine_exact(model: nn.Module, x: Any, part: Partition, expected: Sequence[str], label: Any = "") -> None:
    """``modular_ntk`` = brute force (rel ≤ 1e-10); ``fallback_layers`` names ``expected`` in
    order (substrings); no fallback at all means the hook strategy ran alone."""
    ref = modular_ntk(model, x, part, strategy="brute_force").grams
    got = modular_ntk(model, x, part)
    assert rel(got.grams, ref) <= 1e-10, (label, got.fallback_layers)
    assert len(got.fallback_layers) == len(expected), got.fallback_layers
    for want, seen in zip(expected, got.fallback_layers):
        assert want in seen, got.fallback_layers
    if not expected:
        assert got.strategy == "hooks"
