"""``structured_prune`` and ``lth``: exact counts per schedule step (of the original structure count),
no emptied layer, surgery through the harness (fewer parameters, the right structure changes,
exact resume), LTH's rewinding to the saved point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from harness_toy import toy_task

from ntkit.errors import ConfigError
from ntkit.harness import LoopConfig, MethodEntry, train_run
from ntkit.methods import LoopContext, build_method, method_config
from ntkit.models import build_model
from ntkit.partition import attention_heads
from ntkit.sparse import attach


def _bound(name: str, **kw):
    torch.manual_seed(0)
    model = build_model("vit_tiny", dim=16, depth=3, heads=4)  # 3 layers × 4 heads = 12 structures
    part = attention_heads(model)
    ctl = attach(model, part)
    method = build_method(name, **kw)
    method.bind(model, part, ctl)
    return model, part, ctl, method


def _epochs(method, ctx, n: int, spe: int = 2, ctl=None, log=None):
    for epoch in range(n):
        ctx.epoch = epoch
        method.on_epoch_start(ctx)
        for i in range(spe):
            ctx.step = epoch * spe + i
            method.before_step(ctx)
            method.after_step(ctx)
        method.on_epoch_end(ctx)
        if log is not None:
            log.append(ctl.pruned.clone())


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # linear from epoch 1 to 3, ratio 0.75 of 12: totals round(9·k/3) = 3, 6, 9
        ({"schedule": "linear", "t0": 1, "t_end": 3, "ratio": 0.75}, [0, 3, 6, 9, 9]),
        ({"schedule": "oneshot", "t": 2, "ratio": 0.5}, [0, 0, 6, 6, 6]),
        # iterative: p = 1 − 0.5^(1/2); totals round(12·(1 − (1 − p)^k)) = round(3.51), 6
        ({"schedule": "iterative", "t0": 0, "every": 2, "rounds": 2, "ratio": 0.5}, [4, 4, 6, 6, 6]),
        # per layer: round(0.5 · 4) = 2 in every layer
        ({"schedule": "oneshot", "t": 0, "ratio": 0.5, "scope": "layer"}, [6, 6, 6, 6, 6]),
    ],
)
def test_each_schedule_step_keeps_exactly_the_requested_count(fields, expected):
    model, _, ctl, method = _bound("structured_prune", criterion="l2", surgery=False, **fields)
    ctx = LoopContext(model=model, steps_per_epoch=2)
    log = []
    _epochs(method, ctx, 5, ctl=ctl, log=log)
    assert [int(p.sum()) for p in log] == expected
    assert torch.equal(ctl.active, ~ctl.pruned)  # every structure still there trains
    if fields.get("scope") == "layer":
        assert all(int(log[-1][i : i + 4].sum()) == 2 for i in (0, 4, 8))
    # the lowest-L2 heads went first (recorded scores are the L2 norms at that step)
    first = method.history[0]
    if fields.get("scope") != "layer":
        lowest = sorted(first["scores"], key=first["scores"].get)[: len(first["pruned"])]
        assert set(first["pruned"]) == set(lowest)


@pytest.mark.parametrize(("ratio", "rounds"), [(1e-20, 1), (1e-12, 3), (5e-324, 1000)])
def test_iterative_plan_of_a_tiny_ratio_is_valid_not_an_error(ratio, rounds):
    # found by the property test: 1 − (1 − 1e-20)^1 cancels to 0.0, which Iterative refuses
    from ntkit.methods.base import method_config

    plan = method_config("structured_prune", {"schedule": "iterative", "rounds": rounds, "ratio": ratio}).plan()
    if plan is not None:
        assert 0.0 < plan.p < 1.0 and plan.p == pytest.approx(ratio / rounds, rel=1e-6)
    else:
        assert ratio / rounds < 1e-300  # only below float resolution is there nothing to prune


def test_protection_never_empties_a_layer():
    model, _, ctl, method = _bound("structured_prune", criterion="random", surgery=False, ratio=0.9, t=0)
    _epochs(method, LoopContext(model=model, steps_per_epoch=1), 1, spe=1)
    pruned = ctl.pruned
    assert int(pruned.sum()) == 9  # round(0.9 · 12) = 11 would empty a layer: one left in each
    for i in (0, 4, 8):
        assert int((~pruned[i : i + 4]).sum()) == 1
    assert method.history[0]["target"] == 11 and method.history[0]["pruned_total"] == 9


def test_config_errors_name_the_field():
    for fields, field in [({"criterion": "nope"}, "criterion"), ({"ratio": 1.0}, "ratio"),
                          ({"schedule": "linear", "at_init": True}, "schedule"), ({"t0": 3, "t_end": 1}, "t_end"),
                          ({"protect": False}, "protect"), ({"scope": ["x"]}, "scope")]:
        with pytest.raises(ConfigError, match=rf"^structured_prune\.{field}="):
            method_config("structured_prune", fields)
    with pytest.raises(ConfigError, match=r"^lth\.criterion="):
        method_config("lth", {"criterion": "fpgm"})
    with pytest.raises(ConfigError, match=r"^structured_prune\.kind='expert'"):
        _bound("structured_prune", kind="expert")


CFG = LoopConfig(epochs=3, batch_size=16, lr=1e-2, eval_every=4, checkpoint_every=3, progress=False)


def _task():
    return toy_task(n=96, dim=16, depth=2, heads=4)


def _run_and_resume(tmp_path: Path, entry: MethodEntry) -> dict:
    """Run with checkpoints, drop the newest, resume: the resumed record equals the full run's."""
    ck = tmp_path / "ck"
    rec = train_run(_task(), "m", entry, CFG, seed=0, checkpoint_dir=ck)
    max(ck.glob("ckpt-*.pt")).unlink()
    again = train_run(_task(), "m", entry, CFG, seed=0, checkpoint_dir=ck, resume=True)
    for key in ("curve", "test_loss", "train_flops", "num_params", "structure_changes", "method_history"):
        assert again[key] == rec[key], key
    return rec


