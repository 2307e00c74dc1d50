"""Run an ntkit method (MAT, Rand, Multirate, …) inside an unchanged Hugging Face ``Trainer``.

Optional extra: ``pip install 'ntkit[hf]'`` (``transformers`` + ``accelerate``, which the
``Trainer`` needs). Usage::

    from transformers import Trainer, TrainingArguments
    from ntkit.integrations.hf import NtkitCallback

    ntk = NtkitCallback(model, "mat", alpha={"head": 0.1}, start_epoch=5, interval=8)
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=train_ds,
                      data_collator=collator, callbacks=[ntk],
                      optimizers=(ntk.optimizer(lr=5e-4, weight_decay=0.01), None))
    trainer.train()

The one ``Trainer`` hook the partial backward needs is the optimizer: ``optimizers=(ntk.optimizer(...),
None)`` hands the ``Trainer`` a :class:`~ntkit.sparse.SlicedAdamW` bound to the callback's sparse
controller (the ``Trainer`` still builds its LR scheduler over it). Its default AdamW would update
every parameter — a frozen head's weights would move by weight decay and stale moments —, so the
callback refuses to start with any other optimizer (one-line :class:`~ntkit.errors.ConfigError`).

Events → method hooks: ``on_train_begin`` → ``at_init`` (fresh runs only: ``global_step == 0``),
``on_epoch_begin`` → ``on_epoch_start``, ``on_step_begin`` → ``before_step`` (once per optimizer
step, before its first micro-batch), ``on_step_end`` → ``after_step``, ``on_epoch_end`` →
``on_epoch_end`` in eval mode (MAT measures the mNTK there). The mNTK batch is drawn from the
``Trainer``'s train dataset through its data collator: model inputs are the batch dict without
``labels``; for masked LM the masked positions (``labels != -100``) select the logits summed.

The partition defaults to :func:`ntkit.partition.attention_heads`, which recognises HF BERT-family
``query``/``key``/``value`` heads (and ``q_proj``/``k_proj``/``v_proj`` layouts). Build the model
with ``attn_implementation="eager"`` (fused SDPA kernels have no double backward; the mNTK engine
itself uses first-order gradients only, but eager attention is what the tests cover).

Checkpoints: ``on_save`` writes the method's state (history, RNG, active set, records) as
``ntkit_method.json`` into the checkpoint folder the ``Trainer`` has just written
(``<output_dir>/checkpoint-<step>``); ``trainer.train(resume_from_checkpoint=...)`` restores it at
``on_train_begin`` from ``<output_dir>/checkpoint-<global_step>`` — so a resumed run makes the same
decisions as an uninterrupted one. A checkpoint without that file (written without this callback,
or resumed from outside ``output_dir``, which a callback cannot see) is a one-line
:class:`~ntkit.errors.DataError` rather than a silent restart of the method.

Limitations: methods that add a loss term (PL pruning) are refused — use the plain loop (README)
or :mod:`ntkit.harness`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from ntkit.errors import DataError, UnsupportedModelError
from ntkit.integrations._driver import STATE_FILE, FrameworkCallback
from ntkit.methods.base import TrainingMethod
from ntkit.partition import Partition

__all__ = ["NtkitCallback"]


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise UnsupportedModelError(
            "transformers is not installed: pip install 'ntkit[hf]' to use the Hugging Face Trainer callback"
        ) from None


def _hf_loss(model: nn.Module, batch: Any) -> Any:
    return model(**batch).loss


def _callback_base() -> type:
    return _transformers().TrainerCallback


class NtkitCallback(FrameworkCallback):
    """A ``transformers.TrainerCallback`` that runs an ntkit method inside a ``Trainer``.

    Args:
        model: the model given to the ``Trainer`` (a ``PreTrainedModel``).
        method: registered method name or a built :class:`~ntkit.methods.TrainingMethod`.
        partition: the modules (default: the model's attention heads).
        logger: a :class:`~ntkit.train.MetricsLogger` or a ``.jsonl`` path for the method's records
            (TensorBoard scalars / active-set images beside it when installed); None: none.
        **config: the method's config fields, e.g. ``alpha={"head": 0.1}, start_epoch=5``.

    Attributes:
        driver: the :class:`~ntkit.integrations._driver.MethodDriver` (``.controller``,
            ``.partition``, ``.method``, ``.records``).

    The instance is a subclass of ``transformers.TrainerCallback`` (created at construction, so
    importing this module does not import ``transformers``).
    """

    _framework_base = staticmethod(_callback_base)

    def __init__(
        self,
        model: nn.Module,
        method: str | TrainingMethod = "mat",
        partition: Partition | None = None,
        logger: Any = None,
        **config: Any,
    ) -> None:
        super().__init__(model, method, partition, logger, **config)
        self._epoch = 0

    # ------------------------------------------------------------------ TrainerCallback events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        d = self.driver
        d.check_optimizer(kw.get("optimizer"))
        loader = kw.get("train_dataloader")
        if loader is not None:
            d.set_data(loader.dataset, getattr(loader, "collate_fn", None), loss_fn=_hf_loss)
            steps = max(1, len(loader) // max(1, int(args.gradient_accumulation_steps)))
            d.set_schedule(
                steps, int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps)
            )
        self._epoch = int(state.epoch or 0)
        if int(state.global_step) == 0:
            d.at_init()
        else:  # resuming: the method state saved with the checkpoint the Trainer resumes from
            ckpt = Path(args.output_dir) / f"checkpoint-{int(state.global_step)}"
            if not self.load_state(ckpt):
                raise DataError(
                    f"resume: {ckpt} has no {STATE_FILE}; the method's decisions cannot be restored "
                    "(checkpoints must be written with this callback; resume from under args.output_dir)"
                )

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """Write the method state into the checkpoint folder the ``Trainer`` has just written."""
        ckpt = Path(args.output_dir) / f"checkpoint-{int(state.global_step)}"
        if ckpt.is_dir():
            self.save_state(ckpt)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.driver.close_logger()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.driver.epoch_begin(self._epoch, state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.driver.step_begin(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.driver.step_end(state.global_step - 1)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.driver.epoch_end(self._epoch, state.global_step)
        self._epoch += 1
