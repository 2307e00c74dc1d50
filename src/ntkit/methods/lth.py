"""LTH: iterative magnitude pruning of structures with rewinding (Frankle & Carbin 2019; IMP with
rewinding as in Chen et al. 2020 for BERT; seed 002: "rewinding step of 5% maximum training
epochs").

Within one run of the loop:

1. **Rewind point.** Before optimizer step ``s_r = round(rewind_frac · E · steps_per_epoch)``
   (E = ``epochs``, the run's length; ``epochs=0``: the epochs up to the last round,
   ``t0 + (rounds − 1)·every + 1``) the whole model state (parameters and buffers, e.g. BatchNorm
   statistics) is saved — ``rewind_frac=0`` rewinds to the initial weights (the original LTH).
2. **Rounds.** At the end of epochs ``t0, t0 + every, …`` (``rounds`` of them; ``t0=-1``: =
   ``every − 1``) the structures of ``kind`` are scored by magnitude (``criterion`` "l1": Σ|θ|,
   "l2": ‖θ‖₂ over each structure's slices) and the lowest pruned so that after round k the total
   is ``round((1 − (1 − p)^k) · n₀)`` of the original count n₀, with p = 1 − (1 − ratio)^(1/rounds)
   (``ratio`` after the last round), ≥ 1 per layer with ``protect``.
3. **Rewind.** The surviving weights (and buffers) are reset to the saved point, then (with
   ``surgery``) the pruned structures are removed physically and the loop rebuilds the optimizer;
   the saved point is then the reduced model's state, so later rounds rewind the same way.

Where we differ from IMP: IMP trains each round to completion and restarts the learning-rate
schedule and optimizer at the rewind step; here the rounds share one run of the loop (each round
``every`` epochs of training), the loop's learning-rate schedule continues, and the optimizer's
moments of surviving weights are carried over, not rewound (a method cannot reset the loop's
optimizer). Structures, not single weights, are pruned (seed 002 reports it as a structured
baseline for heads and experts; its VGG appendix ran unstructured LTH — see the recipes' reports).

State: the saved point is part of :meth:`LTH.state_dict` (JSON-able: each tensor as
``{"dtype", "shape", "data": base64 of its bytes}``), so a resumed run rewinds bit for bit.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ntkit.errors import ConfigError, check
from ntkit.methods.base import LoopContext, make_config, register_method
from ntkit.methods.structured_prune import StructurePruning, _bool, _int, _ratio
from ntkit.pruning.importance import Magnitude
from ntkit.pruning.schedules import Iterative

__all__ = ["LTH", "LTHConfig", "decode_tensor", "encode_tensor"]


@dataclass
class LTHConfig:
    """Settings of ``lth``.

    Attributes:
        kind: the structure kind pruned (``"head"``, ``"expert"``, ``"filter"``).
        ratio: total share of the kind's original structures pruned after the last round, in [0, 1).
        rounds: pruning rounds, ≥ 1.
        every: epochs of training per round, ≥ 1.
        t0: epoch (0-based) at whose end the first round prunes (-1: ``every - 1``).
        rewind_frac: the rewind point as a share of the run's steps, in [0, 1) (paper: 0.05).
        epochs: the run's length in epochs that ``rewind_frac`` refers to (0: up to the last round).
        criterion: ``"l1"`` (Σ|θ|) or ``"l2"`` (‖θ‖₂) per structure.
        surgery: physically remove the pruned structures after each round (False: keep them masked).
        protect: keep ≥ 1 structure per layer (required with ``surgery``).
    """

    kind: str = "head"
    ratio: float = 0.5
    rounds: int = 3
    every: int = 1
    t0: int = -1
    rewind_frac: float = 0.05
    epochs: int = 0
    criterion: str = "l1"
    surgery: bool = True
    protect: bool = True

    def __post_init__(self) -> None:
        check(isinstance(self.kind, str) and bool(self.kind), "kind", self.kind, "a module kind name")
        _ratio(self.ratio, "ratio")
        _int(self.rounds, "rounds", 1)
        _int(self.every, "every", 1)
        _int(self.t0, "t0", -1)
        _ratio(self.rewind_frac, "rewind_frac")
        _int(self.epochs, "epochs", 0)
        check(self.criterion in ("l1", "l2") if isinstance(self.criterion, str) else False, "criterion",
              self.criterion, "'l1' or 'l2'")
        _bool(self.surgery, "surgery")
        _bool(self.protect, "protect")
        check(self.protect or not self.surgery, "protect", self.protect,
              "True with surgery=True (surgery cannot empty a layer; set surgery=False)")

    @property
    def first(self) -> int:
        """The first round's epoch."""
        return self.every - 1 if self.t0 == -1 else self.t0

    def plan(self) -> Iterative | None:
        """The rounds as an :class:`~ntkit.pruning.Iterative` schedule (None when ``ratio == 0``)."""
        # -expm1(log1p(-r)/k): 1 − (1 − r)^(1/k) without cancelling to 0 for tiny r
        p = -math.expm1(math.log1p(-float(self.ratio)) / self.rounds)
        if p <= 0.0:  # ratio 0 (or below float resolution): nothing to prune
            return None
        return Iterative(p, self.rounds, self.every, t0=self.first)

    def rewind_step(self, steps_per_epoch: int) -> int:
        """The optimizer step before which the rewind point is saved."""
        epochs = self.epochs or self.first + (self.rounds - 1) * self.every + 1
        return round(float(self.rewind_frac) * epochs * int(steps_per_epoch))


