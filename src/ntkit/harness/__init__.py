"""The training harness: one plain loop for every method, resumable and data-parallel.

* :class:`Task` — what is trained (data, model builder, partition, loss, evaluation); two
  built in: :class:`MLMTask` (masked language modelling) and :class:`ImageTask` (classification).
* :class:`MethodEntry` / :func:`methods_of` — the methods of a comparison, ``{label: {method:
  name, **config}}``, each with its own validated config (:mod:`ntkit.harness.compose`).
* :func:`train_run` — one (method, seed): partial backward, SlicedAdamW, the method's hooks,
  FLOP accounting, checkpoints and exact resume, ``torch.distributed`` data parallelism,
  non-finite-loss handling (:mod:`ntkit.harness.loop`).
* :func:`compare` — every method × seed, then the cross-method metrics (:func:`finalize`).
* :func:`run_context` — where checkpoints, finished records and the metrics log go (the recipe
  runner sets it; ``ntkit run … --resume`` resumes).

Using it from your own code::

    from ntkit.harness import ImageTask, LoopConfig, compare, methods_of, run_context

    task = ImageTask(name="mnist", train_x=..., train_y=..., val_x=..., val_y=..., test_x=..., test_y=...,
                     build=lambda: build_model("lenet300_100"), partition_fn=linear_neurons)
    methods = methods_of({"vanilla": {"method": "vanilla"}, "mat": {"method": "mat", "alpha": 0.2}})
    with run_context(Path("runs/x/checkpoints"), resume=True):
        records = compare(task, methods, LoopConfig(epochs=5, batch_size=64), seeds=[0, 1, 2])
"""

from __future__ import annotations

from ntkit.harness.compose import MethodEntry, apply_method_overrides, methods_of
from ntkit.harness.context import RunContext, current_run, run_context
from ntkit.harness.loop import (
    LoopConfig,
    TrainingDiverged,
    compare,
    finalize,
    first_crossing,
    interpolate_at,
    lr_factor,
    train_run,
)
from ntkit.harness.tasks import ImageTask, MLMTask, Task

__all__ = [
    "ImageTask",
    "LoopConfig",
    "MLMTask",
    "MethodEntry",
    "RunContext",
    "Task",
    "TrainingDiverged",
    "apply_method_overrides",
    "compare",
    "current_run",
    "finalize",
    "first_crossing",
    "interpolate_at",
    "lr_factor",
    "methods_of",
    "run_context",
    "train_run",
]
