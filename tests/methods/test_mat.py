"""MAT on scripted λmax sequences with a fake controller (the engine is replaced by a stub)."""

from __future__ import annotations

import json

import pytest
import torch
from method_fakes import FakeController, ScriptedLambda, make_ctx, make_partition, run_epochs

from ntkit.errors import ConfigError
from ntkit.methods import MAT, MATConfig, build_method, scores

SMALL = {"A": ("head", 3), "B": ("head", 2), "C": ("expert", 3)}
NAMES = ["A.0", "A.1", "A.2", "B.0", "B.1", "C.0", "C.1", "C.2"]


def _table(*vals: float) -> dict[str, float]:
    return dict(zip(NAMES, vals))


SCRIPT = [
    _table(1, 5, 9, 2, 3, 10, 20, 40),
    _table(2, 7, 9.5, 2, 4, 12, 20, 45),
    _table(2.0005, 7.5, 9.5, 2, 4.5, 12.001, 20, 45),
    _table(100, 8, 100, 2, 5, 12.001, 20, 45),
]
# hand-computed (see the comments in test_mat_hand_computed_decisions)
EXPECTED_ACTIVE = [
    [0, 1, 1, 0, 1, 0, 0, 1],
    [0, 1, 1, 0, 1, 0, 0, 1],
    [0, 1, 0, 0, 1, 0, 0, 1],
    [0, 1, 0, 0, 1, 0, 0, 1],
]


def test_mat_hand_computed_decisions(monkeypatch):
    """Heads α = 0.25, experts α = 0.5, β = 1e-3.

    eval 1: heads λ_α = 1 + 8·0.25 = 3 → A.1, A.2 on; layer B has none above 3 → protection
      switches on B.1 (largest); experts λ_α = 10 + 30·0.5 = 25 → C.2.
    eval 2: Δ_1 set (never tested); heads λ_α = 3.875 → A.1, A.2, B.1 (4 > 3.875); experts 28.5 → C.2.
    eval 3: Δ_t/Δ_1: A.0 5e-4, A.2 0/0.5, B.0 0/0, C.0 5e-4, C.1 0/0, C.2 0/5 → retired (< 1e-3);
      A.2 passes the threshold but is retired → off; layer C is all retired → protection revives
      its largest (C.2).
    eval 4: A.0, A.2 jump to 100 but stay retired; A.1 → 8, B.1 → 5 (ratios .25, .5: not retired);
      λ_α = 2 + 98·0.25 = 26.5 → nothing passes →
      protection picks the largest *non-retired* per layer: A.1, B.1; C.2 again.
    """
    stub = ScriptedLambda(SCRIPT)
    monkeypatch.setattr(scores, "ntk_lambda_max", stub)
    part = make_partition(SMALL)
    ctl = FakeController(len(part))
    mat = MAT(alpha={"head": 0.25, "expert": 0.5}, beta=1e-3, start_epoch=2, interval=3, num_samples=4,
              threshold_scope="global")  # λ_α over each kind's modules in all layers (the hand computation)
    mat.bind(torch.nn.Linear(1, 1), part, ctl)
    ctx = make_ctx()
    log: list = []
    run_epochs(mat, ctx, range(11), log, ctl)
    # before the first evaluation (end of epoch 1) everything is active
    assert all(all(a) for a in log[:4])
    assert [r["epoch"] for r in mat.history] == [1, 4, 7, 10]  # epoch+1 ∈ {2, 5, 8, 11}
    for rec, exp in zip(mat.history, EXPECTED_ACTIVE):
        assert rec["active"] == [n for n, e in zip(NAMES, exp) if e]
    assert mat.history[0]["threshold"] == pytest.approx({"head": 3.0, "expert": 25.0})
    assert mat.history[1]["threshold"] == pytest.approx({"head": 3.875, "expert": 28.5})
    assert mat.history[3]["threshold"]["head"] == pytest.approx(26.5)
    assert mat.history[2]["retired"] == ["A.0", "A.2", "B.0", "C.0", "C.1", "C.2"]
    assert mat.history[0]["retired"] == mat.history[1]["retired"] == mat.history[3]["retired"] == []
    assert mat.retired.tolist() == [True, False, True, True, False, True, True, True]
    assert mat.history[0]["num_active"] == {"head": 3, "expert": 1}
    # the decision reached the controller and held between evaluations
    assert ctl.active.tolist() == [bool(x) for x in EXPECTED_ACTIVE[3]]
    assert log[4] == [bool(x) for x in EXPECTED_ACTIVE[0]]
    json.dumps(mat.history, allow_nan=False)


