"""Vanilla, Rand and Multirate with a fake controller."""

from __future__ import annotations

import json

import pytest
import torch
from method_fakes import LAYOUT, FakeController, make_ctx, make_partition, run_epochs

from ntkit.errors import ConfigError
from ntkit.methods import Multirate, Rand, build_method, list_methods

MODEL = torch.nn.Linear(1, 1)


def _kind_counts(part, mask):
    out: dict[str, int] = {}
    for g, a in zip(part, mask.tolist()):
        out[g.kind] = out.get(g.kind, 0) + int(a)
    return out


def _layers_ok(part, mask):
    layers = {g.layer for g in part}
    return all(any(a for g, a in zip(part, mask.tolist()) if g.layer == lay) for lay in layers)


def test_registry_names():
    assert set(list_methods()) >= {"vanilla", "mat", "rand", "multirate", "mat_prune", "snip_struct"}
    with pytest.raises(ConfigError, match=r"^method='matt': unknown"):
        build_method("matt")


def test_vanilla_activates_everything_unpruned():
    part = make_partition(LAYOUT)
    ctl = FakeController(len(part))
    ctl.set_active(torch.zeros(len(part), dtype=torch.bool))
    pr = torch.zeros(len(part), dtype=torch.bool)
    pr[3] = True
    ctl.set_pruned(pr)
    v = build_method("vanilla")
    v.bind(MODEL, part, ctl)
    assert ctl.active.tolist() == (~pr).tolist()
    assert v.lr_scale() is None
    with pytest.raises(ConfigError, match=r"^vanilla\.alpha=0\.1: unknown field"):
        build_method("vanilla", alpha=0.1)


def test_rand_draws_half_per_kind_and_redraws_each_epoch():
    part = make_partition(LAYOUT)  # 12 heads over 3 layers, 8 experts over 2 layers
    ctl = FakeController(len(part))
    r = Rand(seed=1, protect=False)
    r.bind(MODEL, part, ctl)
    assert ctl.active.all()
    ctx = make_ctx()
    draws = []
    for epoch in range(6):
        ctx.epoch = epoch
        r.on_epoch_start(ctx)
        draws.append(ctl.active.clone())
        assert _kind_counts(part, ctl.active) == {"head": 6, "expert": 4}
        # held fixed within the epoch
        r.before_step(ctx)
        assert torch.equal(ctl.active, draws[-1])
    assert len({tuple(d.tolist()) for d in draws}) > 1  # redrawn
    assert [rec["epoch"] for rec in r.history] == list(range(6))
    json.dumps(r.history, allow_nan=False)
    # same seed → same sequence
    r2 = Rand(seed=1, protect=False)
    ctl2 = FakeController(len(part))
    r2.bind(MODEL, part, ctl2)
    for epoch in range(6):
        ctx.epoch = epoch
        r2.on_epoch_start(ctx)
        assert torch.equal(ctl2.active, draws[epoch])


def test_rand_protection_and_per_layer():
    part = make_partition({"a": ("head", 2), "b": ("head", 2), "c": ("head", 2), "d": ("head", 2)})
    ctx = make_ctx()
    saw_extra = False
    for seed in range(20):
        ctl = FakeController(len(part))
        r = Rand(seed=seed)
        r.bind(MODEL, part, ctl)
        r.on_epoch_start(ctx)
        n = int(ctl.active.sum())
        assert _layers_ok(part, ctl.active) and 4 <= n <= 7
        saw_extra |= n > 4
    assert saw_extra  # some draws left a layer empty and protection filled it
    ctl = FakeController(len(part))
    r = Rand(seed=0, per_layer=True, protect=False)
    r.bind(MODEL, part, ctl)
    r.on_epoch_start(ctx)
    assert [int(ctl.active[2 * i : 2 * i + 2].sum()) for i in range(4)] == [1, 1, 1, 1]


def test_rand_kinds_and_pruned():
    part = make_partition(LAYOUT)
    ctl = FakeController(len(part))
    pr = torch.zeros(len(part), dtype=torch.bool)
    pr[:2] = True
    ctl.set_pruned(pr)
    r = Rand(kinds=["head"], seed=0, protect=False)
    r.bind(MODEL, part, ctl)
    r.on_epoch_start(make_ctx())
    act = ctl.active
    assert not act[:2].any()
    assert _kind_counts(part, act) == {"head": 5, "expert": 8}  # 10 unpruned heads → 5; experts untouched
    with pytest.raises(ConfigError, match=r"^rand\.kinds=\[.filter.\]: expected kinds present"):
        Rand(kinds=["filter"]).bind(MODEL, part, FakeController(len(part)))
    with pytest.raises(ConfigError, match=r"^rand\.fraction=0: expected"):
        Rand(fraction=0)


