"""Partition core validation and the builders (heads, experts, filters, neurons, layers, auto)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.models import SwitchFFN, build_model
from ntkit.models.layers import MultiHeadSelfAttention
from ntkit.partition import (
    ModuleGroup,
    ParamSlice,
    Partition,
    attention_heads,
    auto,
    conv_filters,
    layers,
    linear_neurons,
    moe_experts,
    param_owners,
)

V = 40


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


# ------------------------------------------------------------------------------ core validation
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)


def test_validation_rejects_overlap_naming_both_groups():
    p = Partition.from_slices({"a": [("fc.weight", 0, range(3))], "b": [("fc.weight", 0, range(2, 5))]})
    with pytest.raises(ConfigError, match=r"fc\.weight.*'a' and 'b' overlap on \[2, 3\)"):
        p.bind(_Tiny())


def test_validation_rejects_out_of_range_slice():
    p = Partition.from_slices({"a": [("fc.weight", 0, range(4, 7))]})
    with pytest.raises(ConfigError, match=r"group 'a'.*\[4, 7\) outside fc\.weight dim 0 of size 6"):
        p.bind(_Tiny())
    bad_dim = Partition([ModuleGroup("g", "x", "g", (ParamSlice("fc.bias", 1, 0, 1),))])
    with pytest.raises(ConfigError, match=r"group 'g'.*dim=1 out of range for fc\.bias"):
        bad_dim.validate(_Tiny())


def test_validation_rejects_missing_param():
    p = Partition.from_slices({"a": [("fc.nope", 0, 0)]})
    with pytest.raises(ConfigError, match=r"group 'a'.*param='fc\.nope' not in model"):
        p.bind(_Tiny())


def test_validation_rejects_mixed_dims():
    p = Partition.from_slices({"a": [("fc.weight", 0, 0)], "b": [("fc.weight", 1, 0)]})
    with pytest.raises(ConfigError, match=r"param='fc\.weight'.*several dims \[0, 1\]"):
        p.bind(_Tiny())


def test_validation_rejects_duplicate_group_names_and_empty_groups():
    g = ModuleGroup("a", "x", "a", (ParamSlice("fc.bias", 0, 0, 1),))
    with pytest.raises(ConfigError, match="name='a': duplicate"):
        Partition([g, g])
    with pytest.raises(ConfigError, match="'e': has no parameter slices"):
        Partition([ModuleGroup("e", "x", "e", ())]).validate(_Tiny())


# ------------------------------------------------------------------------------ counts per model
def test_head_counts_are_layers_times_heads():
    for size, (n_layers, heads) in {"tiny": (2, 2), "mini": (4, 4)}.items():
        model = build_model("bert_mlm", size=size, vocab_size=V)
        part = attention_heads(model)
        assert len(part) == n_layers * heads
        assert set(part.kinds) == {"head"}
        assert part.layers == [f"blocks.{i}.attn" for i in range(n_layers) for _ in range(heads)]
        assert part.names[:2] == ["blocks.0.attn.head0", "blocks.0.attn.head1"]
    assert len(attention_heads(build_model("vit_tiny", depth=3, heads=4))) == 12


def test_expert_counts_are_moe_blocks_times_experts():
    model = build_model("switch_mlm", size="mini", vocab_size=V, num_experts=3)
    part = moe_experts(model)
    assert len(part) == 4 * 3 and set(part.kinds) == {"expert"}
    every_other = build_model("switch_mlm", size="mini", vocab_size=V, num_experts=3, moe_every=2)
    assert len(moe_experts(every_other)) == 2 * 3
    # each expert group = all parameters of that expert, whole tensors; the router is shared
    params = _params(model)
    ffn = model.blocks[1].ffn
    g = part[3 + 2]
    assert g.name == "blocks.1.ffn.expert2" and g.layer == "blocks.1.ffn"
    expert_params = {f"blocks.1.ffn.experts.2.{n}" for n, _ in ffn.experts[2].named_parameters()}
    assert {s.param for s in g.slices} == expert_params
    assert sum(g.numel(params) for g in part[3:6]) == sum(p.numel() for p in ffn.experts.parameters())
    assert "blocks.1.ffn.router.weight" not in part.covered_params()


@pytest.mark.parametrize(
    ("name", "kw"),
    [("vgg16", {"width": 0.125}), ("resnet56", {"width": 0.25}), ("conv4", {}), ("lenet5_caffe", {})],
)
def test_filter_counts_are_sum_of_out_channels(name, kw):
    model = build_model(name, **kw)
    part = conv_filters(model)
    assert len(part) == sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert set(part.kinds) == {"filter"}


def test_neuron_counts_and_tied_decoder_is_skipped():
    lenet = build_model("lenet300_100")
    assert len(linear_neurons(lenet)) == 300 + 100 + 10
    tied = build_model("bert_mlm", vocab_size=V)
    untied = build_model("bert_mlm", vocab_size=V, tie_embeddings=False)
    n_tied, n_untied = len(linear_neurons(tied)), len(linear_neurons(untied))
    assert n_untied - n_tied == V
    assert not any(g.layer == "head.decoder" for g in linear_neurons(tied))
    expected = sum(m.out_features for m in untied.modules() if isinstance(m, nn.Linear))
    assert n_untied == expected


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("bert_mlm", {"vocab_size": V}),
        ("switch_mlm", {"vocab_size": V}),
        ("vgg16", {"width": 0.125}),
        ("resnet56", {"width": 0.25}),
        ("vit_tiny", {}),
        ("lenet300_100", {}),
    ],
)
def test_layers_partition_covers_every_parameter_exactly_once(name, kw):
    model = build_model(name, **kw)
    part = layers(model)
    params = _params(model)
    assert sorted(part.covered_params()) == sorted(params)
    assert sum(g.numel(params) for g in part) == sum(p.numel() for p in model.parameters())
    masks = part.element_masks(model, [False] * len(part))
    assert all(not m.any() for m in masks.values())  # every element is owned by some group


def test_auto_picks_the_natural_modules():
    assert set(auto(build_model("bert_mlm", vocab_size=V)).kinds) == {"head"}
    sw = auto(build_model("switch_mlm", vocab_size=V))
    assert sw.kinds.count("head") == 4 and sw.kinds.count("expert") == 8
    assert set(auto(build_model("vgg16", width=0.125)).kinds) == {"filter"}
    assert set(auto(build_model("lenet300_100")).kinds) == {"neuron"}


def test_builders_refuse_models_without_such_modules():
    with pytest.raises(UnsupportedModelError, match="VGG16: has no attention heads"):
        attention_heads(build_model("vgg16", width=0.125))
    with pytest.raises(UnsupportedModelError, match="has no MoE experts"):
        moe_experts(build_model("bert_mlm", vocab_size=V))
    with pytest.raises(UnsupportedModelError, match="has no Conv2d filters"):
        conv_filters(build_model("lenet300_100"))


# ------------------------------------------------------------------------------ heads: exact slices
def test_fused_head_masks_match_hand_computed_rows_and_columns():
    d, heads = 12, 3
    dh = d // heads

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = MultiHeadSelfAttention(d, heads)

    model = M()
    part = attention_heads(model)
    assert len(part) == heads and part.layers == ["attn"] * heads
    for h in range(heads):
        active = [i != h for i in range(heads)]
        masks = part.element_masks(model, active)
        rows = {blk * d + r for blk in range(3) for r in range(h * dh, (h + 1) * dh)}
        exp_w = torch.ones(3 * d, d, dtype=torch.bool)
        exp_w[sorted(rows)] = False
        exp_b = torch.ones(3 * d, dtype=torch.bool)
        exp_b[sorted(rows)] = False
        exp_p = torch.ones(d, d, dtype=torch.bool)
        exp_p[:, h * dh:(h + 1) * dh] = False
        assert torch.equal(masks["attn.qkv.weight"], exp_w)
        assert torch.equal(masks["attn.qkv.bias"], exp_b)
        assert torch.equal(masks["attn.proj.weight"], exp_p)
        assert "attn.proj.bias" not in masks  # shared by all heads


def _attention_float64(x, qkv_w, qkv_b, proj_w, proj_b, heads, keep):
    """Brute-force multi-head attention in float64: proj bias + Σ over the heads in ``keep`` of
    each head's term, computed head by head."""
    b, t, d = x.shape
    dh = d // heads
    qkv = x @ qkv_w.T + qkv_b
    out = proj_b.expand(b, t, d).clone()
    for h in keep:
        q, k, v = (qkv[..., j * d + h * dh: j * d + (h + 1) * dh] for j in range(3))
        att = torch.softmax(q @ k.transpose(1, 2) / dh**0.5, dim=-1)
        out = out + (att @ v) @ proj_w[:, h * dh:(h + 1) * dh].T
    return out


