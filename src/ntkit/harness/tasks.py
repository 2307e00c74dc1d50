"""What the harness trains: a *task* bundles data, model builder, partition, loss and evaluation.

The loop (:func:`ntkit.harness.train_run`) is task-agnostic; a task answers these questions:

* ``build_model()`` — a fresh model (the caller seeds torch first, so every method starts from
  the same initial weights);
* ``partition(model)`` — the modules MAT and its baselines decide about;
* ``num_train`` / ``train_batch(indices, generator)`` — a training batch from sample indices (the
  MLM collator's random masking uses ``generator``, so the data seen is identical for every method);
* ``loss(model, batch)`` — ``(loss, n_correct, n_counted)``; the last two feed the running train
  accuracy (classification) and are ``0, 0`` for MLM;
* ``evaluate(model, split)`` — ``{"loss": float, "acc": float | None}`` on "val" or "test" with
  masks fixed once at construction (so values are comparable across methods and evaluations);
* ``ntk_batch(S, generator)`` — S random training samples in the form :func:`ntkit.modular_ntk`
  takes: ``(inputs, output_mask)``;
* ``sample_inputs(n, generator)`` — the inputs of n random training samples, no labels (what
  label-free methods see; default: ``ntk_batch(n, generator)[0]``);
* ``shard(batch, rank, world)`` / ``loss_weight(batch)`` — under ``torch.distributed``, a rank's
  share of a global batch (default: contiguous slices of every batch tensor) and the number of
  units its loss averages over (samples; masked tokens for MLM), so the loop can weight ranks to
  reproduce the global batch's mean loss.

Two tasks exist: :class:`MLMTask` (BERT / Switch masked language modelling) and
:class:`ImageTask` (image classification). Both keep everything on CPU tensors.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.ntk.engine import packed_rows_ambiguous
from ntkit.partition import Partition

__all__ = ["ImageTask", "MLMTask", "Task"]

Collate = Callable[[Tensor, torch.Generator], tuple[Tensor, Tensor]]


class Task:
    """Interface of a task (see the module docstring). ``routing_dependent`` is True when the
    executed FLOPs of a step depend on the data (MoE routing), so the loop must count every step
    instead of reusing the count of an earlier step with the same active set."""

    name: str = "task"
    num_train: int = 0
    routing_dependent: bool = False
    metric: str = "loss"  # "loss" (lower is better) or "acc" (higher is better) for the test metric

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def partition(self, model: nn.Module) -> Partition:
        raise NotImplementedError

    def train_batch(self, indices: Tensor, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, int, int]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float | None]:
        raise NotImplementedError

    def work_key(self, batch: Any) -> tuple:
        """What the executed FLOPs of a training step depend on, besides the active/pruned sets
        (the loop re-uses a step's FLOP count for an equal key): the batch tensors' shapes."""
        return tuple(tuple(t.shape) for t in (batch if isinstance(batch, (tuple, list)) else [batch]))

    def ntk_batch(self, num_samples: int, generator: torch.Generator) -> tuple[Any, Tensor | None]:
        raise NotImplementedError

    def sample_inputs(self, num_samples: int, generator: torch.Generator) -> Any:
        """Inputs of ``num_samples`` random training samples, without labels."""
        return self.ntk_batch(num_samples, generator)[0]

    def shard(self, batch: Any, rank: int, world: int) -> Any:
        """Rank ``rank``'s share of a global ``batch``: the ``rank``-th of ``world`` contiguous
        slices along dim 0 of every tensor (``torch.tensor_split``: sizes differ by ≤ 1)."""
        if isinstance(batch, Tensor):
            return torch.tensor_split(batch, world)[rank]
        return type(batch)(torch.tensor_split(t, world)[rank] for t in batch)

    def loss_weight(self, batch: Any) -> float:
        """Units the loss of ``batch`` averages over (default: samples)."""
        first = batch if isinstance(batch, Tensor) else batch[0]
        return float(first.shape[0])


class MLMTask(Task):
    """Masked language modelling on fixed-length token blocks.

    Args:
        train, val, test: LongTensor [N, T] token blocks.
        build: ``build() -> nn.Module`` mapping input ids [B, T] to logits [B, T, V] (and having
            ``aux_loss()`` → scalar Tensor, 0 for dense models).
        partition_fn: ``partition_fn(model) -> Partition``.
        collate: ``collate(blocks [B, T], generator) -> (input_ids [B, T], labels [B, T])`` with
            labels −100 at unselected positions (the 15 % / 80-10-10 MLM collator).
        eval_batch_size: batch size of evaluation passes.
        aux_weight: weight of the model's load-balancing loss (Switch: 0.01; dense: ignored).
        eval_seed: seed of the fixed evaluation masks.
        routing_dependent: True for MoE models.
        unigram_floor: validation loss (nats) of the best context-free predictor (the train
            split's token frequencies), recorded by reports; None if unknown.
    """

    metric = "loss"

    def __init__(
        self,
        *,
        name: str,
        train: Tensor,
        val: Tensor,
        test: Tensor,
        build: Callable[[], nn.Module],
        partition_fn: Callable[[nn.Module], Partition],
        collate: Collate,
        eval_batch_size: int = 32,
        aux_weight: float = 0.0,
        eval_seed: int = 1234,
        routing_dependent: bool = False,
        unigram_floor: float | None = None,
    ) -> None:
        self.name = name
        self.unigram_floor = unigram_floor
        self.train = train
        self.num_train = int(train.shape[0])
        self._build = build
        self._partition = partition_fn
        self._collate = collate
        self.eval_batch_size = eval_batch_size
        self.aux_weight = aux_weight
        self.routing_dependent = routing_dependent
        self._packed_ntk = False  # set by build_model: the model takes positions=
        g = torch.Generator().manual_seed(eval_seed)
        self._eval = {"val": collate(val, g), "test": collate(test, g)}

    def build_model(self) -> nn.Module:
        model = self._build()
        self._packed_ntk = _takes_positions(model)
        return model

    def partition(self, model: nn.Module) -> Partition:
        return self._partition(model)

    def train_batch(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self._collate(self.train.index_select(0, indices), generator)

    def _aux(self, model: nn.Module) -> Tensor | None:
        if self.aux_weight and hasattr(model, "aux_loss"):
            return model.aux_loss()
        return None

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int, int]:
        ids, labels = batch
        sel = labels != -100
        if _takes_positions(model):  # head only at the masked positions: same loss, less work
            logits = model(ids, positions=sel)
        else:
            logits = model(ids)[sel]
        loss = F.cross_entropy(logits, labels[sel]) if logits.shape[0] else logits.sum() * 0.0
        aux = self._aux(model)
        if aux is not None:
            loss = loss + self.aux_weight * aux
        return loss, 0, 0

    def loss_weight(self, batch: tuple[Tensor, Tensor]) -> float:
        """Masked positions (the cross-entropy averages over them)."""
        return float((batch[1] != -100).sum())

    def work_key(self, batch: tuple[Tensor, Tensor]) -> tuple:
        """Shapes plus the number of masked positions (the MLM head runs only there)."""
        ids, labels = batch
        return tuple(ids.shape), int((labels != -100).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float | None]:
        """Mean masked-token cross-entropy (nats, i.e. log perplexity) over the split's fixed masks."""
        ids, labels = self._eval[split]
        total, count = 0.0, 0
        for i in range(0, ids.shape[0], self.eval_batch_size):
            lab = labels[i : i + self.eval_batch_size]
            logits = model(ids[i : i + self.eval_batch_size])
            n = int((lab != -100).sum())
            if n:
                total += float(
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="sum"
                    )
                )
                count += n
        return {"loss": total / max(count, 1), "acc": None}

    def ntk_batch(self, num_samples: int, generator: torch.Generator) -> tuple[Any, Tensor]:
        """S random training blocks, masked: ``(inputs, output_mask [S, T] bool)``; ``inputs`` is
        ``{"input_ids", "positions"}`` (the head runs at the masked positions only, packed logits)
        for models that take ``positions=``, else ``input_ids [S, T]``. Packed rows are refused by
        the engine when their count equals S unevenly, so such a draw stays unpacked."""
        idx = torch.randperm(self.num_train, generator=generator)[:num_samples]
        ids, labels = self._collate(self.train.index_select(0, idx), generator)
        mask = labels != -100
        if self._packed_ntk and not packed_rows_ambiguous(mask):
            return {"input_ids": ids, "positions": mask}, mask
        return ids, mask


def _takes_positions(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``positions=`` (MLM head only at selected positions)."""
    return _forward_takes_positions(type(model))


@functools.cache
def _forward_takes_positions(cls: type) -> bool:
    """Per model class, so the per-step loss does not re-inspect the signature."""
    return "positions" in inspect.signature(cls.forward).parameters


class ImageTask(Task):
    """Image classification.

    Args:
        train_x [N, C, H, W] float32, train_y [N] int64; val_x/val_y, test_x/test_y likewise
            (val may be the test split when no held-out validation is wanted — say so in the report).
        build, partition_fn: as for :class:`MLMTask` (logits [B, classes]).
        augment: optional ``augment(x [B, C, H, W], generator) -> x`` applied to training batches.
    """

    metric = "acc"

    def __init__(
        self,
        *,
        name: str,
        train_x: Tensor,
        train_y: Tensor,
        val_x: Tensor,
        val_y: Tensor,
        test_x: Tensor,
        test_y: Tensor,
        build: Callable[[], nn.Module],
        partition_fn: Callable[[nn.Module], Partition],
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        eval_batch_size: int = 256,
    ) -> None:
        self.name = name
        self.train_x, self.train_y = train_x, train_y
        self.num_train = int(train_x.shape[0])
        self._split = {"val": (val_x, val_y), "test": (test_x, test_y)}
        self._build = build
        self._partition = partition_fn
        self._augment = augment
        self.eval_batch_size = eval_batch_size

    def build_model(self) -> nn.Module:
        return self._build()

    def partition(self, model: nn.Module) -> Partition:
        return self._partition(model)

    def train_batch(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = self.train_x.index_select(0, indices)
        if self._augment is not None:
            x = self._augment(x, generator)
        return x, self.train_y.index_select(0, indices)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int, int]:
        x, y = batch
        logits = model(x)
        correct = int((logits.detach().argmax(-1) == y).sum())
        return F.cross_entropy(logits, y), correct, int(y.shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float | None]:
        """Mean cross-entropy (nats) and top-1 accuracy (fraction in [0, 1])."""
        x, y = self._split[split]
        total, correct = 0.0, 0
        for i in range(0, x.shape[0], self.eval_batch_size):
            logits = model(x[i : i + self.eval_batch_size])
            yy = y[i : i + self.eval_batch_size]
            total += float(F.cross_entropy(logits, yy, reduction="sum"))
            correct += int((logits.argmax(-1) == yy).sum())
        n = max(int(x.shape[0]), 1)
        return {"loss": total / n, "acc": correct / n}

    def ntk_batch(self, num_samples: int, generator: torch.Generator) -> tuple[Tensor, None]:
        """S random training images [S, C, H, W] (no augmentation); no output mask."""
        idx = torch.randperm(self.num_train, generator=generator)[:num_samples]
        return self.train_x.index_select(0, idx), None
