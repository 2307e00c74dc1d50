"""Checkpoints: atomic writes, keep-last-k, RNG capture, bit-identical resume (in-process and
after SIGKILL)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ntkit.errors import DataError
from ntkit.train import (
    CheckpointManager,
    atomic_write_text,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_resume_job import train

TOTAL = 20  # 7 batches per epoch: resume points cross epoch boundaries


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _no_temp_files(d: Path) -> bool:
    return not [p for p in d.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- atomicity
def test_failing_text_write_leaves_previous_file(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")

    class Boom(Exception):
        pass

    from ntkit.train.checkpoint import atomic_write

    def bad(f) -> None:
        f.write(b"partial")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(p, bad)
    assert p.read_text() == "old" and _no_temp_files(tmp_path)


def test_failing_checkpoint_write_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nn.Linear(3, 2)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, step=1)
    before = _weights(model)
    with torch.no_grad():
        model.weight.add_(1.0)

    def torn_save(obj, f, *a, **k) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    fresh = nn.Linear(3, 2)
    ck = load_checkpoint(path, fresh)
    assert ck.step == 1
    _assert_equal(_weights(fresh), before)
    assert _no_temp_files(tmp_path)


def test_manager_keeps_last_k_and_skips_corrupt_newest(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for s in range(5):
        mgr.save(model, step=s, extra={"s": s})
    assert [s for s, _ in mgr.checkpoints()] == [3, 4]
    (tmp_path / ".ckpt-000000005.pt.tmp-abc").write_bytes(b"torn")  # a killed writer's leftover
    mgr.save(model, step=4, extra={"s": 4})
    assert _no_temp_files(tmp_path)
    # a torn/foreign newer file is not "good": resume falls back to the newest loadable one
    mgr.path_for(7).write_bytes(b"garbage")
    assert mgr.latest() == mgr.path_for(4)
    ck = mgr.resume(nn.Linear(2, 2))
    assert ck is not None and ck.step == 4 and ck.extra == {"s": 4}
    # saving again never deletes the checkpoint just written, even if junk has a higher step
    mgr.save(model, step=5)
    assert mgr.path_for(5).exists() and mgr.latest() == mgr.path_for(5)
    assert CheckpointManager(tmp_path / "empty").resume(model) is None


def test_resume_applies_the_retention_a_killed_writer_did_not(tmp_path: Path) -> None:
    """Killed after writing a checkpoint but before pruning: three files; resume keeps the two newest."""
    model = nn.Linear(2, 2)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for s in range(3):
        save_checkpoint(mgr.path_for(s), model, step=s)  # what save() writes, without its pruning
    ck = mgr.resume(nn.Linear(2, 2))
    assert ck is not None and ck.step == 2
    assert [s for s, _ in mgr.checkpoints()] == [1, 2]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == ["ckpt-000000001.pt.sha256", "ckpt-000000002.pt.sha256"]


def test_load_errors_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt", nn.Linear(1, 1))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="unreadable"):
        load_checkpoint(bad, nn.Linear(1, 1))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="not an ntkit checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt", nn.Linear(1, 1))
    save_checkpoint(tmp_path / "ok.pt", nn.Linear(1, 1))
    with pytest.raises(DataError, match="no state for 'sampler'"):
        load_checkpoint(tmp_path / "ok.pt", nn.Linear(1, 1), stateful={"sampler": nn.Linear(1, 1)})


class _Custom:
    def __init__(self, v: int) -> None:
        self.v = v


def test_custom_objects_need_trusted(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", nn.Linear(1, 1), step=3, extra={"obj": _Custom(5)})
    with pytest.raises(DataError, match="trusted=True"):
        load_checkpoint(path, nn.Linear(1, 1))
    assert load_checkpoint(path, nn.Linear(1, 1), trusted=True).extra["obj"].v == 5


def test_rng_state_round_trip() -> None:
    state = get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# --------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _weights(train(tmp_path_factory.mktemp("ref"), TOTAL))


@pytest.mark.parametrize("stop", [3, 7, 12])
def test_stop_and_resume_in_process_is_bit_identical(tmp_path: Path, reference: dict, stop: int) -> None:
    partial = _weights(train(tmp_path, TOTAL, stop_after=stop))
    assert any(not torch.equal(partial[k], reference[k]) for k in reference)  # it really stopped early
    torch.manual_seed(999)  # disturb global RNGs: resume must restore them
    np.random.seed(999)
    random.seed(999)
    _assert_equal(_weights(train(tmp_path, TOTAL)), reference)


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, reference: dict) -> None:
    job = [
        sys.executable,
        str(HERE / "train_resume_job.py"),
        str(tmp_path),
        str(TOTAL),
        str(torch.get_num_threads()),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*job, "--slow-after", "5"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.strip() == "saved 5":
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "final.pt").exists()
    ckpts = CheckpointManager(tmp_path).checkpoints()
    assert ckpts and ckpts[-1][0] >= 5
    # resume from what the killed process left on disk (in this process: the disk state is the test)
    _assert_equal(_weights(train(tmp_path, TOTAL)), reference)
    assert _no_temp_files(tmp_path)  # a temporary of a write the kill interrupted is cleaned up
