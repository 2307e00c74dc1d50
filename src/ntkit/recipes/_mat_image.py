"""Shared body of the image-classification MAT recipes (mat-vgg, demo).

:class:`ImageCompareConfig` → :func:`build_image_task` (an :class:`~ntkit.harness.ImageTask` with a
validation split held out of train), whose ``methods`` are trained by :func:`ntkit.harness.compare`; then
:func:`add_train_acc_compute` fills each record's ``compute_to_train_acc`` (seed 001 Table 3:
FLOPs until the training accuracy first reaches 95 % / 99 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ntkit.errors import check
from ntkit.harness import ImageTask, LoopConfig, MethodEntry
from ntkit.recipes._mat_mlm import budget_columns, mat_methods

__all__ = ["ImageCompareConfig", "add_train_acc_compute", "build_image_task", "run_image_comparison"]


@dataclass
class ImageCompareConfig:
    """One image-classification comparison (``key=value`` overrides; loop fields as ``loop.key``).

    Attributes:
        model: "vgg16" (modules = conv filters) or "vit_tiny" (modules = attention heads).
        width: VGG width multiplier (CPU scale: < 1).
        channels_last: store VGG's weights (hence its activations) channels-last (NHWC), the native
            layout of oneDNN / cuDNN convolutions: faster for every method, and the layout in which
            MAT's filter-sliced backward follows its FLOPs (``bench/partial_backward.py``:
            Conv2d layer 0.75 vs 0.81 of the full backward in NCHW at 50% active).
        vit_dim, vit_depth, vit_heads, vit_patch: vit_tiny settings.
        dataset: "cifar10", "digits", "mnist", …
        train_limit, test_limit: keep the first N samples (0 = all).
        val_frac: share of train held out for validation (best-val checkpoint, val curves).
        augment: random crop (pad 4) + horizontal flip on training batches (CIFAR recipe).
        methods: ``{label: MethodEntry}`` (:mod:`ntkit.harness.compose`); "vanilla" is the baseline
            and must be present.
        seeds: seeds (init, data order).
        acc_thresholds: training-accuracy targets for ``compute_to_train_acc`` (fractions).
        paper_numbers: path of paper_numbers.json ("" = ``<data_dir>/../reference/``).
        loop: :class:`LoopConfig`.
    """

    model: str = "vgg16"
    width: float = 0.25
    channels_last: bool = True
    vit_dim: int = 64
    vit_depth: int = 2
    vit_heads: int = 4
    vit_patch: int = 2
    dataset: str = "cifar10"
    train_limit: int = 0
    test_limit: int = 0
    val_frac: float = 0.1
    augment: bool = True
    methods: dict[str, MethodEntry] = field(default_factory=lambda: mat_methods(0.2, beta=1e-6))
    seeds: tuple[int, ...] = (0,)
    acc_thresholds: tuple[float, ...] = (0.95, 0.99)
    paper_numbers: str = ""
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        check(self.model in ("vgg16", "vit_tiny"), "model", self.model, "vgg16 or vit_tiny")
        check(0 < self.width < float("inf"), "width", self.width, "a finite number > 0")
        for name in ("vit_dim", "vit_depth", "vit_heads", "vit_patch"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check(self.vit_dim % self.vit_heads == 0, "vit_dim", self.vit_dim, f"a multiple of vit_heads={self.vit_heads}")
        check(self.train_limit >= 0 and self.test_limit >= 0, "train_limit/test_limit",
              (self.train_limit, self.test_limit), "integers >= 0 (0 = all)")
        check(0 < self.val_frac < 1, "val_frac", self.val_frac, "a fraction in (0, 1)")
        check(isinstance(self.methods, dict) and "vanilla" in self.methods, "methods", list(self.methods),
              "labels that include vanilla (the baseline)")
        check(len(self.seeds) >= 1 and all(s >= 0 for s in self.seeds), "seeds", self.seeds,
              "at least one seed, each an integer >= 0")
        check(all(0 < t <= 1 for t in self.acc_thresholds), "acc_thresholds", self.acc_thresholds,
              "fractions in (0, 1]")

    @property
    def kind(self) -> str:
        """The module kind MAT governs: "filter" (vgg16) or "head" (vit_tiny)."""
        return "filter" if self.model == "vgg16" else "head"


def _crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip per image (x [B, C, H, W])."""
    b, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=g)
    dx = torch.randint(0, 9, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        img = pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = img.flip(-1) if flip[i] else img
    return out


def build_image_task(cfg: ImageCompareConfig, data_dir: Path | None) -> tuple[ImageTask, str]:
    """The task of ``cfg`` and the data note for the report."""
    from ntkit.data import load_dataset, val_split
    from ntkit.models import build_model
    from ntkit.partition import attention_heads, conv_filters

    kw: dict[str, Any] = {}
    if cfg.train_limit:
        kw["limit"] = cfg.train_limit
    if cfg.test_limit:
        kw["test_limit"] = cfg.test_limit
    data = val_split(load_dataset(cfg.dataset, data_dir=data_dir, **kw), cfg.val_frac, seed=0)
    c, h, _ = data.in_shape
    if cfg.model == "vgg16":
        model_kw: dict[str, Any] = {"num_classes": data.num_classes, "in_channels": c, "width": cfg.width}
        part = conv_filters
    else:
        model_kw = {"image_size": h, "patch_size": cfg.vit_patch, "in_channels": c, "num_classes": data.num_classes,
                    "dim": cfg.vit_dim, "depth": cfg.vit_depth, "heads": cfg.vit_heads}
        part = attention_heads

    def build() -> torch.nn.Module:
        model = build_model(cfg.model, **model_kw)
        return model.to(memory_format=torch.channels_last) if cfg.channels_last and cfg.model == "vgg16" else model

    assert data.val_x is not None and data.val_y is not None
    task = ImageTask(
        name=f"{cfg.model}-{cfg.dataset}",
        train_x=data.train_x,
        train_y=data.train_y,
        val_x=data.val_x,
        val_y=data.val_y,
        test_x=data.test_x,
        test_y=data.test_y,
        build=build,
        partition_fn=part,
        augment=_crop_flip if cfg.augment else None,
    )
    return task, f"{data.note}; train/val/test = {len(data.train_x)}/{len(data.val_x)}/{len(data.test_x)}"


def add_train_acc_compute(records: list[dict], thresholds: tuple[float, ...]) -> None:
    """Set ``record["compute_to_train_acc"]`` = per threshold, the executed FLOPs (incl.
    overhead) at the end of the first epoch whose running training accuracy reached it, or
    None if never (list aligned with ``thresholds``)."""
    for r in records:
        out: list[float | None] = []
        for t in thresholds:
            hit = None
            for acc, fl in zip(r["epoch_train_acc"], r["epoch_flops"]):
                if acc is not None and acc >= t:
                    hit = float(fl)
                    break
            out.append(hit)
        r["compute_to_train_acc"] = out
        r["acc_thresholds"] = list(thresholds)


def run_image_comparison(cfg: ImageCompareConfig, out_dir: Path, data_dir: Path | None, *, title: str,
                         paper_key: str | None, threshold_note: str = "") -> dict:
    """Train ``cfg.methods`` × ``cfg.seeds`` on the image task; return the results document."""
    from ntkit.harness import compare
    from ntkit.recipes.report import comparison_result, find_paper_numbers

    task, note = build_image_task(cfg, data_dir)
    records = compare(task, cfg.methods, cfg.loop, cfg.seeds)
    add_train_acc_compute(records, cfg.acc_thresholds)
    cols: list[tuple[str, str, int | None, str]] = [
        (f"compute to train acc {round(100 * t)}%", "compute_to_train_acc", i, "flops")
        for i, t in enumerate(cfg.acc_thresholds)
    ]
    cols += budget_columns(cfg.loop.budget_fracs)
    cols += [
        ("test top-1 (best-val ckpt)", "test_acc", None, "pct"),
        ("Δ test top-1 vs vanilla (paired)", "paired_test_acc_diff", None, "pct"),
        ("best val loss", "best_val_loss", None, "num"),
        ("compute to own best", "convergence_flops", None, "flops"),
        ("own best: vs vanilla", "convergence_ratio_vs_baseline", None, "ratio"),
        ("compute to vanilla's best val", "compute_to_target_flops", None, "flops"),
        ("vs vanilla", "compute_ratio_vs_baseline", None, "ratio"),
        ("total compute", "total_flops", None, "flops"),
        ("mNTK overhead", "overhead_share", None, "pct2"),
        ("wall s", "wall_s", None, "secs"),
    ]
    notes = [
        f"Data: {note}.",
        (f"Model: {cfg.model}" + (f" width={cfg.width}" if cfg.model == "vgg16" else "") + f"; modules: {cfg.kind}s; "
         f"every method trained {cfg.loop.epochs} epochs × {records[0]['steps_per_epoch']} steps from the same "
         "initial weights and data order; optimizer "
         + (f"SlicedSGD lr {cfg.loop.lr}, momentum {cfg.loop.momentum}, weight decay {cfg.loop.weight_decay}"
            if cfg.loop.optimizer == "sgd" else f"SlicedAdamW lr {cfg.loop.lr}")
         + f", schedule {cfg.loop.schedule}."),
        ("'compute to own best' = FLOPs at each run's own best val loss (the paper's 'Computation'); "
         "'Δ … (paired)' = run − vanilla of the same seed, mean ± std over seeds; rand_replay = random "
         "modules with MAT's exact per-layer active counts at MAT's decision epochs (same seed)."),
        ("'compute to train acc X%' = executed FLOPs (incl. overhead) at the end of the first epoch whose running "
         "training accuracy reached X% (— = never)." + (f" {threshold_note}" if threshold_note else "")),
    ]
    doc = comparison_result(
        records, title=title, columns=cols, out_dir=out_dir, notes=notes,
        paper=find_paper_numbers(cfg.paper_numbers, data_dir), paper_key=paper_key, quality=("test_acc", True),
        extra={"split_note": note, "acc_thresholds": list(cfg.acc_thresholds)},
    )
    return doc
