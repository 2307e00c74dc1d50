"""SlicedAdamW: equals torch AdamW when all groups are active; touches only active slices
otherwise (values, moments, per-slice step counts); per-group lr scaling; exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from ntkit import partition as P
from ntkit.errors import ConfigError
from ntkit.models.layers import TransformerBlock
from ntkit.sparse import SlicedAdamW, SlicedSGD, attach

HP = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}


def _setup():
    torch.manual_seed(0)
    m = nn.Sequential(TransformerBlock(8, 2, 12, dropout=0.0), TransformerBlock(8, 2, 12, dropout=0.0, num_experts=2))
    m = m.double().eval()
    return m, P.auto(m), torch.randn(2, 4, 8, dtype=torch.float64)


def _backward(m: nn.Module, x: Tensor, step: int) -> None:
    out = m(x)
    (out * torch.linspace(-1, 1 + step, out.shape[-1], dtype=out.dtype)).sin().sum().backward()


def test_all_active_equals_torch_adamw() -> None:
    m, part, x = _setup()
    ref = copy.deepcopy(m)
    ctl = attach(m, part)
    opt = SlicedAdamW(m, ctl, **HP)
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **HP)
    for step in range(4):
        for model, o in ((m, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            _backward(model, x, step)
            o.step()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15, msg=name)


def test_inactive_slices_and_state_untouched() -> None:
    m, part, x = _setup()
    ctl = attach(m, part)
    opt = SlicedAdamW(m, ctl, **HP)
    for step in range(2):  # build up state everywhere first
        opt.zero_grad()
        _backward(m, x, step)
        opt.step()
    active = torch.tensor([i % 2 == 0 for i in range(len(part))])
    ctl.set_active(active)
    before = copy.deepcopy(m.state_dict())
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    _backward(m, x, 5)
    opt.step()
    masks = part.element_masks(m, active)
    names = [n for n, _ in m.named_parameters()]
    for i, (name, p) in enumerate(m.named_parameters()):
        mk = masks.get(name, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(p[~mk], before[name][~mk]), name
        st, st0 = opt.state_dict()["state"][i], state_before[i]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key][~mk], st0[key][~mk]), (name, key)
            if bool(mk.any()):
                assert not torch.equal(st[key][mk], st0[key][mk]), (name, key)
        if bool(mk.any()):
            assert not torch.equal(p[mk], before[name][mk]), name
        if name in ctl.slicings:
            sl = ctl.slicings[name]
            idx_mask = (sl.group_of < 0) | active[sl.group_of.clamp(min=0)]
            assert torch.equal(st["step"], st0["step"] + idx_mask.float()), name
        else:
            assert float(st["step"]) == 3.0, name
    assert len(names) == len(opt.state_dict()["state"])


def test_per_slice_step_counts_equal_separate_adamw() -> None:
    """A group trained on steps {0, 2} matches AdamW that only saw those two steps' gradients."""
    lin = nn.Linear(3, 4).double()
    part = P.linear_neurons(nn.Sequential(lin))
    part = P.Partition.from_slices({g.name: [(s.param[2:], s.dim, range(s.start, s.stop)) for s in g.slices]
                                    for g in part}).bind(lin)
    ref = copy.deepcopy(lin)
    ctl = attach(lin, part)
    opt = SlicedAdamW(lin, ctl, **HP)
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **HP)
    xs = torch.randn(3, 5, 3, dtype=torch.float64)
    for step in range(3):
        ctl.set_active([True, step != 1, True, step == 1])
        opt.zero_grad()
        lin(xs[step]).sin().sum().backward()
        opt.step()
        if step != 1:  # reference AdamW takes the steps group 1 took
            ref_opt.zero_grad()
            ref(xs[step]).sin().sum().backward()
            ref_opt.step()
    torch.testing.assert_close(lin.weight[1], ref.weight[1], rtol=0, atol=1e-15)
    torch.testing.assert_close(lin.bias[1], ref.bias[1], rtol=0, atol=1e-15)
    assert opt.state[lin.weight]["step"].tolist() == [3.0, 2.0, 3.0, 1.0]