def test_mat_alpha_per_kind_and_ungoverned_kinds(monkeypatch):
    stub = ScriptedLambda([_table(1, 5, 9, 2, 3, 10, 20, 40)])
    monkeypatch.setattr(scores, "ntk_lambda_max", stub)
    part = make_partition(SMALL)
    ctl = FakeController(len(part))
    mat = MAT(alpha={"head": 0.0}, start_epoch=1, interval=1, num_samples=2, protect=False, threshold_scope="global")
    mat.bind(torch.nn.Linear(1, 1), part, ctl)
    ctx = make_ctx()
    mat.on_epoch_end(ctx)
    # only heads are measured; experts are not governed → always active; α = 0 drops only the min
    assert stub.calls == [NAMES[:5]]
    assert ctl.active.tolist() == [False, True, True, True, True, True, True, True]
    # without protection, a layer may end with no active module
    stub2 = ScriptedLambda([_table(1, 5, 9, 2, 3, 10, 20, 40)])
    monkeypatch.setattr(scores, "ntk_lambda_max", stub2)
    mat2 = MAT(alpha=0.5, start_epoch=1, interval=1, num_samples=2, protect=False, threshold_scope="global")
    ctl2 = FakeController(len(part))
    mat2.bind(torch.nn.Linear(1, 1), part, ctl2)
    mat2.on_epoch_end(ctx)
    # heads λ_α = 5 → only A.2; experts λ_α = 25 → C.2
    assert ctl2.active.tolist() == [False, False, True, False, False, False, False, True]


def test_mat_skips_pruned_modules(monkeypatch):
    stub = ScriptedLambda([_table(1, 5, 9, 2, 3, 10, 20, 40)])
    monkeypatch.setattr(scores, "ntk_lambda_max", stub)
    part = make_partition(SMALL)
    ctl = FakeController(len(part))
    ctl.set_pruned([False, False, True, False, False, False, False, False])
    mat = MAT(alpha={"head": 0.25, "expert": 0.5}, start_epoch=1, interval=1, num_samples=2)
    mat.bind(torch.nn.Linear(1, 1), part, ctl)
    assert ctl.calls[-1] == ("active", [True, True, False, True, True, True, True, True])
    mat.on_epoch_end(make_ctx())
    assert "A.2" not in stub.calls[0]
    # heads without A.2: min 1, max 5 → λ_α = 2 → A.1, B.1 (3)
    assert mat.history[0]["active"] == ["A.1", "B.1", "C.2"]
    assert not ctl.active[2]


def test_mat_measures_with_everything_active(monkeypatch):
    part = make_partition(SMALL)
    ctl = FakeController(len(part))
    seen = []

    def spy(model, inputs, partition, output_mask=None, controller=None):
        seen.append(ctl.active.tolist())
        return torch.arange(len(partition), dtype=torch.float64)

    monkeypatch.setattr(scores, "ntk_lambda_max", spy)
    mat = MAT(alpha=0.5, start_epoch=1, interval=1, num_samples=2)
    mat.bind(torch.nn.Linear(1, 1), part, ctl)
    ctx = make_ctx()
    mat.on_epoch_end(ctx)
    after_first = ctl.active.tolist()
    assert not all(after_first)
    ctx.epoch = 1
    mat.on_epoch_end(ctx)
    assert seen[1] == [True] * len(part)  # the engine never sees a partial backward
    assert ctl.active.tolist() == mat.active.tolist()


