"""The NTT recipes (ntt-mnist / ntt-fashion / ntt-cifar) at ci tier on the offline data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ntkit.errors import ConfigError
from ntkit.recipes import get_recipe, resolve_config, run_recipe
from ntkit.recipes.ntt import ALL_METHODS

DATA = Path(os.environ.get("NTKIT_DATA_DIR", "/work/shared/data"))
needs_data = pytest.mark.skipif(not (DATA / "mnist.npz").is_file(), reason="offline datasets not available")


def _run(name: str, out: Path, overrides=()) -> dict:
    run_recipe(name, "ci", out, DATA, overrides=overrides)
    doc = json.loads((out / "results.json").read_text())
    assert (out / "report.md").is_file() and (out / "accuracy_vs_density.png").stat().st_size > 1000
    return doc["results"]


@needs_data
def test_ntt_mnist_ci_runs_every_method_and_prints_the_anchors(tmp_path):
    res = _run("ntt-mnist", tmp_path)
    runs = res["runs"]
    assert sorted({r["method"] for r in runs}) == sorted(ALL_METHODS)
    for r in runs:
        assert 0.0 <= r["test_last"] <= 1.0 and 0.0 <= r["test_best_val"] <= 1.0
        want = 1.0 if r["method"] == "dense" else 0.1
        assert abs(r["density"] - want) < 1e-3, r  # the mask really has the density
    ntt = next(r for r in runs if r["method"] == "ntt")
    assert ntt["ntt_steps"] == 2 and ntt["ntt_start"]["kernel"] > 0
    anchors = res["tables"]["Sanity anchors (MNIST, layerwise, density 0.03)"]
    assert [a["method"] for a in anchors] == ["ntt", "random"]
    assert anchors[0]["paper notebooks (authors' code) %"] == "96.46 / 96.46"


@needs_data
def test_ntt_fashion_ci_with_overrides(tmp_path):
    res = _run("ntt-fashion", tmp_path, ["model=lenet5_caffe", "densities=0.2,0.05", "methods=random,dense",
                                         "seeds=0,1"])
    runs = res["runs"]
    assert {(r["method"], r["density"]) for r in runs if r["seed"] == 1} == {
        ("random", 0.2), ("random", 0.05), ("dense", 1.0)}
    assert res["summary"]["model"] == "lenet5_caffe" and res["summary"]["dataset"] == "fashion_mnist"
    rows = res["tables"]["Test accuracy vs density"]
    assert all(r["seeds"] == 2 for r in rows)
    assert "Sanity anchors (MNIST, layerwise, density 0.03)" not in res["tables"]


@pytest.mark.skipif(not (DATA / "cifar10_subset.npz").is_file(), reason="offline CIFAR-10 subset not available")
def test_ntt_cifar_ci_uses_conv4_valid_and_labels_the_subset(tmp_path):
    res = _run("ntt-cifar", tmp_path)
    assert {r["method"] for r in res["runs"]} == {"ntt", "snip", "random", "dense"}
    assert any("10k-train subset" in n for n in res["notes"])


def test_bad_overrides_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="methods"):
        resolve_config(get_recipe("ntt-mnist"), "ci", {"methods": "ntt,grasp"})
    with pytest.raises(ConfigError, match="densities"):
        resolve_config(get_recipe("ntt-mnist"), "ci", {"densities": "0.1,1.5"})


def _run_rec(method, density, seed, acc):
    return {"method": method, "density": density, "seed": seed, "test_last": acc}


def test_winners_name_the_best_sparse_method_its_margin_and_the_seed_std():
    from ntkit.recipes.ntt import winners

    runs = [_run_rec("dense", 1.0, s, 0.99) for s in (0, 1)]  # the reference never wins
    runs += [_run_rec("ntt", 0.1, 0, 0.96), _run_rec("ntt", 0.1, 1, 0.98),        # 97 ± 1.41
             _run_rec("random", 0.1, 0, 0.95), _run_rec("random", 0.1, 1, 0.95),  # 95 ± 0
             _run_rec("ntt", 0.03, 0, 0.90), _run_rec("ntt", 0.03, 1, 0.90),      # 90 ± 0
             _run_rec("random", 0.03, 0, 0.92), _run_rec("random", 0.03, 1, 0.88)]  # 90 ± 2.83
    a, b = winners(runs, (0.1, 0.03))
    assert (a["winner"], a["runner-up"], a["margin (pp)"], a["margin > seed std"]) == ("ntt", "random", 2.0, "yes")
    assert "**ntt won** with 97.00%, 2.00 pp ahead of the runner-up random" in a["sentence"]
    assert "exceeds the seed std (1.41 pp, 2 seeds)" in a["sentence"]
    assert b["margin (pp)"] == 0.0 and "tie between" in b["sentence"]
    one = winners([_run_rec("snip", 0.1, 0, 0.97), _run_rec("ntt", 0.1, 0, 0.965)], (0.1,))[0]
    assert one["winner"] == "snip" and one["margin > seed std"] == "n/a (1 seed)"
    assert "one seed" in one["sentence"] and "NTT: 96.50% (rank 2 of 2)" in one["sentence"]


@needs_data
@pytest.mark.parametrize("density", [1.0, 0.1])
def test_output_toy_students_follow_the_teacher_exactly_at_density_one(density):
    import torch

    from ntkit.recipes.ntt import NTTRecipeConfig, _load, run_output_toy

    cfg = NTTRecipeConfig(train_limit=300, test_limit=10, toy_images=12, toy_density=density, toy_ntt_steps=2,
                          toy_sgd_steps=6)
    toy = run_output_toy(cfg, _load(cfg, DATA), 0, torch.device("cpu"))
    assert toy["images"] == 12 and toy["probe_digits"] == [0] * 5 + [1] * 5
    assert toy["steps"] == list(range(7)) and toy["ntt"]["steps"] == 2
    for name, out in toy["outputs"].items():
        assert torch.tensor(out).shape == (7, 10, 2), name
        assert toy["loss"][name][-1] < toy["loss"][name][0], name  # gradient descent at lr 0.01 decreases it
    d = toy["rel_dist_to_teacher"]
    if density == 1.0:  # NTT's loss is 0 at the start (zero gradient, Adam does not move) and no mask
        assert d == {"NTT student": 0.0, "random-mask student": 0.0}
        assert toy["ntt"]["start"]["loss"] == 0.0
    else:
        assert d["NTT student"] > 0 and d["random-mask student"] > 0


@needs_data
def test_ntt_mnist_ci_with_the_toy_figure(tmp_path):
    res = _run("ntt-mnist", tmp_path, ["methods=ntt,dense", "toy_figure=true", "toy_images=12",
                                       "toy_ntt_steps=2", "toy_sgd_steps=3"])
    assert (tmp_path / "toy_output_evolution.png").stat().st_size > 5000
    traj = json.loads((tmp_path / "toy_output_evolution.json").read_text())
    assert res["toy"]["trajectories"] == "toy_output_evolution.json" and "outputs" not in res["toy"]
    assert len(traj["outputs"]["NTT student"]) == len(traj["steps"]) == 4  # GD steps 0..3
    assert res["plots"] == ["accuracy_vs_density.png", "toy_output_evolution.png"]
    rows = res["tables"]["Toy: output evolution vs the dense teacher (seed 003 §4.1)"]
    assert [r["network"] for r in rows] == ["NTT student", "random-mask student"]
    assert res["summary"]["winner at density 0.1"].startswith("ntt ")  # the only sparse method run
    assert res["notes"][0].startswith("density 0.1: ntt (") and "only sparse method" in res["notes"][0]
    report = (tmp_path / "report.md").read_text()
    assert "![toy_output_evolution](toy_output_evolution.png)" in report


def test_toy_rejects_too_many_images():
    import torch

    from ntkit.data.images import ImageData
    from ntkit.recipes.ntt import NTTRecipeConfig, run_output_toy

    x = torch.zeros(6, 1, 28, 28)
    data = ImageData(name="mnist", train_x=x, train_y=torch.tensor([0, 0, 0, 1, 1, 1]), test_x=x[:1],
                     test_y=torch.tensor([0]), num_classes=10, in_shape=(1, 28, 28), note="", mean=(0.0,),
                     std=(1.0,))
    with pytest.raises(ConfigError, match="toy_images=12"):
        run_output_toy(NTTRecipeConfig(toy_images=12), data, 0, torch.device("cpu"))