@pytest.mark.parametrize("h", [0, 1, 2])
def test_zeroing_a_head_group_removes_exactly_that_head_float64(h):
    """Zeroing head h's slices (via the partition's masks) gives the attention output of the
    other heads alone, computed by brute force from the original weights."""
    d, heads = 12, 3
    attn = MultiHeadSelfAttention(d, heads).double().eval()
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.proj.bias.normal_()
    x = torch.randn(2, 5, d, dtype=torch.float64)
    w = {n: p.detach().clone() for n, p in attn.named_parameters()}
    ref = _attention_float64(x, w["qkv.weight"], w["qkv.bias"], w["proj.weight"], w["proj.bias"], heads,
                             keep=[i for i in range(heads) if i != h])
    full = _attention_float64(x, w["qkv.weight"], w["qkv.bias"], w["proj.weight"], w["proj.bias"], heads,
                              keep=range(heads))
    masks = attention_heads(attn).element_masks(attn, [i != h for i in range(heads)])
    with torch.no_grad():
        torch.testing.assert_close(attn(x), full, rtol=1e-12, atol=1e-12)
        for n, p in attn.named_parameters():
            if n in masks:
                p.mul_(masks[n])
        torch.testing.assert_close(attn(x), ref, rtol=1e-12, atol=1e-12)


