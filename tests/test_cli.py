"""The `ntkit` CLI and the recipe runner: listing, help, one-line user errors (exit 2), typed
overrides, run directory layout, report re-rendering, bench dispatch, and the report helpers."""

from __future__ import annotations

import enum
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ntkit.cli import main
from ntkit.errors import ConfigError, check
from ntkit.recipes import (
    RECIPES,
    Recipe,
    aggregate_seeds,
    apply_overrides,
    get_recipe,
    line_plot,
    mean_std,
    register_recipe,
    resolve_config,
)

PNG = b"\x89PNG\r\n\x1a\n"


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TinyConfig:
    steps: int = 2
    scale: float = 1.0
    name: str = "x"
    flag: bool = False
    seeds: tuple[int, ...] = (0,)
    limit: int | None = None
    mode: Literal["a", "b"] = "a"
    color: Color = Color.RED
    optim: Optim = field(default_factory=Optim)
    widths: list[int] = field(default_factory=lambda: [4, 8])

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", self.steps, "an int >= 1")


def _tiny(cfg: TinyConfig, out_dir: Path, data_dir: Path | None) -> dict:
    runs = [{"seed": s, "score": cfg.scale * (s + 1), "steps": cfg.steps} for s in cfg.seeds]
    line_plot(out_dir / "curve.png", {"score": ([0, 1, 2], [0.0, cfg.scale, 2 * cfg.scale])}, xlabel="step")
    return {
        "summary": {"mean score": mean_std(r["score"] for r in runs)["mean"], "data_dir": data_dir},
        "tables": {"Scores": [{"method": "tiny", "score": aggregate_seeds(runs)["score"]}]},
        "plots": ["curve.png"],
        "notes": ["a test recipe"],
        "runs": runs,
    }


def _data(cfg: TinyConfig, out_dir: Path, data_dir: Path | None) -> dict:
    from ntkit.data import load_dataset

    d = load_dataset("mnist", data_dir=data_dir, limit=10, test_limit=10)
    return {"summary": {"train": len(d.train_x)}}


def _custom_report(doc: dict, out_dir: Path) -> str:
    return f"# custom {doc['tier']} {doc['results']['summary']['mean score']}\n"


_TIERS = {t: TinyConfig(steps=i + 1) for i, t in enumerate(("ci", "quick", "cpu", "paper"))}
if "_test-tiny" not in RECIPES:
    register_recipe("_test-tiny", tiers=_TIERS, description="test recipe")(_tiny)
    register_recipe("_test-data", tiers=_TIERS, description="loads mnist")(_data)
    register_recipe("_test-custom", tiers=_TIERS, report=_custom_report)(_tiny)


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ntkit: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- help and ls
@pytest.mark.parametrize("argv", [[], ["ls"], ["demo"], ["run"], ["bench"], ["report"]])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ntkit") and len(out.splitlines()) > 3


def test_ls_recipes_lists_registered(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "_test-tiny" in out and "test recipe" in out


def test_ls_everything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for section in ("models:", "datasets:", "methods:", "recipes:"):
        assert section in out
    assert "  vit_tiny" in out and "  digits" in out
    assert main(["ls", "models"]) == 0
    assert "vit_tiny" in capsys.readouterr().out.split()


def test_python_dash_m(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ntkit", "run", "no-such-recipe"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "no-such-recipe" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- user errors → exit 2, one line
def test_unknown_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "nope", "--tier", "ci", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "recipe='nope'", "_test-tiny")
    assert not (tmp_path / "o").exists()


def test_bad_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "_test-tiny", "--tier", "huge", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "huge", "ci")


def test_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "run",
                "_test-tiny",
                "--tier",
                "ci",
                "--data-dir",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    _one_line_error(capsys, "data_dir=", "nowhere")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("nosuch=1", ("nosuch='1'", "unknown config key", "steps")),
        ("steps=many", ("steps='many'", "int")),
        ("steps=0", ("steps=0", ">= 1")),
        ("mode=c", ("mode='c'", "a, b")),
        ("optim.lr=fast", ("optim.lr='fast'", "float")),
        ("optim.betas=0.9", ("optim.betas='0.9'", "2 comma-separated")),
        ("stepsonly", ("'stepsonly'", "key=value")),
    ],
)
def test_bad_override(
    override: str, needles: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "_test-tiny", "--tier", "ci", "--out", str(tmp_path), override]) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "results.json").exists()


def test_corrupt_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mnist.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    assert (
        main(["run", "_test-data", "--tier", "ci", "--data-dir", str(data), "--out", str(tmp_path / "o")])
        == 2
    )
    _one_line_error(capsys, "mnist.npz")


def test_unknown_model_in_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "model=no_such_net"]) == 2
    _one_line_error(capsys, "no_such_net")


def test_report_on_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    _one_line_error(capsys, "results.json")
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    _one_line_error(capsys, "corrupt JSON")


