"""Per-sample gradient forms of one use of a parameter, and their Grams (private; the hook
strategy of :func:`ntkit.ntk.modular_ntk`).

A :class:`Use` yields per-sample gradient rows ``[N, r1 − r0, *shape[1:]]`` of one parameter use
on demand, so :func:`chunked_grams` never holds more than a budget of them: :class:`Direct`
(materialised), :class:`LinearForm` (``Σ_l δ_l a_lᵀ``), :class:`ConvForm` (unfolded patches or the
grouped-conv weight gradient), :class:`EmbeddingForm` (scattered rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.ntk._grams import SliceSpec, accumulate_slice_grams
from ntkit.ntk._layers import conv_output_hw, conv_padding_hw, unfold
from ntkit.partition import ParamSlice

__all__ = [
    "BUDGET", "ConvForm", "Direct", "EmbeddingForm", "LinearForm", "Use", "chunked_grams", "conv_weight_per_sample",
    "embedding_compact", "pad_rows", "per_sample_sum_to",
]

# Elements of the largest temporary (per-sample gradient chunk, contraction intermediate).
# Kept small: fresh multi-hundred-MB temporaries page-fault at a few GB/s on CPU (DESIGN.md §2).
BUDGET = 1 << 23
# Per-sample conv weight gradients (materialised path), by measurement on CPU (S=64, VGG shapes,
# quiet machine): the grouped-convolution weight gradient (groups = S) wins at ≥ 16×16 output
# positions (1.3–1.8×); at 8×8 unfold + bmm wins (~2×). A loop of batch-1 ``conv2d_weight`` calls
# was faster in isolation at 8×8 but slower inside the engine (row chunks → S·chunks calls).
GROUPED_CONV_MIN_POSITIONS = 256



def conv_rows_family(positions: int) -> str:
    """``"grouped"`` or ``"unfold"``: how :class:`ConvForm` materialises per-sample rows."""
    return "grouped" if positions >= GROUPED_CONV_MIN_POSITIONS else "unfold"



def conv_weight_per_sample(x: Tensor, d: Tensor, conv: nn.Conv1d | nn.Conv2d) -> Tensor:
    """Per-sample weight gradients [N, *W.shape] of any Conv1d / Conv2d (groups, dilation, stride,
    'same' and non-zero padding modes): the padded input's patches, per group, against the output
    gradient — G_i[o, c·k] = Σ_l δ_i[o, l] · patch_i[g(o), c·k, l]. Materialises N·P values."""
    one_d = isinstance(conv, nn.Conv1d)
    if one_d:  # as a Conv2d of height 1
        x, d = x.unsqueeze(2), d.unsqueeze(2)
    k = (1, *conv.kernel_size) if one_d else tuple(conv.kernel_size)
    dil = (1, *conv.dilation) if one_d else tuple(conv.dilation)
    stride = (1, *conv.stride) if one_d else tuple(conv.stride)
    if isinstance(conv.padding, str):  # 'valid' / 'same' (stride 1): d·(k−1) in all, odd one right
        pads = [(0, 0) if conv.padding == "valid" else (dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2)
                for dd, kk in zip(dil, k)]
    else:
        pads = [(0, 0)] + [(p, p) for p in conv.padding] if one_d else [(p, p) for p in conv.padding]
    pad = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    n, g = x.shape[0], conv.groups
    patches = F.unfold(x, k, dilation=dil, stride=stride)  # [N, Cin·kh·kw, L]
    patches = patches.view(n, g, -1, patches.shape[-1])
    dd = d.reshape(n, g, d.shape[1] // g, -1)
    w = torch.einsum("ngol,ngkl->ngok", dd, patches)
    return w.reshape(n, *conv.weight.shape)


def per_sample_sum_to(d: Tensor, shape: torch.Size) -> Tensor:
    """[S, …] gradient of an output that ``shape`` was broadcast into (without a sample dim) →
    per-sample gradients [S, *shape]: sums over the broadcast dims, sample by sample."""
    full = (1,) * (d.dim() - len(shape)) + tuple(shape)
    red = tuple(k for k in range(1, d.dim()) if full[k] == 1 and d.shape[k] != 1)
    if red:
        d = d.sum(red, keepdim=True)
    return d.reshape(d.shape[0], *shape)



class Use:
    """One use of a parameter by one layer call; yields per-sample gradient rows."""

    def rows(self, r0: int, r1: int) -> Tensor:  # [N, r1-r0, *shape[1:]]
        raise NotImplementedError

    flops_per_row: int = 0


class Direct(Use):
    def __init__(self, g: Tensor) -> None:
        self.g = g  # [N, *shape]

    def rows(self, r0: int, r1: int) -> Tensor:
        return self.g[:, r0:r1]


class LinearForm(Use):
    """Weight ``[O, *in_shape]`` applied as ``y_l = W a_l``: a [N, L, I], δ [N, L, O]."""

    def __init__(self, a: Tensor, d: Tensor, shape: torch.Size) -> None:
        self._a = a
        self.d = d
        self.shape = shape
        n, length, o = d.shape
        self.n, self.length, self.fan_out = n, length, o
        self.fan_in = int(math.prod(shape[1:]))
        self.flops_per_row = 2 * n * length * self.fan_in

    @property
    def a(self) -> Tensor:
        return self._a

    def rows(self, r0: int, r1: int) -> Tensor:
        g = torch.bmm(self.d[:, :, r0:r1].transpose(1, 2), self.a)
        return g.view(self.n, r1 - r0, *self.shape[1:])


class ConvForm(LinearForm):
    """Conv2d weight: per-sample gradients by unfold + bmm, or by the grouped-conv weight
    gradient (groups = N) on large maps; the token-Gram form uses the unfolded patches."""

    def __init__(self, x: Tensor, d4: Tensor, conv: nn.Conv2d, shape: torch.Size) -> None:
        self.x = x  # [N, Cin, H, W]
        self.d4 = d4  # [N, Cout, Ho, Wo]
        self.conv = conv
        _n, _cout, _ho, _wo = d4.shape
        super().__init__(None, d4.flatten(2).transpose(1, 2), shape)  # type: ignore[arg-type]
        self._unfolded: Tensor | None = None

    @property
    def a(self) -> Tensor:
        if self._unfolded is None:
            self._unfolded = unfold(self.x, self.conv).transpose(1, 2)  # [N, L, Cin·kh·kw]
        return self._unfolded

    def patch_gram_cost(self) -> tuple[int, bool]:
        """(FLOPs, from_raw) of the token Gram K[(i,l),(j,m)] = patch_il · patch_jm: from the
        raw-activation Gram plus kh·kw shifted adds when cheaper than from unfolded patches."""
        n, c, h, w = self.x.shape
        nl = n * self.length
        unfolded = 2 * nl * nl * self.fan_in
        kh, kw = self.conv.kernel_size
        raw_elems = (n * h * w) ** 2
        raw = 2 * raw_elems * c + kh * kw * nl * nl
        return (raw, True) if raw < unfolded and raw_elems <= 4 * BUDGET else (unfolded, False)

    def patch_gram(self) -> Tensor:
        """K [N·L, N·L] from the raw-activation Gram R (no unfold, no padded copy):
        K[i,y,x,j,y',x'] = Σ_{ky,kx} R[i, y·s+ky·d−p, x…, j, y'·s+ky·d−p, x'…] over the taps
        inside the image (zero padding contributes nothing). R is laid out [h, w, N, h, w, N] so
        that the shifted adds run over contiguous runs of N, then permuted to sample-major."""
        n, c, h, w = self.x.shape
        conv = self.conv
        (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
        ph, pw = conv_padding_hw(conv)
        xf = self.x.permute(2, 3, 0, 1).reshape(h * w * n, c)
        r = (xf @ xf.T).view(h, w, n, h, w, n)
        ho, wo = conv_output_hw(conv, h, w)
        k = r.new_zeros(ho, wo, n, ho, wo, n)

        def taps(k_: int, d: int, s: int, p: int, size: int, out: int) -> tuple[slice, slice] | None:
            lo = max(0, -(-(p - k_ * d) // s))  # first output position whose input is inside
            hi = min(out, (size - 1 + p - k_ * d) // s + 1)
            if lo >= hi:
                return None
            start = lo * s + k_ * d - p
            return slice(lo, hi), slice(start, start + (hi - lo - 1) * s + 1, s)

        for ky in range(kh):
            ty = taps(ky, dh, sh, ph, h, ho)
            for kx in range(kw):
                tx = taps(kx, dw, sw, pw, w, wo)
                if ty is None or tx is None:
                    continue
                (oy, iy), (ox, ix) = ty, tx
                k[oy, ox, :, oy, ox, :] += r[iy, ix, :, iy, ix, :]
        return k.permute(2, 0, 1, 5, 3, 4).reshape(n * ho * wo, n * ho * wo)

    def rows(self, r0: int, r1: int) -> Tensor:
        if conv_rows_family(self.length) != "grouped":
            return super().rows(r0, r1)
        c, n, r = self.conv, self.n, r1 - r0
        cin = self.x.shape[1]
        go = self.d4[:, r0:r1].reshape(1, n * r, *self.d4.shape[2:])
        g = torch.nn.grad.conv2d_weight(
            self.x.reshape(1, n * cin, *self.x.shape[2:]),
            (n * r, cin, *c.kernel_size),
            go,
            stride=c.stride,
            padding=conv_padding_hw(c),
            dilation=c.dilation,
            groups=n,
        )
        return g.view(n, r, *self.shape[1:])


class EmbeddingForm(Use):
    """Embedding weight [V, D]: per-sample gradient rows scatter δ at the sample's ids."""

    def __init__(self, ids: Tensor, d: Tensor, padding_idx: int | None) -> None:
        n = ids.shape[0]
        self.ids = ids.reshape(n, -1)
        self.d = d.reshape(n, self.ids.shape[1], -1)
        if padding_idx is not None:
            self.d = self.d * (self.ids != padding_idx).unsqueeze(-1).to(self.d.dtype)
        self.n = n
        self.sample = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(self.ids)

    def rows(self, r0: int, r1: int) -> Tensor:
        out = self.d.new_zeros(self.n, r1 - r0, self.d.shape[-1])
        m = (self.ids >= r0) & (self.ids < r1)
        out.index_put_((self.sample[m], self.ids[m] - r0), self.d[m], accumulate=True)
        return out


