"""Through the real CLI: a run killed with SIGKILL and resumed equals an uninterrupted one, and a
2-process torchrun equals one process with the doubled batch."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# the wall-clock fields are the only ones allowed to differ
WALL = {"wall_s", "overhead_wall_s", "wall_clock_s", "started_utc", "finished_utc", "time"}
CI = ["--tier", "ci"]




def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


def _strip(x: object) -> object:
    if isinstance(x, dict):
        # wall-clock fields, and the rendered "wall s" table columns
        return {k: _strip(v) for k, v in x.items() if k not in WALL and "wall" not in k}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _results(out: Path) -> dict:
    doc = json.loads((out / "results.json").read_text())
    return _strip(doc["results"])  # type: ignore[return-value]


def _final_weights(out: Path, run: str) -> dict[str, torch.Tensor]:
    ckpts = sorted((out / "checkpoints" / run).glob("ckpt-*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["model"]


def _n_ckpts(out: Path) -> int:
    return len(list((out / "checkpoints").rglob("ckpt-*.pt"))) if (out / "checkpoints").is_dir() else 0


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path: Path, data_dir: Path) -> None:
    data = str(data_dir)
    args = [sys.executable, "-m", "ntkit", "run", "mat-bert", *CI, "--data-dir", data,
            "loop.checkpoint_every=1"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([*args, "--out", str(ref)], check=True, env=_env(), capture_output=True)
    total = _n_ckpts(ref)  # checkpoints kept at the end: 2 per (method, seed)
    # kill after a random number of checkpoints were written (any step of any method)
    rng = random.Random()
    seed = rng.randrange(10**6)
    target = random.Random(seed).randint(1, 4 * 8 - 2)  # 4 methods × 8 steps
    proc = subprocess.Popen([*args, "--out", str(killed)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    written = 0
    deadline = time.time() + 300
    seen: set[str] = set()
    while proc.poll() is None and time.time() < deadline:
        names = {p.name + p.parent.name for p in (killed / "checkpoints").rglob("ckpt-*.pt")} \
            if (killed / "checkpoints").is_dir() else set()
        seen |= names
        written = len(seen)
        if written >= target:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode != 0 or written < target, f"kill seed {seed}: the run finished before the kill"
    assert not (killed / "results.json").exists()
    # a fresh start into the killed run's directory is refused (it would lose the checkpoints)
    r = subprocess.run([*args, "--out", str(killed)], check=False, env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    subprocess.run([*args, "--out", str(killed), "--resume"], check=True, env=_env(), capture_output=True)
    assert _results(killed) == _results(ref), f"kill seed {seed} (after {written} checkpoints)"
    for run in ("vanilla_seed0", "rand_seed0", "multirate_seed0", "mat_seed0"):
        a, b = _final_weights(ref, run), _final_weights(killed, run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (run, seed)
    assert total == _n_ckpts(killed)


def test_resume_refuses_a_directory_of_another_recipe_or_config(tmp_path: Path, data_dir: Path) -> None:
    data = str(data_dir)
    out = tmp_path / "run"
    base = [sys.executable, "-m", "ntkit", "run"]
    subprocess.run([*base, "mat-bert", *CI, "--data-dir", data, "--out", str(out), "methods=vanilla"],
                   check=True, env=_env(), capture_output=True)
    for extra, words in (
        (["mat-vgg", *CI], "recipe 'mat-bert'"),
        (["mat-bert", *CI, "methods=vanilla", "loop.lr=0.5"], "another config"),
    ):
        r = subprocess.run([*base, *extra, "--data-dir", data, "--out", str(out), "--resume"], check=False, env=_env(),
                           capture_output=True, text=True)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # the checkpoints are all still there
    assert _n_ckpts(out) == 2


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_match_one_process_with_the_doubled_batch(tmp_path: Path, data_dir: Path) -> None:
    data = str(data_dir)
    common = ["mat-bert", *CI, "--data-dir", data, "dropout=0", "methods=vanilla,mat"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "ntkit", "run", *common, "--out", str(one), "loop.batch_size=16"],
                   check=True, env=_env(), capture_output=True)
    subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ntkit", "run", *common,
                    "--out", str(two), "loop.batch_size=8"], check=True, env=_env(), capture_output=True)
    d1, d2 = (json.loads((p / "results.json").read_text()) for p in (one, two))
    assert d1["distributed"] == {"world_size": 1, "backend": None}
    assert d2["distributed"] == {"world_size": 2, "backend": "gloo"}
    r1, r2 = d1["results"]["records"], d2["results"]["records"]
    assert [r["method"] for r in r1] == [r["method"] for r in r2] == ["vanilla", "mat"]
    for a, b in zip(r1, r2):
        # the same global batches: identical executed FLOPs; losses equal to float32 reduction order
        assert a["train_flops"] == b["train_flops"] and a["overhead_flops"] == b["overhead_flops"]
        assert a["steps"] == b["steps"]
        va, vb = [p["val_loss"] for p in a["curve"]], [p["val_loss"] for p in b["curve"]]
        assert va == pytest.approx(vb, rel=1e-5, abs=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
        assert a["active_history"] == b["active_history"]
    # the training moved: the runs are not trivially equal because nothing happened
    assert r1[0]["curve"][-1]["val_loss"] < r1[0]["curve"][0]["val_loss"] - 1e-3
    # only rank 0 wrote: one metrics log, no rank directories left behind
    assert (two / "metrics.jsonl").is_file() and not list(two.glob("*rank*"))