def test_surgery_through_the_harness_shrinks_the_model_and_resumes_exactly(tmp_path: Path):
    entry = MethodEntry("structured_prune", {"criterion": "fpgm", "ratio": 0.5, "schedule": "linear", "t0": 0,
                                             "t_end": 1})
    rec = _run_and_resume(tmp_path, entry)
    hist = [h for h in rec["method_history"] if h["event"] == "prune"]
    assert [len(h["pruned"]) for h in hist] == [2, 2]  # 8 heads: totals round(4·k/2) = 2, 4
    assert rec["structure_changes"] == [h["pruned"] for h in hist] and all(h["surgery"] for h in hist)
    dense = _task().build_model()
    assert len(rec["module_names"]) == 4
    # each removed head takes its 3·4 q/k/v rows (+ biases) and 4 output-projection columns (dim 16)
    assert rec["num_params"] == sum(p.numel() for p in dense.parameters()) - 4 * (3 * 4 * 16 + 3 * 4 + 16 * 4)


def test_at_init_grasp_with_surgery_prunes_before_the_first_step():
    entry = MethodEntry("structured_prune", {"criterion": "grasp", "ratio": 0.5, "at_init": True})
    rec = train_run(_task(), "g", entry, CFG, seed=0)
    (h,) = rec["method_history"]
    assert h["step"] == 0 and h["schedule"] == "at_init" and len(h["pruned"]) == 4
    assert rec["structure_changes"] == [h["pruned"]] and len(rec["module_names"]) == 4


def test_lth_rewinds_the_survivors_to_the_saved_point():
    model, _, ctl, method = _bound("lth", ratio=0.5, rounds=2, every=1, t0=1, rewind_frac=0.25, epochs=4,
                                      surgery=False)
    ctx = LoopContext(model=model, steps_per_epoch=2)
    snap = {}
    for epoch in range(3):
        ctx.epoch = epoch
        for i in range(2):
            ctx.step = epoch * 2 + i
            method.before_step(ctx)
            if ctx.step == 2:  # rewind step round(0.25 · 4 · 2) = 2: saved before this step's update
                snap = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():  # stands in for an optimizer step
                for p in model.parameters():
                    p.add_(0.01)
        method.on_epoch_end(ctx)
        if epoch == 1:
            assert int(ctl.pruned.sum()) == round(12 * (1 - 0.5 ** 0.5))
            for k, v in model.state_dict().items():
                assert torch.equal(v, snap[k]), k  # rewound, bit for bit
    assert int(ctl.pruned.sum()) == 6
    assert [h["event"] for h in method.history] == ["rewind_point", "prune", "prune"]
    assert method.history[1]["rewound_to"] == 2 and method.history[2]["round"] == 2


def test_lth_through_the_harness_with_surgery_resumes_exactly(tmp_path: Path):
    entry = MethodEntry("lth", {"ratio": 0.5, "rounds": 2, "every": 1, "t0": 0, "rewind_frac": 0.1, "epochs": 3})
    rec = _run_and_resume(tmp_path, entry)
    prunes = [h for h in rec["method_history"] if h["event"] == "prune"]
    assert [h["pruned_total"] for h in prunes] == [2, 4] and len(rec["structure_changes"]) == 2
    assert rec["method_history"][0] == {"event": "rewind_point", "step": 1}


def test_lth_rewind_point_encoding_round_trips_every_tensor_kind() -> None:
    """BatchNorm's 0-dim int64 ``num_batches_tracked`` crashed the encoding (pl-vgg ci)."""
    import torch

    from ntkit.methods.lth import decode_tensor, encode_tensor

    for t in (torch.tensor(5), torch.tensor(2.5, dtype=torch.float64), torch.randn(3, 2), torch.zeros(0, 4),
              torch.arange(6).reshape(2, 3).t()):
        back = decode_tensor(encode_tensor(t))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
