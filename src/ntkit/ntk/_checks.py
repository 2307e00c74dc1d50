"""Guards of the hook strategy of :func:`ntkit.ntk.modular_ntk` (private).

The hook strategy sees a covered parameter only where the layer that owns it runs its own
``forward``. Two checks keep it from ever returning a wrong Gram silently:

* :class:`UseTracker` — a :class:`~torch.overrides.TorchFunctionMode` over the engine's forward that
  records every torch op consuming a watched parameter (``F.linear(h, emb.weight)``,
  ``h @ emb.weight.t()``, ``torch.cat([w, …])``, …) outside the forward of a module that owns it.
  Reading metadata (shape, dtype, ``size()``, …) is not a use.
* :func:`gram_self_check` — after the Grams are formed, one extra forward + backward on a small
  subset B of the samples with the watched parameters trainable: for every module group,
  ``Σ_{i,j∈B} Θ_ij`` must equal ``‖∂(Σ_{i∈B} y_i)/∂θ_group‖²`` from autograd (the squared norm of
  the summed per-sample gradients the Gram was built from). A missed or misattributed use breaks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ntkit.partition import ParamSlice

__all__ = ["UseTracker", "check_tolerance", "gram_self_check", "op_name", "subset_rows"]

# Tensor methods / attributes that read metadata only: never a use of the values.
_META_METHODS = frozenset({
    "size", "dim", "numel", "nelement", "is_floating_point", "is_complex", "is_contiguous", "stride",
    "element_size", "data_ptr", "get_device", "storage_offset", "__len__", "__repr__", "__format__",
    "__hash__", "requires_grad_", "is_signed", "is_inference",
})
_META_ATTRS = frozenset({
    "shape", "dtype", "device", "requires_grad", "ndim", "is_leaf", "layout", "grad_fn", "is_cuda",
    "is_cpu", "is_meta", "is_mps", "is_sparse", "is_quantized", "is_nested", "names", "itemsize",
    "nbytes", "grad", "_version", "is_xla",
})


def op_name(func: Callable[..., Any]) -> str:
    """A readable name of a torch op as seen by ``__torch_function__``: ``torch.nn.functional.linear``,
    ``torch.matmul``, ``Tensor.t``, ``Tensor.T`` (attribute reads)."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    mod = getattr(func, "__module__", None)
    qual = getattr(func, "__qualname__", "") or ""
    if mod is None and qual.startswith("TensorBase."):
        return f"Tensor.{name}"
    if mod == "torch._C._nn":
        return f"torch.nn.functional.{name}"
    if mod in ("torch", "torch.functional", "torch._C._VariableFunctions"):
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


# ops that return their input itself when nothing changes: then not a use
_NO_OPS = frozenset({"to", "contiguous", "type_as", "cpu", "cuda", "float", "double"})


def _is_meta(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", None)
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) in _META_ATTRS
    return name in _META_METHODS and getattr(func, "__module__", None) is None


