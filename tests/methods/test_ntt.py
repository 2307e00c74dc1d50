"""NTT (ntkit.methods.ntt): the loss and its gradient against brute force, the label-free contract,
the mask schedule and what the model holds afterwards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

from ntkit.errors import ConfigError
from ntkit.methods import LoopContext, build_method
from ntkit.methods.masks import maskable_weights, random_mask
from ntkit.methods.ntt import NTTConfig, glorot_truncated_init_, ntt_loss, ntt_targets
from ntkit.models import build_model


def _brute_loss(model, x, g_out, g_ntk, raw, masks, gamma2, beta, density, kernel):
    """Direct torch.func: Θ from per-parameter Jacobians (w.r.t. θ̃ for 'sparse', w.r.t. w = m ⊙ θ̃
    for 'effective'), the same three terms."""
    h = x.shape[0] // 2

    def out_eff(eff, xs):
        return functional_call(model, eff, (xs,)).reshape(xs.shape[0], -1)

    def masked(p):
        return {n: (t * masks[n] if n in masks else t) for n, t in p.items()}

    def f(p):
        eff = masked(p)
        if kernel == "sparse":
            j1 = jacrev(lambda q, xs=x[:h]: out_eff(masked(q), xs))(p)
            j2 = jacrev(lambda q, xs=x[h:]: out_eff(masked(q), xs))(p)
        else:
            j1 = jacrev(lambda q, xs=x[:h]: out_eff(q, xs))(eff)
            j2 = jacrev(lambda q, xs=x[h:]: out_eff(q, xs))(eff)
        theta = sum(j1[n].reshape(h * g_out.shape[1], -1) @ j2[n].reshape((x.shape[0] - h) * g_out.shape[1], -1).T
                    for n in p)
        target = (out_eff(eff, x) - g_out).pow(2).mean()
        norm = sum(eff[n].pow(2).sum() for n in masks)
        return target + gamma2 * (theta - g_ntk).pow(2).mean() + beta / density * norm

    return f(raw), grad(f)(raw)


@pytest.mark.parametrize("kernel", ["effective", "sparse"])
@pytest.mark.parametrize("name", ["lenet300_100", "lenet5_caffe"])
def test_loss_and_gradient_equal_brute_force(name, kernel):
    torch.manual_seed(0)
    model = build_model(name).double().eval()
    glorot_truncated_init_(model, torch.Generator().manual_seed(1))
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)  # halves of 1 and 2 samples
    g_out, g_ntk = ntt_targets(model, x)
    masks = {n: m.double() for n, m in random_mask(model, 0.3, torch.Generator().manual_seed(2)).items()}
    raw = {n: (p.detach() + 0.05 * torch.randn_like(p)).requires_grad_(True) for n, p in model.named_parameters()}
    kw = {"gamma2": 1e-1, "beta": 1e-3, "density": 0.3}
    loss, parts = ntt_loss(model, x, g_out, g_ntk, raw, masks, kernel=kernel, **kw)
    grads = torch.autograd.grad(loss, list(raw.values()))
    want_loss, want_grad = _brute_loss(model, x, g_out, g_ntk, {n: t.detach() for n, t in raw.items()}, masks,
                                       kernel=kernel, **kw)
    assert parts["kernel"] > 1e-3 and parts["target"] > 1e-3  # every term is exercised
    assert abs(loss.item() - want_loss.item()) <= 1e-8 * max(1.0, abs(want_loss.item()))
    for (n, _), g in zip(raw.items(), grads):
        scale = max(1.0, float(want_grad[n].abs().max()))
        assert float((g - want_grad[n]).abs().max()) <= 1e-8 * scale, n
        if n in masks:  # masked raw weights get zero (not absent) gradients
            assert torch.all(g[masks[n] == 0] == 0)


def test_kernels_differ_only_through_pruned_columns():
    torch.manual_seed(0)
    model = build_model("lenet300_100").double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    g_out, g_ntk = ntt_targets(model, x)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    ones = {n: torch.ones_like(p) for n, p in maskable_weights(model).items()}
    a = ntt_loss(model, x, g_out, g_ntk, raw, ones, gamma2=1.0, beta=0.0, density=1.0, kernel="sparse")[1]
    b = ntt_loss(model, x, g_out, g_ntk, raw, ones, gamma2=1.0, beta=0.0, density=1.0, kernel="effective")[1]
    assert float(a["kernel"]) == pytest.approx(float(b["kernel"]), abs=1e-20)
    half = random_mask(model, 0.5, torch.Generator().manual_seed(0))
    a = ntt_loss(model, x, g_out, g_ntk, raw, half, gamma2=1.0, beta=0.0, density=0.5, kernel="sparse")[1]
    b = ntt_loss(model, x, g_out, g_ntk, raw, half, gamma2=1.0, beta=0.0, density=0.5, kernel="effective")[1]
    assert float(a["kernel"]) > 1.2 * float(b["kernel"])  # the sparse NTK loses the pruned columns


class _Sentinel:
    def __call__(self, *a, **k):
        raise AssertionError("a labelled accessor was called by a label-free method")


def _ctx(model, calls, seed=0):
    data = torch.randn(256, 1, 28, 28)

    def sample_inputs(n, gen):
        calls.append(n)
        return data[torch.randint(0, len(data), (n,), generator=gen)]

    return LoopContext(model=model, sample_inputs=sample_inputs, loss_fn=_Sentinel(), sample_batch=_Sentinel(),
                       seed=seed, steps_per_epoch=4, batch_size=16)


def test_at_init_uses_only_unlabelled_inputs_and_leaves_a_fixed_sparse_model():
    model = build_model("lenet300_100")
    method = build_method("ntt", density=0.1, steps=3, batch_size=8, mask_update_freq=1, log_every=1)
    assert method.needs_labels is False
    records, calls = [], []
    ctx = _ctx(model, calls)
    ctx.log = records.append
    method.bind(model, None, None)
    method.at_init(ctx)
    assert calls == [8, 8, 8]
    # mask updated after steps 1 (< 3 − 1) but not during the last interval
    assert method.history[-1]["mask_updates"] == 1 and method.history[-1]["steps"] == 3
    assert [r["step"] for r in records if r["event"] == "ntt_step"] == [1, 2, 3]
    params = dict(model.named_parameters())
    for n, m in method.masks.items():
        assert int(m.sum()) == round(0.1 * m.numel())  # exact per-layer density
        assert torch.all(params[n][m == 0] == 0)
    # the mask stays fixed for training
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 1, 28, 28)).pow(2).sum().backward()
        opt.step()
        method.after_step(ctx)
    for n, m in method.masks.items():
        assert torch.all(params[n][m == 0] == 0) and torch.any(params[n][m > 0] != 0)
    # JSON-able state; a rebuilt method restores the masks
    state = json.loads(json.dumps(method.state_dict(), allow_nan=False))
    again = build_method("ntt", density=0.1)
    again.load_state_dict(state)
    assert all(torch.equal(again.masks[n], method.masks[n]) for n in method.masks)
    method.at_init(ctx)  # done: does not run again
    assert calls == [8, 8, 8]


def test_density_one_starts_at_zero_distance():
    model = build_model("lenet300_100")
    method = build_method("ntt", density=1.0, steps=1, batch_size=8, beta=0.0)
    method.at_init(_ctx(model, []))
    start = method.history[-1]["start"]
    assert start["target"] == 0.0 and start["kernel"] == 0.0 and start["loss"] == 0.0
    method = build_method("ntt", density=1.0, steps=1, batch_size=8, beta=1e-4)
    method.at_init(_ctx(build_model("lenet300_100"), []))
    start = method.history[-1]["start"]
    assert start["target"] == 0.0 and start["kernel"] == 0.0
    assert start["loss"] == pytest.approx(1e-4 * start["norm"], rel=1e-6)


def test_transfer_reduces_the_distances():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    data = torch.randn(16, 1, 28, 28)
    ctx = LoopContext(model=model, sample_inputs=lambda n, gen: data[:n])  # one fixed batch: comparable
    method = build_method("ntt", density=0.1, steps=30, batch_size=16, lr=3e-3, mask_update_freq=10, gamma2=1e-2)
    method.at_init(ctx)
    h = method.history[-1]
    assert h["end"]["target"] < 0.5 * h["start"]["target"], h
    assert h["end"]["kernel"] < 0.5 * h["start"]["kernel"], h


def test_global_scope_starts_from_logit_snip_and_keeps_the_overall_density():
    model = build_model("lenet300_100")
    calls = []
    method = build_method("ntt", density=0.05, scope="global", steps=1, batch_size=4, snip_samples=12)
    method.at_init(_ctx(model, calls))
    assert calls == [12, 4]  # Logit-SNIP inputs, then one NTT batch
    total = sum(m.numel() for m in method.masks.values())
    assert sum(int(m.sum()) for m in method.masks.values()) == round(0.05 * total)


def test_glorot_truncated_init_matches_the_authors_distribution():
    model = build_model("lenet300_100")
    glorot_truncated_init_(model, torch.Generator().manual_seed(0))
    w = model.fc1.weight.detach()
    std = math.sqrt(2 / (784 + 300))
    assert abs(w.std().item() / std - 1) < 0.02
    assert w.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7
    assert abs(model.fc1.bias.detach().std().item() / 0.01 - 1) < 0.2
    again = glorot_truncated_init_(build_model("lenet300_100"), torch.Generator().manual_seed(0))
    assert torch.equal(again.fc1.weight, model.fc1.weight)


@pytest.mark.parametrize(("field", "value"), [("batch_size", 7), ("density", 0.0), ("kernel", "diag"),
                                              ("scope", "row"), ("mask_update_freq", -1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        build_method("ntt", **{field: value})
    with pytest.raises(ConfigError, match=field):
        NTTConfig(**{field: value})
