"""mNTK engine: every strategy against the brute-force per-sample Jacobian (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.models.layers import SwitchFFN, TransformerBlock
from ntkit.ntk import ModularNTK, Strategy, modular_ntk
from ntkit.partition import Partition

# --------------------------------------------------------------------------- tiny models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class CNN(nn.Module):
    """16×16 input: conv1 (dilated) has 256 output positions, conv2 (stride 4) 16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, stride=4, padding=1, bias=True), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = torch.tanh(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class BasicBlockNet(nn.Module):
    """ResNet basic block with a projection shortcut, then pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.short, self.bns = nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = F.relu(y + self.bns(self.short(x)))
        return self.fc(y.mean((2, 3)))


class TinyBert(nn.Module):
    """Encoder with fused-QKV heads and a decoder tied to the token embedding; output [S, T, V]."""

    def __init__(
        self, vocab: int = 11, d: int = 8, heads: int = 2, layers: int = 2, experts: int = 0, batched_pos: bool = True
    ) -> None:
        super().__init__()
        self.batched_pos = batched_pos
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.blocks = nn.ModuleList(TransformerBlock(d, heads, 12, dropout=0.1, num_experts=experts) for _ in range(layers))
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.tok.weight

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1])
        x = self.tok(ids) + self.pos(pos.expand_as(ids) if self.batched_pos else pos)
        for b in self.blocks:
            x = b(x)
        return self.decoder(x)


class SeparateQKV(nn.Module):
    """HF-style attention (separate query/key/value/output Linear layers) + classifier."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.cls = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(z: Tensor) -> Tensor:
            return z.view(b, t, self.heads, self.dh).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), -1) @ v
        h = self.norm(x + self.out(att.transpose(1, 2).reshape(b, t, d)))
        return self.cls(h.mean(1))


