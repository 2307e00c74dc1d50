"""Which layers and which ops the hook strategy of :func:`ntkit.ntk.modular_ntk` has a per-sample
gradient rule for (private).

* Layer rules (:func:`owners_of`): for every parameter, the modules that hold it and the rule of
  each — ``nn.Linear``, ``nn.Conv2d`` (fast forms for groups = 1 and zero padding; any other
  ``conv_any``), ``nn.Conv1d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``, eval
  BatchNorm, and layers declaring an affine layout (:func:`ntkit.structure.declare`).
* Per-op rules (:func:`rule_of`): a covered parameter consumed by a torch op outside a layer with a
  rule — ``F.linear``, ``F.embedding``, ``X @ P``, ``torch.einsum``, ``X ± P``, ``X * P``,
  ``P.expand(S, …)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ntkit.partition import param_owners
from ntkit.structure import structure_of

__all__ = ["FUNCTIONAL_RULES", "Owner", "bind_args", "owners_of", "rule_of"]

# Functional ops with a per-sample gradient rule when a covered parameter is their weight operand
# outside its module (tied output projections, a second lookup of an embedding table).
FUNCTIONAL_RULES: dict[Any, str] = {F.linear: "linear", F.embedding: "embedding"}
_LINEAR_ARGS = ("input", "weight", "bias")
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
# element-wise ops by a broadcast parameter: name → (kind, sign of P's term when P is the first
# operand, when P is the second)
_ELEMENTWISE: dict[str, tuple[str, float, float]] = {
    "add": ("shift", 1.0, 1.0), "__add__": ("shift", 1.0, 1.0), "__radd__": ("shift", 1.0, 1.0),
    "sub": ("shift", 1.0, -1.0), "__sub__": ("shift", 1.0, -1.0), "__rsub__": ("shift", -1.0, 1.0),
    "mul": ("scale", 1.0, 1.0), "__mul__": ("scale", 1.0, 1.0), "__rmul__": ("scale", 1.0, 1.0),
}
_MATMUL = frozenset({"matmul", "__matmul__"})


def bind_args(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = _LINEAR_ARGS if FUNCTIONAL_RULES.get(func) == "linear" else _EMBEDDING_ARGS
    return dict(zip(names, args)) | kwargs


def _broadcasts_over_samples(p: Tensor, x: Tensor) -> bool:
    """P broadcasts against X [S, …] without a sample dim of its own and without growing X."""
    if p.dim() > x.dim() or (p.dim() == x.dim() and p.shape[0] != 1):
        return False
    try:
        return torch.broadcast_shapes(p.shape, x.shape) == x.shape
    except RuntimeError:
        return False



def _einsum_grad_spec(eq: str, ops: Sequence[Any], p: Tensor, s: int) -> str | None:
    """For ``einsum(eq, X, P)`` (either order) with X's first index the sample index (first in
    the output too, absent from P): the equation of the per-sample gradient
    ``"<out>,<X>-><sample><P>"`` (evaluated on δ and X), or None when the form has no such rule
    (ellipsis, repeated or P-only indices, more operands)."""
    if len(ops) != 2 or sum(o is p for o in ops) != 1 or "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    ip = [o is p for o in ops].index(True)
    tp, tx = terms[ip], terms[1 - ip]
    x = ops[1 - ip]
    if not isinstance(x, Tensor) or isinstance(x, nn.Parameter) or x.dim() != len(tx) or p.dim() != len(tp):
        return None
    if not tx or x.shape[0] != s or not out or out[0] != tx[0] or tx[0] in tp:
        return None
    if len(set(tp)) != len(tp) or len(set(tx)) != len(tx) or len(set(out)) != len(out):
        return None
    if any(c not in tx and c not in out for c in tp):  # an index summed over P alone
        return None
    return f"{out},{tx}->{tx[0]}{tp}"


def rule_of(func: Any, args: Sequence[Any], kwargs: dict[str, Any], p: Tensor, s: int) -> tuple[str, Tensor, Any] | None:
    """(kind, X, sign of P's term — for einsum the per-sample gradient's equation) of a use of
    parameter ``p`` by ``func`` that has a per-sample rule, else None (see
    :meth:`_HookRun.capture`)."""
    kind = FUNCTIONAL_RULES.get(func)
    if kind is not None:
        bound = bind_args(func, args, kwargs)
        x = bound.get("input")
        if bound.get("weight") is not p or not isinstance(x, Tensor) or isinstance(x, nn.Parameter):
            return None
        if kind == "linear" and isinstance(bound.get("bias"), nn.Parameter):
            return None
        if kind == "embedding" and (bound.get("max_norm") is not None or bound.get("scale_grad_by_freq")):
            return None
        if x.dim() < (1 if kind == "embedding" else 2) or x.shape[0] != s:
            return None
        return kind, x, 1.0
    name = getattr(func, "__name__", "")
    if name == "__get__" or len(args) < 1:
        return None
    if name in _ELEMENTWISE and len(args) == 2 and not kwargs:
        a, b = args
        kind, sign_first, sign_second = _ELEMENTWISE[name]
        if a is p and isinstance(b, Tensor) and b is not p:
            x, sign = b, sign_first
        elif b is p and isinstance(a, Tensor) and a is not p:
            x, sign = a, sign_second
        else:
            return None
        if isinstance(x, nn.Parameter) or x.dim() == 0 or x.shape[0] != s or not _broadcasts_over_samples(p, x):
            return None
        return kind, x, sign
    if name in _MATMUL and len(args) == 2 and not kwargs and args[1] is p and p.dim() == 2:
        x = args[0]
        if isinstance(x, Tensor) and not isinstance(x, nn.Parameter) and x.dim() >= 2 and x.shape[0] == s:
            return "linear_t", x, 1.0
        return None
    if name == "einsum" and not kwargs and len(args) >= 2 and isinstance(args[0], str):
        ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        spec = _einsum_grad_spec(args[0], ops, p, s)
        return None if spec is None else ("einsum", ops[1 - [o is p for o in ops].index(True)], spec)
    if name == "expand" and args[0] is p and p.dim() >= 1:
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        if not kwargs and len(shape) >= 1 and shape[0] == s and (len(shape) > p.dim() or p.shape[0] == 1):
            return "expand", p, 1.0
    return None



def _layer_kind(m: nn.Module, attr: str, in_mha: bool) -> tuple[str | None, str]:
    """(kind, reason): kind ∈ linear/conv2d/embedding/layernorm/batchnorm, or None + why not."""
    if in_mha:
        return None, "inside nn.MultiheadAttention (its out_proj.forward never runs)"
    if attr not in ("weight", "bias"):
        return None, f"parameter {attr!r} is not a weight/bias"
    t = type(m)
    if isinstance(m, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear", ""
    st = structure_of(m)
    if st is not None and st.linear is not None:  # declared affine layer (HF Conv1D: W [in, out])
        return ("linear" if st.linear == "out_in" else "linear_t"), ""
    if isinstance(m, nn.Conv2d) and t.forward is nn.Conv2d.forward:
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            return "conv_any", ""  # grouped / depthwise, reflect / replicate / circular, 'same'
        return "conv2d", ""
    if isinstance(m, nn.Conv1d) and t.forward is nn.Conv1d.forward:
        return "conv_any", ""
    if isinstance(m, nn.GroupNorm) and t.forward is nn.GroupNorm.forward:
        return "groupnorm", ""
    if isinstance(m, nn.Embedding) and t.forward is nn.Embedding.forward:
        if m.max_norm is not None or m.scale_grad_by_freq:
            return None, "Embedding with max_norm / scale_grad_by_freq"
        return "embedding", ""
    if isinstance(m, nn.LayerNorm) and t.forward is nn.LayerNorm.forward:
        return "layernorm", ""
    if isinstance(m, _BatchNorm) and t.forward is _BatchNorm.forward:
        return "batchnorm", ""
    return None, f"{t.__name__} has no per-sample gradient rule"


@dataclass
class Owner:
    name: str
    module: nn.Module
    attr: str
    kind: str | None
    reason: str


def owners_of(model: nn.Module) -> dict[int, list[Owner]]:
    """id(parameter) → every (module, attribute) that holds it (tied weights: several), with the
    hook rule of each."""
    in_mha: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            in_mha.update(id(c) for c in m.modules())
    out: dict[int, list[Owner]] = {}
    for pid, owners in param_owners(model).items():
        out[pid] = [Owner(o.name or "<root>", o.module, o.attr, *_layer_kind(o.module, o.attr, id(o.module) in in_mha))
                    for o in owners]
    return out


