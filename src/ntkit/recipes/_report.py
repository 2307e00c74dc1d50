"""Helpers recipes reuse: seed aggregation, markdown tables, PNG plots, progress bars, the report.

Plots use matplotlib's object API (``matplotlib.figure.Figure`` + ``savefig``), which renders
with Agg and never touches pyplot's global state or the user's backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "aggregate_seeds",
    "fmt_mean_std",
    "heatmap",
    "line_plot",
    "markdown_table",
    "mean_std",
    "progress",
    "render_report",
]


# --------------------------------------------------------------------------- statistics
def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of ``values``.

    One value gives ``(v, nan)``; no values ``(nan, nan)``. NaNs propagate (a diverged seed is not
    silently dropped).
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def fmt_mean_std(values: Iterable[float] | float, digits: int = 3) -> str:
    """``"1.234 ± 0.012"`` (``digits`` significant digits), or just ``"1.234"`` for one value."""
    vals = [values] if isinstance(values, (int, float)) else list(values)
    m, s = mean_std(vals)
    if math.isnan(s):
        return _fmt(m, digits)
    return f"{_fmt(m, digits)} ± {_fmt(s, digits)}"


def aggregate_seeds(runs: Sequence[Mapping[str, Any]], keys: Iterable[str] | None = None) -> dict[str, dict]:
    """Aggregate per-seed result dicts: ``{key: {"mean", "std", "n", "values"}}``.

    Args:
        runs: one flat dict per seed (e.g. ``{"test_acc": 0.91, "wall_s": 12.0}``).
        keys: which keys to aggregate; default every key holding a number in all runs.
    """
    if not runs:
        return {}
    if keys is None:
        keys = [
            k
            for k in runs[0]
            if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in runs)
        ]
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in runs]
        m, s = mean_std(vals)
        out[k] = {"mean": m, "std": s, "n": len(vals), "values": vals}
    return out


# --------------------------------------------------------------------------- markdown
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 10**digits or abs(v) < 10 ** -(digits - 1)):
            return f"{v:.{max(digits - 1, 1)}e}"
        return f"{v:.{digits}g}"
    if isinstance(v, Mapping) and "mean" in v and "std" in v:  # an aggregate_seeds entry
        if v.get("n", 2) > 1 and not math.isnan(float(v["std"])):
            return f"{_fmt(float(v['mean']), digits)} ± {_fmt(float(v['std']), digits)}"
        return _fmt(float(v["mean"]), digits)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4
) -> str:
    """A GitHub-markdown table of ``rows`` (dicts); columns default to first-seen key order.

    Floats get ``digits`` significant digits; ``None`` → "—"; ``aggregate_seeds`` entries →
    "mean ± std".
    """
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(k, None)
        columns = list(seen)
    if not columns:
        return "_(empty)_\n"
    lines = [
        "| " + " | ".join(_fmt(c) for c in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=110, layout="constrained")


def line_plot(
    path: str | Path,
    series: Mapping[str, Any],
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Path:
    """Save a PNG line plot; return its path.

    Args:
        series: ``{label: (x, y)}`` or ``{label: {"x": x, "y": y, "std": s}}`` (``std`` draws a
            ±1 std band; e.g. from several seeds). x, y: 1-D sequences of equal length.
    """
    fig = _figure(figsize)
    ax = fig.add_subplot()
    for label, s in series.items():
        if isinstance(s, Mapping):
            x, y, std = s["x"], s["y"], s.get("std")
        else:
            (x, y), std = s, None
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        (line,) = ax.plot(x, y, label=str(label), marker="o" if len(x) <= 12 else None, markersize=3)
        if std is not None:
            sd = np.asarray(std, dtype=float)
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path


def heatmap(
    path: str | Path,
    matrix: Any,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cmap: str = "viridis",
    colorbar_label: str = "",
    figsize: tuple[float, float] | None = None,
) -> Path:
    """Save a PNG heatmap of a 2-D array ``matrix`` [R, C] (e.g. λmax per head × epoch)."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"heatmap: expected a 2-D matrix, got shape {m.shape}")
    r, c = m.shape
    fig = _figure(figsize or (min(2.0 + 0.35 * c, 12.0), min(1.5 + 0.3 * r, 10.0)))
    ax = fig.add_subplot()
    im = ax.imshow(m, aspect="auto", cmap=cmap, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    if colorbar_label:
        cb.set_label(colorbar_label)
    if row_labels is not None:
        ax.set_yticks(range(r), labels=list(row_labels), fontsize=7)
    if col_labels is not None:
        ax.set_xticks(range(c), labels=list(col_labels), fontsize=7, rotation=90 if c > 12 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- progress
def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool | None = None,
    **kw: Any,
):
    """A tqdm progress bar on stderr for long loops.

    ``enabled=None`` shows it only on an interactive terminal; ``NTKIT_PROGRESS=0`` disables it
    everywhere (``=1`` forces it on).
    """
    from tqdm.auto import tqdm

    env = os.environ.get("NTKIT_PROGRESS")
    if env is not None:
        enabled = env not in ("0", "false", "no", "")
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=None if enabled is None else not enabled,
        dynamic_ncols=True,
        leave=False,
        **kw,
    )


