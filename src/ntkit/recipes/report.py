"""Everything a recipe needs to report its runs: seed statistics, markdown, PNG plots, progress bars,
the generic report and the MAT comparison document.

**Mean ± std convention** (the only one in ntkit; every table, plot band and ``results.json``
aggregate goes through :func:`mean_std`):

* the mean is taken over the *finite* values;
* the std is the sample std (ddof = 1) of the finite values when there are at least 2 of them,
  else ``None`` — one seed has no spread, so a single seed renders as just the mean, never
  "± 0.000" or "± nan" (a bare std cell renders "—");
* non-finite values (NaN, ±Inf: a diverged seed) are excluded from mean and std and *counted*
  (``"nonfinite"``), and the rendered cell says so: ``"1.23 ± 0.04 (1 of 3 diverged)"``;
* no finite value at all → mean and std ``None``: ``"—"``, or ``"— (3 of 3 diverged)"``;
* ``None`` (a value that does not exist, e.g. the compute to a target a run never reached) is
  skipped and counted apart (``"missing"``); it is not rendered.

:func:`mean_std` returns ``{"mean", "std", "n", "nonfinite", "missing"}`` (``n`` = finite values
used), plain JSON; :func:`fmt_mean_std` renders it (or raw values) as one table cell.

Plots use matplotlib's object API (``matplotlib.figure.Figure`` + ``savefig``), which renders with
Agg and never touches pyplot's global state or the user's backend.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntkit.train.flops import format_flops

__all__ = [
    "AGG_KEYS",
    "AGG_LIST_KEYS",
    "FORMATS",
    "OVERHEAD_TARGET",
    "SPEEDUP_TARGET",
    "aggregate",
    "aggregate_seeds",
    "claim_check",
    "comparison_result",
    "find_paper_numbers",
    "fmt_flops",
    "fmt_mean_std",
    "heatmap",
    "lambda_max_matrix",
    "line_plot",
    "markdown_table",
    "mean_std",
    "paper_cell",
    "plot_active_sets",
    "plot_lambda_heatmap",
    "plot_val_vs_compute",
    "progress",
    "render_report",
    "verdict",
]

#: MAT "beats" vanilla when it reaches vanilla's best val loss with at most this fraction of
#: vanilla's compute to the same target …
SPEEDUP_TARGET = 0.75
#: … and its mNTK overhead is at most this share of its total compute (seed 000 Table 7: < 2 %).
OVERHEAD_TARGET = 0.02


# --------------------------------------------------------------------------- statistics
def mean_std(values: Iterable[Any]) -> dict[str, Any]:
    """Mean ± sample std of ``values`` under the module's convention (see the module docstring).

    Args:
        values: numbers (Python, numpy or 0-d tensors; converted to float64) or ``None``.

    Returns: ``{"mean": float | None, "std": float | None, "n": int, "nonfinite": int, "missing": int}``;
        ``n`` finite values were used, ``nonfinite`` NaN/Inf values excluded, ``missing`` Nones skipped.

    Raises:
        TypeError: a value is a string, a bool or otherwise not a number.
    """
    finite: list[float] = []
    nonfinite = missing = 0
    for x in values:
        if x is None:
            missing += 1
            continue
        if isinstance(x, (str, bytes, bool)):
            raise TypeError(f"mean_std: expected numbers or None, got {x!r}")
        v = float(x)
        if math.isfinite(v):
            finite.append(v)
        else:
            nonfinite += 1
    n = len(finite)
    a = np.asarray(finite, dtype=np.float64)
    mean = float(a.mean()) if n else None
    std = float(a.std(ddof=1)) if n >= 2 else None
    return {"mean": mean, "std": std, "n": n, "nonfinite": nonfinite, "missing": missing}


def aggregate_seeds(runs: Sequence[Mapping[str, Any]], keys: Iterable[str] | None = None) -> dict[str, dict]:
    """Aggregate per-seed result dicts: ``{key: mean_std(values) + {"values": [...]}}``.

    Args:
        runs: one flat dict per seed (e.g. ``{"test_acc": 0.91, "wall_s": 12.0}``).
        keys: which keys to aggregate; default every key holding a number (not a bool) in all runs.
    """
    if not runs:
        return {}
    if keys is None:
        keys = [k for k in runs[0] if all(_is_number(r.get(k)) for r in runs)]
    out = {}
    for k in keys:
        vals = [r.get(k) for r in runs]
        out[k] = {**mean_std(vals), "values": [None if v is None else float(v) for v in vals]}
    return out


def aggregate(records: Sequence[Mapping[str, Any]], keys: Sequence[str], list_keys: Sequence[str] = ()) -> dict:
    """Per method label of run records: ``{"seeds": [...], key: mean_std, list_key: [mean_std, …]}``.

    Scalar ``keys`` are aggregated over the label's seeds; each element of the list fields ``list_keys``
    (e.g. ``val_loss_at_budget``) separately, a list shorter than the longest one counting as missing there.
    Non-numbers (absent fields, strings) count as missing.
    """
    out: dict[str, dict] = {}
    for lab in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == lab]
        agg: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for k in keys:
            agg[k] = mean_std(_num_or_none(r.get(k)) for r in rs)
        for k in list_keys:
            lists = [r.get(k) or [] for r in rs]
            length = max((len(v) for v in lists), default=0)
            agg[k] = [mean_std(_num_or_none(v[i]) if i < len(v) else None for v in lists) for i in range(length)]
        out[lab] = agg
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))


def _num_or_none(v: Any) -> float | None:
    return float(v) if _is_number(v) else None


# --------------------------------------------------------------------------- formatting
def _fmt_num(v: float, digits: int = 4) -> str:
    """``digits`` significant digits; scientific notation outside [10^-(digits-1), 10^digits)."""
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 10**digits or abs(v) < 10 ** -(digits - 1)):
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}g}"


def _num3(v: float) -> str:
    return f"{v:.3f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _pct2(v: float) -> str:
    return f"{100 * v:.2f}%"


def _ratio(v: float) -> str:
    return f"{v:.2f}×"


def _secs(v: float) -> str:
    return f"{v:.0f}"


def _ms(v: float) -> str:
    return f"{1000 * v:.1f}"


#: Formatters by name, for column specs (:func:`comparison_result`) and :func:`fmt_mean_std`.
FORMATS: dict[str, Callable[[float], str]] = {
    "num": _num3,
    "flops": format_flops,
    "pct": _pct,
    "pct2": _pct2,
    "ratio": _ratio,
    "secs": _secs,
    "ms": _ms,
}


def fmt_mean_std(
    x: Mapping[str, Any] | Iterable[Any] | float | None,
    fmt: Callable[[float], str] | str | None = None,
    *,
    digits: int = 4,
) -> str:
    """One table cell: ``"1.234 ± 0.012"``, ``"1.234"`` (one finite value), ``"—"`` (none),
    ``"1.234 ± 0.012 (1 of 3 diverged)"`` (non-finite values excluded and counted).

    Args:
        x: a :func:`mean_std` / :func:`aggregate` entry, raw values (run through :func:`mean_std`),
            one number, or None.
        fmt: number formatter (callable, or a :data:`FORMATS` name); default ``digits`` significant
            digits (scientific notation for very large / small magnitudes).
    """
    if x is None:
        return "—"
    if isinstance(x, Mapping):
        ms = x
    elif _is_number(x):
        ms = mean_std([x])
    else:
        ms = mean_std(x)
    f = FORMATS[fmt] if isinstance(fmt, str) else fmt or (lambda v: _fmt_num(v, digits))
    mean, std = ms.get("mean"), ms.get("std")
    text = "—" if mean is None else f(float(mean)) if std is None else f"{f(float(mean))} ± {f(float(std))}"
    bad = int(ms.get("nonfinite") or 0)
    if bad:
        text += f" ({bad} of {int(ms.get('n') or 0) + bad} diverged)"
    return text


def fmt_flops(ms: Mapping[str, Any] | None) -> str:
    """:func:`fmt_mean_std` with :func:`ntkit.train.flops.format_flops` ("1.23 TFLOPs ± …")."""
    return fmt_mean_std(ms, format_flops)


def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return _fmt_num(float(v), digits)
    if isinstance(v, Mapping) and "mean" in v and "std" in v:  # a mean_std / aggregate entry
        return fmt_mean_std(v, digits=digits)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4
) -> str:
    """A GitHub-markdown table of ``rows`` (dicts); columns default to first-seen key order.

    Floats get ``digits`` significant digits; ``None`` → "—"; :func:`mean_std` entries →
    :func:`fmt_mean_std`; ``|`` in text is escaped.
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
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def paper_cell(v: Any) -> str:
    """A published value from ``paper_numbers.json``: ``[mean, std]`` → "mean ± std", number → str,
    str as is, None → "—"."""
    if isinstance(v, list) and len(v) == 2:
        return f"{v[0]} ± {v[1]}"
    return "—" if v is None else str(v)


