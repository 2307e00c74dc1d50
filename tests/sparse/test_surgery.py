"""Surgery against the masked model (float64, ≤ 1e-10), optimizer-state carry-over, replay + load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ntkit import partition as P
from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.models import build_model
from ntkit.models.layers import SwitchFFN
from ntkit.sparse import SlicedAdamW, attach
from ntkit.sparse.surgery import carry_optimizer_state, remove_groups, replay

VOCAB, T = 30, 8


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("bert_mlm", size="tiny", vocab_size=VOCAB, max_len=T, dropout=0.0).double().eval()


def _switch(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("switch_mlm", size="tiny", vocab_size=VOCAB, max_len=T, dropout=0.0).double().eval()


def _vgg(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("vgg16", width=1 / 16).double().eval()


def _resnet(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("resnet56", width=0.25).double().eval()


def _tokens():
    return torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))


def _images():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _extra_vgg(model: nn.Module, names: list[str]) -> int:
    """Consumer weights lost with VGG filters: next conv's 3×3 column block or a classifier column."""
    convs = [n for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
    total = 0
    for name in names:
        conv = name.rsplit(".", 1)[0].removeprefix("features.")
        i = convs.index(conv)
        total += model.classifier.out_features if i + 1 == len(convs) else \
            model.features[int(convs[i + 1])].out_channels * 9
    return total


CASES = {
    "heads": (_bert, P.attention_heads, _tokens, ["blocks.0.attn.head1", "blocks.1.attn.head0"],
              lambda model, names: 0),
    "experts": (_switch, P.moe_experts, _tokens,
                ["blocks.0.ffn.expert1", "blocks.0.ffn.expert2", "blocks.1.ffn.expert0"],
                lambda model, names: len(names) * model.config.d_model),  # router rows
    "vgg_filters": (_vgg, P.conv_filters, _images,
                    ["features.0.filter1", "features.0.filter2", "features.3.filter0", "features.40.filter3"],
                    _extra_vgg),
    "resnet_conv1": (_resnet, P.conv_filters, _images,
                     ["layer1.0.conv1.filter0", "layer2.3.conv1.filter1", "layer2.3.conv1.filter2",
                      "layer3.8.conv1.filter5"],
                     lambda model, names: sum(model.get_submodule(n.rsplit(".", 2)[0]).conv2.out_channels * 9
                                              for n in names)),
}


def _masked_reference(model: nn.Module, builder, names: list[str]):
    """A copy of ``model`` with ``names`` pruned by the sparse controller (and, for experts, their
    router logits at −∞ — the function of a model without them, see ntkit.sparse.surgery)."""
    for mod in model.modules():
        if isinstance(mod, SwitchFFN):
            mod.aux_loss = None  # a graph tensor of the last forward: not deep-copyable
    ref = copy.deepcopy(model)
    part = builder(ref)
    ctl = attach(ref, part)
    ctl.set_pruned(torch.tensor([n in names for n in part.names]))
    for lname, mod in ref.named_modules():
        if isinstance(mod, SwitchFFN):
            gone = torch.tensor([f"{lname}.expert{e}" in names for e in range(mod.num_experts)])
            mod.router.register_forward_hook(lambda m, i, out, g=gone: out.masked_fill(g, float("-inf")))
    return ref


def _two_steps(model: nn.Module, part, inputs) -> SlicedAdamW:
    """Two SlicedAdamW steps with different active sets (so per-index step counts differ)."""
    ctl = attach(model, part)
    opt = SlicedAdamW(model, ctl, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        ctl.set_active(torch.rand(len(part), generator=gen) < 0.6)
        opt.zero_grad()
        model(inputs).square().mean().backward()
        opt.step()
    opt.flush()
    return opt


@pytest.mark.parametrize("case", list(CASES))
def test_surgery_equals_masked_model_and_carries_state(case):
    make, builder, inputs_fn, names, extra = CASES[case]
    model = make()
    x = inputs_fn()
    part = builder(model)
    old_opt = _two_steps(model, part, x)
    old_ctl = old_opt.ctl
    old_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_state = {n: {k: v.clone() for k, v in old_opt.state[p].items()} for n, p in model.named_parameters()}
    n_before = sum(p.numel() for p in model.parameters())
    group_numel = sum(g.numel(old_params) for g in part if g.name in names)

    old_ctl.detach()
    ref = _masked_reference(model, builder, names)
    ctl = attach(model, part)  # surgery on a model with a controller attached: it is passed and detached
    change = remove_groups(model, part, names, controller=ctl)
    assert change.model is model and change.removed == names

    with torch.no_grad():
        want, got = ref(x), model(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-10
    # parameter count: the groups' own slices plus what is coupled to them
    n_after = sum(p.numel() for p in model.parameters())
    assert n_before - n_after == group_numel + extra(model, names)
    # the new partition: same names minus the removed, re-indexed, valid for the new model
    assert change.partition.names == [n for n in part.names if n not in names]
    for g_old, g_new in zip([g for g in part if g.name not in names], change.partition):
        for s_old, s_new in zip(g_old.slices, g_new.slices):
            new_p = dict(model.named_parameters())[s_new.param]
            want = s_old.select(old_params[s_old.param])
            for d, idx in change.selections(s_old.param):
                want = want if d == s_old.dim else want.index_select(d, idx)  # e.g. lost input channels
            assert torch.equal(s_new.select(new_p), want)
    # every surviving parameter is the index_select of the old one
    inverse = {v: k for k, v in change.renamed.items()}
    for n, p in model.named_parameters():
        old = inverse.get(n, n)
        assert torch.equal(p.detach(), change.select(old, old_params[old])), n

    # optimizer state carried over by index_select
    new_ctl = attach(model, change.partition)
    new_opt = SlicedAdamW(model, new_ctl, lr=1e-2)
    carry_optimizer_state(old_opt, new_opt, change)
    for n, p in model.named_parameters():
        old = inverse.get(n, n)
        st, ost = new_opt.state[p], old_state[old]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], change.select(old, ost[key])), (n, key)
        step = ost["step"]
        if old in old_ctl.slicings and step.dim() == 1:
            for d, idx in change.selections(old):
                if d == old_ctl.slicings[old].dim:
                    step = step.index_select(0, idx)
        assert torch.equal(st["step"], step), n
    # the new optimizer steps on the carried state
    new_opt.zero_grad()
    model(x).square().mean().backward()
    new_opt.step()
    new_ctl.detach()

    # a pruned checkpoint loads into a fresh model after replay; outputs identical
    fresh = make(seed=7)
    replay(fresh, builder(fresh), [names[:1], names[1:]])
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_experts_renamed_and_counts_updated():
    model = _switch()
    part = P.moe_experts(model)
    change = remove_groups(model, part, ["blocks.0.ffn.expert1"])
    ffn = model.blocks[0].ffn
    assert ffn.num_experts == 3 and len(ffn.experts) == 3 and ffn.router.out_features == 3
    assert change.renamed["blocks.0.ffn.experts.3.fc1.weight"] == "blocks.0.ffn.experts.2.fc1.weight"
    assert change.kept["blocks.0.ffn.experts.1.fc1.weight"][1].numel() == 0
    assert change.kept["blocks.0.ffn.router.weight"][1].tolist() == [0, 2, 3]


def test_heads_count_attribute_and_refusals():
    model = _bert()
    part = P.attention_heads(model)
    remove_groups(model, part, ["blocks.1.attn.head0"])
    assert model.blocks[1].attn.num_heads == 1 and model.blocks[1].attn.qkv.out_features == 3 * 64
    with pytest.raises(ConfigError, match="would lose all 2 heads"):
        remove_groups(_bert(), P.attention_heads(_bert()), ["blocks.0.attn.head0", "blocks.0.attn.head1"])
    with pytest.raises(ConfigError, match="name='nope'"):
        remove_groups(model, part, ["nope"])
    attached = _bert()
    attach(attached, P.attention_heads(attached))
    with pytest.raises(ConfigError, match="SparseController is attached"):
        remove_groups(attached, P.attention_heads(_bert()), ["blocks.0.attn.head0"])


def test_resnet_residual_coupled_filters_refused():
    model = _resnet()
    part = P.conv_filters(model)
    with pytest.raises(UnsupportedModelError, match="residual sum"):
        remove_groups(model, part, ["layer1.0.conv2.filter0"])


def test_carry_plain_torch_adamw_and_sgd():
    model = _vgg()
    part = P.conv_filters(model)
    x = _images()
    for make_opt in (lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)):
        m = copy.deepcopy(model)
        opt = make_opt(m.parameters())
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        old = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in m.named_parameters()}
        change = remove_groups(m, part, ["features.3.filter1", "features.0.filter0"])
        new = make_opt(m.parameters())
        carry_optimizer_state(opt, new, change)
        for n, p in m.named_parameters():
            for k, v in new.state[p].items():
                want = old[n][k] if v.dim() == 0 else change.select(n, old[n][k])
                assert torch.equal(v, want), (n, k)
        assert change.also_kept["features.3.weight"][0] == 1  # filters and input channels both went
