"""Hutchinson Hessian traces per module: exact on separable losses, unbiased (within a few
standard errors of the explicit Hessian's block traces) on real models, differentiable."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ntkit.errors import ConfigError
from ntkit.models.layers import MultiHeadSelfAttention
from ntkit.ntk.hessian import hessian_trace, hessian_trace_estimate
from ntkit.partition import Partition


def _explicit_diag(loss_of_params, model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Diagonal of the explicit Hessian (torch.autograd.functional.hessian), per parameter."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(v: Tensor) -> Tensor:
        ps, o = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = v[o : o + s.numel()].view(s)
            o += s.numel()
        return loss_of_params(ps)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        h = torch.autograd.functional.hessian(f, flat)
    diag, out, o = torch.diagonal(h), {}, 0
    for n, s in zip(names, shapes):
        out[n] = diag[o : o + s.numel()].view(s)
        o += s.numel()
    return out


def _group_traces(partition: Partition, diag: dict[str, Tensor]) -> Tensor:
    return torch.stack([sum(s.select(diag[s.param]).sum() for s in g.slices) for g in partition])


def _mlp_setup():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    part = Partition.from_slices(
        {
            # neurons of the hidden layer: rows of 0.weight / 0.bias and columns of 2.weight
            "n0-2": [("0.weight", 0, range(3)), ("0.bias", 0, range(3)), ("2.weight", 1, range(3))],
            "n3-5": [("0.weight", 0, range(3, 6)), ("0.bias", 0, range(3, 6)), ("2.weight", 1, range(3, 6))],
            "out-bias": [("2.bias", 0, None)],
        }
    ).bind(model)

    def loss_of(ps: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)

    return model, part, loss_of, lambda: nn.functional.cross_entropy(model(x), y)


def test_separable_loss_is_exact_for_every_probe() -> None:
    """With a diagonal Hessian, vᵀHv restricted to a group equals its trace for every ±1 probe,
    so even one probe is exact: checks the slicing (both dims, partial coverage) and reduction."""
    model = nn.Linear(5, 4).double()
    cw = torch.rand(4, 5, dtype=torch.float64)
    cb = torch.rand(4, dtype=torch.float64)

    def loss() -> Tensor:
        return 0.5 * (cw * model.weight**2).sum() + (cb * model.bias**4).sum()

    part = Partition.from_slices(
        {"cols0-1": [("weight", 1, [0, 1])], "cols3-4": [("weight", 1, range(3, 5))], "b": [("bias", 0, [1, 3])]}
    ).bind(model)
    est = hessian_trace_estimate(loss, model, part, num_probes=3, generator=torch.Generator().manual_seed(0))
    hb = 12 * cb * model.bias.detach() ** 2
    exact = torch.stack([cw[:, :2].sum(), cw[:, 3:].sum(), hb[[1, 3]].sum()])
    assert est.samples.shape == (3, 3) and est.trace.dtype == torch.float64
    assert torch.allclose(est.samples, exact.expand(3, 3), rtol=1e-13, atol=0)
    assert est.names == ("cols0-1", "cols3-4", "b")
    total = hessian_trace(loss, model, num_probes=1)
    assert total.dim() == 0
    assert torch.allclose(total, cw.sum() + hb.sum(), rtol=1e-13, atol=0)


def test_mlp_converges_to_explicit_block_traces() -> None:
    model, part, loss_of, loss = _mlp_setup()
    diag = _explicit_diag(loss_of, model, [n for n, _ in model.named_parameters()])
    exact = _group_traces(part, diag)
    est = hessian_trace_estimate(loss, model, part, num_probes=2000, generator=torch.Generator().manual_seed(1))
    assert (est.stderr > 0).all()
    assert ((est.trace - exact).abs() <= 5 * est.stderr).all(), (est.trace, exact, est.stderr)
    # the estimate is informative: its standard error is well below the spread of the samples
    assert (est.stderr < est.samples.std(0) / 10).all()
    # total over all parameters
    tot = hessian_trace_estimate(loss, model, num_probes=2000, generator=torch.Generator().manual_seed(2))
    exact_total = sum(d.sum() for d in diag.values())
    assert abs(tot.total - exact_total) <= 5 * tot.stderr[0]


def test_attention_heads_with_sdpa() -> None:
    """Per-head traces through scaled_dot_product_attention (math backend forced for the HVP)."""
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(4, 2).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    target = torch.randn(2, 3, 4, dtype=torch.float64)
    dh, d = 2, 4
    spec = {}
    for h in range(2):
        rows = [r for blk in range(3) for r in range(blk * d + h * dh, blk * d + (h + 1) * dh)]
        spec[f"head{h}"] = [("qkv.weight", 0, rows), ("qkv.bias", 0, rows), ("proj.weight", 1, range(h * dh, (h + 1) * dh))]
    part = Partition.from_slices(spec).bind(attn)

    def loss_of(ps: dict[str, Tensor]) -> Tensor:
        return ((functional_call(attn, ps, (x,)) - target) ** 2).sum()

    diag = _explicit_diag(loss_of, attn, [n for n, _ in attn.named_parameters()])
    exact = _group_traces(part, diag)
    est = hessian_trace_estimate(lambda: ((attn(x) - target) ** 2).sum(), attn, part, num_probes=1500,
                                 generator=torch.Generator().manual_seed(3))
    assert ((est.trace - exact).abs() <= 5 * est.stderr).all(), (est.trace, exact, est.stderr)


def test_float32_attention_needs_and_gets_the_math_backend() -> None:
    """In float32 the fused CPU SDPA kernel has no double backward; hessian_trace forces the math
    backend, and agrees with the float64 run on the same probes."""
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(8, 2)
    x = torch.randn(2, 5, 8)
    ps = list(attn.parameters())
    g = torch.autograd.grad(attn(x).pow(2).sum(), ps, create_graph=True)
    with pytest.raises(RuntimeError):  # the plain path really fails (else this test proves nothing)
        torch.autograd.grad(g, ps, grad_outputs=[torch.ones_like(p) for p in ps], allow_unused=True)
    t32 = hessian_trace(lambda: attn(x).pow(2).sum(), attn, num_probes=4, generator=torch.Generator().manual_seed(0))
    attn64, x64 = attn.double(), x.double()
    t64 = hessian_trace(lambda: attn64(x64).pow(2).sum(), attn64, num_probes=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(t32) and abs(t32 - t64) <= 1e-4 * abs(t64)


def test_reproducible_with_generator() -> None:
    model, part, _, loss = _mlp_setup()
    a = hessian_trace(loss, model, part, num_probes=4, generator=torch.Generator().manual_seed(7))
    b = hessian_trace(loss, model, part, num_probes=4, generator=torch.Generator().manual_seed(7))
    c = hessian_trace(loss, model, part, num_probes=4, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3,) and torch.equal(a, b) and not torch.equal(a, c)
    assert not a.requires_grad


def test_probe_batch_does_not_change_the_result() -> None:
    """Batched (vmapped) Hessian-vector products give the same per-probe samples as one at a time."""
    model, part, _, loss = _mlp_setup()
    runs = [
        hessian_trace_estimate(loss, model, part, num_probes=7, probe_batch=pb, generator=torch.Generator().manual_seed(5))
        for pb in (1, 3, 8)
    ]
    for r in runs[1:]:
        assert torch.allclose(r.samples, runs[0].samples, rtol=1e-12, atol=1e-14)
    tot = [hessian_trace(loss, model, num_probes=5, probe_batch=pb, generator=torch.Generator().manual_seed(6))
           for pb in (1, 4)]
    assert torch.allclose(tot[0], tot[1], rtol=1e-12)


def test_create_graph_differentiates_through_a_mask() -> None:
    """PL use: loss(m ⊙ w) with a gate-produced mask m; d Tr(H_w)/dm is exact on a separable loss:
    L = ½ Σ c (m w)² ⇒ H_ww = c m², Tr per group = Σ c m², ∂/∂m = 2 c m."""
    model = nn.Linear(3, 2, bias=False).double()
    c = torch.rand(2, 3, dtype=torch.float64)
    m = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)

    def loss() -> Tensor:
        return 0.5 * (c * (m * model.weight) ** 2).sum()

    part = Partition.from_slices({"r0": [("weight", 0, [0])], "r1": [("weight", 0, [1])]}).bind(model)
    for pb in (1, 2):
        tr = hessian_trace(loss, model, part, num_probes=2, create_graph=True, probe_batch=pb)
        assert tr.requires_grad
        (g,) = torch.autograd.grad(tr.sum(), m)
        assert torch.allclose(tr.detach(), (c * m.detach() ** 2).sum(1), rtol=1e-13)
        assert torch.allclose(g, 2 * c * m.detach(), rtol=1e-13)


def test_parameters_the_loss_ignores_have_zero_trace() -> None:
    """A group whose parameters the loss never touches gets exactly 0 (not a noisy 0 ± SE)."""
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    part = Partition.from_slices(
        {"used": [("used.weight", 0, None)], "unused": [("unused.weight", 0, None), ("unused.bias", 0, None)]}
    ).bind(model)
    est = hessian_trace_estimate(lambda: (torch.tanh(model["used"](x)) ** 2).sum(), model, part, num_probes=3)
    assert (est.samples[:, 1] == 0).all() and est.stderr[1] == 0
    assert (est.samples[:, 0] != 0).all()


def test_bad_arguments() -> None:
    model, part, _, loss = _mlp_setup()
    with pytest.raises(ConfigError, match="num_probes=0"):
        hessian_trace(loss, model, part, num_probes=0)
    with pytest.raises(ConfigError, match="probe_batch=0"):
        hessian_trace(loss, model, part, probe_batch=0)
    with pytest.raises(ConfigError, match="loss_fn"):
        hessian_trace(lambda: model(torch.randn(2, 4, dtype=torch.float64)), model, part)
    with pytest.raises(ConfigError, match="params"):
        hessian_trace_estimate(loss, model, None, params=["nope"])
