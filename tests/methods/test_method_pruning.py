"""snip_scores against finite differences; SnipStruct and MATPrune with a fake controller."""

from __future__ import annotations

import json

import pytest
import torch
from method_fakes import FakeController, ScriptedLambda, make_ctx, make_partition, run_epochs
from torch import nn

from ntkit.errors import ConfigError
from ntkit.methods import MATPrune, SnipStruct, build_method, scores, snip_scores
from ntkit.partition import Partition


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _neuron_partition() -> Partition:
    """4 hidden neurons as 'heads' in two layers of 2 (rows of fc1 + bias, columns of fc2)."""
    spec = {f"n{i}": [("fc1.weight", 0, [i]), ("fc1.bias", 0, [i]), ("fc2.weight", 1, [i])] for i in range(4)}
    layers = {"n0": "L0", "n1": "L0", "n2": "L1", "n3": "L1"}
    return Partition.from_slices(spec, kind="head", layer=layers)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (5,), generator=g)
    return x, y


def test_snip_scores_match_finite_differences():
    model = TwoLayer().double()
    part = _neuron_partition().bind(model)
    x, y = _data()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    calls = iter(range(100))

    def loss_fn(m):
        xb, yb = batches[next(calls) % 2]
        return nn.functional.cross_entropy(m(xb), yb)

    got = snip_scores(model, part, loss_fn, num_batches=2)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched

    def mean_loss():
        with torch.no_grad():
            return sum(float(nn.functional.cross_entropy(model(xb), yb)) for xb, yb in batches) / 2

    params = dict(model.named_parameters())
    eps = 1e-6
    want = torch.zeros(4, dtype=torch.float64)
    for gi, group in enumerate(part):
        for s in group.slices:
            p = params[s.param]
            view = s.select(p.data)
            for idx in torch.cartesian_prod(*[torch.arange(n) for n in view.shape]).reshape(-1, view.dim()):
                i = tuple(idx.tolist())
                old = float(view[i])
                view[i] = old + eps
                up = mean_loss()
                view[i] = old - eps
                down = mean_loss()
                view[i] = old
                want[gi] += abs(old * (up - down) / (2 * eps))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)


def test_snip_struct_prunes_lowest_with_protection_at_step_zero():
    model = TwoLayer().double()
    part = _neuron_partition().bind(model)
    x, y = _data()
    loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)
    sc = snip_scores(model, part, loss_fn)
    ctl = FakeController(len(part))
    method = build_method("snip_struct", fraction=0.75)
    method.bind(model, part, ctl)
    ctx = make_ctx()
    ctx.model = model
    ctx.loss_fn = lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])
    ctx.sample_batch = lambda n, gen: (x, y)
    entered = []

    class Book:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            pass

    ctx.count_overhead = Book
    method.at_init(ctx)
    # 3 of 4 requested, but each layer keeps one → only 2 pruned: the lowest of each layer
    expect = torch.zeros(4, dtype=torch.bool)
    for lo, hi in ((0, 2), (2, 4)):
        expect[lo + int(torch.argmin(sc[lo:hi]))] = True
    assert ctl.pruned.tolist() == expect.tolist()
    assert ctl.active.tolist() == (~expect).tolist()
    assert entered == [True]
    rec = method.history[0]
    assert rec["criterion"] == "snip" and rec["scores"] == pytest.approx(dict(zip(part.names, sc.tolist())))
    json.dumps(method.history, allow_nan=False)
    n_calls = len(ctl.calls)
    ctx.step = 1
    method.at_init(ctx)  # once only
    assert len(ctl.calls) == n_calls
    # resume: pruned set restored on the new controller, no re-scoring
    st = json.loads(json.dumps(method.state_dict()))
    again = SnipStruct(fraction=0.75)
    ctl2 = FakeController(len(part))
    again.load_state_dict(st)
    again.bind(model, part, ctl2)
    again.before_step(ctx)
    assert ctl2.pruned.tolist() == expect.tolist() and again.history == method.history


