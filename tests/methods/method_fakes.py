"""Fakes for method tests (imported by the test modules of this folder): a controller that
records what it is told, and a small partition."""

from __future__ import annotations

import torch

from ntkit.methods.base import LoopContext
from ntkit.models import bert_mlm
from ntkit.partition import ModuleGroup, ParamSlice, Partition


class FakeController:
    """Implements the controller surface the methods use (``set_active``/``set_pruned``/
    ``active``/``pruned``) and records every call."""

    def __init__(self, m: int) -> None:
        self._requested = torch.ones(m, dtype=torch.bool)
        self._pruned = torch.zeros(m, dtype=torch.bool)
        self.calls: list[tuple[str, list[bool]]] = []

    @property
    def active(self) -> torch.Tensor:
        return self._requested & ~self._pruned

    @property
    def pruned(self) -> torch.Tensor:
        return self._pruned.clone()

    def set_active(self, active) -> None:
        a = torch.as_tensor(active, dtype=torch.bool)
        assert a.shape == self._requested.shape
        self._requested = a.clone()
        self.calls.append(("active", a.tolist()))

    def set_pruned(self, pruned) -> None:
        p = torch.as_tensor(pruned, dtype=torch.bool)
        assert p.shape == self._pruned.shape
        self._pruned = p.clone()
        self.calls.append(("pruned", p.tolist()))


def make_partition(layout: dict[str, tuple[str, int]]) -> Partition:
    """``{layer: (kind, n_modules)}`` → a Partition with groups named ``f"{layer}.{i}"``.

    Slices are dummies (one row each of a parameter named after the layer): methods never read
    them without a real model.
    """
    groups = []
    for layer, (kind, n) in layout.items():
        for i in range(n):
            groups.append(ModuleGroup(f"{layer}.{i}", kind, layer, (ParamSlice(f"{layer}.w", 0, i, i + 1),)))
    return Partition(groups)


# 3 attention layers × 4 heads and 2 MoE layers × 4 experts (M = 20)
LAYOUT = {
    "l0.attn": ("head", 4),
    "l1.attn": ("head", 4),
    "l2.attn": ("head", 4),
    "l0.moe": ("expert", 4),
    "l1.moe": ("expert", 4),
}


class ScriptedLambda:
    """Stands in for ``scores.ntk_lambda_max``: returns λmax from a per-call script, or computed
    from the drawn inputs (so that results depend on the method's RNG)."""

    def __init__(self, script: list[dict[str, float]] | None = None) -> None:
        self.script = script
        self.calls: list[list[str]] = []

    def __call__(self, model, inputs, partition, output_mask=None, controller=None):
        names = partition.names
        self.calls.append(list(names))
        if self.script is not None:
            table = self.script[len(self.calls) - 1]
            return torch.tensor([table[n] for n in names], dtype=torch.float64)
        base = float(inputs.double().sum())
        return torch.tensor([(base * (i + 1)) % 97 + 1 for i, _ in enumerate(names)], dtype=torch.float64)


def make_ctx(draws: list | None = None) -> LoopContext:
    def ntk_batch(s, generator):
        x = torch.randint(0, 1000, (s,), generator=generator)
        if draws is not None:
            draws.append(x.tolist())
        return x, None

    return LoopContext(model=torch.nn.Linear(1, 1), ntk_batch=ntk_batch, steps_per_epoch=2)


def run_epochs(method, ctx: LoopContext, epochs: range, active_log: list | None = None, ctl=None) -> None:
    """The hook sequence of a plain loop (see ntkit.methods.base)."""
    for epoch in epochs:
        ctx.epoch = epoch
        method.on_epoch_start(ctx)
        for i in range(ctx.steps_per_epoch):
            ctx.step = epoch * ctx.steps_per_epoch + i
            method.before_step(ctx)
            method.lr_scale()
            method.after_step(ctx)
            if active_log is not None:
                active_log.append(ctl.active.tolist())
        method.on_epoch_end(ctx)


VOCAB, T = 40, 8


def tiny_bert(dtype=torch.float32):
    torch.manual_seed(0)
    return bert_mlm("tiny", vocab_size=VOCAB, max_len=T, dropout=0.0).to(dtype)


def mlm_batch(n: int, generator: torch.Generator):
    ids = torch.randint(0, VOCAB, (n, T), generator=generator)
    mask = torch.rand(n, T, generator=generator) < 0.3
    mask[:, 0] = True  # at least one predicted position per sample
    return ids, mask