class _HFSelfAttention(nn.Module):
    """Mimics transformers' BertSelfAttention attribute names (no transformers dependency)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _HFSelfOutput(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)


class _HFAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.self = _HFSelfAttention(hidden, heads)
        self.output = _HFSelfOutput(hidden)


class _HFLayer(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.attention = _HFAttention(hidden, heads)
        self.intermediate = nn.Linear(hidden, 4 * hidden)


class _HFEncoder(nn.Module):
    def __init__(self, hidden: int = 12, heads: int = 3, n_layers: int = 2) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_HFLayer(hidden, heads) for _ in range(n_layers))


class _HFBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _HFEncoder()


def test_hf_style_attention_heads():
    model = _HFBert()
    part = attention_heads(model)
    assert len(part) == 2 * 3
    g = part[4]  # layer 1, head 1
    assert g.name == "encoder.layer.1.attention.self.head1" and g.layer == "encoder.layer.1.attention.self"
    pre = "encoder.layer.1.attention"
    expected = {
        (f"{pre}.self.{n}.{w}", 0, 4, 8) for n in ("query", "key", "value") for w in ("weight", "bias")
    } | {(f"{pre}.output.dense.weight", 1, 4, 8)}
    assert {(s.param, s.dim, s.start, s.stop) for s in g.slices} == expected
    masks = part.element_masks(model, [i != 4 for i in range(6)])
    exp = torch.ones(12, 12, dtype=torch.bool)
    exp[:, 4:8] = False
    assert torch.equal(masks[f"{pre}.output.dense.weight"], exp)
    assert torch.equal(masks[f"{pre}.self.key.weight"], exp.T)
    assert f"{pre}.output.dense.bias" not in masks


def test_hf_style_attention_without_output_dense_takes_qkv_only():
    model = _HFSelfAttention(8, 2)
    part = attention_heads(model)
    assert len(part) == 2 and part.layers == ["<root>", "<root>"]
    assert {s.param for s in part[0].slices} == {f"{n}.{w}" for n in ("query", "key", "value")
                                                 for w in ("weight", "bias")}


# ------------------------------------------------------------------------------ filters: BN pairing
def _filter_bn(part: Partition) -> dict[str, str | None]:
    """conv layer → the BN parameter prefix its filter 0 includes (None: conv only)."""
    out: dict[str, str | None] = {}
    for g in part:
        if g.name.endswith(".filter0"):
            bn = [s.param for s in g.slices if s.param.endswith(".weight") and s.param != f"{g.layer}.weight"]
            out[g.layer] = bn[0].rsplit(".", 1)[0] if bn else None
    return out


def test_vgg_filters_include_the_following_batchnorm():
    model = build_model("vgg16", width=0.125)
    part = conv_filters(model)
    params = _params(model)
    pairs = _filter_bn(part)
    assert pairs["features.0"] == "features.1" and pairs["features.3"] == "features.4"
    assert all(v is not None for v in pairs.values())
    g = part[5]
    assert [(s.param, s.start, s.stop) for s in g.slices] == [
        ("features.0.weight", 5, 6), ("features.0.bias", 5, 6),
        ("features.1.weight", 5, 6), ("features.1.bias", 5, 6),
    ]
    assert g.numel(params) == 3 * 9 + 3
    # every conv/BN parameter is covered; only the classifier is shared
    assert set(params) - set(part.covered_params()) == {"classifier.weight", "classifier.bias"}


def test_resnet_filters_pair_conv_bn_and_shortcuts():
    model = build_model("resnet56", width=0.25)
    pairs = _filter_bn(conv_filters(model))
    assert pairs["conv1"] == "bn1"
    assert pairs["layer1.0.conv1"] == "layer1.0.bn1" and pairs["layer1.0.conv2"] == "layer1.0.bn2"
    assert pairs["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"
    assert set(_params(model)) - set(conv_filters(model).covered_params()) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize(("name", "kw", "shape"), [
    ("vgg16", {"width": 0.125}, (1, 3, 32, 32)),
    ("resnet56", {"width": 0.25}, (1, 3, 32, 32)),
    ("conv4", {}, (1, 3, 32, 32)),
])
def test_traced_bn_pairing_agrees_with_structure(name, kw, shape):
    model = build_model(name, **kw)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traced = conv_filters(model, example_input=torch.randn(shape))
    assert traced.groups == conv_filters(model).groups
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched


class _OddLayout(nn.Module):
    """A conv whose BN lives under an unrelated name: only tracing can pair them."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.c(x))).mean(dim=(2, 3)))