def find_paper_numbers(path: str | Path | None, data_dir: str | Path | None) -> dict | None:
    """Load ``paper_numbers.json`` from ``path`` when given (only there), else from
    ``<data_dir>/../reference/``. Returns None when the file is absent (the report then omits the
    paper columns)."""
    if path:
        cand = Path(path)
    elif data_dir:
        cand = Path(data_dir).resolve().parent / "reference" / "paper_numbers.json"
    else:
        return None
    return json.loads(cand.read_text()) if cand.is_file() else None


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
            ±1 std band; e.g. from several seeds; None entries draw no band there). x, y: 1-D
            sequences of equal length.
    """
    fig = _figure(figsize)
    ax = fig.add_subplot()
    for label, s in series.items():
        if isinstance(s, Mapping):
            x, y, std = s["x"], s["y"], s.get("std")
        else:
            (x, y), std = s, None
        x = np.asarray(x, dtype=float)
        y = np.asarray([math.nan if v is None else v for v in y], dtype=float)
        (line,) = ax.plot(x, y, label=str(label), marker="o" if len(x) <= 12 else None, markersize=3)
        if std is not None:
            sd = np.asarray([math.nan if v is None else v for v in std], dtype=float)
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
        ax.set_yticks(range(r), labels=list(row_labels), fontsize=7 if r <= 24 else 5)
    if col_labels is not None:
        ax.set_xticks(range(c), labels=list(col_labels), fontsize=7, rotation=90 if c > 12 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.savefig(path)
    return path


def plot_val_vs_compute(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Validation loss vs executed compute (FLOPs incl. overhead) from each record's ``curve``
    (``[{"flops", "val_loss"}, …]``): one line per (method, seed), one colour per method."""
    fig = _figure((6.4, 4.2))
    ax = fig.add_subplot()
    colors: dict[str, str] = {}
    for r in records:
        lab = str(r["method"])
        first = lab not in colors
        c = colors.setdefault(lab, f"C{len(colors) % 10}")
        xs = [p["flops"] for p in r["curve"]]
        ys = [math.nan if p["val_loss"] is None else p["val_loss"] for p in r["curve"]]
        ax.plot(xs, ys, color=c, label=lab if first else None, alpha=0.9, lw=1.4)
    ax.set_xlabel("executed compute (FLOPs, incl. mNTK overhead)")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "validation loss vs compute")
    if colors:
        ax.legend()
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path)
    return path


