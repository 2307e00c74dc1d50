"""Results, tables and plots of the MAT comparison recipes (private to ``ntkit.recipes``).

Everything here is a pure function of the run records that :func:`ntkit.recipes._loop.train_run`
returns (fields documented in ``docs/results.md``): aggregation over seeds (mean ± sample std),
the markdown report with the paper's published numbers beside ours, the verdict line, and PNG
plots (val loss vs executed compute, MAT's λmax heatmap, the active set over time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ntkit.train.flops import format_flops

__all__ = [
    "AGG_KEYS",
    "AGG_LIST_KEYS",
    "FORMATS",
    "OVERHEAD_TARGET",
    "SPEEDUP_TARGET",
    "aggregate",
    "comparison_result",
    "find_paper_numbers",
    "fmt_mean_std",
    "lambda_max_matrix",
    "mean_std",
    "plot_active_sets",
    "plot_lambda_heatmap",
    "plot_val_vs_compute",
    "verdict",
]

#: MAT "beats" vanilla when it reaches vanilla's best val loss with at most this fraction of
#: vanilla's compute to the same target …
SPEEDUP_TARGET = 0.75
#: … and its mNTK overhead is at most this share of its total compute (seed 000 Table 7: < 2 %).
OVERHEAD_TARGET = 0.02


def _vals(records: Sequence[dict], key: str, index: int | None = None) -> list[float]:
    out = []
    for r in records:
        v = r.get(key)
        if index is not None:
            v = None if v is None or index >= len(v) else v[index]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}``; std is the sample std (ddof 1; 0 for one value), None when empty."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": s, "n": n}


def aggregate(records: Sequence[dict], keys: Sequence[str], list_keys: Sequence[str] = ()) -> dict[str, dict]:
    """Per method label: mean ± std over seeds of each scalar ``keys`` field and of each element
    of the list fields ``list_keys`` (e.g. ``val_loss_at_budget``). ``n`` counts the seeds where
    the value exists (a budget a run never reached does not count)."""
    out: dict[str, dict] = {}
    labels = list(dict.fromkeys(r["method"] for r in records))
    for lab in labels:
        rs = [r for r in records if r["method"] == lab]
        agg: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for k in keys:
            agg[k] = mean_std(_vals(rs, k))
        for k in list_keys:
            length = max((len(r.get(k) or []) for r in rs), default=0)
            agg[k] = [mean_std(_vals(rs, k, i)) for i in range(length)]
        out[lab] = agg
    return out


def fmt_mean_std(ms: dict | None, fmt: Callable[[float], str] = lambda v: f"{v:.3f}") -> str:
    """``"4.41 ± 0.05"`` (± omitted for one seed); ``"—"`` when missing."""
    if not ms or ms.get("mean") is None:
        return "—"
    if ms["n"] > 1:
        return f"{fmt(ms['mean'])} ± {fmt(ms['std'])}"
    return fmt(ms["mean"])


def fmt_flops(ms: dict | None) -> str:
    return fmt_mean_std(ms, lambda v: format_flops(v))


def find_paper_numbers(path: str | Path | None, data_dir: str | Path | None) -> dict | None:
    """Load ``paper_numbers.json`` from ``path`` when given (only there), else from
    ``<data_dir>/../reference/``. Returns None when the file is absent (the report then omits the
    paper columns)."""
    cands = []
    if path:
        cands.append(Path(path))
    elif data_dir:
        cands.append(Path(data_dir).resolve().parent / "reference" / "paper_numbers.json")
    for c in cands:
        if c.is_file():
            return json.loads(c.read_text())
    return None


def paper_cell(v: Any) -> str:
    """A paper value: ``[mean, std]`` → "mean ± std", number → str, str as is."""
    if isinstance(v, list) and len(v) == 2:
        return f"{v[0]} ± {v[1]}"
    return "—" if v is None else str(v)


def verdict(agg: dict[str, dict], mat: str = "mat", base: str = "vanilla") -> tuple[bool | None, str]:
    """Did ``mat`` beat ``base``? Criteria: compute to reach the baseline's best val loss ≤
    :data:`SPEEDUP_TARGET` × the baseline's, and overhead share ≤ :data:`OVERHEAD_TARGET`.
    Returns (True/False, or None when undecidable, and a plain sentence)."""
    if mat not in agg or base not in agg:
        return None, f"No verdict: need both {mat!r} and {base!r} runs."
    c_m = agg[mat]["compute_to_target_flops"]["mean"]
    c_b = agg[base]["compute_to_target_flops"]["mean"]
    ov = agg[mat]["overhead_share"]["mean"]
    if c_b is None:
        return None, "No verdict: the baseline's curve has no evaluation."
    if c_b <= 0:
        return None, (f"No verdict: {base}'s best validation loss was at initialisation (the run made no "
                      "progress on validation; train longer).")
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


# ----------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_val_vs_compute(records: Sequence[dict], path: Path, title: str = "") -> Path:
    """Validation loss vs executed compute (FLOPs incl. overhead), one line per (method, seed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors: dict[str, Any] = {}
    for r in records:
        lab = r["method"]
        xs = [p["flops"] for p in r["curve"]]
        ys = [p["val_loss"] for p in r["curve"]]
        c = colors.setdefault(lab, f"C{len(colors)}")
        ax.plot(xs, ys, color=c, label=lab if r is next(q for q in records if q["method"] == lab) else None,
                alpha=0.9, lw=1.4)
    ax.set_xlabel("executed compute (FLOPs, incl. mNTK overhead)")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "validation loss vs compute")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lambda_max_matrix(history: Sequence[dict], names: Sequence[str]) -> tuple[list[list[float]], list[Any]]:
    """λmax per module over MAT's evaluations from a method history: ``(rows [E][M], epochs)``.

    A history entry holds ``lambda_max`` as ``{module_name: λmax}`` (modules not measured, e.g.
    pruned ones, are absent → NaN) or as a list of M values; other entries are skipped."""
    rows, when = [], []
    for h in history:
        lm = h.get("lambda_max") if isinstance(h, dict) else None
        if isinstance(lm, dict):
            rows.append([float(lm.get(n, float("nan"))) for n in names])
        elif isinstance(lm, list) and len(lm) == len(names):
            rows.append([float(v) for v in lm])
        else:
            continue
        when.append(h.get("epoch", len(when)))
    return rows, when