def test_bn_pairing_by_tracing_handles_any_layout():
    model = _OddLayout()
    plain = conv_filters(model)
    assert [s.param for s in plain[0].slices] == ["c.weight"]
    traced = conv_filters(model, example_input=torch.randn(1, 2, 5, 5))
    assert [s.param for s in traced[1].slices] == ["c.weight", "norm.weight", "norm.bias"]
    assert [s.start for s in traced[1].slices] == [1, 1, 1]
    assert conv_filters(model, example_input={"x": torch.randn(1, 2, 5, 5)}).groups == traced.groups
    assert conv_filters(model, example_input=(torch.randn(1, 2, 5, 5),)).groups == traced.groups


def test_switch_expert_partition_on_hand_built_block():
    ffn = SwitchFFN(6, 10, num_experts=5)
    part = moe_experts(ffn)
    assert part.names == [f"expert{e}" for e in range(5)] and part.layers == ["<root>"] * 5
    masks = part.element_masks(ffn, [e != 3 for e in range(5)])
    for n, m in masks.items():
        assert bool(m.all()) == (not n.startswith("experts.3."))


def test_groups_by_layer():
    part = auto(build_model("switch_mlm", vocab_size=V))
    by_layer = part.groups_by_layer()
    assert list(by_layer) == ["blocks.0.attn", "blocks.1.attn", "blocks.0.ffn", "blocks.1.ffn"]
    assert by_layer["blocks.1.attn"] == [2, 3] and by_layer["blocks.0.ffn"] == [4, 5, 6, 7]
    assert list(part.groups_by_layer("expert")) == ["blocks.0.ffn", "blocks.1.ffn"]


def test_kind_mask_selects_groups_by_kind():
    part = auto(build_model("switch_mlm", vocab_size=V))  # 4 heads then 8 experts
    heads = part.kind_mask("head")
    assert heads.dtype == torch.bool and heads.tolist() == [True] * 4 + [False] * 8
    assert part.kind_mask("expert").tolist() == [False] * 4 + [True] * 8
    assert part.kind_mask(["head", "expert"]).all() and part.kind_mask(None).all()
    assert not part.kind_mask("filter").any() and part.kind_mask([]).numel() == len(part)


