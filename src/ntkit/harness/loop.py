"""The training loop every method runs in, written out in full (torchtune style).

One call of :func:`train_run` trains one (method, seed) on a :class:`~ntkit.harness.Task`:

1. ``torch.manual_seed(seed)`` → ``task.build_model()`` (identical initial weights for every
   method), ``task.partition(model)``, ``ntkit.sparse.attach`` (the controller whose partial
   backward executes only active modules' weight-gradient work), the sliced optimizer
   (``SlicedAdamW`` or ``SlicedSGD``: ``LoopConfig.optimizer``) and the method
   (``build_method(entry.method, config)``) bound to (model, partition, controller).
2. A fresh run calls ``method.at_init`` once (SNIP's mask, NTT's sparse init; label-free methods
   see no labels), then validates at step 0.
3. Data: the batches of epoch e are the consecutive slices of
   ``SeededBatchSampler(N, B·world, seed).order(e)`` (a permutation that depends only on
   (seed, e)); MLM masking and image augmentation draw from ``Generator(seed·1000 + e + 500)``.
   Under ``torch.distributed`` every rank builds the same global batch and keeps its share
   (``task.shard``), so the data seen is independent of the world size.
4. Per step: ``method.before_step`` → forward (counted as "forward") → ``method.loss_term``
   added to the task loss → backward (counted as "backward": what the partial backward actually
   ran) → gradient all-reduce (mean over ranks, the loss weighted by each rank's share of the
   global loss units) → optional clipping → ``opt.step(lr_scale=method.lr_scale())`` →
   ``method.after_step``. Epoch end: ``method.on_epoch_end`` in eval mode (the mNTK engine needs
   sample-independent forward passes), then validation.
5. Validation loss every ``eval_every`` steps and at every epoch end; the best-validation weights
   are kept for the test metric (a structure change resets the best: the weights before surgery
   are not the model being trained).

Resume. With a checkpoint directory, the full state (model, optimizer, method, controller sets,
RNGs, data position, FLOP books, curves, best weights, surgery history, the convolution kernels
``$NTKIT_CONV_WGRAD=tune`` chose) is saved through
:class:`ntkit.train.CheckpointManager` (atomic, checksummed; the last ``keep_checkpoints`` kept)
at every epoch end and every ``checkpoint_every`` steps; :func:`train_run` with ``resume=True``
continues from the newest good checkpoint and finishes with the record an uninterrupted run
writes (same metrics bit for bit, same final weights; only wall-clock fields differ). One
caveat: under ``tune`` (the default), a convolution problem first met after the checkpoint is timed
anew, and a near-tie may pick another kernel than the interrupted process would have (the last
bits then differ); a fixed ``NTKIT_CONV_WGRAD`` (``native``, ``gemm``, ``dense``) has no caveat.

Faults. A step whose loss (task loss + method term) is NaN/Inf is skipped (no backward, no
update) with a warning naming the run and step; ``max_nonfinite`` consecutive ones abort the
run with :class:`TrainingDiverged` (one line, naming the last good checkpoint, which is kept).

FLOP accounting: executed matmul/conv FLOPs counted by ``torch.utils.flop_counter`` through
:mod:`ntkit.train.flops`; a step's count depends only on the task's work key and the
controller's (active, pruned) sets, except for MoE models whose expert FLOPs follow routing, so
a count is re-used for an equal signature (exact, and it keeps the counter's dispatch overhead
out of the wall-clock). Under ``torch.distributed`` training FLOPs are summed over ranks (the
global batch's work); overhead (the method's mNTK evaluations, run identically on every rank
on the same samples) is counted once.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntkit.errors import NtkitError, check
from ntkit.harness.compose import MethodEntry
from ntkit.harness.tasks import Task
from ntkit.train import dist

__all__ = [
    "LoopConfig",
    "TrainingDiverged",
    "compare",
    "finalize",
    "first_crossing",
    "interpolate_at",
    "lr_factor",
    "train_run",
]


class TrainingDiverged(NtkitError, RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


@dataclass
class LoopConfig:
    """Hyper-parameters of one training run (identical for every method of a comparison).

    Attributes:
        epochs: passes over the training set (≥ 1).
        batch_size: samples per step *per process* (≥ 1); under ``torchrun`` the global batch is
            ``batch_size × world_size``.
        optimizer: "adamw" (:class:`~ntkit.sparse.SlicedAdamW`, decoupled weight decay) or "sgd"
            (:class:`~ntkit.sparse.SlicedSGD`: momentum, L2 weight decay added to the gradient —
            the paper's VGG optimizer, seed 000 §B.1). Both touch only the active slices.
        lr: peak learning rate.
        weight_decay: AdamW's decoupled decay, or SGD's L2 coefficient.
        betas, eps: AdamW settings (unused by SGD).
        momentum: SGD momentum in [0, 1) (unused by AdamW; dampening 0, no Nesterov).
        schedule: "constant", "linear" (decay to 0 at the last step), "cosine" (to 0) or "step"
            (×``lr_gamma`` at each of ``lr_milestones``; defaults ×0.1 at 1/2 and 3/4 of
            training, the VGG recipe of seed 000 §B.1).
        lr_milestones: for "step", the fractions of training (after warm-up) in (0, 1), increasing,
            at which the learning rate is multiplied by ``lr_gamma``.
        lr_gamma: the step schedule's factor, in (0, 1].
        warmup_steps: linear warm-up steps (before the decay).
        steps_per_epoch: cap on steps per epoch (0 = the full training set).
        eval_every: validation every this many steps (0 = only at epoch ends).
        grad_clip: global gradient-norm clip (0 = off).
        budget_fracs: compute budgets as fractions of vanilla's executed training FLOPs.
        checkpoint_every: also checkpoint every this many steps inside an epoch (0 = only at
            epoch ends); only when the run has a checkpoint directory.
        keep_checkpoints: checkpoints kept per run (≥ 1).
        max_nonfinite: consecutive non-finite losses that abort the run (≥ 1).
        progress: show a tqdm bar.
    """

    epochs: int = 3
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.1
    warmup_steps: int = 0
    steps_per_epoch: int = 0
    eval_every: int = 0
    grad_clip: float = 0.0
    budget_fracs: tuple[float, ...] = (0.25, 0.5, 0.75)
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_nonfinite: int = 3
    progress: bool = True

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(is_int(self.epochs) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(is_num(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        check(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
              "a number >= 0")
        check(len(self.betas) == 2 and all(is_num(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
              "two numbers in [0, 1)")
        check(is_num(self.eps) and self.eps >= 0, "eps", self.eps, "a number >= 0")
        check(self.optimizer in ("adamw", "sgd"), "optimizer", self.optimizer, "'adamw' or 'sgd'")
        check(is_num(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        ms = tuple(self.lr_milestones) if isinstance(self.lr_milestones, (tuple, list)) else None
        check(ms is not None and all(is_num(x) and 0 < x < 1 for x in ms)
              and all(a < b for a, b in itertools.pairwise(ms)), "lr_milestones", self.lr_milestones,
              "increasing fractions of training in (0, 1)")
        check(is_num(self.lr_gamma) and 0 < self.lr_gamma <= 1, "lr_gamma", self.lr_gamma, "a number in (0, 1]")
        check(self.schedule in ("constant", "linear", "cosine", "step"), "schedule", self.schedule,
              "one of constant, linear, cosine, step")
        for name in ("warmup_steps", "steps_per_epoch", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            check(is_int(v) and v >= 0, name, v, "an integer >= 0")
        check(is_num(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0")
        check(len(self.budget_fracs) >= 1 and all(is_num(f) and f > 0 for f in self.budget_fracs),
              "budget_fracs", self.budget_fracs, "fractions > 0")
        check(is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "keep_checkpoints",
              self.keep_checkpoints, "an integer >= 1")
        check(is_int(self.max_nonfinite) and self.max_nonfinite >= 1, "max_nonfinite", self.max_nonfinite,
              "an integer >= 1")


def lr_factor(
    schedule: str,
    step: int,
    total: int,
    warmup: int,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at 0-based ``step`` of ``total`` steps (``milestones``
    / ``gamma``: the "step" schedule's, fractions of the steps after warm-up)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return max(1.0 - t, 0.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return gamma ** sum(1 for m in milestones if t >= m)
    return 1.0


class _FlopBook:
    """Executed FLOPs per phase ("forward", "backward", "overhead") plus the wall time spent in
    overhead. Uses :class:`ntkit.train.flops.FlopCounter` phases."""

    def __init__(self) -> None:
        from ntkit.train.flops import FlopCounter

        self.counter = FlopCounter()
        self.overhead_wall_s = 0.0

    def phase(self, name: str):
        return self.counter.phase(name)

    def total(self, name: str) -> int:
        return int(self.counter.totals().get(name, 0))

    @contextlib.contextmanager
    def overhead(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.counter.phase("overhead"):
            yield
        self.overhead_wall_s += time.perf_counter() - t0

    def state_dict(self) -> dict:
        return {"counter": self.counter.state_dict(), "overhead_wall_s": self.overhead_wall_s}

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state["counter"])
        self.overhead_wall_s = float(state["overhead_wall_s"])


class _RunState:
    """Everything the loop accumulates, with ``state_dict`` / ``load_state_dict`` for exact resume."""

    def __init__(self) -> None:
        self.step = 0  # the next step to run
        self.fwd_flops = 0
        self.bwd_flops = 0
        self.cache: dict[tuple, tuple[int, int]] = {}
        self.curve: list[dict[str, float]] = []
        self.active_hist: list[list[float]] = []  # per epoch, per module: share of the epoch's steps active
        self.active_sum: list[float] = []  # per module, active steps so far in this epoch
        self.active_n = 0
        self.pruned_hist: list[list[bool]] = []
        self.active_frac_steps: list[float] = []
        self.epoch_train_acc: list[float | None] = []
        self.epoch_flops: list[int] = []
        self.correct = 0
        self.counted = 0
        self.nonfinite = 0  # consecutive
        self.nonfinite_steps: list[int] = []
        self.log_records: list[dict] = []
        self.structure: list[list[str]] = []  # removed module names, one list per surgery
        self.best: dict[str, Any] = {"val_loss": math.inf, "step": -1, "flops": 0, "state": None, "pruned": None}
        self.wall_s = 0.0
        self.ctl_sets: tuple[list[bool], list[bool]] = ([], [])  # (active, pruned) at the last save
        self.kernels: dict[str, str] = {}  # the convolution kernels tuned so far (ntkit.sparse.conv_kernel_choices)
        self.mask_gen = torch.Generator()

    def state_dict(self) -> dict:
        best = dict(self.best)
        return {
            **{k: getattr(self, k) for k in (
                "step", "fwd_flops", "bwd_flops", "curve", "active_hist", "active_sum", "active_n", "pruned_hist",
                "active_frac_steps",
                "epoch_train_acc", "epoch_flops", "correct", "counted", "nonfinite", "nonfinite_steps",
                "log_records", "structure", "wall_s", "ctl_sets", "kernels")},
            "cache": [[list(_listify(k)), list(v)] for k, v in self.cache.items()],
            "best": best,
            "mask_gen": self.mask_gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k == "cache":
                self.cache = {_tupleify(key): (int(a), int(b)) for key, (a, b) in v}
            elif k == "mask_gen":
                self.mask_gen.set_state(v)
            else:
                setattr(self, k, v)


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupleify(x: Any) -> Any:
    return tuple(_tupleify(v) for v in x) if isinstance(x, (tuple, list)) else x


def _set_lr(opt: Any, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _all_reduce_grads(model: nn.Module) -> None:
    """Mean of every computed gradient over ranks (one flat buffer; a no-op in one process)."""
    if not dist.is_distributed():
        return
    import torch.distributed as tdist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    tdist.all_reduce(flat)
    flat.div_(dist.world_size())
    for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(f)


def _global_sum(*values: float) -> list[float]:
    """Sums over ranks (float64; identity in one process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_distributed():
        import torch.distributed as tdist

        tdist.all_reduce(t)
    return t.tolist()


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so evaluation agrees."""
    if not dist.is_distributed():
        return
    import torch.distributed as tdist

    for b in model.buffers():
        if b.is_floating_point() or b.dtype in (torch.int64, torch.int32):
            tdist.broadcast(b.data, src=0)


def _carry_over(old_opt: Any, new_opt: Any, change: Any) -> None:
    from ntkit.sparse.surgery import carry_optimizer_state

    carry_optimizer_state(old_opt, new_opt, change)


def train_run(
    task: Task,
    label: str,
    entry: MethodEntry,
    cfg: LoopConfig,
    seed: int,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    logger: Any = None,
    desc: str = "",
) -> dict[str, Any]:
    """Train method ``entry`` (shown as ``label``) on ``task`` with ``seed``; return the run record
    (fields in docs/results.md). Compute-to-target and the budget columns are filled in later
    by :func:`finalize`.

    Args:
        checkpoint_dir: where this run's checkpoints live (None = no checkpoints).
        resume: continue from the newest good checkpoint in ``checkpoint_dir`` (a fresh start
            when there is none).
        logger: a :class:`ntkit.train.MetricsLogger` (or anything with ``log(dict)``), rank 0 only.
    """
    from ntkit.methods import build_method
    from ntkit.methods.base import LoopContext
    from ntkit.sparse import SlicedAdamW, SlicedSGD, attach, conv_kernel_choices, load_conv_kernel_choices
    from ntkit.train.checkpoint import CheckpointManager
    from ntkit.train.sampler import SeededBatchSampler

    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    torch.manual_seed(seed)
    model = task.build_model()
    partition = task.partition(model)
    st = _RunState()
    book = _FlopBook()
    manager = None if checkpoint_dir is None else CheckpointManager(checkpoint_dir, keep_last=cfg.keep_checkpoints)
    payload = manager.newest_payload() if (manager is not None and resume) else None
    for removed in [] if payload is None else payload["stateful"]["loop"]["structure"]:
        # replay the surgery the run had done, so the saved state_dict fits
        from ntkit.sparse.surgery import remove_groups

        change = remove_groups(model, partition, removed)
        model, partition = change.model, change.partition
    ctl = attach(model, partition)

    def make_opt() -> Any:
        if cfg.optimizer == "sgd":
            return SlicedSGD(model, ctl, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return SlicedAdamW(model, ctl, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

    opt = make_opt()
    method = build_method(entry.method, entry.with_seed(seed))
    method.bind(model, partition, ctl)

    n = task.num_train
    gb = cfg.batch_size * world
    sampler = SeededBatchSampler(n, gb, seed=seed)
    spe = len(sampler)
    if cfg.steps_per_epoch:
        spe = min(spe, cfg.steps_per_epoch)
    total_steps = spe * cfg.epochs
    eval_every = cfg.eval_every or spe
    run_name = f"{label} seed {seed}"

    def log(rec: dict) -> None:
        st.log_records.append(rec)
        if logger is not None and main:
            logger.log({"run": label, "seed": seed, **rec})

    def change_structure(change: Any) -> None:
        nonlocal model, partition, ctl, opt
        old = opt
        ctl.detach()
        model, partition = change.model, change.partition
        ctl = attach(model, partition)
        opt = make_opt()
        _carry_over(old, opt, change)
        st.structure.append(list(change.removed))
        st.best.update(val_loss=math.inf, step=-1, flops=0, state=None, pruned=None)
        method.bind(model, partition, ctl)
        ctx.model = model
        log({"event": "structure_change", "step": st.step, "removed": list(change.removed),
             "num_params": sum(p.numel() for p in model.parameters())})

    def sample_batch(k: int, g: torch.Generator) -> Any:
        return task.train_batch(torch.randperm(n, generator=g)[:k], g)

    ctx = LoopContext(
        model=model,
        steps_per_epoch=spe,
        ntk_batch=task.ntk_batch,
        count_overhead=book.overhead,
        log=log,
        loss_fn=lambda m, b: task.loss(m, b)[0],
        sample_batch=sample_batch,
        sample_inputs=task.sample_inputs,
        change_structure=change_structure,
        seed=seed,
        batch_size=cfg.batch_size,
    )

    def flops_now() -> tuple[int, int, int]:
        f, b = _global_sum(st.fwd_flops, st.bwd_flops)
        return int(f), int(b), book.total("overhead")

    def validate(step: int, epoch: int) -> None:
        _sync_buffers(model)
        was = model.training
        model.eval()
        v = task.evaluate(model, "val")
        model.train(was)
        f, b, o = flops_now()
        rec = {"step": step, "epoch": epoch, "train_flops": f + b, "flops": f + b + o, "val_loss": float(v["loss"])}
        if v.get("acc") is not None:
            rec["val_acc"] = float(v["acc"])  # type: ignore[arg-type]
        st.curve.append(rec)
        if logger is not None and main:
            logger.log({"run": label, "seed": seed, "event": "val", **rec})
        if rec["val_loss"] < st.best["val_loss"]:
            st.best.update(val_loss=rec["val_loss"], step=step, flops=rec["flops"], state=_state_copy(model),
                           pruned=ctl.pruned.clone())

    def save(step_done: int) -> None:
        if manager is None or not main:
            return
        st.ctl_sets = ([bool(a) for a in ctl.active.tolist()], [bool(a) for a in ctl.pruned.tolist()])
        st.kernels = conv_kernel_choices()
        manager.save(model, opt, None, step_done, {"label": label, "seed": seed, "method": entry.method},
                     stateful={"method": method, "loop": st, "flops": book})

    if payload is not None:
        ck = manager.resume(model, opt, None, stateful={"method": method, "loop": st, "flops": book},  # type: ignore[union-attr]
                            prune=main)
        assert ck is not None
        load_conv_kernel_choices(st.kernels)  # the kernels it computed with, not a new timing
        # the controller's sets as they were at the save (methods re-apply theirs on load too)
        ctl.set_pruned(torch.tensor(st.ctl_sets[1], dtype=torch.bool))
        ctl.set_active(torch.tensor(st.ctl_sets[0], dtype=torch.bool))
        if main:
            print(f"ntkit: {run_name}: resumed from {ck.path.name} (step {st.step} of {total_steps})", flush=True)
    else:
        method.at_init(_init_context(ctx, method))
        validate(0, 0)

    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=st.step, desc=desc or run_name, leave=False, mininterval=1.0)
    t_start = time.perf_counter() - st.wall_s
    model.train()
    while st.step < total_steps:
        epoch, i = divmod(st.step, spe)
        ctx.epoch, ctx.step = epoch, st.step
        if i == 0:
            st.mask_gen.manual_seed(seed * 1000 + epoch + 500)
            st.correct = st.counted = 0
            method.on_epoch_start(ctx)
        order = sampler.order(epoch)
        _set_lr(opt, cfg.lr * lr_factor(cfg.schedule, st.step, total_steps, cfg.warmup_steps,
                                        cfg.lr_milestones, cfg.lr_gamma))
        batch = task.train_batch(order[i * gb : (i + 1) * gb], st.mask_gen)
        if world > 1:
            batch = task.shard(batch, rank, world)
        method.before_step(ctx)
        sig = (task.work_key(batch), tuple(ctl.active.tolist()), tuple(ctl.pruned.tolist()))
        count = task.routing_dependent or sig not in st.cache
        opt.zero_grad(set_to_none=True)
        f0, b0 = book.total("forward"), book.total("backward")
        with book.phase("forward") if count else contextlib.nullcontext():
            loss, c, k = task.loss(model, batch)
            extra = method.loss_term(ctx, batch, loss)
            total = loss if extra is None else loss + extra
            if world > 1:  # each rank's share of the global loss units (masked tokens, samples)
                w = float(task.loss_weight(batch))
                (w_all,) = _global_sum(w)
                total = total * (w * world / max(w_all, 1e-12))
        finite = bool(torch.isfinite(total.detach()).all())
        if world > 1:
            finite = _global_sum(0.0 if finite else 1.0)[0] == 0.0
        if finite:
            with book.phase("backward") if count else contextlib.nullcontext():
                total.backward()
        if count:
            st.cache[sig] = (book.total("forward") - f0, book.total("backward") - b0)
        df, db = st.cache[sig]
        st.fwd_flops += df
        st.bwd_flops += db if finite else 0
        if finite:
            st.nonfinite = 0
            _all_reduce_grads(model)
            st.correct += c
            st.counted += k
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
            opt.step(lr_scale=method.lr_scale())
            method.after_step(ctx)
        else:
            st.nonfinite += 1
            st.nonfinite_steps.append(st.step)
            opt.zero_grad(set_to_none=True)
            warnings.warn(f"{run_name}: non-finite loss at step {st.step} ({float(total.detach())}); "
                          "step skipped", RuntimeWarning, stacklevel=1)
            if st.nonfinite >= cfg.max_nonfinite:
                last = manager.latest() if manager is not None else None
                raise TrainingDiverged(
                    f"{run_name}: loss non-finite for {st.nonfinite} consecutive steps (max_nonfinite="
                    f"{cfg.max_nonfinite}) at step {st.step}; last good checkpoint: {last or 'none'}"
                )
        st.active_frac_steps.append(float(ctl.active.float().mean()))
        act = ctl.active.tolist()
        if len(st.active_sum) != len(act):  # first step of an epoch, or a structure change
            st.active_sum, st.active_n = [0.0] * len(act), 0
        st.active_sum = [s + a for s, a in zip(st.active_sum, act)]
        st.active_n += 1
        st.step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        if i == spe - 1:  # epoch end
            model.eval()  # the mNTK engine needs sample-independent (eval-mode) forward passes
            method.on_epoch_end(ctx)
            model.train()
            st.active_hist.append([a / max(st.active_n, 1) for a in st.active_sum])
            st.active_sum, st.active_n = [], 0
            st.pruned_hist.append([bool(a) for a in ctl.pruned.tolist()])
            st.epoch_train_acc.append(_global_ratio(st.correct, st.counted))
            f, b, o = flops_now()
            st.epoch_flops.append(f + b + o)
            validate(st.step, epoch + 1)
            st.wall_s = time.perf_counter() - t_start
            save(st.step)
        else:
            if st.step % eval_every == 0:
                validate(st.step, epoch)
            if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                st.wall_s = time.perf_counter() - t_start
                save(st.step)
    wall = time.perf_counter() - t_start
    if bar is not None:
        bar.close()

    pruned_frac = float(ctl.pruned.float().mean())
    # the test metric uses the best-validation weights *and* the pruning mask they were validated with
    if st.best["state"] is not None:
        model.load_state_dict(st.best["state"])
        if not torch.equal(st.best["pruned"], ctl.pruned):
            ctl.set_pruned(st.best["pruned"])
    model.eval()
    test = task.evaluate(model, "test")
    f, b, overhead = flops_now()
    rec: dict[str, Any] = {
        "method": label,
        "method_name": entry.method,
        "method_config": entry.to_jsonable(),
        "seed": seed,
        "steps": st.step,
        "epochs": cfg.epochs,
        "steps_per_epoch": spe,
        "forward_flops": f,
        "backward_flops": b,
        "train_flops": f + b,
        "overhead_flops": overhead,
        "total_flops": f + b + overhead,
        "overhead_share": overhead / max(f + b + overhead, 1),
        "wall_s": wall,
        "overhead_wall_s": book.overhead_wall_s,
        "best_val_loss": st.best["val_loss"],
        "best_val_step": st.best["step"],
        "convergence_flops": st.best["flops"],
        "test_loss": float(test["loss"]),  # type: ignore[arg-type]
        "test_acc": None if test.get("acc") is None else float(test["acc"]),  # type: ignore[arg-type]
        "curve": st.curve,
        "epoch_train_acc": st.epoch_train_acc,
        "epoch_flops": st.epoch_flops,
        "module_names": list(partition.names),
        "module_kinds": list(partition.kinds),
        "active_history": st.active_hist,
        "pruned_history": st.pruned_hist,
        "forward_sparsity": pruned_frac,
        "backward_sparsity": 1.0 - (sum(st.active_frac_steps) / max(len(st.active_frac_steps), 1)),
        "nonfinite_steps": st.nonfinite_steps,
        "structure_changes": st.structure,
        "num_params": sum(p.numel() for p in model.parameters()),
        "method_history": _jsonable(method.history),
        "log": _jsonable(st.log_records),
    }
    ctl.detach()
    return rec


def _global_ratio(num: int, den: int) -> float | None:
    a, b = _global_sum(num, den)
    return a / b if b else None


def _init_context(ctx: Any, method: Any) -> Any:
    """The at-init context: a label-free method gets neither labels nor the loss."""
    if getattr(method, "needs_labels", True):
        return ctx
    import dataclasses

    return dataclasses.replace(ctx, loss_fn=None, sample_batch=None)


def _jsonable(x: Any) -> Any:
    from ntkit.recipes._runner import to_jsonable

    return to_jsonable(x)


def interpolate_at(curve: Sequence[dict], budget: float, key: str = "flops") -> float | None:
    """Validation loss at ``budget`` FLOPs (``key``, default total incl. overhead, so a method's
    mNTK cost counts against it), linear in FLOPs between the two evaluations that bracket it;
    None when the run ended below the budget."""
    prev = None
    for p in curve:
        if p[key] >= budget:
            if prev is None or p[key] == prev[key]:
                return float(p["val_loss"])
            w = (budget - prev[key]) / (p[key] - prev[key])
            return float(prev["val_loss"] + w * (p["val_loss"] - prev["val_loss"]))
        prev = p
    return None


def first_crossing(curve: Sequence[dict], target: float, key: str = "flops") -> float | None:
    """FLOPs (``key``, default total incl. overhead) at which the validation loss first reaches
    ``target`` (≤), interpolated linearly between the evaluation before and the one that reaches
    it; None when never reached."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None or prev["val_loss"] == p["val_loss"]:
                return float(p[key])
            w = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return float(prev[key] + w * (p[key] - prev[key]))
        prev = p
    return None


def finalize(records: list[dict], budget_fracs: Sequence[float], baseline: str = "vanilla") -> None:
    """Fill the cross-method fields in place, per seed, against the ``baseline`` run of that seed:
    ``budgets`` (FLOPs = fractions × baseline training FLOPs), ``val_loss_at_budget``,
    ``target_val_loss`` (baseline's best val loss), ``compute_to_target_flops`` and
    ``compute_ratio_vs_baseline`` (compute to the *baseline's* best); ``convergence_ratio_vs_baseline``
    (each run's compute to its *own* best, ``convergence_flops``, over the baseline's — the paper's
    "Computation" column); and the per-seed paired differences ``paired_test_loss_diff``,
    ``paired_test_acc_diff``, ``paired_best_val_diff`` (run − baseline of the same seed, same init
    and data order, so their mean ± std over seeds is the paired comparison). Records without a
    baseline run of their seed get None."""
    by_seed: dict[int, dict] = {r["seed"]: r for r in records if r["method"] == baseline}
    for r in records:
        base = by_seed.get(r["seed"])
        if base is None:
            r.update(budgets=None, val_loss_at_budget=None, target_val_loss=None,
                     compute_to_target_flops=None, compute_ratio_vs_baseline=None,
                     convergence_ratio_vs_baseline=None, paired_test_loss_diff=None,
                     paired_test_acc_diff=None, paired_best_val_diff=None)
            continue
        budgets = [f * base["train_flops"] for f in budget_fracs]
        r["budget_fracs"] = list(budget_fracs)
        r["budgets"] = budgets
        r["val_loss_at_budget"] = [interpolate_at(r["curve"], b) for b in budgets]
        r["target_val_loss"] = base["best_val_loss"]
        r["compute_to_target_flops"] = first_crossing(r["curve"], base["best_val_loss"])
        base_c = first_crossing(base["curve"], base["best_val_loss"])
        c = r["compute_to_target_flops"]
        r["compute_ratio_vs_baseline"] = None if c is None or not base_c else c / base_c
        own, base_own = r.get("convergence_flops"), base.get("convergence_flops")
        r["convergence_ratio_vs_baseline"] = own / base_own if own is not None and base_own else None
        r["paired_test_loss_diff"] = _diff(r.get("test_loss"), base.get("test_loss"))
        r["paired_test_acc_diff"] = _diff(r.get("test_acc"), base.get("test_acc"))
        r["paired_best_val_diff"] = _diff(r.get("best_val_loss"), base.get("best_val_loss"))


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def compare(
    task: Task,
    methods: Mapping[str, MethodEntry],
    cfg: LoopConfig,
    seeds: Sequence[int],
    baseline: str = "vanilla",
    scope: str = "",
) -> list[dict[str, Any]]:
    """Train every method of ``methods`` (label → entry) for every seed (same data order and
    initial weights per seed), then :func:`finalize` the cross-method fields. Returns the records.

    Checkpoints, resume and the metrics log come from the active :func:`ntkit.harness.run_context`
    (set by ``ntkit run``); without one, nothing is written. Methods are trained in the given
    order per seed; a method that replays another run (``rand_replay``) is configured from the
    finished record of its ``source`` of the same seed (:func:`_from_source`). A finished (method, seed) leaves its
    record in ``<checkpoints>/[<scope>/]<label>_seed<s>/record.json``; a resumed comparison loads
    those instead of training again (``scope`` keeps several comparisons of one run apart).
    """
    from ntkit.harness.context import current_run

    run = current_run()
    records = []
    for seed in seeds:
        done_now: dict[str, dict] = {}
        for label, entry in methods.items():
            entry = _from_source(label, entry, done_now)
            root = None if run is None or run.checkpoint_dir is None else run.checkpoint_dir / scope
            ck = None if root is None else root / f"{label}_seed{seed}"
            done = None if ck is None else ck / "record.json"
            if run is not None and run.resume and done is not None and done.is_file():
                rec = run.load_record(done)
            else:
                rec = train_run(task, label, entry, cfg, seed, checkpoint_dir=ck,
                                resume=bool(run and run.resume), logger=None if run is None else run.logger,
                                desc=f"{task.name} {label} seed {seed}")
                if done is not None and dist.is_main():
                    run.save_record(done, rec)  # type: ignore[union-attr]
            records.append(rec)
            done_now[label] = rec
    finalize(records, cfg.budget_fracs, baseline)
    return records


def _from_source(label: str, entry: MethodEntry, done: Mapping[str, dict]) -> MethodEntry:
    """The entry of a method whose class derives its config from another run of the same seed
    (a ``configure_from_source(config, record)`` hook and a ``source`` label in its config, e.g.
    ``rand_replay`` replaying MAT's per-layer counts); other entries unchanged. The source must
    come earlier in the comparison's order."""
    from ntkit.methods import method_info

    hook = getattr(method_info(entry.method).factory, "configure_from_source", None)
    if hook is None:
        return entry
    src = entry.config.source
    check(src in done, f"methods.{label}.source", src, f"a label trained before {label!r} ({sorted(done)})")
    return MethodEntry(entry.method, hook(entry.config, done[src]))
