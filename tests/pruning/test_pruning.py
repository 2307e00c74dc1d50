"""Scorers against hand-computed values, schedules, and the Pruner (protection, exact counts, refusal)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ntkit.errors import ConfigError
from ntkit.partition import Partition
from ntkit.pruning import (
    Iterative,
    LambdaMax,
    Linear,
    Magnitude,
    OneShot,
    Pruner,
    RandomScore,
    ScoreData,
    Snip,
    get_scorer,
)
from ntkit.sparse import attach


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _model() -> TwoLayer:
    m = TwoLayer().double()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0], [-3.0, 1.0], [0.0, 0.25]]))
        m.fc1.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        m.fc2.weight.copy_(torch.tensor([[2.0, -1.0, 0.5, 4.0]]))
        m.fc2.bias.zero_()
    return m


def _partition(model: nn.Module) -> Partition:
    """Hidden neuron i = row i of fc1 (+ bias) and column i of fc2; layers L0 = {0, 1}, L1 = {2, 3}."""
    spec = {f"n{i}": [("fc1.weight", 0, [i]), ("fc1.bias", 0, [i]), ("fc2.weight", 1, [i])] for i in range(4)}
    layers = {"n0": "L0", "n1": "L0", "n2": "L1", "n3": "L1"}
    return Partition.from_slices(spec, kind="neuron", layer=layers).bind(model)


def test_magnitude_and_random_scores_by_hand():
    model = _model()
    part = _partition(model)
    l1 = Magnitude(1)(model, part)
    assert l1.dtype == torch.float64
    assert l1.tolist() == [1 + 2 + 0 + 2, 0.5 + 0 + 1 + 1, 3 + 1 + 1 + 0.5, 0 + 0.25 + 0.5 + 4]
    l2 = get_scorer("l2")(model, part)
    want = [math.sqrt(1 + 4 + 0 + 4), math.sqrt(0.25 + 0 + 1 + 1), math.sqrt(9 + 1 + 1 + 0.25),
            math.sqrt(0 + 0.0625 + 0.25 + 16)]
    assert torch.allclose(l2, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)
    r = RandomScore(seed=5)(model, part)
    assert torch.equal(r, torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    assert torch.equal(r, RandomScore(seed=5)(model, part)) and not torch.equal(r, RandomScore(seed=6)(model, part))
    with pytest.raises(ConfigError, match=r"^p=3: expected 1 or 2"):
        Magnitude(3)
    with pytest.raises(ConfigError, match=r"^criterion='l3'"):
        get_scorer("l3")


def test_snip_score_by_hand():
    """Linear network y = w2ᵀ(W1 x + b1), L = y: ∂L/∂W1[i] = w2[i]·x, ∂L/∂b1[i] = w2[i], ∂L/∂w2[i] = h[i]."""
    model = _model()
    part = _partition(model)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    got = Snip()(model, part, ScoreData(loss_fn=lambda m: m(x).sum()))
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()[0]
    h = (w1 @ x[0] + b1)
    want = [float((w1[i] * w2[i] * x[0]).abs().sum() + (b1[i] * w2[i]).abs() + (w2[i] * h[i]).abs()) for i in range(4)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match=r"^data\.loss_fn=None"):
        Snip()(model, part, ScoreData())


def test_lambda_max_score_is_the_mntk_eigenvalue_by_hand():
    """Neuron i's mNTK on S samples with scalar output y: J rows = [w2[i]·xₛ, w2[i], hₛ[i]], Θ = J Jᵀ."""
    model = _model()
    part = _partition(model)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]], dtype=torch.float64)
    got = LambdaMax()(model, part, ScoreData(inputs=x))
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()[0]
    h = x @ w1.T + b1
    for i in range(4):
        jac = torch.cat([w2[i] * x, w2[i].expand(3, 1), h[:, i : i + 1]], dim=1)
        want = torch.linalg.eigvalsh(jac @ jac.T).max()
        assert abs(float(got[i]) - float(want)) <= 1e-10 * max(1.0, float(want))