def chunked_grams(
    rows: Callable[[int, int], Tensor],
    shape: torch.Size,
    n: int,
    slices: Sequence[tuple[int, ParamSlice]],
    grams: Tensor,
    budget: int,
    flops_per_row: int = 0,
) -> int:
    """Accumulate slice Grams from per-sample gradient rows produced chunk by chunk along dim 0;
    rows that no slice covers are never computed. Returns FLOPs."""
    row_numel = int(math.prod(shape[1:]))
    step = max(1, budget // max(1, n * row_numel))
    flops = 0
    r0 = 0
    only_dim0 = all(s.dim == 0 for _, s in slices)
    while r0 < shape[0]:
        if only_dim0:  # jump to the next covered row
            nxt = [max(r0, s.start) for _, s in slices if s.stop > r0]
            if not nxt:
                break
            r0 = min(nxt)
        r1 = min(shape[0], r0 + step)
        local: list[SliceSpec] = []
        for gi, s in slices:
            if s.dim == 0:
                a, b = max(s.start, r0), min(s.stop, r1)
                if a < b:
                    local.append((gi, 0, a - r0, b - r0))
            else:
                local.append((gi, s.dim, s.start, s.stop))
        if local:
            flops += flops_per_row * (r1 - r0)
            flops += accumulate_slice_grams(rows(r0, r1), local, grams)
        r0 = r1
    return flops



def pad_rows(a: Tensor, d: Tensor, sample: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Rows [n, ·] owned by samples ``sample`` (any order: a declared MoE dispatch need not be
    sorted) → zero-padded [S, Lmax, ·]."""
    n = sample.numel()
    if n == 0:
        return a.new_zeros(s, 1, *a.shape[1:]), d.new_zeros(s, 1, *d.shape[1:])
    if n > 1 and bool((sample[1:] < sample[:-1]).any()):
        order = torch.argsort(sample, stable=True)
        sample, a, d = sample[order], a[order], d[order]
    counts = torch.bincount(sample, minlength=s)
    offsets = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=a.device) - offsets[sample]
    lmax = int(counts.max())
    ap = a.new_zeros(s, lmax, *a.shape[1:])
    dp = d.new_zeros(s, lmax, *d.shape[1:])
    ap[sample, pos] = a
    dp[sample, pos] = d
    return ap, dp


def embedding_compact(u: EmbeddingForm, slices: Sequence[tuple[int, ParamSlice]], grams: Tensor, budget: int) -> int:
    """Embedding Grams over the rows the batch touches only (untouched rows have zero grads)."""
    ids = u.ids
    uniq, inv = torch.unique(ids, return_inverse=True)
    n, d = u.n, u.d.shape[-1]
    compact = u.d.new_zeros(n, uniq.numel(), d)
    compact.index_put_((u.sample.reshape(-1), inv.reshape(-1)), u.d.reshape(-1, d), accumulate=True)
    uh = uniq.cpu()
    local: list[tuple[int, ParamSlice]] = []
    for gi, s in slices:
        if s.dim == 0:
            a = int(torch.searchsorted(uh, s.start))
            b = int(torch.searchsorted(uh, s.stop))
            if a < b:
                local.append((gi, ParamSlice(s.param, 0, a, b)))
        else:
            local.append((gi, s))
    return chunked_grams(lambda r0, r1: compact[:, r0:r1], compact.shape[1:], n, local, grams, budget)


