"""The contract between training methods and the loops that use them.

A method is a small object with hooks that a plain training loop calls (STYLE.md §5); it never
owns the loop and never computes kernels itself (it calls :func:`ntkit.modular_ntk`). The loop
(a recipe, or a user's own) does, per step::

    method.on_epoch_start(ctx)                 # at each epoch start
    method.before_step(ctx)                    # decide the active set for this step
    loss = ...; loss.backward()                # partial backward executes only active work
    optimizer.step(lr_scale=method.lr_scale()) # SlicedAdamW: only active slices move
    method.after_step(ctx)
    method.on_epoch_end(ctx)                   # MAT evaluates the mNTK here every `interval` epochs

The method talks to the model only through the :class:`ntkit.sparse.SparseController` it was
bound to (``set_active`` / ``set_pruned``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ntkit._registry import Registry
from ntkit.partition import Partition

__all__ = ["METHODS", "LoopContext", "TrainingMethod", "build_method", "list_methods", "register_method"]


@dataclass
class LoopContext:
    """What a loop tells its method at each hook.

    Attributes:
        model: the model being trained (train mode during steps).
        epoch: current epoch (0-based); step: global optimizer step (0-based).
        steps_per_epoch: optimizer steps per epoch.
        ntk_batch: ``ntk_batch(S, generator)`` → ``(inputs, output_mask)`` — S random training samples
            in the form :func:`ntkit.modular_ntk` takes (``output_mask`` None for classifiers, the
            masked positions [S, T] for MLM).
        count_overhead: context-manager factory; FLOPs executed inside it are booked as the
            method's overhead (mNTK evaluation), not as training compute.
        log: ``log(dict)`` — append a record to the run's metrics log.
    """

    model: nn.Module
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 1
    ntk_batch: Callable[..., tuple[Any, Tensor | None]] | None = None
    count_overhead: Callable[[], Any] | None = None
    log: Callable[[dict], None] = field(default=lambda rec: None)


class TrainingMethod:
    """Base class with no-op hooks; methods override what they need (nothing is mandatory).

    ``bind`` is called once before training with the model, its partition and the sparse
    controller. Methods keep their decision history in ``self.history`` (a list of JSON-able
    dicts) and implement ``state_dict``/``load_state_dict`` for exact resume.
    """

    name: str = "base"

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.partition: Partition | None = None
        self.controller: Any = None

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        self.partition = partition
        self.controller = controller

    def on_epoch_start(self, ctx: LoopContext) -> None: ...

    def before_step(self, ctx: LoopContext) -> None: ...

    def lr_scale(self) -> Tensor | None:
        """Per-group learning-rate multiplier [M] for this step (None = all 1)."""
        return None

    def after_step(self, ctx: LoopContext) -> None: ...

    def on_epoch_end(self, ctx: LoopContext) -> None: ...

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))


METHODS: Registry[Callable[..., TrainingMethod]] = Registry("method")


def register_method(name: str):
    """Decorator registering a method factory (usually the class) under ``name``."""
    return METHODS.register(name)


def list_methods() -> list[str]:
    return METHODS.names()


def build_method(name: str, **kw: Any) -> TrainingMethod:
    return METHODS.get(name)(**kw)
