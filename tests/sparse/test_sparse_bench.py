"""Smoke test of bench/partial_backward.py (the speed targets live in the benchmark, not here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "partial_backward.py"


def _load():
    spec = importlib.util.spec_from_file_location("_bench_partial_backward", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> dict:
    out = tmp_path / "pb.json"
    assert _load().main(["--quick", "--repeats", "1", "--threads", "1", "--out", str(out), *args]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads(out.read_text())
    assert doc["summary"] == last
    for name, r in last.items():
        model = doc["results"][name]["what"] == "training step"
        assert set(r) == {"flops_ratio_50", "time_ratio_50"} | ({"floor_ratio_50"} if model else set()), name
        assert 0.5 < r["flops_ratio_50"] < 1.0, (name, r)  # inactive weight-gradient work was not executed
        assert r["time_ratio_50"] > 0
        if model:  # the floor's anchor trained none of the covered parameters: fewer FLOPs than 50%
            res = doc["results"][name]
            assert res["flops"]["0% frozen"] < res["flops"]["50%"] < res["flops"]["full"], name
            r0 = res["time_ratio"]["0% frozen"]  # paired per repeat, as every time ratio
            assert r["floor_ratio_50"] == pytest.approx(r0 + 0.5 * (1 - r0), abs=1e-4), name
    return last


def test_bench_layers_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["linear_rows", "linear_columns", "conv2d_filters", "conv2d_filters_nhwc", "moe_experts"]
    last = _run(tmp_path, capsys, ["--only", *names])
    assert set(last) == set(names)
    assert abs(last["linear_rows"]["flops_ratio_50"] - 0.75) < 1e-6


def test_bench_model_floor_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = _run(tmp_path, capsys, ["--only", "vgg16_w0.25_filters_nhwc"])
    assert set(last) == {"vgg16_w0.25_filters_nhwc"}


@pytest.mark.slow
def test_bench_all_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = _run(tmp_path, capsys, [])
    assert {"bert_mlm_small_heads", "vgg16_filters", "switch_mlm_small_experts"} <= set(last)
