"""The loop's optimizer choice and step schedule, epoch-averaged active sets, and the replayed
random control (rand_replay configured from MAT's record of the same seed)."""

from __future__ import annotations

from collections import Counter

import pytest
from harness_toy import toy_task

from ntkit.errors import ConfigError
from ntkit.harness import LoopConfig, compare, lr_factor, methods_of


def test_step_schedule_milestones_and_gamma():
    assert lr_factor("step", 2, 10, 0, (0.3, 0.6, 0.9), 0.5) == 1.0
    assert lr_factor("step", 3, 10, 0, (0.3, 0.6, 0.9), 0.5) == 0.5
    assert lr_factor("step", 6, 10, 0, (0.3, 0.6, 0.9), 0.5) == 0.25
    assert lr_factor("step", 9, 10, 0, (0.3, 0.6, 0.9), 0.5) == 0.125
    assert lr_factor("step", 7, 10, 0) == pytest.approx(0.1)  # defaults: ×0.1 at 1/2 and 3/4


def test_optimizer_fields_validate():
    with pytest.raises(ConfigError, match=r"^optimizer='adam': expected 'adamw' or 'sgd'"):
        LoopConfig(optimizer="adam")
    with pytest.raises(ConfigError, match=r"^momentum=1\.0: expected a number in \[0, 1\)"):
        LoopConfig(momentum=1.0)
    with pytest.raises(ConfigError, match=r"^lr_milestones=\(0\.75, 0\.5\): expected increasing"):
        LoopConfig(lr_milestones=(0.75, 0.5))
    with pytest.raises(ConfigError, match=r"^lr_milestones=\(1\.0,\): expected"):
        LoopConfig(lr_milestones=(1.0,))
    with pytest.raises(ConfigError, match=r"^lr_gamma=0: expected a number in \(0, 1\]"):
        LoopConfig(lr_gamma=0)


def test_sgd_choice_trains_and_differs_from_adamw():
    task = toy_task()
    methods = methods_of({"vanilla": {"method": "vanilla"}})
    base = {"epochs": 1, "batch_size": 16, "progress": False, "steps_per_epoch": 3}
    sgd = compare(task, methods, LoopConfig(optimizer="sgd", lr=0.05, weight_decay=5e-4, **base), seeds=[0])[
        0
    ]
    adam = compare(task, methods, LoopConfig(lr=1e-3, **base), seeds=[0])[0]
    assert sgd["curve"][0]["val_loss"] == adam["curve"][0]["val_loss"]  # same init
    assert sgd["curve"][-1]["val_loss"] != adam["curve"][-1]["val_loss"]
    assert sgd["train_flops"] == adam["train_flops"]


def test_active_history_is_the_share_of_the_epochs_steps():
    """Multirate k=5, half the heads slow, 5 steps per epoch: a slow head is active on 1 step of 5."""
    task = toy_task()
    cfg = LoopConfig(epochs=2, batch_size=16, progress=False)
    rec = compare(
        task,
        methods_of({"vanilla": {"method": "vanilla"}, "mr": {"method": "multirate", "k": 5}}),
        cfg,
        seeds=[0],
    )[1]
    assert rec["steps_per_epoch"] == 5
    for epoch in rec["active_history"]:
        assert sorted(set(epoch)) == [pytest.approx(0.2), 1.0]
        assert sum(epoch) / len(epoch) == pytest.approx(0.6)
    assert rec["backward_sparsity"] == pytest.approx(0.4)


def _layer_counts(names: list[str]) -> Counter:
    return Counter(n.rsplit(".", 1)[0] for n in names)


def test_rand_replay_matches_mats_per_layer_counts_at_mats_epochs():
    task = toy_task()
    cfg = LoopConfig(epochs=3, batch_size=16, progress=False)
    spec = {
        "vanilla": {"method": "vanilla"},
        "mat": {
            "method": "mat",
            "alpha": 0.5,
            "beta": 0.0,
            "num_samples": 8,
            "start_epoch": 1,
            "interval": 1,
            "threshold_scope": "layer",
        },
        "replay": {"method": "rand_replay", "source": "mat"},
    }
    _, mat, rep = compare(task, methods_of(spec), cfg, seeds=[0])
    m_hist = [h for h in mat["method_history"] if h["event"] == "mat"]
    r_hist = rep["method_history"]
    assert [h["epoch"] for h in r_hist] == [h["epoch"] for h in m_hist] == [0, 1, 2]
    for m, r in zip(m_hist, r_hist):
        assert _layer_counts(r["active"]) == _layer_counts(m["active"])
    assert rep["method_config"]["schedule"] == [{"epoch": h["epoch"], "active": h["active"]} for h in m_hist]
    # equal-sized heads, equal counts per layer at the same steps → the same executed backward
    assert rep["backward_flops"] == mat["backward_flops"] < rep["forward_flops"] * 3
    assert rep["active_history"] != [[1.0] * len(rep["module_names"])] * 3


def test_rand_replay_needs_its_source_first():
    task = toy_task()
    cfg = LoopConfig(epochs=1, batch_size=16, progress=False, steps_per_epoch=1)
    spec = {"vanilla": {"method": "vanilla"}, "replay": {"method": "rand_replay"}, "mat": {"method": "mat"}}
    with pytest.raises(ConfigError, match=r"^methods\.replay\.source='mat': expected a label trained before"):
        compare(task, methods_of(spec), cfg, seeds=[0])
