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
from ntkit.train.log import MetricsLogger, read_jsonl


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
