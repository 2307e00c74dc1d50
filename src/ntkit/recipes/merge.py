"""Merge several runs' ``results.json`` (seeds, recipes, machines) into one markdown report.

``ntkit report DIR_OR_FILE… [--out FILE]`` calls :func:`merge_report`. The report has, per recipe
and per distinct config, one table in the seed tables' layout: one row per method (and pruning
ratio / density where the recipe sweeps one), every metric as mean ± std over all seeds found
(:func:`ntkit.recipes.report.mean_std`, the one convention), the papers' published numbers beside
ours, then where the runs came from (machine, versions, tier) with links to their plots.

Choices, and why:

* **Re-aggregate from the per-seed records**, never from the rendered tables: a table cell is
  already "mean ± std" text and cannot be pooled. Records are ``results.records`` (MAT, PL
  recipes) or ``results.runs`` (NTT); each holds ``method`` and ``seed``.
* **Columns**: a run written by :func:`ntkit.recipes.report.comparison_result` stores its own
  column spec under ``results.layout``, so the merged table has exactly the recipe's columns and
  numbers; older runs and other recipes get :data:`FALLBACK_COLUMNS` (those with a value).
* **Seeds are de-duplicated** by (method row, seed): the same seed found twice with equal numbers
  (a run copied to two places, or re-run deterministically elsewhere) counts once and is noted;
  different numbers are a :class:`~ntkit.errors.DataError` naming both files — which one is right
  is not ours to guess. Timing columns (wall-clock) may differ between machines and are not
  compared; the first file's are kept.
* **Configs are never silently averaged**: runs of one recipe are grouped by their resolved config
  without the seeds (tier included); each group gets its own table, and the keys that differ are
  listed in a warning table.
* **The papers' numbers** come from ``paper_numbers.json`` found like the recipes find it
  (:func:`ntkit.recipes.report.find_paper_numbers`: an explicit path, else
  ``<data_dir>/../reference/``, trying ``--data-dir``, ``$NTKIT_DATA_DIR`` and each run's own
  ``data_dir``); without it the report says so and has no paper columns.
* **Links are relative** to the report file's folder (percent-encoded), so the report renders on
  GitHub wherever the folder is committed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ntkit.errors import DataError
from ntkit.recipes.report import (
    FORMATS,
    claim_check,
    find_paper_numbers,
    fmt_mean_std,
    markdown_table,
    mean_std,
    paper_cell,
)

__all__ = ["FALLBACK_COLUMNS", "PAPER_TABLES", "load_runs", "merge_report"]

#: Column specs ``(header, record_key, list_index | None, format)`` for runs without a stored
#: ``results.layout``; a column appears when some record has a number there. Headers follow the
#: recipes' own tables. ``val_loss_at_budget`` / ``compute_to_train_acc`` are expanded per entry.
FALLBACK_COLUMNS: tuple[tuple[str, str, int | None, str], ...] = (
    ("test loss (best-val ckpt)", "test_loss", None, "num"),
    ("test top-1 (best-val ckpt)", "test_acc", None, "pct"),
    ("test % (last iter)", "test_last", None, "pct"),
    ("test % (best val)", "test_best_val", None, "pct"),
    ("best val loss", "best_val_loss", None, "num"),
    ("forward sparsity", "forward_sparsity", None, "pct"),
    ("backward sparsity", "backward_sparsity", None, "pct"),
    ("compute to convergence", "convergence_flops", None, "flops"),
    ("compute to vanilla's best val", "compute_to_target_flops", None, "flops"),
    ("vs vanilla", "compute_ratio_vs_baseline", None, "ratio"),
    ("total compute", "total_flops", None, "flops"),
    ("mNTK overhead", "overhead_share", None, "pct2"),
    ("params", "final_num_params", None, "count"),
    ("wall s", "wall_s", None, "secs"),
)

#: Recipe → table of ``paper_numbers.json`` for runs that did not store their ``paper_key``.
PAPER_TABLES = {
    "mat-bert": "mat_table1_bert_wikitext2",
    "mat-switch": "mat_table2_switch_wikitext103",
    "mat-vgg": "mat_table3_vgg16_cifar10",
    "mat-prune": "mat_table5_pruning_bert",
}

#: Recipe prefix → key of text claims in ``paper_numbers.json`` (the seed has no table to put beside ours).
_PAPER_CLAIMS = {"pl-": "plreg_claims"}

#: :data:`ntkit.recipes.report.FORMATS` plus whole counts (parameters) with thousands separators.
_FORMATS = {**FORMATS, "count": lambda v: f"{v:,.0f}"}

#: Columns that are wall-clock measurements (by format, or by record field for ratios and shares
#: of times): they differ between machines, so duplicates of a seed are not compared on them.
_TIMING_FORMATS = {"secs", "ms"}
_TIMING_KEYS = {"time_vs_dense", "gate_share"}


@dataclasses.dataclass(frozen=True)
class _Run:
    """One loaded ``results.json``: where it is and what it holds."""

    path: Path
    doc: dict

    @property
    def recipe(self) -> str:
        return str(self.doc.get("recipe", "run"))

    @property
    def results(self) -> dict:
        res = self.doc.get("results")
        return res if isinstance(res, dict) else {}

    @property
    def records(self) -> list[dict]:
        """Per-(method, seed) records: ``results.records`` or, for NTT sweeps, ``results.runs``."""
        recs = self.results.get("records", self.results.get("runs"))
        if not isinstance(recs, list):
            return []
        return [r for r in recs if isinstance(r, dict) and "method" in r and "seed" in r]


# --------------------------------------------------------------------------- loading
def load_runs(paths: Sequence[str | Path]) -> list[_Run]:
    """Load every ``results.json`` named by ``paths`` (run directories or the files themselves).

    The same file named twice (as a directory and as a file) is loaded once.

    Raises:
        DataError: a path does not exist, a directory holds no ``results.json``, or a file is not
            a JSON object — one line naming the path.
    """
    if not paths:
        raise DataError("report: no run directory given")
    runs: list[_Run] = []
    seen: set[Path] = set()
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            path = path / "results.json"
            if not path.is_file():
                raise DataError(
                    f"report: {str(p)!r} has no results.json (not a run directory of `ntkit run`)"
                )
        elif not path.is_file():
            raise DataError(f"report: {str(p)!r}: no such file or directory")
        path = path.resolve()
        if path in seen:
            continue
        seen.add(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"report: {str(p)!r}: corrupt JSON ({' '.join(str(e).split())})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
            raise DataError(f"report: {str(p)!r}: not a results.json of `ntkit run` (no 'results' object)")
        runs.append(_Run(path, doc))
    return runs


# --------------------------------------------------------------------------- grouping
def _strip_seeds(obj: Any) -> Any:
    """The config without its ``seeds`` / ``seed`` entries (what may differ between merged runs)."""
    if isinstance(obj, Mapping):
        return {k: _strip_seeds(v) for k, v in obj.items() if k not in ("seeds", "seed")}
    if isinstance(obj, list):
        return [_strip_seeds(v) for v in obj]
    return obj


def _config_key(run: _Run) -> str:
    return json.dumps(
        {"tier": run.doc.get("tier"), "config": _strip_seeds(run.doc.get("config"))}, sort_keys=True
    )


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _row_key(rec: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What identifies a table row: the method label, plus the pruning ratio (PL recipes, from
    ``method_config``) or the density (NTT sweeps) when the record has one."""
    key: list[tuple[str, Any]] = [("method", rec["method"])]
    mc = rec.get("method_config")
    if isinstance(mc, Mapping) and "ratio" in mc:
        key.append(("ratio", mc["ratio"]))
    if "density" in rec:
        key.append(("density", rec["density"]))
    return tuple(key)


