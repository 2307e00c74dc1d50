"""What the framework callbacks share: a method wired to a model, driven by outside events.

:class:`MethodDriver` owns the pieces of the README's plain loop — partition, sparse controller,
the method and its :class:`~ntkit.methods.LoopContext` — and turns a framework's events
(epoch begin, step begin, step end, epoch end) into the method's hooks. The samples a method
draws (the mNTK batch, labelled batches for at-init scoring) come from the training dataset
through the framework's collate function, so any dataset the framework trains on works.

Batches are dicts of tensors (Hugging Face style: ``input_ids``, ``attention_mask``, ``labels``,
…) or ``(inputs, targets)`` tuples / lists (plain PyTorch style); see :meth:`MethodDriver.ntk_batch`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, check
from ntkit.methods.base import LoopContext, TrainingMethod, build_method
from ntkit.partition import Partition
from ntkit.sparse import SlicedAdamW, SparseController, attach

__all__ = ["FrameworkCallback", "MethodDriver", "MethodSlicedAdamW"]

#: File name of the method state in a framework checkpoint directory (Hugging Face ``Trainer``).
STATE_FILE = "ntkit_method.json"

#: keys of a dict batch that are targets, not model inputs
_LABEL_KEYS = ("labels", "label", "label_ids")


class MethodSlicedAdamW(SlicedAdamW):
    """:class:`~ntkit.sparse.SlicedAdamW` whose ``step()`` asks the method for its per-module
    learning-rate multipliers (``method.lr_scale()``, e.g. Multirate's) when the caller passes
    none — frameworks (HF ``Trainer``, Lightning) call ``optimizer.step()`` / ``step(closure)``
    without extra arguments."""

    def __init__(self, model: nn.Module, ctl: SparseController, method: TrainingMethod, **kw: Any) -> None:
        super().__init__(model, ctl, **kw)
        self.method = method

    @torch.no_grad()
    def step(self, closure: Any = None, lr_scale: Tensor | None = None) -> Any:  # type: ignore[override]
        return super().step(closure, lr_scale=self.method.lr_scale() if lr_scale is None else lr_scale)


def _collate_default(samples: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(samples)


class MethodDriver:
    """A training method attached to ``model``, fed by a framework's events.

    Args:
        model: the model the framework trains (the partition's parameter names are its names).
        method: a registered method name (``"mat"``, ``"rand"``, …) or a built
            :class:`~ntkit.methods.TrainingMethod`.
        partition: the modules; default :func:`ntkit.partition.attention_heads` (the natural
            modules of Transformers, HF BERT included) — pass another builder's result for
            filters / experts / neurons.
        config: the method's config fields (with a method name), e.g. ``alpha={"head": 0.1}``.
        logger: where the method's records also go: a :class:`~ntkit.train.MetricsLogger`, or a
            ``.jsonl`` path for a new one (TensorBoard beside it when installed: per-module λmax
            scalars, the active set as an image); None keeps them in ``records`` only.

    Attributes:
        partition, controller (:class:`~ntkit.sparse.SparseController`), method, ctx
        (:class:`~ntkit.methods.LoopContext`), records (what the method logged, list of dicts).

    Methods that add a loss term (``loss_term``, e.g. PL pruning) are refused (one-line
    :class:`~ntkit.errors.ConfigError`): a callback cannot add to the framework's loss; use the
    plain loop of the README or :mod:`ntkit.harness` for them.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | TrainingMethod = "mat",
        partition: Partition | None = None,
        logger: Any = None,
        **config: Any,
    ) -> None:
        from ntkit.partition import attention_heads
        from ntkit.train.log import MetricsLogger

        check(isinstance(model, nn.Module), "model", type(model).__name__, "an nn.Module")
        if isinstance(method, TrainingMethod):
            if config:
                raise ConfigError(
                    f"config={sorted(config)}: pass fields only with a method name, not a built method"
                )
            self.method = method
        else:
            check(isinstance(method, str), "method", method, "a registered method name or a TrainingMethod")
            self.method = build_method(method, **config)
        if type(self.method).loss_term is not TrainingMethod.loss_term:
            raise ConfigError(
                f"method={self.method.name!r}: adds a loss term, which a framework callback cannot add to the "
                "framework's loss; use the plain loop (README) or ntkit.harness"
            )
        self.model = model
        self.partition = attention_heads(model) if partition is None else partition
        self.controller = attach(model, self.partition)
        self.method.bind(model, self.partition, self.controller)
        self.records: list[dict] = []
        self._own_logger = isinstance(logger, (str, Path))
        if self._own_logger:
            logger = MetricsLogger(logger)
        self.logger = logger
        if isinstance(logger, MetricsLogger):
            logger.set_modules(self.partition.names, self.partition.layers)
        self.dataset: Any = None
        self.collate: Callable[[list[Any]], Any] = _collate_default
        self.loss_fn: Callable[[nn.Module, Any], Tensor] | None = None
        self.count_overhead: Callable[[], Any] | None = None
        self.ctx = LoopContext(
            model=model,
            ntk_batch=self.ntk_batch,
            count_overhead=lambda: self.count_overhead() if self.count_overhead else contextlib.nullcontext(),
            log=self._log,
        )

    def _log(self, rec: dict) -> None:
        self.records.append(rec)
        if self.logger is not None:
            self.logger.log(rec, step=self.ctx.step)

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """JSON-able state to store with the framework's checkpoints: the method's
        ``state_dict()`` (history, RNG, active set, …) and the records logged so far."""
        return {"method": self.method.state_dict(), "records": list(self.records)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the method re-applies its active set to the controller)."""
        self.method.load_state_dict(state["method"])
        self.records = list(state.get("records", []))

    # ----------------------------------------------------------------- optimizer
    def optimizer(self, lr: float = 1e-3, **kw: Any) -> MethodSlicedAdamW:
        """The optimizer to hand the framework: :class:`MethodSlicedAdamW` over every parameter
        of the model (``lr``, ``betas``, ``eps``, ``weight_decay`` as ``torch.optim.AdamW``)."""
        return MethodSlicedAdamW(self.model, self.controller, self.method, lr=lr, **kw)

    def check_optimizer(self, opt: Any) -> None:
        """Refuse an optimizer that would move inactive modules (one line naming it)."""
        inner = opt
        for _ in range(4):  # accelerate's AcceleratedOptimizer (.optimizer), LightningOptimizer (._optimizer)
            if isinstance(inner, SlicedAdamW):
                break
            inner = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None) or inner
        if not isinstance(inner, SlicedAdamW) or inner.ctl is not self.controller:
            raise ConfigError(
                f"optimizer={type(inner).__name__}: expected the callback's optimizer (callback.optimizer(lr=...)), a "
                "SlicedAdamW bound to its controller; another optimizer would update inactive modules"
            )

    # ----------------------------------------------------------------- data
    def set_data(
        self,
        dataset: Any,
        collate: Callable[[list[Any]], Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> None:
        """Where samples come from: a map-style ``dataset`` (``len`` + ``__getitem__``), the
        ``collate`` function that batches its items (default: torch's ``default_collate``) and
        ``loss_fn(model, batch)`` → scalar loss (for methods that score at initialisation)."""
        check(
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"),
            "train dataset",
            type(dataset).__name__,
            "a map-style dataset (len() and [i])",
        )
        check(len(dataset) >= 1, "train dataset length", len(dataset), ">= 1")
        self.dataset = dataset
        self.collate = collate or _collate_default
        self.loss_fn = loss_fn
        self.ctx.loss_fn = loss_fn
        self.ctx.sample_batch = self.sample_batch if loss_fn is not None else None
        self.ctx.sample_inputs = lambda n, g: self.ntk_batch(n, g)[0]

    def sample_batch(self, n: int, generator: torch.Generator) -> Any:
        """A collated batch of ``n`` random training samples (fewer if the dataset is smaller)."""
        check(self.dataset is not None, "train dataset", None, "set by the framework before sampling")
        idx = torch.randperm(len(self.dataset), generator=generator)[:n].tolist()
        return self.collate([self.dataset[i] for i in idx])

    def ntk_batch(self, num_samples: int, generator: torch.Generator) -> tuple[Any, Tensor | None]:
        """S random training samples for :func:`ntkit.modular_ntk`: ``(inputs, output_mask)``.

        * dict batches: ``inputs`` = the dict without its label keys (``labels``, ``label``,
          ``label_ids``), on the model's device; ``output_mask`` = ``labels != -100`` (bool
          [S, T]) when the labels have a token dimension (masked LM), else None;
        * tuple / list batches ``(x, y, …)``: ``inputs`` = ``x``, ``output_mask`` None.
        """
        batch = self.sample_batch(num_samples, generator)
        device = next(self.model.parameters()).device
        if isinstance(batch, Mapping):
            labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
            inputs = {
                k: v.to(device) if isinstance(v, Tensor) else v
                for k, v in batch.items()
                if k not in _LABEL_KEYS
            }
            mask = None
            if isinstance(labels, Tensor) and labels.dim() == 2:
                mask = (labels != -100).to(device)
            return inputs, mask
        if isinstance(batch, Sequence) and not isinstance(batch, Tensor) and len(batch) >= 1:
            x = batch[0]
            return (x.to(device) if isinstance(x, Tensor) else x), None
        return (batch.to(device) if isinstance(batch, Tensor) else batch), None

    def set_schedule(self, steps_per_epoch: int, batch_size: int) -> None:
        """Optimizer steps per epoch and samples per step (methods that redraw per step read them)."""
        self.ctx.steps_per_epoch = max(1, int(steps_per_epoch))
        self.ctx.batch_size = max(1, int(batch_size))

    # ----------------------------------------------------------------- events
    def at_init(self) -> None:
        """Once before the first step of a fresh run (masks / new initial weights)."""
        self.method.at_init(self.ctx)

    def epoch_begin(self, epoch: int, step: int) -> None:
        self.ctx.epoch, self.ctx.step = int(epoch), int(step)
        self.method.on_epoch_start(self.ctx)

    def step_begin(self, step: int) -> None:
        self.ctx.step = int(step)
        self.method.before_step(self.ctx)

    def step_end(self, step: int) -> None:
        self.ctx.step = int(step)
        self.method.after_step(self.ctx)

    def epoch_end(self, epoch: int, step: int) -> None:
        """``method.on_epoch_end`` with the model in eval mode (the mNTK needs sample-independent
        forward passes), restored after."""
        self.ctx.epoch, self.ctx.step = int(epoch), int(step)
        was = self.model.training
        self.model.eval()
        try:
            self.method.on_epoch_end(self.ctx)
        finally:
            self.model.train(was)

    def detach(self) -> None:
        """Give the model back its native layers (after training)."""
        self.controller.detach()

    def close_logger(self) -> None:
        """Close the metrics log if the driver opened it (from a path); a logger passed in stays open."""
        if self._own_logger and self.logger is not None:
            self.logger.close()


class FrameworkCallback:
    """What :class:`~ntkit.integrations.hf.NtkitCallback` and
    :class:`~ntkit.integrations.lightning.NtkitLightningCallback` share: construction of the
    :class:`MethodDriver`, the optimizer, the method state, and the trick that makes an instance a
    subclass of the framework's callback class without importing the framework at module import.

    A subclass sets ``_framework_base`` to a zero-argument function returning the framework's base
    class (imported lazily, a one-line error when the package is missing). ``Subclass(...)`` then
    returns an instance of ``type(name, (Subclass, base), {})``, built once per subclass — a user's
    subclass of a callback is mixed in the same way.

    Args: as :class:`MethodDriver` (``model, method, partition, logger, **config``).
    """

    _framework_base: ClassVar[Callable[[], type]]
    _concrete: ClassVar[dict[type, type]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls.__dict__.get("_ntkit_concrete"):
            return object.__new__(cls)
        if cls not in FrameworkCallback._concrete:
            base = cls._framework_base()
            FrameworkCallback._concrete[cls] = type(
                cls.__name__, (cls, base), {"__module__": cls.__module__, "_ntkit_concrete": True}
            )
        return object.__new__(FrameworkCallback._concrete[cls])

    def __init__(
        self,
        model: nn.Module,
        method: str | TrainingMethod = "mat",
        partition: Partition | None = None,
        logger: Any = None,
        **config: Any,
    ) -> None:
        self.driver = MethodDriver(model, method, partition, logger=logger, **config)

    @property
    def method(self) -> TrainingMethod:
        return self.driver.method

    @property
    def controller(self) -> SparseController:
        return self.driver.controller

    def optimizer(self, lr: float = 1e-3, **kw: Any) -> MethodSlicedAdamW:
        """The optimizer to hand the framework: a :class:`~ntkit.sparse.SlicedAdamW` (``betas``,
        ``eps``, ``weight_decay`` as AdamW) over every parameter, touching only active modules'
        slices, with the method's ``lr_scale``."""
        return self.driver.optimizer(lr=lr, **kw)

    def state_dict(self) -> dict:
        """The method's state and records (:meth:`MethodDriver.state_dict`), JSON-able."""
        return self.driver.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.driver.load_state_dict(state)

    def save_state(self, directory: str | Path) -> Path:
        """Write :meth:`state_dict` as ``directory/ntkit_method.json`` (atomically); return the path."""
        from ntkit.train.checkpoint import atomic_write_text

        path = Path(directory) / STATE_FILE
        atomic_write_text(path, json.dumps(self.state_dict()) + "\n")
        return path

    def load_state(self, directory: str | Path) -> bool:
        """Restore the state saved by :meth:`save_state` in ``directory``; False when there is none.

        Raises:
            DataError: the file exists but is not valid JSON.
        """
        from ntkit.errors import DataError

        path = Path(directory) / STATE_FILE
        if not path.is_file():
            return False
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: corrupt method state ({' '.join(str(e).split())})") from None
        self.load_state_dict(state)
        return True
