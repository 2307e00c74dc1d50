"""Where a run writes: checkpoints, finished records and the metrics log (set by the runner).

``ntkit run`` (:func:`ntkit.recipes.run_recipe`) opens a :func:`run_context` around the recipe, so
the plain loops of the recipes (:func:`ntkit.harness.compare`) checkpoint, resume and log
without taking extra arguments. Outside a run context nothing is written.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntkit.errors import DataError

__all__ = ["RunContext", "current_run", "run_context"]


@dataclass
class RunContext:
    """Attributes:
    checkpoint_dir: root of the per-(method, seed) checkpoint directories (None = none).
    resume: continue from what is there.
    logger: a :class:`ntkit.train.MetricsLogger` (rank 0) or None.
    """

    checkpoint_dir: Path | None
    resume: bool = False
    logger: Any = None

    def load_record(self, path: Path) -> dict:
        """A finished run's record (DataError if unreadable)."""
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"record={str(path)!r}: unreadable ({e}); delete it to retrain that run") from None

    def save_record(self, path: Path, record: dict) -> None:
        from ntkit.recipes._runner import write_json

        write_json(Path(path), record)


_RUN: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("ntkit_run", default=None)


def current_run() -> RunContext | None:
    """The innermost active :func:`run_context`, or None."""
    return _RUN.get()


@contextlib.contextmanager
def run_context(checkpoint_dir: Path | None, resume: bool = False, logger: Any = None) -> Iterator[RunContext]:
    """Make ``checkpoint_dir`` / ``resume`` / ``logger`` the current run's for the block."""
    ctx = RunContext(None if checkpoint_dir is None else Path(checkpoint_dir), resume, logger)
    token = _RUN.set(ctx)
    try:
        yield ctx
    finally:
        _RUN.reset(token)
