"""The minimal ``demo`` recipe: a small ViT on the embedded digits, plain training.

Registered as ``demo`` only when no public recipe module registers its own ``demo`` (see
:func:`ntkit.recipes._runner._load_all`). Shows the pieces of :mod:`ntkit.train` working together:
seeded resumable batch order, executed-FLOP accounting per phase, JSONL metrics, report + plot.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ntkit.errors import check

__all__ = ["DemoConfig", "register", "run_demo"]


@dataclass
class DemoConfig:
    """Config of the basic demo.

    Attributes:
        model: registered model name (``ntkit ls models``); built with the dataset's image size,
            channels and classes where the builder takes them.
        dataset: registered dataset name (``digits`` is embedded: no data dir needed).
        epochs: training epochs (≥ 1).
        batch_size: samples per step (≥ 1).
        lr: AdamW learning rate (> 0).
        weight_decay: AdamW decoupled weight decay (≥ 0).
        seeds: one run per seed; the table reports mean ± std when there are several.
        count_every_step: count FLOPs on every step (slower); default counts each distinct batch
            shape once and re-uses it (exact here: a plain model's work depends only on the shape).
    """

    model: str = "vit_tiny"
    dataset: str = "digits"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    seeds: tuple[int, ...] = (0,)
    count_every_step: bool = False

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "an int >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite float > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a float >= 0")
        check(
            len(self.seeds) >= 1 and all(s >= 0 for s in self.seeds),
            "seeds",
            self.seeds,
            "one or more ints >= 0",
        )


TIERS = {
    "ci": DemoConfig(epochs=10),
    "quick": DemoConfig(epochs=20),
    "cpu": DemoConfig(epochs=30, seeds=(0, 1, 2)),
    # not a paper experiment: the paper tier is the cpu tier with more seeds
    "paper": DemoConfig(epochs=30, seeds=(0, 1, 2, 3, 4)),
}


def _build(cfg: DemoConfig, data) -> torch.nn.Module:
    from ntkit.models import MODELS, build_model

    c, h, _ = data.in_shape
    offered = {"image_size": h, "in_channels": c, "num_classes": data.num_classes}
    params = inspect.signature(MODELS.get(cfg.model)).parameters
    kw = {k: v for k, v in offered.items() if k in params}
    return build_model(cfg.model, **kw)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    was = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
    )
    model.train(was)
    return correct / len(x)


def _train_one(cfg: DemoConfig, data, seed: int, out_dir: Path) -> dict:
    from ntkit.recipes._report import progress
    from ntkit.train import FlopCounter, MetricsLogger, SeededBatchSampler, seed_everything

    seed_everything(seed)
    model = _build(cfg, data)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = SeededBatchSampler(len(data.train_x), cfg.batch_size, seed=seed)
    counter = FlopCounter()
    curve = []
    t0 = time.perf_counter()
    with MetricsLogger(out_dir / f"metrics_seed{seed}.jsonl", append=False, tensorboard=False) as log:
        step = 0
        bar = progress(total=cfg.epochs * len(sampler), desc=f"demo seed {seed}")
        for epoch in range(cfg.epochs):
            tot, n = 0.0, 0
            for idx in sampler:
                x, y = data.train_x[idx], data.train_y[idx]
                key = None if cfg.count_every_step else tuple(idx.shape)
                with counter.phase("forward", key=key):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                with counter.phase("backward", key=key):
                    loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
                n += len(idx)
                step += 1
                bar.update(1)
            rec = {
                "epoch": epoch + 1,
                "train_loss": tot / n,
                "test_acc": _accuracy(model, data.test_x, data.test_y),
                "train_flops": counter.training_flops,
                "wall_s": time.perf_counter() - t0,
            }
            log.log(rec, step=step)
            curve.append(rec)
        bar.close()
    wall = time.perf_counter() - t0
    return {
        "seed": seed,
        "train_loss": curve[-1]["train_loss"],
        "test_acc": curve[-1]["test_acc"],
        "wall_s": wall,
        "forward_flops": counter.totals().get("forward", 0.0),
        "backward_flops": counter.totals().get("backward", 0.0),
        "train_flops": counter.training_flops,
        "flops_exact": counter.exact(),
        "curve": curve,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_demo(cfg: DemoConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset`` for each seed; results table + learning-curve plot."""
    from ntkit.data import load_dataset
    from ntkit.recipes._report import aggregate_seeds, line_plot, mean_std
    from ntkit.train import format_flops

    data = load_dataset(cfg.dataset, data_dir=data_dir)
    runs = [_train_one(cfg, data, s, out_dir) for s in cfg.seeds]
    agg = aggregate_seeds(runs, ["train_loss", "test_acc", "wall_s", "train_flops"])
    row = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "seeds": len(runs),
        "train loss": agg["train_loss"],
        "test acc": agg["test_acc"],
        "wall-clock (s)": agg["wall_s"],
        "executed FLOPs (fwd+bwd)": format_flops(agg["train_flops"]["mean"]),
    }
    epochs = [r["epoch"] for r in runs[0]["curve"]]
    series_loss, series_acc = {}, {}
    for name, key, series in (
        ("train loss", "train_loss", series_loss),
        ("test acc", "test_acc", series_acc),
    ):
        per_epoch = [mean_std(r["curve"][e][key] for r in runs) for e in range(len(epochs))]
        std = [s if not math.isnan(s) else 0.0 for _, s in per_epoch]
        series[name] = {"x": epochs, "y": [m for m, _ in per_epoch], "std": std}
    line_plot(
        out_dir / "train_loss.png",
        series_loss,
        xlabel="epoch",
        ylabel="train loss (cross-entropy)",
        title=f"{cfg.model} on {cfg.dataset}",
    )
    line_plot(
        out_dir / "test_acc.png",
        series_acc,
        xlabel="epoch",
        ylabel="test accuracy",
        title=f"{cfg.model} on {cfg.dataset}",
    )
    return {
        "summary": {
            "dataset": f"{data.name}: {data.note}" if getattr(data, "note", "") else data.name,
            "train samples": len(data.train_x),
            "test samples": len(data.test_x),
            "parameters": runs[0]["params"],
            "forward FLOPs (mean)": format_flops(mean_std(r["forward_flops"] for r in runs)[0]),
            "backward FLOPs (mean)": format_flops(mean_std(r["backward_flops"] for r in runs)[0]),
        },
        "tables": {"Results": [row]},
        "plots": ["train_loss.png", "test_acc.png"],
        "runs": runs,
        "notes": [
            (
                "FLOPs are those of the matmul/conv/attention kernels that executed "
                "(ntkit.train.FlopCounter); element-wise work is not counted."
            ),
        ],
    }


def register() -> None:
    """Register this demo as recipe ``demo`` (called by the registry loader)."""
    from ntkit.recipes._runner import RECIPES, Recipe

    RECIPES.add(
        "demo",
        Recipe.create(
            "demo",
            run_demo,
            TIERS,
            description="vit_tiny on the embedded digits: train loss, test acc, wall-clock, executed FLOPs",
        ),
    )
