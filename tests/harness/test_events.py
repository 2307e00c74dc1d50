"""The method contract's events in the harness loop: at-init (label-free or not), loss terms,
non-finite losses, corrupt checkpoints — checked by their effect, in process, on a toy task."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from harness_toy import toy_task

from ntkit.harness import LoopConfig, MethodEntry, TrainingDiverged, train_run
from ntkit.methods.base import METHODS, TrainingMethod, register_method


def _task():
    return toy_task(n=96, dim=16, depth=1, heads=2)


@dataclass
class ProbeConfig:
    nan_steps: tuple[int, ...] = ()  # steps whose loss term is NaN
    penalty: float = 0.0  # weight of an L2 penalty on the classifier head
    label_free: bool = False


class Probe(TrainingMethod):
    """Records what the loop handed it."""

    seen: list[dict] = []  # noqa: RUF012 — class-level log shared by the instances of one test

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.config = config
        self.needs_labels = not config.label_free

    def at_init(self, ctx) -> None:
        g = torch.Generator().manual_seed(1)
        inputs = ctx.sample_inputs(4, g)
        Probe.seen.append({"at_init": True, "loss_fn": ctx.loss_fn is not None,
                           "sample_batch": ctx.sample_batch is not None, "inputs": inputs})
        self.history.append({"event": "init"})

    def loss_term(self, ctx, batch, loss):
        if ctx.step in self.config.nan_steps:
            return loss * float("nan")
        if self.config.penalty:
            head = [p for n, p in ctx.model.named_parameters() if n.startswith("classifier")]
            return self.config.penalty * sum((p**2).sum() for p in head)
        return None


if "_probe" not in METHODS:
    register_method("_probe", config=ProbeConfig)(Probe)

CFG = LoopConfig(epochs=2, batch_size=16, lr=1e-2, eval_every=2, progress=False)


def _run(cfg: LoopConfig = CFG, ckpt: Path | None = None, resume: bool = False, **probe) -> dict:
    return train_run(_task(), "probe", MethodEntry("_probe", probe), cfg, seed=0, checkpoint_dir=ckpt,
                     resume=resume)


def test_label_free_method_gets_inputs_only_and_labelled_method_gets_the_loss() -> None:
    Probe.seen.clear()
    _run(label_free=True)
    _run(label_free=False)
    free, labelled = Probe.seen
    assert free["loss_fn"] is False and free["sample_batch"] is False
    assert isinstance(free["inputs"], torch.Tensor) and free["inputs"].shape == (4, 1, 8, 8)  # no labels
    assert labelled["loss_fn"] is True and labelled["sample_batch"] is True


def test_loss_term_is_added_to_the_training_loss() -> None:
    plain, penalised = _run(), _run(penalty=10.0)
    # the penalty shrinks the head weights; the run is otherwise identical (same init, data, steps)
    assert plain["curve"][0]["val_loss"] == penalised["curve"][0]["val_loss"]
    assert plain["curve"][-1]["val_loss"] != penalised["curve"][-1]["val_loss"]
    assert penalised["train_flops"] > plain["train_flops"] * 0.99


def test_non_finite_loss_skips_the_step_and_repeated_ones_abort(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="non-finite loss at step 2"):
        rec = _run(nan_steps=(2,))
    assert rec["nonfinite_steps"] == [2] and math.isfinite(rec["test_loss"])
    assert rec["steps"] == 8  # the run went on
    ck = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(TrainingDiverged) as e:
            _run(LoopConfig(epochs=3, batch_size=16, eval_every=2, max_nonfinite=3, progress=False), ck,
                 nan_steps=(5, 6, 7))
    msg = str(e.value)
    assert "\n" not in msg and "max_nonfinite=3" in msg and "ckpt-000000004.pt" in msg
    assert (ck / "ckpt-000000004.pt").is_file()  # the last good checkpoint is kept


def test_corrupt_newest_checkpoint_falls_back_with_a_warning_and_resume_is_exact(tmp_path: Path) -> None:
    cfg = LoopConfig(epochs=2, batch_size=16, lr=1e-2, eval_every=2, checkpoint_every=1, progress=False)
    ref = _run(cfg)
    ck = tmp_path / "ck"
    _run(cfg, ck)
    ckpts = sorted(ck.glob("ckpt-*.pt"))
    newest = ckpts[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the payload
    newest.write_bytes(bytes(data))
    Probe.seen.clear()
    with pytest.warns(RuntimeWarning, match=f"{newest.name}.*checksum mismatch.*using {ckpts[-2].name}"):
        again = _run(cfg, ck, resume=True)
    assert Probe.seen == []  # at_init is not called again on resume
    for key in ("curve", "test_loss", "train_flops", "method_history", "active_history"):
        assert again[key] == ref[key], key


@dataclass
class SurgeonConfig:
    epoch: int = 0  # remove the first head of every layer at the end of this epoch


class Surgeon(TrainingMethod):
    def __init__(self, config: SurgeonConfig) -> None:
        super().__init__()
        self.config = config

    def on_epoch_end(self, ctx) -> None:
        from ntkit.sparse.surgery import remove_groups

        if ctx.epoch != self.config.epoch:
            return
        firsts = [idx[0] for idx in self.partition.groups_by_layer("head").values()]
        names = [self.partition.names[i] for i in firsts]
        ctx.change_structure(remove_groups(ctx.model, self.partition, names, controller=self.controller))


if "_surgeon" not in METHODS:
    register_method("_surgeon", config=SurgeonConfig)(Surgeon)


def test_structure_change_rebuilds_the_loop_and_resumes_through_surgery(tmp_path: Path) -> None:
    task = _task()
    cfg = LoopConfig(epochs=3, batch_size=16, lr=1e-2, eval_every=2, checkpoint_every=3, progress=False)
    dense = train_run(task, "d", MethodEntry("vanilla"), cfg, seed=0)
    rec = train_run(task, "s", MethodEntry("_surgeon"), cfg, seed=0, checkpoint_dir=tmp_path / "ref")
    assert rec["structure_changes"] == [["blocks.0.attn.head0"]] or len(rec["structure_changes"][0]) == 1
    assert rec["num_params"] < dense["num_params"]
    assert len(rec["module_names"]) == len(dense["module_names"]) - 1
    # after surgery the smaller model trained on (its curve moved) and cost fewer FLOPs per step
    assert rec["curve"][-1]["val_loss"] != rec["curve"][-2]["val_loss"]
    assert rec["train_flops"] < dense["train_flops"]
    # resume from the checkpoint taken after the surgery (step 6): replay, load, finish identically
    ck = tmp_path / "ck"
    train_run(task, "s", MethodEntry("_surgeon"), cfg, seed=0, checkpoint_dir=ck)
    for p in sorted(ck.glob("ckpt-*"))[-2:]:
        if "000000012" in p.name:
            p.unlink()
    assert max(int(p.name[5:14]) for p in ck.glob("ckpt-*.pt")) > 4  # a post-surgery checkpoint remains
    again = train_run(task, "s", MethodEntry("_surgeon"), cfg, seed=0, checkpoint_dir=ck, resume=True)
    for key in ("curve", "test_loss", "train_flops", "num_params", "structure_changes"):
        assert again[key] == rec[key], key
