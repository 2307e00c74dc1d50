"""The engine on timm models (ViT, ResNet) built without pretrained weights: exact against brute
force in float64, hooked throughout, and timm's fused-QKV ViT attention split per head by its
declaration in :mod:`ntkit.structure`.

timm is installed with ``--no-deps`` (its torchvision dependency would pull a CUDA torch); it is
imported through ``tests/_torchvision_stub.py``, which explains why."""

from __future__ import annotations

import pytest
import torch
from _engine_checks import assert_engine_exact
from _torchvision_stub import import_timm
from torch import Tensor, nn

from ntkit import partition as P


@pytest.fixture(scope="module")
def timm():
    return import_timm()


VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 1.5, "num_classes": 5}
SMALL_RESNET = {"channels": (8, 12, 16, 16), "stem_width": 8, "num_classes": 5}


def _timm(timm, name: str) -> tuple[nn.Module, Tensor]:
    """A tiny timm model (float64, eval) and a batch of 4 images 3×16×16."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if name == "vit":  # qkv bias, fused attention (F.scaled_dot_product_attention)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, qkv_bias=True, **VIT)
    elif name == "vit_qknorm":  # no qkv bias, per-head-dim LayerNorm on q and k, explicit softmax path
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, qkv_bias=False, qk_norm=True, **VIT)
        for blk in m.blocks:
            blk.attn.fused_attn = False
    elif name == "resnet10t":  # deep tiered stem (Sequential of convs), avg-pool downsample
        m = timm.create_model("resnet10t", pretrained=False, **SMALL_RESNET)
    elif name == "resnet18":  # plain stem, strided 1×1 conv downsample
        m = timm.create_model("resnet18", pretrained=False, **SMALL_RESNET)
    else:
        raise KeyError(name)
    return m.double().eval(), x


# partitions each model has, and the fallbacks the engine reports on them (everything is hooked)
CASES = {
    "vit": {"heads": [], "layers": []},
    "vit_qknorm": {"heads": [], "layers": []},
    "resnet10t": {"filters": [], "filters_traced": [], "layers": []},
    "resnet18": {"filters": [], "layers": []},
}
BUILDERS = {
    "heads": lambda m, x: P.attention_heads(m),
    "layers": lambda m, x: P.layers(m),
    "filters": lambda m, x: P.conv_filters(m),
    "filters_traced": lambda m, x: P.conv_filters(m, x),
}


@pytest.mark.parametrize(("name", "pname"), [(n, p) for n, ps in CASES.items() for p in ps])
def test_timm_models_equal_brute_force(timm, name: str, pname: str) -> None:
    model, x = _timm(timm, name)
    assert_engine_exact(model, x, BUILDERS[pname](model, x), CASES[name][pname], (name, pname))


@pytest.mark.parametrize("name", ["vit", "vit_qknorm"])
def test_timm_vit_heads_come_from_the_declared_fused_qkv(timm, name: str) -> None:
    model, _ = _timm(timm, name)
    part = P.attention_heads(model)
    assert len(part) == 2 * 2 and set(part.kinds) == {"head"}  # depth × num_heads
    assert part.names == [f"blocks.{i}.attn.head{h}" for i in range(2) for h in range(2)]
    g = part.groups[3]  # block 1, head 1 (dh = 8, D = 16: qkv rows [q 0:16 | k 16:32 | v 32:48])
    got = sorted((s.param, s.dim, s.start, s.stop) for s in g.slices)
    w, b, proj = "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight"
    want = [(w, 0, 8, 16), (w, 0, 24, 32), (w, 0, 40, 48), (proj, 1, 8, 16)]
    if name == "vit":  # qkv_bias=True: the bias rows go with the head
        want += [(b, 0, 8, 16), (b, 0, 24, 32), (b, 0, 40, 48)]
    assert got == sorted(want)
    # shared by all heads, so in no head: proj.bias and (qk_norm) the per-head-dim q/k LayerNorms
    owned = {s.param for grp in part.groups for s in grp.slices}
    assert not any(p.endswith(("proj.bias", "q_norm.weight", "k_norm.weight")) for p in owned), owned
    assert P.auto(model).names == part.names  # auto finds the heads too


def test_timm_resnet10t_deep_stem_bn_is_paired_by_tracing_only(timm) -> None:
    """The tiered stem's last conv (``conv1.6``, end of an nn.Sequential) feeds the model's ``bn1``:
    the structural rules miss it (no next sibling, name not ``conv*``), the traced pairing finds it."""
    model, x = _timm(timm, "resnet10t")

    def params_of(part, layer):
        return {s.param for g in part.groups if g.layer == layer for s in g.slices}

    assert params_of(P.conv_filters(model), "conv1.6") == {"conv1.6.weight"}
    assert params_of(P.conv_filters(model, x), "conv1.6") == {"conv1.6.weight", "bn1.weight", "bn1.bias"}
    assert params_of(P.conv_filters(model), "conv1.3") == {"conv1.3.weight", "conv1.4.weight", "conv1.4.bias"}