def _value(rec: Mapping[str, Any], key: str, idx: int | None) -> float | None:
    v = rec.get(key)
    if idx is not None:
        v = v[idx] if isinstance(v, list) and 0 <= idx < len(v) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _indexed_columns(
    records: list[dict], key: str, labels: list[float], named: str, unnamed: str, fmt: str
) -> list[tuple[str, str, int | None, str]]:
    """One column per entry of the list field ``key`` (as long as its longest value): headed by
    ``named`` with the percentage of ``labels[i]`` where known, else ``unnamed`` with ``i``."""
    n = max((len(r.get(key) or []) for r in records), default=0)
    return [(named.format(round(100 * labels[i])) if i < len(labels) else unnamed.format(i), key, i, fmt)
            for i in range(n)]


def _columns(
    runs: Sequence[_Run], records: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str, int | None, str]]:
    """The runs' stored column spec when they all agree on one, else the fallback columns with data."""
    layouts = [r.results.get("layout") for r in runs]
    specs = {json.dumps(lay.get("columns")) for lay in layouts if isinstance(lay, Mapping)}
    if len(specs) == 1 and all(isinstance(lay, Mapping) for lay in layouts):
        cols = json.loads(specs.pop())
        if isinstance(cols, list) and all(
            isinstance(c, list) and len(c) == 4 and c[3] in _FORMATS for c in cols
        ):
            return [(str(h), str(k), i, str(f)) for h, k, i, f in cols]
    out: list[tuple[str, str, int | None, str]] = []
    first = records[0] if records else {}
    for spec in FALLBACK_COLUMNS:
        if spec[1] == "test_loss":  # the budget columns go first, as in the MLM seed tables
            out += _indexed_columns(records, "val_loss_at_budget", first.get("budget_fracs") or [],
                                    "val loss @ {}% vanilla compute", "val loss @ budget {}", "num")
            out += _indexed_columns(records, "compute_to_train_acc", first.get("acc_thresholds") or [],
                                    "compute to train acc {}%", "compute to train acc #{}", "flops")
        if any(_value(r, spec[1], spec[2]) is not None for r in records):
            out.append(spec)
    return out


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _dedupe(
    runs: Sequence[_Run], columns: Sequence[tuple[str, str, int | None, str]]
) -> tuple[dict[tuple, dict[Any, tuple[dict, _Run]]], list[str]]:
    """Rows → seed → (record, run), each seed once; notes on identical duplicates.

    Raises:
        DataError: one seed of one row found twice with different numbers (names both files).
    """
    rows: dict[tuple, dict[Any, tuple[dict, _Run]]] = {}
    notes: list[str] = []
    compared = [c for c in columns if c[3] not in _TIMING_FORMATS and c[1] not in _TIMING_KEYS]
    for run in runs:
        for rec in run.records:
            seeds = rows.setdefault(_row_key(rec), {})
            seed = rec["seed"]
            if seed not in seeds:
                seeds[seed] = (rec, run)
                continue
            prev, prev_run = seeds[seed]
            for head, key, idx, _ in compared:
                a, b = _value(prev, key, idx), _value(rec, key, idx)
                if not _same(a, b):
                    raise DataError(
                        f"report: {run.recipe} method {rec['method']!r} seed {seed} differs between "
                        f"{prev_run.path} and {run.path} ({head}: {a} vs {b}); merge only one of them"
                    )
            notes.append(
                f"{run.recipe} method `{rec['method']}` seed {seed} is in both `{_short(prev_run)}` and "
                f"`{_short(run)}` with the same numbers: counted once."
            )
    return rows, notes


