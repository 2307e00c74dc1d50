"""Non-finite measurements never poison MAT's decision: a module whose λmax is NaN / ±Inf keeps its
previous active status and temporal state, the thresholds ignore it, a warning names it and the
history lists it; an eigen-decomposition that fails counts every measured module as non-finite."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from method_fakes import FakeController, ScriptedLambda, make_ctx, make_partition, mlm_batch, tiny_bert

from ntkit import spectrum
from ntkit.methods import MAT, LoopContext, build_method, scores
from ntkit.partition import attention_heads
from ntkit.sparse import attach

LAYOUT = {"A": ("head", 3), "B": ("head", 2), "C": ("expert", 4)}
NAMES = ["A.0", "A.1", "A.2", "B.0", "B.1", "C.0", "C.1", "C.2", "C.3"]
INF, NAN = math.inf, math.nan


def _table(*vals: float) -> dict[str, float]:
    return dict(zip(NAMES, vals))


def _on(mat: MAT) -> list[str]:
    assert mat.active is not None
    return [n for n, a in zip(NAMES, mat.active.tolist()) if a]


def _mat(script, monkeypatch, **kw) -> tuple[MAT, FakeController]:
    monkeypatch.setattr(scores, "ntk_lambda_max", ScriptedLambda(script))
    part = make_partition(LAYOUT)
    ctl = FakeController(len(part))
    # hand-computed with λ_α over each kind's modules in all layers
    cfg = {"alpha": {"head": 0.25, "expert": 0.5}, "beta": 0.0, "start_epoch": 1, "interval": 1,
           "threshold_scope": "global"}
    mat = MAT({**cfg, "num_samples": 2, **kw})
    mat.bind(torch.nn.Linear(1, 1), part, ctl)
    return mat, ctl


def _evaluate(mat: MAT, epoch: int) -> None:
    ctx = make_ctx()
    ctx.epoch = epoch
    mat.on_epoch_end(ctx)


def _no_warning(fn, *args) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(*args)


def test_nonfinite_lambda_keeps_previous_decision_and_temporal_state(monkeypatch):
    """Heads α = 0.25, experts α = 0.5, no protection.

    eval 1: heads 1, 5, 9, 2, 3 → λ_α = 3 → A.1, A.2; experts 10..40 → 25 → C.2, C.3.
    eval 2: A.1 = +Inf (was on), C.0 = −Inf (was off), C.3 = NaN (was on). Finite heads 1, 2, 2, 3 →
      λ_α = 1.5 → A.2, B.0, B.1 (+ A.1 kept on); finite experts 20, 5 → 12.5 → C.1 (+ C.3 kept on,
      C.0 kept off, C.2 off).
    eval 3: all finite again: heads 1, 6, 2, 2, 3 → 2.25 → A.1, B.1; experts 10, 20, 5, 40 → 22.5 → C.3;
      Δ_1 of the faulty modules is their first difference, against eval 1's value.
    """
    script = [
        _table(1, 5, 9, 2, 3, 10, 20, 30, 40),
        _table(1, INF, 2, 2, 3, -INF, 20, 5, NAN),
        _table(1, 6, 2, 2, 3, 10, 20, 5, 40),
    ]
    mat, ctl = _mat(script, monkeypatch, protect=False)
    _no_warning(_evaluate, mat, 0)
    assert _on(mat) == ["A.1", "A.2", "C.2", "C.3"]
    prev, d1, retired = mat.prev_lmax.clone(), mat.delta1.clone(), mat.retired.clone()

    with pytest.warns(RuntimeWarning, match=r"^mat: non-finite λmax for A\.1 \(inf\), C\.0 \(-inf\), C\.3 \(nan\); "
                      r"keeping their previous decisions$"):
        _evaluate(mat, 1)
    rec = mat.history[1]
    assert _on(mat) == ["A.1", "A.2", "B.0", "B.1", "C.1", "C.3"]
    assert ctl.active.tolist() == mat.active.tolist()
    assert rec["nonfinite"] == ["A.1", "C.0", "C.3"]
    assert rec["threshold"] == pytest.approx({"head": 1.5, "expert": 12.5})
    assert set(rec["lambda_max"]) == set(NAMES) - {"A.1", "C.0", "C.3"}
    json.dumps(mat.history, allow_nan=False)  # nothing non-finite reaches the record
    faulty = torch.tensor([n in ("A.1", "C.0", "C.3") for n in NAMES])
    assert torch.equal(mat.prev_lmax[faulty], prev[faulty])  # temporal state untouched
    assert torch.isnan(mat.delta1[faulty]).all() and torch.isnan(d1).all()
    assert torch.equal(mat.delta1[~faulty], (torch.tensor([1, 0, 2, 2, 3, 0, 20, 5, 0.0]) - prev).abs()[~faulty])
    assert torch.equal(mat.retired, retired)

    _no_warning(_evaluate, mat, 2)
    rec = mat.history[2]
    assert rec["nonfinite"] == []
    assert _on(mat) == ["A.1", "B.1", "C.3"]
    assert rec["threshold"] == pytest.approx({"head": 2.25, "expert": 22.5})
    i = {n: k for k, n in enumerate(NAMES)}
    assert mat.delta1[i["A.1"]].item() == 1.0  # |6 − 5|: eval 1 → eval 3
    assert mat.delta1[i["C.0"]].item() == 0.0 and mat.delta1[i["C.3"]].item() == 0.0
    assert mat.prev_lmax.tolist() == [1, 6, 2, 2, 3, 10, 20, 5, 40]


def test_nonfinite_module_never_retires_and_keeps_retired_modules_retired(monkeypatch):
    """β = 0.5: a NaN at eval 3 cannot produce a ratio, so the module is not retired; a module
    retired before stays retired (and inactive) through a non-finite evaluation."""
    script = [
        _table(1, 5, 9, 2, 3, 10, 20, 30, 40),
        _table(2, 7, 10, 2, 4, 12, 20, 35, 45),
        _table(2.001, NAN, 10.001, 2, 5, 12.001, 20, 35.001, NAN),  # B.0, C.1: 0/0 → retired
        _table(NAN, 7.5, 11, NAN, 6, 12, 21, 36, 46),
    ]
    mat, _ = _mat(script, monkeypatch, beta=0.5, protect=False)
    _evaluate(mat, 0)
    _evaluate(mat, 1)
    with pytest.warns(RuntimeWarning, match=r"A\.1 \(nan\), C\.3 \(nan\)"):
        _evaluate(mat, 2)
    retired = {n for n, r in zip(NAMES, mat.retired.tolist()) if r}
    assert "A.1" not in retired and "C.3" not in retired
    assert {"A.0", "A.2", "B.0", "C.0", "C.1", "C.2"} <= retired  # ratios ≤ 1e-3 / 1 < 0.5
    before = mat.active.clone()
    with pytest.warns(RuntimeWarning, match=r"for A\.0 \(nan\), B\.0 \(nan\); keeping their"):
        _evaluate(mat, 3)
    assert mat.history[3]["nonfinite"] == ["A.0", "B.0"]
    assert not mat.active[0] and not mat.active[3]  # retired and non-finite: stays off
    assert bool(mat.active[0]) == bool(before[0]) and bool(mat.active[3]) == bool(before[3])


def test_protection_counts_a_kept_active_module(monkeypatch):
    """Layer B: B.1 was kept on by the protection at eval 1; at eval 2 it is NaN and B.0 falls
    below the threshold — B.1's kept status is the layer's active module, so B.0 stays off. A
    layer whose modules are all non-finite keeps its previous decision as is."""
    script = [
        _table(1, 5, 9, 2, 3, 10, 20, 30, 40),
        _table(1, 5, 9, 2, NAN, NAN, NAN, NAN, NAN),
    ]
    mat, _ = _mat(script, monkeypatch, protect=True)
    _evaluate(mat, 0)
    assert _on(mat) == ["A.1", "A.2", "B.1", "C.2", "C.3"]  # B.1 by protection
    with pytest.warns(RuntimeWarning, match=r"B\.1 \(nan\), C\.0 \(nan\), C\.1 \(nan\)"):
        _evaluate(mat, 1)
    assert _on(mat) == ["A.1", "A.2", "B.1", "C.2", "C.3"]
    assert mat.history[1]["threshold"] == pytest.approx({"head": 3.0})  # no finite expert: no threshold


def test_decide_with_explicit_coverage_keeps_uncovered_modules_silently(monkeypatch):
    mat, _ = _mat([_table(1, 5, 9, 2, 3, 10, 20, 30, 40)], monkeypatch, protect=False)
    _evaluate(mat, 0)
    before = mat.active.clone()
    lmax = torch.tensor([1, NAN, 2, 2, 3, NAN, NAN, NAN, NAN], dtype=torch.float64)
    covered = torch.tensor([n[0] != "C" and n != "A.1" for n in NAMES])
    _no_warning(mat.decide, make_ctx(), lmax, covered)  # A.1 and the experts were not measured
    assert mat.history[-1]["nonfinite"] == []
    assert torch.equal(mat.active[5:], before[5:]) and bool(mat.active[1]) == bool(before[1])
    assert mat.history[-1]["threshold"] == pytest.approx({"head": 1.5})


def test_failed_eigendecomposition_counts_every_measured_module_nonfinite(monkeypatch):
    script = ScriptedLambda([_table(1, 5, 9, 2, 3, 10, 20, 30, 40), _table(1, 6, 2, 2, 3, 10, 20, 5, 40)])
    calls = []

    def flaky(model, inputs, partition, output_mask=None, controller=None):
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("linalg.eigh: (Batch element 2): The algorithm failed to converge")
        return script(model, inputs, partition, output_mask, controller)

    monkeypatch.setattr(scores, "ntk_lambda_max", flaky)
    part = make_partition(LAYOUT)
    ctl = FakeController(len(part))
    mat = MAT(alpha={"head": 0.25, "expert": 0.5}, beta=0.0, start_epoch=1, interval=1, num_samples=2,
              threshold_scope="global")
    mat.bind(torch.nn.Linear(1, 1), part, ctl)
    _evaluate(mat, 0)
    before, prev = mat.active.clone(), mat.prev_lmax.clone()
    with pytest.warns(RuntimeWarning) as got:
        _evaluate(mat, 1)
    msgs = [str(w.message) for w in got]
    assert any(m.startswith("mat: the mNTK eigen-decomposition failed (linalg.eigh") for m in msgs)
    assert any(m.startswith("mat: non-finite λmax for A.0 (nan), A.1 (nan)") for m in msgs)
    assert all("\n" not in m for m in msgs)
    assert mat.history[1]["nonfinite"] == NAMES and mat.history[1]["threshold"] == {}
    assert torch.equal(mat.active, before) and torch.equal(ctl.active, before)
    assert torch.equal(mat.prev_lmax, prev) and mat.evaluations == 2
    _no_warning(_evaluate, mat, 2)  # the next finite evaluation proceeds normally
    assert mat.history[2]["threshold"] == pytest.approx({"head": 2.25, "expert": 22.5})


def test_other_engine_errors_are_not_swallowed(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(scores, "ntk_lambda_max", broken)
    part = make_partition(LAYOUT)
    mat = MAT(alpha=0.5, start_epoch=1, interval=1, num_samples=2, threshold_scope="global")
    mat.bind(torch.nn.Linear(1, 1), part, FakeController(len(part)))
    with pytest.raises(RuntimeError, match="a bug"):
        _evaluate(mat, 0)


def test_spectrum_of_a_nonfinite_gram_is_nan_and_leaves_the_others_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    grams = a @ a.transpose(1, 2)
    clean = spectrum(grams)
    bad = grams.clone()
    bad[1, 2, 2] = NAN
    bad[3, 0, 4] = INF
    got = spectrum(bad)
    ok = torch.tensor([True, False, True, False])
    for field in ("eigenvalues", "lambda_max", "lambda_min", "entropy", "effective_rank", "condition_number"):
        g, c = getattr(got, field), getattr(clean, field)
        assert torch.isnan(g[~ok]).all(), field
        assert torch.allclose(g[ok], c[ok], rtol=1e-12, atol=1e-12), field


def test_mat_on_a_diverged_tiny_bert_keeps_its_decision():
    """End to end through the real engine: a NaN weight makes every head's Gram NaN; MAT keeps its
    previous decision, and decides normally again once the weights are finite."""
    model = tiny_bert()
    part = attention_heads(model)
    ctl = attach(model, part)
    mat = build_method("mat", alpha={"head": 0.5}, beta=0.0, start_epoch=1, interval=1, num_samples=4,
                       threshold_scope="global")
    mat.bind(model, part, ctl)
    ctx = LoopContext(model=model, ntk_batch=lambda s, g: mlm_batch(s, torch.Generator().manual_seed(1)))
    _no_warning(mat.on_epoch_end, ctx)
    before, prev = mat.active.clone(), mat.prev_lmax.clone()
    assert not bool(before.all())
    weight = next(p for n, p in model.named_parameters() if n == "tok_emb.weight")
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[:, 0] = NAN
    ctx.epoch = 1
    with pytest.warns(RuntimeWarning, match=r"^mat: non-finite λmax for "):
        mat.on_epoch_end(ctx)
    assert mat.history[1]["nonfinite"] == part.names
    assert torch.equal(mat.active, before) and torch.equal(ctl.active, before)
    assert torch.equal(mat.prev_lmax, prev)
    with torch.no_grad():
        weight.copy_(saved)
    ctx.epoch = 2
    _no_warning(mat.on_epoch_end, ctx)
    assert mat.history[2]["nonfinite"] == [] and mat.history[2]["lambda_max"] == mat.history[0]["lambda_max"]
    assert torch.equal(mat.active, before)
