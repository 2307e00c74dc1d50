"""MetricsLogger: one flushed JSON object per line, scalar conversion, append, torn lines."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ntkit.errors import ConfigError, DataError
from ntkit.train.log import MetricsLogger, module_state_grid, read_jsonl


def test_records_are_flushed_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLogger(path, tensorboard=False)
    log.log({"loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": np.int64(3), "tag": "a"}, step=7)
    # readable before close: flushed
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["loss"] == 0.5 and rec["acc"] == 0.25 and rec["n"] == 3 and rec["tag"] == "a"
    assert rec["step"] == 7 and isinstance(rec["time"], float)
    log.log({"loss": float("nan"), "hist": torch.arange(3)}, step=8)
    log.close()
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [7, 8]
    assert math.isnan(recs[1]["loss"]) and recs[1]["hist"] == [0, 1, 2]
    with pytest.raises(ValueError, match="closed"):
        log.log({"x": 1})


def test_append_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path, tensorboard=False) as log:
        log.log({"a": 1})
    with MetricsLogger(path, tensorboard=False) as log:  # a resumed run appends
        log.log({"a": 2})
    assert [r["a"] for r in read_jsonl(path)] == [1, 2]
    with MetricsLogger(path, tensorboard=False, append=False) as log:
        log.log({"a": 3})
    assert [r["a"] for r in read_jsonl(path)] == [3]


def test_torn_last_line_is_skipped_but_corruption_elsewhere_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert [r["a"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"a": 1}\n{oops\n{"a": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(path)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_requested_but_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tensorboard=True.*ntkit\[tensorboard\]"):
        MetricsLogger(tmp_path / "m.jsonl", tensorboard=True)
    with MetricsLogger(tmp_path / "m.jsonl") as log:  # auto: silently JSONL only
        assert not log.tensorboard


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_events_written(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "m.jsonl", tensorboard=True) as log:
        log.log({"loss": 1.0}, step=1)
    assert any((tmp_path / "tb").iterdir())


def test_module_state_grid_layers_by_name_or_given() -> None:
    names = ["b.0.h0", "b.0.h1", "b.1.h0", "b.1.h1", "b.1.h2"]
    grid, layers = module_state_grid(names, active=["b.0.h1", "b.1.h0"], pruned=["b.1.h2"])
    assert layers == ["b.0", "b.1"]
    assert grid == [[0.5, 1.0], [1.0, 0.5], [0.0, 0.0]]  # b.0 has 2 modules: its 3rd cell is empty
    grid, layers = module_state_grid(names, ["b.0.h0"], layers=["x", "y", "y", "y", "y"])
    assert layers == ["x", "y"] and [r[1] for r in grid] == [0.5] * 4
    with pytest.raises(ValueError, match="5 names but 1 layers"):
        module_state_grid(names, [], layers=["x"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_lambda_max_scalars_and_active_set_image(tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = [f"blocks.{i}.attn.head{j}" for i in range(3) for j in range(2)]
    lmax = {n: 10.0 ** (k % 4) + 0.25 * k for k, n in enumerate(names)}
    rec = {
        "event": "mat",
        "epoch": 1,
        "lambda_max": lmax,
        "threshold": {"head": 5.0},
        "active": [names[1], names[2], names[5]],
        "retired": [],
    }
    with MetricsLogger(tmp_path / "m.jsonl", tensorboard=True) as log:
        log.log({"run": "mat", "seed": 0, "loss": 2.5}, step=3)
        log.log({"run": "mat", "seed": 0, **rec}, step=7)
        log.log({"run": "vanilla", "seed": 0, "loss": 3.0}, step=3)
    acc = EventAccumulator(str(tmp_path / "tb" / "mat_seed0"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {f"lambda_max/{n}" for n in names} | {"loss", "threshold/head", "epoch"} <= set(tags["scalars"])
    for n in names:
        (ev,) = acc.Scalars(f"lambda_max/{n}")
        assert ev.step == 7 and ev.value == pytest.approx(lmax[n], rel=1e-6)
    assert [e.value for e in acc.Scalars("loss")] == [2.5]  # vanilla's loss went to its own run
    assert tags["images"] == ["active_set"]
    (im,) = acc.Images("active_set")
    pix = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)).convert("L"), dtype=float) / 255
    k = pix.shape[0] // 2  # 2 heads per layer (rows) × 3 layers (columns), k×k pixels per cell
    assert im.step == 7 and pix.shape == (2 * k, 3 * k) and k > 1
    cells = pix[::k, ::k]
    np.testing.assert_allclose(cells, [[0.5, 1.0, 0.5], [1.0, 0.5, 1.0]], atol=0.01)
    vanilla = EventAccumulator(str(tmp_path / "tb" / "vanilla_seed0"))
    vanilla.Reload()
    assert [e.value for e in vanilla.Scalars("loss")] == [3.0]
