"""Shared body of the MLM MAT recipes (mat-bert, mat-switch, mat-prune, mat-scale).

A :class:`MLMCompareConfig` says which model, data, loop hyper-parameters and methods to run;
:func:`build_mlm_task` turns it into an :class:`~ntkit.recipes._tasks.MLMTask` and
:func:`method_specs` into the methods, all trained by :func:`ntkit.recipes._loop.compare`.

Method labels understood by ``methods``: ``vanilla``, ``rand``, ``multirate``, ``mat``,
``mat_prune_<p>`` (prune p % of heads by λmax, then MAT) and ``snip_<p>`` (structured SNIP at
init, p % of heads pruned) — e.g. ``methods=vanilla,snip_50,snip_75,mat_prune_50``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ntkit.errors import check
from ntkit.recipes._loop import LoopConfig, MethodSpec, comparison_specs
from ntkit.recipes._tasks import MLMTask

__all__ = ["KNOWN_METHODS", "MLMCompareConfig", "build_mlm_task", "method_specs"]

KNOWN_METHODS = ("vanilla", "rand", "multirate", "mat")


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
        methods: method labels (see the module docstring); "vanilla" must be one of them.
        seeds: seeds; each seed fixes init, data order and masks, identical for every method.
        alpha_head, alpha_expert: MAT's α per kind.
        beta: MAT's temporal-policy β.
        ntk_samples: S, samples per mNTK evaluation.
        start_epoch, interval: MAT schedule in epochs (first evaluation after ``start_epoch`` epochs).
        prune_epoch: mat_prune's pruning epoch; prune_alpha: its MAT α for heads.
        multirate_k: Multirate's k; rand_fraction: share of modules Rand updates.
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
    methods: tuple[str, ...] = KNOWN_METHODS
    seeds: tuple[int, ...] = (0,)
    alpha_head: float = 0.1
    alpha_expert: float = 0.2
    beta: float = 1e-3
    ntk_samples: int = 64
    start_epoch: int = 5
    interval: int = 8
    prune_epoch: int = 15
    prune_alpha: float = 0.2
    multirate_k: int = 5
    rand_fraction: float = 0.5
    paper_numbers: str = ""
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        check(self.model in ("bert_mlm", "switch_mlm"), "model", self.model, "bert_mlm or switch_mlm")
        check(self.kinds in ("head", "head+expert"), "kinds", self.kinds, "head or head+expert")
        check(self.kinds == "head" or self.model == "switch_mlm", "kinds", self.kinds,
              "head for a dense model (experts need switch_mlm)")
        check(self.seq_len >= 8, "seq_len", self.seq_len, "an integer >= 8")
        check(len(self.seeds) >= 1, "seeds", self.seeds, "at least one seed")
        check("vanilla" in self.methods, "methods", self.methods, "a list that includes vanilla (the baseline)")
        for m in self.methods:
            ok = m in KNOWN_METHODS or _pct_suffix(m, "snip_") is not None or _pct_suffix(m, "mat_prune_") is not None
            check(ok, "methods", m, "vanilla, rand, multirate, mat, snip_<pct> or mat_prune_<pct>")
        for name in ("alpha_head", "alpha_expert", "prune_alpha", "rand_fraction"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, name, v, "a number in [0, 1]")
        check(self.beta >= 0, "beta", self.beta, "a number >= 0")
        check(self.ntk_samples >= 2, "ntk_samples", self.ntk_samples, "an integer >= 2")
        check(self.start_epoch >= 1, "start_epoch", self.start_epoch, "an integer >= 1")
        check(self.interval >= 1, "interval", self.interval, "an integer >= 1")
        check(self.multirate_k >= 1, "multirate_k", self.multirate_k, "an integer >= 1")


def _pct_suffix(label: str, prefix: str) -> float | None:
    if not label.startswith(prefix):
        return None
    tail = label[len(prefix):]
    return int(tail) / 100.0 if tail.isdigit() and 0 < int(tail) < 100 else None


def method_specs(cfg: MLMCompareConfig, seed: int = 0) -> list[MethodSpec]:
    """The methods of ``cfg.methods`` with the recipe's settings (all seeded with ``seed``)."""
    alpha: dict[str, float] = {"head": cfg.alpha_head}
    if cfg.kinds == "head+expert":
        alpha["expert"] = cfg.alpha_expert
    mat_kw: dict[str, Any] = {"alpha": alpha, "beta": cfg.beta, "num_samples": cfg.ntk_samples,
                                  "start_epoch": cfg.start_epoch, "interval": cfg.interval, "seed": seed}

    def other(lab: str) -> MethodSpec | None:
        if (p := _pct_suffix(lab, "mat_prune_")) is not None:
            kw = dict(mat_kw, alpha={"head": cfg.prune_alpha}, prune_epoch=cfg.prune_epoch, prune_fraction=p)
            return MethodSpec("mat_prune", kw, lab)
        if (p := _pct_suffix(lab, "snip_")) is not None:
            return MethodSpec("snip_struct", {"fraction": p, "kind": "head"}, lab)
        return None

    return comparison_specs(cfg.methods, seed, rand_fraction=cfg.rand_fraction, multirate_k=cfg.multirate_k,
                            mat_kw=mat_kw, other=other)


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
    )
    note = (f"{data.split_note}; T={cfg.seq_len}, WordPiece vocab {data.vocab_size}; blocks used "
            f"train/val/test = {task.num_train}/{len(task._eval['val'][0])}/{len(task._eval['test'][0])}")
    return task, note


def budget_columns(fracs: tuple[float, ...]) -> list[tuple[str, str, int | None, str]]:
    """Column specs for the val loss at each budget (fractions of vanilla's training compute)."""
    return [(f"val loss @ {round(100 * f)}% vanilla compute", "val_loss_at_budget", i, "num")
            for i, f in enumerate(fracs)]


#: The seed-table columns of mat-bert / mat-switch after the budget columns.
MLM_COLUMNS: list[tuple[str, str, int | None, str]] = [
    ("test loss (best-val ckpt)", "test_loss", None, "num"),
    ("compute to convergence", "convergence_flops", None, "flops"),
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
    from ntkit.recipes._loop import compare
    from ntkit.recipes._mat_report import comparison_result, find_paper_numbers

    task, note = build_mlm_task(cfg, data_dir)
    records = compare(task, lambda s: method_specs(cfg, s), cfg.loop, cfg.seeds, out_dir)
    cols = columns if columns is not None else budget_columns(cfg.loop.budget_fracs) + MLM_COLUMNS
    notes = [
        f"Data: {note}.",
        (f"Model: {cfg.model} size={cfg.size}; modules: {cfg.kinds}; every method trained "
        f"{cfg.loop.epochs} epochs × {records[0]['steps_per_epoch']} steps from the same initial weights and data order."),
        ("Compute = executed matmul/conv FLOPs (forward + partial backward + mNTK overhead); "
        "'compute to vanilla's best val' = FLOPs at which the val loss first reaches vanilla's best "
        "val loss (linear between evaluations; — = never)."),
    ]
    doc = comparison_result(
        records, title=title, columns=cols, out_dir=out_dir, notes=notes,
        paper=find_paper_numbers(cfg.paper_numbers, data_dir), paper_key=paper_key,
        paper_rows=paper_rows, mat_label=mat_label,
        extra={"split_note": note},
    )
    return doc
