"""Partial backward (ntkit.sparse.attach): gradients vs a full float64 backward, executed FLOPs vs
the analytic count of the active work, pruning vs zeroed weights, autocast / compile / DDP."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ntkit import partition as P
from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.models.layers import SwitchFFN, TransformerBlock
from ntkit.partition import Partition
from ntkit.sparse import attach


# ------------------------------------------------------------------------------------ models
def _mlp() -> tuple[nn.Module, Partition, Tensor]:
    m = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 3))
    return m, P.linear_neurons(m), torch.randn(5, 7)


def _transformer() -> tuple[nn.Module, Partition, Tensor]:
    m = nn.Sequential(
        TransformerBlock(16, 4, 24, dropout=0.0),
        TransformerBlock(16, 4, 24, dropout=0.0, num_experts=3),
    )
    return m, P.auto(m), torch.randn(2, 6, 16)


def _cnn() -> tuple[nn.Module, Partition, Tensor]:
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 3, padding="same"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    return m, P.conv_filters(m), torch.randn(4, 3, 8, 8)


def _cnn_channels_last() -> tuple[nn.Module, Partition, Tensor]:
    """The CNN stored channels-last (NHWC), the faster layout of CPU / GPU convolution kernels."""
    m, part, x = _cnn()
    return m.to(memory_format=torch.channels_last), part, x.contiguous(memory_format=torch.channels_last)


def _cnn_channels_last_nchw_input() -> tuple[nn.Module, Partition, Tensor]:
    """An NHWC model fed NCHW batches (as ``mat-vgg`` feeds its channels-last VGG)."""
    m, part, x = _cnn_channels_last()
    return m, part, x.contiguous()


def _proj_columns() -> tuple[nn.Module, Partition, Tensor]:
    """Linear column slices only (no row slicing upstream): the output projection of heads."""
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    spec = {f"c{i}": [("2.weight", 1, range(2 * i, 2 * i + 2))] for i in range(4)}
    return m, Partition.from_slices(spec).bind(m), torch.randn(6, 5)


MODELS = {"mlp": _mlp, "transformer": _transformer, "cnn": _cnn, "cnn_channels_last": _cnn_channels_last,
          "cnn_channels_last_nchw_input": _cnn_channels_last_nchw_input, "columns": _proj_columns}


def _loss(m: nn.Module, x: Tensor) -> Tensor:
    out = m(x)
    return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sin().sum()


def _check_grads(m: nn.Module, ref: nn.Module, part: Partition, active: Tensor) -> None:
    masks = part.element_masks(m, active)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if name in masks:
            mk = masks[name]
            if not bool(mk.any()):
                assert p.grad is None, name
                continue
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad[mk], q.grad[mk], rtol=1e-12, atol=1e-12, msg=name)
            assert bool((p.grad[~mk] == 0).all()), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_active_grads_equal_full_backward(model: str, seed: int) -> None:
    m, part, x = MODELS[model]()
    m, x = m.double(), x.double()
    ref = copy.deepcopy(m)
    _loss(ref, x).backward()
    ctl = attach(m, part)
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(len(part), generator=g) < 0.5
    active[int(torch.randint(len(part), (1,), generator=g))] = True
    ctl.set_active(active)
    _loss(m, x).backward()
    _check_grads(m, ref, part, active)
    for (name, b), (_, c) in zip(m.named_buffers(), ref.named_buffers()):  # BN running statistics
        torch.testing.assert_close(b, c, rtol=0, atol=1e-12, msg=name)
    # change the active set between steps
    m.zero_grad(set_to_none=True)
    ctl.set_active(~active)
    _loss(m, x).backward()
    _check_grads(m, ref, part, ~active)


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("nchw_input", [False, True])
def test_channels_last_stays_channels_last(pruned: bool, nchw_input: bool) -> None:
    """Sliced convolutions keep an NHWC model NHWC: outputs and input gradients come out in the
    same layout as the plain model's (no silent NCHW copies in between), also when the batches
    come in NCHW (PyTorch's convolution then follows the weights' layout)."""
    m, _, x = _cnn_channels_last()
    m = nn.Sequential(*list(m)[:6])  # up to the last BN: 4-D outputs
    part = P.conv_filters(m)
    if nchw_input:
        x = x.contiguous()
    x.requires_grad_(True)
    ref = copy.deepcopy(m)
    y_ref = ref(x)
    y_ref.backward(torch.ones_like(y_ref))
    gx_ref = x.grad
    x.grad = None
    ctl = attach(m, part)
    ctl.set_active(torch.arange(len(part)) % 2 == 0)
    if pruned:
        ctl.set_pruned(torch.arange(len(part)) % 3 == 0)
    y = m(x)
    y.backward(torch.ones_like(y))
    cl = torch.channels_last
    assert y_ref.is_contiguous(memory_format=cl)
    assert y.is_contiguous(memory_format=cl) and not y.is_contiguous()
    assert x.grad.is_contiguous(memory_format=cl) == gx_ref.is_contiguous(memory_format=cl)


def test_filter_index_sets_shared_across_a_filters_params() -> None:
    """A filter's conv weight, conv bias and BN affine get one Idx object per active set (the conv
    backward fuses the bias gradient into the weight gradient's call when they are the same)."""
    m, part, _ = _cnn()
    ctl = attach(m, part)
    ctl.set_active(torch.arange(len(part)) % 3 != 0)
    conv, bn = m[0]._ntk_plan, m[1]._ntk_plan
    assert conv.w_grad is not None and conv.w_grad is conv.b_grad is bn.w_grad is bn.b_grad
    assert conv.w_grad is ctl.active_sel("0.weight")
    assert conv.w_keep is None and conv.b_keep is None  # nothing pruned: everything computed forward
    ctl.set_active(torch.arange(len(part)) % 3 != 0)  # the same set again: the same object
    assert m[0]._ntk_plan.w_grad is conv.w_grad
    ctl.set_active(torch.ones(len(part), dtype=torch.bool))
    assert m[0]._ntk_plan is None  # all active: the native op


