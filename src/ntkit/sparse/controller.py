"""Partial backward: only active modules' weight gradients are ever computed.

:func:`attach` binds a :class:`~ntkit.partition.Partition` to a model and swaps sliced autograd in
for every covered layer (``nn.Linear`` row / column slices, ``nn.Conv2d`` filters, BatchNorm
affine channels). :meth:`SparseController.set_active` then decides, per module group, whose weight
gradients are computed, and :meth:`SparseController.set_pruned` which groups take no part in the
forward pass at all. Per parameter the cheapest mechanism is chosen:

* every element active and nothing pruned → the layer runs its native op (no overhead);
* no element active → ``requires_grad=False`` (no weight-gradient work; if nothing upstream trains
  either, autograd computes no input gradient — a frozen prefix costs no backward; an MoE expert
  whose parameters are all inactive only back-propagates to its input);
* otherwise → a custom ``torch.autograd.Function`` that multiplies only the active slices.

Parameters that no group covers (embeddings, norms, …) train normally. Parameters of other layer
types (LayerNorm, Embedding, …) may be covered only as whole tensors (then ``requires_grad`` is
toggled); slicing them raises :class:`~ntkit.errors.UnsupportedModelError`.

Limitations: a covered layer must be called through its ``forward`` (``nn.MultiheadAttention``
bypasses ``out_proj.forward``; tied weights used outside their owning module are not sliced).

torch.compile: works (tested with the ``aot_eager`` and default inductor backends; the custom
Functions are traced by dynamo). Changing the active set flips ``requires_grad`` and the layer
plans, which the compiled graph guards on: expect a recompile per distinct active pattern
(``torch._dynamo.config.cache_size_limit`` bounds them; past it dynamo falls back to eager,
which is still correct). For frequently changing sets, keep the model uncompiled.

Autocast: the Functions cast their inputs to the autocast dtype like the native ops do (tested
against native CPU bf16 autocast: identical losses and gradients).

DDP: construct ``DistributedDataParallel(model, find_unused_parameters=True)`` *after*
:func:`attach` (with every group active at construction time). Inactive parameters then get no
gradient and are reported unused; partially active parameters get full-shaped gradients whose
inactive part is zero, which the all-reduce leaves zero. ``static_graph=True`` is not compatible
with changing active sets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.partition import Partition, param_owners
from ntkit.sparse._functions import SLICEABLE, Idx, LayerPlan, sliced_class

__all__ = ["ParamSlicing", "SparseController", "attach"]


@dataclass
class ParamSlicing:
    """How a covered parameter is divided: ``group_of`` LongTensor [size along ``dim``] holding the
    group index owning each index (−1 = shared, always trained)."""

    name: str
    module: str
    attr: str
    dim: int
    group_of: Tensor
    orig_requires_grad: bool


def _as_mask(x: Tensor | Sequence[bool], m: int, field: str) -> Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.numel() and not bool(((t == 0) | (t == 1)).all()):
            raise ConfigError(f"{field}: expected a bool tensor/sequence of length {m}, got dtype {t.dtype}")
        t = t.to(torch.bool)
    if tuple(t.shape) != (m,):
        raise ConfigError(f"{field}: expected shape ({m},) (one entry per partition group), got {tuple(t.shape)}")
    return t.clone()


class SparseController:
    """Which partition groups are active / pruned for a model with sliced autograd attached.

    Use :func:`attach` to create one. ``active`` / ``pruned``: bool tensors [M] (M = number of
    partition groups); pruned implies inactive.
    """

    def __init__(self, model: nn.Module, partition: Partition) -> None:
        partition.bind(model)
        self.model = model
        self.partition = partition
        self._attached = True
        self._keep_grad_rows = False
        self._owners: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # param → (owning group ≥ 0, shared)
        self._sets: dict[bytes, Idx | None] = {}  # index sets of the last _apply, by mask bytes
        m = len(partition)
        self._requested = torch.ones(m, dtype=torch.bool)
        self._pruned = torch.zeros(m, dtype=torch.bool)
        params = dict(model.named_parameters())
        self.slicings: dict[str, ParamSlicing] = {}
        kinds: dict[str, str | None] = {}  # module name -> sliceable kind (None = opaque)
        owners = param_owners(model)  # several modules registering one parameter: tied
        for pname, (dim, group_of) in partition.group_index(model).items():
            mod_name, _, attr = pname.rpartition(".")
            module = model.get_submodule(mod_name)
            p = params[pname]
            if getattr(module, attr, None) is not p:
                raise UnsupportedModelError(f"partition param={pname!r}: not a direct parameter of {mod_name!r}")
            kind, dims = self._kind(module)
            whole = bool((group_of == group_of[0]).all()) and int(group_of[0]) >= 0
            if kind is not None and attr in dims and dim not in dims[attr] and whole:
                dim = dims[attr][0]  # a whole tensor is the same set along any dim
                group_of = torch.full((p.shape[dim],), int(group_of[0]), dtype=torch.long)
            if kind is None or attr not in dims or dim not in dims[attr]:
                if not whole:
                    raise UnsupportedModelError(
                        f"partition param={pname!r}: slicing dim {dim} of {type(module).__name__}.{attr} is not "
                        f"supported (sliceable: Linear weight rows/cols + bias, Conv2d filters + bias, "
                        f"BatchNorm affine); cover it whole or not at all"
                    )
                kind = None
            if kind is not None and not whole and len(owners[id(p)]) > 1:
                raise UnsupportedModelError(
                    f"partition param={pname!r}: tied to another module; its other uses would not be "
                    f"sliced — cover it whole or not at all"
                )
            if kind == "conv2d":
                self._check_conv(pname, module)  # type: ignore[arg-type]
            if kind is not None:
                kinds[mod_name] = kind
            self.slicings[pname] = ParamSlicing(pname, mod_name, attr, dim, group_of, p.requires_grad)
        self._modules: dict[str, tuple[nn.Module, type]] = {}
        for mod_name, kind in kinds.items():
            if kind is not None:
                module = model.get_submodule(mod_name)
                self._modules[mod_name] = (module, type(module))
                module.__class__ = sliced_class(type(module))
                module._ntk_plan = None  # type: ignore[attr-defined]
        self._apply()

    @staticmethod
    def _kind(module: nn.Module) -> tuple[str | None, dict[str, tuple[int, ...]]]:
        if isinstance(module, nn.SyncBatchNorm):  # cross-process statistics: keep its own forward
            return None, {}
        for base, (kind, dims) in SLICEABLE.items():
            # subclasses that override forward (adapters, quantised layers, …) are not ours to replace
            if isinstance(module, base) and type(module).forward is base.forward:
                return kind, dims
        return None, {}

    @staticmethod
    def _check_conv(pname: str, m: nn.Conv2d) -> None:
        if m.groups != 1 or m.padding_mode != "zeros":
            raise UnsupportedModelError(
                f"partition param={pname!r}: sliced Conv2d needs groups=1 and padding_mode='zeros' "
                f"(got groups={m.groups}, padding_mode={m.padding_mode!r})"
            )
        if m.padding == "same" and (any(s != 1 for s in m.stride) or any(k % 2 == 0 for k in m.kernel_size)):
            raise UnsupportedModelError(f"partition param={pname!r}: padding='same' needs stride 1 and odd kernels")

    # ------------------------------------------------------------------------------ state
    @property
    def active(self) -> Tensor:
        """bool [M]: groups whose weight gradients are computed (requested and not pruned)."""
        return self._requested & ~self._pruned

    @property
    def pruned(self) -> Tensor:
        """bool [M]: groups removed from the forward pass."""
        return self._pruned.clone()

    def set_active(self, active: Tensor | Sequence[bool]) -> None:
        """Set the active groups (bool [M]); takes effect from the next forward. Pruned groups stay inactive."""
        self._ensure_attached()
        self._requested = _as_mask(active, len(self.partition), "active")
        self._apply()

    def set_pruned(self, pruned: Tensor | Sequence[bool]) -> None:
        """Set the pruned groups (bool [M]): their slices act as zero in the forward pass and cost nothing."""
        self._ensure_attached()
        pr = _as_mask(pruned, len(self.partition), "pruned")
        for name, sl in self.slicings.items():
            if sl.module not in self._modules:
                g = sl.group_of[sl.group_of >= 0]
                if bool(pr[g].any()):
                    raise UnsupportedModelError(
                        f"pruning param={name!r}: {type(self.model.get_submodule(sl.module)).__name__} "
                        f"has no sliced forward (prunable: Linear, Conv2d, BatchNorm)"
                    )
        self._pruned = pr
        self._apply()

    def active_index(self, name: str) -> Tensor | None:
        """LongTensor of the indices (along the sliced dim) of covered param ``name`` that train
        now (active groups + shared indices); ``None`` when all do."""
        sel = self._active_sel[name]
        return None if sel is None else sel.index

    def active_sel(self, name: str) -> Idx | None:
        """The same set as :meth:`active_index`, as the cached :class:`Idx` (built once per
        :meth:`set_active`, not per optimizer step)."""
        return self._active_sel[name]

    @property
    def keep_grad_rows(self) -> bool:
        """Whether the backward leaves the compact active rows of sliced gradients for
        :meth:`take_grad_rows` (set by :class:`~ntkit.sparse.SlicedAdamW`)."""
        return self._keep_grad_rows

    @keep_grad_rows.setter
    def keep_grad_rows(self, value: bool) -> None:
        self._keep_grad_rows = bool(value)
        for module, _ in self._modules.values():
            plan = getattr(module, "_ntk_plan", None)
            if plan is not None:
                plan.keep_rows = self._keep_grad_rows
                plan.rows.clear()

    def take_grad_rows(self, name: str, grad: Tensor) -> Tensor | None:
        """The active rows of ``grad`` (covered param ``name``) as the last backward computed them
        before scattering them into ``grad``, or None when ``grad`` is no longer that tensor
        unchanged (accumulated, modified in place, cloned, or the active set changed). Each
        stored set of rows is handed out once."""
        sl = self.slicings[name]
        plan = getattr(self._modules[sl.module][0], "_ntk_plan", None)
        entry = None if plan is None else plan.rows.pop(sl.attr, None)
        if entry is None:
            return None
        ptr, version, rows = entry
        if ptr != grad.untyped_storage().data_ptr() or version != grad._version:
            return None
        return rows

    def grad_masks(self) -> dict[str, Tensor]:
        """``{param_name: bool mask shaped like the param}``: True where the element received a real
        gradient in the last backward (False everywhere for params whose ``.grad`` is None)."""
        out: dict[str, Tensor] = {}
        act = self.active
        for name, p in self.model.named_parameters():
            if p.grad is None:
                out[name] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            elif name in self.slicings:
                sl = self.slicings[name]
                idx = torch.from_numpy(self._index_mask(sl, act.numpy())).to(p.device)
                shape = [1] * p.dim()
                shape[sl.dim] = -1
                out[name] = idx.view(shape).expand(p.shape).clone()
            else:
                out[name] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        return out

    def detach(self) -> None:
        """Restore the original layer classes and ``requires_grad`` flags."""
        if not self._attached:
            return
        for module, cls in self._modules.values():
            module.__class__ = cls
            if "_ntk_plan" in module.__dict__:
                del module.__dict__["_ntk_plan"]
        params = dict(self.model.named_parameters())
        for name, sl in self.slicings.items():
            params[name].requires_grad_(sl.orig_requires_grad)
        self._attached = False

    @contextmanager
    def dense_view(self) -> Iterator[nn.Module]:
        """Temporarily present the model with its native layer classes and original
        ``requires_grad`` flags, every pruned group's parameter slices zeroed in place — the same
        function as the pruned forward (a pruned slice acts as zero). For measurements that need
        the native layers (the mNTK engine's per-sample rules, ``torch.func``); on exit classes,
        flags and values come back bit for bit. Yields the model."""
        self._ensure_attached()
        params = dict(self.model.named_parameters())
        flags = {n: params[n].requires_grad for n in self.slicings}
        saved: list[tuple[Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for gi in self._pruned.nonzero(as_tuple=True)[0].tolist():
                    for s in self.partition[gi].slices:
                        view = s.select(params[s.param])
                        saved.append((view, view.clone()))
                        view.zero_()
            for module, cls in self._modules.values():
                module.__class__ = cls
            for name, sl in self.slicings.items():
                params[name].requires_grad_(sl.orig_requires_grad)
            yield self.model
        finally:
            for module, cls in self._modules.values():
                module.__class__ = sliced_class(cls)
            for name, flag in flags.items():
                params[name].requires_grad_(flag)
            with torch.no_grad():
                for view, old in saved:
                    view.copy_(old)

    # ------------------------------------------------------------------------------ internals
    def _ensure_attached(self) -> None:
        if not self._attached:
            raise ConfigError("SparseController: detached; call ntkit.sparse.attach again")

    def _apply(self) -> None:
        params = dict(self.model.named_parameters())
        act, keep = self.active.numpy(), (~self._pruned).numpy()
        per_module: dict[str, dict[str, tuple[ParamSlicing, np.ndarray, np.ndarray]]] = {}
        last, memo = self._sets, {}

        def sel(mask: np.ndarray) -> Idx | None:
            """One Idx per distinct index set: a filter's conv weight, bias and BN affine share it
            (kernels recognise shared sets by identity, e.g. the conv bias gradient fused into the
            weight gradient's call), and a set unchanged since the last call keeps its object
            (SlicedAdamW then keeps its gathered Adam moments)."""
            key = mask.tobytes()
            if key not in memo:
                memo[key] = last[key] if key in last else Idx.of_mask(mask)
            return memo[key]

        self._active_sel: dict[str, Idx | None] = {}
        for name, sl in self.slicings.items():
            amask, kmask = self._index_mask(sl, act), self._index_mask(sl, keep)
            self._active_sel[name] = sel(amask)
            params[name].requires_grad_(sl.orig_requires_grad and bool(amask.any()))
            if not sl.orig_requires_grad:
                amask = np.zeros_like(amask)
            per_module.setdefault(sl.module, {})[sl.attr] = (sl, amask, kmask)
        for mod_name, (module, _) in self._modules.items():
            entries = per_module[mod_name]
            # all kept and each parameter all-or-nothing active: the native op + requires_grad suffice
            full = all(k.all() and (a.all() or not a.any()) for _, a, k in entries.values())
            if full:
                module._ntk_plan = None  # type: ignore[attr-defined]
                continue
            w, b = entries.get("weight"), entries.get("bias")
            module._ntk_plan = LayerPlan(  # type: ignore[attr-defined]
                w_dim=w[0].dim if w else None,
                w_keep=sel(w[2]) if w else None, w_grad=sel(w[1]) if w else None,
                b_keep=sel(b[2]) if b else None, b_grad=sel(b[1]) if b else None,
                keep_rows=self._keep_grad_rows,
            )
        self._sets = memo

    def _index_mask(self, sl: ParamSlicing, groups: np.ndarray) -> np.ndarray:
        """Per index along the sliced dim of ``sl``: True if its group is selected in ``groups``
        (bool [M]) or it is shared (−1: always trained). On the host, in numpy."""
        if sl.name not in self._owners:
            g = sl.group_of.cpu().numpy()
            self._owners[sl.name] = (np.clip(g, 0, None), g < 0)
        owner, shared = self._owners[sl.name]
        return groups[owner] | shared


def attach(model: nn.Module, partition: Partition) -> SparseController:
    """Swap sliced autograd in for the layers ``partition`` covers; all groups start active.

    Args:
        model: the model (modified in place: covered layers' classes are swapped for ``Sliced*``
            subclasses with identical parameters and ``state_dict``; :meth:`SparseController.detach`
            restores them).
        partition: groups of parameter slices (names as in ``model.named_parameters()``).

    Returns:
        The :class:`SparseController` for ``set_active`` / ``set_pruned``.
    """
    return SparseController(model, partition)