def test_lr_scale_equals_scaled_lr() -> None:
    m, part, x = _setup()
    m2 = copy.deepcopy(m)
    ctl, ctl2 = attach(m, part), attach(m2, copy.deepcopy(part))
    slow = torch.tensor([i % 3 == 0 for i in range(len(part))])
    ctl.set_active(slow)
    ctl2.set_active(slow)
    opt = SlicedAdamW(m, ctl, **HP)
    opt2 = SlicedAdamW(m2, ctl2, **{**HP, "lr": 5 * HP["lr"]})
    scale = torch.where(slow, 5.0, 1.0).double()
    for model, o, kw in ((m, opt, {"lr_scale": scale}), (m2, opt2, {})):
        _backward(model, x, 0)
        o.step(**kw)
    masks = part.element_masks(m, slow)
    for (name, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        if name in masks:  # covered slices of slow groups: same as lr = 5·η
            torch.testing.assert_close(p[masks[name]], q[masks[name]], rtol=0, atol=1e-15, msg=name)
    with pytest.raises(ConfigError, match="lr_scale"):
        opt.step(lr_scale=torch.ones(3))


def test_state_dict_round_trip_is_exact() -> None:
    m, part, x = _setup()
    ctl = attach(m, part)
    opt = SlicedAdamW(m, ctl, **HP)
    actives = [torch.rand(len(part)) < 0.6 for _ in range(5)]
    for step in range(2):
        ctl.set_active(actives[step])
        opt.zero_grad()
        _backward(m, x, step)
        opt.step()
    saved_model, saved_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    for step in range(2, 5):
        ctl.set_active(actives[step])
        opt.zero_grad()
        _backward(m, x, step)
        opt.step()
    m2, part2, _ = _setup()
    m2.load_state_dict(saved_model)
    ctl2 = attach(m2, part2)
    opt2 = SlicedAdamW(m2, ctl2, lr=0.5)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == HP["lr"]
    for step in range(2, 5):
        ctl2.set_active(actives[step])
        opt2.zero_grad()
        _backward(m2, x, step)
        opt2.step()
    for (name, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), name


class _Uncached(SlicedAdamW):
    """Reference: the gathered moments are written back and dropped after every step."""

    def step(self, closure=None, lr_scale=None):  # type: ignore[override]
        out = super().step(closure, lr_scale)
        self.flush()
        self._compact.clear()
        return out


def test_gathered_moments_equal_writing_back_every_step() -> None:
    """Active sets held for a few steps, changed, repeated, emptied: the same numbers (bitwise)
    as re-gathering the moments from ``state`` at every step, in parameters and state_dict."""
    m, part, x = _setup()
    m2 = copy.deepcopy(m)
    ctl, ctl2 = attach(m, part), attach(m2, copy.deepcopy(part))
    opt, ref = SlicedAdamW(m, ctl, **HP), _Uncached(m2, ctl2, **HP)
    sets = [torch.tensor(a) for a in ([1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 1], [1, 0, 1, 0, 1, 1], [0] * 6)]
    sets = [a.bool() for a in sets]  # one head of two: scattered (blocked) qkv rows
    cached = 0
    for step, k in enumerate([0, 0, 0, 1, 1, 3, 0, 2, 2]):
        # set_active every step: an unchanged set keeps its index objects (and the gathered moments)
        ctl.set_active(sets[k])
        ctl2.set_active(sets[k])
        for model, o in ((m, opt), (m2, ref)):
            o.zero_grad(set_to_none=True)
            if bool(sets[k].any()):
                _backward(model, x, step)
            o.step()
        cached += len(opt._compact)
        if step == 4:  # a checkpoint mid-way flushes without disturbing the next steps
            opt.state_dict()
    assert cached > 0  # the gathered-moments path ran
    for (name, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), name
    sd, sd2 = opt.state_dict()["state"], ref.state_dict()["state"]
    for i in sd:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sd[i][key], sd2[i][key]), (i, key)


def test_gradient_rows_handed_over_by_the_backward_equal_a_gather() -> None:
    """The active gradient rows the backward leaves for SlicedAdamW give bitwise the same step as
    gathering them from ``.grad``; an in-place edit of ``.grad`` between backward and step (as
    gradient clipping does) makes the optimizer gather the edited values instead."""
    m, part, x = _setup()
    m2 = copy.deepcopy(m)
    ctl, ctl2 = attach(m, part), attach(m2, copy.deepcopy(part))
    active = torch.tensor([1, 0, 0, 1, 1, 0]).bool()  # one head of two per layer: scattered rows
    ctl.set_active(active)
    ctl2.set_active(active)
    opt, ref = SlicedAdamW(m, ctl, **HP), SlicedAdamW(m2, ctl2, **HP)
    ctl2.keep_grad_rows = False
    handed: dict[int, list[bool]] = {}
    take = ctl.take_grad_rows

    def spy(name: str, grad: Tensor) -> Tensor | None:
        rows = take(name, grad)
        handed.setdefault(step, []).append(rows is not None)
        return rows

    ctl.take_grad_rows = spy  # type: ignore[method-assign]
    for step in range(3):
        for model, o in ((m, opt), (m2, ref)):
            o.zero_grad(set_to_none=True)
            _backward(model, x, step)
            if step == 1:
                for q in model.parameters():
                    if q.grad is not None:
                        q.grad.mul_(0.5)
            o.step()
    assert any(handed[0]) and any(handed[2])  # rows handed over on unedited steps
    assert not any(handed[1])  # the edited step gathered from .grad
    for (name, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), name


def test_bad_hyperparameters() -> None:
    m, part, _ = _setup()
    ctl = attach(m, part)
    with pytest.raises(ConfigError, match="lr"):
        SlicedAdamW(m, ctl, lr=-1.0)
    with pytest.raises(ConfigError, match="betas"):
        SlicedAdamW(m, ctl, betas=(0.9, 1.0))


