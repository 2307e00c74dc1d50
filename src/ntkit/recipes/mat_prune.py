"""Recipe ``mat-prune`` — seed 000 Table 5: MAT + λmax head pruning vs structured SNIP.

Methods (labels → registered methods): ``vanilla``; ``snip_50`` / ``snip_75`` (``snip_struct``: structured SNIP at initialisation,
50 % / 75 % of heads pruned); ``mat_prune_50`` (train, rank heads by mNTK λmax at
``prune_epoch``, prune the lowest 50 %, then MAT with α = 0.2 on the rest). Reports forward
sparsity (share of heads pruned, at the end), backward sparsity (share of heads whose weight
gradients were not computed, averaged over steps), test loss of the best-validation checkpoint and
executed compute.
"""

from __future__ import annotations

from pathlib import Path

from ntkit.harness import LoopConfig, MethodEntry, methods_of
from ntkit.recipes import register_recipe
from ntkit.recipes._mat_mlm import MLMCompareConfig, run_mlm_comparison

__all__ = ["TIERS", "mat_prune"]


def _methods(num_samples: int, start_epoch: int, interval: int, prune_epoch: int) -> dict[str, MethodEntry]:
    return methods_of({
        "vanilla": {"method": "vanilla"},
        "snip_50": {"method": "snip_struct", "fraction": 0.5, "kind": "head"},
        "snip_75": {"method": "snip_struct", "fraction": 0.75, "kind": "head"},
        "mat_prune_50": {"method": "mat_prune", "alpha": {"head": 0.2}, "beta": 1e-3, "num_samples": num_samples,
                         "start_epoch": start_epoch, "interval": interval, "prune_epoch": prune_epoch,
                         "prune_fraction": 0.5, "prune_kind": "head"},
    })

TIERS = {
    "ci": MLMCompareConfig(
        size="tiny", seq_len=16, vocab_size=600, train_blocks=96, val_blocks=32, test_blocks=32,
        methods=_methods(8, start_epoch=1, interval=1, prune_epoch=1),
        loop=LoopConfig(epochs=2, batch_size=8, lr=1e-3, steps_per_epoch=4, eval_every=2, progress=False),
    ),
    # the mat-bert quick regime (vocab 2000, no dropout, lr 1e-3: vanilla learns past the unigram
    # floor within minutes; with vocab 8000 it sat on it); prune after epoch 2 of 8 (25 %, the
    # paper: epoch 15 of 24 at full scale), MAT decisions after epochs 2 and 5
    "quick": MLMCompareConfig(
        size="mini", seq_len=64, vocab_size=2000, dropout=0.0, val_blocks=256, test_blocks=512,
        methods=_methods(64, start_epoch=2, interval=3, prune_epoch=2),
        loop=LoopConfig(epochs=8, batch_size=16, lr=1e-3, steps_per_epoch=100, eval_every=100, warmup_steps=100),
    ),
    "cpu": MLMCompareConfig(
        size="mini", seq_len=128, vocab_size=8000, seeds=(0, 1, 2),
        methods=_methods(64, start_epoch=3, interval=3, prune_epoch=6),
        loop=LoopConfig(epochs=24, batch_size=16, lr=5e-4, steps_per_epoch=100, eval_every=50, warmup_steps=100),
    ),
    # seed 000 §B.2: prune 50 % of heads by λmax at the 15th epoch, MAT α = 0.2 afterwards.
    "paper": MLMCompareConfig(
        size="base", seq_len=512, vocab_size=30000, seeds=(0, 1, 2),
        methods=_methods(64, start_epoch=5, interval=8, prune_epoch=15),
        loop=LoopConfig(epochs=24, batch_size=8, lr=2e-4, eps=1e-6, schedule="linear", steps_per_epoch=500,
                        eval_every=250),
    ),
}

_COLUMNS: list[tuple[str, str, int | None, str]] = [
    ("forward sparsity", "forward_sparsity", None, "pct"),
    ("backward sparsity", "backward_sparsity", None, "pct"),
    ("test loss (best-val ckpt)", "test_loss", None, "num"),
    ("compute to convergence", "convergence_flops", None, "flops"),
    ("total compute", "total_flops", None, "flops"),
    ("compute to vanilla's best val", "compute_to_target_flops", None, "flops"),
    ("vs vanilla", "compute_ratio_vs_baseline", None, "ratio"),
    ("wall s", "wall_s", None, "secs"),
]


@register_recipe(
    "mat-prune",
    tiers=TIERS,
    description="MAT + λmax head pruning vs structured SNIP on BERT MLM (seed 000 Table 5)",
)
def mat_prune(cfg: MLMCompareConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the comparison; returns the results document (see docs/results.md)."""
    labels = [lab for lab, e in cfg.methods.items() if e.method == "mat_prune"]
    return run_mlm_comparison(
        cfg, out_dir, data_dir, title="Pruning: BERT MLM on WikiText-2 (seed 000 Table 5)",
        paper_key="mat_table5_pruning_bert", columns=_COLUMNS, mat_label=labels[0] if labels else None,
    )