def test_group_index_maps_positions_to_owning_groups():
    model = _Tiny()
    part = Partition.from_slices(
        {"a": [("fc.weight", 0, [0, 1]), ("fc.bias", 0, [0, 1])], "b": [("fc.weight", 0, [4])]}
    ).bind(model)
    idx = part.group_index(model)
    assert list(idx) == ["fc.weight", "fc.bias"]
    dim, owner = idx["fc.weight"]
    assert dim == 0 and owner.dtype == torch.int64 and owner.tolist() == [0, 0, -1, -1, 1, -1]
    assert idx["fc.bias"][1].tolist() == [0, 0, -1, -1, -1, -1]
    cols = Partition.from_slices({"c": [("fc.weight", 1, range(1, 3))]}).bind(model).group_index(model)
    assert cols["fc.weight"][0] == 1 and cols["fc.weight"][1].tolist() == [-1, 0, 0, -1]


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.dec = nn.Linear(3, 5)
        self.dec.weight = self.emb.weight  # tied
        self.alias = self.dec  # the same module under a second name


def test_param_owners_lists_every_module_of_tied_weights_once():
    model = _Tied()
    owners = param_owners(model)
    assert [(o.name, o.attr) for o in owners[id(model.emb.weight)]] == [("emb", "weight"), ("dec", "weight")]
    assert [(o.name, o.module, o.attr) for o in owners[id(model.dec.bias)]] == [("dec", model.dec, "bias")]
    assert len(owners) == 2
    root = nn.Module()
    root.register_parameter("scale", nn.Parameter(torch.ones(1)))
    assert [(o.name, o.attr) for o in param_owners(root)[id(root.scale)]] == [("", "scale")]


class _ProjAttention(nn.Module):
    """Llama/BART-style attention names: q_proj/k_proj/v_proj/o_proj (optionally grouped-query)."""

    def __init__(self, hidden: int = 16, heads: int = 4, kv_heads: int = 4) -> None:
        super().__init__()
        dh = hidden // heads
        self.num_heads, self.head_dim = heads, dh
        self.q_proj = nn.Linear(hidden, heads * dh)
        self.k_proj = nn.Linear(hidden, kv_heads * dh)
        self.v_proj = nn.Linear(hidden, kv_heads * dh)
        self.o_proj = nn.Linear(heads * dh, hidden)


class _ProjModel(nn.Module):
    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ProjAttention(kv_heads=kv_heads) for _ in range(2))


def test_q_proj_style_attention_heads():
    part = attention_heads(_ProjModel(kv_heads=4))
    assert len(part) == 8 and part.layers[:4] == ["layers.0"] * 4
    got = {(s.param, s.dim, s.start, s.stop) for s in part[6].slices}
    assert got == {(f"layers.1.{n}_proj.{w}", 0, 8, 12) for n in "qkv" for w in ("weight", "bias")} | {
        ("layers.1.o_proj.weight", 1, 8, 12)
    }


def test_grouped_query_attention_keeps_kv_shared():
    part = attention_heads(_ProjModel(kv_heads=2))
    assert len(part) == 8
    got = {(s.param, s.dim, s.start, s.stop) for s in part[1].slices}
    assert got == {("layers.0.q_proj.weight", 0, 4, 8), ("layers.0.q_proj.bias", 0, 4, 8),
                   ("layers.0.o_proj.weight", 1, 4, 8)}
    assert not any("k_proj" in p or "v_proj" in p for p in part.covered_params())


def test_real_hf_models_when_transformers_is_installed():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=24)
    bert = transformers.BertForMaskedLM(cfg)
    part = attention_heads(bert)
    assert len(part) == 2 * 3 and auto(bert).names == part.names
    pre = "bert.encoder.layer.1.attention"
    assert {(s.param, s.dim, s.start, s.stop) for s in part[5].slices} == {
        (f"{pre}.self.{n}.{w}", 0, 8, 12) for n in ("query", "key", "value") for w in ("weight", "bias")
    } | {(f"{pre}.output.dense.weight", 1, 8, 12)}
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32))
    lp = attention_heads(llama)
    assert len(lp) == 2 * 4
    assert {s.param.rsplit(".", 2)[-2] for s in lp[0].slices} == {"q_proj", "o_proj"}
