"""The pl-* recipes (seed 002) at ci tier: every method trains, the pruned model is really smaller,
the report states the winner per ratio, and the overrides methods= / seeds= / ratio work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ntkit.errors import ConfigError
from ntkit.recipes import resolve_config, run_recipe

DATA = Path(os.environ.get("NTKIT_DATA_DIR", "/work/shared/data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="offline datasets not available")


def _run(name: str, out: Path, overrides=()) -> dict:
    run_recipe(name, "ci", out, DATA, overrides=overrides)
    doc = json.loads((out / "results.json").read_text())
    assert (out / "report.md").is_file()
    return doc["results"]


def _check(res: dict, pruned_labels: list[str], fractions: dict[str, float]) -> None:
    recs = {r["method"]: r for r in res["records"]}
    dense = recs["vanilla"]
    assert dense["structure_changes"] == [] and dense["final_num_params"] == dense["num_params"]
    for lab in pruned_labels:
        r = recs[lab]
        assert r["num_params"] < dense["num_params"] and r["final_num_params"] == r["num_params"]
        assert r["final_forward_flops"] < dense["final_forward_flops"]
        removed = sum(len(s) for s in r["structure_changes"])
        assert removed == round(fractions[lab] * len(dense["module_names"])) or removed > 0
    assert "won on" in res["summary"]["verdict"]
    table = next(iter(res["tables"].values()))
    assert [row["method"] for row in table] == list(recs)
    assert any(p.startswith("condition_number_") for p in res["plots"])


@needs_data
def test_pl_bert_ci_prunes_heads_and_reports_the_winner(tmp_path: Path) -> None:
    res = _run("pl-bert", tmp_path)
    _check(res, ["plreg"], {"plreg": 0.5})  # tiny BERT: 4 heads in 2 layers, protection keeps 2
    assert "train PPL @ep2" in next(iter(res["tables"].values()))[0]
    # the dense model's distance to the unigram floor is stated, as in the mat-* MLM reports
    assert res["unigram_floor"] > 0 and any(n.startswith("Unigram floor") for n in res["notes"])
    # the pruned step is timed against the dense step of the same call
    assert all(r["dense_step_s"] > 0 and r["final_step_s"] > 0 for r in res["records"])


@needs_data
@pytest.mark.slow  # ~100 s at ci (plreg's per-epoch diagnostics on the MoE)
def test_pl_switch_ci_prunes_experts_and_heads_and_draws_the_expert_heatmap(tmp_path: Path) -> None:
    res = _run("pl-switch", tmp_path, ["methods=vanilla,plreg,plreg_head_expert"])
    recs = {r["method"]: r for r in res["records"]}
    assert all(n.split(".")[-1].startswith("expert") for s in recs["plreg"]["structure_changes"] for n in s)
    kinds = {n.rsplit(".", 1)[-1][:4] for s in recs["plreg_head_expert"]["structure_changes"] for n in s}
    assert kinds == {"head", "expe"}
    assert "expert_condition_heatmap.png" in res["plots"]


@needs_data
@pytest.mark.slow  # ~140 s at ci (plreg's per-epoch diagnostics on VGG-16)
def test_pl_vgg_ci_reports_both_ratios(tmp_path: Path) -> None:
    res = _run("pl-vgg", tmp_path, ["methods=vanilla,plreg_50,plreg_90", "seeds=[0]"])
    recs = {r["method"]: r for r in res["records"]}
    assert recs["plreg_90"]["num_params"] < recs["plreg_50"]["num_params"] < recs["vanilla"]["num_params"]
    assert "At 50% pruned" in res["summary"]["verdict"] and "At 90% pruned" in res["summary"]["verdict"]


@pytest.mark.slow  # ResNet-56 ci: minutes on the shared 2-core machine
@needs_data
def test_pl_resnet_ci_with_a_ratio_override(tmp_path: Path) -> None:
    res = _run("pl-resnet", tmp_path, ["methods=vanilla,plreg", "methods.plreg.ratio=0.5"])
    recs = {r["method"]: r for r in res["records"]}
    assert recs["plreg"]["method_config"]["ratio"] == 0.5
    removed = [n for s in recs["plreg"]["structure_changes"] for n in s]
    assert removed and all(".conv1." in n or n.split(".")[-2] == "conv1" for n in removed)
    assert "At 50% pruned" in res["summary"]["verdict"]


def test_bad_ratio_override_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"methods.plreg.ratio"):
        resolve_config("pl-bert", "ci", ["methods.plreg.ratio=1.5"])


@needs_data
def test_seeds_run_apart_pool_into_the_recipes_own_columns(tmp_path: Path) -> None:
    """`ntkit report` on pl runs of separate seeds: the pl table's columns, mean ± std per cell."""
    import statistics

    from ntkit.recipes.merge import merge_report

    res = {s: _run("pl-bert", tmp_path / f"s{s}", ["methods=vanilla,plreg", f"seeds=[{s}]"]) for s in (0, 1)}
    md = merge_report([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged.md")
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    for col in ("train PPL @ep1", "train PPL @ep2", "test PPL", "ΔPPL (test − train)", "FLOPs vs dense",
                "time vs dense", "gate+features share of wall"):
        assert f" {col} " in head, col
    row = next(line for line in md.splitlines() if line.startswith("| plreg "))
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    ppl = [next(r for r in res[s]["records"] if r["method"] == "plreg")["test_ppl"] for s in (0, 1)]
    assert cells["seeds"] == "0, 1" and cells["test PPL"] == f"{statistics.fmean(ppl):.3f} ± {statistics.stdev(ppl):.3f}"
