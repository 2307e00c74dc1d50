"""Recipes ``pl-bert``, ``pl-switch``, ``pl-vgg``, ``pl-resnet`` — seed 002: PL-regularisation-driven
structured pruning (:mod:`ntkit.methods.plreg`) against the pruning baselines.

* ``pl-bert`` (Table 1): BERT MLM on WikiText-2, heads, one-shot {5, 75 %}.
* ``pl-switch`` (Table 2): Switch-Transformer MLM, experts {5, 50 %} and heads + experts.
* ``pl-vgg`` (Table 3): VGG-16 on CIFAR-10, filters, linear schedule from epoch 15 to 50 % and 90 %.
* ``pl-resnet`` (Table 5): ResNet-56 on CIFAR-10, block-internal filters (``conv1`` of each basic
  block: the only ResNet filters whose removal does not touch a residual sum), linear from epoch 5
  to 25 %.

Every method of a comparison trains from the same initial weights and data order. The label
``vanilla`` is the dense model; it runs ``plreg`` with ``ratio=0`` — no gate, no pruning, only the
diagnostics (condition number and Tr(H), booked as overhead, never as training compute), so the
dense condition-number curve of seed 002 Fig. 3 sits beside the pruned one. Baselines
(``structured_prune`` with a criterion, ``lth``) enter the comparison when they are registered.

Columns (the seed tables' plus cost): training loss (MLM: perplexity) at the end of chosen epochs,
measured in eval mode on a fixed subset of the training set; test perplexity / accuracy of the
best-validation checkpoint; Δ = test − train (final epoch); parameter count, forward FLOPs of one
batch and the measured training-step time (forward + backward, median of ``timing_reps``) of the
final — surgically reduced or masked — model next to the dense one. Points of the training curve
taken before a ``--resume`` are not kept (the curve restarts at the resume point).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ntkit.errors import check
from ntkit.harness import LoopConfig, MethodEntry, methods_of
from ntkit.recipes import register_recipe
from ntkit.recipes._mat_mlm import MLMCompareConfig, build_mlm_task, floor_note

__all__ = ["PLImageConfig", "PLMLMConfig", "pl_methods", "resnet_block_filters"]

#: seed 002's baselines per recipe: label → (registered method, its fields). FPGM and CHIP prune the
#: same share of every layer (their papers' protocol: FPGM's score is a distance within the layer,
#: CHIP's a nuclear-norm change of the layer's own feature maps — neither compares across layers)
_BASELINES: dict[str, dict[str, dict[str, Any]]] = {
    "bert": {
        "lth": {"method": "lth"},
        "att_score": {"method": "structured_prune", "criterion": "att_score", "schedule": "iterative"},
        "snip": {"method": "structured_prune", "criterion": "snip", "at_init": True},
        "grasp": {"method": "structured_prune", "criterion": "grasp", "at_init": True},
    },
    "switch": {
        "lth": {"method": "lth"},
        "exp_score": {"method": "structured_prune", "criterion": "exp_score", "schedule": "iterative"},
        "snip": {"method": "structured_prune", "criterion": "snip", "at_init": True},
        "grasp": {"method": "structured_prune", "criterion": "grasp", "at_init": True},
    },
    "vgg": {
        "fpgm": {"method": "structured_prune", "criterion": "fpgm", "scope": "layer"},
        "chip": {"method": "structured_prune", "criterion": "chip", "scope": "layer"},
        "dpfps": {"method": "structured_prune", "criterion": "dpfps"},
        "lth": {"method": "lth"},
        "snip": {"method": "structured_prune", "criterion": "snip", "at_init": True},
        "grasp": {"method": "structured_prune", "criterion": "grasp", "at_init": True},
    },
    "resnet": {
        "fpgm": {"method": "structured_prune", "criterion": "fpgm", "scope": "layer"},
        "dpfps": {"method": "structured_prune", "criterion": "dpfps"},
        "lth": {"method": "lth"},
        "snip": {"method": "structured_prune", "criterion": "snip", "at_init": True},
        "grasp": {"method": "structured_prune", "criterion": "grasp", "at_init": True},
    },
}


def pl_methods(
    family: str,
    kind: str,
    ratios: tuple[float, ...],
    *,
    schedule: str = "oneshot",
    t: int = 5,
    t0: int = 15,
    t_end: int = 0,
    num_samples: int = 64,
    gate_steps: int = 4,
    gate_batch: int = 0,
    track_samples: int = 32,
    extra_kinds: tuple[str, ...] = (),
    baselines: bool = True,
    layer_arm: bool = False,
    frozen_arm: bool = False,
) -> dict[str, MethodEntry]:
    """``vanilla`` (plreg diagnostics only), ``plreg`` per ratio (label suffix ``_<pct>`` when
    several ratios), ``plreg_<kinds>`` for each of ``extra_kinds`` (e.g. ``"head+expert"``),
    ``plreg_layer`` (TopK within each layer; ``layer_arm``), ``plreg_layer_frozen`` (the same with
    ``trace="frozen"``: the Tr(H) penalty's per-structure traces measured once per pruning time;
    ``frozen_arm``, with ``layer_arm``) and the registered baselines of
    ``family`` at each ratio with the same schedule times."""
    from ntkit.methods import METHODS

    sched = {"schedule": schedule, "t": t, "t0": t0, "t_end": t_end}
    common = {"num_samples": num_samples, "track_samples": track_samples, "gate_steps": gate_steps,
              "gate_batch": gate_batch}
    spec: dict[str, dict[str, Any]] = {
        "vanilla": {"method": "plreg", "kind": kind, "ratio": 0.0, "track_samples": track_samples},
    }
    many = len(ratios) > 1

    def lab(base: str, r: float) -> str:
        return f"{base}_{round(100 * r)}" if many else base

    for r in ratios:
        spec[lab("plreg", r)] = {"method": "plreg", "kind": kind, "ratio": r, **sched, **common}
        for k in extra_kinds:
            spec[lab(f"plreg_{k.replace('+', '_')}", r)] = {"method": "plreg", "kind": k, "ratio": r, **sched, **common}
        if layer_arm:
            spec[lab("plreg_layer", r)] = {"method": "plreg", "kind": kind, "ratio": r, "scope": "layer", **sched,
                                           **common}
            if frozen_arm:
                spec[lab("plreg_layer_frozen", r)] = {**spec[lab("plreg_layer", r)], "trace": "frozen"}
    if baselines:
        for name, base in _BASELINES[family].items():
            if base["method"] not in METHODS:
                continue
            for r in ratios:
                fields = {**base, "ratio": r, "kind": kind.split("+")[-1]}
                if "schedule" not in base and not base.get("at_init") and base["method"] != "lth":
                    fields.update(sched)
                spec[lab(name, r)] = fields
    return methods_of(spec)


@dataclass
class PLMLMConfig(MLMCompareConfig):
    """An MLM pruning comparison: :class:`~ntkit.recipes._mat_mlm.MLMCompareConfig` plus

    Attributes:
        report_epochs: epochs (1-based, ≤ loop.epochs) at whose end the training perplexity is
            reported (the seed's "after 8k / 10k / 15k iterations").
        train_eval_blocks: training blocks of the fixed subset on which the training loss is measured.
        timing_reps: repetitions of the step-time measurement (median), ≥ 1.
    """

    methods: dict[str, MethodEntry] = field(default_factory=lambda: pl_methods("bert", "head", (0.75,)))
    report_epochs: tuple[int, ...] = (1, 2, 3)
    train_eval_blocks: int = 128
    timing_reps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_common(self)


def _check_common(cfg: Any) -> None:
    ok = len(cfg.report_epochs) >= 1 and all(isinstance(e, int) and 1 <= e <= cfg.loop.epochs for e in cfg.report_epochs)
    check(ok, "report_epochs", cfg.report_epochs, f"epochs in [1, loop.epochs={cfg.loop.epochs}]")
    check(isinstance(cfg.timing_reps, int) and cfg.timing_reps >= 1, "timing_reps", cfg.timing_reps, "an integer >= 1")


@dataclass
class PLImageConfig:
    """An image pruning comparison (``key=value`` overrides; loop fields as ``loop.key``).

    Attributes:
        model: "vgg16" (every conv filter) or "resnet56" (``conv1`` filters of the basic blocks).
        width: width multiplier (CPU scale: < 1).
        dataset: "cifar10", "digits", …; train_limit / test_limit: first N samples (0 = all).
        val_frac: share of train held out for validation (best-val checkpoint).
        augment: random crop + flip on training batches.
        methods: ``{label: MethodEntry}``; "vanilla" must be present.
        seeds: seeds (init, data order).
        report_epochs: epochs (1-based) at whose end the training loss is reported.
        train_eval_samples: training images of the fixed subset the training loss is measured on.
        timing_reps: repetitions of the step-time measurement (median).
        loop: :class:`LoopConfig`.
    """

    model: str = "vgg16"
    width: float = 0.25
    dataset: str = "cifar10"
    train_limit: int = 0
    test_limit: int = 0
    val_frac: float = 0.1
    augment: bool = True
    methods: dict[str, MethodEntry] = field(default_factory=lambda: pl_methods("vgg", "filter", (0.5, 0.9)))
    seeds: tuple[int, ...] = (0,)
    report_epochs: tuple[int, ...] = (1, 2, 3)
    train_eval_samples: int = 512
    timing_reps: int = 5
    paper_numbers: str = ""
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        check(self.model in ("vgg16", "resnet56"), "model", self.model, "vgg16 or resnet56")
        check(isinstance(self.width, (int, float)) and 0 < self.width < math.inf, "width", self.width, "a number > 0")
        check(self.train_limit >= 0 and self.test_limit >= 0, "train_limit/test_limit",
              (self.train_limit, self.test_limit), "integers >= 0 (0 = all)")
        check(0 < self.val_frac < 1, "val_frac", self.val_frac, "a fraction in (0, 1)")
        check(isinstance(self.methods, dict) and "vanilla" in self.methods, "methods", list(self.methods),
              "labels that include vanilla (the baseline)")
        check(len(self.seeds) >= 1 and all(isinstance(s, int) and s >= 0 for s in self.seeds), "seeds", self.seeds,
              "at least one seed, each an integer >= 0")
        check(self.train_eval_samples >= 1, "train_eval_samples", self.train_eval_samples, "an integer >= 1")
        _check_common(self)


# ------------------------------------------------------------------------------ tasks
class _TrainCurve:
    """Wraps a task: every validation also measures the loss (and accuracy) on a fixed training
    subset (``probe``, a task whose "val" split is that subset) into ``self.points``."""

    def __init__(self, task: Any, probe: Any) -> None:
        self._task, self._probe = task, probe
        self.points: list[dict[str, float | None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float | None]:
        out = self._task.evaluate(model, split)
        if split == "val":
            tr = self._probe.evaluate(model, "val")
            self.points.append({"train_loss": tr["loss"], "train_acc": tr.get("acc")})
        return out


def resnet_block_filters(model: torch.nn.Module) -> Any:
    """The filters pl-resnet prunes: those of every residual block's first conv (``*.conv1`` inside
    a block; the stem conv and the block outputs, tied by the residual sums, are not pruned)."""
    from ntkit.partition import Partition, conv_filters

    groups = [g for g in conv_filters(model) if g.layer.endswith(".conv1") and g.layer.count(".") >= 2]
    return Partition(groups)


def _image_task(cfg: PLImageConfig, data_dir: Path | None) -> tuple[Any, Any, str]:
    from ntkit.data import load_dataset, val_split
    from ntkit.harness import ImageTask
    from ntkit.models import build_model
    from ntkit.partition import conv_filters
    from ntkit.recipes._mat_image import _crop_flip

    kw: dict[str, Any] = {}
    if cfg.train_limit:
        kw["limit"] = cfg.train_limit
    if cfg.test_limit:
        kw["test_limit"] = cfg.test_limit
    data = val_split(load_dataset(cfg.dataset, data_dir=data_dir, **kw), cfg.val_frac, seed=0)
    c = data.in_shape[0]
    model_kw = {"num_classes": data.num_classes, "in_channels": c, "width": cfg.width}

    def build() -> torch.nn.Module:
        return build_model(cfg.model, **model_kw)

    part = conv_filters if cfg.model == "vgg16" else resnet_block_filters
    assert data.val_x is not None and data.val_y is not None
    common = {"build": build, "partition_fn": part}
    task = ImageTask(name=f"{cfg.model}-{cfg.dataset}", train_x=data.train_x, train_y=data.train_y, val_x=data.val_x,
                     val_y=data.val_y, test_x=data.test_x, test_y=data.test_y,
                     augment=_crop_flip if cfg.augment else None, **common)
    n = min(cfg.train_eval_samples, len(data.train_x))
    sub_x, sub_y = data.train_x[:n], data.train_y[:n]
    probe = ImageTask(name="train-subset", train_x=sub_x, train_y=sub_y, val_x=sub_x, val_y=sub_y, test_x=sub_x,
                      test_y=sub_y, **common)
    note = f"{data.note}; train/val/test = {len(data.train_x)}/{len(data.val_x)}/{len(data.test_x)}"
    return task, probe, note


def _mlm_probe(task: Any, cfg: PLMLMConfig) -> Any:
    from ntkit.harness import MLMTask

    sub = task.train[: cfg.train_eval_blocks]
    return MLMTask(name="train-subset", train=sub, val=sub, test=sub[:1], build=task._build,
                   partition_fn=task._partition, collate=task._collate, aux_weight=0.0)


# ------------------------------------------------------------------------------ running
def _compare(task: Any, probe: Any, methods: dict[str, MethodEntry], loop: LoopConfig,
             seeds: tuple[int, ...], reps: int) -> list[dict]:
    """:func:`ntkit.harness.compare` with a training-loss curve per run (``rec["train_curve"]``)."""
    from ntkit.harness import finalize, train_run
    from ntkit.harness.context import current_run

    run = current_run()
    records = []
    for seed in seeds:
        for label, entry in methods.items():
            ck = None if run is None or run.checkpoint_dir is None else run.checkpoint_dir / f"{label}_seed{seed}"
            done = None if ck is None else ck / "record.json"
            if run is not None and run.resume and done is not None and done.is_file():
                records.append(run.load_record(done))
                continue
            wrapped = _TrainCurve(task, probe)
            rec = train_run(wrapped, label, entry, loop, seed, checkpoint_dir=ck,  # type: ignore[arg-type]
                            resume=bool(run and run.resume), logger=None if run is None else run.logger,
                            desc=f"{task.name} {label} seed {seed}")
            pts = wrapped.points[-len(rec["curve"]):]
            rec["train_curve"] = [{**c, **p} for c, p in zip(rec["curve"][-len(pts):], pts)] if pts else []
            rec.update(_cost(task, rec, loop.batch_size, seed, reps))
            if done is not None and run is not None:
                run.save_record(done, rec)
            records.append(rec)
    finalize(records, loop.budget_fracs)
    return records


def _cost(task: Any, rec: dict, batch_size: int, seed: int, reps: int) -> dict:
    """Parameter count, forward FLOPs of one batch and median step time (forward + backward) of
    the run's final model — rebuilt, its surgery replayed and its final mask applied — and of the
    dense model, timed interleaved in the same call (``dense_step_s``), so "time vs dense" is a
    ratio of two measurements taken under the same conditions. ``timing_load``: the 1-minute load
    average after timing; above the CPU count, other processes competed for the cores, and the
    small pruned models' many short kernels then suffer most (a 90%-pruned quarter-width VGG
    measured 1.5 s per step on 2 busy cores against 15 ms on quiet ones)."""
    from ntkit.sparse import attach
    from ntkit.sparse.surgery import replay
    from ntkit.train.flops import FlopCounter

    torch.manual_seed(seed)
    model = task.build_model()
    part = task.partition(model)
    if rec["structure_changes"]:
        ch = replay(model, part, rec["structure_changes"])
        model, part = ch.model, ch.partition
    ctl = attach(model, part)
    if rec["pruned_history"] and any(rec["pruned_history"][-1]):
        ctl.set_pruned(torch.tensor(rec["pruned_history"][-1], dtype=torch.bool))
    torch.manual_seed(seed)
    dense = task.build_model()
    g = torch.Generator().manual_seed(seed)
    batch = task.train_batch(torch.randperm(task.num_train, generator=g)[:batch_size], g)
    model.train()
    dense.train()
    counter = FlopCounter()
    with counter.phase("forward"):
        loss = task.loss(model, batch)[0]
    loss.backward()
    times: dict[str, list[float]] = {"pruned": [], "dense": []}
    for _ in range(reps + 2):
        for key, m in (("pruned", model), ("dense", dense)):
            m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            task.loss(m, batch)[0].backward()
            times[key].append(time.perf_counter() - t0)
    ctl.detach()
    return {
        "final_num_params": sum(p.numel() for p in model.parameters()),
        "final_forward_flops": float(counter.totals().get("forward", 0.0)),
        "final_step_s": statistics.median(times["pruned"][2:]),
        "dense_step_s": statistics.median(times["dense"][2:]),
        "timing_load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------ report
def _fmt(ms: dict | None, f: str = "{:.4g}") -> str:
    if not ms or ms.get("mean") is None or not math.isfinite(ms["mean"]):
        return "—"
    if ms.get("std") and ms.get("n", 1) > 1:
        return f"{f.format(ms['mean'])} ± {f.format(ms['std'])}"
    return f.format(ms["mean"])


def _ms(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _train_at(rec: dict, epoch: int, key: str) -> float | None:
    for p in rec.get("train_curve", []):
        if p.get("epoch") == epoch and p["step"] == epoch * rec["steps_per_epoch"]:
            return p.get(key)
    return None


def _ratio_of(rec: dict) -> float:
    return float(rec["method_config"].get("ratio", 0.0) or 0.0)


def _gate_share(rec: dict) -> float | None:
    times = [r for r in rec.get("log", []) if r.get("event") == "pl_time"]
    if not times or rec["method_config"].get("ratio", 0) == 0:
        return None
    last = times[-1]  # features + gate training (older records: the whole decision, surgery included)
    spent = last["features_s"] + last["gate_s"] if "gate_s" in last else last["decision_s"]
    return spent / max(rec["wall_s"], 1e-12)


def _tracks(rec: dict, kind: str | None = None) -> list[dict]:
    return [h for h in rec.get("method_history", []) if h.get("event") == "pl_track"
            and (kind is None or h["kind"] == kind)]


def _pl_document(records: list[dict], *, title: str, mlm: bool, report_epochs: tuple[int, ...], out_dir: Path,
                 notes: list[str], heat_kind: str | None = None) -> dict:
    from ntkit.recipes.report import heatmap, line_plot

    _derive(records, mlm, report_epochs)
    labels = list(dict.fromkeys(r["method"] for r in records))
    by = {lab: [r for r in records if r["method"] == lab] for lab in labels}
    dense = by.get("vanilla", records[:1])
    dense_step = _ms([r["final_step_s"] for r in dense])["mean"]
    dense_flops = _ms([r["final_forward_flops"] for r in dense])["mean"]
    rows, summary = [], {}
    for lab, rs in by.items():
        row: dict[str, str] = {"method": lab, "ratio": f"{round(100 * _ratio_of(rs[0]))}%", "seeds": str(len(rs))}
        for i, e in enumerate(report_epochs):
            row[f"{'train PPL' if mlm else 'train loss'} @ep{e}"] = _fmt(_ms([r["train_at_epochs"][i] for r in rs]))
        delta = [r["test_minus_train"] for r in rs]
        if mlm:
            test = [r["test_ppl"] for r in rs]
            row["test PPL"] = _fmt(_ms(test))
            row["ΔPPL (test − train)"] = _fmt(_ms(delta))
        else:
            test = [r["test_acc"] for r in rs]
            row["test acc"] = _fmt(_ms([100 * v for v in test]), "{:.2f}%")
            row["Δacc (test − train)"] = _fmt(_ms([100 * d if d is not None else None for d in delta]), "{:+.2f}")
        key_val = _ms(test)["mean"]
        row["params"] = _fmt(_ms([r["final_num_params"] for r in rs]), "{:,.0f}")
        fl = _ms([r["final_forward_flops"] for r in rs])["mean"]
        row["fwd FLOPs/batch"] = _fmt(_ms([r["final_forward_flops"] for r in rs]), "{:.3g}")
        row["FLOPs vs dense"] = f"{fl / dense_flops:.2f}" if fl and dense_flops else "—"
        row["step ms"] = _fmt(_ms([1000 * r["final_step_s"] for r in rs]), "{:.1f}")
        # paired with the dense model timed in the same call (older records: vanilla's own timing)
        row["time vs dense"] = _fmt(_ms([r["final_step_s"] / d if (d := r.get("dense_step_s", dense_step)) else None
                                         for r in rs]), "{:.2f}")
        share = _ms([r["gate_share"] for r in rs])
        row["gate+features share of wall"] = _fmt({k: (v * 100 if isinstance(v, float) and k != "n" else v)
                                                   for k, v in share.items()}, "{:.2f}%") if share["n"] else "—"
        row["wall s"] = _fmt(_ms([r["wall_s"] for r in rs]), "{:.0f}")
        rows.append(row)
        summary[lab] = key_val
    # verdict per ratio
    sentences = []
    ratios = sorted({_ratio_of(rs[0]) for rs in by.values() if _ratio_of(rs[0]) > 0})
    for ratio in ratios:
        group = {lab: summary[lab] for lab, rs in by.items() if _ratio_of(rs[0]) == ratio and summary[lab] is not None}
        if not group:
            continue
        best = (min if mlm else max)(group, key=lambda k: group[k])
        metric = "test perplexity" if mlm else "test accuracy"
        shown = ", ".join(f"{k} {math.exp(0) * v:.4g}" if mlm else f"{k} {100 * v:.2f}%" for k, v in
                          sorted(group.items(), key=lambda kv: kv[1], reverse=not mlm))
        dense_v = summary.get("vanilla")
        vs = ""
        if dense_v is not None:
            better = group[best] < dense_v if mlm else group[best] > dense_v
            vs = f"; it is {'better' if better else 'worse'} than the dense model ({dense_v:.4g}" + \
                 ("" if mlm else f" = {100 * dense_v:.2f}%") + ")"
        sentences.append(f"At {round(100 * ratio)}% pruned, {best} won on {metric} ({shown}){vs}.")
    if len(ratios) == 0:
        sentences.append("No pruning method ran.")
    plots = []
    # Fig. 3: condition number over training; Fig. 5: Tr(H) vs condition number
    kinds = sorted({h["kind"] for r in records for h in _tracks(r)})
    for kind in kinds:
        series, scatter = {}, {}
        for lab, rs in by.items():
            tr = [h for h in _tracks(rs[0], kind) if h.get("phase") != "before"]
            if not tr:
                continue
            series[lab] = ([h["epoch"] + 1 for h in tr], [h["cond"] if math.isfinite(h["cond"]) else None for h in tr])
            pts = [(h["cond"], h["trace_mean"]) for h in tr if h.get("trace_mean") is not None and math.isfinite(h["cond"])]
            if pts:
                scatter[lab] = pts
        if series:
            plots.append(line_plot(out_dir / f"condition_number_{kind}.png", series, xlabel="epoch",
                                   ylabel=f"λmax/λmin of the {kind}s' NTK", logy=True,
                                   title=f"Condition number over training ({kind}s; seed 002 Fig. 3)").name)
        if scatter:
            plots.append(_scatter(out_dir / f"trace_vs_condition_{kind}.png", scatter, kind).name)
    if heat_kind is not None:
        runs = [r for r in records if r["method_config"].get("ratio", 0) > 0 and heat_kind in
                str(r["method_config"].get("kind", "")).split("+")]
        if runs:
            r = runs[0]
            tr = [h for h in _tracks(r, heat_kind) if h.get("phase") != "before"]
            first = [h for h in _tracks(r, heat_kind)]
            names = list(first[0]["cond_structures"]) if first else []
            pruned = {n for h in r["method_history"] if h.get("event") == "pl_prune" for n in h["pruned"]}
            if names and tr:
                mat = [[math.log10(h["cond_structures"][n]) if n in h["cond_structures"]
                        and 0 < h["cond_structures"][n] < math.inf else math.nan for h in tr] for n in names]
                rows_l = [f"{n} {'(kept)' if n not in pruned else '(pruned)'}" for n in names]
                plots.append(heatmap(out_dir / f"{heat_kind}_condition_heatmap.png", mat, row_labels=rows_l,
                                     col_labels=[str(h["epoch"] + 1) for h in tr], xlabel="epoch",
                                     colorbar_label="log10 condition number",
                                     title=f"{r['method']}: {heat_kind}s' condition numbers (seed 002 Fig. 2)").name)
    gate = [r["gate_share"] for r in records if r["gate_share"] is not None]
    all_notes = sentences + notes + [
        "vanilla = the dense model (plreg with ratio 0: diagnostics only, booked as overhead, no effect on training).",
        ("Training loss / PPL: eval mode on a fixed subset of the training set at the end of the epoch; test: the "
        "best-validation checkpoint; Δ uses the last reported epoch."),
        ("params / FLOPs / step time: the final model (surgery replayed, final mask applied), forward FLOPs of one "
        "training batch, step = forward + backward, median of repeats, measured right after each run, interleaved "
        "with the dense model's step ('time vs dense' is that paired ratio)."),
    ]
    cores = os.cpu_count() or 1
    loaded = sorted({r["method"] for r in records if (r.get("timing_load") or 0) > cores})
    if loaded:
        all_notes.append(f"Step times of {', '.join(loaded)} were measured while the 1-minute load average exceeded the "
                         f"{cores} cores (other processes competing): their 'step ms' and 'time vs dense' are not "
                         "trustworthy; `python bench/pruned_step.py` measures the pruned step on a quiet machine.")
    if gate:
        all_notes.append(f"plreg's gate training + features took {100 * max(gate):.2f}% of its wall-clock at most "
                         f"(target ≤ 3%; the diagnostics, TopK and surgery are not in this share — records "
                         f"written before the split count TopK and surgery in).")
    return {
        "title": title,
        "summary": {"verdict": " ".join(sentences), "runs": len(records),
                    "seeds": sorted({r["seed"] for r in records})},
        "tables": {title: rows},
        "plots": plots,
        "notes": all_notes,
        "records": records,
        "layout": _pl_layout(mlm, report_epochs),
    }


def _derive(records: list[dict], mlm: bool, report_epochs: tuple[int, ...]) -> None:
    """The table's numbers per record, added to it (the table pools them over seeds; ``ntkit
    report`` pools them over runs through :func:`_pl_layout`): ``train_at_epochs`` (PPL or loss at
    ``report_epochs``), ``test_ppl`` (MLM), ``test_minus_train`` (at the last reported epoch),
    ``flops_vs_dense`` (against the same seed's dense model), ``time_vs_dense`` and ``gate_share``."""
    last = max(report_epochs)
    dense_flops = {r["seed"]: r["final_forward_flops"] for r in records if r["method"] == "vanilla"}
    for r in records:
        tr = [_train_at(r, e, "train_loss") for e in report_epochs]
        r["train_at_epochs"] = [math.exp(v) if (mlm and v is not None) else v for v in tr]
        if mlm:
            r["test_ppl"] = math.exp(r["test_loss"])
            loss = _train_at(r, last, "train_loss")
            r["test_minus_train"] = r["test_ppl"] - math.exp(loss) if loss is not None else None
        else:
            acc = _train_at(r, last, "train_acc")
            r["test_minus_train"] = r["test_acc"] - acc if acc is not None else None
        d = dense_flops.get(r["seed"])
        r["flops_vs_dense"] = r["final_forward_flops"] / d if d else None
        r["time_vs_dense"] = r["final_step_s"] / r["dense_step_s"] if r.get("dense_step_s") else None
        r["gate_share"] = _gate_share(r)


def _pl_layout(mlm: bool, report_epochs: tuple[int, ...]) -> dict:
    """The table's column spec over :func:`_derive`'s per-record numbers (``results.layout``), so
    that ``ntkit report`` pools runs of separate seeds into this table's layout."""
    train = "train PPL" if mlm else "train loss"
    cols = [[f"{train} @ep{e}", "train_at_epochs", i, "num"] for i, e in enumerate(report_epochs)]
    cols += [["test PPL", "test_ppl", None, "num"], ["ΔPPL (test − train)", "test_minus_train", None, "num"]] if mlm \
        else [["test acc", "test_acc", None, "pct"], ["Δacc (test − train)", "test_minus_train", None, "pct"]]
    cols += [["params", "final_num_params", None, "count"], ["FLOPs vs dense", "flops_vs_dense", None, "ratio"],
             ["step ms", "final_step_s", None, "ms"], ["time vs dense", "time_vs_dense", None, "ratio"],
             ["gate+features share of wall", "gate_share", None, "pct2"], ["wall s", "wall_s", None, "secs"]]
    return {"columns": cols, "paper_key": None, "paper_rows": {}}


def _scatter(path: Path, pts: dict[str, list[tuple[float, float]]], kind: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for lab, xy in pts.items():
        ax.scatter([a for a, _ in xy], [b for _, b in xy], label=lab, s=14)
    ax.set_xscale("log")
    ax.set_xlabel(f"condition number of the {kind}s' NTK")
    ax.set_ylabel(f"Tr(H) per {kind} (Hutchinson, mean)")
    ax.set_title("Tr(H) vs condition number (seed 002 Fig. 5)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _run_mlm(cfg: PLMLMConfig, out_dir: Path, data_dir: Path | None, title: str, heat_kind: str | None) -> dict:
    task, note = build_mlm_task(cfg, data_dir)
    probe = _mlm_probe(task, cfg)
    records = _compare(task, probe, cfg.methods, cfg.loop, cfg.seeds, cfg.timing_reps)
    notes = [f"Data: {note}.", (f"Model: {cfg.model} size={cfg.size}; structures: {cfg.kinds}; "
             f"{cfg.loop.epochs} epochs × {records[0]['steps_per_epoch']} steps, batch {cfg.loop.batch_size}."),
             floor_note(records, task.unigram_floor)]
    doc = _pl_document(records, title=title, mlm=True, report_epochs=cfg.report_epochs, out_dir=out_dir,
                        notes=notes, heat_kind=heat_kind)
    doc["unigram_floor"] = task.unigram_floor
    return doc


def _run_image(cfg: PLImageConfig, out_dir: Path, data_dir: Path | None, title: str) -> dict:
    task, probe, note = _image_task(cfg, data_dir)
    records = _compare(task, probe, cfg.methods, cfg.loop, cfg.seeds, cfg.timing_reps)
    what = "every conv filter" if cfg.model == "vgg16" else "conv1 filters of the basic blocks"
    notes = [f"Data: {note}.", (f"Model: {cfg.model} width={cfg.width}; structures: {what}; {cfg.loop.epochs} epochs × "
             f"{records[0]['steps_per_epoch']} steps, batch {cfg.loop.batch_size}; optimizer SlicedAdamW (the paper: SGD)."),
             ("Baselines LTH / SNIP / GraSP are unstructured at init in the seed's VGG appendix; here they prune "
             "whole filters (scores summed per filter), so every method yields the same structure count."),
             ("Which filters compete: plreg ranks all the network's filters in one TopK (the seed), plreg_layer "
              "prunes the same share of every layer; FPGM and CHIP prune the same share of every layer (their "
              "papers' protocol); LTH, SNIP, GraSP and DPFPS rank globally."),
             ("plreg_layer_frozen is plreg_layer with the Tr(H) penalty's per-structure traces measured once per "
              "pruning time and held fixed while the gate trains (trace='frozen': no third-order backward); "
              "plreg and plreg_layer differentiate the re-estimated trace at every gate step.")]
    return _pl_document(records, title=title, mlm=False, report_epochs=cfg.report_epochs, out_dir=out_dir, notes=notes)


# ------------------------------------------------------------------------------ tiers
def _mlm_tiers(family: str, kinds: str, model: str, kind: str, ratio: float, extra: tuple[str, ...]) -> dict:
    def m(**kw: Any) -> dict[str, MethodEntry]:
        return pl_methods(family, kind, (ratio,), extra_kinds=extra, **kw)

    sw = {"model": model, "kinds": kinds}
    # vocab 2000 and no dropout (the mat-bert quick regime, where vanilla learns more than token
    # frequencies within minutes); 6 × 100 steps: with vocab 8000 and 6 × 30 steps the dense
    # model ended at 6.88 nats, above the 6.645 unigram floor, and the comparison meant little.
    # lr 5e-4: at lr 1e-3 with this batch (16 × 32 tokens) the dense model stalled at 6.23 nats
    # while the pruned one went on learning (a comparison of optimisation failures)
    quick = PLMLMConfig(size="mini", seq_len=32, vocab_size=2000, dropout=0.0, val_blocks=192, test_blocks=384,
                        train_eval_blocks=192, report_epochs=(2, 4, 6), **sw,
                        methods=m(t=2, num_samples=32, track_samples=32, gate_steps=2, gate_batch=8),
                        loop=LoopConfig(epochs=6, batch_size=16, lr=5e-4, steps_per_epoch=100, eval_every=100,
                                        warmup_steps=50))
    return {
        "ci": PLMLMConfig(size="tiny", seq_len=16, vocab_size=600, train_blocks=96, val_blocks=32, test_blocks=32,
                          train_eval_blocks=32, report_epochs=(1, 2), timing_reps=2, **sw,
                          methods=m(t=1, num_samples=8, track_samples=8, gate_steps=1),
                          loop=LoopConfig(epochs=2, batch_size=8, lr=1e-3, steps_per_epoch=4, eval_every=2,
                                          progress=False)),
        "quick": quick,
        # cpu: the quick regime over 3 seeds (mean ± std), sized for about an hour per recipe on a
        # 2-core machine at one thread per run (the earlier cpu tier, T = 128 with vocab 8000 for
        # 1500 steps, needed ~6 h per recipe there and left the dense model on the unigram floor)
        "cpu": replace(quick, seeds=(0, 1, 2)),
        "paper": PLMLMConfig(size="base", seq_len=512, vocab_size=30000, seeds=(0, 1, 2), report_epochs=(16, 20, 30),
                             **sw, methods=m(t=5, num_samples=64, track_samples=64, gate_steps=0),
                             loop=LoopConfig(epochs=30, batch_size=8, lr=2e-4, eps=1e-6, steps_per_epoch=500,
                                             eval_every=500)),
    }


@register_recipe("pl-bert", tiers=_mlm_tiers("bert", "head", "bert_mlm", "head", 0.75, ()),
                 description="PL-regularisation pruning of BERT heads {5, 75%} vs baselines (seed 002 Table 1)")
def pl_bert(cfg: PLMLMConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the comparison; returns the results document."""
    return _run_mlm(cfg, out_dir, data_dir, "PL pruning: BERT MLM heads (seed 002 Table 1)", None)


@register_recipe("pl-switch", tiers=_mlm_tiers("switch", "head+expert", "switch_mlm", "expert", 0.5, ("head+expert",)),
                 description="PL-regularisation pruning of Switch experts {5, 50%} and heads+experts (seed 002 Table 2)")
def pl_switch(cfg: PLMLMConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the comparison; returns the results document."""
    return _run_mlm(cfg, out_dir, data_dir, "PL pruning: Switch-Transformer MLM experts (seed 002 Table 2)", "expert")


def _image_tiers(family: str, model: str, ratios: tuple[float, ...], t0_paper: int, cpu_lr: float) -> dict:
    def m(**kw: Any) -> dict[str, MethodEntry]:
        # plreg_layer beside the seed's global TopK: over VGG-16's 13 layers the global TopK of
        # seed 0's cpu run cut the first layers to 1-3 filters of 16-64 (test accuracy 32% at 50%
        # pruned, chance at 90%; the features' scale differs by layer, as λmax did for MAT)
        # plreg_layer_frozen: the penalty's gradient without the third-order backward (the reading
        # the seed's 2-3 % gate cost fits; see plreg's docstring), same gate steps and batches
        return pl_methods(family, "filter", ratios, schedule="linear", layer_arm=True, frozen_arm=True, **kw)

    # gate batches of 16: a gate step (Hutchinson Tr(H) differentiated through the mask, a
    # third-order backward) costs 13 training steps at batch 64 on quarter-width VGG-16 and 4.4
    # at batch 16 (1377 / 472 ms against 107 ms, 2 threads)
    quick = PLImageConfig(model=model, width=0.25, train_limit=4000, test_limit=2000, train_eval_samples=512,
                          report_epochs=(3, 5, 6),
                          methods=m(t0=2, t_end=4, num_samples=32, track_samples=32, gate_steps=2, gate_batch=16),
                          loop=LoopConfig(epochs=6, batch_size=64, lr=1e-3, schedule="cosine"))
    return {
        "ci": PLImageConfig(model=model, width=0.125, dataset="digits", augment=False, train_eval_samples=64,
                            report_epochs=(1, 2), timing_reps=2,
                            methods=m(t0=1, t_end=2, num_samples=8, track_samples=8, gate_steps=1),
                            loop=LoopConfig(epochs=2, batch_size=16, lr=1e-3, steps_per_epoch=3, progress=False)),
        "quick": quick,
        # cpu: 3 seeds (mean ± std) on twice the quick tier's training set, sized for about an hour
        # per recipe on a 2-core machine at one thread per run (the earlier cpu tier, width 0.5 for
        # 40 epochs, needed ~10 h per recipe there). lr: ResNet-56 at width 0.25 reached 26.7% /
        # 34.8% / 41.9% test accuracy dense with lr 1e-3 / 3e-3 / 3e-3 on 8000 samples (one seed each)
        "cpu": replace(quick, train_limit=8000, seeds=(0, 1, 2), loop=replace(quick.loop, lr=cpu_lr)),
        "paper": PLImageConfig(model=model, width=1.0, seeds=(0, 1, 2), report_epochs=(100, 150, 200),
                               methods=m(t0=t0_paper, t_end=t0_paper + 50, num_samples=64, gate_steps=0),
                               loop=LoopConfig(epochs=200, batch_size=128, lr=1e-3, schedule="step")),
    }


@register_recipe("pl-vgg", tiers=_image_tiers("vgg", "vgg16", (0.5, 0.9), 15, 1e-3),
                 description="PL-regularisation pruning of VGG-16 filters, linear from epoch 15 to 50%/90% (seed 002 Table 3)")
def pl_vgg(cfg: PLImageConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the comparison; returns the results document."""
    return _run_image(cfg, out_dir, data_dir, "PL pruning: VGG-16 filters on CIFAR-10 (seed 002 Table 3)")


@register_recipe("pl-resnet", tiers=_image_tiers("resnet", "resnet56", (0.25,), 5, 3e-3),
                 description="PL-regularisation pruning of ResNet-56 block filters, linear from epoch 5 to 25% (seed 002 Table 5)")
def pl_resnet(cfg: PLImageConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the comparison; returns the results document."""
    return _run_image(cfg, out_dir, data_dir, "PL pruning: ResNet-56 block filters on CIFAR-10 (seed 002 Table 5)")
