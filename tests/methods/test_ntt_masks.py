"""Unstructured weight masks (ntkit.methods.masks): exact densities, criteria, and fixed-mask training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkit.errors import ConfigError
from ntkit.methods.masks import (
    WeightMask,
    logit_snip_mask,
    magnitude_mask,
    mask_density,
    mask_from_scores,
    maskable_weights,
    random_mask,
    rescale_weights_,
    snip_mask,
)
from ntkit.models import build_model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.05, 0.01])
def test_layerwise_density_is_exact_per_tensor(density):
    model = build_model("lenet5_caffe")
    masks = magnitude_mask(model, density, "layerwise")
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}  # no biases
    for n, m in masks.items():
        assert int(m.sum()) == max(1, round(density * m.numel())), n
        assert set(m.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("density", [0.3, 0.03])
def test_global_density_is_exact_overall_and_pools_tensors(density):
    model = build_model("lenet300_100")
    masks = magnitude_mask(model, density, "global")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    assert mask_density(masks) == pytest.approx(round(density * total) / total)
    # pooled threshold: every kept |w| exceeds every dropped |w| across tensors
    w = maskable_weights(model)
    kept = torch.cat([w[n].detach().abs()[masks[n] > 0] for n in masks])
    dropped = torch.cat([w[n].detach().abs()[masks[n] == 0] for n in masks])
    assert kept.min() > dropped.max()
    # global differs from layerwise (fc3's Glorot scale is larger than fc1's)
    lw = magnitude_mask(model, density, "layerwise")
    assert any(not torch.equal(lw[n], masks[n]) for n in masks)


def test_magnitude_keeps_strictly_above_the_quantile():
    w = torch.randn(40, 25, dtype=torch.float64)
    m = mask_from_scores({"w": w.abs()}, 0.1)["w"]
    q = torch.quantile(w.abs().flatten(), 1 - 0.1)
    assert torch.equal(m.bool(), w.abs() > q)  # the authors' rule; distinct values → same set
    assert int(m.sum()) == 100


def test_ties_are_broken_deterministically_keeping_the_exact_count():
    s = torch.zeros(10)
    s[3] = 1.0
    m = mask_from_scores({"w": s.view(2, 5)}, 0.3)["w"].flatten()
    assert m.tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]


def test_snip_and_logit_snip_use_the_saliency_of_their_objective():
    model = _mlp().double()
    x = torch.randn(6, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    ws = maskable_weights(model)
    loss_g = torch.autograd.grad(F.cross_entropy(model(x), y), list(ws.values()))
    logit_g = torch.autograd.grad(model(x).pow(2).sum(), list(ws.values()))
    for scope in ("global", "layerwise"):
        want = mask_from_scores({n: (w * g).abs() for (n, w), g in zip(ws.items(), loss_g)}, 0.25, scope)
        got = snip_mask(model, x, y, 0.25, scope)
        assert all(torch.equal(got[n], want[n]) for n in ws)
        want = mask_from_scores({n: (w * g).abs() for (n, w), g in zip(ws.items(), logit_g)}, 0.25, scope)
        got = logit_snip_mask(model, x, 0.25, scope)
        assert all(torch.equal(got[n], want[n]) for n in ws)
    assert not all(torch.equal(snip_mask(model, x, y, 0.25)[n], logit_snip_mask(model, x, 0.25)[n]) for n in ws)


def test_random_mask_is_exact_uniform_and_reproducible():
    model = build_model("lenet300_100")
    a = random_mask(model, 0.1, torch.Generator().manual_seed(1))
    b = random_mask(model, 0.1, torch.Generator().manual_seed(1))
    c = random_mask(model, 0.1, torch.Generator().manual_seed(2))
    for n, m in a.items():
        assert int(m.sum()) == round(0.1 * m.numel())
        assert torch.equal(m, b[n])
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])
    # uniform: no preference for large weights (kept mean |w| ≈ overall mean |w|)
    w = model.fc1.weight.detach().abs()
    assert abs(w[a["fc1.weight"] > 0].mean() / w.mean() - 1) < 0.05


def test_rescale_multiplies_only_masked_tensors():
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = random_mask(model, 0.25, torch.Generator().manual_seed(0))
    rescale_weights_(model, masks, math.sqrt(1 / 0.25))
    for n, p in model.named_parameters():
        factor = 2.0 if n in masks else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor)


def test_weight_mask_keeps_masked_weights_zero_and_trains_the_rest():
    model = _mlp()
    masks = magnitude_mask(model, 0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    wm = WeightMask(model, masks).attach(opt)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, m in masks.items():  # masked gradients are zero before the step
            assert torch.all(dict(model.named_parameters())[n].grad[m == 0] == 0)
        opt.step()
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.all(params[n][m == 0] == 0)
        assert not torch.equal(params[n][m > 0], start[n][m > 0])
    assert not torch.equal(params["1.bias"], start["1.bias"])  # biases are never masked
    assert wm.density == pytest.approx(mask_density(masks))
    wm.detach()
    with pytest.raises(ConfigError):
        WeightMask(model, {"1.weight": torch.ones(3, 3)})


@pytest.mark.parametrize(("kw", "field"), [({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
                                            ({"scope": "row"}, "scope")])
def test_bad_arguments_name_the_field(kw, field):
    args = {"density": 0.5, "scope": "layerwise", **kw}
    with pytest.raises(ConfigError, match=field):
        magnitude_mask(_mlp(), args["density"], args["scope"])
