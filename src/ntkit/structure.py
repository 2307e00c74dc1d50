"""Declared structure of layers: how the engine and the partition builders learn about layers
they do not know (the zoo's, Hugging Face's, yours).

The mNTK engine (:mod:`ntkit.ntk`) and the partition builders (:mod:`ntkit.partition`) know
``torch.nn`` only. Any other layer class declares what they need with :func:`declare`, keyed by
the class or by its qualified name (``"transformers.pytorch_utils.Conv1D"`` — no import of the
library needed until one of its layers is met):

* ``heads`` — its attention heads: ``fn(module) → [[HeadSlice, …] per head]``, each slice a
  (parameter, dim, start, stop) range of one of the module's parameters;
* ``experts`` / ``router`` / ``dispatch`` — a mixture-of-experts layer: the expert submodules, the
  router Linear (its input is the flattened tokens [S·T, D]) and, after a forward, the tokens each
  expert received (flat indices into S·T, one tensor per expert) and T;
* ``linear`` — the layer computes an affine map with a known layout, so the engine's Linear rule
  applies to it although its ``forward`` is its own: ``"out_in"`` (``y = x Wᵀ + b``, W [out, in],
  as ``nn.Linear``) or ``"in_out"`` (``y = x W + b``, W [in, out], as HF's ``Conv1D``);
* ``coupling`` — ``fn(module) → reason or None``: why its output for one sample depends on the
  other samples or is random in the module's current mode (the engine then refuses the model).

A declaration is a promise about the math: the engine's self-check still compares what it
attributes with autograd and recomputes a module whose declaration is wrong, naming it.

The declarations for third-party layers ntkit knows (Hugging Face GPT-2's ``Conv1D`` and its
fused-QKV attention; timm's ViT fused-QKV attention) are at the end of this module; the zoo declares
its layers where they are defined (:mod:`ntkit.models.layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from ntkit.errors import ConfigError

__all__ = ["HeadSlice", "Structure", "declare", "structure_of"]


class HeadSlice(NamedTuple):
    """Rows ``start:stop`` of ``param`` along ``dim`` belong to one head."""

    param: Tensor
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Structure:
    """What a layer class declares (see the module docstring); None = not declared."""

    heads: Callable[[nn.Module], Sequence[Sequence[HeadSlice]]] | None = None
    experts: Callable[[nn.Module], Sequence[nn.Module]] | None = None
    router: Callable[[nn.Module], nn.Module | None] | None = None
    dispatch: Callable[[nn.Module], tuple[Sequence[Tensor], int]] | None = None
    linear: str | None = None
    coupling: Callable[[nn.Module], str | None] | None = None


_LINEAR_LAYOUTS = ("out_in", "in_out")
_REGISTRY: dict[Any, Structure] = {}


def declare(cls: type[nn.Module] | str, **fields: Any) -> Structure:
    """Declare the structure of the layer class ``cls`` (a class, or its qualified name
    ``"package.module.ClassName"``); fields as :class:`Structure`. A second declaration of the same
    class replaces the first. Subclasses inherit a declaration unless they override ``forward``
    (then the math may differ and nothing is inherited).

    Raises:
        ConfigError: unknown field, or a ``linear`` layout other than ``"out_in"`` / ``"in_out"``.
    """
    unknown = sorted(set(fields) - set(Structure.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"declare: unknown field {unknown[0]!r}; expected one of {', '.join(Structure.__dataclass_fields__)}")
    if fields.get("linear") is not None and fields["linear"] not in _LINEAR_LAYOUTS:
        raise ConfigError(f"declare: linear={fields['linear']!r}: expected one of {', '.join(_LINEAR_LAYOUTS)}")
    if not (isinstance(cls, str) or (isinstance(cls, type) and issubclass(cls, nn.Module))):
        raise ConfigError(f"declare: cls={cls!r}: expected an nn.Module subclass or its qualified name")
    st = Structure(**fields)
    _REGISTRY[cls] = st
    return st


def _qualname(c: type) -> str:
    return f"{c.__module__}.{c.__qualname__}"


def structure_of(module: nn.Module) -> Structure | None:
    """The declaration that applies to ``module``: its class's, else the nearest base class's
    whose ``forward`` it does not override; None when nothing is declared."""
    t = type(module)
    for c in t.__mro__:
        if c is nn.Module:
            return None
        st = _REGISTRY.get(c) or _REGISTRY.get(_qualname(c))
        if st is not None:
            return st if c is t or t.forward is c.forward else None  # type: ignore[attr-defined]
    return None


# --------------------------------------------------------------------------- third-party layers
def _fused_qkv_heads(n: int, dh: int, qkv_w: Tensor, qkv_dim: int, qkv_b: Tensor | None, out_w: Tensor,
                     out_dim: int) -> list[list[HeadSlice]]:
    """Heads of a fused [q | k | v] projection (each block ``n · dh`` wide along ``qkv_dim`` of the
    weight, head-major) and an output projection taking head h's outputs at h·dh:(h+1)·dh along
    ``out_dim``: head h owns its q, k and v slices of the weight and bias and its output slice."""
    block = n * dh
    heads = []
    for h in range(n):
        spans = [(j * block + h * dh, j * block + (h + 1) * dh) for j in range(3)]
        slices = [HeadSlice(qkv_w, qkv_dim, a, b) for a, b in spans]
        if qkv_b is not None:
            slices += [HeadSlice(qkv_b, 0, a, b) for a, b in spans]
        slices.append(HeadSlice(out_w, out_dim, h * dh, (h + 1) * dh))
        heads.append(slices)
    return heads


def _gpt2_heads(m: nn.Module) -> list[list[HeadSlice]]:
    """HF GPT-2 attention (``GPT2Attention``): ``c_attn`` is a ``Conv1D`` with W [d, 3d] whose
    columns are [q | k | v], each block ``num_heads · head_dim`` columns, head-major; ``c_proj``
    W [d, d] takes head h's outputs in rows h·dh:(h+1)·dh. Cross-attention (``q_attn``) layers
    are not split."""
    if getattr(m, "is_cross_attention", False):
        return []
    return _fused_qkv_heads(int(m.num_heads), int(m.head_dim), m.c_attn.weight, 1, m.c_attn.bias, m.c_proj.weight, 0)


def _timm_vit_heads(m: nn.Module) -> list[list[HeadSlice]]:
    """timm ViT attention (``timm.models.vision_transformer.Attention``): ``qkv`` is an
    ``nn.Linear`` with W [3·D, D] whose rows are [q | k | v], each block ``num_heads · head_dim``
    rows, head-major (its forward reshapes the output to [B, N, 3, H, dh]); ``proj`` W [D, D] takes
    head h's outputs in columns h·dh:(h+1)·dh. Head h owns its q, k and v rows of ``qkv.weight``
    (and of ``qkv.bias`` when ``qkv_bias=True``) and those columns of ``proj.weight``; ``proj.bias``
    is shared. With ``qk_norm=True`` the ``q_norm`` / ``k_norm`` LayerNorms act on head_dim with one
    weight shared by all heads: they are not split per head (no head owns them)."""
    return _fused_qkv_heads(int(m.num_heads), int(m.head_dim), m.qkv.weight, 0, m.qkv.bias, m.proj.weight, 1)


declare("transformers.pytorch_utils.Conv1D", linear="in_out")
declare("transformers.models.gpt2.modeling_gpt2.GPT2Attention", heads=_gpt2_heads)
declare("timm.models.vision_transformer.Attention", heads=_timm_vit_heads)
