"""The training loop shared by the MAT recipes, written out in full (torchtune style).

One call of :func:`train_run` trains one (method, seed) on a :class:`~ntkit.recipes._tasks.Task`:

1. ``torch.manual_seed(seed)`` → ``task.build_model()`` (identical initial weights for every
   method), ``task.partition(model)``, ``ntkit.sparse.attach`` (the controller whose partial
   backward executes only active modules' weight-gradient work), ``SlicedAdamW`` and
   ``ntkit.methods.build_method(name, **kw)`` bound to (model, partition, controller).
2. Epoch e visits the training samples in the order ``randperm(N, Generator(seed·1000 + e))``;
   MLM masking draws from ``Generator(seed·1000 + e + 500)`` — the same data for every method.
3. Per step: ``method.before_step`` → forward (counted as "forward") → ``loss.backward()`` (counted
   as "backward": what the partial backward actually ran) → optional clipping →
   ``opt.step(lr_scale=method.lr_scale())`` → ``method.after_step``. The method's mNTK evaluations
   run inside ``ctx.count_overhead()`` (counted as "overhead"; the loop puts the model in eval
   mode around ``on_epoch_end`` so the engine sees independent samples).
4. Validation loss (eval mode, fixed masks) every ``eval_every`` steps and at every epoch end;
   the best-validation weights are kept (and written atomically with
   ``ntkit.train.checkpoint.save_checkpoint`` when an output directory is given); the test metric
   is evaluated on them at the end.

FLOP accounting. FLOPs are those of the matmul/conv kernels that actually executed, counted by
``torch.utils.flop_counter`` through :mod:`ntkit.train.flops`; element-wise work (optimizer
update, activations) is not counted (as in the papers' PFLOP figures). A step's count depends
only on the task's work key (batch shape; for MLM also the number of masked positions, where the
head runs) and the controller's (active, pruned) sets, except for MoE models whose
expert FLOPs follow routing; so the loop counts a step when that signature is new (or always,
when ``task.routing_dependent``) and re-uses the count otherwise — exact, and it keeps the
counter's dispatch overhead out of the wall-clock.

Compute budgets and compute-to-target are derived from the recorded validation curve after all
methods ran (:func:`finalize`): see ``docs/results.md``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntkit.errors import check
from ntkit.recipes._tasks import Task

__all__ = ["LoopConfig", "MethodSpec", "compare", "comparison_specs", "finalize", "first_crossing", "interpolate_at", "train_run"]


@dataclass
class LoopConfig:
    """Hyper-parameters of one training run (identical for every method of a comparison).

    Attributes:
        epochs: passes over the training set (≥ 1).
        batch_size: samples per step (≥ 1).
        lr: peak learning rate of SlicedAdamW.
        weight_decay, betas, eps: SlicedAdamW settings (decoupled weight decay).
        schedule: "constant", "linear" (decay to 0 at the last step), "cosine" (to 0) or "step"
            (×0.1 at 1/2 and 3/4 of training, the VGG recipe of seed 000 B.1).
        warmup_steps: linear warm-up steps (before the decay).
        steps_per_epoch: cap on steps per epoch (0 = the full training set).
        eval_every: validation every this many steps (0 = only at epoch ends).
        grad_clip: global gradient-norm clip (0 = off).
        budget_fracs: compute budgets as fractions of vanilla's executed training FLOPs.
        progress: show a tqdm bar.
    """

    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    warmup_steps: int = 0
    steps_per_epoch: int = 0
    eval_every: int = 0
    grad_clip: float = 0.0
    budget_fracs: tuple[float, ...] = (0.25, 0.5, 0.75)
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(self.schedule in ("constant", "linear", "cosine", "step"), "schedule", self.schedule,
              "one of constant, linear, cosine, step")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", self.steps_per_epoch, "an integer >= 0")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "an integer >= 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0")
        check(all(0 < f for f in self.budget_fracs), "budget_fracs", self.budget_fracs, "fractions > 0")


@dataclass
class MethodSpec:
    """A method to train: registry ``name``, its keyword arguments and the ``label`` used in tables
    (e.g. ``MethodSpec("snip_struct", {"fraction": 0.5}, "snip_50")``)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.name


