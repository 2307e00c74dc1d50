"""Residual-coupled channel groups (ntkit.pruning.dependency) and their surgery, float64.

The zoo rule and torch-pruning's dependency graph must give the same groups; masking a group
zeroes its channel at every residual sum (checked on the activations); surgery equals the masked
model (eval and train mode, and after one optimizer step), drops the expected parameter count,
carries SlicedAdamW state by index_select and replays onto a fresh model.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util

import pytest
import torch
from torch import nn

from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.models import ResNet56
from ntkit.pruning import dependency as D
from ntkit.pruning.dependency import coupled_channel_groups, coupling_sets
from ntkit.sparse import SlicedAdamW, attach
from ntkit.sparse.surgery import carry_optimizer_state, remove_groups, replay

HAVE_TP = importlib.util.find_spec("torch_pruning") is not None
needs_tp = pytest.mark.skipif(not HAVE_TP, reason="torch-pruning not installed (pip install 'ntkit[prune]')")
BACKENDS = ["zoo", pytest.param("torch_pruning", marks=needs_tp)]


def _resnet(seed: int = 0) -> ResNet56:
    torch.manual_seed(seed)
    model = ResNet56(width=0.25, blocks_per_stage=2).double()
    with torch.no_grad():  # non-trivial BN statistics and affine, so a dropped channel would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model.eval()


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _pick(part, seed: int = 5) -> list[str]:
    """A random third of every coupled set's channels (≥ 1 kept per set) + a few conv1 filters."""
    gen = torch.Generator().manual_seed(seed)
    names: list[str] = []
    for layer, idx in part.groups_by_layer().items():
        kind = part[idx[0]].kind
        k = max(1, len(idx) // 3) if kind == "channel" else (1 if layer.endswith("1.conv1") else 0)
        names += [part[idx[i]].name for i in torch.randperm(len(idx), generator=gen)[:k].tolist()]
    return names


def _expected_drop(model: nn.Module, names: list[str]) -> int:
    """Parameters lost, counted from the architecture by hand: per coupled channel, one row of each
    producer (conv weight row, BN weight + bias) and one input column of each consumer; per conv1
    filter, its row, its BN's two entries and conv2's input column; a weight shrinking along both
    dims counts the crossing elements once."""
    sets = {s.name: s for s in coupling_sets(model, backend="zoo")}
    mods = dict(model.named_modules())
    rows: dict[str, set[int]] = {}
    cols: dict[str, set[int]] = {}
    bn_lost = 0
    for n in names:
        layer, _, tail = n.rpartition(".")
        c = int(tail.removeprefix("channel").removeprefix("filter"))
        if tail.startswith("channel"):
            for p in sets[layer].producers:
                if isinstance(mods[p], nn.BatchNorm2d):
                    bn_lost += 2
                else:
                    rows.setdefault(p, set()).add(c)
            for q in sets[layer].consumers:
                cols.setdefault(q, set()).add(c)
        else:  # layerX.Y.conv1.filterC
            block = layer.rsplit(".", 1)[0]
            rows.setdefault(layer, set()).add(c)
            bn_lost += 2
            cols.setdefault(f"{block}.conv2", set()).add(c)
    total = bn_lost
    for mname in set(rows) | set(cols):
        w = mods[mname].weight
        per = w[0, 0].numel() if w.dim() == 4 else 1
        r, k = len(rows.get(mname, ())), len(cols.get(mname, ()))
        total += (r * w.shape[1] + k * w.shape[0] - r * k) * per
    return total


# ====================================================================== the groups
@needs_tp
def test_backends_agree_on_sets_and_groups():
    model, x = _resnet(), _images(2)
    zoo, tp = coupling_sets(model, backend="zoo"), coupling_sets(model, x, backend="torch_pruning")
    assert tp == zoo
    assert [(s.name, s.channels) for s in zoo] == [("layer1", 4), ("layer2", 8), ("layer3", 16)]
    assert zoo[0].producers == ("conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2")
    assert zoo[1].consumers == ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.shortcut.0")
    assert zoo[2].consumers == ("layer3.1.conv1", "fc")
    a = coupled_channel_groups(model, backend="zoo", include_filters=True)
    b = coupled_channel_groups(model, x, include_filters=True)  # auto = torch-pruning (installed here)
    assert a.groups == b.groups
    assert len(a) == 4 + 8 + 16 + 2 * (4 + 8 + 16)  # + one filter per block conv1 channel
    assert coupled_channel_groups(model, backend="zoo").groups == [g for g in a if g.kind == "channel"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_a_group_zeroes_its_channel_at_every_residual_sum(backend):
    model, x = _resnet(), _images(2)
    part = coupled_channel_groups(model, x, backend=backend)
    names = ["layer1.channel1", "layer2.channel0", "layer2.channel5", "layer3.channel7"]
    ctl = attach(model, part)
    ctl.set_pruned(torch.tensor([n in names for n in part.names]))
    seen: dict[str, torch.Tensor] = {}
    taps = {"relu_stem": model.bn1, **{f"{s}.{j}": getattr(model, s)[j] for s in ("layer1", "layer2", "layer3")
                                       for j in range(2)}}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, m in taps.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    ctl.detach()
    for key, out in seen.items():
        stage = "layer1" if key == "relu_stem" else key.split(".")[0]
        zero = [int(n.rsplit("channel", 1)[1]) for n in names if n.startswith(stage + ".")]
        assert torch.count_nonzero(out[:, zero]) == 0, key
        others = [c for c in range(out.shape[1]) if c not in zero]
        assert torch.count_nonzero(out[:, others]) > 0, key


def test_errors_and_missing_extra(monkeypatch):
    model = _resnet()
    with pytest.raises(ConfigError, match="backend='nope'"):
        coupling_sets(model, backend="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="example_input=None"):
        coupling_sets(model, backend="torch_pruning")
    with pytest.raises(UnsupportedModelError, match="no coupling rule registered for Sequential"):
        coupling_sets(nn.Sequential(nn.Conv2d(3, 4, 3)), backend="zoo")
    real = importlib.import_module

    def no_tp(name, *a, **k):
        if name == "torch_pruning":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(D.importlib, "import_module", no_tp)
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UnsupportedModelError, match=r"pip install 'ntkit\[prune\]'"):
        coupling_sets(model, _images(2), backend="torch_pruning")
    assert coupling_sets(model) == coupling_sets(model, backend="zoo")  # auto falls back to the rule
    with pytest.raises(UnsupportedModelError, match="no registered coupling rule and torch-pruning"):
        coupling_sets(nn.Sequential(nn.Conv2d(3, 4, 3)))
    part = coupled_channel_groups(model)
    with pytest.raises(ConfigError, match="'layer1' would lose all 4 channels"):
        remove_groups(model, part, [f"layer1.channel{c}" for c in range(4)])


# ====================================================================== surgery
def _two_steps(model: nn.Module, part, x) -> SlicedAdamW:
    """Two SlicedAdamW steps (train mode) with different active sets, so per-index steps differ."""
    ctl = attach(model, part)
    opt = SlicedAdamW(model, ctl, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(2):
        ctl.set_active(torch.rand(len(part), generator=gen) < 0.6)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    opt.flush()
    model.eval()
    return opt


@pytest.mark.parametrize("surgery", ["zoo_rule", pytest.param("traced", marks=needs_tp)])
def test_channel_surgery_equals_masked_model_and_carries_state(surgery, monkeypatch):
    model, x = _resnet(), _images()
    part = coupled_channel_groups(model, backend="zoo", include_filters=True)
    names = _pick(part)
    assert {part[part.names.index(n)].kind for n in names} == {"channel", "filter"}
    old_opt = _two_steps(model, part, x)
    old_ctl = old_opt.ctl
    old_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_state = {n: {k: v.clone() for k, v in old_opt.state[p].items()} for n, p in model.named_parameters()}
    n_before = sum(p.numel() for p in model.parameters())
    old_ctl.detach()

    ref = copy.deepcopy(model)
    ref_ctl = attach(ref, part)
    ref_ctl.set_pruned(torch.tensor([n in names for n in part.names]))
    expected_drop = _expected_drop(model, names)
    fresh = _resnet(seed=7)
    fresh_part = coupled_channel_groups(fresh, backend="zoo", include_filters=True)
    kw = {}
    if surgery == "traced":  # no registered rule: the coupling comes from torch-pruning's trace
        monkeypatch.setattr(D, "_rule_for", lambda model: None)
        kw = {"example_input": x}
    change = remove_groups(model, part, names, **kw)

    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-10
    assert n_before - sum(p.numel() for p in model.parameters()) == expected_drop
    assert model.layer2[0].shortcut[0].out_channels == model.layer2[1].conv1.in_channels == model.layer2[0].bn2.num_features
    assert model.fc.in_features == model.layer3[1].bn2.weight.shape[0] == model.layer3[0].shortcut[1].running_mean.shape[0]
    # a weight losing filters and input channels in one surgery: kept (dim 0) then also_kept (dim 1)
    both = [n for n in change.also_kept if n.endswith("conv1.weight")]
    assert both and all(change.kept[n][0] == 0 and change.also_kept[n][0] == 1 for n in both)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), change.select(n, old_params[n])), n
    assert change.partition.names == [n for n in part.names if n not in names]

    # train mode: batch statistics of the surviving channels are the same, so outputs match too
    model.train()
    ref.train()
    assert (model(x) - ref(x)).abs().max().item() <= 1e-10
    model.eval()
    ref.eval()

    # optimizer state carried by index_select
    new_ctl = attach(model, change.partition)
    new_opt = SlicedAdamW(model, new_ctl, lr=1e-2)
    carry_optimizer_state(old_opt, new_opt, change)
    for n, p in model.named_parameters():
        st, ost = new_opt.state[p], old_state[n]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], change.select(n, ost[key])), (n, key)
        step = ost["step"]
        if n in old_ctl.slicings and step.dim() == 1:
            for d, idx in change.selections(n):
                if d == old_ctl.slicings[n].dim:
                    step = step.index_select(0, idx)
        assert torch.equal(st["step"], step), n
    new_ctl.detach()

    # a pruned checkpoint loads into a fresh model after replay (two rounds); outputs identical
    replay(fresh, fresh_part, [names[:2], names[2:]], **kw)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_one_train_step_after_surgery_matches_the_masked_model():
    """Pruned model vs masked model, one train-mode SGD step each (BN in batch-statistics mode):
    the surviving parameters receive the same gradients, so the models stay equal (eval outputs
    and running statistics)."""
    model, x = _resnet(), _images()
    part = coupled_channel_groups(model, backend="zoo")
    names = _pick(part, seed=11)
    ref = copy.deepcopy(model)
    ctl = attach(ref, part)
    ctl.set_pruned(torch.tensor([n in names for n in part.names]))
    remove_groups(model, part, names)
    for m in (model, ref):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m.train()
        opt.zero_grad()
        m(x).logsumexp(1).sum().backward()
        opt.step()
        m.eval()
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-10
    ctl.detach()
