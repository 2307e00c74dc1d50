"""The contract between training methods and the loops that use them.

A method is a small object with hooks that a plain training loop calls (STYLE.md §5); it never
owns the loop and never computes kernels itself (it calls :func:`ntkit.modular_ntk`). The loop
(:func:`ntkit.harness.train_run`, or a user's own) does::

    method.bind(model, partition, controller)
    method.at_init(ctx)                        # once, fresh runs only: masks / new initial weights
    for epoch ...:
        method.on_epoch_start(ctx)
        for batch ...:
            method.before_step(ctx)            # decide the active set for this step
            loss = task_loss(model, batch)
            extra = method.loss_term(ctx, batch, loss)   # e.g. a Hessian-trace penalty; None = none
            (loss + extra).backward()          # partial backward executes only active work
            optimizer.step(lr_scale=method.lr_scale())   # SlicedAdamW: only active slices move
            method.after_step(ctx)
        method.on_epoch_end(ctx)               # MAT evaluates the mNTK here every `interval` epochs

Three events reach beyond one step:

* **at initialisation** (:meth:`TrainingMethod.at_init`): methods that only produce a mask or new
  initial weights (SNIP, GraSP, Logit-SNIP, random masks, NTT) do their work here, once, before
  the first step; the loop does not call it again on resume (the result is in the checkpoint).
  A method with ``needs_labels = False`` gets a context whose ``loss_fn`` and ``sample_batch``
  are None: only ``sample_inputs`` (unlabelled inputs) reaches it.
* **an extra loss term** (:meth:`TrainingMethod.loss_term`): the loop adds what it returns to the
  task loss of the step, so no method is special-cased in the loop.
* **a structure change**: a method that physically changes the model (surgery that removes heads,
  experts or filters) calls ``ctx.change_structure(change)`` with a
  :class:`ntkit.sparse.StructureChange`; the loop rebuilds what depends on parameter identity
  (sparse controller, optimizer with its state carried over, DDP wrapper) and calls
  :meth:`bind` again with the new model, partition and controller.

A method talks to the model only through the :class:`ntkit.sparse.SparseController` it was bound
to (``set_active`` / ``set_pruned``) and through the context.

Methods register with their config dataclass, so one place builds and validates configs::

    @register_method("mat", config=MATConfig)
    class MAT(TrainingMethod): ...

    cfg = method_config("mat", {"alpha": 0.2})   # a validated MATConfig (one-line ConfigError otherwise)
    mat = build_method("mat", cfg)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ntkit._registry import Registry
from ntkit.errors import ConfigError
from ntkit.partition import Partition

__all__ = [
    "METHODS",
    "LoopContext",
    "MethodInfo",
    "TrainingMethod",
    "build_method",
    "list_methods",
    "make_config",
    "method_config",
    "method_info",
    "register_method",
]


@dataclass
class LoopContext:
    """What a loop tells its method at each hook.

    Attributes:
        model: the model being trained (train mode during steps; may be a DDP wrapper — use
            :func:`ntkit.methods._common.unwrap`).
        epoch: current epoch (0-based); step: global optimizer step (0-based).
        steps_per_epoch: optimizer steps per epoch.
        ntk_batch: ``ntk_batch(S, generator)`` → ``(inputs, output_mask)`` — S random training samples
            in the form :func:`ntkit.modular_ntk` takes (``output_mask`` None for classifiers, the
            masked positions [S, T] for MLM).
        count_overhead: context-manager factory; FLOPs executed inside it are booked as the
            method's overhead (mNTK evaluation, scoring), not as training compute.
        log: ``log(dict)`` — append a record to the run's metrics log.
        loss_fn: ``loss_fn(model, batch)`` → scalar task loss on a labelled batch (None in the
            at-init context of a label-free method).
        sample_batch: ``sample_batch(n, generator)`` → a labelled training batch of n random
            samples, the form ``loss_fn`` takes (None for label-free methods at init).
        sample_inputs: ``sample_inputs(n, generator)`` → the inputs of n random training samples,
            no labels (what label-free methods use).
        change_structure: ``change_structure(change)`` — announce surgery (see the module docstring).
        seed: the run's seed; batch_size: the loop's batch size (samples per step).
    """

    model: nn.Module
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 1
    ntk_batch: Callable[..., tuple[Any, Tensor | None]] | None = None
    count_overhead: Callable[[], Any] | None = None
    log: Callable[[dict], None] = field(default=lambda rec: None)
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None
    sample_batch: Callable[[int, Any], Any] | None = None
    sample_inputs: Callable[[int, Any], Any] | None = None
    change_structure: Callable[[Any], None] | None = None
    seed: int = 0
    batch_size: int = 1


class TrainingMethod:
    """Base class with no-op hooks; methods override what they need (nothing is mandatory).

    ``bind`` is called before training with the model, its partition and the sparse controller
    (and again after a structure change). Methods keep their decision history in
    ``self.history`` (a list of JSON-able dicts) and implement ``state_dict``/``load_state_dict``
    for exact resume.

    Class attributes:
        name: registry name.
        config_class: the config dataclass (set by :func:`register_method`).
        needs_labels: False for label-free methods — their :meth:`at_init` context carries no
            labels and no loss.
    """

    name: str = "base"
    config_class: type | None = None
    needs_labels: bool = True

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.partition: Partition | None = None
        self.controller: Any = None

    def bind(self, model: nn.Module, partition: Partition, controller: Any) -> None:
        self.partition = partition
        self.controller = controller

    def at_init(self, ctx: LoopContext) -> None:
        """Once, after :meth:`bind` and before the first step of a fresh run (not on resume)."""

    def on_epoch_start(self, ctx: LoopContext) -> None: ...

    def before_step(self, ctx: LoopContext) -> None: ...

    def loss_term(self, ctx: LoopContext, batch: Any, loss: Tensor) -> Tensor | None:
        """An extra term added to this step's task ``loss`` before backward (None = nothing)."""
        return None

    def lr_scale(self) -> Tensor | None:
        """Per-group learning-rate multiplier [M] for this step (None = all 1)."""
        return None

    def after_step(self, ctx: LoopContext) -> None: ...

    def on_epoch_end(self, ctx: LoopContext) -> None: ...

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its factory (usually the class) and its config dataclass."""

    name: str
    factory: Callable[..., TrainingMethod]
    config_class: type


METHODS: Registry[MethodInfo] = Registry("method")


def register_method(name: str, *, config: type):
    """Decorator registering a method class under ``name`` with its config dataclass ``config``.

    The class gets ``name`` and ``config_class`` set; it must accept ``Cls(config)`` with an
    instance of ``config``.
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register_method({name!r}): config must be a dataclass, got {config!r}")

    def deco(cls):
        cls.name = name
        cls.config_class = config
        METHODS.add(name, MethodInfo(name, cls, config))
        return cls

    return deco


