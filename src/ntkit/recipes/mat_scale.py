"""Recipe ``mat-scale`` — seed 000 Table 7: vanilla vs MAT compute and MAT's mNTK overhead
across BERT sizes (CPU scale: tiny/mini/small at the small tiers).

For each size in ``sizes`` the MLM comparison (``vanilla`` and ``mat``) runs with the same loop;
the table reports, per size, vanilla's and MAT's compute to convergence (FLOPs at the best
validation loss), MAT's compute to vanilla's best validation loss, the saving, and MAT's
overhead (FLOPs and share of its compute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ntkit.errors import check
from ntkit.harness import LoopConfig, compare
from ntkit.recipes import register_recipe
from ntkit.recipes._mat_mlm import MLMCompareConfig, build_mlm_task, mat_methods

__all__ = ["TIERS", "ScaleConfig", "mat_scale"]


@dataclass
class ScaleConfig:
    """Attributes:
    sizes: BERT sizes to compare (tiny, mini, small, medium, base, large).
    mlm: the per-size comparison settings (its ``size`` and ``methods`` are set per run).
    """

    sizes: tuple[str, ...] = ("tiny", "mini")
    mlm: MLMCompareConfig = field(default_factory=MLMCompareConfig)

    def __post_init__(self) -> None:
        check(len(self.sizes) >= 1, "sizes", self.sizes, "at least one BERT size")


def _mlm(num_samples: int, start_epoch: int, interval: int, **kw: object) -> MLMCompareConfig:
    methods = mat_methods(0.1, num_samples=num_samples, start_epoch=start_epoch, interval=interval,
                          labels=("vanilla", "mat"))
    return MLMCompareConfig(methods=methods, **kw)  # type: ignore[arg-type]


TIERS = {
    "ci": ScaleConfig(
        sizes=("tiny",),
        mlm=_mlm(seq_len=16, vocab_size=600, train_blocks=96, val_blocks=32, test_blocks=32, num_samples=8,
                 start_epoch=1, interval=1,
                 loop=LoopConfig(epochs=2, batch_size=8, lr=1e-3, steps_per_epoch=4, eval_every=2, progress=False)),
    ),
    "quick": ScaleConfig(
        sizes=("tiny", "mini"),
        mlm=_mlm(seq_len=64, vocab_size=8000, val_blocks=256, test_blocks=512, num_samples=64, start_epoch=2,
                 interval=2,
                 loop=LoopConfig(epochs=6, batch_size=16, lr=5e-4, steps_per_epoch=50, eval_every=25,
                                 warmup_steps=20)),
    ),
    "cpu": ScaleConfig(
        sizes=("mini", "small", "medium"),
        mlm=_mlm(seq_len=128, vocab_size=8000, seeds=(0, 1, 2), num_samples=64, start_epoch=3, interval=3,
                 loop=LoopConfig(epochs=24, batch_size=16, lr=5e-4, steps_per_epoch=100, eval_every=50,
                                 warmup_steps=100)),
    ),
    "paper": ScaleConfig(
        sizes=("mini", "small", "medium", "base", "large"),
        mlm=_mlm(seq_len=512, vocab_size=30000, seeds=(0, 1, 2), num_samples=64, start_epoch=5, interval=8,
                 loop=LoopConfig(epochs=24, batch_size=8, lr=2e-4, eps=1e-6, steps_per_epoch=500, eval_every=250)),
    ),
}


@register_recipe(
    "mat-scale",
    tiers=TIERS,
    description="vanilla vs MAT compute and mNTK overhead across BERT sizes (seed 000 Table 7)",
)
def mat_scale(cfg: ScaleConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run vanilla and MAT per size; returns the results document (see docs/results.md)."""
    from ntkit.recipes.report import (
        AGG_KEYS,
        aggregate,
        find_paper_numbers,
        fmt_mean_std,
        plot_val_vs_compute,
    )
    from ntkit.train.flops import format_flops

    paper = find_paper_numbers(cfg.mlm.paper_numbers, data_dir)
    ptab = (paper or {}).get("mat_table7_scale")
    records: list[dict] = []
    rows = []
    note = ""
    for size in cfg.sizes:
        mcfg = dataclasses.replace(cfg.mlm, size=size)
        task, note = build_mlm_task(mcfg, data_dir)
        recs = compare(task, mcfg.methods, mcfg.loop, mcfg.seeds, scope=size)
        for r in recs:
            r["size"] = size
        records += recs
        agg = aggregate(recs, AGG_KEYS)
        v, m = agg.get("vanilla"), agg.get("mat")
        if v is None or m is None:
            continue
        row = {
            "size": size,
            "vanilla compute to convergence": fmt_mean_std(v["convergence_flops"], format_flops),
            "MAT compute to convergence": fmt_mean_std(m["convergence_flops"], format_flops),
            "MAT compute to vanilla's best val": fmt_mean_std(m["compute_to_target_flops"], format_flops),
            "MAT vs vanilla": fmt_mean_std(m["compute_ratio_vs_baseline"], lambda x: f"{x:.2f}×"),
            "MAT overhead": fmt_mean_std(m["overhead_flops"], format_flops),
            "overhead share": fmt_mean_std(m["overhead_share"], lambda x: f"{100 * x:.2f}%"),
            "vanilla test loss": fmt_mean_std(v["test_loss"]),
            "MAT test loss": fmt_mean_std(m["test_loss"]),
        }
        if ptab is not None:
            for key in ("vanilla", "mat", "mat_overhead"):
                row[f"paper: {key} PFLOPs"] = str(ptab.get(key, {}).get(size, "—"))
        rows.append(row)
    for r in records:
        r["method"] = f"{r['method']}@{r['size']}"
    plots = [plot_val_vs_compute(records, out_dir / "val_loss_vs_compute.png", "val loss vs compute per size").name]
    notes = [
        f"Data: {note}.",
        ("Compute = executed matmul/conv FLOPs; 'compute to convergence' = FLOPs at the best validation loss; "
        "'MAT vs vanilla' = MAT's compute to vanilla's best val loss / vanilla's own."),
    ]
    if ptab is not None:
        notes.append("Columns 'paper: …' are seed 000 Table 7 (PFLOPs to convergence, BERT on WikiText-2, full scale).")
    doc = {"tables": {"Compute and overhead vs model size (seed 000 Table 7)": rows}, "plots": plots,
           "notes": notes, "records": records, "split_note": note, "summary": {"sizes": list(cfg.sizes)}}
    return doc