def comparison_specs(
    labels: Sequence[str],
    seed: int,
    *,
    rand_fraction: float,
    multirate_k: int,
    mat_kw: dict[str, Any],
    other: Callable[[str], MethodSpec | None] | None = None,
) -> list[MethodSpec]:
    """Specs of the standard comparison labels — ``vanilla``, ``rand``, ``multirate``, ``mat``
    (``mat_kw`` = MAT's settings) — all seeded with ``seed``; any other label goes to ``other``
    (dropped when it returns None)."""
    out = []
    for lab in labels:
        if lab == "vanilla":
            spec: MethodSpec | None = MethodSpec("vanilla", {}, lab)
        elif lab == "rand":
            spec = MethodSpec("rand", {"fraction": rand_fraction, "seed": seed}, lab)
        elif lab == "multirate":
            spec = MethodSpec("multirate", {"k": multirate_k, "seed": seed}, lab)
        elif lab == "mat":
            spec = MethodSpec("mat", dict(mat_kw, seed=seed), lab)
        else:
            spec = other(lab) if other is not None else None
        if spec is not None:
            out.append(spec)
    return out


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at 0-based ``step`` of ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return max(1.0 - t, 0.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.01 if t >= 0.75 else 0.1 if t >= 0.5 else 1.0
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


def _signature(task: Task, ctl: Any, batch: Any) -> tuple:
    return task.work_key(batch), tuple(ctl.active.tolist()), tuple(ctl.pruned.tolist())


def _set_lr(opt: Any, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_run(
    task: Task,
    spec: MethodSpec,
    cfg: LoopConfig,
    seed: int,
    out_dir: Path | None = None,
    desc: str = "",
) -> dict[str, Any]:
    """Train ``spec`` on ``task`` with ``seed``; return the run record (fields in docs/results.md).

    Compute-to-target and the budget columns are filled in later by :func:`finalize`.
    """
    from ntkit.methods import build_method
    from ntkit.methods.base import LoopContext
    from ntkit.sparse import SlicedAdamW, attach

    torch.manual_seed(seed)
    model = task.build_model()
    partition = task.partition(model)
    ctl = attach(model, partition)
    opt = SlicedAdamW(model, ctl, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    kwargs = dict(spec.kwargs)
    if spec.name == "snip_struct" and "loss_fn" not in kwargs:
        # SNIP scores need labelled batches: draw them from the training set with their own
        # generator (the training data order is unaffected).
        snip_gen = torch.Generator().manual_seed(seed * 1000 + 777)

        def snip_loss(m: nn.Module) -> torch.Tensor:
            idx = torch.randperm(task.num_train, generator=snip_gen)[: cfg.batch_size]
            return task.loss(m, task.train_batch(idx, snip_gen))[0]

        kwargs["loss_fn"] = snip_loss
    method = build_method(spec.name, **kwargs)
    method.bind(model, partition, ctl)

    n = task.num_train
    spe = math.ceil(n / cfg.batch_size)
    if cfg.steps_per_epoch:
        spe = min(spe, cfg.steps_per_epoch)
    total_steps = spe * cfg.epochs
    eval_every = cfg.eval_every or spe

    book = _FlopBook()
    log_records: list[dict] = []
    ctx = LoopContext(
        model=model,
        steps_per_epoch=spe,
        ntk_batch=task.ntk_batch,
        count_overhead=book.overhead,
        log=log_records.append,
    )

    fwd_flops = bwd_flops = 0
    cache: dict[tuple, tuple[int, int]] = {}
    curve: list[dict[str, float]] = []
    active_hist: list[list[bool]] = []
    pruned_hist: list[list[bool]] = []
    active_frac_steps: list[float] = []
    epoch_train_acc: list[float | None] = []
    epoch_train_flops: list[int] = []
    best: dict[str, Any] = {"val_loss": math.inf, "step": -1, "flops": 0, "state": None, "pruned": None}
    ckpt_path = None if out_dir is None else Path(out_dir) / "checkpoints" / f"{spec.label}_seed{seed}.pt"

    def total_flops() -> int:
        return fwd_flops + bwd_flops + book.total("overhead")

    def validate(step: int, epoch: int) -> None:
        was = model.training
        model.eval()
        v = task.evaluate(model, "val")
        model.train(was)
        rec = {"step": step, "epoch": epoch, "train_flops": fwd_flops + bwd_flops, "flops": total_flops(),
               "val_loss": float(v["loss"])}
        if v.get("acc") is not None:
            rec["val_acc"] = float(v["acc"])  # type: ignore[arg-type]
        curve.append(rec)
        if rec["val_loss"] < best["val_loss"]:
            best.update(val_loss=rec["val_loss"], step=step, flops=rec["flops"], state=_state_copy(model),
                        pruned=ctl.pruned.clone())
            if ckpt_path is not None:
                from ntkit.train.checkpoint import save_checkpoint

                ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(ckpt_path, model, opt, None, step,
                                {"val_loss": rec["val_loss"], "method": spec.label, "seed": seed},
                                stateful={"method": method})

    validate(0, 0)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=desc or f"{spec.label} s{seed}", leave=False, mininterval=1.0)
    t_start = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(cfg.epochs):
        ctx.epoch = epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        mask_gen = torch.Generator().manual_seed(seed * 1000 + epoch + 500)
        correct = counted = 0
        method.on_epoch_start(ctx)
        for i in range(spe):
            ctx.step = step
            _set_lr(opt, cfg.lr * lr_factor(cfg.schedule, step, total_steps, cfg.warmup_steps))
            batch = task.train_batch(order[i * cfg.batch_size : (i + 1) * cfg.batch_size], mask_gen)
            method.before_step(ctx)
            sig = _signature(task, ctl, batch)
            count = task.routing_dependent or sig not in cache
            opt.zero_grad(set_to_none=True)
            if count:
                f0, b0 = book.total("forward"), book.total("backward")
                with book.phase("forward"):
                    loss, c, k = task.loss(model, batch)
                with book.phase("backward"):
                    loss.backward()
                cache[sig] = (book.total("forward") - f0, book.total("backward") - b0)
            else:
                loss, c, k = task.loss(model, batch)
                loss.backward()
            df, db = cache[sig]
            fwd_flops += df
            bwd_flops += db
            correct += c
            counted += k
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
            opt.step(lr_scale=method.lr_scale())
            method.after_step(ctx)
            active_frac_steps.append(float(ctl.active.float().mean()))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            if step % eval_every == 0 and i != spe - 1:
                validate(step, epoch)
        model.eval()  # the mNTK engine needs sample-independent (eval-mode) forward passes
        method.on_epoch_end(ctx)
        model.train()
        active_hist.append([bool(a) for a in ctl.active.tolist()])
        pruned_hist.append([bool(a) for a in ctl.pruned.tolist()])
        epoch_train_acc.append(correct / counted if counted else None)
        epoch_train_flops.append(fwd_flops + bwd_flops + book.total("overhead"))
        validate(step, epoch + 1)
    wall = time.perf_counter() - t_start
    if bar is not None:
        bar.close()

    pruned_frac = float(ctl.pruned.float().mean())
    # the test metric uses the best-validation weights *and* the pruning mask they were validated with
    model.load_state_dict(best["state"])
    if not torch.equal(best["pruned"], ctl.pruned):
        ctl.set_pruned(best["pruned"])
    model.eval()
    test = task.evaluate(model, "test")
    overhead = book.total("overhead")
    rec: dict[str, Any] = {
        "method": spec.label,
        "method_name": spec.name,
        "method_kwargs": dict(spec.kwargs),
        "seed": seed,
        "steps": step,
        "epochs": cfg.epochs,
        "steps_per_epoch": spe,
        "forward_flops": fwd_flops,
        "backward_flops": bwd_flops,
        "train_flops": fwd_flops + bwd_flops,
        "overhead_flops": overhead,
        "total_flops": fwd_flops + bwd_flops + overhead,
        "overhead_share": overhead / max(fwd_flops + bwd_flops + overhead, 1),
        "wall_s": wall,
        "overhead_wall_s": book.overhead_wall_s,
        "best_val_loss": best["val_loss"],
        "best_val_step": best["step"],
        "convergence_flops": best["flops"],
        "test_loss": float(test["loss"]),  # type: ignore[arg-type]
        "test_acc": None if test.get("acc") is None else float(test["acc"]),  # type: ignore[arg-type]
        "curve": curve,
        "epoch_train_acc": epoch_train_acc,
        "epoch_flops": epoch_train_flops,
        "module_names": list(partition.names),
        "module_kinds": list(partition.kinds),
        "active_history": active_hist,
        "pruned_history": pruned_hist,
        "forward_sparsity": pruned_frac,
        "backward_sparsity": 1.0 - (sum(active_frac_steps) / max(len(active_frac_steps), 1)),
        "method_history": _jsonable(method.history),
        "log": _jsonable(log_records),
    }
    if hasattr(ctl, "detach"):
        ctl.detach()
    return rec


def _jsonable(x: Any) -> Any:
    """Tensors → lists, tuples → lists, recursively (method histories hold λmax tensors)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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
    ``compute_ratio_vs_baseline``. Records without a baseline run of their seed get None."""
    by_seed: dict[int, dict] = {r["seed"]: r for r in records if r["method"] == baseline}
    for r in records:
        base = by_seed.get(r["seed"])
        if base is None:
            r.update(budgets=None, val_loss_at_budget=None, target_val_loss=None,
                     compute_to_target_flops=None, compute_ratio_vs_baseline=None)
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


def compare(
    task: Task,
    specs: Sequence[MethodSpec] | Callable[[int], Sequence[MethodSpec]],
    cfg: LoopConfig,
    seeds: Sequence[int],
    out_dir: Path | None = None,
    baseline: str = "vanilla",
) -> list[dict[str, Any]]:
    """Train every method of ``specs`` (or ``specs(seed)``) for every seed (same data order and
    initial weights per seed), then :func:`finalize` the cross-method fields. Returns the records."""
    records = []
    for seed in seeds:
        for spec in specs(seed) if callable(specs) else specs:
            rec = train_run(task, spec, cfg, seed, out_dir, desc=f"{task.name} {spec.label} seed {seed}")
            records.append(rec)
    finalize(records, cfg.budget_fracs, baseline)
    return records