def list_methods() -> list[str]:
    return METHODS.names()


def method_info(name: str) -> MethodInfo:
    """The registration of ``name`` (one-line :class:`ConfigError` for an unknown name)."""
    return METHODS.get(name)


def make_config(cls: type, config: Any, kw: Mapping[str, Any], method: str) -> Any:
    """Build a config dataclass from an instance, a mapping, or keyword fields (not both).

    Unknown fields raise a one-line :class:`ConfigError` naming the method and the field; the
    dataclass' own validation raises one naming the field and the value.
    """
    if isinstance(config, cls):
        if kw:
            raise ConfigError(f"{method}: pass either config= or fields {sorted(kw)}, not both")
        return config
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(f"{method}: config={config!r}: expected a {cls.__name__} or a mapping of its fields")
    fields = dict(config or {})
    fields.update(kw)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in fields.items():
        if key not in known:
            raise ConfigError(f"{method}.{key}={value!r}: unknown field; expected one of {sorted(known)}")
    try:
        return cls(**fields)
    except ConfigError as e:
        raise ConfigError(f"{method}.{e}") from None
    except (TypeError, ValueError, ArithmeticError) as e:  # e.g. an int beyond float range
        raise ConfigError(f"{method}: {' '.join(str(e).split())}") from None


def method_config(name: str, fields: Any = None) -> Any:
    """The validated config of method ``name`` from an instance, a mapping of fields or None."""
    info = method_info(name)
    return make_config(info.config_class, fields, {}, name)


def build_method(name: str, config: Any = None, **kw: Any) -> TrainingMethod:
    """Build method ``name`` from its config (instance or mapping) and/or keyword fields."""
    info = method_info(name)
    return info.factory(make_config(info.config_class, config, kw, name))