def test_grad_masks_match_partition() -> None:
    m, part, x = _transformer()
    ctl = attach(m, part)
    active = torch.tensor([i % 3 == 0 for i in range(len(part))])
    ctl.set_active(active)
    _loss(m, x).backward()
    want = part.element_masks(m, active)
    got = ctl.grad_masks()
    for name, p in m.named_parameters():
        if name in want:
            expect = want[name] if bool(want[name].any()) else torch.zeros_like(want[name])
            assert torch.equal(got[name], expect), name
        else:
            assert bool(got[name].all()), name


def test_all_inactive_groups_and_detach_restore() -> None:
    m, part, x = _cnn()
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    classes = [type(mod) for mod in m.modules()]
    ctl = attach(m, part)
    ctl.set_active(torch.zeros(len(part), dtype=torch.bool))
    _loss(m, x).backward()
    for name, p in m.named_parameters():
        assert (p.grad is None) == (name in part.covered_params()), name
    ctl.detach()
    assert [type(mod) for mod in m.modules()] == classes
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before
    with pytest.raises(ConfigError):
        ctl.set_active(torch.ones(len(part), dtype=torch.bool))


def test_bad_inputs_raise() -> None:
    m, part, _ = _mlp()
    ctl = attach(m, part)
    with pytest.raises(ConfigError, match="active"):
        ctl.set_active([True, False])
    with pytest.raises(ConfigError, match="pruned"):
        ctl.set_pruned(torch.zeros(len(part)))
    ln = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    bad = Partition.from_slices({"a": [("1.weight", 0, range(2))], "b": [("1.weight", 0, range(2, 4))]})
    with pytest.raises(UnsupportedModelError, match="1.weight"):
        attach(ln, bad)
    whole = Partition.from_slices({"ln": [("1.weight", 0, None), ("1.bias", 0, None)]})
    c = attach(ln, whole)
    c.set_active([False])
    assert not ln[1].weight.requires_grad
    with pytest.raises(UnsupportedModelError, match="pruning"):
        c.set_pruned([True])


