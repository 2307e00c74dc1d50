"""bench/ntt_step.py in its quick mode: exit code, JSON, the float64 agreement check and `ntkit bench ntt`
(the speed target itself is judged by the full benchmark, not here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ntkit.cli import main as cli_main

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ntt_step.py"
ARGS = ["--quick", "--models", "lenet300_100", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _load():
    spec = importlib.util.spec_from_file_location("_bench_ntt_step", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_bench_through_the_cli_writes_json_and_agrees(tmp_path, capsys):
    out = tmp_path / "ntt.json"
    assert cli_main(["bench", "ntt", *ARGS, "--out", str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads(out.read_text())
    assert doc["config"]["quick"] and doc["config"]["batch"] == 4 and doc["config"]["threads"] == 1
    (row,) = doc["results"]
    assert row["model"] == "lenet300_100" and last == {"lenet300_100": {"ratio": round(row["ratio"], 2),
                                                                        "agreement_ok": True}}
    assert row["agreement"]["loss_rel_err"] <= 1e-8 and row["agreement"]["grad_rel_err"] <= 1e-8
    assert row["agreement"]["loss"] > 0  # a non-trivial loss was compared
    k = row["kernels"]
    assert set(k) == {"structured", "torch.func"}
    assert row["ratio"] == pytest.approx(k["torch.func"]["step_s"] / k["structured"]["step_s"])
    assert k["structured"]["epoch_s_extrapolated"] == pytest.approx(k["structured"]["step_s"] * 13500)


def test_failed_agreement_gives_exit_code_1(monkeypatch):
    mod = _load()
    monkeypatch.setattr(mod, "TOL", -1.0)  # no error can pass a negative tolerance
    assert mod.main([*ARGS, "--repeats", "1"]) == 1


def test_peak_memory_child_reports_a_rise():
    r = _load()._isolated_peak("lenet300_100", "torch.func", 4, 1)  # a fresh process, as the full bench
    assert r["how"] in ("VmHWM", "ru_maxrss")
    assert r["peak_rise_mib"] > 1.0  # the Jacobians of 266k parameters × 40 outputs alone are ~40 MiB
