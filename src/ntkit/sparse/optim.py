"""Optimizers that touch only the active slices of covered parameters: :class:`SlicedAdamW`
and :class:`SlicedSGD` (the paper's VGG optimizer, seed 000 §B.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.sparse.controller import SparseController

__all__ = ["SlicedAdamW", "SlicedSGD"]


class _SlicedOptimizer(torch.optim.Optimizer):
    """What :class:`SlicedAdamW` and :class:`SlicedSGD` share: parameters by name, the
    controller handing over active gradient rows, and a step that updates sliced parameters on
    their active rows (``_update_sliced``) and the others densely (``_update_dense``)."""

    def __init__(self, model: nn.Module, ctl: SparseController, defaults: dict[str, Any]) -> None:
        named = list(model.named_parameters())
        self.ctl = ctl
        self._name_of = {id(p): n for n, p in named}
        super().__init__([p for _, p in named], defaults)
        ctl.keep_grad_rows = True  # the backward hands over the active gradient rows it computed

    def _update_dense(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update_sliced(self, p: Tensor, name: str, group: dict[str, Any], lr_scale: Tensor | None) -> None:
        raise NotImplementedError

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
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self._name_of[id(p)]
                if name in self.ctl.slicings:
                    self._update_sliced(p, name, group, lr_scale)
                else:
                    self._update_dense(p, group)
        return loss


class SlicedAdamW(_SlicedOptimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) for partially trained models.

    Covered parameters (those a partition group slices) are updated only on the indices that are
    active now (``ctl.active`` groups plus indices no group owns): their values, Adam moments,
    **per-index step counts** (``state["step"]``: float32 [size along the sliced dim]; Adam's bias
    correction uses each slice's own count) and weight decay are untouched elsewhere. Shared
    parameters are updated exactly as by ``torch.optim.AdamW`` (scalar ``step``); parameters whose
    ``.grad`` is None are skipped. With every group active and no ``lr_scale`` the numbers equal
    ``torch.optim.AdamW(foreach=False)``.

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
        # id(param) → (Idx, exp_avg rows, exp_avg_sq rows) gathered for the current active set
        self._compact: dict[int, tuple[Any, Tensor, Tensor]] = {}
        super().__init__(model, ctl, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def flush(self) -> None:
        """Write the gathered moments back into ``state`` (they stay valid for the next step)."""
        by_id = {id(p): p for g in self.param_groups for p in g["params"]}
        for pid, (idx, m, v) in self._compact.items():
            p = by_id[pid]
            d = self.ctl.slicings[self._name_of[pid]].dim
            idx.put(self.state[p]["exp_avg"], d, m)
            idx.put(self.state[p]["exp_avg_sq"], d, v)

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._compact.clear()  # the loaded moments replace the gathered ones
        super().load_state_dict(state_dict)


    # ------------------------------------------------------------------------- updates
    def _init_state(self, p: Tensor, step_shape: tuple[int, ...]) -> dict[str, Tensor]:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros(step_shape, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _update_dense(self, p: Tensor, group: dict[str, Any]) -> None:
        st = self._init_state(p, ())
        st["step"] += 1
        _adamw(p, p.grad, st["exp_avg"], st["exp_avg_sq"], group, int(st["step"].item()), group["lr"])

    def _update_sliced(self, p: Tensor, name: str, group: dict[str, Any], lr_scale: Tensor | None) -> None:
        sl = self.ctl.slicings[name]
        st = self._init_state(p, (p.shape[sl.dim],))
        idx = self.ctl.active_sel(name)
        if idx is not None and len(idx) == 0:
            return
        # per-index step counts live in a CPU float32 tensor: count on its numpy view (no kernel
        # launches, no device syncs) and hand Adam a Python int when the active counts agree
        if st["step"].device.type != "cpu" or st["step"].dtype != torch.float32:  # e.g. loaded with map_location
            st["step"] = st["step"].to("cpu", torch.float32)
        counts = st["step"].numpy()
        rows = slice(None) if idx is None else idx.index.numpy()
        counts[rows] += 1
        steps = counts[rows]
        shape = [1] * p.dim()
        shape[sl.dim] = -1
        lr = _slice_lr(group["lr"], lr_scale, sl, idx, shape)
        if steps.min() == steps.max():
            step: int | Tensor = int(steps[0])
        else:
            step = torch.from_numpy(steps).to(device=p.device, dtype=torch.float64).view(shape)
        d = sl.dim
        g_rows = self.ctl.take_grad_rows(name, p.grad)  # (handed out once: taken on every path)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        cached = self._compact.pop(id(p), None)
        if cached is not None:
            old, m_rows, v_rows = cached
            if old is idx:  # same active set: the moments' rows are already gathered
                m, v = m_rows, v_rows
            else:  # the set changed: write the old rows back first
                old.put(m, d, m_rows)
                old.put(v, d, v_rows)
        if idx is None or idx.contiguous:  # views: updated in place
            parts = [p, p.grad, m, v] if idx is None else [idx.take(t, d) for t in (p, p.grad, m, v)]
            _adamw(*parts, group=group, step=step, lr=lr)
            return
        if m is st["exp_avg"]:
            m, v = idx.take(m, d), idx.take(v, d)
        w = idx.take(p, d)
        g = g_rows if g_rows is not None and g_rows.shape == w.shape else idx.take(p.grad, d)
        _adamw(w, g, m, v, group=group, step=step, lr=lr)
        idx.put(p, d, w)
        self._compact[id(p)] = (idx, m, v)


def _adamw(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict[str, Any], step: int | Tensor, lr: float | Tensor
) -> None:
    """In-place AdamW on (views or copies of) one tensor, in torch.optim.AdamW's operation order.
    ``step`` / ``lr``: Python scalars, or float64 tensors broadcastable to ``p``."""
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    if wd != 0:
        if isinstance(lr, Tensor):
            p.mul_((1 - lr * wd).to(p.dtype))
        else:
            p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if isinstance(step, Tensor) or isinstance(lr, Tensor):
        bc1 = 1 - beta1 ** torch.as_tensor(step, dtype=torch.float64)
        bc2 = 1 - beta2 ** torch.as_tensor(step, dtype=torch.float64)
        step_size = (torch.as_tensor(lr, dtype=torch.float64) / bc1).to(p.dtype)
        denom = (v.sqrt() / bc2.sqrt().to(p.dtype)).add_(eps)
        p.add_(m / denom * -step_size)
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def _check_lr_scale(lr_scale: Tensor | None, m: int) -> Tensor | None:
    """``lr_scale`` as float64 [M] on the CPU (None stays None); a one-line error otherwise."""
    if lr_scale is None:
        return None
    lr_scale = torch.as_tensor(lr_scale).detach().cpu()
    if tuple(lr_scale.shape) != (m,) or not lr_scale.is_floating_point():
        raise ConfigError(f"lr_scale: expected a float tensor of shape ({m},), got {tuple(lr_scale.shape)}")
    return lr_scale.double()


def _slice_lr(lr: float, lr_scale: Tensor | None, sl: Any, idx: Any, shape: list[int]) -> float | Tensor:
    """The learning rate of the trained indices of one sliced parameter: ``lr`` (a float) without
    ``lr_scale``, else float64 ``lr · scale`` per index, shaped to broadcast along the sliced dim
    (indices no group owns use 1)."""
    if lr_scale is None:
        return lr
    g_of = sl.group_of if idx is None else idx.take(sl.group_of, 0)
    scale = torch.where(g_of >= 0, lr_scale[g_of.clamp(min=0)], torch.ones((), dtype=torch.float64))
    return (lr * scale).view(shape)


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
    ``torch.optim.SGD(foreach=False)``.

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

    def _update_dense(self, p: Tensor, group: dict[str, Any]) -> None:
        _sgd(p, p.grad, self._buffer(p, group), group, group["lr"])

    def _buffer(self, p: Tensor, group: dict[str, Any]) -> Tensor | None:
        """The momentum buffer of ``p`` (zeros at first: 0·momentum + d = d bit for bit, torch's
        first step), None without momentum."""
        if not group["momentum"]:
            return None
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st["momentum_buffer"]

    def _update_sliced(self, p: Tensor, name: str, group: dict[str, Any], lr_scale: Tensor | None) -> None:
        sl = self.ctl.slicings[name]
        idx = self.ctl.active_sel(name)
        if idx is not None and len(idx) == 0:
            return
        buf = self._buffer(p, group)
        shape = [1] * p.dim()
        shape[sl.dim] = -1
        lr = _slice_lr(group["lr"], lr_scale, sl, idx, shape)
        d = sl.dim
        g_rows = self.ctl.take_grad_rows(name, p.grad)  # (handed out once: taken on every path)
        if idx is None or idx.contiguous:  # views: updated in place
            if idx is None:
                _sgd(p, p.grad, buf, group, lr)
            else:
                _sgd(idx.take(p, d), idx.take(p.grad, d), None if buf is None else idx.take(buf, d), group, lr)
            return
        w = idx.take(p, d)
        g = g_rows if g_rows is not None and g_rows.shape == w.shape else idx.take(p.grad, d)
        b = None if buf is None else idx.take(buf, d)
        _sgd(w, g, b, group, lr)
        idx.put(p, d, w)
        if b is not None:
            idx.put(buf, d, b)


def _sgd(p: Tensor, g: Tensor, buf: Tensor | None, group: dict[str, Any], lr: float | Tensor) -> None:
    """In-place SGD on (views or copies of) one tensor, in torch.optim.SGD's operation order
    (dampening 0, no Nesterov); ``buf`` None = no momentum. ``lr``: a Python float, or a float64
    tensor broadcastable to ``p``."""
    wd, mom = group["weight_decay"], group["momentum"]
    d = g.add(p, alpha=wd) if wd else g
    if buf is not None and mom:
        buf.mul_(mom).add_(d)
        d = buf
    if isinstance(lr, Tensor):
        p.add_(d * (-lr).to(p.dtype))
    else:
        p.add_(d, alpha=-lr)
