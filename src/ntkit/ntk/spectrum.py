"""Spectra of per-module NTK Grams.

:func:`spectrum` runs one batched ``eigvalsh`` on the [M, S, S] Grams in float64 after
symmetrising; :func:`top_eigenvalues` estimates the k largest eigenvalues with Lanczos (or
power iteration) from matrix-vector products only, for S too large for a dense eigensolver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkit.errors import check

__all__ = ["Spectrum", "spectrum", "top_eigenvalues"]


@dataclass(frozen=True)
class Spectrum:
    """Eigen-statistics of M symmetric PSD matrices (all float64).

    Attributes:
        eigenvalues: Tensor [M, S], ascending.
        lambda_max, lambda_min: Tensor [M].
        entropy: Tensor [M], ρ = −Σ λ̂ log λ̂ with λ̂ = max(λ, 0) / Σ max(λ, 0) (0 log 0 = 0;
            0 for an all-zero matrix).
        effective_rank: Tensor [M], exp(ρ) ∈ [1, S].
        condition_number: Tensor [M], λmax / λmin; ``inf`` where λmin ≤ 0 (rank-deficient
            modules, e.g. fewer parameters than samples).
    """

    eigenvalues: Tensor
    lambda_max: Tensor
    lambda_min: Tensor
    entropy: Tensor
    effective_rank: Tensor
    condition_number: Tensor


def spectrum(grams: Tensor) -> Spectrum:
    """Spectra of ``grams`` Tensor [M, S, S] (or one [S, S] matrix, treated as M = 1).

    Eigenvalues within ``S · eps · λmax`` of zero are rounding noise of a PSD matrix and are
    clamped to 0 for λmin / the entropy / the condition number; :attr:`Spectrum.eigenvalues`
    keeps the raw values. A Gram with a NaN / ±Inf entry gets NaN for every statistic (the
    others are computed as usual; ``eigvalsh`` would fail or spread NaN over the whole batch).
    """
    check(isinstance(grams, Tensor) and grams.dim() in (2, 3), "grams", getattr(grams, "shape", grams), "a Tensor [M, S, S]")
    g = grams.detach().to(torch.float64)
    if g.dim() == 2:
        g = g.unsqueeze(0)
    check(g.shape[-1] == g.shape[-2], "grams shape", tuple(grams.shape), "square matrices [M, S, S]")
    g = 0.5 * (g + g.transpose(-1, -2))
    bad = ~torch.isfinite(g).flatten(1).all(1)  # [M]
    if bool(bad.any()):
        g = torch.where(bad[:, None, None], torch.zeros_like(g), g)
    ev = torch.linalg.eigvalsh(g)  # ascending
    lmax = ev[:, -1]
    tol = g.shape[-1] * torch.finfo(torch.float64).eps * lmax.abs().clamp_min(torch.finfo(torch.float64).tiny)
    clean = torch.where(ev.abs() <= tol[:, None], torch.zeros_like(ev), ev)
    lmin = clean[:, 0]
    pos = clean.clamp_min(0)
    total = pos.sum(-1, keepdim=True)
    p = pos / torch.where(total > 0, total, torch.ones_like(total))
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    cond = torch.where(lmin > 0, lmax / torch.where(lmin > 0, lmin, torch.ones_like(lmin)), torch.full_like(lmax, math.inf))
    if bool(bad.any()):
        ev, lmax, lmin, ent, cond = (
            torch.where(bad.view(-1, *[1] * (t.dim() - 1)), torch.full_like(t, math.nan), t)
            for t in (ev, lmax, lmin, ent, cond)
        )
    return Spectrum(
        eigenvalues=ev,
        lambda_max=lmax,
        lambda_min=lmin,
        entropy=ent,
        effective_rank=ent.exp(),
        condition_number=cond,
    )


def top_eigenvalues(
    grams: Tensor, k: int = 1, method: str = "lanczos", *, iters: int | None = None, seed: int = 0
) -> Tensor:
    """The ``k`` largest eigenvalues of each symmetric PSD matrix in ``grams`` [M, S, S].

    Args:
        grams: Tensor [M, S, S] (or [S, S]).
        k: how many (1 ≤ k ≤ S).
        method: ``"lanczos"`` (Krylov subspace with full re-orthogonalisation, ``iters``
            default min(S, max(2k + 20, 40)) steps; exact when iters = S) or ``"power"``
            (subspace iteration on 2k + 8 vectors with Rayleigh–Ritz, ``iters`` default 200).
        iters: number of iterations.
        seed: seed of the random start vectors (deterministic).

    Returns:
        Tensor [M, k] float64, descending.
    """
    check(method in ("lanczos", "power"), "method", method, "'lanczos' or 'power'")
    g = grams.detach().to(torch.float64)
    if g.dim() == 2:
        g = g.unsqueeze(0)
    m, s, _ = g.shape
    check(isinstance(k, int) and 1 <= k <= s, "k", k, f"an integer in [1, {s}]")
    g = 0.5 * (g + g.transpose(-1, -2))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if method == "power":
        steps = iters or 200
        block = min(s, 2 * k + 8)  # oversampling: convergence ∝ (λ_{block+1} / λ_k)^iters
        q = torch.randn(m, s, block, generator=gen, dtype=torch.float64).to(g.device)
        q, _ = torch.linalg.qr(q)
        for _ in range(steps):
            q, _ = torch.linalg.qr(g @ q)
        t = q.transpose(1, 2) @ g @ q
        return torch.linalg.eigvalsh(0.5 * (t + t.transpose(1, 2))).flip(-1)[:, :k]
    steps = min(s, iters or max(2 * k + 20, 40))
    steps = max(steps, k)
    v = torch.randn(m, s, generator=gen, dtype=torch.float64).to(g.device)
    v = v / v.norm(dim=1, keepdim=True)
    basis = torch.zeros(m, steps, s, dtype=torch.float64, device=g.device)
    alpha = torch.zeros(m, steps, dtype=torch.float64, device=g.device)
    beta = torch.zeros(m, steps, dtype=torch.float64, device=g.device)
    for j in range(steps):
        basis[:, j] = v
        w = torch.bmm(g, v.unsqueeze(-1)).squeeze(-1)
        alpha[:, j] = (w * v).sum(1)
        # full re-orthogonalisation (twice) against all previous Lanczos vectors
        for _ in range(2):
            w = w - torch.bmm(basis[:, : j + 1].transpose(1, 2), torch.bmm(basis[:, : j + 1], w.unsqueeze(-1))).squeeze(-1)
        b = w.norm(dim=1)
        if j + 1 < steps:
            beta[:, j] = b
            # restart with a random orthogonal direction where the Krylov space is exhausted
            dead = b <= 1e-13 * alpha[:, : j + 1].abs().amax(1).clamp_min(1e-300)
            if bool(dead.any()):
                r = torch.randn(m, s, generator=gen, dtype=torch.float64).to(g.device)
                r = r - torch.bmm(basis[:, : j + 1].transpose(1, 2), torch.bmm(basis[:, : j + 1], r.unsqueeze(-1))).squeeze(-1)
                w = torch.where(dead[:, None], r, w)
                beta[:, j] = torch.where(dead, torch.zeros_like(b), b)
                b = w.norm(dim=1)
            v = w / b.clamp_min(1e-300)[:, None]
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : steps - 1], 1) + torch.diag_embed(beta[:, : steps - 1], -1)
    return torch.linalg.eigvalsh(t).flip(-1)[:, :k]