# ------------------------------------------------------------------------------------ FLOPs
def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _fwd_bwd(m: nn.Module, x: Tensor) -> int:
    def run() -> None:
        m(x).square().sum().backward()

    return _flops(run)


def _half(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(n, dtype=torch.bool)
    a[torch.randperm(n, generator=g)[: n // 2]] = True
    return a


def test_flops_linear_rows() -> None:
    n, d_in, d_out = 32, 24, 40
    lin = nn.Linear(d_in, d_out)
    part = Partition.from_slices({f"r{i}": [("weight", 0, range(4 * i, 4 * i + 4)), ("bias", 0, range(4 * i, 4 * i + 4))]
                                  for i in range(10)}).bind(lin)
    x = torch.randn(n, d_in, requires_grad=True)
    ctl = attach(lin, part)
    ctl.set_active(_half(10))
    got = _fwd_bwd(lin, x)
    rows = 4 * int(ctl.active.sum())
    want = 2 * n * d_in * d_out * 2 + 2 * n * d_in * rows  # fwd + dx + active dW rows
    assert abs(got - want) <= 0.01 * want, (got, want)


def test_flops_linear_columns() -> None:
    n, d_in, d_out = 32, 24, 40
    lin = nn.Linear(d_in, d_out)
    part = Partition.from_slices({f"c{i}": [("weight", 1, range(3 * i, 3 * i + 3))] for i in range(8)}).bind(lin)
    x = torch.randn(n, d_in, requires_grad=True)
    ctl = attach(lin, part)
    ctl.set_active(_half(8))
    got = _fwd_bwd(lin, x)
    cols = 3 * int(ctl.active.sum())
    want = 2 * n * d_in * d_out * 2 + 2 * n * d_out * cols
    assert abs(got - want) <= 0.01 * want, (got, want)


@pytest.mark.parametrize("need_input_grad", [True, False])
def test_flops_conv_filters(need_input_grad: bool) -> None:
    n, c_in, c_out, hw, k = 4, 6, 16, 10, 3
    conv = nn.Conv2d(c_in, c_out, k, padding=1)
    part = P.conv_filters(nn.Sequential(conv))
    part = Partition([type(g)(g.name, g.kind, g.layer, tuple(type(s)(s.param[2:], s.dim, s.start, s.stop)
                                                                  for s in g.slices)) for g in part]).bind(conv)
    x = torch.randn(n, c_in, hw, hw, requires_grad=need_input_grad)
    ctl = attach(conv, part)
    ctl.set_active(_half(c_out))
    got = _fwd_bwd(conv, x)
    per_filter = 2 * n * hw * hw * c_in * k * k
    active = int(ctl.active.sum())
    want = per_filter * c_out * (1 + int(need_input_grad)) + per_filter * active
    assert abs(got - want) <= 0.01 * want, (got, want)


def test_flops_moe_layer() -> None:
    d, d_ff, e_total, b, t = 16, 32, 4, 4, 8
    moe = SwitchFFN(d, d_ff, e_total).eval()
    part = P.moe_experts(nn.Sequential(moe))
    part = Partition([type(g)(g.name, g.kind, g.layer, tuple(type(s)(s.param[2:], s.dim, s.start, s.stop)
                                                                  for s in g.slices)) for g in part]).bind(moe)
    x = torch.randn(b, t, d, requires_grad=True)  # something upstream trains
    ctl = attach(moe, part)
    active = torch.tensor([True, False, True, False])
    ctl.set_active(active)
    got = _fwd_bwd(moe, x)
    counts = [int(i.numel()) for i in moe.last_dispatch]
    n = b * t
    expert = 2 * (d * d_ff + d_ff * d)  # one token through one expert (fwd)
    want = 2 * n * d * e_total * 3  # router fwd, dx, dW
    want += sum(c * expert * (2 + int(a)) for c, a in zip(counts, active.tolist()))
    assert abs(got - want) <= 0.01 * want, (got, want)


def test_frozen_prefix_computes_no_input_grad() -> None:
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    for p in m[4].parameters():
        p.requires_grad_(False)
    part = P.linear_neurons(nn.Sequential(m[0], m[1], m[2]))  # layers 0 and 2 (same names)
    x = torch.randn(10, 8)
    ctl = attach(m, part)
    active = torch.zeros(len(part), dtype=torch.bool)
    active[16:24] = True  # half of layer 2's neurons; layer 0 frozen
    ctl.set_active(active)
    got = _fwd_bwd(m, x)
    fwd = 2 * 10 * (8 * 16 + 16 * 16 + 16 * 4)
    want = fwd + 2 * 10 * 16 * 4 + 2 * 10 * 16 * 8  # dx through layer 4, active dW rows of layer 2
    assert got == want, (got, want)


# ------------------------------------------------------------------------------------ pruning
def _zeroed(m: nn.Module, part: Partition, pruned: Tensor) -> nn.Module:
    z = copy.deepcopy(m)
    keep = part.element_masks(z, ~pruned)
    with torch.no_grad():
        for name, p in z.named_parameters():
            if name in keep:
                p.mul_(keep[name])
    return z


@pytest.mark.parametrize("model", sorted(MODELS))
def test_pruned_forward_and_grads_equal_zeroed_model(model: str) -> None:
    m, part, x = MODELS[model]()
    m, x = m.double(), x.double()
    m.eval()  # eval BN / unlimited MoE capacity: both models see identical statistics
    g = torch.Generator().manual_seed(3)
    pruned = torch.rand(len(part), generator=g) < 0.4
    active = torch.rand(len(part), generator=g) < 0.7
    ref = _zeroed(m, part, pruned)
    ctl = attach(m, part)
    ctl.set_pruned(pruned)
    ctl.set_active(active)
    assert torch.equal(ctl.active, active & ~pruned) and torch.equal(ctl.pruned, pruned)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-12)
    _loss(ref, x).backward()
    _loss(m, x).backward()
    _check_grads(m, ref, part, active & ~pruned)


def test_pruned_expert_skipped() -> None:
    moe = SwitchFFN(8, 16, 3).eval()
    part = Partition.from_slices({f"e{e}": [(f"experts.{e}.{n}", 0, None) for n in
                                            ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
                                  for e in range(3)}).bind(moe)
    x = torch.randn(2, 5, 8)
    full = _flops(lambda: moe(x))
    moe(x)
    counts = [int(i.numel()) for i in moe.last_dispatch]
    ctl = attach(moe, part)
    ctl.set_pruned([False, True, False])
    assert _flops(lambda: moe(x)) == full - counts[1] * 2 * 2 * 8 * 16


# ------------------------------------------------------------------------------------ autocast, compile, DDP
def test_autocast_bf16_runs_and_matches_fp32() -> None:
    # dense FFN: layers.SwitchFFN itself fails under autocast (index_add of bf16 into fp32)
    m = nn.Sequential(TransformerBlock(16, 4, 24, dropout=0.0), TransformerBlock(16, 4, 24, dropout=0.0))
    part, x = P.attention_heads(m), torch.randn(2, 6, 16)
    ref = copy.deepcopy(m)
    ctl = attach(m, part)
    active = _half(len(part), 1)
    ctl.set_active(active)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        ref_out = ref(x)  # native autocast
        assert m[0].attn.qkv(x).dtype == torch.bfloat16  # the sliced Function ran in bf16
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0.02, atol=0.02)
    w = torch.linspace(-1, 1, 16)
    (out.float() * w).sin().sum().backward()
    (ref_out.float() * w).sin().sum().backward()
    masks = part.element_masks(m, active)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if name in masks and not bool(masks[name].any()):
            assert p.grad is None
            continue
        assert p.grad.dtype == torch.float32
        mk = masks.get(name, torch.ones_like(p, dtype=torch.bool))
        assert bool((p.grad[~mk] == 0).all()), name
        err = (p.grad[mk] - q.grad[mk]).norm() / q.grad[mk].norm().clamp(min=1e-6)
        assert err < 0.1, (name, float(err))


@pytest.mark.parametrize("model", ["cnn", "cnn_channels_last"])
def test_compile_aot_eager_matches_eager(model: str) -> None:
    m, part, x = MODELS[model]()
    ref = copy.deepcopy(m)
    ctl_ref = attach(ref, copy.deepcopy(part))
    ctl = attach(m, part)
    active = _half(len(part), 2)
    ctl.set_active(active)
    ctl_ref.set_active(active)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    _loss(compiled, x).backward()
    _loss(ref, x).backward()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    m, part, x = _cnn()
    ref = copy.deepcopy(m)
    active = _half(len(part), 4)
    attach(ref, copy.deepcopy(part)).set_active(active)
    attach(m, part).set_active(active)
    torch._dynamo.reset()
    _loss(torch.compile(m), x).backward()
    _loss(ref, x).backward()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_ddp_find_unused_parameters(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        m, part, x = _transformer()
        ctl = attach(m, part)
        ddp = DDP(m, find_unused_parameters=True)
        for step in range(3):
            ctl.set_active(_half(len(part), step))
            m.zero_grad(set_to_none=True)
            _loss(ddp, x).backward()
            masks = part.element_masks(m, ctl.active)
            for name, p in m.named_parameters():
                if name in masks and p.grad is not None:
                    assert bool((p.grad[~masks[name]] == 0).all()), name
    finally:
        dist.destroy_process_group()


def _cnn_odd_geometry() -> tuple[nn.Module, Partition, Tensor]:
    """Non-square kernels, unequal strides, dilation, no padding: the weight-gradient kernels'
    patch geometry (``unfold_rows``) in every direction."""
    m = nn.Sequential(
        nn.Conv2d(3, 7, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1)), nn.ReLU(),
        nn.Conv2d(7, 6, (1, 3), stride=(1, 2)), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    return m, P.conv_filters(m), torch.randn(3, 3, 11, 9)


@pytest.mark.parametrize("kernel", ["native", "gemm", "dense"])
@pytest.mark.parametrize("model", ["cnn", "cnn_channels_last", "cnn_channels_last_nchw_input", "odd_geometry"])
def test_conv_kernels_equal_full_backward(monkeypatch, kernel: str, model: str) -> None:
    """Each kernel of a convolution's sliced backward ($NTKIT_CONV_WGRAD) against the full
    backward in float64, over two complementary active sets."""
    monkeypatch.setenv("NTKIT_CONV_WGRAD", kernel)
    m, part, x = _cnn_odd_geometry() if model == "odd_geometry" else MODELS[model]()
    m, x = m.double(), x.double()
    ref = copy.deepcopy(m)
    _loss(ref, x).backward()
    ctl = attach(m, part)
    active = _half(len(part), 3)
    for act in (active, ~active):
        m.zero_grad(set_to_none=True)
        ctl.set_active(act)
        _loss(m, x).backward()
        _check_grads(m, ref, part, act)


@pytest.mark.parametrize("kernel", ["native", "gemm", "dense", "tune-dense"])
def test_conv_kernels_with_pruned_filters_equal_zeroed_model(monkeypatch, kernel: str) -> None:
    """With pruned filters every setting runs a sliced kernel (``dense`` falls back to ``native``:
    the full kernel would multiply the pruned filters)."""
    from ntkit.sparse import _functions as SF

    monkeypatch.setenv("NTKIT_CONV_WGRAD", kernel)
    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    m, part, x = _cnn()
    m, x = m.double().eval(), x.double()
    pruned = torch.arange(len(part)) % 4 == 1
    active = torch.arange(len(part)) % 3 != 0
    ref = _zeroed(m, part, pruned)
    ctl = attach(m, part)
    ctl.set_pruned(pruned)
    ctl.set_active(active)
    _loss(ref, x).backward()
    _loss(m, x).backward()
    _check_grads(m, ref, part, active & ~pruned)
    assert "dense" not in SF._KERNEL_CHOICE.values()


def _conv_flops(monkeypatch, kernel: str) -> int:
    monkeypatch.setenv("NTKIT_CONV_WGRAD", kernel)
    m, part, x = _cnn()
    attach(m, part).set_active(_half(len(part), 1))
    y = _loss(m, x)
    return _flops(y.backward)


def test_conv_kernel_flops_follow_what_ran(monkeypatch) -> None:
    """``native`` and ``gemm`` execute the same FLOPs; ``dense`` executes (and is charged) the
    inactive filters' weight gradient too."""
    native, gemm, dense = (_conv_flops(monkeypatch, k) for k in ("native", "gemm", "dense"))
    monkeypatch.delenv("NTKIT_CONV_WGRAD")
    m, _, x = _cnn()
    full = _flops(_loss(m, x).backward)
    assert native == gemm < dense == full


@pytest.mark.parametrize("setting", ["tune", "tune-dense"])
def test_conv_kernel_tune_candidates(monkeypatch, setting: str) -> None:
    """``tune`` (the default) chooses between the two kernels of equal FLOPs; ``tune-dense`` also
    weighs the full backward."""
    from ntkit.sparse import _functions as SF

    if setting == "tune":
        monkeypatch.delenv("NTKIT_CONV_WGRAD", raising=False)
    else:
        monkeypatch.setenv("NTKIT_CONV_WGRAD", setting)
    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(SF, "_fastest", lambda fns, prefer: (seen.append(tuple(fns)), prefer)[1])
    m, part, x = _cnn()
    attach(m, part).set_active(_half(len(part), 1))
    _loss(m, x).backward()
    want = ("native", "gemm") if setting == "tune" else ("native", "gemm", "dense")
    assert seen == [want] * 3


def test_conv_kernel_tune_tells_apart_convolutions_of_equal_shapes(monkeypatch) -> None:
    """Two layers with the same input, weight and output shapes but another padding and dilation
    are two problems: each is timed."""
    from ntkit.sparse import _functions as SF

    monkeypatch.delenv("NTKIT_CONV_WGRAD", raising=False)
    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    monkeypatch.setattr(SF, "_KEY_MEMO", {})
    timed: list[int] = []
    monkeypatch.setattr(SF, "_fastest", lambda fns, prefer: (timed.append(1), prefer)[1])
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    part = P.conv_filters(m)
    attach(m, part).set_active(torch.arange(len(part)) % 2 == 0)  # filters 0 and 2 of each layer
    x = torch.randn(2, 4, 8, 8, requires_grad=True)  # both layers then see [2, 4, 8, 8] and give 8×8
    _loss(m, x).backward()
    assert len(timed) == 2 and len(SF.conv_kernel_choices()) == 2


def test_conv_kernel_tune_times_once_outside_a_flop_counter(monkeypatch) -> None:
    """``tune-dense`` times the candidates once per problem, outside any dispatch mode: a
    FlopCounterMode around the first backward counts the chosen kernels once, as a forced setting
    of the same choice would, and later backwards reuse the choice without timing."""
    from ntkit.sparse import _functions as SF

    monkeypatch.setenv("NTKIT_CONV_WGRAD", "tune-dense")
    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    picks = iter(["dense", "gemm", "native"] * 2)
    timed: list[tuple[str, ...]] = []

    def fake_fastest(fns, prefer):
        timed.append(tuple(fns))
        for fn in fns.values():  # run every trial, as the real one does: the counter must not see them
            fn()
        return next(picks)

    monkeypatch.setattr(SF, "_fastest", fake_fastest)
    m, part, x = _cnn()
    attach(m, part).set_active(_half(len(part), 1))
    y = _loss(m, x)
    counted = _flops(y.backward)
    assert timed == [("native", "gemm", "dense")] * 3  # three conv layers, each timed once
    assert sorted(SF._KERNEL_CHOICE.values()) == ["dense", "gemm", "native"]
    _loss(m, x).backward()
    assert len(timed) == 3  # no new timing
    # the last layer (first in the backward) went dense: its inactive filters' FLOPs were counted,
    # and nothing of the trials
    c = m[6]
    inactive = int((~_half(len(part), 1))[-c.out_channels:].sum())
    extra = 2 * x.shape[0] * 4 * 4 * c.in_channels * 9 * inactive  # its inactive filters' weight gradient (4×4 output)
    assert inactive and counted == _conv_flops(monkeypatch, "native") + extra


def test_conv_kernel_fastest_prefers_native_near_a_tie() -> None:
    """``_fastest`` keeps ``native`` unless another kernel is faster by more than the margin."""
    import time

    from ntkit.sparse._functions import _fastest

    def sleeper(s: float):
        return lambda: time.sleep(s)

    assert _fastest({"native": sleeper(0.010), "dense": sleeper(0.004)}, prefer="native") == "dense"
    assert _fastest({"native": sleeper(0.004), "dense": sleeper(0.010)}, prefer="native") == "native"
    assert _fastest({"native": sleeper(0.010), "dense": sleeper(0.010)}, prefer="native", margin=0.5) == "native"


def test_conv_kernel_choices_round_trip_and_are_checked(monkeypatch) -> None:
    from ntkit.sparse import _functions as SF
    from ntkit.sparse import conv_kernel_choices, load_conv_kernel_choices

    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    monkeypatch.setenv("NTKIT_CONV_WGRAD", "tune-dense")
    m, part, x = _cnn()
    attach(m, part).set_active(_half(len(part), 1))
    _loss(m, x).backward()
    saved = conv_kernel_choices()
    assert len(saved) == 3 and set(saved.values()) <= {"native", "gemm", "dense"}
    monkeypatch.setattr(SF, "_KERNEL_CHOICE", {})
    monkeypatch.setattr(SF, "_fastest", lambda fns, prefer: pytest.fail("a loaded choice must not be timed again"))
    load_conv_kernel_choices(saved)
    m, part, x = _cnn()
    attach(m, part).set_active(_half(len(part), 1))
    _loss(m, x).backward()
    with pytest.raises(ConfigError, match=r"^conv kernel choices: unknown kernel 'fast'$"):
        load_conv_kernel_choices({"k": "fast"})


def test_conv_kernel_setting_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("NTKIT_CONV_WGRAD", "fast")
    m, part, x = _cnn()
    attach(m, part).set_active(_half(len(part), 1))
    with pytest.raises(ConfigError, match=r"^NTKIT_CONV_WGRAD='fast': expected one of tune, tune-dense, native, gemm, dense$"):
        _loss(m, x).backward()


# ------------------------------------------------------------------------------------ index sets
@pytest.mark.parametrize(
    "index, block",
    [([2, 3, 4], 1), ([0, 1, 4, 5, 10, 11], 2), ([4, 5, 6, 7, 12, 13, 14, 15], 4), ([1, 3, 4, 9], 1), ([], 1),
     ([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15], 4), (list(range(16)), 1)],
)
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("rows", [3, 8192], ids=["small", "large"])  # large: blocked sets copy runs
def test_idx_take_put_match_index_select(index: list[int], block: int, dim: int, rows: int) -> None:
    from ntkit.sparse._functions import Idx

    size = 16
    idx = Idx(torch.tensor(index, dtype=torch.long), size)
    assert idx.block == block or idx.contiguous
    shape = [rows, 3]
    shape[dim] = size
    t = torch.randn(shape)
    ref = t.index_select(dim, torch.tensor(index, dtype=torch.long))
    assert torch.equal(idx.take(t, dim), ref)
    out = torch.zeros(shape)
    idx.put(out, dim, ref)
    want = torch.zeros(shape).index_copy_(dim, torch.tensor(index, dtype=torch.long), ref)
    assert torch.equal(out, want)
    # scatter: a fresh tensor with zeros outside the set (written once, no zero fill first)
    assert torch.equal(idx.scatter(ref, dim, shape), want)
    rest = idx.complement()
    assert sorted(rest.index.tolist()) == sorted(set(range(size)) - set(index))


@pytest.mark.parametrize("index", [[2, 3, 4], [0, 1, 4, 5, 10, 11], [1, 3, 4, 9], [], list(range(16))])
@pytest.mark.parametrize("dim", [0, 1, 2, -3])
@pytest.mark.parametrize("src_cl", [True, False])
def test_idx_on_channels_last_tensors(index: list[int], dim: int, src_cl: bool) -> None:
    """take / put / scatter / zero on NHWC 4-D tensors (filters: dim 0, channels: dim 1) equal the
    plain index ops, and results keep the channels-last layout."""
    from ntkit.sparse._functions import Idx, _channels_last

    cl, size = torch.channels_last, 16
    idx, ix = Idx(torch.tensor(index, dtype=torch.long), size), torch.tensor(index, dtype=torch.long)
    shape = [3, 5, 4, 2]
    shape[dim] = size
    t = torch.randn(shape).contiguous(memory_format=cl)
    ref = t.index_select(dim, ix)
    got = idx.take(t, dim)
    assert torch.equal(got, ref)
    if index and not idx.contiguous and dim % 4 in (0, 1):
        assert got.is_contiguous(memory_format=cl) and not got.is_contiguous()
    src = ref.contiguous(memory_format=cl if src_cl else torch.contiguous_format)
    want = torch.zeros(shape).index_copy_(dim, ix, ref)
    out = torch.zeros(shape).contiguous(memory_format=cl)
    assert torch.equal(idx.put(out, dim, src), want) and out.is_contiguous(memory_format=cl)
    sc = idx.scatter(src, dim, shape)
    assert torch.equal(sc, want)
    assert sc.is_contiguous(memory_format=cl if _channels_last(src) else torch.contiguous_format)
    full = torch.randn(shape).contiguous(memory_format=cl)
    assert torch.equal(idx.zero(full.clone(memory_format=cl), dim), full.index_fill(dim, ix, 0))


def test_layer_with_custom_forward_is_not_sliced() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    m = nn.Sequential(Scaled(4, 6))
    rows = Partition.from_slices({"a": [("0.weight", 0, range(3))], "b": [("0.weight", 0, range(3, 6))]})
    with pytest.raises(UnsupportedModelError, match="0.weight"):
        attach(m, rows)
    whole = Partition.from_slices({"a": [("0.weight", 0, None)]})
    ctl = attach(m, whole)
    assert type(m[0]) is Scaled
    ctl.set_active([False])
    assert not m[0].weight.requires_grad


def test_tied_parameter_cannot_be_sliced() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    m = nn.Sequential(a, b)
    rows = Partition.from_slices({"x": [("0.weight", 0, range(2))], "y": [("0.weight", 0, range(2, 4))]})
    with pytest.raises(UnsupportedModelError, match="tied"):
        attach(m, rows)


@pytest.mark.parametrize(
    "name, kw, builder",
    [
        ("bert_mlm", {"size": "tiny", "vocab_size": 50, "dropout": 0.0}, P.attention_heads),
        ("switch_mlm", {"size": "tiny", "vocab_size": 50, "dropout": 0.0}, P.auto),
        ("vgg16", {"width": 0.0625}, P.conv_filters),
        ("vgg16", {"width": 0.0625, "channels_last": True}, P.conv_filters),
        ("resnet56", {"width": 0.5, "channels_last": True}, P.conv_filters),
    ],
)
def test_model_zoo_partial_grads(name: str, kw: dict, builder) -> None:
    from ntkit.models import build_model

    kw = dict(kw)
    fmt = torch.channels_last if kw.pop("channels_last", False) else torch.contiguous_format
    m = build_model(name, **kw).double().eval().to(memory_format=fmt)
    x = torch.randint(50, (2, 6)) if "mlm" in name else torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = copy.deepcopy(m)
    part = builder(m)
    _loss(ref, x).backward()
    ctl = attach(m, part)
    active = _half(len(part), 5)
    ctl.set_active(active)
    _loss(m, x).backward()
    _check_grads(m, ref, part, active)
