"""ntkit.recipes.report: the one mean ± std convention (numbers and rendered cells), aggregation,
markdown, the MAT comparison document and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ntkit.recipes import aggregate_seeds, fmt_mean_std, heatmap, line_plot, markdown_table, mean_std
from ntkit.recipes.report import (
    aggregate,
    comparison_result,
    find_paper_numbers,
    fmt_flops,
    plot_active_sets,
    plot_lambda_heatmap,
    plot_val_vs_compute,
    render_report,
)

PNG = b"\x89PNG\r\n\x1a\n"
NAN, INF = math.nan, math.inf


def _brute(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) by the textbook sums, float64."""
    m = math.fsum(xs) / len(xs)
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# --------------------------------------------------------------------------- the convention
def test_one_seed_is_just_the_mean() -> None:
    assert mean_std([1.25]) == {"mean": 1.25, "std": None, "n": 1, "nonfinite": 0, "missing": 0}
    assert fmt_mean_std([1.25]) == "1.25"
    assert fmt_mean_std(1.25) == "1.25"
    assert "±" not in fmt_mean_std(mean_std([0.5]), "num")


def test_three_seeds_mean_and_sample_std() -> None:
    xs = [1.1, 1.3, 1.6]
    ms = mean_std(xs)
    m, s = _brute(xs)
    assert ms["n"] == 3 and ms["nonfinite"] == 0
    assert abs(ms["mean"] - m) <= 1e-15 and abs(ms["std"] - s) <= 1e-15
    assert abs(s - float(np.std(xs, ddof=1))) <= 1e-15  # ddof 1, not the population std
    assert fmt_mean_std(xs) == "1.333 ± 0.2517"
    assert fmt_mean_std(ms, "num") == "1.333 ± 0.252"


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_seed_is_excluded_and_counted(bad: float) -> None:
    xs = [1.1, bad, 1.6]
    ms = mean_std(xs)
    m, s = _brute([1.1, 1.6])
    assert ms["n"] == 2 and ms["nonfinite"] == 1
    assert abs(ms["mean"] - m) <= 1e-15 and abs(ms["std"] - s) <= 1e-15
    assert fmt_mean_std(xs, "num") == "1.350 ± 0.354 (1 of 3 diverged)"
    # one finite value left: its mean, no spread, still the count
    assert mean_std([bad, 2.0])["std"] is None
    assert fmt_mean_std([bad, 2.0]) == "2 (1 of 2 diverged)"


def test_all_non_finite_is_none() -> None:
    ms = mean_std([NAN, NAN, INF])
    assert ms == {"mean": None, "std": None, "n": 0, "nonfinite": 3, "missing": 0}
    assert fmt_mean_std([NAN, NAN, INF]) == "— (3 of 3 diverged)"
    assert fmt_mean_std(NAN) == "— (1 of 1 diverged)"


def test_empty_missing_and_bad_values() -> None:
    assert mean_std([]) == {"mean": None, "std": None, "n": 0, "nonfinite": 0, "missing": 0}
    assert fmt_mean_std([]) == "—" and fmt_mean_std(None) == "—"
    ms = mean_std([2.0, None, 4.0])  # None: a value that does not exist (not a divergence)
    assert ms["mean"] == 3.0 and ms["missing"] == 1 and ms["nonfinite"] == 0
    assert fmt_mean_std(ms) == "3 ± 1.414"
    assert mean_std(np.array([1.0, 3.0]))["mean"] == 2.0
    with pytest.raises(TypeError, match="'x'"):
        mean_std([1.0, "x"])
    with pytest.raises(TypeError, match="True"):
        mean_std([True])


def test_formatters() -> None:
    assert fmt_mean_std([0.5, 0.7], "pct") == "60.0% ± 14.1%"
    assert fmt_mean_std([2e12, 2e12], lambda v: f"{v:.1e}") == "2.0e+12 ± 0.0e+00"
    assert fmt_flops(mean_std([1.5e12])) == "1.50 TFLOPs"
    assert fmt_mean_std([123456.0]) == "1.235e+05"


# --------------------------------------------------------------------------- aggregation, tables
def test_aggregate_per_method_and_budget() -> None:
    recs = [
        {"method": "a", "seed": 0, "x": 1.0, "v": [1.0, None]},
        {"method": "a", "seed": 1, "x": 3.0, "v": [3.0, 2.0]},
        {"method": "a", "seed": 2, "x": NAN, "v": [5.0]},
        {"method": "b", "seed": 0, "x": None, "v": [5.0, 6.0]},
    ]
    agg = aggregate(recs, ["x"], ["v"])
    assert list(agg) == ["a", "b"] and agg["a"]["seeds"] == [0, 1, 2]
    assert agg["a"]["x"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2, "nonfinite": 1,
                             "missing": 0}
    assert agg["a"]["v"][0]["mean"] == 3.0 and agg["a"]["v"][0]["std"] == 2.0
    assert agg["a"]["v"][1] == {"mean": 2.0, "std": None, "n": 1, "nonfinite": 0, "missing": 2}
    assert agg["b"]["x"]["mean"] is None and agg["b"]["x"]["missing"] == 1
    json.dumps(agg, allow_nan=False)  # plain JSON: no NaN in an aggregate


