"""The engine on layers it was not written for: Hugging Face models built from configs, layers
declared through :mod:`ntkit.structure`, and the engine's independence from the zoo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _engine_checks import assert_engine_exact, rel
from torch import Tensor, nn

from ntkit import partition as P
from ntkit.errors import ConfigError
from ntkit.ntk import modular_ntk
from ntkit.structure import declare, structure_of

T = pytest.importorskip("transformers")


class Logits(nn.Module):
    """HF model → its logits (or last hidden state) for one tensor input."""

    def __init__(self, m: nn.Module, key: str = "input_ids") -> None:
        super().__init__()
        self.m, self.key = m, key

    def forward(self, x: Tensor) -> Tensor:
        out = self.m(**{self.key: x})
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _hf(name: str) -> tuple[nn.Module, Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    common = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    ids = torch.randint(3, 40, (4, 6), generator=g)
    img = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    if name == "bert":
        cfg = T.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, max_position_embeddings=8, **common)
        return Logits(T.BertForMaskedLM(cfg)), ids
    if name == "roberta":
        cfg = T.RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=24, max_position_embeddings=12, **common)
        return Logits(T.RobertaForMaskedLM(cfg)), ids
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=8, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return Logits(T.GPT2LMHeadModel(cfg)), ids
    if name == "vit":
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=24, num_labels=5, **common)
        return Logits(T.ViTForImageClassification(cfg), "pixel_values"), img
    if name == "resnet":
        cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1],
                             layer_type="basic", num_labels=5)
        return Logits(T.ResNetForImageClassification(cfg), "pixel_values"), img
    raise KeyError(name)


# partitions each model has, and the fallbacks the engine reports on them (everything else is hooked)
CASES = {
    "bert": {"heads": [], "layers": []},  # position ids [1, T] broadcast: hooked
    "roberta": {"heads": [], "layers": []},
    "gpt2": {"heads": [], "layers": []},
    "vit": {"heads": [], "layers": []},
    "resnet": {"filters": [], "layers": []},
}
BUILDERS = {"heads": P.attention_heads, "layers": P.layers, "filters": P.conv_filters}


@pytest.mark.parametrize(("name", "pname"), [(n, p) for n, ps in CASES.items() for p in ps])
def test_hf_models_equal_brute_force(name: str, pname: str) -> None:
    model, x = _hf(name)
    model = model.double().eval()
    assert_engine_exact(model, x, BUILDERS[pname](model), CASES[name][pname], (name, pname))


def test_gpt2_heads_come_from_the_declared_fused_qkv() -> None:
    model, _ = _hf("gpt2")
    part = P.attention_heads(model)
    assert len(part) == 4 and set(part.kinds) == {"head"}
    g = part.groups[1]  # layer 0, head 1 (dh = 8, d = 16)
    got = sorted((s.param, s.dim, s.start, s.stop) for s in g.slices)
    w, b, proj = "m.transformer.h.0.attn.c_attn.weight", "m.transformer.h.0.attn.c_attn.bias", "m.transformer.h.0.attn.c_proj.weight"
    want = sorted([(w, 1, 8, 16), (w, 1, 24, 32), (w, 1, 40, 48), (b, 0, 8, 16), (b, 0, 24, 32), (b, 0, 40, 48),
                   (proj, 0, 8, 16)])
    assert got == want
    assert P.auto(model).names == part.names  # auto finds the heads too


class AffineInOut(nn.Module):
    """A user layer ``y = x W + b`` with W [in, out] and its own forward (as HF's Conv1D)."""

    def __init__(self, i: int, o: int, twice: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o))
        self.twice = twice

    def forward(self, x: Tensor) -> Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        return 2 * y if self.twice else y  # twice: not the declared map


class WrongAffine(AffineInOut):
    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o, twice=True)

    def forward(self, x: Tensor) -> Tensor:  # overrides forward: the declaration is not inherited
        return super().forward(x)