# --------------------------------------------------------------------------- the report
def render_report(doc: Mapping[str, Any], out_dir: str | Path | None = None) -> str:
    """Generic markdown report of a ``results.json`` document.

    Renders: title (recipe, tier), wall-clock, ``results.summary`` (two-column table),
    ``results.tables`` (one table each), ``results.plots`` (embedded PNGs that exist in
    ``out_dir``), ``results.notes`` (bullets), then the resolved config and versions.
    """
    res = doc.get("results") or {}
    lines = [f"# {doc.get('recipe', 'run')} — tier `{doc.get('tier', '?')}`", ""]
    meta = []
    if "wall_clock_s" in doc:
        meta.append(f"wall-clock {float(doc['wall_clock_s']):.1f} s")
    if doc.get("finished_utc"):
        meta.append(f"finished {doc['finished_utc']}")
    if doc.get("data_dir"):
        meta.append(f"data `{doc['data_dir']}`")
    if meta:
        lines += [", ".join(meta), ""]
    summary = res.get("summary")
    if isinstance(summary, Mapping) and summary:
        lines += ["## Summary", "", markdown_table([{"metric": k, "value": v} for k, v in summary.items()])]
    tables = res.get("tables")
    if isinstance(tables, Mapping):
        for title, rows in tables.items():
            if isinstance(rows, Sequence) and all(isinstance(r, Mapping) for r in rows):
                lines += [f"## {title}", "", markdown_table(rows)]
    plots = res.get("plots")
    if isinstance(plots, Sequence) and not isinstance(plots, str) and plots:
        lines += ["## Plots", ""]
        for p in plots:
            if out_dir is None or (Path(out_dir) / str(p)).exists():
                lines += [f"![{Path(str(p)).stem}]({p})", ""]
            else:
                lines += [f"- `{p}` (missing)", ""]
    notes = res.get("notes")
    if isinstance(notes, Sequence) and not isinstance(notes, str) and notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    cfg = doc.get("config")
    if isinstance(cfg, Mapping):
        flat = _flatten(cfg)
        lines += [
            "## Config",
            "",
            markdown_table([{"key": k, "value": v} for k, v in flat.items()], digits=6),
        ]
        over = doc.get("overrides")
        if over:
            lines += ["Overrides: " + ", ".join(f"`{k}={v}`" for k, v in over.items()), ""]
    ver = doc.get("versions")
    if isinstance(ver, Mapping):
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()), ""]
    return "\n".join(lines).rstrip() + "\n"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = ", ".join(str(x) for x in v)
        else:
            out[key] = v
    return out
