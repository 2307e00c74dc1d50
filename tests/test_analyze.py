"""``ntkit analyze``: figures, CSV tables, the information / nuisance split, checkpoint re-use."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from ntkit.analyze import FIGURES, HEADS_COLUMNS, SPECTRUM_COLUMNS, TRAINING_COLUMNS, info_split
from ntkit.cli import main
from ntkit.errors import ConfigError

DATA = Path(os.environ.get("NTKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    if not (DATA / "wikitext-2").exists() and not any(DATA.glob("wiki*")):
        pytest.skip(f"WikiText-2 not under {DATA}")
    out = tmp_path_factory.mktemp("analyze")
    rc = main(["analyze", "--recipe", "mat-bert", "--tier", "ci", "--data-dir", str(DATA), "--out", str(out),
               "--num-samples", "8", "--num-probes", "1", "loop.epochs=1"])
    assert rc == 0
    return out


def test_analyze_writes_valid_pngs(analysed):
    import matplotlib.image as mpimg

    for name in FIGURES:
        data = (analysed / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        img = mpimg.imread(analysed / name)
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, (name, img.shape)
        assert float(img[..., :3].std()) > 0.01, f"{name} is blank"


def test_analyze_csv_columns_and_rows(analysed):
    cols, heads = _read(analysed / "heads.csv")
    assert tuple(cols) == HEADS_COLUMNS
    epochs = sorted({int(r["epoch"]) for r in heads})
    assert epochs == [0, 1]  # initialisation + the one epoch trained
    assert len(heads) == 2 * 4  # mat-bert ci: BERT tiny, 2 layers × 2 heads
    assert all(float(r["lambda_max"]) > 0 and 1 <= float(r["effective_rank"]) <= 8 for r in heads)
    cols, spec = _read(analysed / "spectrum.csv")
    assert tuple(cols) == SPECTRUM_COLUMNS
    for e in epochs:
        rows = [r for r in spec if int(r["epoch"]) == e]
        assert len(rows) == 8  # S eigenvalues
        assert sum(float(r["normalised"]) for r in rows) == pytest.approx(1.0, abs=1e-9)
        parts = [r["part"] for r in rows]
        k = parts.count("information")
        assert k >= 1 and parts == ["information"] * k + ["nuisance"] * (8 - k)
    cols, train = _read(analysed / "training.csv")
    assert tuple(cols) == TRAINING_COLUMNS
    assert [int(r["epoch"]) for r in train] == epochs
    assert all(float(r["ntk_condition_number"]) >= 1 for r in train)
    doc = json.loads((analysed / "analysis.json").read_text())
    assert doc["trained"] is True and doc["epochs"] == [0, 1]


@pytest.mark.slow
def test_analyze_reuses_checkpoints(analysed):
    """A second analysis of the same --out reads the checkpoints instead of training, same numbers."""
    from ntkit.analyze import analyze

    before = _read(analysed / "training.csv")[1]
    doc = analyze("mat-bert", "ci", analysed, DATA, overrides=["loop.epochs=1"], num_samples=8, num_probes=1,
                  progress=False)
    assert doc["trained"] is False
    after = _read(analysed / "training.csv")[1]
    assert [r["ntk_lambda_max"] for r in after] == [r["ntk_lambda_max"] for r in before]
    assert [r["hessian_trace"] for r in after] == [r["hessian_trace"] for r in before]


def test_info_split_by_hand():
    ev = torch.tensor([1.0, 6.0, -1e-18, 3.0], dtype=torch.float64)  # shares 0.6, 0.3, 0.1, 0
    norm, cum, k = info_split(ev, 0.9)
    assert norm.tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=1e-15)
    assert cum.tolist() == pytest.approx([0.6, 0.9, 1.0, 1.0], abs=1e-15)
    assert k == 2  # 0.6 + 0.3 reaches 0.9
    assert info_split(ev, 0.95)[2] == 3 and info_split(ev, 0.5)[2] == 1
    assert info_split(torch.zeros(3), 0.9)[2] == 3
    with pytest.raises(ConfigError, match=r"info_share=0.0"):
        info_split(ev, 0.0)


def test_analyze_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["analyze", "--recipe", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ntkit: error:") and "nope" in err and "\n" not in err
    assert main(["analyze", "--recipe", "mat-bert", "--tier", "ci", "--data-dir", str(tmp_path / "missing"),
                 "--out", str(tmp_path)]) == 2
    assert "no such directory" in capsys.readouterr().err
