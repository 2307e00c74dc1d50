"""Spectra against numpy on known matrices; Lanczos / power against eigvalsh."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ntkit.errors import ConfigError
from ntkit.ntk import spectrum, top_eigenvalues


def _psd(evals: list[float], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(evals), len(evals))))
    return torch.from_numpy(q @ np.diag(evals) @ q.T)


def test_known_spectra_match_numpy() -> None:
    evs = [[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]]
    grams = torch.stack([_psd(e, i) for i, e in enumerate(evs)])
    sp = spectrum(grams)
    for m, e in enumerate(evs):
        e = np.sort(np.array(e))
        np.testing.assert_allclose(sp.eigenvalues[m].numpy(), e, atol=1e-12)
        p = e[e > 0] / e.sum()
        rho = -(p * np.log(p)).sum()
        assert sp.entropy[m].item() == pytest.approx(rho, abs=1e-12)
        assert sp.effective_rank[m].item() == pytest.approx(math.exp(rho), abs=1e-12)
        assert sp.lambda_max[m].item() == pytest.approx(e.max(), abs=1e-12)
    assert sp.condition_number[0].item() == pytest.approx(4.0, rel=1e-12)
    assert sp.effective_rank[1].item() == pytest.approx(4.0, rel=1e-12)  # flat spectrum: full rank
    # rank-deficient module: λmin clamps to exactly 0, κ = inf, effective rank 1
    assert sp.lambda_min[2].item() == 0.0 and math.isinf(sp.condition_number[2].item())
    assert sp.effective_rank[2].item() == pytest.approx(1.0, abs=1e-12)
    assert sp.eigenvalues.dtype == torch.float64


def test_symmetrises_float32_input_and_single_matrix() -> None:
    a = _psd([3.0, 2.0, 1.0], 7)
    noisy = a.clone()
    noisy[0, 1] += 1e-3  # asymmetric: the symmetric part is used
    sp = spectrum(noisy.float())
    ref = np.linalg.eigvalsh(0.5 * (noisy + noisy.T).numpy())
    np.testing.assert_allclose(sp.eigenvalues[0].numpy(), ref, rtol=1e-6)
    assert sp.lambda_max.shape == (1,)


def test_zero_matrix() -> None:
    sp = spectrum(torch.zeros(2, 3, 3))
    assert torch.equal(sp.entropy, torch.zeros(2)) and torch.equal(sp.effective_rank, torch.ones(2))
    assert torch.isinf(sp.condition_number).all()


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 50, 30, generator=g, dtype=torch.float64)
    grams = a @ a.transpose(1, 2)  # rank 30 of 50
    grams[1] *= 1e-6
    ref = torch.linalg.eigvalsh(grams).flip(-1)[:, :4]
    got = top_eigenvalues(grams, 4, method=method, iters=50 if method == "lanczos" else 400)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=0)


def test_top_eigenvalues_exhausted_krylov_space() -> None:
    grams = torch.diag(torch.tensor([5.0, 5.0, 1.0, 0.0], dtype=torch.float64)).unsqueeze(0)
    got = top_eigenvalues(grams, 3, iters=4)
    torch.testing.assert_close(got, torch.tensor([[5.0, 5.0, 1.0]], dtype=torch.float64))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="method"):
        top_eigenvalues(torch.eye(3), 1, method="qr")
    with pytest.raises(ConfigError, match="k="):
        top_eigenvalues(torch.eye(3), 4)
    with pytest.raises(ConfigError, match="grams"):
        spectrum(torch.ones(3))
