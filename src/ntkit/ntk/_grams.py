"""Private Gram kernels shared by the mNTK strategies.

Everything here works on *per-sample* quantities with a leading sample axis N (N = S samples,
or S·k when all logits are traced). Grams are accumulated in place into a ``[M, N, N]`` tensor
(one matrix per module group) so that no per-parameter [M, N, N] buffer ever exists.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SliceSpec", "accumulate_slice_grams", "add_to_groups", "contract_linear_grams", "linear_costs"]

# (group index, parameter dim, start, stop) in the coordinates of the tensor they are applied to.
SliceSpec = tuple[int, int, int, int]

# Elements of one [N, N, r] tile of the contraction: 2 MiB of float32 stays in cache; measured on
# CPU (2 threads, N = 64, VGG's 4×4 / 2×2 layers) 4× faster than one [N, N, L, r] intermediate,
# best of 2^17–2^21.
_TILE = 1 << 19


def add_to_groups(grams: Tensor, groups: Sequence[int], blocks: Tensor) -> None:
    """``grams[groups[i]] += blocks[i]`` (groups may repeat). Contiguous runs of distinct groups
    (filters, neurons) use one slice add; ``index_add_`` is ~10× slower on CPU."""
    n = len(groups)
    g0 = groups[0]
    if list(groups) == list(range(g0, g0 + n)):
        grams[g0 : g0 + n].add_(blocks)
        return
    idx = torch.tensor(list(groups), device=grams.device)
    if len(set(groups)) == n:
        grams[idx] += blocks
    else:
        grams.index_add_(0, idx, blocks)


def accumulate_slice_grams(g: Tensor, slices: Sequence[SliceSpec], grams: Tensor) -> int:
    """``grams[gi] += X Xᵀ`` for every slice, ``X = g`` restricted to the slice, flattened.

    Args:
        g: per-sample gradients ``[N, *shape]`` (any float dtype; cast to ``grams.dtype``).
        slices: ``(group, dim, start, stop)`` with ``dim`` a dimension of ``shape``.
        grams: ``[M, N, N]`` accumulator, modified in place.

    Slices with the same ``(dim, size)`` are batched into one ``bmm``. Returns the FLOPs spent.
    """
    n = g.shape[0]
    g = g.to(grams.dtype)
    by_key: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for gi, d, a, b in slices:
        if b > a:
            by_key[(d, b - a)].append((gi, a))
    flops = 0
    for (d, q), items in by_key.items():
        x = g.movedim(1 + d, 1)
        if len(items) == 1:
            gi, a = items[0]
            y = x.narrow(1, a, q).reshape(n, -1)
            grams[gi].addmm_(y, y.T)
            flops += 2 * n * n * y.shape[1]
            continue
        starts = [a for _, a in items]
        size = x.shape[1]
        if starts == list(range(0, len(items) * q, q)) and len(items) * q == size:
            y = x.reshape(n, len(items), -1)
        else:
            idx = (torch.tensor(starts)[:, None] + torch.arange(q)).flatten().to(g.device)
            y = x.index_select(1, idx).reshape(n, len(items), -1)
        y = y.transpose(0, 1)  # [n_slices, N, p]
        flops += 2 * n * n * y.shape[0] * y.shape[2]
        gis = [gi for gi, _ in items]
        g0 = gis[0]
        if gis == list(range(g0, g0 + len(gis))):  # accumulate in place, no temporary
            out = grams[g0 : g0 + len(gis)]
            if y.shape[2] == 1:  # one element per slice (biases, norm affine): outer products
                out.addcmul_(y, y.transpose(1, 2))
            else:
                out.baddbmm_(y, y.transpose(1, 2))
            continue
        add_to_groups(grams, gis, torch.bmm(y, y.transpose(1, 2)))
    return flops


def linear_costs(
    n: int, length: int, fan_in: int, fan_out: int, covered: int, dim: int, k_cost: int | None = None
) -> tuple[int, int]:
    """FLOPs of (materialise, contract) for a Linear-form weight ``[fan_out, fan_in]``.

    Materialise: per-sample gradients ``bmm(δᵀ, a)`` (2·N·L·I·O) plus slice Grams (2·N²·P).
    Contract: token Gram of the contracted side (2·(NL)²·I), then per output row
    ``Σ_{l,l'} K δ δ`` (2·(NL)²·O + 2·N²·L·O) — roles of I and O swap for column slices.
    ``k_cost`` overrides the token-Gram cost (convolutions build it from the raw activations).
    """
    mat = 2 * n * length * fan_in * fan_out + 2 * n * n * covered
    i, o = (fan_in, fan_out) if dim == 0 else (fan_out, fan_in)
    nl = n * length
    con = (2 * nl * nl * i if k_cost is None else k_cost) + 2 * nl * nl * o + 2 * n * n * length * o
    return mat, con


def contract_linear_grams(
    a: Tensor, d: Tensor, slices: Sequence[SliceSpec], grams: Tensor, *, budget: int, k: Tensor | None = None
) -> None:
    """Slice Grams of a Linear-form weight without per-sample gradients.

    For weight ``W [O, I]`` used as ``y_l = W a_l`` at L positions per sample, the per-sample
    gradient is ``G_i = Σ_l δ_il a_ilᵀ``, so for output rows r
    ``⟨G_i[r], G_j[r]⟩ = Σ_{l,l'} (a_il·a_jl') δ_ilr δ_jl'r``. Column slices (dim 1) swap the
    roles of ``a`` and ``δ``.

    Args:
        a: ``[N, L, I]`` layer inputs (unfolded patches for convolutions).
        d: ``[N, L, O]`` output gradients.
        slices: ``(group, dim, start, stop)``; all with the same dim (0 or 1).
        grams: ``[M, N, N]`` accumulator.
        budget: max elements of one ``[N, N, r]`` tile (capped at ``_TILE``).
        k: precomputed token Gram ``[N·L, N·L]`` of ``a`` (row slices only).
    """
    if slices and slices[0][1] == 1:
        a, d = d, a
    n, length, _ = a.shape
    a = a.to(grams.dtype)
    d = d.to(grams.dtype)
    if k is None:
        af = a.reshape(n * length, -1)
        k = af @ af.T
    # K[(i,l), (j,m)] = a_il · a_jm as [i, l, j, m]; per position l the rows [j, i, m] (K symmetric)
    kv = k.to(grams.dtype).view(n, length, n, length)
    k_rows = [kv[:, l].transpose(0, 1) for l in range(length)]
    o = d.shape[2]
    step = max(1, min(budget, _TILE) // max(1, n * n))
    for r0 in range(0, o, step):
        r1 = min(o, r0 + step)
        inside = [(gi, max(s, r0), min(e, r1)) for gi, _, s, e in slices if s < r1 and e > r0]
        if not inside:
            continue
        dc = d[:, :, r0:r1]  # [N, L, r]
        # acc[j, i, r] = Σ_l δ[i,l,r] Σ_m K[(i,l),(j,m)] δ[j,m,r], one position l at a time: each
        # term is a [N, N, r] tile (no [N, N, L, r] intermediate; the tile stays in cache)
        acc = torch.bmm(k_rows[0], dc).mul_(dc[:, 0])
        for l in range(1, length):
            acc.addcmul_(torch.bmm(k_rows[l], dc), dc[:, l])
        per_row = acc.permute(2, 1, 0)  # [r, i, j]
        if all(e - s == 1 for _, s, e in inside):  # one row per slice (neurons, filters): vectorised
            rows = [s - r0 for _, s, _ in inside]
            if rows == list(range(rows[0], rows[0] + len(rows))):
                sel = per_row[rows[0] : rows[0] + len(rows)]
            else:
                sel = per_row[torch.tensor(rows, device=per_row.device)]
            add_to_groups(grams, [gi for gi, _, _ in inside], sel)
        else:
            for gi, s, e in inside:
                grams[gi] += per_row[s - r0 : e - r0].sum(0)
