"""`ntkit bench`: the real benchmarks run through the CLI in their quick mode and exit 0 after
printing their ratio tables; a benchmark's return value becomes an exit code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ntkit.cli import main


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    """The benchmarks set torch's thread count for the process: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_bench_ntk_quick_exits_0_with_ratio_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --quick at its smallest sizes: both models (attention heads, conv filters), every method
    out = tmp_path / "ntk.json"
    argv = ["bench", "ntk", "--quick", "--S", "2", "--T", "8", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "× f+b" in text and "rel err" in text  # the table header
    for model in ("bert_mini", "vgg16"):
        rows = {line.split()[1]: line.split() for line in text.splitlines() if line.startswith(model)}
        assert {"fwd+bwd", "engine", "loop", "loop-frozen", "functorch"} <= set(rows), model
        assert float(rows["fwd+bwd"][3]) == 1.0  # the baseline row's ratio
    summary = _last_json(text)
    assert set(summary) == {"bert_mini", "vgg16"}
    for name, s in summary.items():
        assert s["max_rel_err"] < 1e-3, name  # the engine's Grams agree with the loop's
    assert json.loads(out.read_text())["summary"] == summary


def test_bench_backward_quick_exits_0_with_ratio_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = ["linear_rows", "conv2d_filters"]
    argv = ["bench", "backward", "--quick", "--repeats", "1", "--threads", "1", "--only", *cases]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "time ratio" in text and "FLOP ratio" in text  # the table header
    assert "wrote" not in text  # --quick without --out writes nothing
    summary = _last_json(text)
    assert set(summary) == set(cases)
    assert abs(summary["linear_rows"]["flops_ratio_50"] - 0.75) < 1e-6
    for case in cases:
        assert any(line.startswith(case) and " 50% " in line for line in text.splitlines()), case


def test_bench_pruned_quick_exits_0_with_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pruned.json"
    assert main(["bench", "pruned", "--quick", "--reps", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert [r["case"] for r in doc["results"]] == ["bert_small_heads_75", "vgg16_filters_50",
                                                   "switch_small_experts_50", "resnet56_filters_25"]
    for r in doc["results"]:
        # top-1 routing: without half the experts every token still runs one expert (tokens the dense
        # model dropped at capacity may now run, so the FLOP ratio can exceed 1 slightly)
        top = 1.1 if r["case"].startswith("switch") else 1.0
        assert r["params"]["pruned"] < r["params"]["dense"] and 0 < r["flop_ratio"] < top, r
        assert f"{r['case']}: params" in text and "FLOP ratio" in text


@pytest.mark.parametrize(
    "ret, code", [("None", 0), ("0", 0), ("3", 3), ("{'ratio': 1.5}", 0), ("True", 0)]
)
def test_bench_return_value_becomes_exit_code(
    ret: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ntk_engine.py").write_text(f"def main(argv):\n    print('ran', argv)\n    return {ret}\n")
    monkeypatch.setenv("NTKIT_BENCH_DIR", str(tmp_path))
    assert main(["bench", "ntk", "--x"]) == code
    assert "ran ['--x']" in capsys.readouterr().out