# --------------------------------------------------------------------------- rendering
def _short(run: _Run) -> str:
    return run.path.parent.name or str(run.path)


def _link(target: Path, base: Path) -> str:
    """A relative, percent-encoded link from folder ``base`` to ``target`` (POSIX separators)."""
    rel = os.path.relpath(target, base)
    return quote(Path(rel).as_posix(), safe="/._-~")


def _machine(run: _Run) -> str:
    m = run.doc.get("machine")
    parts: list[str] = []
    if isinstance(m, Mapping):
        if m.get("hostname"):
            parts.append(f"`{m['hostname']}`")
        if m.get("accelerator"):
            parts.append(str(m["accelerator"]))
        if m.get("cpu_count"):
            parts.append(f"{m['cpu_count']} CPUs")
        if m.get("torch_threads"):
            parts.append(f"{m['torch_threads']} torch threads")
        if m.get("platform"):
            parts.append(str(m["platform"]))
    dist = run.doc.get("distributed")
    if isinstance(dist, Mapping) and (dist.get("world_size") or 1) > 1:
        parts.append(f"{dist['world_size']} ranks ({dist.get('backend')})")
    return ", ".join(parts) if parts else "not recorded"


def _find_paper(
    paper_numbers: str | Path | None, data_dir: str | Path | None, runs: Sequence[_Run]
) -> dict | None:
    """``paper_numbers.json``: the explicit path (only there), else next to a data directory."""
    if paper_numbers:
        found = find_paper_numbers(paper_numbers, None)
        if found is None:
            raise DataError(f"report: paper_numbers={str(paper_numbers)!r}: no such file")
        return found
    cands = [data_dir, os.environ.get("NTKIT_DATA_DIR")] + [r.doc.get("data_dir") for r in runs]
    for d in cands:
        if d and Path(d).is_dir():
            found = find_paper_numbers(None, d)
            if found is not None:
                return found
    return None


