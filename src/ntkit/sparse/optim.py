"""Optimizers that touch only the active slices of covered parameters: :class:`SlicedAdamW`
and :class:`SlicedSGD` (the paper's VGG optimizer, seed 000 §B.1)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.sparse.controller import SparseController

__all__ = ["SlicedAdamW", "SlicedSGD"]

# torch's fused optimizer kernels (CPU since torch 2.4) walk each tensor's memory as one flat
# array: only tensors that are dense and share one layout (a column slice is neither) go there.
# float64 stays on the per-operation path, bit for bit torch.optim.AdamW(foreach=False) (the
# float64 references): the fused kernel rounds differently, and Adam turns that into 1e-13
# differences within a few steps where a gradient is analytically zero (a key bias).
_FUSED = hasattr(torch, "_fused_adamw_") and hasattr(torch, "_fused_sgd_")
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _SlicedOptimizer(torch.optim.Optimizer):
    """What :class:`SlicedAdamW` and :class:`SlicedSGD` share: parameters by name, the
    controller handing over active gradient rows, and a step in three phases: every parameter
    with a gradient contributes a *job* (its active rows — views, or gathered copies — and the
    optimizer state of those rows; ``_job_sliced`` / ``_job_dense``), the jobs of a param group are
    updated together, and gathered rows are written back (``_Job.write_back``). A quarter-width
    VGG-16 has 54 parameters, most of them 16–128-element BN and bias vectors, where the cost per
    call is the step, so the update is batched: jobs whose tensors are dense and laid out alike
    (float32 / half, CPU or CUDA) go to torch's fused kernel in one call (``_apply_fused``: 0.3 ms
    for all of them on the 2-core CPU, against 2–3 ms for a ``torch._foreach_*`` call per operation,
    which CPU runs as a loop over tensors); the rest (column slices, float64) to ``_foreach_*``
    kernels (``_apply``). A job whose learning rate or step count differs per row (``lr_scale``,
    SlicedAdamW's per-slice counts after a set change) is updated on its own, with the same
    arithmetic."""

    def __init__(self, model: nn.Module, ctl: SparseController, defaults: dict[str, Any]) -> None:
        named = list(model.named_parameters())
        self.ctl = ctl
        self._name_of = {id(p): n for n, p in named}
        # id(param) → (Idx, state rows…) gathered for the current active set (see the subclasses)
        self._compact: dict[int, tuple[Any, ...]] = {}
        # 1-D parameters with scattered active rows (BN and bias vectors) are updated together:
        # member key → (global index, state rows, members), see _vector_jobs
        self._vec: dict[tuple[tuple[int, int], ...], tuple[Tensor, list[Tensor], list[_Vec]]] = {}
        self._vec_of: dict[int, tuple[tuple[int, int], ...]] = {}  # id(param) → its key in _vec
        super().__init__([p for _, p in named], defaults)
        ctl.keep_grad_rows = True  # the backward hands over the active gradient rows it computed

    def _job_dense(self, p: Tensor, group: dict[str, Any]) -> _Job:
        raise NotImplementedError

    def _job_sliced(self, p: Tensor, name: str, group: dict[str, Any], lr_scale: Tensor | None) -> _Job | _Vec | None:
        raise NotImplementedError

    def _apply(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _apply_fused(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        """``_apply`` for jobs whose tensors are dense and laid out alike (``_Job.fusable``): one
        call of torch's fused kernel per device and dtype."""
        raise NotImplementedError

    def _apply_rows(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        """``_apply`` for jobs whose step count or lr differs per row (one device and dtype): the
        per-row factors are computed on the host (numpy), moved in one copy, and the update runs
        as ``_foreach_*`` operations over all the jobs."""
        raise NotImplementedError

    def _state_keys(self) -> tuple[str, ...]:
        """The per-element state tensors kept compact (gathered) while an active set lasts."""
        raise NotImplementedError

    def _release(self, p: Tensor, d: int) -> None:
        """Write ``p``'s gathered state rows (if any) back into ``state`` and forget them."""
        if id(p) in self._vec_of:
            self._release_vec(self._vec_of[id(p)])
        cached = self._compact.pop(id(p), None)
        if cached is not None:
            old, *rows = cached
            for key, r in zip(self._state_keys(), rows):
                old.put(self.state[p][key], d, r)

    def _rows(self, p: Tensor, idx: Any, d: int) -> list[Tensor]:
        """The state rows of ``p`` for active set ``idx`` (non-contiguous, along dim ``d``): the
        compact copies when the set is unchanged since the last step; otherwise the old compact rows
        are written back and the new ones gathered. The caller stores them in ``_compact``."""
        cached = self._compact.get(id(p))
        if cached is not None and cached[0] is idx:
            del self._compact[id(p)]
            return list(cached[1:])
        self._release(p, d)
        return [idx.take(self.state[p][key], d) for key in self._state_keys()]

    def _write_vec(self, key: tuple[tuple[int, int], ...]) -> None:
        """Write the state rows of vector batch ``key`` back into each member's ``state``."""
        gidx, rows, members = self._vec[key]
        for name, r in zip(self._state_keys(), rows):
            _put_flat([self.state[e.p][name] for e in members], gidx, r)

    def _release_vec(self, key: tuple[tuple[int, int], ...]) -> None:
        self._write_vec(key)
        for e in self._vec.pop(key)[2]:
            self._vec_of.pop(id(e.p), None)

    def _vector_jobs(self, entries: list[_Vec]) -> list[_Job]:
        """One job per (device, dtype, step, lr) for 1-D parameters whose active rows are scattered:
        their rows are gathered from one concatenation (a copy of a few KB), updated together and
        written back by one copy per parameter list, instead of three index operations per
        vector. The state rows stay gathered while the batch (members and their index sets) lasts,
        like ``_compact``."""
        batches: dict[tuple[Any, ...], list[_Vec]] = {}
        for e in entries:  # one batch per step count and lr; entries with per-row ones share one
            batches.setdefault((e.p.device, e.p.dtype) + ((None,) if e.per_row else (e.step, e.lr)), []).append(e)
        keyed = {tuple((id(e.p), id(e.idx)) for e in es): es for es in batches.values()}
        for key in [k for k in self._vec if k not in keyed]:  # batches that ended: state back first
            self._release_vec(key)
        jobs = []
        for key, es in keyed.items():
            ps = [e.p for e in es]
            if key not in self._vec:
                for p in ps:
                    self._release(p, 0)
                offsets = np.cumsum([0] + [p.numel() for p in ps[:-1]])
                gidx = torch.from_numpy(np.concatenate([e.idx.rows + o for e, o in zip(es, offsets)]))
                gidx = gidx.to(ps[0].device)
                names = [k for k in self._state_keys() if k in self.state[ps[0]]]
                state_rows = [torch.cat([self.state[p][k] for p in ps]).index_select(0, gidx) for k in names]
                self._vec[key] = (gidx, state_rows, es)
                for p in ps:
                    self._vec_of[id(p)] = key
            gidx, state_rows, _ = self._vec[key]
            flat = torch.cat(ps)
            w = flat.index_select(0, gidx)
            g = torch.cat([p.grad for p in ps]).index_select(0, gidx)
            step, lr = es[0].step, es[0].lr
            if es[0].per_row:  # (the batch key puts entries with per-row counts or lr together)
                step, lr = (np.concatenate([np.broadcast_to(np.asarray(getattr(e, a), dtype=np.float64), len(e.idx))
                                            for e in es]) for a in ("step", "lr"))
            jobs.append(_Job([w, g, *state_rows], step, lr, back=partial(_put_flat, ps, gidx, flat=flat)))
        return jobs

    def flush(self) -> None:
        """Write the gathered state rows back into ``state`` (they stay valid for the next step)."""
        for key in self._vec:
            self._write_vec(key)
        by_id = {id(p): p for g in self.param_groups for p in g["params"]}
        for pid, (idx, *rows) in self._compact.items():
            p = by_id[pid]
            d = self.ctl.slicings[self._name_of[pid]].dim
            for key, r in zip(self._state_keys(), rows):
                idx.put(self.state[p][key], d, r)

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._compact.clear()  # the loaded state replaces the gathered rows
        self._vec.clear()
        self._vec_of.clear()
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Any = None, lr_scale: Tensor | None = None) -> Any:  # type: ignore[override]
        """One update. ``lr_scale``: optional float Tensor [M], a per-group multiplier of ``lr``
        (shared parameters and unowned indices use 1)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr_scale = _check_lr_scale(lr_scale, len(self.ctl.partition))
        for group in self.param_groups:
            jobs: list[_Job] = []
            vec: list[_Vec] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self._name_of[id(p)]
                job = self._job_sliced(p, name, group, lr_scale) if name in self.ctl.slicings else self._job_dense(p, group)
                if isinstance(job, _Vec):
                    vec.append(job)
                elif job is not None:
                    jobs.append(job)
            if vec or self._vec:
                jobs += self._vector_jobs(vec)
            fused = [j for j in jobs if j.uniform and j.fusable]
            if fused:
                self._apply_fused(fused, group)
            batched = [j for j in jobs if j.uniform and not j.fusable]
            if batched:
                self._apply(batched, group)
            per_row = [j for j in jobs if not j.uniform]
            for js in _by_device_dtype(per_row).values():
                self._apply_rows(js, group)
            for j in jobs:
                j.write_back()
        return loss


class _Job:
    """One parameter's share of a step: ``tensors`` (parameter rows, gradient rows, state rows —
    views or gathered copies), its ``step`` count and ``lr`` (Python numbers, or float64 numpy arrays
    per row, shaped to broadcast along the sliced dim: then ``uniform`` is False and the job goes to
    ``_apply_rows``), and ``back``: what writes the updated parameter rows back (None for views)."""

    __slots__ = ("back", "fusable", "lr", "step", "tensors", "uniform")

    def __init__(self, tensors: list[Tensor], step: int | np.ndarray, lr: float | np.ndarray,
                 back: Callable[[Tensor], Any] | None = None) -> None:
        self.tensors, self.step, self.lr, self.back = tensors, step, lr, back
        self.uniform = not isinstance(step, np.ndarray) and not isinstance(lr, np.ndarray)
        self.fusable = _FUSED and _flat_alike(tensors)

    def write_back(self) -> None:
        if self.back is not None:
            self.back(self.tensors[0])


def _put_flat(ts: list[Tensor], gidx: Tensor, rows: Tensor, *, flat: Tensor | None = None) -> None:
    """Write ``rows`` into the 1-D tensors ``ts`` at positions ``gidx`` of their concatenation
    (``flat``: that concatenation, if at hand): three operations for any number of tensors. The
    other elements are written back unchanged."""
    flat = torch.cat(ts) if flat is None else flat
    flat.index_copy_(0, gidx, rows)
    torch._foreach_copy_(ts, flat.split([t.numel() for t in ts]))


class _Vec:
    """A 1-D parameter whose scattered active rows join a vector batch (``_vector_jobs``)."""

    __slots__ = ("idx", "lr", "p", "per_row", "step")

    def __init__(self, p: Tensor, idx: Any, step: int | np.ndarray, lr: float | np.ndarray) -> None:
        self.p, self.idx, self.step, self.lr = p, idx, step, lr
        self.per_row = isinstance(step, np.ndarray) or isinstance(lr, np.ndarray)


def _vectorizable(p: Tensor) -> bool:
    """Whether ``p``'s gathered update can join a vector batch: 1-D, in a dtype and on a device
    torch's fused kernels take (float64 stays per parameter: see ``_FUSED_DTYPES``)."""
    return _FUSED and p.dim() == 1 and p.dtype in _FUSED_DTYPES and p.device.type in _FUSED_DEVICES


