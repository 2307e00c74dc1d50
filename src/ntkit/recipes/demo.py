"""Recipe ``demo`` (``ntkit demo``) — the comparison demo: vanilla vs MAT vs Rand vs Multirate vs the replayed random control on the
embedded scikit-learn digits (no data directory needed) with ``vit_tiny``, attention heads as
modules. The ``quick`` tier is the 1–4-minute demo on 2 CPU cores; ``ci`` is a seconds-long
smoke run for the tests.
"""

from __future__ import annotations

from pathlib import Path

from ntkit.harness import LoopConfig
from ntkit.recipes import register_recipe
from ntkit.recipes._mat_image import ImageCompareConfig, run_image_comparison
from ntkit.recipes._mat_mlm import mat_methods

__all__ = ["TIERS", "demo"]


def _cfg(num_samples: int, start_epoch: int, interval: int, **kw: object) -> ImageCompareConfig:
    methods = mat_methods(0.1, beta=1e-3, num_samples=num_samples, start_epoch=start_epoch, interval=interval)
    base: dict[str, object] = {"model": "vit_tiny", "dataset": "digits", "augment": False, "methods": methods,
                               "val_frac": 0.15, "acc_thresholds": (0.9, 0.95)}
    base.update(kw)
    return ImageCompareConfig(**base)  # type: ignore[arg-type]


TIERS = {
    "ci": _cfg(num_samples=8, start_epoch=1, interval=1,
               loop=LoopConfig(epochs=2, batch_size=32, lr=2e-3, steps_per_epoch=4, progress=False)),
    "quick": _cfg(num_samples=64, start_epoch=8, interval=8,
                  loop=LoopConfig(epochs=80, batch_size=32, lr=2e-3, schedule="linear", warmup_steps=20)),
    "cpu": _cfg(num_samples=64, start_epoch=4, interval=4, seeds=(0, 1, 2),
                loop=LoopConfig(epochs=24, batch_size=32, lr=2e-3, schedule="linear", warmup_steps=20)),
    "paper": _cfg(num_samples=64, start_epoch=5, interval=5, seeds=(0, 1, 2, 3, 4),
                  loop=LoopConfig(epochs=60, batch_size=32, lr=2e-3, schedule="linear", warmup_steps=20)),
}


@register_recipe(
    "demo",
    tiers=TIERS,
    description="demo: vanilla vs MAT vs Rand vs Multirate vs the replayed random control, vit_tiny on the embedded digits (1-4 min on 2 CPU cores, quick tier)",
)
def demo(cfg: ImageCompareConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the comparison on digits; prints the table and returns the results document."""
    note = "" if tuple(cfg.acc_thresholds) == (0.95, 0.99) else "(demo thresholds, not the paper's 95%/99%)"
    return run_image_comparison(cfg, out_dir, data_dir, title="Demo: vit_tiny on digits (heads as modules)",
                                paper_key=None, threshold_note=note)
