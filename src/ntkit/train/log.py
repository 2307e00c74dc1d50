"""Metrics log: JSON Lines (always) and TensorBoard (optional extra ``ntkit[tensorboard]``).

Each :meth:`MetricsLogger.log` call appends one JSON object on its own line and flushes it, so a
killed run leaves every record it logged readable (:func:`read_jsonl` skips a torn last line).
Values may be Python/numpy/torch scalars; non-finite floats are written as ``NaN``/``Infinity``
(Python's json convention — a diverged loss stays visible).

TensorBoard (when installed) gets, from the same records:

* **scalars**: every finite top-level number (tag = key), and every mapping of names to numbers
  as one scalar per name (tag ``key/name``) — MAT's per-module ``lambda_max``, its per-kind
  ``threshold`` and ``num_active``;
* **images**: a record listing ``active`` module names (MAT, Rand, …; ``pruned`` ones too when
  listed) becomes the module-state map ``active_set`` — one column per layer, one row per module
  of that layer (white = active, grey = inactive, black = pruned or absent), each cell drawn as a
  square block of pixels so small maps stay readable. The layout comes from
  :meth:`MetricsLogger.set_modules` (the callbacks pass their partition) or, without it, from
  the names themselves: the layer of ``blocks.0.attn.head3`` is ``blocks.0.attn``, the text
  before the last dot, which is how every partition builder names its modules.

Records carrying ``run`` (and ``seed``) — the harness tags each method's records so — go to their
own TensorBoard run directory ``<tb_dir>/<run>_seed<seed>``, so TensorBoard overlays methods on
one chart per tag instead of mixing them in one line.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ntkit.errors import ConfigError, DataError

__all__ = ["MetricsLogger", "module_state_grid", "read_jsonl"]


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


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def module_state_grid(
    names: Sequence[str],
    active: Iterable[str],
    pruned: Iterable[str] = (),
    layers: Sequence[str] | None = None,
) -> tuple[list[list[float]], list[str]]:
    """The module-state map of one decision: ``(grid [max modules per layer][layers], layer names)``.

    Args:
        names: every module, in partition order.
        active: names of the active modules; ``pruned``: names of the removed ones.
        layers: each module's layer (default: the text before the last dot of its name).

    Returns: cells 1.0 (active), 0.5 (inactive), 0.0 (pruned, or no such module in a layer with
        fewer modules); column j is ``layer names[j]`` in first-seen order.
    """
    lay = list(layers) if layers is not None else [_layer_of(n) for n in names]
    if len(lay) != len(names):
        raise ValueError(f"module_state_grid: {len(names)} names but {len(lay)} layers")
    act, gone = set(active), set(pruned)
    cols: dict[str, list[float]] = {}
    for n, layer in zip(names, lay):
        cols.setdefault(layer, []).append(0.0 if n in gone else 1.0 if n in act else 0.5)
    rows = max((len(c) for c in cols.values()), default=0)
    grid = [[c[i] if i < len(c) else 0.0 for c in cols.values()] for i in range(rows)]
    return grid, list(cols)


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
                self._tb_cls = SummaryWriter
                self._tb_dir = Path(tb_dir or self.path.parent / "tb")
                self._tb = SummaryWriter(log_dir=str(self._tb_dir))
        self._runs: dict[str, Any] = {}  # one SummaryWriter per (run, seed), beside the main one
        self._modules: tuple[list[str], list[str]] | None = None

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._tb is not None

    def set_modules(self, names: Sequence[str], layers: Sequence[str]) -> None:
        """The partition's module names and each one's layer, for the ``active_set`` images
        (default: inferred from the names; see the module docstring)."""
        if len(names) != len(layers):
            raise ValueError(f"set_modules: {len(names)} names but {len(layers)} layers")
        self._modules = (list(names), list(layers))

    def _writer(self, rec: Mapping[str, Any]) -> Any:
        run = rec.get("run")
        if run is None:
            return self._tb
        key = str(run) + (f"_seed{rec['seed']}" if rec.get("seed") is not None else "")
        key = "".join(c if c.isalnum() or c in "-_.=@" else "_" for c in key)
        if key not in self._runs:
            self._runs[key] = self._tb_cls(log_dir=str(self._tb_dir / key))
        return self._runs[key]

    def _to_tensorboard(self, rec: Mapping[str, Any]) -> None:
        tb, s = self._writer(rec), rec.get("step")

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for k, v in rec.items():
            if k in ("step", "time", "seed"):
                continue
            if number(v):
                tb.add_scalar(k, v, global_step=s)
            elif isinstance(v, Mapping):
                for name, x in v.items():
                    if number(x):
                        tb.add_scalar(f"{k}/{name}", x, global_step=s)
        active = rec.get("active")
        if isinstance(active, list) and all(isinstance(a, str) for a in active):
            pruned = [p for p in rec.get("pruned") or [] if isinstance(p, str)]
            if self._modules is not None:
                names, layers = self._modules
            else:  # the modules this record names: measured (λmax), active, pruned
                lm = rec.get("lambda_max")
                names = list(dict.fromkeys([*(lm if isinstance(lm, Mapping) else []), *active, *pruned]))
                layers = None
            if names:
                grid, _ = module_state_grid(names, active, pruned, layers)
                tb.add_image("active_set", _upscale(grid), global_step=s, dataformats="HW")

    def log(self, record: Mapping[str, Any], step: int | None = None) -> dict:
        """Append ``record`` (plus ``step`` and ``time``, Unix seconds, when not given).

        TensorBoard (when on) gets its scalars and module-state image at ``step`` (module docstring).
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
            self._to_tensorboard(rec)
        return rec

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        for w in self._runs.values():
            w.close()
        self._runs.clear()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _upscale(grid: list[list[float]], target: int = 128) -> Any:
    """``grid`` as a float32 image [H, W] in [0, 1], each cell a block of ``target // max(H, W)``
    (at least 1, at most 32) pixels a side: TensorBoard shows images at their pixel size."""
    import numpy as np

    a = np.asarray(grid, dtype=np.float32)
    k = max(1, min(32, target // max(a.shape)))
    return np.kron(a, np.ones((k, k), dtype=np.float32))


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
