"""SlicedSGD: torch.optim.SGD on the active slices (exact, float64), inactive slices and their
momentum untouched, per-group lr scaling, state round trip, one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from ntkit import partition as P
from ntkit.errors import ConfigError
from ntkit.models.layers import TransformerBlock
from ntkit.sparse import SlicedSGD, attach

HP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def _transformer():
    torch.manual_seed(0)
    m = nn.Sequential(
        TransformerBlock(8, 2, 12, dropout=0.0), TransformerBlock(8, 2, 12, dropout=0.0, num_experts=2)
    )
    return m.double().eval(), torch.randn(2, 4, 8, dtype=torch.float64)


def _convnet():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.Flatten()
    )
    return m.double().eval(), torch.randn(2, 3, 6, 6, dtype=torch.float64)


def _backward(m: nn.Module, x: Tensor, step: int) -> None:
    out = m(x)
    (out * torch.linspace(-1, 1 + step, out.shape[-1], dtype=out.dtype)).sin().sum().backward()


@pytest.mark.parametrize("build", [_transformer, _convnet], ids=["heads+experts", "filters"])
@pytest.mark.parametrize(
    "hp", [HP, {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}], ids=["momentum", "plain"]
)
def test_equals_torch_sgd_on_active_slices_and_leaves_the_rest(build, hp) -> None:
    """Per step, the reference applies torch.optim.SGD(foreach=False) to the active elements only
    (with their own momentum buffers, zero before their first step) and nothing elsewhere."""
    m, x = build()
    part = P.auto(m) if build is _transformer else P.conv_filters(m)
    ctl = attach(m, part)
    opt = SlicedSGD(m, ctl, **hp)
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    ref_buf = {n: torch.zeros_like(p) for n, p in ref.items()}
    gen = torch.Generator().manual_seed(1)
    active = torch.ones(len(part), dtype=torch.bool)
    for step in range(7):
        if step % 2 == 1:  # a set lasts two steps: the second reuses the gathered momentum rows
            active = torch.rand(len(part), generator=gen) < 0.5
            ctl.set_active(active)
        masks = part.element_masks(m, active)
        opt.zero_grad(set_to_none=True)
        _backward(m, x, step)
        for name, p in m.named_parameters():
            mk = masks.get(name, torch.ones_like(p, dtype=torch.bool))
            if p.grad is None or not bool(mk.any()):  # the optimizer skips these too
                continue
            leaf = ref[name][mk].clone().requires_grad_(True)
            leaf.grad = p.grad[mk].clone()
            o = torch.optim.SGD([leaf], foreach=False, **hp)
            if hp["momentum"]:
                o.state[leaf]["momentum_buffer"] = ref_buf[name][mk].clone()
            o.step()
            ref[name][mk] = leaf.detach()
            if hp["momentum"]:
                ref_buf[name][mk] = o.state[leaf]["momentum_buffer"]
        opt.step()
        opt.flush()  # gathered momentum rows back into state (kept compact while a set lasts)
        for name, p in m.named_parameters():
            assert torch.equal(p.detach(), ref[name]), (step, name)
            if hp["momentum"]:
                assert torch.equal(opt.state[p]["momentum_buffer"], ref_buf[name]), (step, name)
        if step > 0:
            assert not bool(active.all()) and bool(active.any())


def test_all_active_equals_torch_sgd() -> None:
    m, x = _transformer()
    ref = copy.deepcopy(m)
    opt = SlicedSGD(m, attach(m, P.auto(m)), **HP)
    ref_opt = torch.optim.SGD(ref.parameters(), foreach=False, **HP)
    for step in range(4):
        for model, o in ((m, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            _backward(model, x, step)
            o.step()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name


def test_lr_scale_equals_scaled_lr_and_state_round_trip() -> None:
    m, x = _convnet()
    m2 = copy.deepcopy(m)
    part = P.conv_filters(m)
    ctl, ctl2 = attach(m, part), attach(m2, copy.deepcopy(part))
    slow = torch.tensor([i % 3 == 0 for i in range(len(part))])
    ctl.set_active(slow)
    ctl2.set_active(slow)
    opt, opt2 = SlicedSGD(m, ctl, **HP), SlicedSGD(m2, ctl2, **{**HP, "lr": 5 * HP["lr"]})
    scale = torch.where(slow, 5.0, 1.0).double()
    for model, o, kw in ((m, opt, {"lr_scale": scale}), (m2, opt2, {})):
        _backward(model, x, 0)
        o.step(**kw)
    masks = part.element_masks(m, slow)
    for (name, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        if name in masks:
            torch.testing.assert_close(p[masks[name]], q[masks[name]], rtol=0, atol=1e-15, msg=name)
    with pytest.raises(ConfigError, match="lr_scale"):
        opt.step(lr_scale=torch.ones(3))
    # a fresh optimizer loaded from the state continues exactly
    m3 = _convnet()[0]
    m3.load_state_dict(m.state_dict())
    ctl3 = attach(m3, copy.deepcopy(part))
    ctl3.set_active(slow)
    opt3 = SlicedSGD(m3, ctl3, **HP)
    opt3.load_state_dict(copy.deepcopy(opt.state_dict()))
    for model, o in ((m, opt), (m3, opt3)):
        o.zero_grad()
        _backward(model, x, 1)
        o.step()
    for (name, p), (_, q) in zip(m.named_parameters(), m3.named_parameters()):
        assert torch.equal(p, q), name


def test_bad_hyperparameters() -> None:
    m, _ = _convnet()
    ctl = attach(m, P.conv_filters(m))
    with pytest.raises(ConfigError, match=r"^lr=-1\.0: expected a number >= 0"):
        SlicedSGD(m, ctl, lr=-1.0)
    with pytest.raises(ConfigError, match=r"^momentum=1\.0: expected a number in \[0, 1\)"):
        SlicedSGD(m, ctl, momentum=1.0)
    with pytest.raises(ConfigError, match=r"^weight_decay=-0\.1"):
        SlicedSGD(m, ctl, weight_decay=-0.1)