def lambda_max_matrix(history: Sequence[Any], names: Sequence[str]) -> tuple[list[list[float]], list[Any]]:
    """λmax per module over MAT's evaluations from a method history: ``(rows [E][M], epochs [E])``.

    A history entry holds ``lambda_max`` as ``{module_name: λmax}`` (modules not measured, e.g.
    pruned ones, are absent → NaN) or as a list of M values; other entries are skipped."""
    rows, when = [], []
    for h in history:
        lm = h.get("lambda_max") if isinstance(h, Mapping) else None
        if isinstance(lm, Mapping):
            rows.append([float(lm.get(n, math.nan)) for n in names])
        elif isinstance(lm, list) and len(lm) == len(names):
            rows.append([float(v) for v in lm])
        else:
            continue
        when.append(h.get("epoch", len(when)))
    return rows, when


def plot_lambda_heatmap(record: Mapping[str, Any], path: str | Path) -> Path | None:
    """Heatmap of log10 λmax (modules × evaluations) of one MAT run; None without evaluations."""
    names = list(record["module_names"])
    rows, when = lambda_max_matrix(record.get("method_history") or [], names)
    if not rows:
        return None
    a = np.log10(np.maximum(np.asarray(rows, dtype=float).T, 1e-30))  # NaN (not measured) stays NaN
    return heatmap(
        path,
        a,
        xlabel="evaluation (epoch)",
        ylabel="module",
        title=f"log10 λmax of the mNTK — {record['method']} seed {record['seed']}",
        row_labels=names if len(names) <= 48 else None,
        col_labels=[str(w) for w in when],
        figsize=(max(4.0, 0.6 * len(rows) + 2), max(3.0, 0.18 * a.shape[0] + 1.5)),
    )