def _net(layer: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(layer(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def test_declared_layer_is_hooked_and_exact_and_a_wrong_declaration_is_caught() -> None:
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    assert structure_of(AffineInOut(2, 2)) is None
    net = _net(AffineInOut)
    part = P.layers(net)
    ref = modular_ntk(net, x, part, strategy="brute_force").grams
    undeclared = modular_ntk(net, x, part)  # no rule: the uses inside its forward go to torch.func
    assert rel(undeclared.grams, ref) <= 1e-10
    assert any("torch.addmm" in f for f in undeclared.fallback_layers), undeclared.fallback_layers
    try:
        declare(AffineInOut, linear="in_out")
        got = modular_ntk(net, x, part)
        assert got.strategy == "hooks" and got.fallback_layers == [] and rel(got.grams, ref) <= 1e-10
        # a subclass overriding forward inherits nothing; a declaration that lies is caught
        assert structure_of(WrongAffine(2, 2)) is None
        declare(WrongAffine, linear="in_out")
        wrong = _net(WrongAffine)
        ref_w = modular_ntk(wrong, x, P.layers(wrong), strategy="brute_force").grams
        got_w = modular_ntk(wrong, x, P.layers(wrong))
        assert rel(got_w.grams, ref_w) <= 1e-10
        assert any("self-check failed" in f for f in got_w.fallback_layers), got_w.fallback_layers
    finally:
        from ntkit import structure

        structure._REGISTRY.pop(AffineInOut, None)
        structure._REGISTRY.pop(WrongAffine, None)


def test_declare_rejects_bad_fields_in_one_line() -> None:
    with pytest.raises(ConfigError, match="unknown field 'head'"):
        declare(AffineInOut, head=lambda m: [])
    with pytest.raises(ConfigError, match=r"linear='io'"):
        declare(AffineInOut, linear="io")
    with pytest.raises(ConfigError, match="cls=3"):
        declare(3, linear="in_out")  # type: ignore[arg-type]


def test_engine_and_partition_import_nothing_from_the_zoo() -> None:
    code = ("import sys, ntkit.ntk, ntkit.partition, ntkit.ntk.engine; "
            "bad = sorted(m for m in sys.modules if m.startswith('ntkit.models')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class Top2MoE(nn.Module):
    """A Mixtral-style MoE written by a user: top-2 routing with renormalised softmax weights,
    each token to two experts; it records which flat tokens each expert received."""

    def __init__(self, d: int = 6, n_experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, d)) for _ in range(n_experts))
        self.routed: list[Tensor] = []
        self.seq_len = 0

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        w, idx = self.gate(flat).softmax(-1).topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        self.routed, self.seq_len = [], t
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            tok, slot = tok.flip(0), slot.flip(0)  # any order: the engine must not assume sorted
            self.routed.append(tok)
            if tok.numel():
                out = out.index_add(0, tok, expert(flat[tok]) * w[tok, slot, None])
        return out.view(b, t, d)


class MoENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.moe = Top2MoE()
        self.out = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.moe(self.emb(ids))).mean(1))


def test_a_declared_user_moe_is_partitioned_and_hooked_exactly() -> None:
    from ntkit import structure

    torch.manual_seed(0)
    net = MoENet().double().eval()
    ids = torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match="MoE experts"):
        P.moe_experts(net)  # undeclared: the builder does not guess
    try:
        declare(Top2MoE, experts=lambda m: list(m.experts), router=lambda m: m.gate,
                dispatch=lambda m: (m.routed, m.seq_len))
        part = P.moe_experts(net)
        assert part.names == [f"moe.expert{e}" for e in range(4)]
        for output in ("sum_logits", "logits"):
            ref = modular_ntk(net, ids, part, strategy="brute_force", output=output).grams
            got = modular_ntk(net, ids, part, output=output)
            assert got.strategy == "hooks" and got.fallback_layers == [], got.fallback_layers
            assert rel(got.grams, ref) <= 1e-10
        every = P.layers(net)  # router and experts whole, with the rest
        got = modular_ntk(net, ids, every)
        assert rel(got.grams, modular_ntk(net, ids, every, strategy="brute_force").grams) <= 1e-10
        assert got.fallback_layers == []
    finally:
        structure._REGISTRY.pop(Top2MoE, None)
