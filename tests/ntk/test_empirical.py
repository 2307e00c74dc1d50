"""Full empirical NTK: both implementations against a brute-force per-logit Jacobian (float64),
masks and parameter overrides, second-order differentiability (gradcheck), and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.ntk.empirical import NTKImplementation, empirical_ntk, explain_empirical_ntk

# 'same' padding with an even kernel is deliberate (asymmetric padding); torch warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

IMPLS = ["structured", "jacobian"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5, bias=False), nn.Tanh(), nn.Linear(5, 3))


def _cnn() -> nn.Module:
    # in-place ReLU after a conv exercises the copy-on-record path; 'same' with an even kernel
    # exercises asymmetric padding; stride 2 and a bias-free conv are covered too.
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 2, padding="same", bias=False),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, stride=2, dilation=1),
        nn.Flatten(),
        nn.Linear(3, 4),
    )


class _Attn(nn.Module):
    """Not structured-eligible (LayerNorm parameters, 3-D Linear inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # [N, T, 4] → [N, 2]
        h = torch.softmax(self.lin(self.norm(x)) @ x.transpose(1, 2), -1) @ x
        return self.head(h.mean(1))


MODELS = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (2, 8, 8))}


def _brute_ntk(model: nn.Module, x1: Tensor, x2: Tensor, masks: dict[str, Tensor] | None = None) -> Tensor:
    """Σ_θ J1 J2ᵀ from one autograd.grad per (sample, logit), w.r.t. raw parameters of
    x ↦ f(x; m ⊙ θ) (so each Jacobian column is scaled by the mask)."""
    masks = masks or {}
    eff = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in eff.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    names = [n for n, _ in eff.named_parameters()]
    ps = [p for _, p in eff.named_parameters()]

    def jac(x: Tensor) -> Tensor:
        out = eff(x).reshape(x.shape[0], -1)
        rows = []
        for i in range(out.shape[0]):
            for a in range(out.shape[1]):
                gs = torch.autograd.grad(out[i, a], ps, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([
                    (torch.zeros_like(p) if g is None else g * masks.get(n, 1.0)).reshape(-1)
                    for n, p, g in zip(names, ps, gs)
                ]))
        return torch.stack(rows)

    return jac(x1) @ jac(x2).T


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _random_masks(model: nn.Module, with_bias: bool = True) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = {}
    for n, p in model.named_parameters():
        if n.endswith("weight") or with_bias:
            masks[n] = (torch.rand(p.shape, generator=g) > 0.5).to(p.dtype)
    return masks


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_brute_force(impl: str, arch: str, cross: bool, masked: bool) -> None:
    build, shape = MODELS[arch]
    model = build().double()
    x1 = torch.randn(4, *shape, dtype=torch.float64)
    x2 = torch.randn(3, *shape, dtype=torch.float64) if cross else None
    masks = _random_masks(model) if masked else None
    theta = empirical_ntk(model, x1, x2, masks=masks, implementation=impl)
    ref = _brute_ntk(model, x1, x1 if x2 is None else x2, masks)
    k = model(x1).shape[1]
    assert theta.shape == (4 * k, (3 if cross else 4) * k)
    assert theta.dtype == torch.float64
    assert _rel(theta, ref) <= 1e-10
    assert not theta.requires_grad


def test_structured_linear_mask_weight_only() -> None:
    """Weight masked, bias unmasked: the masked-Gram form plus the plain bias Gram."""
    model = _mlp().double()
    x1 = torch.randn(5, 6, dtype=torch.float64)
    masks = _random_masks(model, with_bias=False)
    ref = _brute_ntk(model, x1, x1, masks)
    assert _rel(empirical_ntk(model, x1, masks=masks, implementation="structured"), ref) <= 1e-10


def test_float32_close_to_float64() -> None:
    model = _cnn()
    x = torch.randn(3, 2, 8, 8)
    t32 = empirical_ntk(model, x)
    t64 = empirical_ntk(model.double(), x.double())
    assert t32.dtype == torch.float32
    assert _rel(t32.double(), t64) <= 1e-4


