"""Metrics log: JSON Lines (always) and TensorBoard (optional extra ``ntkit[tensorboard]``).

Each :meth:`MetricsLogger.log` call appends one JSON object on its own line and flushes it, so a
killed run leaves every record it logged readable (:func:`read_jsonl` skips a torn last line).
Values may be Python/numpy/torch scalars; non-finite floats are written as ``NaN``/``Infinity``
(Python's json convention — a diverged loss stays visible).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from ntkit.errors import ConfigError, DataError

__all__ = ["MetricsLogger", "read_jsonl"]


def _scalar(v: Any) -> Any:
    if isinstance(v, (str, bool, int, float)) or v is None:
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # numpy / torch scalars
        return v.item()
    if isinstance(v, Mapping):
        return {str(k): _scalar(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_scalar(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


class MetricsLogger:
    """Append-only metrics log.

    Args:
        path: the ``.jsonl`` file (directory created). ``append=True`` (default) keeps existing
            records — what a resumed run wants.
        tensorboard: ``True`` also writes TensorBoard event files into ``tb_dir`` (raises
            ConfigError if the ``tensorboard`` package is missing); ``None`` does so only when it
            is installed; ``False`` never.
        tb_dir: TensorBoard directory (default: ``<path's dir>/tb``).
        append: keep existing records (False truncates).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tensorboard: bool | None = None,
        tb_dir: str | Path | None = None,
        append: bool = True,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO | None = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ConfigError(
                        "tensorboard=True: the tensorboard package is not installed "
                        "(pip install 'ntkit[tensorboard]')"
                    ) from None
            else:
                self._tb = SummaryWriter(log_dir=str(tb_dir or self.path.parent / "tb"))

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._tb is not None

    def log(self, record: Mapping[str, Any], step: int | None = None) -> dict:
        """Append ``record`` (plus ``step`` and ``time``, Unix seconds, when not given).

        Numeric top-level entries also go to TensorBoard (tag = key) at ``step``.
        Returns the record as written.
        """
        if self._f is None:
            raise ValueError("MetricsLogger is closed")
        rec = {str(k): _scalar(v) for k, v in record.items()}
        if step is not None:
            rec.setdefault("step", int(step))
        rec.setdefault("time", time.time())
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            s = rec.get("step")
            for k, v in rec.items():
                numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
                if k not in ("step", "time") and numeric and math.isfinite(v):
                    self._tb.add_scalar(k, v, global_step=s)
        return rec

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL log. A torn *last* line (a killed writer) is skipped; a corrupt line
    elsewhere raises :class:`DataError`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"log={str(path)!r}: no such file") from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"log={str(path)!r}: corrupt line {i + 1}") from None
    return out