class UseTracker(TorchFunctionMode):
    """Records uses of watched parameters outside the forward of a module that owns them.

    Args:
        watch: ``{id(param): (param name, owner module ids, owner names, param)}``.
        active: ``{id(module): depth}`` — how many forwards of each module are running; the
            engine's forward pre-/post-hooks maintain it.

        capture: optional per-op rule ``(func, args, kwargs, param name, tensor) → output or
            None`` (tensor: the parameter or a watched tensor computed from it): a use it returns
            an output for is accounted (the engine records it as one more use).

    After the ``with`` block, :attr:`found` maps each parameter name to
    ``"<param>: used by <op> outside <owner>"`` (its first unaccounted use).
    """

    def __init__(
        self,
        watch: dict[int, tuple[str, frozenset[int], str, Tensor]],
        active: Mapping[int, int],
        capture: Callable[[Any, Sequence[Any], dict[str, Any], str, Tensor], Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        self.watch = watch
        self.active = active
        self.capture = capture
        self.found: dict[str, str] = {}

    def _unaccounted(self, t: Any, func: Callable[..., Any], out: list[tuple[str, Tensor]]) -> None:
        w = self.watch.get(id(t))
        if w is None or w[3] is not t:
            return
        pname = w[0]
        if pname in self.found or any(self.active.get(o, 0) > 0 for o in w[1]) or _is_meta(func):
            return
        out.append((pname, t))

    def watch_tensor(self, t: Tensor, pname: str, label: str) -> None:
        """Watch ``t`` (a tensor computed from parameter ``pname`` only, e.g. a position
        embedding looked up once and broadcast over the samples) like the parameter itself."""
        self.watch[id(t)] = (pname, frozenset(), label, t)

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        watch = self.watch
        hits: list[tuple[str, Tensor]] = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                if id(a) in watch:
                    self._unaccounted(a, func, hits)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, Tensor) and id(b) in watch:
                        self._unaccounted(b, func, hits)
        if hits:
            if getattr(func, "__name__", None) in _NO_OPS and args and args[0] is hits[0][1]:
                out = func(*args, **kwargs)
                if out is args[0]:  # ``.to()`` / ``.contiguous()`` that returned the tensor itself
                    return out
            if len(hits) == 1 and self.capture is not None:  # a use a per-op rule can take
                out = self.capture(func, args, kwargs, *hits[0])
                if out is not None:
                    return out
            for pname, t in hits:
                self.found.setdefault(pname, f"{pname}: used by {op_name(func)} outside {watch[id(t)][2]}")
        return func(*args, **kwargs)


def subset_rows(s: int) -> list[int]:
    """The samples the self-check uses: the first and the last (all when S ≤ 2)."""
    return list(range(s)) if s <= 2 else [0, s - 1]


# Roundoff of a group's Gram scales with the largest Grams of the model, not with its own: measured
# on the zoo (VGG-16 / ResNet-56 with random BN statistics, S = 4), |Δ_g| ≤ 5e-16 · max_g' scale_g'
# in float64 and ≤ 1.5e-7 · max in float32, while tiny filters reach relative errors of 1 in float32.
# Each group's bound is therefore max(its own scale, FLOOR · the largest scale).
_FLOOR = 1e-2


def check_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of :func:`gram_self_check` for a model computing in ``dtype``: float64
    1e-9, otherwise 1e-3 (float32 forward / backward roundoff in deep models; a missed use of a
    parameter typically shows at 1e-1)."""
    return 1e-9 if dtype == torch.float64 else 1e-3


def gram_self_check(
    grams: Tensor,
    n_out: int,
    rows: Sequence[int],
    grads: Mapping[str, Tensor | None],
    slices: Mapping[str, Sequence[tuple[int, ParamSlice]]],
    rtol: float,
) -> dict[int, float]:
    """Groups whose Gram disagrees with autograd on the samples ``rows``.

    Args:
        grams: [M, S·n_out, S·n_out] Grams holding the contributions of the parameters in
            ``grads`` only (sample-major rows).
        n_out: traced outputs per sample (1 for ``sum_logits``).
        rows: the samples B of the check.
        grads: ``{param: ∂(Σ_{i∈B} Σ_k y_ik)/∂param}`` (None: unused), shaped like the parameter.
        slices: ``{param: [(group, slice), …]}`` for those parameters.
        rtol: relative tolerance against ``max(Σ_{i,j∈B} |Θ_ij|, ‖g‖², 1e-2 · the largest such
            scale of all groups)`` (roundoff follows the model's largest Grams).

    Returns:
        ``{group index: relative discrepancy}`` for the groups that fail.
    """
    m = grams.shape[0]
    acc = grams.dtype
    idx = torch.tensor([i * n_out + k for i in rows for k in range(n_out)], device=grams.device)
    block = grams.index_select(1, idx).index_select(2, idx)
    q_eng = block.sum((1, 2))
    scale = block.abs().sum((1, 2))
    q_auto = torch.zeros(m, dtype=acc, device=grams.device)
    checked = torch.zeros(m, dtype=torch.bool, device=grams.device)
    for pname, g in grads.items():
        items = slices[pname]
        gis = torch.tensor([gi for gi, _ in items], device=grams.device)
        checked[gis] = True
        if g is None:
            continue
        by_dim: dict[int, list[tuple[int, ParamSlice]]] = {}
        for gi, sl in items:
            by_dim.setdefault(sl.dim, []).append((gi, sl))
        for d, its in by_dim.items():
            sq = g.to(acc).movedim(d, 0).reshape(g.shape[d], -1).square().sum(1)
            cs = torch.cat([sq.new_zeros(1), sq.cumsum(0)])
            st = torch.tensor([sl.start for _, sl in its], device=grams.device)
            sp = torch.tensor([sl.stop for _, sl in its], device=grams.device)
            q_auto.index_add_(0, torch.tensor([gi for gi, _ in its], device=grams.device), cs[sp] - cs[st])
    err = (q_eng - q_auto).abs()
    bound = torch.maximum(scale, q_auto)
    bound = torch.maximum(bound, _FLOOR * bound[checked].max()) if bool(checked.any()) else bound
    bad = checked & (err > rtol * bound)
    return {int(gi): float(err[gi] / bound[gi].clamp_min(torch.finfo(acc).tiny)) for gi in bad.nonzero().flatten().tolist()}


def watch_map(
    params: Mapping[str, nn.Parameter],
    owners: Mapping[str, Sequence[tuple[nn.Module, str]]],
    labels: Mapping[str, Sequence[str]] | None = None,
) -> dict[int, tuple[str, frozenset[int], str, Tensor]]:
    """``{id(param): (name, owner module ids, owner names, param)}`` for :class:`UseTracker`;
    ``owners`` maps each watched parameter name to the (module, module name) pairs whose forward
    accounts for its uses (possibly none), ``labels`` to the module names its messages name
    (default: those owners')."""
    out = {}
    for p, os_ in owners.items():
        names = labels[p] if labels is not None and p in labels else [n for _, n in os_]
        out[id(params[p])] = (p, frozenset(id(m) for m, _ in os_), " / ".join(sorted(set(names))), params[p])
    return out