def plot_active_sets(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Active-module maps (modules × epochs; white = active, grey = inactive, black = pruned) of each
    method's first seed, side by side; None when no record has an ``active_history``."""
    firsts = [r for r in {r["method"]: r for r in reversed(records)}.values()][::-1]
    firsts = [r for r in firsts if r.get("active_history")]
    if not firsts:
        return None
    fig = _figure((2.4 * len(firsts) + 1, 3.6))
    axes = fig.subplots(1, len(firsts), squeeze=False)[0]
    for ax, r in zip(axes, firsts):
        act = np.asarray(r["active_history"], dtype=float).T
        pr = np.asarray(r["pruned_history"], dtype=float).T if r.get("pruned_history") else 0 * act
        ax.imshow(act - 0.5 * pr, aspect="auto", cmap="Greys_r", vmin=-0.5, vmax=1, interpolation="nearest")
        ax.set_title(str(r["method"]), fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("module")
    fig.suptitle("module state after each epoch (white = active, grey = inactive, black = pruned)", fontsize=10)
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


# --------------------------------------------------------------------------- the generic report
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


# --------------------------------------------------------------------------- MAT comparisons
def verdict(agg: Mapping[str, Any], mat: str = "mat", base: str = "vanilla") -> tuple[bool | None, str]:
    """Did ``mat`` beat ``base``? Criteria: mean compute to reach the baseline's best val loss ≤
    :data:`SPEEDUP_TARGET` × the baseline's, and mean overhead share ≤ :data:`OVERHEAD_TARGET`.

    Args:
        agg: an :func:`aggregate` result.

    Returns: (True/False, or None when undecidable; a plain sentence).
    """
    if mat not in agg or base not in agg:
        return None, f"No verdict: need both {mat!r} and {base!r} runs."
    c_m = agg[mat]["compute_to_target_flops"]["mean"]
    c_b = agg[base]["compute_to_target_flops"]["mean"]
    ov = agg[mat]["overhead_share"]["mean"]
    if c_b is None:
        return None, "No verdict: the baseline's curve has no evaluation."
    if c_b <= 0:
        return None, (
            f"No verdict: {base}'s best validation loss was at initialisation (the run made no "
            "progress on validation; train longer)."
        )
    ov_ok = ov is not None and ov <= OVERHEAD_TARGET
    ov_txt = "n/a" if ov is None else f"{100 * ov:.2f}%"
    if c_m is None:
        return False, (
            f"**MAT did NOT beat {base}**: it never reached {base}'s best validation loss "
            f"(mNTK overhead {ov_txt} of its compute)."
        )
    ratio = c_m / c_b
    ok = ratio <= SPEEDUP_TARGET and ov_ok
    word = "beat" if ok else "did NOT beat"
    return ok, (
        f"**MAT {word} {base}**: it reached {base}'s best validation loss with {ratio:.2f}× {base}'s compute "
        f"(target ≤ {SPEEDUP_TARGET}×; {format_flops(c_m)} vs {format_flops(c_b)}), and its mNTK overhead was "
        f"{ov_txt} of its compute (target ≤ {100 * OVERHEAD_TARGET:.0f}%)."
    )


def claim_check(
    records: Sequence[Mapping[str, Any]],
    quality: tuple[str, bool],
    mat: str = "mat",
    base: str = "vanilla",
    control: str = "rand_replay",
) -> dict | None:
    """The paper's claim for MAT, checked seed by seed: MAT reaches vanilla's quality (its mean
    test metric within one seed std of vanilla's mean, or better) with at most
    :data:`SPEEDUP_TARGET` × vanilla's compute, and beats the control that replays its per-layer
    active counts with random modules in every seed.

    Compute is the paper's "Computation" column: each run's executed FLOPs to its *own* best
    validation loss as a ratio to vanilla's of the same seed (``convergence_ratio_vs_baseline``, filled
    by :func:`ntkit.harness.loop.finalize`), averaged over seeds; the total-compute ratio is shown beside it. Unlike :func:`verdict` (compute to
    *vanilla's* best loss), this does not fail a run that converges cheaply to a loss a hair
    above vanilla's — the quality criterion judges that loss instead.

    Args:
        records: finalized run records (``method``, ``seed``, the quality key,
            ``convergence_ratio_vs_baseline``, ``total_flops``).
        quality: ``(record key, higher is better)``, e.g. ``("test_acc", True)`` or ``("test_loss", False)``.

    Returns: ``None`` without both ``mat`` and ``base`` records; else ``{"met": bool | None,
        "sentence": str, "rows": per-seed table rows}``. ``met`` is ``None`` when a criterion cannot
        be judged (one seed: no std; no control runs).
    """
    key, higher = quality
    by = {(r["method"], r["seed"]): r for r in records}
    seeds = sorted(s for (m, s) in by if m == mat and (base, s) in by)
    if not seeds:
        return None
    fmt = _pct if key.endswith("acc") else _num3
    sign = 1.0 if higher else -1.0  # > 0: MAT better

    def val(m: str, s: int, k: str = key) -> float | None:
        r = by.get((m, s))
        v = None if r is None else r.get(k)
        return None if v is None or not math.isfinite(float(v)) else float(v)

    def total_ratio(s: int) -> float | None:
        a, b = val(mat, s, "total_flops"), val(base, s, "total_flops")
        return None if a is None or b is None or b <= 0 else a / b

    has_ctl = all(val(control, s) is not None for s in seeds)
    rows, wins = [], 0
    for s in seeds:
        m, b, c = val(mat, s), val(base, s), val(control, s)
        row = {"seed": str(s), base: fmt(b) if b is not None else "—", mat: fmt(m) if m is not None else "—"}
        if has_ctl:
            row[control] = fmt(c)  # type: ignore[arg-type]
            won = m is not None and sign * (m - c) > 0  # type: ignore[operator]
            wins += won
            row[f"{mat} beat {control}"] = "yes" if won else "no"
        cr, tr = val(mat, s, "convergence_ratio_vs_baseline"), total_ratio(s)
        row[f"{mat} compute to own best / {base}'s"] = _ratio(cr) if cr is not None else "—"
        row[f"{mat} total compute / {base}'s"] = _ratio(tr) if tr is not None else "—"
        rows.append(row)
    qm = mean_std(val(mat, s) for s in seeds)
    qb = mean_std(val(base, s) for s in seeds)
    cr = mean_std(val(mat, s, "convergence_ratio_vs_baseline") for s in seeds)
    n = len(seeds)
    parts, verdicts = [], []
    if qm["mean"] is None or qb["mean"] is None:
        verdicts.append(None)
        parts.append(f"quality: no {key}")
    else:
        gap = sign * (qm["mean"] - qb["mean"])  # > 0: MAT better
        if qb["std"] is None:
            verdicts.append(None if gap < 0 else True)
            parts.append(f"{key} {fmt(qm['mean'])} vs {base} {fmt(qb['mean'])} (one seed: no std to judge the gap)")
        else:
            ok = gap >= -qb["std"]
            verdicts.append(ok)
            parts.append(f"{key} {fmt(qm['mean'])} vs {base} {fmt(qb['mean'])} ± {fmt(qb['std'])} "
                         f"({'within' if ok else 'outside'} one {base} std)")
    if cr["mean"] is None:
        verdicts.append(None)
        parts.append("compute to own best: n/a")
    else:
        ok = cr["mean"] <= SPEEDUP_TARGET
        verdicts.append(ok)
        parts.append(f"compute to its own best {cr['mean']:.3f}× {base}'s (target ≤ {SPEEDUP_TARGET}×)")
    if has_ctl:
        verdicts.append(wins == n)
        parts.append(f"beat {control} in {wins} of {n} seeds")
    else:
        verdicts.append(None)
        parts.append(f"no {control} runs")
    met = False if False in verdicts else (None if None in verdicts else True)
    head = {True: "**met**", False: "**not met**", None: "**undecided**"}[met]
    sentence = (f"The paper's claim (MAT at {base}'s quality with ≤ {SPEEDUP_TARGET}× its compute, ahead of "
                f"{control} in every seed), over {n} seed{'s' if n > 1 else ''}: {head} — " + "; ".join(parts) + ".")
    return {"met": met, "sentence": sentence, "rows": rows}


#: Scalar record fields aggregated over seeds (mean ± std) for every comparison recipe.
AGG_KEYS = (
    "test_loss",
    "test_acc",
    "best_val_loss",
    "convergence_flops",
    "compute_to_target_flops",
    "compute_ratio_vs_baseline",
    "convergence_ratio_vs_baseline",
    "paired_test_loss_diff",
    "paired_test_acc_diff",
    "paired_best_val_diff",
    "train_flops",
    "overhead_flops",
    "total_flops",
    "overhead_share",
    "forward_sparsity",
    "backward_sparsity",
    "wall_s",
)
#: List record fields aggregated element-wise (one entry per budget / accuracy threshold).
AGG_LIST_KEYS = ("val_loss_at_budget", "compute_to_train_acc")


def comparison_result(
    records: list[dict],
    *,
    title: str,
    columns: Sequence[tuple[str, str, int | None, str]],
    out_dir: Path,
    notes: Sequence[str] = (),
    paper: dict | None = None,
    paper_key: str | None = None,
    paper_rows: dict[str, str] | None = None,
    mat_label: str | None = "mat",
    baseline: str = "vanilla",
    quality: tuple[str, bool] | None = None,
    extra: dict | None = None,
) -> dict:
    """The document a MAT comparison recipe returns (→ results.json, rendered by the runner).

    Args:
        records: finalized run records (one per method × seed; fields in ``docs/results.md``).
        title: table title.
        columns: ``(header, record_key, list_index | None, format_name)`` per column of ours;
            ``format_name`` in :data:`FORMATS`.
        out_dir: where the PNG plots go.
        notes: report bullets (the data split note first).
        paper, paper_key, paper_rows: the paper_numbers.json content, the table key in it, and
            our method label → the paper's row name. Missing → no paper columns.
        mat_label: the MAT run the verdict and λmax heatmap are about (None: no verdict).
        baseline: the reference method (vanilla).
        quality: ``(record key, higher is better)`` of the test metric the paper's claim is judged on
            (:func:`claim_check`); None: no claim check.
        extra: more top-level fields for results.json.

    Returns: ``{"title", "verdict", "summary", "tables", "plots", "notes", "aggregate", "records", "layout", …}``;
        ``layout`` holds ``columns``, ``paper_key`` and ``paper_rows`` for :mod:`ntkit.recipes.merge`.
    """
    agg = aggregate(records, AGG_KEYS, AGG_LIST_KEYS)
    pcols: list[str] = []
    ptab = None
    if paper and paper_key and paper_key in paper:
        ptab = paper[paper_key]
        pcols = [f"paper: {c}" for c in ptab.get("columns", [])]
    rows = []
    for lab, a in agg.items():
        row: dict[str, str] = {"method": lab, "seeds": str(len(a["seeds"]))}
        for header, key, idx, fmt in columns:
            ms = a.get(key)
            if idx is not None:
                ms = ms[idx] if isinstance(ms, list) and idx < len(ms) else None
            row[header] = fmt_mean_std(ms, FORMATS[fmt])
        if ptab is not None:
            prow = ptab["rows"].get((paper_rows or {}).get(lab, lab))
            for j, c in enumerate(pcols):
                row[c] = paper_cell(prow[j]) if prow is not None and j < len(prow) else "—"
        rows.append(row)
    plots = [plot_val_vs_compute(records, out_dir / "val_loss_vs_compute.png", title).name]
    act = plot_active_sets(records, out_dir / "active_sets.png")
    if act is not None:
        plots.append(act.name)
    decided, sentence = (None, "")
    if mat_label is not None:
        mats = [r for r in records if r["method"] == mat_label]
        if mats:
            hm = plot_lambda_heatmap(mats[0], out_dir / f"lambda_max_{mat_label}.png")
            if hm is not None:
                plots.append(hm.name)
        decided, sentence = verdict(agg, mat_label, baseline)
    claim = claim_check(records, quality, mat_label, baseline) if mat_label and quality else None
    all_notes = [x for x in (sentence, claim and claim["sentence"]) if x] + list(notes)
    if ptab is not None:
        all_notes.append(
            f"Columns 'paper: …' are the published numbers ({ptab.get('source', paper_key)}; full-scale runs on "
            "8×RTX 3090, losses in log-perplexity, compute in PFLOPs) — not comparable in absolute value with "
            "this CPU-scale run; compare the ordering and the ratios."
        )
    doc = {
        "title": title,
        "verdict": {
            "mat_beat_vanilla": decided,
            "sentence": sentence,
            "speedup_target": SPEEDUP_TARGET,
            "overhead_target": OVERHEAD_TARGET,
            "paper_claim_met": claim["met"] if claim else None,
        },
        "summary": {
            "verdict": sentence or "n/a",
            **({"paper's claim": claim["sentence"]} if claim else {}),
            "runs": len(records),
            "seeds": sorted({r["seed"] for r in records}),
        },
        "tables": {title: rows, **({"The paper's claim, per seed": claim["rows"]} if claim else {})},
        "plots": plots,
        "notes": all_notes,
        "aggregate": agg,
        "records": records,
        # how this table was built, so `ntkit report` can rebuild it from merged records (merge.py)
        "layout": {"columns": [list(c) for c in columns], "paper_key": paper_key, "paper_rows": paper_rows or {},
                   "mat_label": mat_label, "baseline": baseline, "quality": list(quality) if quality else None},
    }
    doc.update(extra or {})
    return doc