def test_schedules():
    s = OneShot(t=3, r=0.5)
    assert [s.ratio_at(e) for e in range(5)] == [0, 0, 0, 0.5, 0.5] and [s.due(e) for e in (2, 3, 4)] == [0, 1, 0]
    lin = Linear(t0=2, r_final=0.6, steps=3)
    assert [round(lin.ratio_at(e), 12) for e in range(7)] == [0, 0, 0.2, 0.4, 0.6, 0.6, 0.6]
    assert [e for e in range(10) if lin.due(e)] == [2, 3, 4]
    lin2 = Linear(t0=0, r_final=0.5, steps=2, every=3)
    assert [e for e in range(10) if lin2.due(e)] == [0, 3] and lin2.ratio_at(2) == 0.25
    it = Iterative(p=0.2, rounds=3, every=2, rewind_epoch=0)
    assert it.t0 == 1 and [e for e in range(10) if it.due(e)] == [1, 3, 5]
    assert it.rewind_due(3) and not it.rewind_due(4)
    assert it.ratio_at(0) == 0 and it.ratio_at(4) == pytest.approx(1 - 0.8**2) and it.final_ratio == pytest.approx(0.488)
    with pytest.raises(ConfigError, match=r"^r=1\.0: expected a number in \[0, 1\)"):
        OneShot(t=0, r=1.0)
    with pytest.raises(ConfigError, match=r"^steps=0: expected an integer >= 1"):
        Linear(t0=0, r_final=0.5, steps=0)
    with pytest.raises(ConfigError, match=r"^rewind_epoch=1: expected an integer in \[-1, t0=1\)"):
        Iterative(p=0.2, rounds=2, every=2, rewind_epoch=1)
    with pytest.raises(ConfigError, match=r"^epoch=-1"):
        s.ratio_at(-1)


def _layered(n_layers: int, per_layer: int) -> Partition:
    model = nn.Linear(2, n_layers * per_layer)
    spec = {f"m{i}": [("weight", 0, [i])] for i in range(n_layers * per_layer)}
    layers = {f"m{i}": f"L{i // per_layer}" for i in range(n_layers * per_layer)}
    return Partition.from_slices(spec, kind="head", layer=layers).bind(model), model


def test_pruner_counts_protection_and_controller():
    part, model = _layered(3, 3)
    ctl = attach(model, part)
    # layer L0 has the three lowest scores: protection keeps its best one
    scores = torch.tensor([0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 1.0, 8.0, 9.0], dtype=torch.float64)
    res = Pruner("l1", kind="head").apply(scores, part, ctl, count=4)
    assert res.new.tolist() == [True, True, False, True, False, False, True, False, False]
    assert int(res.new.sum()) == 4 and torch.equal(ctl.pruned, res.pruned)
    assert not (ctl.active & ctl.pruned).any()  # pruned modules are inactive
    rec = res.record
    assert rec["event"] == "prune" and rec["criterion"] == "l1" and rec["pruned"] == ["m0", "m1", "m3", "m6"]
    assert set(rec["scores"]) == set(part.names)
    json.dumps(rec, allow_nan=False)
    # second step: only unpruned modules compete; never empties a layer (asks for more than possible)
    res2 = Pruner("l1", kind="head").apply(scores, part, ctl, count=5)
    assert set(res2.record["scores"]) == {"m2", "m4", "m5", "m7", "m8"}
    for layer in range(3):
        assert not ctl.pruned[layer * 3 : layer * 3 + 3].all()
    assert int(ctl.pruned.sum()) == 6  # 3 layers × 3 − 1 kept per layer
    # per-layer scope: the count applies in each layer
    res3 = Pruner("l1", scope="layer").select(scores, part, count=1)
    assert res3.tolist() == [True, False, False, True, False, False, True, False, False]
    # without protection a layer may be emptied
    res4 = Pruner("l1", protect=False).select(scores, part, count=3)
    assert res4.tolist()[:3] == [True, True, True]
    with pytest.raises(ConfigError, match=r"^count=10: expected an integer in \[0, 9\]"):
        Pruner("l1").select(scores, part, count=10)
    with pytest.raises(ConfigError, match=r"^scope='all'"):
        Pruner("l1", scope="all")


def test_pruner_refuses_non_finite_scores():
    part, model = _layered(2, 2)
    ctl = attach(model, part)
    ctl.set_pruned(torch.tensor([True, False, False, False]))
    before = ctl.pruned
    # NaN on an already pruned module is ignored; on an eligible one it refuses the step
    ok = Pruner("l1").apply(torch.tensor([float("nan"), 1.0, 2.0, 3.0]), part, ctl, count=1)
    assert ok.record is not None and ok.record["pruned"] == ["m2"]
    before = ctl.pruned
    for bad in (float("nan"), float("inf")):
        with pytest.warns(RuntimeWarning, match=r"non-finite l1 score for m3"):
            res = Pruner("l1").apply(torch.tensor([0.0, 1.0, 2.0, bad]), part, ctl, count=1)
        assert res.record is None and res.refused == ["m3"] and not res.new.any()
        assert torch.equal(ctl.pruned, before)


def test_pruner_scores_model_end_to_end():
    model = _model()
    part = _partition(model)
    ctl = attach(model, part)
    res = Pruner(Magnitude(1), kind="neuron")(model, part, controller=ctl, fraction=0.5)
    # L1 scores [5, 2.5, 5.5, 4.75]: the lowest of each layer goes
    assert res.record["pruned"] == ["n1", "n3"] and ctl.pruned.tolist() == [False, True, False, True]
