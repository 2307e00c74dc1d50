"""AdamW that touches only the active slices of covered parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.sparse.controller import SparseController

__all__ = ["SlicedAdamW"]


class SlicedAdamW(torch.optim.Optimizer):
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
        named = list(model.named_parameters())
        self.ctl = ctl
        self._name_of = {id(p): n for n, p in named}
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__([p for _, p in named], defaults)
        # id(param) → (Idx, exp_avg rows, exp_avg_sq rows) gathered for the current active set
        self._compact: dict[int, tuple[Any, Tensor, Tensor]] = {}
        ctl.keep_grad_rows = True  # the backward hands over the active gradient rows it computed

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

    @torch.no_grad()
    def step(self, closure: Any = None, lr_scale: Tensor | None = None) -> Any:  # type: ignore[override]
        """One update. ``lr_scale``: optional float Tensor [M], a per-group multiplier of ``lr``
        (shared parameters and unowned indices use 1)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        m = len(self.ctl.partition)
        if lr_scale is not None:
            lr_scale = torch.as_tensor(lr_scale).detach().cpu()
            if tuple(lr_scale.shape) != (m,) or not lr_scale.is_floating_point():
                raise ConfigError(f"lr_scale: expected a float tensor of shape ({m},), got {tuple(lr_scale.shape)}")
            lr_scale = lr_scale.double()
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
        if lr_scale is not None:
            g_of = sl.group_of if idx is None else idx.take(sl.group_of, 0)
            scale = torch.where(g_of >= 0, lr_scale[g_of.clamp(min=0)], torch.ones((), dtype=torch.float64))
            lr: float | Tensor = (group["lr"] * scale).view(shape)
        else:
            lr = group["lr"]
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
