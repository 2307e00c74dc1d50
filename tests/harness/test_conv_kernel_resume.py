"""The convolution kernels ``$NTKIT_CONV_WGRAD=tune`` chose are part of a run's checkpoints: a
resumed run computes with them and does not time again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from ntkit.harness import ImageTask, LoopConfig, MethodEntry, train_run
from ntkit.methods.base import METHODS, TrainingMethod, register_method
from ntkit.partition import conv_filters
from ntkit.sparse import _functions as SF


def _task() -> ImageTask:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 10, generator=g)).argmax(1)

    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    return ImageTask(name="convtoy", train_x=x[:64], train_y=y[:64], val_x=x[64:80], val_y=y[64:80],
                     test_x=x[80:], test_y=y[80:], partition_fn=conv_filters, build=build)


@dataclass
class HalfConfig:
    pass


class Half(TrainingMethod):
    """Every other filter active for the whole run."""

    def __init__(self, config: HalfConfig) -> None:
        super().__init__()

    def at_init(self, ctx) -> None:
        self.controller.set_active(torch.arange(len(self.partition)) % 2 == 0)


if "_half_filters" not in METHODS:
    register_method("_half_filters", config=HalfConfig)(Half)

CFG = LoopConfig(epochs=2, batch_size=16, lr=1e-2, eval_every=2, checkpoint_every=1, progress=False)


def _run(ckpt: Path | None = None, resume: bool = False) -> dict:
    return train_run(_task(), "half", MethodEntry("_half_filters", {}), CFG, seed=0, checkpoint_dir=ckpt,
                     resume=resume)


def test_tuned_kernels_are_checkpointed_and_a_resume_reuses_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NTKIT_CONV_WGRAD", "tune-dense")
    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    picks = iter(["dense", "gemm"])  # one choice per conv layer (both are first met in step 0)
    monkeypatch.setattr(SF, "_fastest", lambda fns, prefer: next(picks))
    ref = _run(tmp_path / "ck")
    chosen = SF.conv_kernel_choices()
    assert sorted(chosen.values()) == ["dense", "gemm"]
    ckpts = sorted((tmp_path / "ck").glob("ckpt-*.pt"))
    assert len(ckpts) >= 2
    payload = torch.load(ckpts[0], weights_only=False)
    assert payload["stateful"]["loop"]["kernels"] == chosen
    # a new process: nothing tuned; resume from the first checkpoint must not time anything
    for later in ckpts[1:]:
        later.unlink()
    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    monkeypatch.setattr(SF, "_fastest", lambda fns, prefer: pytest.fail("a resumed run must reuse its kernels"))
    again = _run(tmp_path / "ck", resume=True)
    assert SF.conv_kernel_choices() == chosen
    for key in ("curve", "test_loss", "train_flops"):
        assert again[key] == ref[key], key
