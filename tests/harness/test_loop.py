"""The harness loop and its post-processing (ntkit.harness.loop, ntkit.recipes.report, _mat_image)."""

from __future__ import annotations

import pytest
from harness_toy import toy_task

from ntkit.errors import ConfigError
from ntkit.harness import (
    LoopConfig,
    compare,
    finalize,
    first_crossing,
    interpolate_at,
    lr_factor,
    methods_of,
)
from ntkit.recipes._mat_image import add_train_acc_compute

CURVE = [
    {"train_flops": 0.0, "flops": 0.0, "val_loss": 5.0},
    {"train_flops": 10.0, "flops": 11.0, "val_loss": 4.0},
    {"train_flops": 20.0, "flops": 22.0, "val_loss": 3.0},
    {"train_flops": 30.0, "flops": 33.0, "val_loss": 3.5},
]


def test_interpolate_at_brackets_linearly():
    assert interpolate_at(CURVE, 0.0, key="train_flops") == 5.0
    assert interpolate_at(CURVE, 5.0, key="train_flops") == pytest.approx(4.5)
    assert interpolate_at(CURVE, 25.0, key="train_flops") == pytest.approx(3.25)
    assert interpolate_at(CURVE, 30.0, key="train_flops") == pytest.approx(3.5)
    assert interpolate_at(CURVE, 30.5, key="train_flops") is None  # the run ended below the budget
    # default: total FLOPs incl. overhead
    assert interpolate_at(CURVE, 5.5) == pytest.approx(4.5)
    assert interpolate_at(CURVE, 33.5) is None


def test_first_crossing_interpolates_in_total_flops():
    assert first_crossing(CURVE, 4.5) == pytest.approx(5.5)  # halfway between 0 and 11
    assert first_crossing(CURVE, 3.0) == pytest.approx(22.0)
    assert first_crossing(CURVE, 2.9) is None
    assert first_crossing(CURVE, 6.0) == 0.0


def test_finalize_budgets_and_target_against_vanilla_of_same_seed():
    van = {"method": "vanilla", "seed": 0, "train_flops": 40.0, "best_val_loss": 3.0, "curve": CURVE}
    fast = [dict(p, flops=p["flops"] / 2, train_flops=p["train_flops"] / 2) for p in CURVE]
    mat = {"method": "mat", "seed": 0, "train_flops": 15.0, "best_val_loss": 3.0, "curve": fast}
    other = {"method": "mat", "seed": 1, "train_flops": 15.0, "best_val_loss": 3.0, "curve": fast}
    recs = [van, mat, other]
    finalize(recs, (0.25, 0.5, 1.0))
    assert van["budgets"] == [10.0, 20.0, 40.0]
    assert van["val_loss_at_budget"] == [pytest.approx(4.0 + 1 / 11), pytest.approx(3.0 + 2 / 11), None]
    assert mat["val_loss_at_budget"][0] == pytest.approx(4.0 - 4.5 / 5.5)
    assert mat["val_loss_at_budget"][2] is None
    assert van["compute_to_target_flops"] == pytest.approx(22.0)
    assert mat["compute_to_target_flops"] == pytest.approx(11.0)
    assert mat["compute_ratio_vs_baseline"] == pytest.approx(0.5)
    assert other["compute_to_target_flops"] is None and other["budgets"] is None  # no vanilla for seed 1


def test_lr_factor_schedules():
    assert lr_factor("constant", 7, 10, 0) == 1.0
    assert lr_factor("linear", 0, 10, 0) == 1.0
    assert lr_factor("linear", 5, 10, 0) == pytest.approx(0.5)
    assert lr_factor("linear", 1, 10, 4) == pytest.approx(0.5)  # warm-up 2/4
    assert lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5)
    assert lr_factor("step", 4, 10, 0) == 1.0
    assert lr_factor("step", 5, 10, 0) == pytest.approx(0.1)
    assert lr_factor("step", 8, 10, 0) == pytest.approx(0.01)


def test_loop_config_validates():
    with pytest.raises(ConfigError, match="schedule='exp'"):
        LoopConfig(schedule="exp")
    with pytest.raises(ConfigError, match="epochs=0"):
        LoopConfig(epochs=0)


def test_add_train_acc_compute():
    recs = [{"epoch_train_acc": [0.5, 0.92, 0.97], "epoch_flops": [10, 20, 30]}]
    add_train_acc_compute(recs, (0.9, 0.95, 0.99))
    assert recs[0]["compute_to_train_acc"] == [20.0, 30.0, None]




def test_loop_same_init_and_data_for_every_method_and_partial_backward_saves_flops():
    task = toy_task()
    cfg = LoopConfig(epochs=2, batch_size=16, lr=1e-3, eval_every=2, progress=False)
    methods = methods_of({"vanilla": {"method": "vanilla"}, "vanilla_again": {"method": "vanilla"},
                          "rand": {"method": "rand"}})
    recs = compare(task, methods, cfg, seeds=[0])
    van, again, rand = recs
    # determinism: identical init, data order and masks → identical curves
    assert [p["val_loss"] for p in van["curve"]] == [p["val_loss"] for p in again["curve"]]
    assert van["curve"][0]["val_loss"] == rand["curve"][0]["val_loss"]  # same initial weights
    assert van["steps"] == rand["steps"] == 2 * 5
    # Rand runs the same forward but skips half of the heads' weight gradients
    assert rand["forward_flops"] == van["forward_flops"] > 0
    assert rand["backward_flops"] < van["backward_flops"]
    assert rand["backward_sparsity"] == pytest.approx(0.5)
    assert van["overhead_flops"] == 0 and van["train_flops"] == van["forward_flops"] + van["backward_flops"]
    assert len(van["active_history"]) == 2 and all(all(a) for a in van["active_history"])
    # vanilla reaches its own best val loss exactly at its best evaluation
    assert van["compute_to_target_flops"] == van["convergence_flops"]
    assert 0.0 <= van["test_acc"] <= 1.0