class WithTorchMHA(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.cls = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.cls(self.mha(h, h, h, need_weights=False)[0].mean(1))


# --------------------------------------------------------------------------- partitions


def layers_partition(model: nn.Module) -> Partition:
    """One group per module holding parameters directly (a complete partition)."""
    spec: dict[str, list] = {}
    for mname, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        full = {f"{mname}.{n}" if mname else n for n in own} & dict(model.named_parameters()).keys()
        if full:
            spec[mname or "root"] = [(p, 0, None) for p in sorted(full)]
    return Partition.from_slices(spec, kind="layer").bind(model)


def neurons_partition(model: nn.Module) -> Partition:
    spec = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            for r in range(m.out_features):
                spec[f"{mname}.{r}"] = [(f"{mname}.weight", 0, r), (f"{mname}.bias", 0, r)]
    return Partition.from_slices(spec, kind="neuron")


def filters_partition(model: nn.Module) -> Partition:
    spec, mods = {}, dict(model.named_modules())
    names = list(mods)
    for i, mname in enumerate(names):
        m = mods[mname]
        if isinstance(m, nn.Conv2d):
            bn = mods[names[i + 1]] if i + 1 < len(names) and isinstance(mods[names[i + 1]], nn.BatchNorm2d) else None
            for c in range(m.out_channels):
                sl = [(f"{mname}.weight", 0, c)]
                if m.bias is not None:
                    sl.append((f"{mname}.bias", 0, c))
                if bn is not None:
                    bname = names[i + 1]
                    sl += [(f"{bname}.weight", 0, c), (f"{bname}.bias", 0, c)]
                spec[f"{mname}.{c}"] = sl
    return Partition.from_slices(spec, kind="filter")


def fused_heads_partition(model: nn.Module) -> Partition:
    spec = {}
    for mname, m in model.named_modules():
        if hasattr(m, "qkv") and hasattr(m, "proj"):
            d, dh = m.d_model, m.head_dim
            for h in range(m.num_heads):
                rows = [r for blk in range(3) for r in range(blk * d + h * dh, blk * d + (h + 1) * dh)]
                spec[f"{mname}.h{h}"] = [
                    (f"{mname}.qkv.weight", 0, rows),
                    (f"{mname}.qkv.bias", 0, rows),
                    (f"{mname}.proj.weight", 1, range(h * dh, (h + 1) * dh)),
                ]
    return Partition.from_slices(spec, kind="head")


def separate_heads_partition(model: SeparateQKV) -> Partition:
    spec = {}
    for h in range(model.heads):
        r = range(h * model.dh, (h + 1) * model.dh)
        spec[f"h{h}"] = [(f"{n}.{w}", 0, r) for n in ("query", "key", "value") for w in ("weight", "bias")]
        spec[f"h{h}"].append(("out.weight", 1, r))
    return Partition.from_slices(spec, kind="head")


def experts_partition(model: nn.Module) -> Partition:
    spec = {}
    for mname, m in model.named_modules():
        if isinstance(m, SwitchFFN):
            for e in range(m.num_experts):
                spec[f"{mname}.e{e}"] = [(f"{mname}.experts.{e}.{n}", 0, None) for n, _ in m.experts[e].named_parameters()]
    return Partition.from_slices(spec, kind="expert")


# --------------------------------------------------------------------------- cases


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def make_case(name: str, dtype: torch.dtype = torch.float64, s: int = 5):
    """(model in eval mode, inputs, dict of partitions, output_mask)."""
    g = torch.Generator().manual_seed(1)
    mask = None
    if name == "mlp":
        model = MLP()
        x = torch.randn(s, 6, generator=g)
        parts = {"neurons": neurons_partition(model)}
    elif name == "cnn":
        model = CNN()
        x = torch.randn(s, 3, 16, 16, generator=g)
        parts = {"filters": filters_partition(model)}
    elif name == "resblock":
        model = BasicBlockNet()
        x = torch.randn(s, 3, 8, 8, generator=g)
        parts = {"filters": filters_partition(model)}
    elif name == "bert":
        model = TinyBert()
        x = torch.randint(0, 11, (s, 5), generator=g)
        mask = torch.rand(s, 5, generator=g) < 0.5
        mask[:, 0] = True
        parts = {"heads": fused_heads_partition(model)}
    elif name == "hf_attention":
        model = SeparateQKV()
        x = torch.randn(s, 4, 8, generator=g)
        parts = {"heads": separate_heads_partition(model)}
    elif name == "moe":
        model = TinyBert(experts=3, layers=1)
        x = torch.randint(0, 11, (s, 6), generator=g)
        parts = {"experts": experts_partition(model)}
    elif name.endswith("_nhwc"):  # the same conv nets stored channels-last
        model, x, parts, mask = make_case(name[: -len("_nhwc")], dtype, s)
        cl = torch.channels_last
        return model.to(memory_format=cl), x.contiguous(memory_format=cl), parts, mask
    else:
        raise KeyError(name)
    _randomise_bn(model)
    model = model.to(dtype).eval()
    if x.is_floating_point():
        x = x.to(dtype)
    parts["layers"] = layers_partition(model)
    return model, x, parts, mask


CASES = ["mlp", "cnn", "cnn_nhwc", "resblock", "resblock_nhwc", "bert", "hf_attention", "moe"]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", ["hooks", "functorch", "auto"])
def test_strategies_match_brute_force(case: str, strategy: str) -> None:
    model, x, parts, mask = make_case(case)
    for pname, part in parts.items():
        ref = modular_ntk(model, x, part, strategy="brute_force", output_mask=mask)
        got = modular_ntk(model, x, part, strategy=strategy, output_mask=mask)
        assert got.grams.shape == (len(part), x.shape[0], x.shape[0])
        assert got.grams.dtype == torch.float64
        assert ref.grams.abs().amax() > 0
        assert rel(got.grams, ref.grams) <= 1e-10, (case, pname, strategy)
        if strategy != "functorch":
            assert got.strategy == "hooks" and got.fallback_layers == []


@pytest.mark.parametrize("case", ["mlp", "cnn", "cnn_nhwc", "resblock", "hf_attention"])
@pytest.mark.parametrize("path", ["materialise", "contract", "contract_raw_conv_gram", "grouped_conv", "unfold_conv"])
def test_every_gram_path_matches_brute_force(case: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force each per-layer kernel (the cost rule would pick only one per layer)."""
    from ntkit.ntk import _uses, engine

    if path in ("grouped_conv", "unfold_conv"):  # per-sample conv gradient families
        family = path.split("_")[0]
        monkeypatch.setattr(_uses, "conv_rows_family", lambda positions: family)
    if path == "contract_raw_conv_gram":  # conv token Gram from raw activations + shifted adds
        monkeypatch.setattr(_uses.ConvForm, "patch_gram_cost", lambda self: (0, True))
    costs = (1, 0) if path.startswith("contract") else (0, 1)
    monkeypatch.setattr(engine, "linear_costs", lambda *a, **k: costs)
    model, x, parts, mask = make_case(case)
    for part in parts.values():
        ref = modular_ntk(model, x, part, strategy="brute_force", output_mask=mask)
        got = modular_ntk(model, x, part, strategy="hooks", output_mask=mask)
        assert rel(got.grams, ref.grams) <= 1e-10


@pytest.mark.parametrize("case", CASES)
def test_complete_partition_sums_to_full_ntk(case: str) -> None:
    model, x, parts, mask = make_case(case)
    full = Partition.from_slices({"all": [(n, 0, None) for n, _ in model.named_parameters()]}).bind(model)
    ref = modular_ntk(model, x, full, strategy="brute_force", output_mask=mask).grams[0]
    got = modular_ntk(model, x, parts["layers"], output_mask=mask)
    assert rel(got.full, ref) <= 1e-10
    g = got.grams
    assert torch.allclose(g, g.transpose(1, 2), rtol=0, atol=1e-12 * float(g.abs().amax()))
    ev = torch.linalg.eigvalsh(g)
    assert float(ev.min()) >= -1e-10 * float(ev.max())


@pytest.mark.parametrize("case", ["mlp", "cnn", "bert", "moe"])
@pytest.mark.parametrize("strategy", ["hooks", "functorch"])
def test_all_logits_match_brute_force(case: str, strategy: str) -> None:
    model, x, parts, mask = make_case(case, s=3)
    if mask is not None:  # "logits" needs the same number of masked positions per sample
        mask = torch.zeros_like(mask)
        mask[:, 1] = True
    part = parts["layers"]
    ref = modular_ntk(model, x, part, output="logits", strategy="brute_force", output_mask=mask)
    got = modular_ntk(model, x, part, output="logits", strategy=strategy, output_mask=mask)
    k = ref.grams.shape[1] // 3
    assert k > 1 and got.grams.shape == ref.grams.shape
    assert rel(got.grams, ref.grams) <= 1e-10
    # the sum over a sample's logits of its logit block is the sum_logits Gram
    summed = got.grams.view(len(part), 3, k, 3, k).sum((2, 4))
    s_ntk = modular_ntk(model, x, part, output_mask=mask)
    assert rel(summed, s_ntk.grams) <= 1e-10


@pytest.mark.parametrize("case", ["mlp", "cnn", "bert", "moe"])
def test_float32_close_to_float64(case: str) -> None:
    model64, x64, parts, mask = make_case(case)
    model32, x32, parts32, _ = make_case(case, dtype=torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    x32 = x64.float() if x64.is_floating_point() else x64
    name = next(iter(parts))
    ref = modular_ntk(model64, x64, parts[name], strategy="brute_force", output_mask=mask).grams
    got = modular_ntk(model32, x32, parts32[name], output_mask=mask)
    assert got.grams.dtype == torch.float32
    assert rel(got.grams.double(), ref) <= 1e-4
    acc64 = modular_ntk(model32, x32, parts32[name], output_mask=mask, dtype=torch.float64)
    assert acc64.grams.dtype == torch.float64 and rel(acc64.grams, ref) <= 1e-4


def test_inputs_as_tuple_and_dict() -> None:
    model, x, parts, mask = make_case("bert")
    part = parts["heads"]
    ref = modular_ntk(model, x, part, output_mask=mask).grams
    assert rel(modular_ntk(model, (x,), part, output_mask=mask).grams, ref) == 0
    assert rel(modular_ntk(model, {"ids": x}, part, output_mask=mask).grams, ref) == 0


def test_broadcast_position_embedding_falls_back_and_is_reported() -> None:
    model, x, parts, mask = make_case("bert")
    model.batched_pos = False
    part = parts["layers"]
    ref = modular_ntk(model, x, part, strategy="brute_force", output_mask=mask).grams
    got = modular_ntk(model, x, part, output_mask=mask)
    assert got.strategy == "hooks+functorch"
    assert len(got.fallback_layers) == 1 and got.fallback_layers[0].startswith("pos:")
    assert rel(got.grams, ref) <= 1e-10
    with pytest.raises(UnsupportedModelError, match="pos"):
        modular_ntk(model, x, part, strategy="hooks", output_mask=mask)


def test_torch_multihead_attention_falls_back() -> None:
    model = WithTorchMHA().double().eval()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    part = layers_partition(model)
    ref = modular_ntk(model, x, part, strategy="brute_force").grams
    got = modular_ntk(model, x, part)
    assert any(f.startswith("mha") and "MultiheadAttention" in f for f in got.fallback_layers)
    assert not any(f.startswith(("inp", "cls")) for f in got.fallback_layers)
    assert rel(got.grams, ref) <= 1e-10
    with pytest.raises(UnsupportedModelError, match="mha"):
        modular_ntk(model, x, part, strategy="hooks")


def test_flags_restored_and_hooks_removed() -> None:
    model, x, parts, mask = make_case("moe")
    model.tok.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = modular_ntk(model, x, parts["layers"], output_mask=mask)
    assert isinstance(res, ModularNTK) and not res.grams.requires_grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert res.names == parts["layers"].names and res.kinds == ["layer"] * len(res)
    assert torch.equal(res[res.names[1]], res.grams[1])


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda m: m.bn1.train(), "bn1"),
        (lambda m: m.train(), "bn1"),
    ],
)
def test_refuses_train_mode_batchnorm(setup, match) -> None:
    model, x, parts, _ = make_case("cnn")
    setup(model)
    with pytest.raises(UnsupportedModelError, match=match):
        modular_ntk(model, x, parts["filters"])
    assert model.bn1.training  # not switched silently


def test_refuses_active_dropout_and_training_moe() -> None:
    model, x, parts, mask = make_case("bert")
    model.blocks[0].drop.train()
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.drop"):
        modular_ntk(model, x, parts["heads"], output_mask=mask)
    model.eval()
    model.blocks[1].attn.train()
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.attn"):
        modular_ntk(model, x, parts["heads"], output_mask=mask)
    model.eval()
    model.blocks[0].drop.p = 0.0
    model.blocks[0].drop.train()  # p = 0: harmless
    modular_ntk(model, x, parts["heads"], output_mask=mask)
    moe, xm, pm, _ = make_case("moe")
    moe.blocks[0].ffn.train()
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.ffn"):
        modular_ntk(moe, xm, pm["experts"])


def test_bad_arguments() -> None:
    model, x, parts, _ = make_case("mlp")
    with pytest.raises(ConfigError, match="output"):
        modular_ntk(model, x, parts["neurons"], output="mean")
    with pytest.raises(ConfigError, match="strategy"):
        modular_ntk(model, x, parts["neurons"], strategy="fast")
    with pytest.raises(ConfigError, match="inputs shape"):
        modular_ntk(model, (x, torch.zeros(2, 1)), parts["neurons"])
    assert Strategy("hooks") is Strategy.HOOKS


def test_rank_deficient_module_has_zero_lambda_min() -> None:
    model, x, _parts, _ = make_case("mlp", s=6)
    part = Partition.from_slices({"b3": [("fc3.bias", 0, 0)], "w1": [("fc1.weight", 0, None)]}).bind(model)
    res = modular_ntk(model, x, part)
    sp = res.spectrum()
    assert float(sp.lambda_min[0]) == 0.0 and float(sp.lambda_max[0]) > 0  # 1 parameter, 6 samples: rank 1
    assert torch.allclose(res.grams[0], torch.ones(6, 6, dtype=torch.float64))  # d logit / d bias = 1


# --------------------------------------------------------------------------- the model zoo

ZOO = [
    ("bert_mlm", {"size": "tiny", "vocab_size": 50, "max_len": 8}, "attention_heads"),
    ("switch_mlm", {"size": "tiny", "num_experts": 3, "vocab_size": 50, "max_len": 8}, "moe_experts"),
    ("vgg16", {"width": 0.0625}, "conv_filters"),
    ("resnet56", {"width": 0.25}, "conv_filters"),
]


def _zoo_case(name: str, kw: dict, s: int = 3):
    from ntkit.models import build_model

    torch.manual_seed(0)
    model = build_model(name, **kw).double().eval()
    _randomise_bn(model)
    g = torch.Generator().manual_seed(2)
    if name.endswith("_mlm"):
        x = torch.randint(0, kw["vocab_size"], (s, 6), generator=g)
        mask = torch.rand(s, 6, generator=g) < 0.4
        mask[:, 2] = True
        return model, x, mask
    return model, torch.randn(s, 3, 32, 32, generator=g, dtype=torch.float64), None


@pytest.mark.parametrize("name, kw, builder", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_models_hooks_match_brute_force(name: str, kw: dict, builder: str) -> None:
    from ntkit import partition as P

    model, x, mask = _zoo_case(name, kw)
    part = getattr(P, builder)(model)
    ref = modular_ntk(model, x, part, strategy="brute_force", output_mask=mask)
    got = modular_ntk(model, x, part, output_mask=mask)
    assert got.strategy == "hooks", got.fallback_layers
    assert rel(got.grams, ref.grams) <= 1e-10


@pytest.mark.parametrize("name, kw", [(z[0], z[1]) for z in ZOO[:2]], ids=[z[0] for z in ZOO[:2]])
def test_zoo_language_models_layers_partition(name: str, kw: dict) -> None:
    """Tied decoder / token embedding, router, LayerNorms, per-sample position embedding: every
    layer goes through hooks (no fallback)."""
    from ntkit import partition as P

    model, x, mask = _zoo_case(name, kw, s=2)
    part = P.layers(model)
    full = Partition.from_slices({"all": [(n, 0, None) for n, _ in model.named_parameters()]}).bind(model)
    ref = modular_ntk(model, x, full, strategy="brute_force", output_mask=mask).grams[0]
    got = modular_ntk(model, x, part, output_mask=mask)
    assert rel(got.full, ref) <= 1e-10
    assert got.strategy == "hooks"
    assert got.fallback_layers == []


@pytest.mark.parametrize("name, kw", [(z[0], z[1]) for z in ZOO[:2]], ids=[z[0] for z in ZOO[:2]])
@pytest.mark.parametrize("output", ["sum_logits", "logits"])
def test_packed_logits_at_output_positions(name: str, kw: dict, output: str) -> None:
    """``model(ids, positions=mask)`` returns logits [n, V] at the masked positions only; the
    layers after the gather (MLM head, tied decoder) see packed rows and are mapped back to their
    samples. Against brute force on the unpacked [S, T, V] output, every partition, no fallback."""
    from ntkit import partition as P

    model, x, mask = _zoo_case(name, kw, s=3 if output == "sum_logits" else 2)
    if output == "logits":  # all logits need the same number of positions per sample
        mask = torch.zeros_like(mask)
        mask[:, [1, 4]] = True
    packed = {"input_ids": x, "positions": mask}
    for part in (P.auto(model), P.layers(model)):
        ref = modular_ntk(model, x, part, strategy="brute_force", output=output, output_mask=mask)
        got = modular_ntk(model, packed, part, output=output, output_mask=mask)
        assert got.strategy == "hooks" and got.fallback_layers == []
        assert rel(got.grams, ref.grams) <= 1e-10
        if output == "sum_logits":  # the reference itself on packed outputs
            bf = modular_ntk(model, packed, part, strategy="brute_force", output=output, output_mask=mask)
            assert rel(bf.grams, ref.grams) <= 1e-10


def test_packed_logits_ambiguous_or_wrong_count_refused() -> None:
    from ntkit import partition as P

    model, x, _ = _zoo_case("bert_mlm", ZOO[0][1], s=3)
    part = P.layers(model)
    one_each = torch.zeros(3, 6, dtype=torch.bool)
    one_each[:, 2] = True  # n == S, one position per sample: unambiguous
    ref = modular_ntk(model, x, part, strategy="brute_force", output_mask=one_each)
    got = modular_ntk(model, {"input_ids": x, "positions": one_each}, part, output_mask=one_each)
    assert rel(got.grams, ref.grams) <= 1e-10
    uneven = torch.zeros(3, 6, dtype=torch.bool)
    uneven[0, :2] = True
    uneven[1, 3] = True  # n == S = 3 rows but counts 2 / 1 / 0
    with pytest.raises(UnsupportedModelError, match="output_mask: packed logits"):
        modular_ntk(model, {"input_ids": x, "positions": uneven}, part, output_mask=uneven)
    with pytest.raises(ConfigError, match="model output rows"):
        modular_ntk(model, {"input_ids": x, "positions": one_each}, part, output_mask=uneven | one_each)


class EmbedBag(nn.Module):
    """One token per sample (ids [S]) plus a padded sequence; padding_idx rows get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.one = nn.Embedding(7, 4)
        self.seq = nn.Embedding(9, 4, padding_idx=0)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: Tensor, seq: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.one(ids) + self.seq(seq).sum(1)))


