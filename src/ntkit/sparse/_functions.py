"""Sliced autograd: custom ``torch.autograd.Function`` s that execute only the active work.

Private module. :mod:`ntkit.sparse.controller` swaps the class of each covered layer for a
``Sliced*`` subclass (same parameters, same names, same ``state_dict``) whose ``forward`` either
calls the native op (plan ``None``: everything active, nothing pruned) or one of the Functions
below, driven by a :class:`LayerPlan`:

* ``*_keep``: indices (along the sliced dim) that are not pruned. Pruned rows / filters / columns
  are never multiplied: forward computes only kept outputs (or reads only kept input columns) and
  writes zeros elsewhere, exactly as if the pruned slices were zero.
* ``*_grad``: indices whose weight gradient is computed (active ⊆ kept). The weight gradient is a
  full-shaped tensor with zeros outside the active indices; only the active part is ever multiplied.

Input gradients are computed only when autograd asks for them (``ctx.needs_input_grad``), i.e.
when something upstream trains; the controller sets ``requires_grad=False`` on covered parameters
whose groups are all inactive, so a frozen prefix costs no backward at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import _disable_current_modes

from ntkit.errors import ConfigError
from ntkit.ntk._layers import conv_output_hw, conv_padding_hw, unfold_rows

__all__ = ["SLICEABLE", "Idx", "LayerPlan", "sliced_class"]


_RUNS_MIN_NUMEL = 1 << 16  # below this, one index_select (one dispatch) beats a copy per run
_RUNS_MAX = 8


class Idx:
    """A set of indices along one dimension of size ``size``: contiguous (uses ``narrow``),
    blocked (every run of the set starts and stops on a multiple of a block length L > 1, e.g. a
    head's dh rows: gathers whole blocks, which copies contiguous memory) or arbitrary
    (``index_select`` / ``index_copy_``). ``index``: LongTensor [k] (sorted, unique)."""

    def __init__(self, index: Tensor, size: int) -> None:
        self.index = index.to(torch.long).cpu()
        self.size = int(size)
        # host-side bookkeeping in numpy: every set_active builds index sets, and a handful of
        # tiny torch ops per set cost more than the small layers' kernels
        ix = self.rows = self.index.numpy()  # (numpy view: host-side bookkeeping indexes with it)
        k = ix.size
        self.start = int(ix[0]) if k else 0
        self.stop = int(ix[-1]) + 1 if k else 0
        self.contiguous = k == 0 or self.stop - self.start == k
        self.block = 1
        if not self.contiguous:
            breaks = np.flatnonzero(ix[1:] != ix[:-1] + 1)
            ends = np.concatenate([ix[:1], ix[breaks + 1], ix[breaks] + 1, ix[-1:] + 1, [self.size]])
            self.block = int(np.gcd.reduce(ends))
        self._blocks = self.index[:: self.block] // self.block if self.block > 1 else self.index
        # runs of consecutive indices (start, length) of a blocked set: a few whole blocks
        self._runs: list[tuple[int, int]] = []
        if self.block > 1:
            starts = np.concatenate([ix[:1], ix[breaks + 1]])
            stops = np.concatenate([ix[breaks] + 1, ix[-1:] + 1])
            self._runs = [(int(a), int(b - a)) for a, b in zip(starts, stops)]
        self._dev: dict[torch.device, Tensor] = {}
        self._complement: Idx | None = None

    @classmethod
    def of_mask(cls, mask: np.ndarray) -> Idx | None:
        """The True positions of a bool array (None when all are True: "everything")."""
        if mask.all():
            return None
        return cls(torch.from_numpy(np.flatnonzero(mask)), mask.size)

    def __len__(self) -> int:
        return int(self.index.numel())

    def _on(self, device: torch.device) -> Tensor:
        if device not in self._dev:
            self._dev[device] = self._blocks.to(device)
        return self._dev[device]

    def take(self, t: Tensor, dim: int) -> Tensor:
        """The selected part of ``t`` along ``dim`` (a view when contiguous, else a copy, in
        ``t``'s memory format)."""
        if self.contiguous:
            return t.narrow(dim, self.start, self.stop - self.start)
        mat = _nhwc_matrix(t, dim)
        if mat is not None:
            return _from_nhwc_matrix(self.take(mat, dim % 4), t.shape, dim % 4)
        if self.block > 1:
            dim = dim % t.dim()
            if t.numel() >= _RUNS_MIN_NUMEL and len(self._runs) <= _RUNS_MAX:
                # a few long runs (e.g. whole heads of a 4096-token activation): one parallel copy
                # of contiguous pieces (0.16 against 0.43 ms for half the heads of [4096, 512])
                return torch.cat([t.narrow(dim, a, n) for a, n in self._runs], dim)
            blocks = t.unflatten(dim, (self.size // self.block, self.block))
            return blocks.index_select(dim, self._on(t.device)).flatten(dim, dim + 1)
        if dim % t.dim() == 1 and t.dim() == 2 and t.is_contiguous():
            # columns of a row-major matrix (the channels of an NHWC activation): gather over a
            # stride-0 index beats index_select 1.4–1.7× (0.38 against 0.65 ms for 32 of 64 columns
            # of [65536, 64])
            return torch.gather(t, 1, self._on(t.device).expand(t.shape[0], -1))
        return t.index_select(dim, self._on(t.device))

    def complement(self) -> Idx:
        """The indices not in this set (cached)."""
        if self._complement is None:
            keep = np.ones(self.size, dtype=bool)
            keep[self.index.numpy()] = False
            self._complement = Idx(torch.from_numpy(np.flatnonzero(keep)), self.size)
        return self._complement

    def scatter(self, src: Tensor, dim: int, shape: Sequence[int] | torch.Size) -> Tensor:
        """A new tensor of ``shape`` (in ``src``'s memory format) holding ``src`` at the selected
        positions along ``dim`` and zeros elsewhere; each element is written once (no zero fill
        under the copied part)."""
        out = torch.empty(tuple(shape), dtype=src.dtype, device=src.device, memory_format=_format_of(src))
        self.put(out, dim, src)
        self.complement().zero(out, dim)
        return out

    def zero(self, out: Tensor, dim: int) -> Tensor:
        """Zero the selected part of ``out`` along ``dim`` (in place); returns ``out``."""
        if not len(self):
            return out
        if self.contiguous:
            out.narrow(dim, self.start, self.stop - self.start).zero_()
            return out
        mat = _nhwc_matrix(out, dim)
        if mat is not None:
            self.zero(mat, dim % 4)
        elif self.block > 1:
            dim = dim % out.dim()
            out.unflatten(dim, (self.size // self.block, self.block)).index_fill_(dim, self._on(out.device), 0)
        else:
            out.index_fill_(dim, self._on(out.device), 0)
        return out

    def put(self, out: Tensor, dim: int, src: Tensor) -> Tensor:
        """Write ``src`` into the selected part of ``out`` along ``dim`` (in place); returns ``out``."""
        if self.contiguous:
            out.narrow(dim, self.start, self.stop - self.start).copy_(src)
            return out
        mat = _nhwc_matrix(out, dim)
        if mat is not None:
            self.put(mat, dim % 4, _nhwc_matrix(src, dim, force=True))
        elif self.block > 1:
            dim = dim % out.dim()
            view = out.unflatten(dim, (self.size // self.block, self.block))
            view.index_copy_(dim, self._on(out.device), src.unflatten(dim, (len(self) // self.block, self.block)))
        else:
            out.index_copy_(dim, self._on(out.device), src)
        return out


def _channels_last(t: Tensor) -> bool:
    """Whether a 4-D tensor is stored channels-last (NHWC) and not also NCHW-contiguous."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _format_of(t: Tensor) -> torch.memory_format:
    """``t``'s memory format as far as the sliced layers care: channels-last or contiguous."""
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


def _nhwc_matrix(t: Tensor, dim: int, force: bool = False) -> Tensor | None:
    """A channels-last 4-D ``t`` as the matrix its memory holds, with NCHW ``dim`` 0 (rows, e.g.
    a weight's filters) or 1 (columns: the channels) as that dimension of the matrix: [N, H·W·C]
    or [N·H·W, C], a view. ``None`` for any other tensor or dim (unless ``force``: then any 4-D
    ``t`` is reshaped, copying if needed). Index ops on these views run on contiguous memory;
    ``index_select`` on dim 1 of the 4-D tensor itself returns NCHW, at about 4× the cost (2.3 vs
    0.6 ms measured for 64×64×32×32, half the channels), and on dim 0 it takes a strided path."""
    d = dim % 4 if t.dim() == 4 else -1
    if d not in (0, 1) or not (force or _channels_last(t)):
        return None
    n, c, h, w = t.shape
    v = t.permute(0, 2, 3, 1)
    return v.reshape(n, h * w * c) if d == 0 else v.reshape(n * h * w, c)


def _from_nhwc_matrix(mat: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Inverse of :func:`_nhwc_matrix` for a result whose ``dim`` changed length: a channels-last view."""
    n, c, h, w = shape
    n, c = (mat.shape[0], c) if dim == 0 else (n, mat.shape[1])
    return mat.view(n, h, w, c).permute(0, 3, 1, 2)


@dataclass
class LayerPlan:
    """What one layer executes. ``None`` index sets mean "all". ``w_dim``: the weight's sliced
    dimension (0 = rows / output channels, 1 = Linear columns), ``None`` if the weight is not
    sliced (then ``w_keep``/``w_grad`` are None)."""

    w_dim: int | None
    w_keep: Idx | None
    w_grad: Idx | None
    b_keep: Idx | None
    b_grad: Idx | None
    # When True, the backward leaves the compact rows of each sliced gradient in ``rows``
    # (attr → (storage pointer, version, rows)) for SlicedAdamW, which would otherwise gather
    # them again from the full ``.grad`` it just scattered them into.
    keep_rows: bool = False
    rows: dict[str, tuple[int, int, Tensor]] = field(default_factory=dict)

    def scattered(self, attr: str, sel: Idx, src: Tensor, dim: int, shape: Sequence[int] | torch.Size) -> Tensor:
        """``sel.scatter(src, dim, shape)`` for a parameter's gradient; with :attr:`keep_rows` also
        remembers ``src``. Parameters are small next to activations, so the output is zero-filled
        and the rows copied in with one index op (a scatter that writes each element once costs 2–5×
        more at these sizes: 6.5 against 34 µs for half of a 16×16×3×3 channels-last weight)."""
        out = torch.empty(tuple(shape), dtype=src.dtype, device=src.device, memory_format=_format_of(src)).zero_()
        if sel.block == 1 and not sel.contiguous:
            out.index_copy_(dim, sel._on(src.device), src)
        else:
            sel.put(out, dim, src)
        if self.keep_rows:
            self.rows[attr] = (out.untyped_storage().data_ptr(), out._version, src)
        return out

    def masked(self, attr: str, sel: Idx, full: Tensor, dim: int) -> Tensor:
        """A parameter's gradient computed for every slice (the ``dense`` convolution kernel): the
        slices outside ``sel`` zeroed in place. No compact rows are kept (the optimizer gathers
        them), and any left by an earlier call are dropped."""
        self.rows.pop(attr, None)
        return sel.complement().zero(full, dim)


def _masked_full(t: Tensor, keep: Idx | None, dim: int) -> Tensor:
    """``t`` with the not-kept entries along ``dim`` replaced by zeros (no grad tracking)."""
    if keep is None:
        return t
    return keep.scatter(keep.take(t, dim), dim, t.shape)


def _sum_sel(g: Tensor, sel: Idx | None, dims: tuple[int, ...]) -> Tensor:
    """Bias gradient: sum of ``g`` over ``dims`` for the selected channels (dim 1 of g), zeros elsewhere."""
    if sel is None:
        return g.sum(dims)
    return sel.scatter(sel.take(g, 1).sum(dims), 0, (sel.size,))


def _take_channels(sel: Idx, t: Tensor) -> Tensor:
    """``sel``'s channels (dim 1) of ``t`` as a dense tensor in ``t``'s memory format."""
    return sel.take(t, 1).contiguous(memory_format=_format_of(t))


# --------------------------------------------------------------------------------------- Linear
class _LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with row (output) or column (input) slicing. x [..., in] → y [..., out]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: LayerPlan) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        n, out_f = x2.shape[0], weight.shape[0]
        keep = plan.w_keep
        if keep is None and bias is not None and plan.b_keep is None:
            y = torch.addmm(bias, x2, weight.t())
            bias = None  # added
        elif keep is None:
            y = x2 @ weight.t()
        elif plan.w_dim == 0:
            y = x2.new_zeros(n, out_f)
            if len(keep):
                keep.put(y, 1, x2 @ keep.take(weight, 0).t())
        else:
            y = keep.take(x2, 1) @ keep.take(weight, 1).t()
        if bias is not None:
            y = y + _masked_full(bias, plan.b_keep, 0)
        ctx.save_for_backward(x2, weight)
        ctx.plan, ctx.x_shape = plan, x.shape
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x2, w = ctx.saved_tensors
        p: LayerPlan = ctx.plan
        g = gy.reshape(-1, w.shape[0])
        gx = gw = gb = None
        keep = p.w_keep
        if ctx.needs_input_grad[0]:
            if keep is None:
                gx = g @ w
            elif p.w_dim == 0:
                gx = keep.take(g, 1) @ keep.take(w, 0) if len(keep) else g.new_zeros(x2.shape)
            else:
                gx = keep.scatter(g @ keep.take(w, 1), 1, x2.shape)
            gx = gx.view(ctx.x_shape)
        g_a = None  # output-gradient columns of the active rows, shared by dW and db
        if ctx.needs_input_grad[1]:
            a = p.w_grad
            if a is None:
                gw = g.t() @ x2
            elif p.w_dim == 0:
                g_a = a.take(g, 1)
                gw = p.scattered("weight", a, g_a.t() @ x2, 0, w.shape)
            else:
                gw = p.scattered("weight", a, g.t() @ a.take(x2, 1), 1, w.shape)
        if ctx.needs_input_grad[2]:
            if g_a is not None and p.b_grad is p.w_grad:
                gb = p.scattered("bias", p.b_grad, g_a.sum(0), 0, w.shape[:1])
            else:
                gb = _sum_sel(g, p.b_grad, (0,))
        return gx, gw, gb, None


# --------------------------------------------------------------------------------------- Conv2d
def _conv_memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout of a convolution's output (and of the gradients its backward works on): channels-last
    when the input or the weight is, as PyTorch's own convolution decides (an NHWC model fed NCHW
    batches runs NHWC from its first layer on)."""
    return torch.channels_last if _channels_last(x) or _channels_last(weight) else torch.contiguous_format


_Conf = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (stride, padding, dilation), hashable
_KERNELS = ("native", "gemm", "dense")
CONV_KERNELS = ("tune", "tune-dense", *_KERNELS)
TUNE_MARGIN = 0.05  # ``tune`` keeps ``native`` unless another kernel is faster by more than this
_KERNEL_CHOICE: dict[str, str] = {}  # ``tune*``: problem signature → the kernel measured fastest
_KEY_MEMO: dict[tuple, str] = {}  # shapes, strides, … → that signature


def _conv_kernel_setting() -> str:
    """``$NTKIT_CONV_WGRAD``: how a convolution with active filters runs its backward."""
    k = os.environ.get("NTKIT_CONV_WGRAD", "tune") or "tune"
    if k not in CONV_KERNELS:
        raise ConfigError(f"NTKIT_CONV_WGRAD={k!r}: expected one of {', '.join(CONV_KERNELS)}")
    return k


def conv_kernel_choices() -> dict[str, str]:
    """The kernels ``tune`` has chosen in this process (problem signature → kernel): part of a run's
    state, so that a resumed run computes with the kernels it had (:func:`load_conv_kernel_choices`)."""
    return dict(_KERNEL_CHOICE)


def load_conv_kernel_choices(choices: dict[str, str]) -> None:
    """Adopt earlier choices (:func:`conv_kernel_choices`): their problems are not timed again."""
    bad = {v for v in choices.values() if v not in _KERNELS}
    if bad:
        raise ConfigError(f"conv kernel choices: unknown kernel {min(bad)!r}")
    _KERNEL_CHOICE.update(choices)


def _conv_kernel(gy: Tensor, x: Tensor, w: Tensor, p: LayerPlan, conf: _Conf,
                 need_x: bool, fused_b: bool, run: dict[str, Callable[[], object]]) -> str:
    """Which kernel runs the backward of a convolution whose active filters ``p.w_grad`` are a
    proper, non-empty subset. Three execute it (``run``: the whole layer backward each):

    * ``native``: the input gradient, then the output-gradient channels of the active filters
      gathered and the convolution's own weight-gradient kernel (oneDNN on CPU) on them;
    * ``gemm``: the input gradient, then one matrix product ``patchesᵀ @ δ_a``
      (:func:`unfold_rows`: one strided copy of the input; δ_a: the gathered output-gradient
      columns). The same FLOPs as ``native``;
    * ``dense``: the plain fused backward of all filters, the inactive rows of the weight (and
      bias) gradient then zeroed. It computes the inactive filters' gradient, and the FLOP counter
      counts it: the fallback where slicing cannot pay. Not with pruned filters (there ``native``).

    Which one is fastest depends on the CPU, not only on the shapes. Measured on two 2-core AMD
    EPYC VMs with AVX-512 (VGG-16, batch 64, half the filters): on one, oneDNN's weight gradient
    at 2×2 and 4×4 pixels ran far below GEMM speed (half of 128 filters at 2×2: 1.3–1.8 ms native,
    0.6–0.8 ms gemm); on the other, native beat gemm 1.4–5× at every layer (0.24 against 0.36 ms
    there), and at 8–16 filters half of them cost oneDNN as much as all of them, so ``dense``
    won (0.18 against 0.45 ms on the 3-channel first layer). A fixed rule tuned on one machine
    loses on the other, hence ``$NTKIT_CONV_WGRAD``:

    * ``tune`` (default): on the CPU, times ``native`` and ``gemm`` once per problem (shapes,
      memory formats, dtype, threads, whether the input gradient and bias are needed, the number of
      active filters to an eighth of the layer), interleaved, best of 3 after a warm-up, like
      ``torch.backends.cudnn.benchmark``; ``native`` is kept unless ``gemm`` is faster by more than
      :data:`TUNE_MARGIN`. Both execute the same FLOPs, so the FLOP counts do not depend on the
      machine; the last bits of the numbers may differ between processes: the training loop saves
      the choices with its checkpoints (:func:`conv_kernel_choices`), so a resumed run keeps its
      kernels. The trials run outside any dispatch mode, so a ``FlopCounterMode`` counts the chosen
      kernel once, not the trials. Other devices: ``native``;
    * ``tune-dense``: the same with ``dense`` among the candidates: the fastest wall-clock, at the
      price of computing (and being charged) the inactive filters' gradient where ``dense`` wins,
      which then depends on the machine. Not the default, because MAT's compute (its FLOPs, the
      paper's metric) would then vary with the CPU;
    * ``native`` / ``gemm`` / ``dense``: that kernel everywhere (deterministic; ``dense`` falls
      back to ``native`` where filters are pruned)."""
    setting = _conv_kernel_setting()
    dense_ok = p.w_keep is None
    if not setting.startswith("tune"):
        return setting if setting != "dense" or dense_ok else "native"
    if x.device.type != "cpu":
        return "native"
    with_dense = setting == "tune-dense" and dense_ok
    c = w.shape[0]
    bucket = -(-len(p.w_grad) * 8 // c)  # type: ignore[arg-type]  # active filters, to an eighth of the layer
    fast = (x.shape, x.stride(), gy.stride(), w.shape, bucket, conf, x.dtype, need_x, fused_b, with_dense,
            torch.get_num_threads())  # a cheap key for the signature of the next backward (15 → 3 µs)
    key = _KEY_MEMO.get(fast)
    if key is None:
        key = _KEY_MEMO[fast] = (
            f"{tuple(x.shape)}/{int(_channels_last(x))}{int(_channels_last(gy))}/{tuple(w.shape)}/{bucket}/"
            f"{conf}/{str(x.dtype)[6:]}/x{int(need_x)}b{int(fused_b)}d{int(with_dense)}/t{torch.get_num_threads()}")
    choice = _KERNEL_CHOICE.get(key)
    if choice is None:
        cands = run if with_dense else {k: v for k, v in run.items() if k != "dense"}
        with _disable_current_modes():  # e.g. a FlopCounterMode: it counts the chosen run, not the trials
            choice = _KERNEL_CHOICE[key] = _fastest(cands, prefer="native")
    return choice


def _fastest(fns: dict[str, Callable[[], object]], prefer: str, repeats: int = 3,
             margin: float = TUNE_MARGIN) -> str:
    """The name of the fastest of ``fns`` (best of ``repeats`` interleaved calls after one warm-up
    each), or ``prefer`` when it is within ``margin`` of the fastest."""
    best = dict.fromkeys(fns, float("inf"))
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    fastest = min(best, key=best.__getitem__)
    return prefer if best[prefer] <= best[fastest] * (1 + margin) else fastest


def _native_wgrad(gy: Tensor, x: Tensor, w: Tensor, a: Idx, conf: _Conf,
                  with_bias: bool) -> tuple[Tensor, Tensor | None]:
    stride, pad, dil = conf
    # the weight's values do not enter its own gradient: a view of the right shape (the first
    # len(a) filters) instead of a gather
    _, gw_a, gb_a = torch.ops.aten.convolution_backward(
        _take_channels(a, gy), x, w.narrow(0, 0, len(a)), [len(a)] if with_bias else None,
        stride, pad, dil, False, [0, 0], 1, [False, True, with_bias],
    )
    return gw_a, gb_a


def _gemm_wgrad(gy: Tensor, x: Tensor, w: Tensor, a: Idx, conf: _Conf,
                with_bias: bool) -> tuple[Tensor, Tensor | None]:
    stride, pad, dil = conf
    k, cin, kh, kw = len(a), w.shape[1], w.shape[2], w.shape[3]
    g = a.take(gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1]), 1)  # δ of the active filters [N·Ho·Wo, k]
    gw_t = unfold_rows(x, (kh, kw), stride, pad, dil).t() @ g  # [kh·kw·Cin, k]: the faster product's shape
    gw_a = gw_t.t().reshape(k, kh, kw, cin).permute(0, 3, 1, 2)  # [k, Cin, kh, kw], channels-last
    return gw_a.contiguous(memory_format=_format_of(w)), g.sum(0) if with_bias else None


class _Conv2dFn(torch.autograd.Function):
    """Conv2d (groups 1, zero padding) with output-channel (filter) slicing. x [N, Cin, H, W]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: LayerPlan, mod: nn.Conv2d) -> Tensor:  # type: ignore[override]
        pad = conv_padding_hw(mod)  # symmetric: 'same' needs odd kernels (checked at attach)
        keep, has_bias = plan.w_keep, bias is not None
        if keep is None and plan.b_keep is None:  # bias fused into the convolution
            y = F.conv2d(x, weight, bias, mod.stride, pad, mod.dilation)
            bias = None
        elif keep is None:
            y = F.conv2d(x, weight, None, mod.stride, pad, mod.dilation)
        else:
            ho, wo = conv_output_hw(mod, x.shape[-2], x.shape[-1])
            y = torch.empty((x.shape[0], weight.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                            memory_format=_conv_memory_format(x, weight)).zero_()
            if len(keep):
                keep.put(y, 1, F.conv2d(x, keep.take(weight, 0), None, mod.stride, pad, mod.dilation))
        if bias is not None:
            y = y + _masked_full(bias, plan.b_keep, 0).view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.has_bias = plan, has_bias
        ctx.conf = (tuple(mod.stride), tuple(pad), tuple(mod.dilation))
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        p: LayerPlan = ctx.plan
        stride, pad, dil = ctx.conf
        gy = gy.contiguous(memory_format=_conv_memory_format(x, w))
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = gb = None

        def cbw(g: Tensor, wt: Tensor, mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
            return torch.ops.aten.convolution_backward(g, x, wt, None, stride, pad, dil, False, [0, 0], 1, mask)

        keep, a = p.w_keep, p.w_grad
        fused_b = False  # the bias gradient of the active filters comes from the weight gradient's call
        if keep is None and a is None:
            gx, gw, _ = cbw(gy, w, [need_x, need_w, False])
        elif need_w and a is not None and len(a):
            fused_b = ctx.has_bias and ctx.needs_input_grad[2] and p.b_grad is a

            def sliced(wgrad: Callable[..., tuple[Tensor, Tensor | None]]) -> tuple[Tensor | None, Tensor, Tensor | None]:
                gx = _conv_input_grad(gy, x, w, keep, cbw) if need_x else None
                gw_a, gb_a = wgrad(gy, x, w, a, ctx.conf, fused_b)
                return (gx, p.scattered("weight", a, gw_a, 0, w.shape),
                        p.scattered("bias", a, gb_a, 0, w.shape[:1]) if fused_b else None)

            def dense() -> tuple[Tensor | None, Tensor, Tensor | None]:
                gx, gw, gb = torch.ops.aten.convolution_backward(
                    gy, x, w, [w.shape[0]] if fused_b else None, stride, pad, dil, False, [0, 0], 1,
                    [need_x, True, fused_b])
                return gx, p.masked("weight", a, gw, 0), p.masked("bias", a, gb, 0) if fused_b else None

            run = {"native": lambda: sliced(_native_wgrad), "gemm": lambda: sliced(_gemm_wgrad), "dense": dense}
            gx, gw, gb = run[_conv_kernel(gy, x, w, p, ctx.conf, need_x, fused_b, run)]()  # type: ignore[misc]
        else:
            gx = _conv_input_grad(gy, x, w, keep, cbw) if need_x else None
            if need_w:
                gw = cbw(gy, w, [False, True, False])[1] if a is None else torch.zeros_like(w)
        if ctx.has_bias and ctx.needs_input_grad[2] and not fused_b:
            gb = _sum_sel(gy, p.b_grad, (0, 2, 3))
        return gx, gw, gb, None, None


def _conv_input_grad(gy: Tensor, x: Tensor, w: Tensor, keep: Idx | None,
                     cbw: Callable[[Tensor, Tensor, list[bool]], tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """The input gradient through the kept (not pruned) filters only."""
    if keep is None:
        return cbw(gy, w, [True, False, False])[0]
    if not len(keep):
        return torch.zeros_like(x)
    return cbw(_take_channels(keep, gy), keep.take(w, 0), [True, False, False])[0]


# ------------------------------------------------------------------------------------ BatchNorm
class _BatchNormFn(torch.autograd.Function):
    """Batch norm with per-channel affine slicing. x [N, C, ...].

    The per-channel sums Σδ and Σδ·x̂ are part of the *input* gradient BN needs anyway, so when
    an input gradient is required the fused native kernel yields them for all channels and only
    the active channels are kept; when no input gradient is required, only the active channels
    are reduced.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, plan):  # type: ignore[override]
        w_eff = _masked_full(weight, plan.w_keep, 0) if weight is not None else None
        b_eff = _masked_full(bias, plan.b_keep, 0) if bias is not None else None
        y, save_mean, save_invstd = torch.native_batch_norm(
            x, w_eff, b_eff, running_mean, running_var, training, momentum, eps
        )
        ctx.save_for_backward(x, w_eff, running_mean, running_var, save_mean, save_invstd)
        ctx.training, ctx.eps, ctx.plan = training, eps, plan
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w, rm, rv, sm, si = ctx.saved_tensors
        p: LayerPlan = ctx.plan
        need = ctx.needs_input_grad
        gx = gw = gb = None
        aten_bw = torch.ops.aten.native_batch_norm_backward
        if need[0]:
            gx, gw, gb = aten_bw(gy, x, w, rm, rv, sm, si, ctx.training, ctx.eps, [True, need[1], need[2]])
            # the affine gradients are fresh tensors: zero the inactive channels in place
            if need[1] and p.w_grad is not None:
                p.w_grad.complement().zero(gw, 0)
            if need[2] and p.b_grad is not None:
                p.b_grad.complement().zero(gb, 0)
            return gx, gw if need[1] else None, gb if need[2] else None, None, None, None, None, None, None
        for k, (sel, want) in enumerate(((p.w_grad, need[1]), (p.b_grad, need[2]))):
            if not want:
                continue
            ref = w if w is not None else x.new_empty(x.shape[1])
            if sel is None:
                res = aten_bw(gy, x, w, rm, rv, sm, si, ctx.training, ctx.eps, [False, k == 0, k == 1])[1 + k]
            else:
                res = torch.zeros_like(ref)
                if len(sel):

                    def t(v: Tensor | None, s: Idx = sel) -> Tensor | None:
                        return None if v is None or v.numel() == 0 else s.take(v, 0)

                    part = aten_bw(
                        _take_channels(sel, gy), _take_channels(sel, x), t(w), t(rm), t(rv), t(sm), t(si),
                        ctx.training, ctx.eps, [False, k == 0, k == 1],
                    )[1 + k]
                    sel.put(res, 0, part)
            if k == 0:
                gw = res
            else:
                gb = res
        return gx, gw, gb, None, None, None, None, None, None


# ------------------------------------------------------------------------------------ modules
def _autocast(x: Tensor, *ts: Tensor | None) -> tuple[bool, list[Tensor | None]]:
    """Emulate autocast's lower-precision cast for a custom Function (CPU/GPU)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return False, [x, *ts]
    dt = torch.get_autocast_dtype(dev)
    return True, [None if t is None else t.to(dt) for t in (x, *ts)]


def _linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    plan: LayerPlan | None = self._ntk_plan  # type: ignore[attr-defined]
    if plan is None:
        return F.linear(x, self.weight, self.bias)
    cast, (x, w, b) = _autocast(x, self.weight, self.bias)
    if cast:
        with torch.autocast(x.device.type, enabled=False):
            return _LinearFn.apply(x, w, b, plan)
    return _LinearFn.apply(x, w, b, plan)


def _conv2d_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    plan: LayerPlan | None = self._ntk_plan  # type: ignore[attr-defined]
    if plan is None:
        return self._conv_forward(x, self.weight, self.bias)
    cast, (x, w, b) = _autocast(x, self.weight, self.bias)
    if cast:
        with torch.autocast(x.device.type, enabled=False):
            return _Conv2dFn.apply(x, w, b, plan, self)
    return _Conv2dFn.apply(x, w, b, plan, self)


def _batchnorm_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    plan: LayerPlan | None = self._ntk_plan  # type: ignore[attr-defined]
    if plan is None:
        return self._ntk_orig_forward(x)  # type: ignore[attr-defined]
    self._check_input_dim(x)
    # Same bookkeeping as torch.nn.modules.batchnorm._BatchNorm.forward.
    eaf = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        eaf = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
    use_stats = not self.training or self.track_running_stats
    rm = self.running_mean if use_stats else None
    rv = self.running_var if use_stats else None
    return _BatchNormFn.apply(x, self.weight, self.bias, rm, rv, bn_training, eaf, self.eps, plan)


SLICEABLE: dict[type, tuple[str, dict[str, tuple[int, ...]]]] = {
    nn.Linear: ("linear", {"weight": (0, 1), "bias": (0,)}),
    nn.Conv2d: ("conv2d", {"weight": (0,), "bias": (0,)}),
    _BatchNorm: ("batchnorm", {"weight": (0,), "bias": (0,)}),
}
"""Layer base classes with sliced autograd: name and the dims each parameter may be sliced along."""

_FORWARDS = {"linear": _linear_forward, "conv2d": _conv2d_forward, "batchnorm": _batchnorm_forward}
_CLASS_CACHE: dict[type, type] = {}


def sliced_class(cls: type) -> type:
    """A subclass of ``cls`` (a Linear / Conv2d / BatchNorm class) whose forward follows
    ``self._ntk_plan``. Cached per class, so repeated attach/detach keeps class identity stable."""
    if cls not in _CLASS_CACHE:
        kind = next(k for base, (k, _) in SLICEABLE.items() if issubclass(cls, base))
        ns = {"forward": _FORWARDS[kind], "_ntk_plan": None, "__module__": __name__}
        if kind == "batchnorm":
            ns["_ntk_orig_forward"] = cls.forward
        _CLASS_CACHE[cls] = type(f"Sliced{cls.__name__}", (cls,), ns)
    return _CLASS_CACHE[cls]