def test_auto_picks_structured_for_mlp_cnn_and_jacobian_otherwise() -> None:
    for arch, (build, shape) in MODELS.items():
        plan = explain_empirical_ntk(build().double(), torch.randn(2, *shape, dtype=torch.float64))
        assert plan.implementation is NTKImplementation.STRUCTURED, arch
        assert set(plan.layers.values()) <= {"linear-gram", "conv-per-sample"}
    mlp = _mlp().double()
    plan = explain_empirical_ntk(mlp, torch.randn(2, 6, dtype=torch.float64), masks=_random_masks(mlp))
    assert set(plan.layers.values()) == {"linear-masked-gram"}
    plan = explain_empirical_ntk(_Attn().double(), torch.randn(2, 3, 4, dtype=torch.float64))
    assert plan.implementation is NTKImplementation.JACOBIAN
    assert "LayerNorm" in plan.reason


def test_auto_falls_back_and_matches_brute_force() -> None:
    model = _Attn().double()
    x1 = torch.randn(3, 3, 4, dtype=torch.float64)
    x2 = torch.randn(2, 3, 4, dtype=torch.float64)
    assert _rel(empirical_ntk(model, x1, x2), _brute_ntk(model, x1, x2)) <= 1e-10
    with pytest.raises(UnsupportedModelError, match="structured"):
        empirical_ntk(model, x1, x2, implementation="structured")


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def test_layer_called_twice_uses_generic_path() -> None:
    model = _Twice().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    plan = explain_empirical_ntk(model, x)
    assert plan.implementation is NTKImplementation.JACOBIAN and "called 2 times" in plan.reason
    assert _rel(empirical_ntk(model, x), _brute_ntk(model, x, x)) <= 1e-10


class _NumpyTanh(torch.autograd.Function):
    """tanh whose backward leaves torch (no vmap rule): the batched signal backward fails."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.from_numpy(g.numpy() * (1 - y.numpy() ** 2))


class _NumpyAct(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _NumpyTanh.apply(x)


def test_structured_falls_back_to_one_backward_per_logit() -> None:
    model = nn.Sequential(nn.Linear(4, 5), _NumpyAct(), nn.Linear(5, 3)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # the batched backward really fails here
        out = model(x)
        torch.autograd.grad(out, x.requires_grad_(), torch.eye(3, dtype=torch.float64)[:, None].expand(3, 3, 3),
                            is_grads_batched=True)
    x = x.detach()
    theta = empirical_ntk(model, x, implementation="structured")
    assert _rel(theta, _brute_ntk(model, x, x)) <= 1e-10


def test_params_override_equals_model_with_those_weights() -> None:
    model = _cnn().double()
    other = _cnn().double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    over = dict(other.named_parameters())
    ref = empirical_ntk(other, x)
    for impl in IMPLS:
        assert _rel(empirical_ntk(model, x, params=over, implementation=impl), ref) <= 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_masks_act_on_forward_and_jacobian(impl: str) -> None:
    """Θ(masks=m) is the NTK of x ↦ f(x; m ⊙ θ) w.r.t. θ: it equals the masked kernel of the
    model whose weights already are m ⊙ θ (the forward part), which differs from that model's
    unmasked kernel (pruned weights' Jacobian columns are dropped); all-ones masks change nothing."""
    model = _cnn().double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    masks = _random_masks(model, with_bias=False)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in pruned.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    theta = empirical_ntk(model, x, masks=masks, implementation=impl)
    assert _rel(theta, empirical_ntk(pruned, x, masks=masks, implementation=impl)) <= 1e-12
    assert _rel(theta, empirical_ntk(pruned, x, implementation=impl)) > 1e-3
    ones = {n: torch.ones_like(m) for n, m in masks.items()}
    assert _rel(empirical_ntk(model, x, masks=ones, implementation=impl), empirical_ntk(model, x)) <= 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_gradcheck_kernel_loss(impl: str, arch: str) -> None:
    """d/dθ̃ ‖Θ(m ⊙ θ̃) − Θ₀‖² (NTT's kernel term) is exact: gradcheck in float64 on a tiny model."""
    torch.manual_seed(3)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        x1, x2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)).double()
        x1, x2 = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    masks = {n: (torch.rand(s) > 0.3).double() for n, s in zip(names, shapes) if n.endswith("weight")}
    theta0 = 0.5 * empirical_ntk(model, x1, x2)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_(True)

    def loss(v: Tensor) -> Tensor:
        ps, o = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = v[o : o + s.numel()].view(s)
            o += s.numel()
        th = empirical_ntk(model, x1, x2, params=ps, masks=masks, create_graph=True, implementation=impl)
        return ((th - theta0) ** 2).sum()

    assert torch.autograd.gradcheck(loss, (flat,))


