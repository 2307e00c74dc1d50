"""The MAT report helpers of ntkit.recipes.report: aggregation, verdict, λmax matrices."""

from __future__ import annotations

import math

import pytest

from ntkit.recipes.report import aggregate, claim_check, lambda_max_matrix, mean_std, verdict


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


def _run(method, seed, acc, conv=100.0, total=100.0):
    """A finalized record; vanilla's compute to its own best is 100 FLOPs in every seed."""
    return {"method": method, "seed": seed, "test_acc": acc, "convergence_flops": conv,
            "convergence_ratio_vs_baseline": conv / 100.0, "total_flops": total}


def _claim_runs(mat_accs, ctl_accs, mat_conv=70.0):
    van = [0.60, 0.62, 0.64]  # mean 0.62, sample std 0.02
    recs = [_run("vanilla", s, a) for s, a in enumerate(van)]
    recs += [_run("mat", s, a, conv=mat_conv, total=80.0) for s, a in enumerate(mat_accs)]
    recs += [_run("rand_replay", s, a, total=80.0) for s, a in enumerate(ctl_accs)]
    return recs


def test_claim_check_needs_quality_compute_and_the_control_in_every_seed():
    good = claim_check(_claim_runs([0.61, 0.60, 0.62], [0.55, 0.59, 0.61]), ("test_acc", True))
    assert good["met"] is True and "beat rand_replay in 3 of 3 seeds" in good["sentence"]
    assert [r["mat beat rand_replay"] for r in good["rows"]] == ["yes", "yes", "yes"]
    assert good["rows"][0]["mat compute to own best / vanilla's"] == "0.70×"
    assert good["rows"][0]["mat total compute / vanilla's"] == "0.80×"
    # mean 0.593 is 0.027 below vanilla's 0.62, more than its std 0.02
    assert claim_check(_claim_runs([0.59, 0.59, 0.60], [0.5] * 3), ("test_acc", True))["met"] is False
    # compute to its own best 0.8× > 0.75×
    assert claim_check(_claim_runs([0.62] * 3, [0.5] * 3, mat_conv=80.0), ("test_acc", True))["met"] is False
    # the control wins one seed
    lost = claim_check(_claim_runs([0.62] * 3, [0.5, 0.63, 0.5]), ("test_acc", True))
    assert lost["met"] is False and "2 of 3" in lost["sentence"]


def test_claim_check_lower_is_better_and_undecidable_cases():
    loss = [{"method": m, "seed": 0, "test_loss": v, "convergence_flops": c, "convergence_ratio_vs_baseline": c / 10.0,
             "total_flops": 1.0} for m, v, c in (("vanilla", 5.0, 10.0), ("mat", 4.9, 5.0), ("rand_replay", 5.1, 10.0))]
    one = claim_check(loss, ("test_loss", False))
    assert one["met"] is True and one["rows"][0]["mat beat rand_replay"] == "yes"
    worse = [dict(r, test_loss=5.2) if r["method"] == "mat" else r for r in loss]
    one_worse = claim_check(worse, ("test_loss", False))
    assert one_worse["met"] is False  # it lost to the control; its gap to vanilla alone is undecidable
    assert "no std" in one_worse["sentence"]
    no_ctl = claim_check([r for r in loss if r["method"] != "rand_replay"], ("test_loss", False))
    assert no_ctl["met"] is None and "no rand_replay runs" in no_ctl["sentence"]
    assert claim_check([r for r in loss if r["method"] != "mat"], ("test_loss", False)) is None