def _table(
    rows: dict[tuple, dict[Any, tuple[dict, _Run]]],
    columns: Sequence[tuple[str, str, int | None, str]],
    ptab: Mapping[str, Any] | None,
    paper_rows: Mapping[str, str],
) -> list[dict[str, str]]:
    pcols = [f"paper: {c}" for c in (ptab or {}).get("columns", [])]
    out = []
    for key, seeds in rows.items():
        recs = [rec for rec, _ in seeds.values()]
        row: dict[str, str] = {}
        for name, val in key:
            row[name] = f"{100 * val:g}%" if name == "ratio" else str(val)
        row["seeds"] = ", ".join(str(s) for s in sorted(seeds, key=str))
        for head, k, idx, fmt in columns:
            row[head] = fmt_mean_std(mean_std(_value(r, k, idx) for r in recs), _FORMATS[fmt])
        if ptab is not None:
            label = str(key[0][1])
            prow = ptab.get("rows", {}).get(paper_rows.get(label, label))
            for j, c in enumerate(pcols):
                row[c] = paper_cell(prow[j]) if prow is not None and j < len(prow) else "—"
        out.append(row)
    return out


def _runs_table(runs: Sequence[_Run], base: Path) -> list[dict[str, str]]:
    out = []
    for r in runs:
        report = r.path.parent / "report.md"
        name = f"[{_short(r)}]({_link(report, base)})" if report.is_file() else f"`{_short(r)}`"
        plots = r.results.get("plots") or []
        links = [
            f"[{Path(str(p)).stem}]({_link(r.path.parent / str(p), base)})"
            for p in plots
            if isinstance(p, str) and (r.path.parent / p).is_file()
        ]
        ver = r.doc.get("versions") or {}
        out.append(
            {
                "run": name,
                "seeds": ", ".join(str(s) for s in sorted({rec["seed"] for rec in r.records}, key=str))
                or "—",
                "machine": _machine(r),
                "versions": ", ".join(f"{k} {v}" for k, v in ver.items())
                if isinstance(ver, Mapping)
                else "—",
                "finished": str(r.doc.get("finished_utc") or "—"),
                "wall s": f"{float(r.doc['wall_clock_s']):.0f}"
                if isinstance(r.doc.get("wall_clock_s"), (int, float))
                else "—",
                "plots": " · ".join(links) or "—",
            }
        )
    return out


def _config_diff(groups: Sequence[Sequence[_Run]], letters: Sequence[str]) -> list[dict[str, str]]:
    flats = [
        _flat({"tier": g[0].doc.get("tier"), "config": _strip_seeds(g[0].doc.get("config"))}) for g in groups
    ]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    out = []
    for k in keys:
        vals = [json.dumps(f.get(k), sort_keys=True) if k in f else "(absent)" for f in flats]
        if len(set(vals)) > 1:
            out.append({"key": k, **{f"config {c}": f"`{v}`" for c, v in zip(letters, vals)}})
    return out