def test_aggregate_seeds_and_markdown() -> None:
    agg = aggregate_seeds([{"acc": 0.5, "name": "a", "ok": True}, {"acc": NAN, "name": "b", "ok": False},
                           {"acc": 0.7, "name": "c", "ok": True}])
    assert list(agg) == ["acc"]
    assert agg["acc"]["mean"] == pytest.approx(0.6) and agg["acc"]["nonfinite"] == 1
    assert math.isnan(agg["acc"]["values"][1])
    one = aggregate_seeds([{"acc": 0.5}])["acc"]
    t = markdown_table([
        {"a": 1, "b": 0.123456, "acc": agg["acc"]},
        {"a": None, "c": "x|y", "acc": one, "std": one["std"]},
    ])
    assert t.splitlines() == [
        "| a | b | acc | c | std |",
        "| --- | --- | --- | --- | --- |",
        "| 1 | 0.1235 | 0.6 ± 0.1414 (1 of 3 diverged) | — | — |",
        "| — | — | 0.5 | x\\|y | — |",
    ]


def test_render_report_sections(tmp_path: Path) -> None:
    line_plot(tmp_path / "p.png", {"a": ([0, 1], [1, 0])})
    doc = {
        "recipe": "r", "tier": "ci", "wall_clock_s": 1.5, "config": {"lr": 0.001, "m": {"k": [1, 2]}},
        "results": {"summary": {"acc": mean_std([0.5, 0.7])}, "tables": {"T": [{"x": 1}]},
                    "plots": ["p.png", "gone.png"], "notes": ["n1"]},
    }
    text = render_report(doc, tmp_path)
    assert text.startswith("# r — tier `ci`\n\nwall-clock 1.5 s")
    for s in ("| acc | 0.6 ± 0.1414 |", "## T", "![p](p.png)", "- `gone.png` (missing)", "- n1", "| m.k | 1, 2 |"):
        assert s in text, s


def test_find_paper_numbers(tmp_path: Path) -> None:
    (tmp_path / "reference").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "reference" / "paper_numbers.json").write_text('{"t": 1}')
    assert find_paper_numbers(None, tmp_path / "data") == {"t": 1}
    assert find_paper_numbers(tmp_path / "absent.json", tmp_path / "data") is None  # only there
    assert find_paper_numbers(None, None) is None


# --------------------------------------------------------------------------- the MAT document, plots
def _record(method: str, seed: int, test_loss: float, c_target: float | None) -> dict:
    return {
        "method": method, "seed": seed, "test_loss": test_loss, "compute_to_target_flops": c_target,
        "overhead_share": 0.01 if method == "mat" else 0.0, "val_loss_at_budget": [3.0 + seed, 2.0],
        "curve": [{"flops": 0.0, "val_loss": 5.0}, {"flops": 10.0, "val_loss": 4.0 - seed}],
        "module_names": ["h0", "h1"], "active_history": [[1, 1], [1, 0]], "pruned_history": [[0, 0], [0, 1]],
        "method_history": [{"epoch": 1, "lambda_max": {"h0": 2.0, "h1": 3.0}}] if method == "mat" else [],
    }


def test_comparison_result_tables_verdict_plots(tmp_path: Path) -> None:
    recs = [_record("vanilla", 0, 4.0, 100.0), _record("vanilla", 1, 4.2, 100.0),
            _record("mat", 0, 3.9, 60.0), _record("mat", 1, NAN, 70.0)]
    paper = {"tab": {"columns": ["loss"], "rows": {"MAT": [[4.4, 0.05]]}, "source": "T1"}}
    doc = comparison_result(
        recs, title="T", columns=[("test loss", "test_loss", None, "num"), ("val@1", "val_loss_at_budget", 0, "num")],
        out_dir=tmp_path, paper=paper, paper_key="tab", paper_rows={"mat": "MAT"},
    )
    rows = {r["method"]: r for r in doc["tables"]["T"]}
    assert rows["vanilla"]["test loss"] == "4.100 ± 0.141" and rows["vanilla"]["paper: loss"] == "—"
    assert rows["mat"]["test loss"] == "3.900 (1 of 2 diverged)"
    assert rows["mat"]["val@1"] == "3.500 ± 0.707" and rows["mat"]["paper: loss"] == "4.4 ± 0.05"
    assert doc["verdict"]["mat_beat_vanilla"] is True and "0.65×" in doc["verdict"]["sentence"]
    assert doc["plots"] == ["val_loss_vs_compute.png", "active_sets.png", "lambda_max_mat.png"]
    for p in doc["plots"]:
        assert (tmp_path / p).read_bytes().startswith(PNG)
    assert any("T1" in n for n in doc["notes"])


def test_plots_are_pngs_and_leave_pyplot_alone(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    p = line_plot(
        tmp_path / "l.png",
        {"a": {"x": [1, 2, 3], "y": [3, 2, 1], "std": [0.1, None, 0.1]}, "b": ([1, 2, 3], [1, 2, 3])},
        logy=True,
        title="t",
    )
    h = heatmap(
        tmp_path / "h.png", [[1, 2], [3, 4], [5, 6]], row_labels=["r0", "r1", "r2"], col_labels=["c0", "c1"]
    )
    recs = [_record("mat", 0, 1.0, 1.0), _record("rand", 0, 1.0, 1.0)]
    v = plot_val_vs_compute(recs, tmp_path / "v.png")
    a = plot_active_sets(recs, tmp_path / "a.png")
    lm = plot_lambda_heatmap(recs[0], tmp_path / "lm.png")
    for f in (p, h, v, a, lm):
        assert f is not None and f.read_bytes().startswith(PNG) and f.stat().st_size > 1000
    assert plot_lambda_heatmap(recs[1], tmp_path / "none.png") is None
    assert plot_active_sets([{**recs[1], "active_history": []}], tmp_path / "none.png") is None
    assert plt.get_fignums() == before
    with pytest.raises(ValueError, match="2-D"):
        heatmap(tmp_path / "x.png", [1, 2, 3])