def test_rand_state_round_trip():
    part = make_partition(LAYOUT)
    a = Rand(seed=5)
    ctl_a = FakeController(len(part))
    a.bind(MODEL, part, ctl_a)
    run_epochs(a, make_ctx(), range(8))
    b = Rand(seed=5)
    b.bind(MODEL, part, FakeController(len(part)))
    run_epochs(b, make_ctx(), range(4))
    state = json.loads(json.dumps(b.state_dict()))
    c = Rand(seed=123)  # the seed is overridden by the saved generator state
    ctl_c = FakeController(len(part))
    c.bind(MODEL, part, ctl_c)
    c.load_state_dict(state)
    assert ctl_c.active.tolist() == state["active"]
    run_epochs(c, make_ctx(), range(4, 8))
    assert c.history == a.history and torch.equal(ctl_c.active, ctl_a.active)


def test_multirate_schedule_and_lr_scale():
    part = make_partition(LAYOUT)
    ctl = FakeController(len(part))
    mr = Multirate(k=5, seed=3)
    mr.bind(MODEL, part, ctl)
    slow = mr.slow.clone()
    counts = _kind_counts(part, slow)  # 6 / 4 drawn, minus at most one per layer moved back to fast
    assert 3 <= counts["head"] <= 6 and 2 <= counts["expert"] <= 4
    assert _layers_ok(part, ~slow)  # protection: every layer keeps a fast module
    ctx = make_ctx()
    for step in range(12):
        ctx.step = step
        mr.before_step(ctx)
        scale = mr.lr_scale()
        if step in (4, 9):
            assert ctl.active.all()
            assert scale is not None and scale.dtype == torch.float32
            assert scale.tolist() == [5.0 if s else 1.0 for s in slow.tolist()]
        else:
            assert ctl.active.tolist() == (~slow).tolist()  # slow gradients are never computed
            assert scale is None
    # the controller is only told when the active set changes
    assert sum(1 for c in ctl.calls if c[0] == "active") == 1 + 2 * 2
    assert mr.history[0]["event"] == "multirate_split"
    assert sorted(mr.history[0]["slow"] + mr.history[0]["fast"]) == sorted(part.names)


def test_multirate_without_lr_scale_keeps_the_schedule_and_steps_slow_modules_at_eta():
    part = make_partition(LAYOUT)
    ctl, ctl_ref = FakeController(len(part)), FakeController(len(part))
    mr, ref = Multirate(k=5, seed=3, scale_lr=False), Multirate(k=5, seed=3)
    mr.bind(MODEL, part, ctl)
    ref.bind(MODEL, part, ctl_ref)
    assert torch.equal(mr.slow, ref.slow)  # the same split
    ctx = make_ctx()
    for step in range(10):
        ctx.step = step
        mr.before_step(ctx)
        ref.before_step(ctx)
        assert torch.equal(ctl.active, ctl_ref.active)  # the same active sets
        assert mr.lr_scale() is None  # step size η for every module
        assert (ref.lr_scale() is not None) == (step in (4, 9))


def test_multirate_split_half_per_kind_without_protection_and_round_trip():
    part = make_partition(LAYOUT)
    mr = build_method("multirate", seed=11, protect=False)
    mr.bind(MODEL, part, FakeController(len(part)))
    assert _kind_counts(part, mr.slow) == {"head": 6, "expert": 4}
    state = json.loads(json.dumps(mr.state_dict()))
    mr2 = build_method("multirate", seed=0, protect=False)
    mr2.load_state_dict(state)
    ctl2 = FakeController(len(part))
    mr2.bind(MODEL, part, ctl2)
    assert torch.equal(mr2.slow, mr.slow) and mr2.history == mr.history
    ctx = make_ctx()
    ctx.step = 3
    mr2.before_step(ctx)
    assert ctl2.active.tolist() == (~mr.slow).tolist()
    with pytest.raises(ConfigError, match=r"^multirate\.k=0: expected an integer >= 1"):
        Multirate(k=0)
    with pytest.raises(ConfigError, match=r"^multirate\.slow_fraction=1\.5"):
        Multirate(slow_fraction=1.5)
