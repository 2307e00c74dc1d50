"""SparseController.dense_view: the mNTK engine measures an attached, partly pruned model with its
fast per-sample rules, and everything comes back bit for bit."""

from __future__ import annotations

import torch

from ntkit import modular_ntk
from ntkit.models import build_model
from ntkit.partition import attention_heads
from ntkit.sparse import attach


def test_dense_view_uses_hooks_and_matches_the_zeroed_dense_model() -> None:
    torch.manual_seed(0)
    model = build_model("bert_mlm", size="tiny", vocab_size=97, max_len=16, dropout=0.0).double().eval()
    part = attention_heads(model)
    ids = torch.randint(5, 97, (6, 8))
    ctl = attach(model, part)
    pruned = torch.zeros(len(part), dtype=torch.bool)
    pruned[0] = True
    ctl.set_pruned(pruned)
    ctl.set_active(torch.tensor([False, True, False, True]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    with ctl.dense_view():
        got = modular_ntk(model, ids, part)
    assert got.strategy == "hooks" and got.fallback_layers == []

    # restored bit for bit
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    # reference: a plain copy with the pruned head's slices zeroed
    ctl.detach()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for s in part[0].slices:
            s.select(params[s.param]).zero_()
    ref = modular_ntk(model, ids, part, strategy="brute_force")
    err = (got.grams - ref.grams).norm() / ref.grams.norm()
    assert err <= 1e-10
    assert torch.count_nonzero(got.grams[0]) == 0  # a pruned head has no Jacobian
