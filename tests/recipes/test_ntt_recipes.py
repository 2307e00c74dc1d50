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
