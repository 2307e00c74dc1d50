"""Recipe ``mat-bert`` — seed 001 Table 1: BERT MLM on WikiText-2, attention heads as modules;
vanilla vs Rand vs Multirate vs MAT at equal steps, data order and initial weights.

Offline, the WikiText-2 train split is absent: the data module trains on the first 90 % of the
valid split and validates on the rest (the split note is printed in every report).

Tiers: ``ci`` (seconds, tests), ``quick`` (bert_mlm mini, T=64, WordPiece vocab 2000, no dropout, one seed),
``cpu`` (mini, T=128, 3 seeds), ``paper`` (seed 000 Table 4: 12 layers / 12 heads / H768, T=512,
batch 8, lr 2e-4 linear decay, 12k steps; α=0.1, β=1e-3, S=64, from epoch 5 every 8 epochs).

How the quick regime was chosen (2026-11-28, vanilla pilots of 6 epochs × 100 steps, batch 16; the
report's note states the gap for every run): a comparison of training methods means something only
once vanilla has learned more than token frequencies. With WordPiece vocab 8000 the unigram floor
(val cross-entropy of the train frequencies) is 6.705 nats and vanilla sat on it (6.703 after 600
steps at lr 2e-3; 6.713 after 1200 steps at lr 1e-3 in the previous quick run); with vocab 2000
the floor is 6.175 and vanilla was 0.32 nat below it after 600 steps at lr 1e-3 (lr 2e-3 was
slower: 6.232 against 6.102 at step 200). Over the tier's 12 × 100 steps vanilla reached 5.745
(0.43 below the floor) with dropout 0.1 and 5.719 (0.46 below) with dropout 0, which the tier
uses: short of the 0.5 nat the issue asks. The five methods took 25 min here, over the issue's
20-minute budget. MAT evaluates after epochs 3 and 8 of 12 (25% and 67% of training, as the
issue reads the paper's schedule; the paper: after epochs 5, 13, 21 of 24).
"""

from __future__ import annotations

from pathlib import Path

from ntkit.harness import LoopConfig
from ntkit.recipes import register_recipe
from ntkit.recipes._mat_mlm import MLMCompareConfig, mat_methods, run_mlm_comparison

__all__ = ["TIERS", "mat_bert"]

TIERS = {
    "ci": MLMCompareConfig(
        size="tiny", seq_len=16, vocab_size=600, train_blocks=96, val_blocks=32, test_blocks=32,
        methods=mat_methods(0.1, num_samples=8, start_epoch=1, interval=1),
        loop=LoopConfig(epochs=2, batch_size=8, lr=1e-3, steps_per_epoch=4, eval_every=2, progress=False),
    ),
    # vocab 2000, no dropout and MAT's evaluations after epochs 3 and 8 (25% / 67% of training):
    # see the module docstring for how the regime was chosen
    "quick": MLMCompareConfig(
        size="mini", seq_len=64, vocab_size=2000, val_blocks=256, test_blocks=512, dropout=0.0,
        methods=mat_methods(0.1, num_samples=64, start_epoch=3, interval=5),
        loop=LoopConfig(epochs=12, batch_size=16, lr=1e-3, steps_per_epoch=100, eval_every=100, warmup_steps=100),
    ),
    "cpu": MLMCompareConfig(
        size="mini", seq_len=128, vocab_size=8000, seeds=(0, 1, 2),
        methods=mat_methods(0.1, num_samples=64, start_epoch=3, interval=3),
        loop=LoopConfig(epochs=24, batch_size=16, lr=5e-4, steps_per_epoch=100, eval_every=50, warmup_steps=100),
    ),
    # seed 000 Table 4 (BERT column). Adam [ε, β1, β2] is transcribed as [1e-6, 0, 0] — garbled in
    # the extraction; we keep ε = 1e-6 and torch's default betas. 24 epochs × 500 steps = 12k steps
    # (WikiText-2 train at T=512, batch 8); offline only the smaller split note's train text exists.
    "paper": MLMCompareConfig(
        size="base", seq_len=512, vocab_size=30000, seeds=(0, 1, 2),
        methods=mat_methods(0.1, beta=1e-3, num_samples=64, start_epoch=5, interval=8),
        loop=LoopConfig(epochs=24, batch_size=8, lr=2e-4, eps=1e-6, schedule="linear", steps_per_epoch=500,
                        eval_every=250, budget_fracs=(0.35, 0.52, 0.70)),
    ),
}


@register_recipe(
    "mat-bert",
    tiers=TIERS,
    description="MAT vs vanilla/Rand/Multirate on BERT MLM, WikiText-2 (seed 001 Table 1)",
)
def mat_bert(cfg: MLMCompareConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the comparison; returns the results document (see docs/results.md)."""
    return run_mlm_comparison(
        cfg, out_dir, data_dir, title="BERT MLM on WikiText-2 (seed 001 Table 1)",
        paper_key="mat_table1_bert_wikitext2",
    )