def _row_factors(jobs: list[_Job], fns: list[Any]) -> list[list[Tensor]]:
    """For each ``fn(step, lr)`` of ``fns`` (numpy float64 in, out), one tensor per job in the
    jobs' device and dtype, shaped to broadcast against its rows; all computed on the host and
    moved in one copy."""
    cols, shapes = [], []
    for j in jobs:
        step, lr = np.broadcast_arrays(np.asarray(j.step, dtype=np.float64), np.asarray(j.lr, dtype=np.float64))
        cols.append(np.stack([np.asarray(fn(step, lr), dtype=np.float64).ravel() for fn in fns]))
        shapes.append(step.shape)
    t0 = jobs[0].tensors[0]
    flat = torch.from_numpy(np.concatenate(cols, axis=1)).to(device=t0.device, dtype=t0.dtype)
    out: list[list[Tensor]] = [[] for _ in fns]
    off = 0
    for c, shape in zip(cols, shapes):
        for i in range(len(fns)):
            out[i].append(flat[i, off:off + c.shape[1]].view(shape))
        off += c.shape[1]
    return out


def _flat_alike(ts: list[Tensor]) -> bool:
    """Whether ``ts`` (one parameter's rows, gradient rows and state rows: one device and dtype)
    can go to a fused kernel: same strides, and dense (contiguous, or channels-last as a
    convolution weight stored NHWC)."""
    t0 = ts[0]
    stride = t0.stride()
    if any(t.stride() != stride for t in ts[1:]) or t0.dtype not in _FUSED_DTYPES:
        return False
    if t0.device.type not in _FUSED_DEVICES:
        return False
    return t0.is_contiguous() or t0.is_contiguous(memory_format=torch.channels_last)


