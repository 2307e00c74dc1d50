"""The pure decision rules on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from ntkit.errors import ConfigError
from ntkit.methods.policies import (
    layer_index,
    modular_policy,
    protect,
    prune_lowest,
    random_subset,
    temporal_policy,
)

F64 = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64)


def b(*xs: int) -> torch.Tensor:
    return torch.tensor([bool(x) for x in xs])


# ---------------------------------------------------------------- modular policy
@pytest.mark.parametrize(
    "alpha, threshold, active",
    [
        (0.1, 2.0, (0, 0, 1, 1)),  # 1 + (11 - 1)·0.1 = 2; 2 > 2 is False (Eq. 5: λ = λ_α is inactive)
        (0.0, 1.0, (0, 1, 1, 1)),
        (0.25, 3.5, (0, 0, 0, 1)),
        (1.0, 11.0, (0, 0, 0, 0)),
    ],
)
def test_modular_policy_threshold(alpha, threshold, active):
    act, thr = modular_policy(t(1.0, 2.0, 3.0, 11.0), alpha)
    assert thr == pytest.approx(threshold)
    assert act.tolist() == [bool(a) for a in active]


def test_modular_policy_is_order_free_and_all_equal_gives_none():
    act, thr = modular_policy(t(11.0, 3.0, 1.0, 2.0), 0.1)
    assert thr == pytest.approx(2.0) and act.tolist() == [True, True, False, False]
    act, thr = modular_policy(t(4.0, 4.0, 4.0), 0.5)
    assert thr == 4.0 and not act.any()


def test_modular_policy_rejects_bad_alpha():
    with pytest.raises(ConfigError, match=r"^alpha=1\.5: expected"):
        modular_policy(t(1.0, 2.0), 1.5)


# ---------------------------------------------------------------- temporal policy
def _run_temporal(seq: list[list[float]], beta: float):
    m = len(seq[0])
    prev = torch.full((m,), math.nan, dtype=F64)
    d1 = prev.clone()
    retired = torch.zeros(m, dtype=torch.bool)
    steps = []
    for lam in seq:
        lam_t = t(*lam)
        st = temporal_policy(lam_t, prev, d1, beta)
        retired |= st.retire
        prev, d1 = torch.where(torch.isnan(lam_t), prev, lam_t), st.delta1
        steps.append((st, retired.clone()))
    return steps


def test_temporal_policy_hand_computed():
    # module 0: Δ1 = 2, Δ2 = 0.001 → 5e-4 < 1e-3 → retire at the 3rd evaluation
    # module 1: Δ1 = 2, Δ2 = 1 → 0.5 → stays
    # module 2: never moves: Δ1 = 0, Δ2 = 0 → 0/0 read as 0 → retire
    # module 3: Δ1 = 0, Δ2 = 1 → +inf → stays
    # module 4: Δ1 = 4, Δ2 = 2⁻⁸ → ratio exactly β = 2⁻¹⁰ → not < β → stays; Δ3 = 0 → retire at the 4th
    seq = [
        [10.0, 10.0, 5.0, 5.0, 1.0],
        [12.0, 12.0, 5.0, 5.0, 5.0],
        [12.001, 13.0, 5.0, 6.0, 5.00390625],
        [12.001, 14.0, 5.0, 6.5, 5.00390625],
    ]
    steps = _run_temporal(seq, 2.0**-10)
    (s1, r1), (s2, r2), (s3, r3), (_, r4) = steps
    assert torch.isnan(s1.delta).all() and torch.isnan(s1.delta1).all() and not r1.any()
    assert s2.delta1.tolist() == pytest.approx([2.0, 2.0, 0.0, 0.0, 4.0])
    assert torch.isnan(s2.ratio).all() and not r2.any()  # Δ_1 itself is never tested
    assert s3.ratio[0].item() == pytest.approx(5e-4)
    assert s3.ratio[4].item() == 2.0**-10
    assert s3.ratio[1].item() == pytest.approx(0.5)
    assert s3.ratio[2].item() == 0.0 and s3.ratio[3].item() == math.inf
    assert r3.tolist() == [True, False, True, False, False]
    assert s3.delta1.tolist() == pytest.approx([2.0, 2.0, 0.0, 0.0, 4.0])  # Δ_1 is kept, not updated
    assert r4.tolist() == [True, False, True, False, True]


def test_temporal_policy_per_module_beta_and_missing_evaluations():
    prev = t(1.0, 1.0, math.nan)
    d1 = t(1.0, 1.0, math.nan)
    st = temporal_policy(t(1.2, 1.2, 3.0), prev, d1, t(0.1, 0.5, 0.5))
    assert st.retire.tolist() == [False, True, False]  # ratio 0.2 vs β 0.1 / 0.5; 3rd has no history
    st = temporal_policy(t(math.nan, 1.0, 1.0), prev, d1, 0.5)
    assert st.retire.tolist() == [False, True, False]  # not measured → never retired by this step
    assert math.isnan(st.delta1[0].item()) is False and st.delta1[0].item() == 1.0


def test_temporal_policy_beta_zero_never_retires():
    st = temporal_policy(t(1.0, 2.0), t(1.0, 2.0), t(0.0, 3.0), 0.0)
    assert not st.retire.any()


# ---------------------------------------------------------------- protecting strategy
LAYERS = ["a", "a", "b", "b", "c"]


def test_protect_activates_largest_in_empty_layers_only():
    out = protect(b(0, 0, 1, 0, 0), t(1, 3, 2, 5, 0), LAYERS)
    # a: none active → its largest (index 1); b: already has one → untouched (index 3 stays off);
    # c: single module → on
    assert out.tolist() == [False, True, True, False, True]


def test_protect_prefers_not_retired_and_respects_eligible():
    out = protect(
        b(0, 0, 0, 0, 0), t(1, 3, 2, 5, 0), LAYERS, preferred=b(1, 0, 0, 0, 1), eligible=b(1, 1, 1, 1, 0)
    )
    # a: index 1 is not preferred (retired) → index 0; b: no preferred module → fall back to the
    # largest (index 3); c: not eligible → left alone
    assert out.tolist() == [True, False, False, True, False]


def test_protect_ties_take_first_and_input_unchanged():
    act = b(0, 0, 1, 1, 1)
    out = protect(act, t(2, 2, 0, 0, 0), LAYERS)
    assert out.tolist() == [True, False, True, True, True]
    assert act.tolist() == [False, False, True, True, True]


# ---------------------------------------------------------------- pruning and draws
def test_prune_lowest_with_and_without_protection():
    score = t(0.1, 0.2, 5, 6, 7, 8)
    layers = ["a", "a", "b", "b", "b", "b"]
    # 3 of 6: ascending 0.1 (a), 0.2 (a: last of its layer → skipped), 5 (b), 6 (b)
    assert prune_lowest(score, 0.5, layers).tolist() == [True, False, True, True, False, False]
    assert prune_lowest(score, 0.5, layers, protect_layers=False).tolist() == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    # eligible restricts both the count base and the candidates: 2 of 4 eligible
    elig = b(0, 1, 1, 1, 1, 0)
    assert prune_lowest(score, 0.5, layers, eligible=elig).tolist() == [
        False,
        False,
        True,
        True,
        False,
        False,
    ]
    # infeasible count: as many as possible while keeping one per layer
    assert int(prune_lowest(score, 1.0, layers).sum()) == 4


def test_random_subset_counts_per_group_and_reproducible():
    groups = torch.tensor([0] * 6 + [1] * 4 + [2] * 3)
    g1 = torch.Generator().manual_seed(3)
    s = random_subset(groups, 0.5, g1)
    assert [int(s[groups == k].sum()) for k in range(3)] == [3, 2, round(1.5)]
    s2 = random_subset(groups, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(s, s2)
    elig = torch.ones(13, dtype=torch.bool)
    elig[:4] = False
    s3 = random_subset(groups, 0.5, g1, eligible=elig)
    assert not s3[:4].any() and int(s3[groups == 0].sum()) == 1


def test_layer_index():
    assert layer_index(["x", "y", "x", "z"]).tolist() == [0, 1, 0, 2]