def plot_lambda_heatmap(record: dict, path: Path) -> Path | None:
    """Heatmap of log10 λmax (modules × evaluations) of one MAT run; None without evaluations."""
    rows, when = lambda_max_matrix(record.get("method_history") or [], record["module_names"])
    if not rows:
        return None
    plt = _plt()
    import numpy as np

    a = np.log10(np.maximum(np.asarray(rows).T, 1e-30))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), max(3.0, 0.18 * a.shape[0] + 1.5)))
    im = ax.imshow(a, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(when)), [str(w) for w in when])
    ax.set_xlabel("evaluation (epoch)")
    names = record["module_names"]
    if len(names) <= 48:
        ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_ylabel("module")
    ax.set_title(f"log10 λmax of the mNTK — {record['method']} seed {record['seed']}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_active_sets(records: Sequence[dict], path: Path) -> Path | None:
    """Active-module maps (modules × epochs; white = active, grey = inactive, black = pruned) of each method's
    first seed, side by side."""
    firsts = list({r["method"]: r for r in reversed(records)}.values())[::-1]
    firsts = [r for r in firsts if r.get("active_history")]
    if not firsts:
        return None
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, len(firsts), figsize=(2.4 * len(firsts) + 1, 3.6), squeeze=False)
    for ax, r in zip(axes[0], firsts):
        act = np.asarray(r["active_history"], dtype=float).T
        pr = np.asarray(r["pruned_history"], dtype=float).T if r.get("pruned_history") else 0 * act
        ax.imshow(act - 0.5 * pr, aspect="auto", cmap="Greys_r", vmin=-0.5, vmax=1, interpolation="nearest")
        ax.set_title(r["method"], fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("module")
    fig.suptitle("module state after each epoch (white = active, grey = inactive, black = pruned)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the result
#: Scalar record fields aggregated over seeds (mean ± std) for every comparison recipe.
AGG_KEYS = (
    "test_loss",
    "test_acc",
    "best_val_loss",
    "convergence_flops",
    "compute_to_target_flops",
    "compute_ratio_vs_baseline",
    "train_flops",
    "overhead_flops",
    "total_flops",
    "overhead_share",
    "forward_sparsity",
    "backward_sparsity",
    "wall_s",
)
AGG_LIST_KEYS = ("val_loss_at_budget", "compute_to_train_acc")


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _pct2(v: float) -> str:
    return f"{100 * v:.2f}%"


def _num(v: float) -> str:
    return f"{v:.3f}"


def _ratio(v: float) -> str:
    return f"{v:.2f}×"


def _secs(v: float) -> str:
    return f"{v:.0f}"


#: Formatters by name, for column specs.
FORMATS: dict[str, Callable[[float], str]] = {
    "num": _num,
    "flops": format_flops,
    "pct": _pct,
    "pct2": _pct2,
    "ratio": _ratio,
    "secs": _secs,
}


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
    extra: dict | None = None,
) -> dict:
    """The document a MAT comparison recipe returns (→ results.json, rendered by the runner).

    Args:
        records: finalized run records (one per method × seed).
        title: table title.
        columns: ``(header, record_key, list_index | None, format_name)`` per column of ours;
            ``format_name`` in :data:`FORMATS`.
        out_dir: where the PNG plots go.
        notes: report bullets (the data split note first).
        paper, paper_key, paper_rows: the paper_numbers.json content, the table key in it, and
            our method label → the paper's row name. Missing → no paper columns.
        mat_label: the MAT run the verdict and λmax heatmap are about (None: no verdict).
        baseline: the reference method (vanilla).
        extra: more top-level fields for results.json.

    Returns: ``{"summary", "tables", "plots", "notes", "aggregate", "records", "verdict", …}``.
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
    all_notes = ([sentence] if sentence else []) + list(notes)
    if ptab is not None:
        all_notes.append(
            f"Columns 'paper: …' are the published numbers ({ptab.get('source', paper_key)}; full-scale runs on "
            "8×RTX 3090, losses in log-perplexity, compute in PFLOPs) — not comparable in absolute value with "
            "this CPU-scale run; compare the ordering and the ratios."
        )
    doc = {
        "title": title,
        "verdict": {"mat_beat_vanilla": decided, "sentence": sentence, "speedup_target": SPEEDUP_TARGET,
                    "overhead_target": OVERHEAD_TARGET},
        "summary": {
            "verdict": sentence or "n/a",
            "runs": len(records),
            "seeds": sorted({r["seed"] for r in records}),
        },
        "tables": {title: rows},
        "plots": plots,
        "notes": all_notes,
        "aggregate": agg,
        "records": records,
    }
    doc.update(extra or {})
    return doc
