"""Shared body of the MLM MAT recipes (mat-bert, mat-switch, mat-prune, mat-scale).

A :class:`MLMCompareConfig` says which model, data, loop hyper-parameters and methods to run;
:func:`build_mlm_task` turns it into an :class:`~ntkit.harness.MLMTask`, and
:func:`ntkit.harness.compare` trains every method of ``cfg.methods`` (``{label: MethodEntry}``,
see :mod:`ntkit.harness.compose`) on it — e.g. ``methods.mat.alpha={"head":0.2}`` or
``methods=vanilla,mat`` on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ntkit.errors import check
from ntkit.harness import LoopConfig, MethodEntry, MLMTask, methods_of

__all__ = ["MLMCompareConfig", "build_mlm_task", "mat_methods"]


def mat_methods(
    alpha: float | dict[str, float] = 0.1,
    *,
    beta: float = 1e-3,
    num_samples: int = 64,
    start_epoch: int = 5,
    interval: int = 8,
    rand_fraction: float = 0.5,
    multirate_k: int = 5,
    labels: tuple[str, ...] = ("vanilla", "rand", "multirate", "mat", "rand_replay"),
    per_layer: bool = False,
    threshold_scope: str = "layer",
    probes: str = "fresh",
) -> dict[str, MethodEntry]:
    """The MAT comparison of seed 000/001 — vanilla, Rand, Multirate and MAT with these settings —
    plus ``rand_replay``, the control with MAT's exact per-layer active counts (it must come after
    "mat": :func:`ntkit.harness.compare` configures it from MAT's record of the same seed).

    ``per_layer``: Rand / Multirate draw within each layer (the VGG reading: seed 000 §B.1
    "Multirate randomly partitions the filters … by 50%/50% in each layer").
    ``threshold_scope`` / ``probes``: MAT's readings (:class:`ntkit.methods.MATConfig`)."""
    spec = {
        "vanilla": {"method": "vanilla"},
        "rand": {"method": "rand", "fraction": rand_fraction, "per_layer": per_layer},
        "multirate": {"method": "multirate", "k": multirate_k, "per_layer": per_layer},
        "mat": {"method": "mat", "alpha": alpha, "beta": beta, "num_samples": num_samples,
                "start_epoch": start_epoch, "interval": interval, "threshold_scope": threshold_scope,
                "probes": probes},
        "rand_replay": {"method": "rand_replay", "source": "mat"},
    }
    return methods_of({lab: spec[lab] for lab in labels})


