"""MAT with the real engine, partition builder, sparse controller and optimizer on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from method_fakes import VOCAB, mlm_batch, run_epochs, tiny_bert

from ntkit.methods import LoopContext, build_method, ntk_lambda_max
from ntkit.partition import attention_heads
from ntkit.sparse import SlicedAdamW, attach


def test_ntk_lambda_max_matches_brute_force_float64():
    model = tiny_bert(torch.float64)
    part = attention_heads(model)
    ids, mask = mlm_batch(4, torch.Generator().manual_seed(1))
    model.train()
    got = ntk_lambda_max(model, ids, part, mask)
    assert model.training  # mode restored
    model.eval()
    params = dict(model.named_parameters())
    jac = [[] for _ in part]
    for i in range(ids.shape[0]):
        out = model(ids[i : i + 1])[0]  # [T, V]
        f = out[mask[i]].sum()  # sum of logits at the masked positions
        grads = dict(zip(params, torch.autograd.grad(f, list(params.values()), allow_unused=True)))
        for gi, g in enumerate(part):
            jac[gi].append(torch.cat([s.select(grads[s.param]).reshape(-1) for s in g.slices]))
    want = torch.stack([torch.linalg.eigvalsh((j := torch.stack(rows)) @ j.T)[-1] for rows in jac])
    assert torch.allclose(got, want, rtol=1e-10, atol=0)


def test_mat_on_tiny_bert_updates_only_active_heads():
    model = tiny_bert()
    part = attention_heads(model)
    assert len(part) >= 4 and set(part.kinds) == {"head"}
    ctl = attach(model, part)
    opt = SlicedAdamW(model, ctl, lr=1e-2)
    # α = 0.5 with protection: some heads off, one per layer at least on
    method = build_method("mat", alpha={"head": 0.5}, beta=0.0, start_epoch=1, interval=1, num_samples=4)
    method.bind(model, part, ctl)
    data = torch.Generator().manual_seed(0)

    def loss_on_batch():
        ids, mask = mlm_batch(6, data)
        logits = model(ids)
        labels = torch.where(mask, ids, torch.full_like(ids, -100))
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100
        )

    ctx = LoopContext(model=model, steps_per_epoch=3, ntk_batch=lambda s, g: mlm_batch(s, g))

    def train_epoch(epoch: int) -> None:
        ctx.epoch = epoch
        method.on_epoch_start(ctx)
        model.train()
        for i in range(ctx.steps_per_epoch):
            ctx.step = epoch * ctx.steps_per_epoch + i
            method.before_step(ctx)
            opt.zero_grad(set_to_none=True)
            loss_on_batch().backward()
            opt.step(lr_scale=method.lr_scale())
            method.after_step(ctx)
        model.eval()
        method.on_epoch_end(ctx)

    train_epoch(0)
    rec = method.history[0]
    active = ctl.active.clone()
    assert rec["active"] == [n for n, a in zip(part.names, active.tolist()) if a]
    assert 0 < int(active.sum()) < len(part)  # a real partial decision
    assert set(rec["lambda_max"]) == set(part.names) and all(v > 0 for v in rec["lambda_max"].values())
    layers = {g.layer for g in part}
    assert all(any(a for g, a in zip(part, active.tolist()) if g.layer == lay) for lay in layers)

    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    ctx.epoch = 1
    method.on_epoch_start(ctx)
    model.train()
    for i in range(2):
        ctx.step = 3 + i
        method.before_step(ctx)
        opt.zero_grad(set_to_none=True)
        loss_on_batch().backward()
        opt.step(lr_scale=method.lr_scale())
    for gi, g in enumerate(part):
        moved = any(
            not torch.equal(s.select(params[s.param].detach()), s.select(before[s.param])) for s in g.slices
        )
        assert moved == bool(active[gi]), g.name
    # parameters outside any head (embeddings, FFN, norms, the shared proj bias) train normally
    shared = [n for n in params if n not in set(part.covered_params())]
    assert shared and all(
        not torch.equal(params[n].detach(), before[n]) for n in shared if "pos_emb" not in n
    )


def test_mat_runs_through_the_hooks_and_logs():
    model = tiny_bert()
    part = attention_heads(model)
    ctl = attach(model, part)
    method = build_method("mat", alpha=0.3, start_epoch=1, interval=2, num_samples=3)
    method.bind(model, part, ctl)
    logged: list = []
    ctx = LoopContext(
        model=model, steps_per_epoch=1, ntk_batch=lambda s, g: mlm_batch(s, g), log=logged.append
    )
    model.eval()
    run_epochs(method, ctx, range(3))
    assert [r["epoch"] for r in logged] == [0, 2] and logged == method.history


def test_native_layers_equals_the_pruned_forward_and_restores_exactly():
    from ntkit.methods._common import native_layers

    model = tiny_bert(torch.float64)
    part = attention_heads(model)
    ctl = attach(model, part)
    pruned = torch.zeros(len(part), dtype=torch.bool)
    pruned[::2] = True
    ctl.set_pruned(pruned)
    ctl.set_active(~pruned)
    model.eval()
    ids, mask = mlm_batch(4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    classes = [type(m) for m in model.modules()]
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    with native_layers(ctl, model):
        assert all(
            type(m).forward in (torch.nn.Linear.forward,)
            for m in model.modules()
            if isinstance(m, torch.nn.Linear)
        )
        with torch.no_grad():
            inside = model(ids)
        lmax = ntk_lambda_max(model, ids, part.subset([1, 3]), mask[:, :])
    assert torch.allclose(inside, ref, rtol=0, atol=1e-12)
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())
    # the measurement through MAT (which uses native_layers) sees the same kernel
    method = build_method("mat", alpha=0.5, start_epoch=1, interval=1, num_samples=4)
    method.bind(model, part, ctl)
    ctx = LoopContext(model=model, ntk_batch=lambda s, g: (ids, mask))
    got = method.measure(ctx, torch.ones(len(part), dtype=torch.bool))
    assert torch.isnan(got[pruned]).all()
    assert torch.allclose(got[~pruned], lmax, rtol=1e-10, atol=0)
    assert torch.equal(ctl.pruned, pruned) and torch.equal(ctl.active, method.active)


def test_mat_on_tiny_switch_decides_heads_and_experts_separately():
    from ntkit.models import switch_mlm
    from ntkit.partition import Partition, moe_experts

    torch.manual_seed(0)
    model = switch_mlm("tiny", num_experts=4, vocab_size=VOCAB, max_len=8, dropout=0.0)
    part = Partition(list(attention_heads(model).groups) + list(moe_experts(model).groups))
    ctl = attach(model, part)
    method = build_method("mat", alpha={"head": 0.1, "expert": 0.2}, start_epoch=1, interval=1, num_samples=6,
                          threshold_scope="global")
    method.bind(model, part, ctl)
    model.train()  # MAT switches to eval for the measurement (SwitchFFN capacity couples samples)
    ctx = LoopContext(model=model, ntk_batch=lambda s, g: mlm_batch(s, g))
    active = method.decide(ctx, method.measure(ctx, method.governed))
    assert model.training
    rec = method.history[0]
    assert set(rec["threshold"]) == {"head", "expert"}
    for kind, alpha in (("head", 0.1), ("expert", 0.2)):
        lam = torch.tensor([rec["lambda_max"][g.name] for g in part if g.kind == kind])
        assert rec["threshold"][kind] == pytest.approx(float(lam.min() + (lam.max() - lam.min()) * alpha))
        on = torch.tensor([bool(active[i]) for i, g in enumerate(part) if g.kind == kind])
        assert torch.equal(on | (lam <= rec["threshold"][kind]), torch.ones_like(on))  # above → on
    assert torch.equal(ctl.active, active)
