"""Every MAT recipe runs end to end at its ``ci`` tier and writes the documented results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ntkit.recipes import get_recipe, run_recipe

#: Fields every (method, seed) record carries (docs/results.md).
RECORD_FIELDS = {
    "method", "seed", "budgets", "val_loss_at_budget", "test_loss", "test_acc", "compute_to_target_flops",
    "overhead_flops", "train_flops", "forward_flops", "backward_flops", "total_flops", "overhead_share",
    "wall_s", "curve", "best_val_loss", "convergence_flops", "active_history", "forward_sparsity",
    "backward_sparsity", "method_history",
}


def _run(name: str, out: Path, data_dir: Path | None, overrides=()) -> dict:
    run_recipe(name, "ci", out, data_dir, overrides=overrides)
    for f in ("results.json", "report.md", "config.json"):
        assert (out / f).is_file(), f
    doc = json.loads((out / "results.json").read_text())
    res = doc["results"]
    for r in res["records"]:
        missing = RECORD_FIELDS - set(r)
        assert not missing, (r["method"], missing)
        assert r["train_flops"] > 0 and r["wall_s"] > 0
        assert r["train_flops"] == r["forward_flops"] + r["backward_flops"]
    for p in res["plots"]:
        assert (out / p).is_file()
    return res


def _check_mat(res: dict, label: str = "mat") -> None:
    mat = [r for r in res["records"] if r["method"] == label]
    assert mat, label
    r = mat[0]
    assert r["overhead_flops"] > 0  # the mNTK evaluations ran and were booked as overhead
    assert any(h.get("lambda_max") for h in r["method_history"])
    assert "lambda_max_" + label + ".png" in res["plots"]


def test_all_tiers_registered():
    for name in ("mat-bert", "mat-switch", "mat-vgg", "mat-prune", "mat-scale", "demo"):
        rec = get_recipe(name)
        assert set(rec.tiers) == {"ci", "quick", "cpu", "paper"}
        assert len(rec.tiers["cpu"].seeds if hasattr(rec.tiers["cpu"], "seeds") else rec.tiers["cpu"].mlm.seeds) >= 3


def test_mat_bert_ci(tmp_path, data_dir):
    res = _run("mat-bert", tmp_path, data_dir)
    assert [r["method"] for r in res["records"]] == ["vanilla", "rand", "multirate", "mat", "rand_replay"]
    _check_mat(res)
    van = res["records"][0]
    assert van["budgets"] == pytest.approx([f * van["train_flops"] for f in (0.25, 0.5, 0.75)])
    assert "offline" in res["split_note"]
    report = (tmp_path / "report.md").read_text()
    assert "paper: val_loss_at_10_pflops" in report and "MAT" in report and "offline" in report
    assert res["verdict"]["mat_beat_vanilla"] in (True, False)
    assert set(res["aggregate"]) == {"vanilla", "rand", "multirate", "mat", "rand_replay"}


def test_paper_columns_omitted_without_paper_numbers(tmp_path, data_dir):
    res = _run("mat-bert", tmp_path, data_dir,
               overrides=["methods=vanilla,mat", "paper_numbers=" + str(tmp_path / "missing.json"),
                          "loop.epochs=1"])
    assert not any(k.startswith("paper:") for k in next(iter(res["tables"].values()))[0])


def test_mat_switch_ci_heads_and_experts(tmp_path, data_dir):
    res = _run("mat-switch", tmp_path, data_dir)
    r = next(r for r in res["records"] if r["method"] == "mat")
    assert set(r["module_kinds"]) == {"head", "expert"}
    _check_mat(res)


def test_mat_vgg_ci(tmp_path, data_dir):
    res = _run("mat-vgg", tmp_path, data_dir)
    for r in res["records"]:
        assert len(r["compute_to_train_acc"]) == 2 and 0.0 <= r["test_acc"] <= 1.0
        assert set(r["module_kinds"]) == {"filter"}
    _check_mat(res)
    by = {r["method"]: r for r in res["records"]}
    # the paper's optimizer, Multirate split per layer, the replayed control with MAT's counts
    assert by["mat"]["method_config"]["threshold_scope"] == "layer"
    assert by["multirate"]["method_config"]["per_layer"] is True
    assert by["rand_replay"]["train_flops"] == by["mat"]["train_flops"]
    for r in res["records"]:
        paired = r["paired_test_acc_diff"]
        assert paired == pytest.approx(r["test_acc"] - by["vanilla"]["test_acc"])
        assert r["convergence_ratio_vs_baseline"] == pytest.approx(
            r["convergence_flops"] / by["vanilla"]["convergence_flops"]
        )


def test_mat_vgg_tiers_use_the_papers_sgd():
    from ntkit.recipes.mat_vgg import TIERS

    for cfg in TIERS.values():
        lp = cfg.loop
        assert (lp.optimizer, lp.lr, lp.momentum, lp.weight_decay, lp.schedule) == ("sgd", 0.1, 0.9, 5e-4, "step")
        assert lp.lr_milestones == (0.5, 0.75) and lp.lr_gamma == 0.1
        assert cfg.methods["multirate"].config.per_layer


def test_mat_prune_ci(tmp_path, data_dir):
    res = _run("mat-prune", tmp_path, data_dir)
    by = {r["method"]: r for r in res["records"]}
    assert by["vanilla"]["forward_sparsity"] == 0.0
    assert by["snip_50"]["forward_sparsity"] == pytest.approx(0.5)
    assert by["mat_prune_50"]["forward_sparsity"] > 0.0
    assert by["snip_50"]["total_flops"] < by["vanilla"]["total_flops"]


def test_mat_scale_ci(tmp_path, data_dir):
    res = _run("mat-scale", tmp_path, data_dir)
    rows = next(iter(res["tables"].values()))
    assert [row["size"] for row in rows] == ["tiny"]


def test_demo_ci_needs_no_data_dir(tmp_path):
    res = _run("demo", tmp_path, None)
    assert [r["method"] for r in res["records"]] == ["vanilla", "rand", "multirate", "mat", "rand_replay"]
    _check_mat(res)


@pytest.mark.parametrize("channels_last", [True, False])
def test_image_task_memory_format(channels_last: bool) -> None:
    """VGG is stored channels-last unless turned off (its activations and gradients follow); the
    ViT is left as built."""
    import torch

    from ntkit.recipes._mat_image import ImageCompareConfig, build_image_task

    cfg = ImageCompareConfig(dataset="digits", width=0.125, augment=False, channels_last=channels_last)
    task, _ = build_image_task(cfg, None)
    model = task.build_model()
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]  # the first has 1 input channel
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert conv.weight.is_contiguous() != channels_last
    x, y = task.train_batch(torch.arange(4), torch.Generator().manual_seed(0))
    loss, _, _ = task.loss(model, (x, y))
    loss.backward()
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    vit_task, _ = build_image_task(ImageCompareConfig(model="vit_tiny", dataset="digits", augment=False), None)
    assert all(p.is_contiguous() for p in vit_task.build_model().parameters())