def test_create_graph_grads_agree_between_implementations() -> None:
    model = _cnn().double()
    x1, x2 = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    masks = _random_masks(model, with_bias=False)
    grads = []
    for impl in IMPLS:
        th = empirical_ntk(model, x1, x2, masks=masks, create_graph=True, implementation=impl)
        assert th.requires_grad
        grads.append(torch.autograd.grad((th**2).sum(), list(model.parameters()), allow_unused=True))
    for gs, gj in zip(*grads):
        if gs is None or gj is None:
            assert (gs is None or gs.abs().max() == 0) and (gj is None or gj.abs().max() == 0)
        else:
            assert _rel(gs, gj) <= 1e-10


def test_frozen_parameters_still_counted() -> None:
    model = _mlp().double()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 6, dtype=torch.float64)
    ref = _brute_ntk(_unfreeze(model), x, x)
    for impl in IMPLS:
        assert _rel(empirical_ntk(model, x, implementation=impl), ref) <= 1e-10


def _unfreeze(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def test_refuses_training_mode_dropout_and_batchnorm() -> None:
    drop = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match="Dropout"):
        empirical_ntk(drop, torch.randn(2, 3))
    with pytest.raises(UnsupportedModelError, match="BatchNorm2d"):
        empirical_ntk(bn, torch.randn(2, 1, 4, 4))
    assert empirical_ntk(drop.eval(), torch.randn(2, 3)).shape == (4, 4)
    plan = explain_empirical_ntk(bn.eval(), torch.randn(2, 1, 4, 4))
    assert plan.implementation is NTKImplementation.JACOBIAN  # BatchNorm affine parameters


def test_bad_arguments_name_the_field() -> None:
    model = _mlp()
    x = torch.randn(2, 6)
    with pytest.raises(ConfigError, match="implementation='fast'"):
        empirical_ntk(model, x, implementation="fast")
    with pytest.raises(ConfigError, match="masks"):
        empirical_ntk(model, x, masks={"nope.weight": torch.ones(1)})
    with pytest.raises(ConfigError, match=r"masks\['0.weight'\].shape"):
        empirical_ntk(model, x, masks={"0.weight": torch.ones(2, 2)})
    with pytest.raises(ConfigError, match="x2"):
        empirical_ntk(model, x, torch.randn(2, 5))


def test_zoo_models_structured_matches_jacobian() -> None:
    """The NTT models from the zoo (when present) take the structured path and agree with the
    generic one; Conv-4's dropout requires eval mode."""
    models = pytest.importorskip("ntkit.models")
    for name, shape in [("lenet300_100", (1, 28, 28)), ("lenet5_caffe", (1, 28, 28)), ("conv4", (3, 16, 16))]:
        try:
            model = models.build_model(name, **({"image_size": 16} if name == "conv4" else {}))
        except ConfigError:
            pytest.skip(f"zoo model {name} not registered")
        model = model.double().eval()
        x1 = torch.randn(2, *shape, dtype=torch.float64)
        x2 = torch.randn(2, *shape, dtype=torch.float64)
        masks = {n: (p.detach().abs() > p.detach().abs().median()).double()
                 for n, p in model.named_parameters() if n.endswith("weight")}
        assert explain_empirical_ntk(model, x1, x2).implementation is NTKImplementation.STRUCTURED
        ts = empirical_ntk(model, x1, x2, masks=masks, implementation="structured")
        tj = empirical_ntk(model, x1, x2, masks=masks, implementation="jacobian")
        assert _rel(ts, tj) <= 1e-10, name