@dataclass
class MLMCompareConfig:
    """One MLM comparison (every field overridable as ``key=value``; loop fields as ``loop.key``).

    Attributes:
        model: "bert_mlm" or "switch_mlm".
        size: BERT size name (tiny, mini, small, medium, base, large).
        num_experts: experts per MoE layer (switch_mlm).
        dataset: "wikitext2" (offline: train = valid[:90 %], see the split note) or "tinyshakespeare".
        seq_len: tokens per block T.
        vocab_size: WordPiece vocabulary size.
        train_blocks, val_blocks, test_blocks: keep only the first N blocks of a split (0 = all).
        dropout: model dropout (training only; evaluation and mNTK run in eval mode).
        aux_weight: weight of the Switch load-balancing loss.
        kinds: module kinds to partition: "head" or "head+expert".
        methods: ``{label: MethodEntry}`` — the methods compared (method settings live in each
            method's config); the label "vanilla" is the baseline and must be present.
        seeds: seeds; each seed fixes init, data order and masks, identical for every method.
        paper_numbers: path of paper_numbers.json ("" = ``<data_dir>/../reference/``).
        loop: the training-loop hyper-parameters (:class:`LoopConfig`).
    """

    model: str = "bert_mlm"
    size: str = "mini"
    num_experts: int = 4
    dataset: str = "wikitext2"
    seq_len: int = 64
    vocab_size: int = 8000
    train_blocks: int = 0
    val_blocks: int = 0
    test_blocks: int = 0
    dropout: float = 0.1
    aux_weight: float = 0.01
    kinds: str = "head"
    methods: dict[str, MethodEntry] = field(default_factory=mat_methods)
    seeds: tuple[int, ...] = (0,)
    paper_numbers: str = ""
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        check(self.model in ("bert_mlm", "switch_mlm"), "model", self.model, "bert_mlm or switch_mlm")
        check(self.kinds in ("head", "head+expert"), "kinds", self.kinds, "head or head+expert")
        check(self.kinds == "head" or self.model == "switch_mlm", "kinds", self.kinds,
              "head for a dense model (experts need switch_mlm)")
        from ntkit.models.transformer import BERT_SIZES

        check(self.size in BERT_SIZES, "size", self.size, f"one of {', '.join(BERT_SIZES)}")
        check(self.seq_len >= 8, "seq_len", self.seq_len, "an integer >= 8")
        check(self.vocab_size >= 32, "vocab_size", self.vocab_size, "an integer >= 32")
        check(self.num_experts >= 1, "num_experts", self.num_experts, "an integer >= 1")
        for name in ("train_blocks", "val_blocks", "test_blocks"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0 (0 = all)")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        check(0.0 <= self.aux_weight < float("inf"), "aux_weight", self.aux_weight, "a finite number >= 0")
        check(self.dataset in ("wikitext2", "tinyshakespeare"), "dataset", self.dataset, "wikitext2 or tinyshakespeare")
        check(len(self.seeds) >= 1 and all(s >= 0 for s in self.seeds), "seeds", self.seeds,
              "at least one seed, each an integer >= 0")
        check(isinstance(self.methods, dict) and "vanilla" in self.methods, "methods", list(self.methods),
              "labels that include vanilla (the baseline)")


def _partition_fn(kinds: str):
    from ntkit.partition import Partition, attention_heads, moe_experts

    def fn(model: torch.nn.Module) -> Partition:
        p = attention_heads(model)
        if kinds == "head+expert":
            p = Partition(list(p.groups) + list(moe_experts(model).groups))
        return p

    return fn


def build_mlm_task(cfg: MLMCompareConfig, data_dir: Path | None) -> tuple[MLMTask, str]:
    """The task of ``cfg`` and the data split note (to print in every report)."""
    from ntkit.data import load_dataset
    from ntkit.models import build_model

    data = load_dataset(cfg.dataset, data_dir=data_dir, block_size=cfg.seq_len, vocab_size=cfg.vocab_size)

    def cut(x: torch.Tensor, n: int) -> torch.Tensor:
        return x[:n] if n else x

    model_kw: dict[str, Any] = {"size": cfg.size, "vocab_size": data.vocab_size, "max_len": cfg.seq_len, "dropout": cfg.dropout}
    if cfg.model == "switch_mlm":
        model_kw["num_experts"] = cfg.num_experts

    def build() -> torch.nn.Module:
        return build_model(cfg.model, **model_kw)

    def collate(blocks: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        out = data.collator(generator=g)(blocks)  # 15 % selected; 80/10/10 [MASK]/random/kept
        return out["input_ids"], out["labels"]

    task = MLMTask(
        name=f"{cfg.model}-{cfg.size}",
        train=cut(data.train, cfg.train_blocks),
        val=cut(data.val, cfg.val_blocks),
        test=cut(data.test, cfg.test_blocks),
        build=build,
        partition_fn=_partition_fn(cfg.kinds),
        collate=collate,
        aux_weight=cfg.aux_weight if cfg.model == "switch_mlm" else 0.0,
        routing_dependent=cfg.model == "switch_mlm",
        unigram_floor=data.unigram_floor("val", cfg.val_blocks),
    )
    note = (f"{data.split_note}; T={cfg.seq_len}, WordPiece vocab {data.vocab_size}; blocks used "
            f"train/val/test = {task.num_train}/{len(task._eval['val'][0])}/{len(task._eval['test'][0])}; "
            f"unigram floor (val cross-entropy of the train token frequencies) {task.unigram_floor:.3f} nats")
    return task, note


def floor_note(records: list[dict], floor: float | None, baseline: str = "vanilla") -> str:
    """How far below the unigram floor each seed's baseline got: a comparison of methods means
    something only once the baseline has learned more than token frequencies (issue: ≥ 0.5 nat)."""
    if floor is None:
        return "Unigram floor: unknown."
    gaps = [(r["seed"], floor - r["best_val_loss"]) for r in records
            if r["method"] == baseline and r.get("best_val_loss") is not None]
    shown = ", ".join(f"seed {s}: {g:+.3f}" for s, g in sorted(gaps)) or "no baseline run"
    regime = ("learned beyond token frequencies" if gaps and min(g for _, g in gaps) >= 0.5
              else "**within 0.5 nat of the floor: the comparison says little about learning**")
    return f"Unigram floor {floor:.3f} nats; {baseline}'s best val loss below it ({shown}): {regime}."


def budget_columns(fracs: tuple[float, ...]) -> list[tuple[str, str, int | None, str]]:
    """Column specs for the val loss at each budget (fractions of vanilla's training compute)."""
    return [(f"val loss @ {round(100 * f)}% vanilla compute", "val_loss_at_budget", i, "num")
            for i, f in enumerate(fracs)]


#: The seed-table columns of mat-bert / mat-switch after the budget columns.
MLM_COLUMNS: list[tuple[str, str, int | None, str]] = [
    ("test loss (best-val ckpt)", "test_loss", None, "num"),
    ("Δ test loss vs vanilla (paired)", "paired_test_loss_diff", None, "num"),
    ("compute to own best", "convergence_flops", None, "flops"),
    ("own best: vs vanilla", "convergence_ratio_vs_baseline", None, "ratio"),
    ("compute to vanilla's best val", "compute_to_target_flops", None, "flops"),
    ("vs vanilla", "compute_ratio_vs_baseline", None, "ratio"),
    ("mNTK overhead", "overhead_share", None, "pct2"),
    ("wall s", "wall_s", None, "secs"),
]


def run_mlm_comparison(
    cfg: MLMCompareConfig,
    out_dir: Path,
    data_dir: Path | None,
    *,
    title: str,
    paper_key: str | None,
    columns: list[tuple[str, str, int | None, str]] | None = None,
    paper_rows: dict[str, str] | None = None,
    mat_label: str | None = "mat",
) -> dict:
    """Train ``cfg.methods`` × ``cfg.seeds`` on the MLM task and return the results document."""
    from ntkit.harness import compare
    from ntkit.recipes.report import comparison_result, find_paper_numbers

    task, note = build_mlm_task(cfg, data_dir)
    records = compare(task, cfg.methods, cfg.loop, cfg.seeds)
    cols = columns if columns is not None else budget_columns(cfg.loop.budget_fracs) + MLM_COLUMNS
    notes = [
        f"Data: {note}.",
        (f"Model: {cfg.model} size={cfg.size}; modules: {cfg.kinds}; every method trained "
        f"{cfg.loop.epochs} epochs × {records[0]['steps_per_epoch']} steps from the same initial weights and data order."),
        ("Compute = executed matmul/conv FLOPs (forward + partial backward + mNTK overhead); "
        "'compute to vanilla's best val' = FLOPs at which the val loss first reaches vanilla's best "
        "val loss (linear between evaluations; — = never); 'compute to own best' = FLOPs at each run's own "
        "best val loss (the paper's 'Computation'); 'Δ … (paired)' = run − vanilla of the same seed (same "
        "init and data order), mean ± std over seeds. rand_replay = random modules with MAT's exact "
        "per-layer active counts at MAT's decision epochs (same seed)."),
    ]
    notes.append(floor_note(records, task.unigram_floor))
    doc = comparison_result(
        records, title=title, columns=cols, out_dir=out_dir, notes=notes,
        paper=find_paper_numbers(cfg.paper_numbers, data_dir), paper_key=paper_key,
        paper_rows=paper_rows, mat_label=mat_label, quality=("test_loss", False),
        extra={"split_note": note, "unigram_floor": task.unigram_floor},
    )
    return doc
