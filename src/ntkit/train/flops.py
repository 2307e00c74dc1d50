"""FLOP accounting of what actually executed.

:class:`FlopCounter` counts the floating-point operations of the ATen kernels that really ran,
using :class:`torch.utils.flop_counter.FlopCounterMode` (a ``TorchDispatchMode``), and books them
under named *phases*::

    counter = FlopCounter()
    for x, y in batches:
        with counter.phase("forward"):
            loss = F.cross_entropy(model(x), y)
        with counter.phase("backward"):
            loss.backward()
        opt.step()
    with counter.phase("overhead"):          # e.g. an mNTK evaluation
        modular_ntk(...)
    counter.totals()   # {"forward": 1.2e12, "backward": 2.4e12, "overhead": 3.1e9}

Because it observes executed kernels, a partial backward that skips the weight gradients of
inactive modules is charged only for what it computed — exactly the accounting MAT needs.

Conventions (those of ``FlopCounterMode``): one multiply-add = 2 FLOPs; only matmul-like kernels
are counted (mm/addmm/bmm/baddbmm, convolution and its backward, scaled-dot-product attention and
its backward — ``2·B·H·Tq·Tk·(d + d_v)`` forward); element-wise ops, norms, softmax and optimizer
updates count 0. A Linear layer ``[B, n_in] → [B, n_out]`` costs ``2·B·n_in·n_out`` forward and
twice that backward (input gradient + weight gradient).

Nesting: phases may nest (e.g. ``"overhead"`` inside ``"forward"``); FLOPs are booked to the
innermost open phase only, so totals never double-count.

Implementation: the FLOP formulas are ``FlopCounterMode``'s own (its ``flop_registry``) with two
corrections (see :data:`FLOP_FORMULAS`): CPU scaled-dot-product attention
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward, which torch does not count at
all) and the weight gradient of grouped convolutions (which torch over-counts by ``groups``).
They are applied by a lean ``TorchDispatchMode`` that skips ``FlopCounterMode``'s per-module
tracking (global module hooks), which we do not need. The tests check that both agree wherever
those two corrections do not apply, and check analytic counts.

Measured cost (``python -m ntkit.train._bench_flops``: ``vit_tiny`` training step, batch 64 of
8×8 digits, torch 2.13 CPU, 1 thread, 18.9 ms plain, interleaved min-of-12 rounds on a shared
2-core VM): counting every step 1.22× the plain step; ``key=`` batch shape (counted once,
re-used) 1.03×; ``sample_every=10`` 1.04×; ``FlopCounterMode`` entered per phase 1.59× (and it
misses the attention FLOPs: 0.64 vs 0.68 GFLOPs per step). The overhead is per dispatched op, not
per FLOP, so it shrinks relative to the step as layers grow.

Cost and sampling: counting dispatches every ATen op through Python (a few µs per op). That is
negligible for medium/large layers, but it can be a visible fraction of a tiny model's step. Pass
``sample_every=k`` to count only every k-th invocation of each sampled phase (by default
``"forward"`` and ``"backward"``) and extrapolate:

    estimate(phase) = counted_flops(phase) · invocations(phase) / counted_invocations(phase)

The estimate is exact when every invocation of the phase runs the same kernels on the same
shapes (fixed batch size, fixed active set). When the executed work varies — a ragged last
batch, MAT changing its active set every few epochs, MoE routing — it is an approximate figure;
use ``sample_every=1`` (the default) or ``key=`` when the number goes into a report.
Phases not listed in ``sampled_phases`` (e.g. ``"overhead"``) are always counted exactly.

Exact *and* cheap: pass ``key=`` (a work signature such as the batch shape plus the active-module
set) to :meth:`FlopCounter.phase`; each distinct ``(phase, key)`` is counted once and re-used, so
a run with a fixed batch shape pays the counting overhead only when the active set changes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from ntkit.errors import check

__all__ = ["FLOP_FORMULAS", "PHASES", "FlopCounter", "PhaseStats", "format_flops", "reference_flops"]

#: Conventional phase names (any string is accepted).
PHASES = ("forward", "backward", "overhead")

_UNITS = (
    ("EFLOPs", 1e18),
    ("PFLOPs", 1e15),
    ("TFLOPs", 1e12),
    ("GFLOPs", 1e9),
    ("MFLOPs", 1e6),
    ("kFLOPs", 1e3),
)


def format_flops(x: float, digits: int = 2) -> str:
    """Human-readable FLOP count: ``1.23e12 → "1.23 TFLOPs"``, ``4.5e14 → "0.45 PFLOPs"``.

    The unit is the largest one in which the value is ≥ 0.1 (so 4.5e14 reads "0.45 PFLOPs" rather
    than "450.00 TFLOPs"); values below 100 FLOPs are printed as plain "FLOPs".
    """
    x = float(x)
    if math.isnan(x):
        return "nan FLOPs"
    for unit, scale in _UNITS:
        if abs(x) >= 0.1 * scale:
            return f"{x / scale:.{digits}f} {unit}"
    return f"{x:.0f} FLOPs"


@dataclass
class PhaseStats:
    """Per-phase bookkeeping.

    Attributes:
        flops: FLOPs counted on the counted invocations (exact, integer-valued).
        calls: invocations of the phase.
        counted_calls: invocations actually counted (= ``calls`` unless sampled).
        seconds: wall-clock seconds spent inside the phase over all invocations (includes the
            counting overhead on counted invocations).
    """

    flops: int = 0
    calls: int = 0
    counted_calls: int = 0
    seconds: float = 0.0

    @property
    def estimate(self) -> float:
        """Estimated FLOPs over all invocations (= ``flops`` when every call was counted)."""
        if self.counted_calls == self.calls:
            return float(self.flops)
        if self.counted_calls == 0:
            return 0.0
        return self.flops * self.calls / self.counted_calls


def _shape(t: object) -> list[int]:
    return list(t.shape)  # type: ignore[attr-defined]


def _conv_backward_flop(
    grad_out,
    x,
    w,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _out_pad,
    _groups,
    output_mask,
    out_val=None,
    **_kw,
) -> int:
    """``aten.convolution_backward``: the input gradient as torch counts it; the weight gradient
    as the same multiply-adds as the forward convolution. (torch 2.13's formula multiplies the
    weight-gradient term by ``groups`` — 3× too much for the grouped conv of the tests, and C×
    for a depthwise conv.)"""
    n = 0
    if output_mask[0]:
        n += conv_flop_count(_shape(grad_out), _shape(w), _shape(out_val[0]), not transposed)
    if output_mask[1]:
        n += conv_flop_count(_shape(x), _shape(w), _shape(grad_out), transposed)
    return n


def _sdpa_cpu_flop(q, k, v, *args, out_val=None, **kw) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (absent from torch's registry): QKᵀ and PV."""
    return sdpa_flop_count(_shape(q), _shape(k), _shape(v))