@pytest.mark.parametrize("output", ["sum_logits", "logits"])
def test_embeddings_single_token_and_padding_idx(output: str) -> None:
    model = EmbedBag().double().eval()
    g = torch.Generator().manual_seed(3)
    ids, seq = torch.randint(0, 7, (5,), generator=g), torch.randint(0, 9, (5, 4), generator=g)
    seq[:, 0] = 0
    part = Partition.from_slices(
        {"one": [("one.weight", 1, range(2))], "seq_rows": [("seq.weight", 0, range(5))], "seq_rest": [("seq.weight", 0, range(5, 9))]}
    ).bind(model)
    ref = modular_ntk(model, (ids, seq), part, strategy="brute_force", output=output)
    got = modular_ntk(model, (ids, seq), part, output=output)
    assert got.strategy == "hooks"
    assert rel(got.grams, ref.grams) <= 1e-10


@pytest.mark.parametrize("strategy", ["hooks", "functorch", "brute_force"])
def test_works_under_no_grad(strategy: str) -> None:
    model, x, parts, _ = make_case("cnn", s=3)
    ref = modular_ntk(model, x, parts["filters"], strategy="brute_force").grams
    with torch.no_grad():
        got = modular_ntk(model, x, parts["filters"], strategy=strategy).grams
    assert rel(got, ref) <= 1e-10


class PartlyFrozen(nn.Module):
    """``frozen`` runs under no_grad inside forward: its Gram is 0 under every strategy."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            h = self.frozen(x)
        return self.fc(torch.tanh(h + x))


def test_layer_run_under_no_grad_has_zero_gram() -> None:
    model = PartlyFrozen().double().eval()
    x = torch.randn(4, 4, dtype=torch.float64)
    part = layers_partition(model)
    ref = modular_ntk(model, x, part, strategy="brute_force")
    got = modular_ntk(model, x, part, strategy="hooks")
    assert got.names[0] == "frozen" and float(got.grams[0].abs().max()) == 0.0
    assert rel(got.grams, ref.grams) <= 1e-10