# --------------------------------------------------------------------------- run, report
def test_run_writes_config_results_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = [
        "run",
        "_test-tiny",
        "--tier",
        "quick",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(out),
        "scale=2.5",
        "seeds=0,1,2",
        "flag=yes",
        "limit=none",
        "mode=b",
        "color=BLUE",
        "optim.lr=3e-4",
        "optim.betas=(0.8,0.99)",
        "widths=[1,2,3]",
        "name=hello world",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| method | score |" in printed and "5 ± 2.5" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"] == "_test-tiny" and cfg["tier"] == "quick"
    assert cfg["config"] == {
        "steps": 2,
        "scale": 2.5,
        "name": "hello world",
        "flag": True,
        "seeds": [0, 1, 2],
        "limit": None,
        "mode": "b",
        "color": "blue",
        "optim": {"lr": 3e-4, "betas": [0.8, 0.99]},
        "widths": [1, 2, 3],
    }
    res = json.loads((out / "results.json").read_text())
    assert res["config"] == cfg["config"] and res["wall_clock_s"] >= 0
    assert [r["score"] for r in res["results"]["runs"]] == [2.5, 5.0, 7.5]
    assert res["results"]["summary"]["data_dir"] == str(tmp_path.resolve())
    report = (out / "report.md").read_text()
    assert "# _test-tiny" in report and "![curve](curve.png)" in report and "a test recipe" in report
    assert "| optim.lr | 0.0003 |" in report
    assert (out / "curve.png").read_bytes().startswith(PNG)
    # re-render from results.json
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_demo_compares_methods_and_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tier", "ci", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in ("vanilla", "mat", "rand", "multirate", "test top-1", "mNTK overhead"):
        assert word in out
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    methods = {r["method"] for r in res["records"]}
    assert methods == {"vanilla", "mat", "rand", "rand_replay", "multirate"}
    for r in res["records"]:
        assert r["backward_flops"] > r["forward_flops"] > 0
        assert 0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["test_loss"])
    assert (tmp_path / "report.md").exists() and (tmp_path / "config.json").exists()


# --------------------------------------------------------------------------- bench dispatch
def test_bench_dispatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ntk_engine.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Cfg:\n    n: int = 1\n\n"  # dataclasses need the module in sys.modules
        "def main(argv):\n    print('ARGS', argv, Cfg())\n    return 3 if '--fail' in argv else 0\n"
    )
    monkeypatch.setenv("NTKIT_BENCH_DIR", str(tmp_path))
    assert main(["bench", "ntk", "--size", "2", "--help"]) == 0
    assert "ARGS ['--size', '2', '--help'] Cfg(n=1)" in capsys.readouterr().out
    assert main(["bench", "ntk", "--fail"]) == 3
    capsys.readouterr()
    assert main(["bench", "backward"]) == 2
    _one_line_error(capsys, "partial_backward.py", "not found")


# --------------------------------------------------------------------------- runner API
def test_overrides_api() -> None:
    cfg = resolve_config("_test-tiny", "cpu", ["steps=1e2", "optim.lr=0.5"])
    assert cfg.steps == 100 and cfg.optim.lr == 0.5 and cfg.optim.betas == (0.9, 0.999)
    assert get_recipe("_test-tiny").config("cpu").steps == 3  # presets are not mutated
    with pytest.raises(ConfigError, match=r"steps='1.5': expected an int"):
        apply_overrides(TinyConfig(), {"steps": "1.5"})
    with pytest.raises(ConfigError, match="flag='maybe'"):
        apply_overrides(TinyConfig(), ["flag=maybe"])
    with pytest.raises(ConfigError, match="optim='1'.*optim.<field>"):
        apply_overrides(TinyConfig(), ["optim=1"])
    with pytest.raises(ConfigError, match="tier='gpu'"):
        resolve_config("_test-tiny", "gpu")


def test_recipe_registration_is_validated() -> None:
    with pytest.raises(ValueError, match="missing \\['paper'\\]"):
        Recipe.create("x", _tiny, {t: TinyConfig() for t in ("ci", "quick", "cpu")})
    with pytest.raises(TypeError, match="one config dataclass"):
        Recipe.create("x", _tiny, {**_TIERS, "paper": Optim()})
    with pytest.raises(ValueError, match="registered twice"):
        register_recipe("_test-tiny", tiers=_TIERS)(_tiny)


def test_config_file_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("scale: 0.5\nseeds: [3, 4]\nlimit: null\noptim:\n  lr: 0.01\n  betas: [0.5, 0.6]\n")
    assert main(["run", "_test-tiny", "--tier", "ci", "--config", str(cfg_file), "scale=2", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert (
        cfg["scale"] == 2.0 and cfg["seeds"] == [3, 4] and cfg["optim"] == {"lr": 0.01, "betas": [0.5, 0.6]}
    )
    cfg_file.write_text("- not\n- a mapping\n")
    assert main(["run", "_test-tiny", "--config", str(cfg_file), "--dry-run"]) == 2
    _one_line_error(capsys, "expected a mapping")
    cfg_file.write_text("steps: [1, 2]\n")
    assert main(["run", "_test-tiny", "--config", str(cfg_file), "--dry-run"]) == 2
    _one_line_error(capsys, "steps=", "int")


def test_custom_report_renderer(tmp_path: Path) -> None:
    assert main(["run", "_test-custom", "--tier", "paper", "--out", str(tmp_path), "scale=3"]) == 0
    assert (tmp_path / "report.md").read_text() == "# custom paper 3.0\n"
    (tmp_path / "report.md").write_text("stale")
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == "# custom paper 3.0\n"