def _sdpa_cpu_backward_flop(grad_out, q, k, v, *args, out_val=None, **kw) -> int:
    """Its backward, with torch's formula for the other SDPA backward kernels."""
    return sdpa_backward_flop_count(_shape(grad_out), _shape(q), _shape(k), _shape(v))


_aten = torch.ops.aten
#: torch's FLOP formulas (``torch.utils.flop_counter.flop_registry``) plus our fixes/additions.
FLOP_FORMULAS = {
    **flop_registry,
    _aten.convolution_backward: _conv_backward_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
}


class _CountingMode(TorchDispatchMode):
    """Adds ``FlopCounterMode``'s FLOP formula of every executed ATen op to ``self.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def reference_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` under a plain ``FlopCounterMode``; return ``(result, flops)``.

    The reference the tests hold :class:`FlopCounter` to.
    """
    with FlopCounterMode(display=False) as mode:
        out = fn(*args, **kwargs)
    return out, mode.get_total_flops()


class FlopCounter:
    """Accumulates executed FLOPs per phase across a whole training run.

    Args:
        sample_every: count every k-th invocation of each phase in ``sampled_phases`` (the first
            invocation is always counted) and extrapolate, see the module docstring. 1 = exact.
        sampled_phases: phases subject to sampling; others are always counted.
        enabled: when False every phase is a no-op (only wall-clock and call counts are kept).

    Not thread-safe; not re-entrant for the *same* phase name (nesting different names is fine).
    """

    def __init__(
        self,
        sample_every: int = 1,
        sampled_phases: Iterable[str] = ("forward", "backward"),
        enabled: bool = True,
    ) -> None:
        check(
            isinstance(sample_every, int) and sample_every >= 1, "sample_every", sample_every, "an int >= 1"
        )
        self.sample_every = sample_every
        self.sampled_phases = frozenset(sampled_phases)
        self.enabled = enabled
        self.stats: dict[str, PhaseStats] = {}
        self._mode: _CountingMode | None = None
        # stack of open counted frames: [name, start_total, flops_claimed_by_nested_phases]
        self._stack: list[list] = []
        self._cache: dict[tuple[str, Hashable], int] = {}

    # -- counting -------------------------------------------------------------------------
    def _live_total(self) -> int:
        assert self._mode is not None
        return self._mode.total

    @contextmanager
    def phase(self, name: str, key: Hashable | None = None) -> Iterator[None]:
        """Book the FLOPs executed inside the block to phase ``name``.

        Args:
            name: the phase ("forward", "backward", "overhead", or any string).
            key: optional *work signature* — a hashable that determines exactly which kernels run
                on which shapes (e.g. ``(batch shape, active-module tuple)``). The first invocation
                with a given ``(name, key)`` is counted; later ones re-use that count without the
                dispatch overhead. Exact as long as the key really determines the work (it does not
                for MoE routing — leave ``key`` None there). Overrides sampling.
        """
        st = self.stats.setdefault(name, PhaseStats())
        cached = None
        if key is not None and self._mode is None:
            cached = self._cache.get((name, key))
        # A phase nested in a counted one is always counted, so that its FLOPs are never booked
        # to the enclosing phase.
        count = (
            self.enabled
            and cached is None
            and (
                self._mode is not None
                or key is not None
                or name not in self.sampled_phases
                or st.calls % self.sample_every == 0
            )
        )
        st.calls += 1
        t0 = time.perf_counter()
        if not count:
            try:
                yield
            finally:
                if cached is not None and self.enabled:
                    st.flops += cached
                    st.counted_calls += 1
                st.seconds += time.perf_counter() - t0
            return
        opened = self._mode is None
        if opened:
            self._mode = _CountingMode()
            self._mode.__enter__()
        frame = [name, self._live_total(), 0]
        self._stack.append(frame)
        try:
            yield
        finally:
            spent = self._live_total() - frame[1]
            own = spent - frame[2]
            self._stack.pop()
            if self._stack:
                self._stack[-1][2] += spent
            if opened:
                self._mode.__exit__(None, None, None)
                self._mode = None
            st.flops += own
            st.counted_calls += 1
            st.seconds += time.perf_counter() - t0
            if key is not None and frame[2] == 0:  # no nested phase inside: the count is reusable
                self._cache[(name, key)] = own

    # -- reading --------------------------------------------------------------------------
    def totals(self) -> dict[str, float]:
        """Estimated FLOPs per phase (exact when nothing was sampled)."""
        return {k: v.estimate for k, v in self.stats.items()}

    def total(self, phases: Iterable[str] | None = None) -> float:
        """Sum of :meth:`totals` over ``phases`` (default: all)."""
        t = self.totals()
        return float(sum(t.get(p, 0.0) for p in (t if phases is None else phases)))

    @property
    def training_flops(self) -> float:
        """Forward + backward FLOPs (the training compute, excluding ``"overhead"``)."""
        return self.total(("forward", "backward"))

    def exact(self) -> bool:
        """True when every invocation of every phase was counted."""
        return all(v.counted_calls == v.calls for v in self.stats.values())

    def summary(self) -> dict:
        """JSON-able summary: per-phase FLOPs (estimated), calls, seconds, and totals."""
        return {
            "phases": {
                k: {
                    "flops": v.estimate,
                    "calls": v.calls,
                    "counted_calls": v.counted_calls,
                    "seconds": v.seconds,
                }
                for k, v in self.stats.items()
            },
            "training_flops": self.training_flops,
            "total_flops": self.total(),
            "exact": self.exact(),
            "sample_every": self.sample_every,
        }

    def reset(self) -> None:
        """Forget all counts (must not be called inside a phase)."""
        if self._stack:
            raise RuntimeError("FlopCounter.reset() called inside a phase")
        self.stats.clear()
        self._cache.clear()

    # -- exact resume ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {k: vars(v).copy() for k, v in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: PhaseStats(**v) for k, v in state.items()}

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={format_flops(v)}" for k, v in self.totals().items())
        return f"FlopCounter({parts})"
