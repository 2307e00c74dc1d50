"""The MAT report helpers of ntkit.recipes.report: aggregation, verdict, λmax matrices."""

from __future__ import annotations

import math

import pytest

from ntkit.recipes.report import aggregate, lambda_max_matrix, mean_std, verdict


def test_mean_std_and_aggregate():
    assert mean_std([])["mean"] is None and mean_std([])["n"] == 0
    ms = mean_std([1.0, 3.0])
    assert ms["mean"] == 2.0 and ms["std"] == pytest.approx(math.sqrt(2.0)) and ms["n"] == 2
    recs = [
        {"method": "a", "seed": 0, "x": 1.0, "v": [1.0, None]},
        {"method": "a", "seed": 1, "x": 3.0, "v": [3.0, 2.0]},
        {"method": "b", "seed": 0, "x": None, "v": [5.0, 6.0]},
    ]
    agg = aggregate(recs, ["x"], ["v"])
    assert agg["a"]["x"]["mean"] == 2.0 and agg["a"]["seeds"] == [0, 1]
    assert agg["a"]["v"][1]["mean"] == 2.0 and agg["a"]["v"][1]["std"] is None  # one finite value: no std
    assert agg["b"]["x"]["n"] == 0


def _agg(c_mat, c_van, ov):
    return {"mat": {"compute_to_target_flops": {"mean": c_mat}, "overhead_share": {"mean": ov}},
            "vanilla": {"compute_to_target_flops": {"mean": c_van}, "overhead_share": {"mean": 0.0}}}


def test_verdict_requires_speedup_and_small_overhead():
    assert verdict(_agg(70.0, 100.0, 0.01))[0] is True
    assert verdict(_agg(80.0, 100.0, 0.01))[0] is False  # 0.8× > 0.75×
    assert verdict(_agg(50.0, 100.0, 0.05))[0] is False  # overhead 5 % > 2 %
    ok, text = verdict(_agg(None, 100.0, 0.01))
    assert ok is False and "never reached" in text
    assert verdict({"vanilla": {}})[0] is None
    assert verdict(_agg(10.0, 0.0, 0.01))[0] is None  # vanilla never improved on its initial val loss


def test_lambda_max_matrix_reads_named_and_listed_histories():
    hist = [{"event": "mat", "epoch": 1, "lambda_max": {"h0": 2.0, "h1": 3.0}},
            {"event": "prune", "epoch": 2},
            {"event": "mat", "epoch": 3, "lambda_max": {"h1": 4.0}}]
    rows, when = lambda_max_matrix(hist, ["h0", "h1"])
    assert when == [1, 3]
    assert rows[0] == [2.0, 3.0] and math.isnan(rows[1][0]) and rows[1][1] == 4.0
