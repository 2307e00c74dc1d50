"""Layer introspection shared by the mNTK engine, the empirical NTK and the sparse layers (private).

* :func:`check_independent` — refuse models whose output for one sample depends on the others
  (or is random): every per-sample kernel assumes sample i's output depends on sample i only.
* Conv2d geometry: :func:`conv_padding` (explicit zero padding, ``"valid"`` / ``"same"``
  resolved), :func:`conv_output_hw`, :func:`unfold` (im2col as one strided copy) and
  :func:`unfold_rows` (the same patches, one row per output position, channels innermost).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from ntkit.errors import UnsupportedModelError
from ntkit.structure import structure_of

__all__ = ["check_independent", "conv_output_hw", "conv_padding", "conv_padding_hw", "unfold", "unfold_rows"]


def check_independent(model: nn.Module, caller: str) -> None:
    """Raise :class:`UnsupportedModelError` (naming the module and ``caller``) when a module
    couples samples or randomises outputs: BatchNorm using batch statistics (training mode, or no
    running statistics), active dropout (p > 0 in training mode, also attention dropout of
    ``nn.MultiheadAttention``), and whatever a layer's declared ``coupling``
    (:func:`ntkit.structure.declare`) reports — e.g. the zoo's attention dropout and a
    :class:`~ntkit.models.layers.SwitchFFN` in training mode (expert capacity). Modes are never
    switched here."""
    for name, m in model.named_modules():
        label = f"{name or '<root>'} ({type(m).__name__})"
        why = None
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None):
            why = "BatchNorm using batch statistics couples samples"
        elif isinstance(m, _DropoutNd) and m.training and m.p > 0:
            why = f"active dropout p={m.p} makes the kernel random"
        elif isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0:
            why = f"attention dropout={m.dropout} in training makes the kernel random"
        elif (st := structure_of(m)) is not None and st.coupling is not None:
            why = st.coupling(m)
        if why is not None:
            raise UnsupportedModelError(f"module {label}: {why}; call model.eval() before {caller}")


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding equivalent to ``conv.padding`` (``F.pad`` order).

    ``"valid"``: none; ``"same"`` (stride 1): d·(k−1) in total per dim, the odd one on the
    right / bottom, as PyTorch pads."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (t, b), (le, r) = pads
        return (le, r, t, b)
    ph, pw = conv.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def conv_padding_hw(conv: nn.Conv2d) -> tuple[int, int]:
    """(ph, pw): ``conv.padding`` as the explicit symmetric padding ``F.conv2d`` takes.

    Raises ValueError for an asymmetric ``"same"`` padding (even d·(k−1)); callers refuse such
    layers beforehand."""
    le, r, t, b = conv_padding(conv)
    if le != r or t != b:
        raise ValueError(f"Conv2d padding={conv.padding!r} with kernel {conv.kernel_size}: asymmetric")
    return (t, le)


def conv_output_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """Output (height, width) of ``conv`` on an input of spatial size (h, w)."""
    le, r, t, b = conv_padding(conv)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    return (h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + le + r - dw * (kw - 1) - 1) // sw + 1


def unfold(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Input patches of ``conv``: x [N, C, H, W] → [N, C·kh·kw, Ho·Wo], same values and layout as
    ``F.unfold`` after :func:`conv_padding`, built as one strided copy of the padded input (CPU
    im2col is 3–20× slower at the engine's shapes). Differentiable."""
    n, c = x.shape[:2]
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    pad = conv_padding(conv)
    xp = F.pad(x, pad) if any(pad) else x
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    sn, sc, sy, sx = xp.stride()
    v = xp.as_strided((n, c, kh, kw, ho, wo), (sn, sc, sy * dh, sx * dw, sy * sh, sx * sw))
    return v.reshape(n, c * kh * kw, ho * wo)


def unfold_rows(x: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tensor:
    """Input patches as a matrix with one row per output position, channels innermost:
    x [N, C, H, W] → [N·Ho·Wo, kh·kw·C], column (i, j, c) = tap (i, j) of channel c — the memory
    order of a channels-last weight [Cout, C, kh, kw], so ``patchesᵀ @ δ`` is the weight gradient
    of the filters whose output-gradient columns δ [N·Ho·Wo, k] holds. One strided copy of the
    zero-padded input (symmetric ``padding`` (ph, pw)); channels-last ``x`` reads contiguous runs."""
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = x.permute(0, 2, 3, 1)  # [N, H, W, C]: a contiguous view for channels-last x
    if ph or pw:
        xp = F.pad(xp, (0, 0, pw, pw, ph, ph))
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    sn, sy, sx, sc = xp.stride()
    v = xp.as_strided((n, ho, wo, kh, kw, c), (sn, sy * sh, sx * sw, sy * dh, sx * dw, sc), xp.storage_offset())
    return v.reshape(n * ho * wo, kh * kw * c)