def merge_report(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    paper_numbers: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> str:
    """Merge the runs at ``paths`` into one markdown report; write it to ``out`` when given.

    Args:
        paths: run directories (holding ``results.json``) or ``results.json`` files; several seeds,
            recipes or machines.
        out: the report file to write (its folder is created); links are relative to its folder
            (to the current directory when None).
        paper_numbers: ``paper_numbers.json`` to put the papers' numbers beside ours (default:
            looked up next to ``data_dir``, ``$NTKIT_DATA_DIR`` or a run's data directory).
        data_dir: a dataset directory whose ``../reference/`` holds ``paper_numbers.json``.

    Returns: the markdown text.

    Raises:
        DataError: a path is not a run, or one seed of one method differs between two files.
    """
    runs = load_runs(paths)
    base = Path(out).expanduser().resolve().parent if out is not None else Path.cwd().resolve()
    paper = _find_paper(paper_numbers, data_dir, runs)
    lines = ["# Merged report", ""]
    lines += [
        f"{len(runs)} run(s): "
        + ", ".join(f"`{_short(r)}` ({r.recipe}, tier `{r.doc.get('tier', '?')}`)" for r in runs)
        + ". Every cell is the mean ± sample std over the seeds listed (one seed: the value alone; "
        "diverged seeds are excluded and counted).",
        "",
    ]
    if paper is None:
        lines += [
            (
                "_The papers' published numbers were not found (pass `--paper-numbers FILE` or `--data-dir DIR` "
                "with `../reference/paper_numbers.json`); the tables hold ours only._"
            ),
            "",
        ]
    by_recipe: dict[str, list[_Run]] = {}
    for r in runs:
        by_recipe.setdefault(r.recipe, []).append(r)
    for recipe, rruns in by_recipe.items():
        groups: dict[str, list[_Run]] = {}
        for r in rruns:
            groups.setdefault(_config_key(r), []).append(r)
        glist = list(groups.values())
        letters = [chr(ord("A") + i) if i < 26 else f"#{i}" for i in range(len(glist))]
        lines += [f"## {recipe}", ""]
        if len(glist) > 1:
            lines += [
                (
                    f"> **Warning: these runs of {recipe} were made with {len(glist)} different configs** (besides seeds); "
                    "they are not averaged together — one table per config below. The keys that differ:"
                ),
                "",
                markdown_table(_config_diff(glist, letters)),
            ]
        for letter, grp in zip(letters, glist):
            title = grp[0].results.get("title") or recipe
            head = f"{title} — tier `{grp[0].doc.get('tier', '?')}`"
            if len(glist) > 1:
                head += f" (config {letter})"
            lines += [f"### {head}", ""]
            records = [rec for r in grp for rec in r.records]
            if not records:
                lines += ["_These runs hold no per-seed records; see their own reports below._", ""]
            else:
                columns = _columns(grp, records)
                rows, dup_notes = _dedupe(grp, columns)
                layout = (
                    grp[0].results.get("layout") if isinstance(grp[0].results.get("layout"), Mapping) else {}
                )
                pkey = layout.get("paper_key") if "paper_key" in layout else PAPER_TABLES.get(recipe)
                ptab = paper.get(pkey) if paper and pkey and isinstance(paper.get(pkey), Mapping) else None
                lines += [markdown_table(_table(rows, columns, ptab, layout.get("paper_rows") or {}))]
                if ptab is not None:
                    lines += [
                        (
                            f"Columns 'paper: …' are **the papers' published figures** ({ptab.get('source', pkey)}), "
                            "measured at full scale on the papers' own hardware (GPUs) — not comparable in absolute "
                            "value with these runs; compare orderings and ratios."
                        ),
                        "",
                    ]
                claims_key = next((v for p, v in _PAPER_CLAIMS.items() if recipe.startswith(p)), None)
                claims = paper.get(claims_key) if paper and claims_key else None
                if isinstance(claims, Mapping):
                    lines += [
                        (
                            f"The paper's claims ({claims.get('source', claims_key)}; its figures on its "
                            "hardware, no table to put beside ours):"
                        ),
                        "",
                    ]
                    lines += [f"- {k}: {v}" for k, v in claims.items() if k != "source"] + [""]
                quality = layout.get("quality")
                if quality and layout.get("mat_label"):
                    unique = [rec for seeds in rows.values() for rec, _ in seeds.values()]
                    claim = claim_check(unique, (quality[0], bool(quality[1])), layout["mat_label"],
                                        layout.get("baseline") or "vanilla")
                    if claim is not None:
                        lines += [claim["sentence"], "", markdown_table(claim["rows"])]
                lines += [f"- {n}" for n in dup_notes] + ([""] if dup_notes else [])
            lines += ["Runs merged here:", "", markdown_table(_runs_table(grp, base))]
    text = "\n".join(lines).rstrip() + "\n"
    if out is not None:
        from ntkit.train.checkpoint import atomic_write_text

        dest = Path(out).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest, text)
    return text
