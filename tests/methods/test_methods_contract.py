"""Every registered method through the hook sequence of a plain loop, with the real controller and
optimizer on a tiny BERT: a module's parameters move at a step iff the controller had it active
(and unpruned) then; history and state are JSON-able and a rebuilt method resumes identically."""

from __future__ import annotations

import json

import pytest
import torch
from method_fakes import VOCAB, mlm_batch, tiny_bert

from ntkit.methods import LoopContext, build_method, list_methods
from ntkit.partition import attention_heads
from ntkit.sparse import SlicedAdamW, attach

KW = {
    "vanilla": {},
    "mat": {"alpha": {"head": 0.5}, "start_epoch": 1, "interval": 1, "num_samples": 3},
    "rand": {"seed": 1},
    "multirate": {"k": 2, "seed": 1},
    "mat_prune": {"prune_epoch": 1, "start_epoch": 1, "interval": 1, "num_samples": 3},
    "snip_struct": {"fraction": 0.5},
    # masks only here (this plain loop has no change_structure); surgery: tests/methods/test_structured_prune.py
    "structured_prune": {"criterion": "att_score", "ratio": 0.5, "t": 0, "surgery": False},
    "lth": {"ratio": 0.5, "rounds": 2, "t0": 0, "rewind_frac": 0.2, "epochs": 3, "surgery": False},
    "plreg": {"ratio": 0.5, "t": 1, "num_samples": 3, "gate_steps": 1, "gate_batch": 2, "surgery": False,
              "track_every": 0},
    "ntt": {"steps": 1},  # acts only at_init (tests/methods/test_ntt.py); here: hooks are no-ops
    # MAT's decisions as harness.compare hands them over (tests/harness/test_loop_optim_controls.py)
    "rand_replay": {
        "schedule": [
            {"epoch": 0, "active": attention_heads(tiny_bert()).names[::2]},
            {"epoch": 1, "active": attention_heads(tiny_bert()).names[:1]},
        ],
        "seed": 1,
    },
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(n, gen, device):
    ids, mask = mlm_batch(n, gen)
    return ids.to(device), mask.to(device)


def _loss(model, gen, device="cpu"):
    ids, mask = _batch(4, gen, device)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    return torch.nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))


def test_every_registered_method_is_covered():
    assert sorted(KW) == [m for m in list_methods() if not m.startswith("_")]  # "_x": tests' own methods


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(KW))
def test_method_contract(name, device):
    model = tiny_bert().to(device)
    part = attention_heads(model)
    ctl = attach(model, part)
    opt = SlicedAdamW(model, ctl, lr=1e-2)
    data = torch.Generator().manual_seed(0)
    method = build_method(name, **KW[name])
    method.bind(model, part, ctl)
    params = dict(model.named_parameters())
    # a "batch" here is the generator _loss draws from; label-free methods get no loss (see the loop)
    ctx = LoopContext(model=model, steps_per_epoch=2, ntk_batch=lambda s, g: _batch(s, g, device),
                      loss_fn=lambda m, b: _loss(m, b, device),
                      sample_batch=lambda n, g: torch.Generator().manual_seed(9),
                      sample_inputs=lambda n, g: _batch(n, g, device)[0])
    if name != "ntt":  # NTT's at-init needs a Linear/Conv model (tests/methods/test_ntt.py), not BERT
        method.at_init(ctx)
    saw_partial = False
    state_mid = None
    for epoch in range(3):
        ctx.epoch = epoch
        method.on_epoch_start(ctx)
        model.train()
        for i in range(ctx.steps_per_epoch):
            ctx.step = epoch * ctx.steps_per_epoch + i
            method.before_step(ctx)
            active = ctl.active.clone()
            saw_partial |= not bool(active.all())
            before = {n: p.detach().clone() for n, p in params.items()}
            opt.zero_grad(set_to_none=True)
            _loss(model, data, device).backward()
            opt.step(lr_scale=method.lr_scale())
            method.after_step(ctx)
            for gi, g in enumerate(part):
                moved = any(
                    not torch.equal(s.select(params[s.param].detach()), s.select(before[s.param]))
                    for s in g.slices
                )
                assert moved == bool(active[gi]), (name, ctx.step, g.name)
        model.eval()
        method.on_epoch_end(ctx)
        if epoch == 1:
            state_mid = json.loads(json.dumps(method.state_dict(), allow_nan=False))
    assert saw_partial == (name not in ("vanilla", "ntt"))
    json.dumps(method.history, allow_nan=False)
    # a rebuilt method loaded from the mid-run state holds the same state
    again = build_method(name, **KW[name])
    again.load_state_dict(state_mid)
    fresh = tiny_bert().to(device)
    again.bind(fresh, attention_heads(fresh), attach(fresh, attention_heads(fresh)))
    assert json.loads(json.dumps(again.state_dict())) == state_mid
