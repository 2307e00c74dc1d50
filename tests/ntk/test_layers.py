"""Shared layer helpers (ntkit.ntk._layers): conv geometry and unfolding against PyTorch's own
convolution, and the one sample-independence check behind modular_ntk and empirical_ntk."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkit.errors import UnsupportedModelError
from ntkit.models.layers import MultiHeadSelfAttention, SwitchFFN
from ntkit.ntk import empirical_ntk, modular_ntk
from ntkit.ntk._layers import check_independent, conv_output_hw, conv_padding, conv_padding_hw, unfold
from ntkit.partition import layers

# (kernel, stride, dilation, padding): explicit, "valid" and "same" (odd and even d·(k−1))
CONVS = [
    *itertools.product([1, 3, (2, 3)], [1, 2], [1, 2], [0, 1, (1, 2), "valid"]),
    *itertools.product([3, 2, (2, 3), (4, 1)], [1], [1, 2, 3], ["same"]),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("k, stride, dil, pad", CONVS)
def test_unfold_matches_convolution_float64(k, stride, dil, pad) -> None:
    conv = nn.Conv2d(3, 4, k, stride=stride, dilation=dil, padding=pad).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    y = conv(x)
    assert conv_output_hw(conv, 9, 8) == tuple(y.shape[-2:])
    u = unfold(x, conv)  # [N, C·kh·kw, L]
    assert u.shape == (2, 3 * conv.kernel_size[0] * conv.kernel_size[1], y.shape[-2] * y.shape[-1])
    assert torch.equal(u, F.unfold(F.pad(x, conv_padding(conv)), conv.kernel_size, conv.dilation, 0, conv.stride))
    via = conv.weight.flatten(1) @ u + conv.bias[:, None]
    torch.testing.assert_close(via.view_as(y), y, rtol=1e-12, atol=1e-12)
    le, r, t, b = conv_padding(conv)
    if (le, t) == (r, b):
        assert conv_padding_hw(conv) == (t, le)
        assert torch.equal(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv_padding_hw(conv), conv.dilation), y)
    else:
        with pytest.raises(ValueError, match="asymmetric"):
            conv_padding_hw(conv)


def test_unfold_is_differentiable_float64() -> None:
    conv = nn.Conv2d(2, 1, 3, stride=2, padding=1, dilation=1).double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unfold(t, conv), (x,))
    assert torch.autograd.gradgradcheck(lambda t: unfold(t, conv) ** 2, (x,))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "bad, why",
    [
        (nn.BatchNorm1d(4), "BatchNorm using batch statistics"),
        (nn.BatchNorm1d(4, track_running_stats=False).eval(), "BatchNorm using batch statistics"),
        (nn.Dropout(0.1), "active dropout p=0.1"),
        (nn.AlphaDropout(0.2), "active dropout p=0.2"),
        (MultiHeadSelfAttention(4, 2, dropout=0.1), "attention dropout=0.1"),
        (nn.MultiheadAttention(4, 2, dropout=0.1), "attention dropout=0.1"),
        (SwitchFFN(4, 8, 2), "expert capacity"),
    ],
)
def test_check_independent_names_module_and_caller(bad: nn.Module, why: str) -> None:
    model = _mlp()
    model.add_module("odd", bad)
    with pytest.raises(UnsupportedModelError, match=rf"module odd \({type(bad).__name__}\): {why}.*before my_fn"):
        check_independent(model, "my_fn")
    if not isinstance(bad, nn.BatchNorm1d) or bad.track_running_stats:
        bad.eval()
        check_independent(model, "my_fn")  # eval mode: fine
        assert not model.odd.training  # nothing switched back
        bad.train()
        assert model.odd.training


def test_both_entry_points_refuse_the_same_way() -> None:
    """modular_ntk and empirical_ntk share the check (same reason, their own name)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    with pytest.raises(UnsupportedModelError, match=r"module 1 \(Dropout\): active dropout.*before modular_ntk"):
        modular_ntk(model, x, layers(model))
    with pytest.raises(UnsupportedModelError, match=r"module 1 \(Dropout\): active dropout.*before empirical_ntk"):
        empirical_ntk(model, x)
    model[1].p = 0.0  # harmless in training mode
    assert empirical_ntk(model, x).shape == (4, 4)
    assert modular_ntk(model, x, layers(model)).grams.shape == (2, 2, 2)
