"""MAT's readings as options: threshold scope (global / per layer) and probe set (fresh / fixed)."""

from __future__ import annotations

import json

import pytest
import torch
from method_fakes import FakeController, ScriptedLambda, make_ctx, make_partition, run_epochs

from ntkit.errors import ConfigError
from ntkit.methods import MAT, MATConfig, build_method, scores

# heads in three layers on very different scales (as across VGG / post-LN depth), experts in one
LAYOUT = {"A": ("head", 3), "B": ("head", 2), "D": ("head", 3), "C": ("expert", 3)}
NAMES = ["A.0", "A.1", "A.2", "B.0", "B.1", "D.0", "D.1", "D.2", "C.0", "C.1", "C.2"]
TABLE = dict(zip(NAMES, [100, 500, 900, 2, 3, 1, 4, 10, 10, 20, 40]))


def _decide(monkeypatch, scope: str, protect: bool) -> MAT:
    monkeypatch.setattr(scores, "ntk_lambda_max", ScriptedLambda([TABLE]))
    part = make_partition(LAYOUT)
    mat = MAT(
        alpha={"head": 0.25, "expert": 0.5},
        beta=0.0,
        start_epoch=1,
        interval=1,
        num_samples=4,
        threshold_scope=scope,
        protect=protect,
    )
    mat.bind(torch.nn.Linear(1, 1), part, FakeController(len(part)))
    run_epochs(mat, make_ctx(), range(1))
    return mat


def test_global_threshold_spans_all_layers_of_a_kind(monkeypatch):
    """heads: λ_α = 1 + (900 − 1)·0.25 = 225.75 → only A.1, A.2 pass; experts: 10 + 30·0.5 = 25 → C.2."""
    mat = _decide(monkeypatch, "global", protect=False)
    assert mat.history[0]["threshold"] == pytest.approx({"head": 225.75, "expert": 25.0})
    assert mat.history[0]["active"] == ["A.1", "A.2", "C.2"]
    # with protection each of B, D gets its largest module only
    mat = _decide(monkeypatch, "global", protect=True)
    assert mat.history[0]["active"] == ["A.1", "A.2", "B.1", "D.2", "C.2"]


def test_layer_threshold_per_kind_and_layer(monkeypatch):
    """A: 100 + 800·0.25 = 300 → A.1, A.2; B: 2 + 0.25 = 2.25 → B.1; D: 1 + 9·0.25 = 3.25 → D.1, D.2;
    C: 25 → C.2 (one expert layer: the same as global)."""
    mat = _decide(monkeypatch, "layer", protect=False)
    assert mat.history[0]["threshold"] == pytest.approx(
        {"head/A": 300.0, "head/B": 2.25, "head/D": 3.25, "expert/C": 25.0}
    )
    assert mat.history[0]["active"] == ["A.1", "A.2", "B.1", "D.1", "D.2", "C.2"]
    assert mat.history[0]["num_active"] == {"head": 5, "expert": 1}


def _run(draws: list, probes: str, epochs: range, mat: MAT | None = None, seed: int = 3) -> MAT:
    if mat is None:
        part = make_partition(LAYOUT)
        mat = MAT(alpha=0.3, beta=0.0, start_epoch=1, interval=1, num_samples=5, probes=probes, seed=seed)
        mat.bind(torch.nn.Linear(1, 1), part, FakeController(len(part)))
    run_epochs(mat, make_ctx(draws), epochs)
    return mat


def test_fixed_probes_reuse_the_first_draw_and_fresh_ones_do_not(monkeypatch):
    monkeypatch.setattr(scores, "ntk_lambda_max", ScriptedLambda())
    fixed: list = []
    _run(fixed, "fixed", range(4))
    assert len(fixed) == 4 and all(d == fixed[0] for d in fixed)
    fresh: list = []
    _run(fresh, "fresh", range(4))
    assert fresh[0] == fixed[0]  # the first draw is the same generator state either way
    assert len({tuple(d) for d in fresh}) == 4


def test_fixed_probes_survive_state_dict_and_resume(monkeypatch):
    monkeypatch.setattr(scores, "ntk_lambda_max", ScriptedLambda())
    whole: list = []
    a = _run(whole, "fixed", range(6))
    first: list = []
    b = _run(first, "fixed", range(3))
    state = json.loads(json.dumps(b.state_dict(), allow_nan=False))
    assert state["probe_state"] is not None
    c = build_method(
        "mat", alpha=0.3, beta=0.0, start_epoch=1, interval=1, num_samples=5, probes="fixed", seed=3
    )
    part = make_partition(LAYOUT)
    c.load_state_dict(state)
    c.bind(torch.nn.Linear(1, 1), part, FakeController(len(part)))
    rest: list = []
    _run(rest, "fixed", range(3, 6), mat=c)
    assert first + rest == whole and all(d == whole[0] for d in rest)
    assert c.history == a.history


def test_reading_options_validate():
    with pytest.raises(ConfigError, match=r"^threshold_scope='layers': expected 'global' or 'layer'"):
        MATConfig(threshold_scope="layers")
    with pytest.raises(ConfigError, match=r"^probes='once': expected 'fresh' or 'fixed'"):
        MATConfig(probes="once")
