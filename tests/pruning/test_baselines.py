"""The seed-002 baseline scorers against hand computations on tiny float64 models: FPGM by explicit
distance loops, CHIP by per-channel SVDs, Att-/Exp-Score against an explicit gate on the head /
expert output, DPFPS against a finite difference of shrinking the structure, GraSP against the
full Hessian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ntkit.errors import ConfigError
from ntkit.models import bert_mlm, switch_mlm
from ntkit.partition import attention_heads, conv_filters, linear_neurons, moe_experts
from ntkit.pruning import SCORERS, ScoreData, chip_independence, get_scorer, output_slices
from ntkit.sparse import attach

VOCAB, T = 30, 6


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                      nn.Flatten(), nn.Linear(5 * 4 * 4, 3)).double()
    with torch.no_grad():  # non-trivial affine and running statistics
        for bn in (m[1], m[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _cnn_loss(x: torch.Tensor):
    y = torch.tensor([0, 2, 1])[: x.shape[0]]
    return lambda model: nn.functional.cross_entropy(model(x), y)


def test_new_criteria_are_registered():
    for name in ("fpgm", "chip", "dpfps", "att_score", "exp_score", "grasp"):
        assert name in SCORERS and get_scorer(name).name == name


def test_fpgm_equals_explicit_distance_loops():
    model = _cnn()
    part = conv_filters(model)
    got = get_scorer("fpgm")(model, part, None)
    for conv, first in ((model[0], 0), (model[3], 4)):
        w = conv.weight.detach()
        for i in range(w.shape[0]):
            ref = 0.0
            for j in range(w.shape[0]):
                ref += math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(w[i].flatten(), w[j].flatten())))
            assert abs(float(got[first + i]) - ref) <= 1e-10 * max(ref, 1.0)


def test_fpgm_leaves_pruned_structures_out_of_the_sums():
    model = _cnn()
    part = conv_filters(model)
    ctl = attach(model, part)
    pruned = torch.zeros(len(part), dtype=torch.bool)
    pruned[1] = True
    ctl.set_pruned(pruned)
    got = get_scorer("fpgm")(model, part, ScoreData(controller=ctl))
    w = model[0].weight.detach().flatten(1)
    ref0 = sum(float((w[0] - w[j]).norm()) for j in (2, 3))  # filter 1 is pruned: not a neighbour
    assert abs(float(got[0]) - ref0) <= 1e-12 * ref0
    ctl.detach()


def test_chip_equals_per_channel_svds():
    model = _cnn()
    part = conv_filters(model)
    x = _images()
    got = get_scorer("chip")(model, part, ScoreData(inputs=x))
    with torch.no_grad():
        maps = [torch.relu(model[1](model[0](x)))]
        maps.append(torch.relu(model[4](model[3](torch.relu(maps[0])))))
    ref = []
    for a in maps:
        for c in range(a.shape[1]):
            ci = 0.0
            for i in range(a.shape[0]):
                m = a[i].reshape(a.shape[1], -1).numpy().copy()
                full = np.linalg.svd(m, compute_uv=False).sum()
                m[c] = 0.0
                ci += full - np.linalg.svd(m, compute_uv=False).sum()
            ref.append(ci / a.shape[0])
    np.testing.assert_allclose(got.numpy(), np.array(ref), rtol=1e-10, atol=1e-12)
    # a redundant channel (a copy of another) is the least independent one
    a = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    a[:, 2] = a[:, 0]
    ci = chip_independence(a)
    assert float(ci[1]) > max(float(ci[0]), float(ci[2]))


def test_chip_refuses_non_filter_structures():
    model = bert_mlm("tiny", vocab_size=VOCAB, max_len=T, dropout=0.0)
    with pytest.raises(ConfigError, match=r"^kind='head': expected 'filter'"):
        get_scorer("chip")(model, attention_heads(model), ScoreData(inputs=torch.zeros(2, T, dtype=torch.long)))


def _mlm_loss(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, T), generator=g)
    labels = torch.where(torch.rand(3, T, generator=g) < 0.5, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    return nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))


def _batches():
    """loss_fn drawing batch 0, 1, 2, … on successive calls (as ctx.sample_batch does)."""
    calls = []

    def loss_fn(model):
        calls.append(1)
        return _mlm_loss(model, len(calls))

    return loss_fn


def test_att_score_equals_the_gradient_of_an_explicit_head_gate():
    torch.manual_seed(0)
    model = bert_mlm("tiny", vocab_size=VOCAB, max_len=T, dropout=0.0).double()
    part = attention_heads(model)
    raw = get_scorer("att_score", normalize=False)(model, part, ScoreData(_batches(), num_batches=2))
    normed = get_scorer("att_score")(model, part, ScoreData(_batches(), num_batches=2))  # the same draws
    # explicit gates: ξ_h scales head h's context before the output projection
    attn = [m for m in model.modules() if type(m).__name__ == "MultiHeadSelfAttention"]
    xi = [torch.ones(a.num_heads, dtype=torch.float64, requires_grad=True) for a in attn]
    hooks = [a.proj.register_forward_pre_hook(
        lambda mod, inp, g=g, dh=a.head_dim: (inp[0] * g.repeat_interleave(dh),)) for a, g in zip(attn, xi)]
    ref = torch.zeros(len(part), dtype=torch.float64)
    for b in (1, 2):
        grads = torch.autograd.grad(_mlm_loss(model, b), xi)
        ref += torch.cat(grads).abs() / 2
    for h in hooks:
        h.remove()
    torch.testing.assert_close(raw, ref, rtol=1e-10, atol=1e-14)
    layer_norm = ref.view(len(attn), -1).norm(dim=1).repeat_interleave(attn[0].num_heads)
    torch.testing.assert_close(normed, ref / (layer_norm + 1e-20), rtol=1e-10, atol=1e-14)


def test_exp_score_equals_the_gradient_of_an_explicit_expert_gate():
    torch.manual_seed(0)
    model = switch_mlm("tiny", num_experts=3, vocab_size=VOCAB, max_len=T, dropout=0.0).double().eval()
    part = moe_experts(model)
    assert {s.param.rsplit(".", 2)[-2] for g in part for s in output_slices(g)} == {"fc2"}
    got = get_scorer("exp_score", normalize=False)(model, part, ScoreData(_batches()))
    experts = [e for m in model.modules() if type(m).__name__ == "SwitchFFN" for e in m.experts]
    xi = torch.ones(len(experts), dtype=torch.float64, requires_grad=True)
    hooks = [e.register_forward_hook(lambda mod, inp, out, i=i: out * xi[i]) for i, e in enumerate(experts)]
    ref = torch.autograd.grad(_mlm_loss(model, 1), xi)[0].abs()
    for h in hooks:
        h.remove()
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)


def test_dpfps_equals_a_finite_difference_of_shrinking_the_structure():
    model = _cnn().train()  # batch statistics: BN sees the shrink through the conv too
    part = conv_filters(model)
    loss = _cnn_loss(_images())
    got = get_scorer("dpfps")(model, part, ScoreData(loss))
    params = dict(model.named_parameters())
    eps = 1e-6
    for gi, g in enumerate(part):
        vals = []
        for t in (eps, -eps):
            saved = [s.select(params[s.param]).detach().clone() for s in g.slices]
            with torch.no_grad():
                for s in g.slices:
                    s.select(params[s.param]).mul_(1 - t)
                vals.append(float(loss(model)))
                for s, old in zip(g.slices, saved):
                    s.select(params[s.param]).copy_(old)
        ref = abs((vals[0] - vals[1]) / (2 * eps))  # |d/dt L(θ − t θ_i)| = |Σ θ_i ∂L/∂θ_i|
        assert abs(float(got[gi]) - ref) <= 1e-6 * max(ref, 1e-3), (g.name, float(got[gi]), ref)


def test_grasp_equals_theta_times_full_hessian_gradient_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    part = linear_neurons(model)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 1, 0, 1])
    got = get_scorer("grasp")(model, part, ScoreData(lambda m: nn.functional.cross_entropy(m(x), y)))
    names = part.covered_params()
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss_of(flat):
        chunks, i = {}, 0
        for n, shp in zip(names, shapes):
            k = int(torch.Size(shp).numel())
            chunks[n] = flat[i:i + k].reshape(shp)
            i += k
        full = {k: v for k, v in params.items()}
        full.update(chunks)
        return nn.functional.cross_entropy(torch.func.functional_call(model, full, (x,)), y)

    flat = flat0.clone().requires_grad_()
    g = torch.autograd.grad(loss_of(flat), flat)[0]
    hess = torch.autograd.functional.hessian(loss_of, flat0)
    s_flat = flat0 * (hess @ g)  # θ ⊙ Hg
    per, i = {}, 0
    for n, shp in zip(names, shapes):
        k = int(torch.Size(shp).numel())
        per[n] = s_flat[i:i + k].reshape(shp)
        i += k
    ref = torch.tensor([sum(float(s.select(per[s.param]).sum()) for s in grp.slices) for grp in part],
                       dtype=torch.float64)
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)


def test_gradient_scorers_need_labels_and_see_through_a_controller():
    model = _cnn().train()
    part = conv_filters(model)
    for name in ("dpfps", "grasp", "att_score"):
        with pytest.raises(ConfigError, match=r"^data\.loss_fn=None"):
            get_scorer(name)(model, part, ScoreData())
    loss = _cnn_loss(_images())
    plain = get_scorer("grasp")(model, part, ScoreData(loss))
    ctl = attach(model, part)
    ctl.set_active(torch.zeros(len(part), dtype=torch.bool))  # nothing active: still every score
    torch.testing.assert_close(get_scorer("grasp")(model, part, ScoreData(loss, controller=ctl)), plain,
                               rtol=1e-10, atol=1e-14)
    ctl.detach()