def _count_fused(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap ``torch.<name>`` to record how many tensors each call updated."""
    calls: list[int] = []
    real = getattr(torch, name)

    def spy(params, *args, **kw):  # type: ignore[no-untyped-def]
        assert all(p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last) for p in params)
        calls.append(len(params))
        return real(params, *args, **kw)

    monkeypatch.setattr(torch, name, spy)
    return calls


SGD_HP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("opt_cls", ["adamw", "sgd"])
def test_float32_uses_torchs_fused_kernel_and_equals_torch_fused(monkeypatch, layout, opt_cls) -> None:
    """float32, every group active: all parameters go through one call of torch's fused kernel per
    step, and the numbers are torch.optim.AdamW / SGD(fused=True)'s, bit for bit (channels-last too)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten())
    x = torch.randn(2, 3, 6, 6)
    if layout == "nhwc":
        m, x = m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(m)
    ctl = attach(m, P.conv_filters(m))
    if opt_cls == "adamw":
        opt, ref_opt = SlicedAdamW(m, ctl, **HP), torch.optim.AdamW(ref.parameters(), fused=True, **HP)
    else:
        opt, ref_opt = SlicedSGD(m, ctl, **SGD_HP), torch.optim.SGD(ref.parameters(), fused=True, **SGD_HP)
    calls = _count_fused(monkeypatch, "_fused_adamw_" if opt_cls == "adamw" else "_fused_sgd_")
    for step in range(3):
        for model, o in ((m, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            _backward(model, x, step)
            o.step()
    assert calls[::2] == [len(list(m.parameters()))] * 3  # ours: one call per step for all of them
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name


def test_float32_fused_partial_step_leaves_inactive_slices_and_strided_views_exact(monkeypatch) -> None:
    """float32, half the groups active: gathered rows and contiguous row views go through the fused
    kernel, column slices (strided views) through the per-operation path; one step equals the
    per-operation path everywhere (to float32 rounding; over several steps Adam turns rounding into
    visible differences where a gradient is analytically zero, e.g. a key bias) and inactive
    slices are untouched."""
    import ntkit.sparse.optim as O

    torch.manual_seed(0)
    m = nn.Sequential(TransformerBlock(8, 2, 12, dropout=0.0), TransformerBlock(8, 2, 12, dropout=0.0, num_experts=2))
    m = m.eval()
    x = torch.randn(2, 4, 8)
    part = P.auto(m)
    m2 = copy.deepcopy(m)
    ctl, ctl2 = attach(m, part), attach(m2, copy.deepcopy(part))
    active = torch.tensor([i % 2 == 0 for i in range(len(part))])
    ctl.set_active(active)
    ctl2.set_active(active)
    opt, ref = SlicedAdamW(m, ctl, **HP), SlicedAdamW(m2, ctl2, **HP)
    before = copy.deepcopy(m.state_dict())
    calls = _count_fused(monkeypatch, "_fused_adamw_")
    for model, o, fused in ((m, opt, True), (m2, ref, False)):
        monkeypatch.setattr(O, "_FUSED", fused)
        _backward(model, x, 0)
        o.step()
    assert len(calls) == 1 and calls[0] > 0
    masks = part.element_masks(m, active)
    for (name, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        mk = masks.get(name, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(p.detach()[~mk], before[name][~mk]), name


@pytest.mark.parametrize("opt_cls", ["adamw", "sgd"])
def test_vector_batches_equal_per_parameter_updates(monkeypatch, opt_cls) -> None:
    """float32 BN and bias vectors with scattered active rows are updated as one batch (one gather
    from a concatenation, one write-back); bit for bit the per-parameter gathered update, across set
    changes, a checkpoint mid-way, an lr_scale step (per-parameter path) and an empty set."""
    import ntkit.sparse.optim as O

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6),
                      nn.Flatten())
    x = torch.randn(2, 3, 6, 6)
    part = P.conv_filters(m)
    m2 = copy.deepcopy(m)
    ctl, ctl2 = attach(m, part), attach(m2, copy.deepcopy(part))
    make = (lambda mod, c: SlicedAdamW(mod, c, **HP)) if opt_cls == "adamw" else (
        lambda mod, c: SlicedSGD(mod, c, **SGD_HP))
    opt, ref = make(m, ctl), make(m2, ctl2)
    gen = torch.Generator().manual_seed(3)
    sets = [torch.rand(len(part), generator=gen) < 0.5 for _ in range(3)] + [torch.zeros(len(part), dtype=torch.bool)]
    batched = 0
    for step, k in enumerate([0, 0, 1, 1, 2, 0, 3, 0]):
        for model, c, o, vec in ((m, ctl, opt, True), (m2, ctl2, ref, False)):
            monkeypatch.setattr(O, "_vectorizable", O._vectorizable if vec else (lambda *a: False))
            c.set_active(sets[k])
            o.zero_grad(set_to_none=True)
            if bool(sets[k].any()):
                _backward(model, x, step)
            scale = torch.where(sets[k], 2.0, 1.0).double() if step == 4 else None
            o.step(lr_scale=scale)
        batched += len(opt._vec)
        if step == 3:
            opt.state_dict()
    assert batched > 0 and not ref._vec
    for (name, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), name
    sd, sd2 = opt.state_dict()["state"], ref.state_dict()["state"]
    for i in sd:
        for key in sd[i]:
            assert torch.equal(sd[i][key], sd2[i][key]), (i, key)
