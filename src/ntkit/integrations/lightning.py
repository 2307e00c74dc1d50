"""Run an ntkit method (MAT, Rand, Multirate, …) inside PyTorch Lightning.

Optional extra: ``pip install 'ntkit[lightning]'`` (``lightning``; the older standalone
``pytorch_lightning`` package works too). Usage::

    import lightning as L
    from ntkit.integrations.lightning import NtkitLightningCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model("vit_tiny")
            self.ntk = NtkitLightningCallback(self.model, "mat", alpha={"head": 0.1}, start_epoch=5)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return self.ntk.optimizer(lr=1e-3)   # SlicedAdamW: only active modules' slices move

    module = Module()
    L.Trainer(max_epochs=10, callbacks=[module.ntk]).fit(module, train_dataloader)

``configure_optimizers`` must return the callback's optimizer (a
:class:`~ntkit.sparse.SlicedAdamW` bound to its sparse controller, calling the method's
``lr_scale``), alone or in a list, optionally with an LR scheduler; any other optimizer would move
inactive modules and is refused when training starts (one-line
:class:`~ntkit.errors.ConfigError`).

Events → method hooks: ``on_train_start`` → ``at_init`` (fresh runs: ``global_step == 0``),
``on_train_epoch_start`` → ``on_epoch_start``, ``on_train_batch_start`` → ``before_step``,
``on_train_batch_end`` → ``after_step``, ``on_train_epoch_end`` → ``on_epoch_end`` in eval mode.
Samples for the method (the mNTK batch) come from ``trainer.train_dataloader``'s dataset through
its ``collate_fn``: ``(x, y, …)`` batches give ``x``; dict batches give the dict without its
``labels`` (masked positions ``labels != -100`` for masked LM). The partition defaults to
:func:`ntkit.partition.attention_heads`.

Limitations: with ``accumulate_grad_batches > 1`` ``before_step`` / ``after_step`` run per
micro-batch (MAT changes its set only at epoch ends, so it is unaffected); methods that add a
loss term are refused.

Checkpoints: ``on_save_checkpoint`` stores the method's state (history, RNG, active set, records)
under ``checkpoint["ntkit_method"]``; ``on_load_checkpoint`` (``fit(ckpt_path=...)``) restores it, so
a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

from ntkit.errors import DataError, UnsupportedModelError
from ntkit.integrations._driver import FrameworkCallback

__all__ = ["CHECKPOINT_KEY", "NtkitLightningCallback"]

#: Key of the method state in a Lightning checkpoint dict.
CHECKPOINT_KEY = "ntkit_method"


def _lightning() -> Any:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UnsupportedModelError(
        "lightning is not installed: pip install 'ntkit[lightning]' to use the Lightning callback"
    )


def _callback_base() -> type:
    return _lightning().Callback


class NtkitLightningCallback(FrameworkCallback):
    """A Lightning ``Callback`` that runs an ntkit method on ``model`` (a submodule of the
    ``LightningModule``, or the module itself).

    Args:
        model: the network whose modules the method governs.
        method: registered method name or a built :class:`~ntkit.methods.TrainingMethod`.
        partition: the modules (default: the model's attention heads).
        logger: a :class:`~ntkit.train.MetricsLogger` or a ``.jsonl`` path for the method's records
            (TensorBoard scalars / active-set images beside it when installed); None: none.
        **config: the method's config fields.

    Attributes:
        driver: the :class:`~ntkit.integrations._driver.MethodDriver`.

    The instance is a subclass of Lightning's ``Callback`` (created at construction, so importing
    this module does not import Lightning).
    """

    _framework_base = staticmethod(_callback_base)

    # ------------------------------------------------------------------ Callback events
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        d = self.driver
        check_opts = list(getattr(trainer, "optimizers", []) or [])
        d.check_optimizer(check_opts[0] if len(check_opts) == 1 else None)
        loader = getattr(trainer, "train_dataloader", None)
        if loader is not None and hasattr(loader, "dataset"):

            def loss_fn(_model: nn.Module, batch: Any) -> Tensor:
                out = pl_module.training_step(batch, 0)
                return out["loss"] if isinstance(out, dict) else out

            d.set_data(loader.dataset, getattr(loader, "collate_fn", None), loss_fn=loss_fn)
            steps = getattr(trainer, "num_training_batches", None)
            batch_size = getattr(loader, "batch_size", None) or 1
            if isinstance(steps, int):
                d.set_schedule(steps, batch_size)
        if int(trainer.global_step) == 0:
            d.at_init()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.epoch_begin(trainer.current_epoch, trainer.global_step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.driver.step_begin(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.driver.step_end(max(0, trainer.global_step - 1))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.driver.epoch_end(trainer.current_epoch, trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.driver.close_logger()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        """Store the method state (history, RNG, active set, records) in the checkpoint dict."""
        checkpoint[CHECKPOINT_KEY] = self.state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        """Restore it on ``fit(ckpt_path=...)``; a checkpoint without it is a one-line DataError."""
        if CHECKPOINT_KEY not in checkpoint:
            raise DataError(
                f"resume: the checkpoint has no {CHECKPOINT_KEY!r}; the method's decisions cannot be restored "
                "(it was written without NtkitLightningCallback)"
            )
        self.load_state_dict(checkpoint[CHECKPOINT_KEY])
