"""The model zoo: every registered model builds, runs forward + backward, and matches its spec."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkit.errors import ConfigError
from ntkit.models import (
    BERT_SIZES,
    BertConfig,
    SwitchFFN,
    TransformerBlock,
    build_model,
    list_models,
    mlm_loss,
)

V, T = 50, 12

# Small settings + an input factory per registered model. Every registered model must appear here.
CASES: dict[str, tuple[dict, Callable[[], torch.Tensor]]] = {
    "bert_mlm": ({"vocab_size": V, "max_len": 16}, lambda: torch.randint(0, V, (2, T))),
    # 4·16 tokens so that every expert of every block receives some at init (seeded by conftest)
    "switch_mlm": ({"vocab_size": V, "max_len": 16}, lambda: torch.randint(0, V, (4, 16))),
    "vgg16": ({"width": 0.125}, lambda: torch.randn(2, 3, 32, 32)),
    "resnet56": ({"width": 0.25}, lambda: torch.randn(2, 3, 32, 32)),
    "lenet300_100": ({}, lambda: torch.randn(2, 1, 28, 28)),
    "lenet5_caffe": ({}, lambda: torch.randn(2, 1, 28, 28)),
    "conv4": ({}, lambda: torch.randn(2, 3, 32, 32)),
    "vit_tiny": ({}, lambda: torch.randn(2, 1, 8, 8)),
}


def test_every_registered_model_has_a_case():
    assert sorted(CASES) == list_models()


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_all_params_get_grads(name):
    kw, make_input = CASES[name]
    model = build_model(name, **kw)
    model.train()
    x = make_input()
    out = model(x)
    if name.endswith("_mlm"):
        assert out.shape == (*x.shape, V)
    else:
        assert out.shape == (x.shape[0], 10)
    loss = out.square().mean() + model.aux_loss()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no grad for {missing[:5]}"
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n
    # something non-trivial flowed to every tensor (a zero grad everywhere would hide a broken path)
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"{name}: all-zero grads for {zero[:5]}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_is_deterministic_given_seed(name):
    kw, _ = CASES[name]
    torch.manual_seed(123)
    a = build_model(name, **kw).state_dict()
    torch.manual_seed(123)
    b = build_model(name, **kw).state_dict()
    torch.manual_seed(124)
    c = build_model(name, **kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name", ["vgg16", "resnet56", "lenet300_100", "lenet5_caffe", "conv4"])
def test_eval_mode_samples_are_independent(name):
    """In eval mode (BN running stats, no dropout) sample i's logits depend on sample i only —
    what the mNTK engine requires."""
    kw, make_input = CASES[name]
    model = build_model(name, **kw).eval()
    x = make_input()
    with torch.no_grad():
        both = model(x)
        one = model(x[:1])
    torch.testing.assert_close(both[:1], one, rtol=1e-5, atol=1e-6)


def test_image_models_accept_mnist_and_cifar_shapes():
    mnist, cifar = torch.randn(2, 1, 28, 28), torch.randn(2, 3, 32, 32)
    assert build_model("vgg16", in_channels=1, width=0.125)(mnist).shape == (2, 10)
    assert build_model("resnet56", in_channels=1, width=0.25, num_classes=3)(mnist).shape == (2, 3)
    assert build_model("lenet300_100", in_channels=3, image_size=32)(cifar).shape == (2, 10)
    assert build_model("lenet5_caffe", in_channels=3, image_size=32)(cifar).shape == (2, 10)
    assert build_model("conv4", in_channels=1, image_size=28)(mnist).shape == (2, 10)
    assert build_model("vit_tiny", image_size=28, patch_size=7)(mnist).shape == (2, 10)


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_vgg16_architecture():
    model = build_model("vgg16")
    convs = _convs(model)
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 10)]
    half = build_model("vgg16", width=0.5)
    assert [c.out_channels for c in _convs(half)][:3] == [32, 32, 64]


def test_resnet56_architecture():
    model = build_model("resnet56")
    convs = _convs(model)
    three_by_three = [c for c in convs if c.kernel_size == (3, 3)]
    shortcuts = [c for c in convs if c.kernel_size == (1, 1)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(three_by_three) + len(linears) == 56  # the "56" weight layers
    assert len(shortcuts) == 2  # stage 2 and 3 down-sampling
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)


def test_ntt_models_match_seed_003():
    lenet = build_model("lenet300_100")
    assert [(m.in_features, m.out_features) for m in (lenet.fc1, lenet.fc2, lenet.fc3)] == [
        (784, 300), (300, 100), (100, 10)
    ]
    l5 = build_model("lenet5_caffe")
    assert (l5.conv1.out_channels, l5.conv1.kernel_size, l5.conv2.out_channels, l5.conv2.kernel_size) == (
        20, (5, 5), 50, (5, 5)
    )
    assert (l5.fc1.in_features, l5.fc1.out_features, l5.fc2.out_features) == (800, 500, 10)
    c4 = build_model("conv4")
    assert [c.out_channels for c in _convs(c4)] == [64, 64, 128, 128]
    assert (c4.fc1.in_features, c4.fc1.out_features, c4.fc2.out_features) == (128 * 6 * 6, 512, 10)
    assert [d.p for d in (c4.drop1, c4.drop2, c4.drop3)] == [0.25, 0.25, 0.5]


def test_ntt_models_use_glorot_normal_init():
    torch.manual_seed(0)
    w = build_model("lenet300_100").fc1.weight
    expected = math.sqrt(2.0 / (784 + 300))
    assert abs(w.std().item() / expected - 1) < 0.02
    assert abs(w.mean().item()) < 3 * expected / math.sqrt(w.numel())


def test_bert_sizes_follow_the_table():
    expected = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8),
                "base": (12, 768, 12), "large": (24, 1024, 16)}
    assert BERT_SIZES == expected
    for size, (n_layers, hidden, heads) in expected.items():
        c = BertConfig.from_size(size)
        assert (c.num_layers, c.d_model, c.num_heads, c.d_ff) == (n_layers, hidden, heads, 4 * hidden)
    model = build_model("bert_mlm", size="mini", vocab_size=V)
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    assert len(blocks) == 4
    assert blocks[0].attn.num_heads == 4 and blocks[0].attn.qkv.weight.shape == (3 * 256, 256)
    assert blocks[0].ffn.fc1.weight.shape == (1024, 256)


def test_bert_init_is_bert_style():
    torch.manual_seed(0)
    model = build_model("bert_mlm", size="mini", vocab_size=1000)
    w = model.blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.001
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.emb_ln.weight == 1) and torch.all(model.emb_ln.bias == 0)


def test_tied_and_untied_embeddings():
    tied = build_model("bert_mlm", vocab_size=V)
    assert tied.head.decoder.weight is tied.tok_emb.weight
    names = [n for n, _ in tied.named_parameters()]
    assert "tok_emb.weight" in names and "head.decoder.weight" not in names
    untied = build_model("bert_mlm", vocab_size=V, tie_embeddings=False)
    assert untied.head.decoder.weight is not untied.tok_emb.weight
    n_params = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n_params == V * 128


def test_bert_forward_matches_manual_composition_float64():
    """The BERT forward is embeddings+LN → blocks → dense/GELU/LN → tied decoder, checked by
    composing the pieces by hand in float64."""
    model = build_model("bert_mlm", vocab_size=V, max_len=16).double().eval()
    ids = torch.randint(0, V, (3, T))
    with torch.no_grad():
        out = model(ids)
        e = model.tok_emb.weight[ids] + model.pos_emb.weight[:T]
        h = F.layer_norm(e, (128,), model.emb_ln.weight, model.emb_ln.bias, model.emb_ln.eps)
        for blk in model.blocks:
            h = blk(h)
        z = F.gelu(h @ model.head.dense.weight.T + model.head.dense.bias)
        z = F.layer_norm(z, (128,), model.head.ln.weight, model.head.ln.bias, model.head.ln.eps)
        ref = z @ model.tok_emb.weight.T + model.head.decoder.bias
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_key_padding_mask_hides_padding():
    model = build_model("bert_mlm", vocab_size=V, max_len=16).eval()
    ids = torch.randint(0, V, (2, T))
    pad = torch.zeros(2, T, dtype=torch.bool)
    pad[:, 8:] = True
    other = ids.clone()
    other[:, 8:] = (ids[:, 8:] + 7) % V
    with torch.no_grad():
        a = model(ids, key_padding_mask=pad)
        b = model(other, key_padding_mask=pad)
        c = model(other)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, :8], c[:, :8])


def test_input_longer_than_max_len_is_a_config_error():
    model = build_model("bert_mlm", vocab_size=V, max_len=8)
    with pytest.raises(ConfigError, match="max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_mlm_loss_matches_brute_force_float64():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 2, 6, 0
    picked = [(0, 1), (1, 3), (1, 4)]
    ref = -sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b, t in picked) / len(picked)
    torch.testing.assert_close(mlm_loss(logits, labels), ref, rtol=1e-12, atol=1e-12)


def test_mlm_loss_without_targets_is_zero_and_differentiable():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 5), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_switch_aux_loss_sums_the_blocks():
    model = build_model("switch_mlm", vocab_size=V, max_len=16, num_experts=3)
    moe = [m for m in model.modules() if isinstance(m, SwitchFFN)]
    assert len(moe) == 2 and all(len(m.experts) == 3 for m in moe)
    model(torch.randint(0, V, (2, T)))
    total = model.aux_loss()
    torch.testing.assert_close(total, moe[0].aux_loss + moe[1].aux_loss)
    assert total.item() > 0
    assert build_model("bert_mlm", vocab_size=V).aux_loss().item() == 0.0


def test_switch_moe_every_other_block():
    model = build_model("switch_mlm", size="mini", vocab_size=V, moe_every=2)
    kinds = [isinstance(b.ffn, SwitchFFN) for b in model.blocks]
    assert kinds == [False, True, False, True]


def test_build_model_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="model='nope'"):
        build_model("nope")
    with pytest.raises(ConfigError, match="model='vgg16'.*depth"):
        build_model("vgg16", depth=3)
    with pytest.raises(ConfigError, match="size='huge'"):
        build_model("bert_mlm", size="huge")
    with pytest.raises(ConfigError, match="width=0"):
        build_model("vgg16", width=0)
    with pytest.raises(ConfigError, match="num_experts=0"):
        build_model("switch_mlm", num_experts=0)
    with pytest.raises(ConfigError, match="patch_size=3"):
        build_model("vit_tiny", patch_size=3)


@pytest.mark.parametrize(
    ("name", "kw", "published"),
    [
        # HF BertForMaskedLM(bert-base-uncased) = 109,514,298 incl. 2·768 token-type embeddings we don't have
        ("bert_mlm", {"size": "base", "vocab_size": 30522, "max_len": 512}, 109_514_298 - 2 * 768),
        ("vgg16", {}, 14_728_266),  # CIFAR VGG-16-BN, 10 classes (the usual "14.7M")
        # CIFAR ResNet-56 with identity/zero-pad shortcuts = 853,018; + two 1×1 conv+BN shortcuts
        ("resnet56", {}, 853_018 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)),
        ("lenet300_100", {}, 266_610),
        ("lenet5_caffe", {}, 431_080),
    ],
)
def test_parameter_counts_match_published_models(name, kw, published):
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(name, **kw)
    assert sum(p.numel() for p in model.parameters()) == published


def test_mlm_loss_works_under_vmap_per_sample():
    """Per-sample losses via torch.func.vmap equal the loss of each sample alone."""
    logits = torch.randn(3, 4, 6, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2, -100], [-100, -100, -100, -100], [5, 0, -100, 3]])
    per = torch.func.vmap(mlm_loss)(logits, labels)
    ref = torch.stack([mlm_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    assert per[1].item() == 0.0