def _by_device_dtype(jobs: list[_Job]) -> dict[tuple[torch.device, torch.dtype], list[_Job]]:
    out: dict[tuple[torch.device, torch.dtype], list[_Job]] = {}
    for j in jobs:
        out.setdefault((j.tensors[0].device, j.tensors[0].dtype), []).append(j)
    return out


class SlicedAdamW(_SlicedOptimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) for partially trained models.

    Covered parameters (those a partition group slices) are updated only on the indices that are
    active now (``ctl.active`` groups plus indices no group owns): their values, Adam moments,
    **per-index step counts** (``state["step"]``: float32 [size along the sliced dim]; Adam's bias
    correction uses each slice's own count) and weight decay are untouched elsewhere. Shared
    parameters are updated exactly as by ``torch.optim.AdamW`` (scalar ``step``); parameters whose
    ``.grad`` is None are skipped. With every group active and no ``lr_scale`` the numbers equal
    ``torch.optim.AdamW(fused=True)`` in float32 (torch's fused kernel does the update) and
    ``torch.optim.AdamW(foreach=False)`` in float64.

    Set the active groups before the forward pass and do not change them between backward and
    :meth:`step`. ``lr`` lives in ``param_groups[0]["lr"]``, so torch LR schedulers work.

    While an active set stays the same, the Adam moments of its scattered rows are kept gathered
    (compact copies: each step then gathers only the parameter and gradient rows and writes back
    only the parameter rows, 3 row copies instead of 7). They are written back into
    ``state[p]["exp_avg"]`` / ``["exp_avg_sq"]`` when the active set changes and by
    :meth:`state_dict` / :meth:`flush`, so checkpoints are always exact; read ``state`` directly
    only after :meth:`flush`.

    Args:
        model: the model ``ctl`` is attached to; all its parameters are optimised.
        ctl: the :class:`~ntkit.sparse.SparseController`.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight_decay default 0).
    """

    def __init__(
        self,
        model: nn.Module,
        ctl: SparseController,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check(lr >= 0, "lr", lr, "a number >= 0")
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "betas", betas, "two numbers in [0, 1)")
        check(eps >= 0, "eps", eps, "a number >= 0")
        check(weight_decay >= 0, "weight_decay", weight_decay, "a number >= 0")
        super().__init__(model, ctl, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._counts: dict[int, tuple[Tensor, np.ndarray]] = {}  # id(param) → (state["step"], its numpy view)

    def _state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _init_state(self, p: Tensor, step_shape: tuple[int, ...]) -> dict[str, Tensor]:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros(step_shape, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _job_dense(self, p: Tensor, group: dict[str, Any]) -> _Job:
        st = self._init_state(p, ())
        st["step"] += 1
        return _Job([p, p.grad, st["exp_avg"], st["exp_avg_sq"]], int(st["step"].item()), group["lr"])

    def _job_sliced(self, p: Tensor, name: str, group: dict[str, Any], lr_scale: Tensor | None) -> _Job | _Vec | None:
        sl = self.ctl.slicings[name]
        st = self._init_state(p, (p.shape[sl.dim],))
        idx = self.ctl.active_sel(name)
        g_rows = self.ctl.take_grad_rows(name, p.grad)  # (handed out once: taken on every path)
        if idx is not None and len(idx) == 0:
            return None
        # per-index step counts live in a CPU float32 tensor: count on its numpy view (no kernel
        # launches, no device syncs) and hand Adam a Python int when the active counts agree
        view = self._counts.get(id(p))
        if view is None or view[0] is not st["step"]:
            if st["step"].device.type != "cpu" or st["step"].dtype != torch.float32:  # e.g. loaded with map_location
                st["step"] = st["step"].to("cpu", torch.float32)
            view = self._counts[id(p)] = (st["step"], st["step"].numpy())
        counts = view[1]
        rows = slice(None) if idx is None else idx.rows
        counts[rows] += 1
        steps = counts[rows]
        shape = [1] * p.dim()
        shape[sl.dim] = -1
        lr = _slice_lr(group["lr"], lr_scale, sl, idx, shape)
        step: int | np.ndarray = int(steps[0]) if steps.min() == steps.max() else steps.astype(np.float64).reshape(shape)
        d = sl.dim
        if idx is None or idx.contiguous:  # views: updated in place
            self._release(p, d)  # a set with gathered rows before: they go back first
            ts = [p, p.grad, st["exp_avg"], st["exp_avg_sq"]]
            return _Job(ts if idx is None else [idx.take(t, d) for t in ts], step, lr)
        if _vectorizable(p):
            return _Vec(p, idx, step, lr)
        m, v = self._rows(p, idx, d)
        self._compact[id(p)] = (idx, m, v)
        w = idx.take(p, d)
        g = g_rows if g_rows is not None and g_rows.shape == w.shape else idx.take(p.grad, d)
        return _Job([w, g, m, v], step, lr, back=partial(idx.put, p, d))

    def _apply(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        ps, gs, ms, vs = (list(t) for t in zip(*(j.tensors for j in jobs)))
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        # torch.optim.AdamW's operation order, each operation over all the rows at once
        if wd != 0:  # uniform jobs all carry the group's lr
            torch._foreach_mul_(ps, 1 - jobs[0].lr * wd)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [(1 - beta2 ** j.step) ** 0.5 for j in jobs])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-(j.lr / (1 - beta1 ** j.step)) for j in jobs])

    def _apply_fused(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for (dev, _), js in _by_device_dtype(jobs).items():
            # the kernel reads each tensor's step from a float tensor (it does not count: done above)
            steps = {s: torch.full((), float(s), device=dev) for s in {j.step for j in js}}
            for lr in {j.lr for j in js}:  # uniform jobs carry the group's lr: one call
                part = [j for j in js if j.lr == lr]
                ps, gs, ms, vs = (list(t) for t in zip(*(j.tensors for j in part)))
                torch._fused_adamw_(ps, gs, ms, vs, [], [steps[j.step] for j in part], lr=lr, beta1=beta1,
                                    beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                    amsgrad=False, maximize=False)

    def _apply_rows(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        # torch.optim.AdamW's arithmetic with float64 bias corrections per row, cast once
        decay, bc2_sqrt, neg_step_size = _row_factors(jobs, [
            lambda step, lr: 1 - lr * wd,
            lambda step, lr: np.sqrt(1 - beta2**step),
            lambda step, lr: -(lr / (1 - beta1**step)),
        ])
        ps, gs, ms, vs = (list(t) for t in zip(*(j.tensors for j in jobs)))
        if wd != 0:
            torch._foreach_mul_(ps, decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(ms, denom)
        torch._foreach_mul_(update, neg_step_size)
        torch._foreach_add_(ps, update)


def _check_lr_scale(lr_scale: Tensor | None, m: int) -> Tensor | None:
    """``lr_scale`` as float64 [M] on the CPU (None stays None); a one-line error otherwise."""
    if lr_scale is None:
        return None
    lr_scale = torch.as_tensor(lr_scale).detach().cpu()
    if tuple(lr_scale.shape) != (m,) or not lr_scale.is_floating_point():
        raise ConfigError(f"lr_scale: expected a float tensor of shape ({m},), got {tuple(lr_scale.shape)}")
    return lr_scale.double()


def _slice_lr(lr: float, lr_scale: Tensor | None, sl: Any, idx: Any, shape: list[int]) -> float | np.ndarray:
    """The learning rate of the trained indices of one sliced parameter: ``lr`` (a float) without
    ``lr_scale``, else float64 ``lr · scale`` per index (a numpy array), shaped to broadcast along
    the sliced dim (indices no group owns use 1)."""
    if lr_scale is None:
        return lr
    g_of = sl.group_of if idx is None else idx.take(sl.group_of, 0)
    scale = torch.where(g_of >= 0, lr_scale[g_of.clamp(min=0)], torch.ones((), dtype=torch.float64))
    return (lr * scale).numpy().reshape(shape)


class SlicedSGD(_SlicedOptimizer):
    """SGD with momentum and (coupled, L2) weight decay for partially trained models — the
    optimizer of the paper's VGG runs (seed 000 §B.1: "trained with SGD … initial learning rate of
    0.1"), whose NTK argument is about gradient descent.

    The update is ``torch.optim.SGD``'s with ``dampening=0, nesterov=False``:
    ``d = g + wd·p``; ``buf = momentum·buf + d`` (the first step of an index gives ``buf = d``);
    ``p −= lr·buf``. Covered parameters (those a partition group slices) are updated only on the
    indices that are active now (``ctl.active`` groups plus indices no group owns): their values,
    momentum buffer and weight decay are untouched elsewhere and no work is done for them (the
    partial backward computed no gradient there; this step gathers, updates and writes back only
    the active rows, or updates contiguous ones in place). An index's momentum buffer starts at
    zero, so its first active step gives ``buf = d`` exactly as torch's ``clone`` does; a module
    that was inactive keeps its buffer frozen and resumes from it (momentum is not decayed over
    steps it did not take — the slice's own history, like SlicedAdamW's per-slice step counts).
    Shared parameters are updated as by ``torch.optim.SGD``; parameters whose ``.grad`` is None
    are skipped. With every group active and no ``lr_scale`` the numbers equal
    ``torch.optim.SGD(fused=True)`` in float32 and ``torch.optim.SGD(foreach=False)`` in float64.

    While an active set stays the same, the momentum rows of its scattered indices are kept
    gathered (as SlicedAdamW's moments): written back into ``state[p]["momentum_buffer"]`` when the
    set changes and by :meth:`state_dict` / :meth:`flush`; read ``state`` directly only after
    :meth:`flush`.

    Set the active groups before the forward pass and do not change them between backward and
    :meth:`step`. ``lr`` lives in ``param_groups[0]["lr"]``, so schedulers work.

    Args:
        model: the model ``ctl`` is attached to; all its parameters are optimised.
        ctl: the :class:`~ntkit.sparse.SparseController`.
        lr: learning rate ≥ 0 (paper, VGG: 0.1).
        momentum: in [0, 1) (0 = plain SGD, no buffer kept).
        weight_decay: L2 coefficient ≥ 0 added to the gradient (torch.optim.SGD's, coupled).
    """

    def __init__(
        self,
        model: nn.Module,
        ctl: SparseController,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        check(lr >= 0, "lr", lr, "a number >= 0")
        check(0 <= momentum < 1, "momentum", momentum, "a number in [0, 1)")
        check(weight_decay >= 0, "weight_decay", weight_decay, "a number >= 0")
        super().__init__(model, ctl, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _buffer(self, p: Tensor, group: dict[str, Any]) -> Tensor | None:
        """The momentum buffer of ``p`` (zeros at first: 0·momentum + d = d bit for bit, torch's
        first step), None without momentum."""
        if not group["momentum"]:
            return None
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st["momentum_buffer"]

    def _job_dense(self, p: Tensor, group: dict[str, Any]) -> _Job:
        buf = self._buffer(p, group)
        return _Job([p, p.grad] + ([] if buf is None else [buf]), 0, group["lr"])

    def _job_sliced(self, p: Tensor, name: str, group: dict[str, Any], lr_scale: Tensor | None) -> _Job | _Vec | None:
        sl = self.ctl.slicings[name]
        idx = self.ctl.active_sel(name)
        g_rows = self.ctl.take_grad_rows(name, p.grad)  # (handed out once: taken on every path)
        if idx is not None and len(idx) == 0:
            return None
        buf = self._buffer(p, group)
        shape = [1] * p.dim()
        shape[sl.dim] = -1
        lr = _slice_lr(group["lr"], lr_scale, sl, idx, shape)
        d = sl.dim
        if idx is None or idx.contiguous:  # views: updated in place
            self._release(p, d)  # a set with gathered rows before: they go back first
            ts = [p, p.grad] + ([] if buf is None else [buf])
            return _Job(ts if idx is None else [idx.take(t, d) for t in ts], 0, lr)
        if _vectorizable(p):
            return _Vec(p, idx, 0, lr)
        w = idx.take(p, d)
        g = g_rows if g_rows is not None and g_rows.shape == w.shape else idx.take(p.grad, d)
        ts = [w, g]
        if buf is not None:
            (b,) = self._rows(p, idx, d)
            self._compact[id(p)] = (idx, b)
            ts.append(b)
        return _Job(ts, 0, lr, back=partial(idx.put, p, d))

    @staticmethod
    def _direction(jobs: list[_Job], group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The parameter rows and their update directions d (momentum buffers when momentum > 0),
        in torch.optim.SGD's operation order, each operation over all the rows at once."""
        ws, gs = [j.tensors[0] for j in jobs], [j.tensors[1] for j in jobs]
        wd, mom = group["weight_decay"], group["momentum"]
        ds = torch._foreach_add(gs, ws, alpha=wd) if wd else gs
        if mom:
            bufs = [j.tensors[2] for j in jobs]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, ds)
            ds = bufs
        return ws, ds

    def _apply(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        ws, ds = self._direction(jobs, group)
        torch._foreach_add_(ws, ds, alpha=-jobs[0].lr)

    def _apply_fused(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        mom = group["momentum"]
        for js in _by_device_dtype(jobs).values():
            for lr in {j.lr for j in js}:
                part = [j for j in js if j.lr == lr]
                # buffers start at zero (see _buffer): momentum·0 + d = d is torch's first step
                torch._fused_sgd_([j.tensors[0] for j in part], [j.tensors[1] for j in part],
                                  [j.tensors[2] for j in part] if mom else [], weight_decay=group["weight_decay"],
                                  momentum=mom, lr=lr, dampening=0.0, nesterov=False, maximize=False,
                                  is_first_step=False)

    def _apply_rows(self, jobs: list[_Job], group: dict[str, Any]) -> None:
        # torch.optim.SGD's arithmetic with an lr per row (lr_scale)
        (neg_lr,) = _row_factors(jobs, [lambda step, lr: -lr])
        ws, ds = self._direction(jobs, group)
        torch._foreach_add_(ws, torch._foreach_mul(ds, neg_lr))
