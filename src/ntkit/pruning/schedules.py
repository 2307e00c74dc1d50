"""Pruning schedules: how much of a kind is pruned in total by a given epoch.

Each schedule is a small validated dataclass answering :meth:`ratio_at` — the **total** pruned
ratio (share of the modules of the pruned kind, in [0, 1)) due once epoch ``e`` (0-based) has
ended — and :meth:`due` — whether a pruning step happens at the end of epoch ``e``. A pruner
keeps ``round(ratio_at(e) · n)`` of the n modules pruned, i.e. prunes the difference to what is
already pruned.

* :class:`OneShot` ``{t, r}`` (seed 002): ratio ``r`` at epoch ``t``.
* :class:`Linear` (seed 002): from epoch ``t0``, equal shares over ``steps`` pruning epochs
  (``t0, t0 + every, …``) up to ``r_final``.
* :class:`Iterative` (LTH / IMP, Frankle & Carbin 2019): ``rounds`` rounds, each pruning a share
  ``p`` of the *remaining* modules (total after k rounds 1 − (1 − p)^k), one round every
  ``every`` epochs from ``t0``; after each round weights rewind to the point saved at epoch
  ``rewind_epoch`` (:meth:`Iterative.rewind_due`).

Errors are one-line :class:`~ntkit.errors.ConfigError` s naming the field and the value.
"""

from __future__ import annotations

from dataclasses import dataclass

from ntkit.errors import check

__all__ = ["Iterative", "Linear", "OneShot"]


def _int(value: object, field: str, lo: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    check(ok and value >= lo, field, value, f"an integer >= {lo}")  # type: ignore[operator]


def _ratio(value: object, field: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    check(ok and 0.0 <= value < 1.0, field, value, "a number in [0, 1)")  # type: ignore[operator]


def _epoch(e: int) -> None:
    _int(e, "epoch", 0)


@dataclass(frozen=True)
class OneShot:
    """Prune to ratio ``r`` at the end of epoch ``t`` (0-based).

    Attributes:
        t: the pruning epoch, ≥ 0.
        r: total pruned ratio from then on, in [0, 1).
    """

    t: int
    r: float

    def __post_init__(self) -> None:
        _int(self.t, "t", 0)
        _ratio(self.r, "r")

    def ratio_at(self, epoch: int) -> float:
        """Total pruned ratio due after epoch ``epoch``: 0 before ``t``, ``r`` from ``t`` on."""
        _epoch(epoch)
        return float(self.r) if epoch >= self.t else 0.0

    def due(self, epoch: int) -> bool:
        _epoch(epoch)
        return epoch == self.t


@dataclass(frozen=True)
class Linear:
    """Equal shares from epoch ``t0``: after the k-th pruning epoch (k = 1 … ``steps``) the total
    ratio is ``r_final · k / steps``; pruning epochs are ``t0 + i · every`` (i = 0 … steps − 1).

    Attributes:
        t0: first pruning epoch, ≥ 0.
        r_final: total ratio after the last step, in [0, 1).
        steps: number of pruning epochs, ≥ 1 (1 = one-shot at ``t0``).
        every: epochs between pruning epochs, ≥ 1.
    """

    t0: int
    r_final: float
    steps: int
    every: int = 1

    def __post_init__(self) -> None:
        _int(self.t0, "t0", 0)
        _ratio(self.r_final, "r_final")
        _int(self.steps, "steps", 1)
        _int(self.every, "every", 1)

    def _done(self, epoch: int) -> int:
        """Pruning epochs at or before ``epoch``."""
        if epoch < self.t0:
            return 0
        return min(self.steps, (epoch - self.t0) // self.every + 1)

    def ratio_at(self, epoch: int) -> float:
        _epoch(epoch)
        return float(self.r_final) * self._done(epoch) / self.steps

    def due(self, epoch: int) -> bool:
        _epoch(epoch)
        k, rem = divmod(epoch - self.t0, self.every)
        return epoch >= self.t0 and rem == 0 and k < self.steps


@dataclass(frozen=True)
class Iterative:
    """Iterative pruning with rewinding (LTH / IMP).

    Round k (k = 1 … ``rounds``) ends at epoch ``t0 + (k − 1) · every``; it prunes a share ``p``
    of the modules still unpruned, so the total after k rounds is 1 − (1 − p)^k; right after the
    round the surviving weights rewind to those saved at the end of epoch ``rewind_epoch``
    (``-1`` = the initial weights, before any step).

    Attributes:
        p: share of the remaining modules pruned per round, in (0, 1).
        rounds: number of rounds, ≥ 1.
        every: epochs between rounds (a round's training length), ≥ 1.
        t0: epoch of the first round, ≥ 0 (default ``every − 1``: after one full round of training).
        rewind_epoch: the saved point, −1 ≤ rewind_epoch < t0.
    """

    p: float
    rounds: int
    every: int
    t0: int = -1
    rewind_epoch: int = -1

    def __post_init__(self) -> None:
        ok = isinstance(self.p, (int, float)) and not isinstance(self.p, bool)
        check(ok and 0.0 < self.p < 1.0, "p", self.p, "a number in (0, 1)")
        _int(self.rounds, "rounds", 1)
        _int(self.every, "every", 1)
        if self.t0 == -1:
            object.__setattr__(self, "t0", self.every - 1)
        _int(self.t0, "t0", 0)
        ok = isinstance(self.rewind_epoch, int) and not isinstance(self.rewind_epoch, bool)
        check(ok and -1 <= self.rewind_epoch < self.t0, "rewind_epoch", self.rewind_epoch,
              f"an integer in [-1, t0={self.t0})")

    def round_at(self, epoch: int) -> int:
        """Rounds completed at the end of epoch ``epoch`` (0 … ``rounds``)."""
        _epoch(epoch)
        if epoch < self.t0:
            return 0
        return min(self.rounds, (epoch - self.t0) // self.every + 1)

    def ratio_at(self, epoch: int) -> float:
        return 1.0 - (1.0 - float(self.p)) ** self.round_at(epoch)

    def due(self, epoch: int) -> bool:
        _epoch(epoch)
        k, rem = divmod(epoch - self.t0, self.every)
        return epoch >= self.t0 and rem == 0 and k < self.rounds

    def rewind_due(self, epoch: int) -> bool:
        """Whether weights rewind (to the point saved at ``rewind_epoch``) after epoch ``epoch``:
        right after every pruning round."""
        return self.due(epoch)

    @property
    def final_ratio(self) -> float:
        return 1.0 - (1.0 - float(self.p)) ** self.rounds