def test_mat_overhead_context_wraps_the_measurement(monkeypatch):
    part = make_partition(SMALL)
    inside = []
    depth = [0]

    class Book:
        def __enter__(self):
            depth[0] += 1

        def __exit__(self, *exc):
            depth[0] -= 1

    def spy(model, inputs, partition, output_mask=None, controller=None):
        inside.append(depth[0])
        return torch.arange(len(partition), dtype=torch.float64)

    monkeypatch.setattr(scores, "ntk_lambda_max", spy)
    mat = MAT(alpha=0.5, start_epoch=1, interval=1, num_samples=2)
    mat.bind(torch.nn.Linear(1, 1), part, FakeController(len(part)))
    ctx = make_ctx()
    ctx.count_overhead = Book
    mat.on_epoch_end(ctx)
    assert inside == [1] and depth[0] == 0


def test_mat_state_round_trip_is_exact(monkeypatch):
    monkeypatch.setattr(scores, "ntk_lambda_max", ScriptedLambda())
    part = make_partition(SMALL)
    kw = {
        "alpha": {"head": 0.3, "expert": 0.4},
        "beta": 0.3,
        "start_epoch": 1,
        "interval": 1,
        "num_samples": 3,
        "seed": 7,
    }

    draws_a: list = []
    a = build_method("mat", **kw)
    ctl_a = FakeController(len(part))
    a.bind(torch.nn.Linear(1, 1), part, ctl_a)
    run_epochs(a, make_ctx(draws_a), range(12))

    draws_b: list = []
    b = build_method("mat", **kw)
    b.bind(torch.nn.Linear(1, 1), part, FakeController(len(part)))
    ctx_b = make_ctx(draws_b)
    run_epochs(b, ctx_b, range(6))
    state = json.loads(json.dumps(b.state_dict(), allow_nan=False))  # JSON-able

    c = build_method("mat", **kw)
    ctl_c = FakeController(len(part))
    c.load_state_dict(state)  # before bind …
    c.bind(torch.nn.Linear(1, 1), part, ctl_c)
    run_epochs(c, make_ctx(draws_b), range(6, 12))
    assert draws_b == draws_a
    assert c.history == a.history
    assert ctl_c.active.tolist() == ctl_a.active.tolist()
    assert any(r["retired"] for r in a.history)  # the scenario exercises the temporal state

    d = build_method("mat", **kw)  # … and after bind
    ctl_d = FakeController(len(part))
    d.bind(torch.nn.Linear(1, 1), part, ctl_d)
    d.load_state_dict(state)
    assert ctl_d.active.tolist() == state["active"]
    run_epochs(d, make_ctx(), range(6, 12))
    assert d.history == a.history


def test_mat_config_validation():
    with pytest.raises(ConfigError, match=r"^alpha=\{'head': 1\.2\}: expected"):
        MATConfig(alpha={"head": 1.2})
    with pytest.raises(ConfigError, match=r"^beta=-1\.0: expected"):
        MATConfig(beta=-1.0)
    with pytest.raises(ConfigError, match=r"^num_samples=1: expected an integer >= 2"):
        MATConfig(num_samples=1)
    with pytest.raises(ConfigError, match=r"^interval=0"):
        MATConfig(interval=0)
    with pytest.raises(ConfigError, match=r"^start_epoch=0"):
        MATConfig(start_epoch=0)
    with pytest.raises(ConfigError, match=r"^protect='yes'"):
        MATConfig(protect="yes")
    with pytest.raises(ConfigError, match=r"^mat\.alfa=0\.1: unknown field"):
        build_method("mat", alfa=0.1)
    with pytest.raises(ConfigError, match="no key matches the partition kinds"):
        MAT(alpha={"filter": 0.2}).bind(torch.nn.Linear(1, 1), make_partition(SMALL), None)
    cfg = MATConfig()
    assert cfg.alpha == {"head": 0.1, "expert": 0.2, "filter": 0.2} and cfg.num_samples == 64
    assert MAT(cfg).config is cfg and MAT({"beta": 0.0}).config.beta == 0.0


def test_mat_due_schedule():
    mat = MAT(start_epoch=5, interval=8)
    assert [e for e in range(30) if mat.due(e)] == [4, 12, 20, 28]