def test_snip_struct_errors():
    model = TwoLayer()
    part = _neuron_partition().bind(model)
    m = SnipStruct()
    m.bind(model, part, FakeController(4))
    with pytest.raises(ConfigError, match=r"^snip_struct: the loop context has no loss_fn"):
        m.at_init(make_ctx())
    with pytest.raises(ConfigError, match=r"^snip_struct\.fraction=1\.0: expected a number in \[0, 1\)"):
        SnipStruct(fraction=1.0)
    with pytest.raises(ConfigError, match=r"^kind='filter'"):
        SnipStruct(kind="filter").bind(model, part, FakeController(4))


LAYOUT = {"A": ("head", 4), "B": ("head", 4)}
NAMES = [f"A.{i}" for i in range(4)] + [f"B.{i}" for i in range(4)]


def test_mat_prune_prunes_by_lambda_then_runs_mat(monkeypatch):
    table = dict(zip(NAMES, [1.0, 2.0, 3.0, 4.0, 0.1, 0.2, 0.3, 10.0]))
    stub = ScriptedLambda([table, table, table])
    monkeypatch.setattr(scores, "ntk_lambda_max", stub)
    part = make_partition(LAYOUT)
    ctl = FakeController(len(part))
    m = MATPrune(prune_epoch=2, start_epoch=2, interval=2, num_samples=2, threshold_scope="global")
    assert m.config.alpha == {"head": 0.2} and m.config.prune_fraction == 0.5
    m.bind(torch.nn.Linear(1, 1), part, ctl)
    run_epochs(m, make_ctx(), range(4))
    # epoch 1 (prune + MAT due): ONE measurement; 4 lowest of 8: B.0, B.1, B.2, A.0
    assert len(stub.calls) == 2 and stub.calls[0] == NAMES
    prune_rec, mat_rec = m.history[0], m.history[1]
    assert prune_rec["event"] == "prune" and prune_rec["pruned"] == ["A.0", "B.0", "B.1", "B.2"]
    assert ctl.pruned.tolist() == [True, False, False, False, True, True, True, False]
    # MAT on the rest: {2, 3, 4, 10} → λ_α = 2 + 8·0.2 = 3.6 → A.3, B.3
    assert mat_rec["threshold"] == pytest.approx({"head": 3.6})
    assert mat_rec["active"] == ["A.3", "B.3"]
    assert set(mat_rec["lambda_max"]) == {"A.1", "A.2", "A.3", "B.3"}
    # epoch 3: MAT only, pruned modules never measured again
    assert stub.calls[1] == ["A.1", "A.2", "A.3", "B.3"]
    assert not (ctl.active & ctl.pruned).any()
    # resume restores the pruned set on a fresh controller
    st = json.loads(json.dumps(m.state_dict(), allow_nan=False))
    m2 = build_method("mat_prune", prune_epoch=2, start_epoch=2, interval=2, num_samples=2)
    m2.load_state_dict(st)
    ctl2 = FakeController(len(part))
    m2.bind(torch.nn.Linear(1, 1), part, ctl2)
    assert torch.equal(ctl2.pruned, ctl.pruned) and torch.equal(ctl2.active, ctl.active)
    assert m2.pruned_done


def test_mat_prune_protection_keeps_one_per_layer(monkeypatch):
    table = dict(zip(NAMES, [0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0]))
    monkeypatch.setattr(scores, "ntk_lambda_max", ScriptedLambda([table]))
    part = make_partition(LAYOUT)
    ctl = FakeController(len(part))
    m = MATPrune(prune_epoch=1, prune_fraction=0.5, start_epoch=10, interval=1, num_samples=2)
    m.bind(torch.nn.Linear(1, 1), part, ctl)
    run_epochs(m, make_ctx(), range(1))
    assert ctl.pruned.tolist() == [True, True, True, False, True, False, False, False]
    # before MAT starts, every unpruned module stays active
    assert ctl.active.tolist() == [not p for p in ctl.pruned.tolist()]
    with pytest.raises(ConfigError, match=r"^mat_prune\.prune_fraction=1\.0"):
        MATPrune(prune_fraction=1.0)