def encode_tensor(t: Tensor) -> dict:
    """A tensor as JSON-able ``{"dtype", "shape", "data": base64 of its C-order bytes}`` (exact)."""
    a = t.detach().cpu().contiguous()
    raw = a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b""  # 0-dim: 1 element
    return {"dtype": str(a.dtype).removeprefix("torch."), "shape": list(a.shape),
            "data": base64.b64encode(raw).decode("ascii")}


def decode_tensor(d: Mapping[str, Any]) -> Tensor:
    """The inverse of :func:`encode_tensor` (a CPU tensor)."""
    dtype = getattr(torch, str(d["dtype"]))
    raw = bytearray(base64.b64decode(d["data"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape([int(x) for x in d["shape"]]).clone() if raw else \
        torch.empty([int(x) for x in d["shape"]], dtype=dtype)


@register_method("lth", config=LTHConfig)
class LTH(StructurePruning):
    """Iterative magnitude pruning of structures with rewinding (module docstring).

    Args:
        config: an :class:`LTHConfig` or a mapping of its fields (or the fields as keywords).

    ``history`` gets ``{"event": "rewind_point", "step"}`` when the point is saved and one
    ``{"event": "prune", …, "round": k, "rewound_to": step}`` per round.
    """

    name = "lth"

    def __init__(self, config: LTHConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(LTHConfig, config, kw, self.name)
        self.schedule = self.config.plan()
        self.saved: dict[str, Tensor] | None = None  # the rewind point: model.state_dict() tensors (CPU)
        self.saved_step: int | None = None

    def before_step(self, ctx: LoopContext) -> None:
        if self.saved is not None or self.schedule is None:
            return
        spe = int(ctx.steps_per_epoch)
        s_r = self.config.rewind_step(spe)
        first_end = (self.config.first + 1) * spe
        if s_r >= first_end:
            raise ConfigError(f"lth.rewind_frac={self.config.rewind_frac}: the rewind point (step {s_r}) must "
                              f"come before the first round ends (step {first_end})")
        if int(ctx.step) >= s_r:
            assert self.model is not None, "bind() first"
            self.saved = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.saved_step = int(ctx.step)
            rec = {"event": "rewind_point", "step": int(ctx.step)}
            self.history.append(rec)
            ctx.log(rec)

    def on_epoch_end(self, ctx: LoopContext) -> None:
        if self.schedule is None or not self.schedule.due(int(ctx.epoch)):
            return
        if self.saved is None:
            raise ConfigError(f"lth.rewind_frac={self.config.rewind_frac}: no rewind point was saved before "
                              f"the round at epoch {ctx.epoch} (before_step was not called)")
        rnd = self.schedule.round_at(int(ctx.epoch))
        scorer = Magnitude(p=1 if self.config.criterion == "l1" else 2)

        def scores() -> Tensor:
            assert self.model is not None and self.partition is not None
            return scorer(self.model, self.partition)

        names = self.prune_to(ctx, self.schedule.ratio_at(int(ctx.epoch)), scores, self.config.criterion,
                              extra={"round": rnd, "rewound_to": self.saved_step}, before_surgery=self._rewind)
        if not names:  # nothing pruned (already at the target, or refused): no rewind either
            return
        assert self.model is not None
        # the saved point follows the structure: after surgery it is the reduced model's state
        self.saved = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _rewind(self) -> None:
        assert self.model is not None and self.saved is not None
        state = self.model.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(self.saved[k].to(v.device))

    def state_dict(self) -> dict:
        st = super().state_dict()
        st["saved_step"] = self.saved_step
        st["saved"] = None if self.saved is None else {k: encode_tensor(v) for k, v in self.saved.items()}
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.saved_step = None if state.get("saved_step") is None else int(state["saved_step"])
        saved = state.get("saved")
        self.saved = None if saved is None else {str(k): decode_tensor(v) for k, v in saved.items()}

