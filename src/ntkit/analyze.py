"""``ntkit analyze``: the mNTK dynamics the papers plot, for a recipe's model over training.

:func:`analyze` trains the recipe's model with **vanilla** for the tier's epochs through
:func:`ntkit.harness.train_run` (one checkpoint kept per epoch in ``OUT/checkpoints/vanilla_seed<s>/``)
— or, when that folder already holds checkpoints (a finished ``ntkit run RECIPE --out OUT``, or
an earlier analysis), reads them instead of training — and at initialisation and after every
epoch computes, with the engine, on one fixed probe set of S training samples (the same samples
at every epoch, so changes are the model's, not the sampling's):

* per attention head (or whatever the recipe partitions): the mNTK spectrum
  (:func:`ntkit.modular_ntk` + :func:`ntkit.ntk.spectrum.spectrum`) — λmax, λmin, effective rank,
  condition number;
* the whole model's NTK (the sum of the per-layer Grams of :func:`ntkit.partition.layers`, i.e.
  the full empirical NTK of the summed logits): its normalised eigen-spectrum, λmax, λmin,
  condition number λmax/λmin;
* the Hessian trace Tr(H) of the training loss on a fixed batch of S labelled samples
  (:func:`ntkit.ntk.hessian.hessian_trace_estimate`, Hutchinson, ``num_probes`` Rademacher probes;
  standard error reported).

**Information / nuisance split** (seed 001 Fig. 5): with the whole-model NTK eigenvalues sorted in
descending order and normalised to sum 1 (λ̂ᵢ = λᵢ / Σⱼ λⱼ), the *information* space is the
smallest leading set of eigen-directions whose cumulative share reaches ``info_share`` (default
0.9) of the trace; the remaining eigen-directions — each with a small share, where gradient
descent learns slowly and which mostly fit noise — are the *nuisance* space. ``info_rank`` is the
size of the information space.

Outputs in ``out`` (models are in eval mode for every measurement: no dropout):

* ``lambda_max_heads.png`` — λmax heatmaps (layer × head), one panel per analysed epoch, shared
  log colour scale (seed 001 Figs. 1, 3);
* ``lambda_max_over_training.png`` — λmax of every head (rows) over epochs (columns);
* ``head_lambda_max_erank.png`` — λmax and effective rank per head at init and at the last epoch
  (seed 001 Fig. 1);
* ``ntk_spectrum.png`` — normalised eigen-spectrum of the NTK per epoch, information part marked
  (seed 001 Fig. 5);
* ``condition_hessian.png`` — NTK condition number and Hessian trace over training (seed 002
  Figs. 3, 5);
* ``heads.csv`` (``epoch, step, module, layer, head, lambda_max, lambda_min, effective_rank,
  condition_number``), ``spectrum.csv`` (``epoch, index, eigenvalue, normalised, cumulative_share,
  part``), ``training.csv`` (``epoch, step, ntk_lambda_max, ntk_lambda_min, ntk_condition_number,
  ntk_effective_rank, info_rank, hessian_trace, hessian_trace_stderr``) and ``analysis.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ntkit.errors import ConfigError, check

__all__ = ["FIGURES", "HEADS_COLUMNS", "SPECTRUM_COLUMNS", "TRAINING_COLUMNS", "analyze", "info_split"]

HEADS_COLUMNS = ("epoch", "step", "module", "layer", "head", "lambda_max", "lambda_min", "effective_rank",
                 "condition_number")
SPECTRUM_COLUMNS = ("epoch", "index", "eigenvalue", "normalised", "cumulative_share", "part")
TRAINING_COLUMNS = ("epoch", "step", "ntk_lambda_max", "ntk_lambda_min", "ntk_condition_number",
                    "ntk_effective_rank", "info_rank", "hessian_trace", "hessian_trace_stderr")
FIGURES = ("lambda_max_heads.png", "lambda_max_over_training.png", "head_lambda_max_erank.png",
           "ntk_spectrum.png", "condition_hessian.png")


def info_split(eigenvalues: torch.Tensor, share: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Normalised descending spectrum, its cumulative share, and the information rank.

    Args:
        eigenvalues: Tensor [S] (any order; negatives from rounding are clamped to 0).
        share: fraction of the trace the information space must reach, in (0, 1].

    Returns:
        (normalised [S] float64 descending, cumulative [S] float64, k) — k ≥ 1 the smallest count of
        leading eigen-directions with cumulative share ≥ ``share`` (S for an all-zero spectrum).
    """
    check(0.0 < share <= 1.0, "info_share", share, "a number in (0, 1]")
    ev = eigenvalues.detach().to(torch.float64).clamp_min(0).sort(descending=True).values
    total = float(ev.sum())
    if total <= 0 or not math.isfinite(total):
        return torch.zeros_like(ev), torch.zeros_like(ev), int(ev.numel())
    norm = ev / total
    cum = norm.cumsum(0)
    k = int((cum < share - 1e-12).sum()) + 1
    return norm, cum, min(k, int(ev.numel()))


def _task(recipe: str, tier: str, data_dir: Path | None, overrides: Iterable[str]) -> tuple[Any, Any]:
    from ntkit.recipes import resolve_config

    cfg = resolve_config(recipe, tier, list(overrides))
    from ntkit.recipes._mat_mlm import MLMCompareConfig, build_mlm_task

    if isinstance(cfg, MLMCompareConfig):
        return cfg, build_mlm_task(cfg, data_dir)[0]
    from ntkit.recipes._mat_image import ImageCompareConfig, build_image_task

    if isinstance(cfg, ImageCompareConfig):
        return cfg, build_image_task(cfg, data_dir)[0]
    raise ConfigError(
        f"recipe={recipe!r}: analyze needs a MAT comparison recipe (its config has a model, data and loop: "
        "mat-bert, mat-switch, mat-vgg, demo, …)"
    )


def _snapshots(task: Any, cfg: Any, seed: int, ckdir: Path, progress: bool) -> tuple[list[tuple[int, int, Path]], int, bool]:
    """``[(epoch, step, path)]`` of the epoch-end checkpoints in ``ckdir`` (training vanilla first
    when there are none), the steps per epoch, and whether this call trained."""
    from ntkit.harness import MethodEntry, train_run
    from ntkit.train.checkpoint import CheckpointManager
    from ntkit.train.sampler import SeededBatchSampler

    loop = cfg.loop
    spe = len(SeededBatchSampler(task.num_train, loop.batch_size, seed=seed))
    if loop.steps_per_epoch:
        spe = min(spe, loop.steps_per_epoch)
    trained = False
    if not CheckpointManager(ckdir).checkpoints():
        run_loop = dataclasses.replace(loop, keep_checkpoints=loop.epochs + 1, checkpoint_every=0, progress=progress)
        train_run(task, "vanilla", MethodEntry("vanilla"), run_loop, seed, checkpoint_dir=ckdir,
                  desc="analyze: training vanilla")
        trained = True
    snaps = [(step // spe, step, path) for step, path in CheckpointManager(ckdir).checkpoints() if step % spe == 0]
    return snaps, spe, trained


def _measure(task: Any, model: torch.nn.Module, seed: int, num_samples: int, num_probes: int) -> dict[str, Any]:
    """Every number of one snapshot (model in eval mode)."""
    import ntkit
    from ntkit.ntk.hessian import hessian_trace_estimate
    from ntkit.ntk.spectrum import spectrum
    from ntkit.partition import layers

    model.eval()
    heads = task.partition(model)
    inputs, mask = task.ntk_batch(num_samples, torch.Generator().manual_seed(seed + 7919))
    res = ntkit.modular_ntk(model, inputs, heads, output_mask=mask)
    sp = spectrum(res.grams)
    full = ntkit.modular_ntk(model, inputs, layers(model), output_mask=mask).grams.to(torch.float64).sum(0)
    fs = spectrum(full)
    g = torch.Generator().manual_seed(seed + 104729)
    batch = task.train_batch(torch.randperm(task.num_train, generator=g)[:num_samples], g)
    ht = hessian_trace_estimate(lambda: task.loss(model, batch)[0], model, None, num_probes=num_probes,
                                generator=torch.Generator().manual_seed(seed + 1299709))
    return {"heads": heads, "spec": sp, "full": fs, "hessian": ht}


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def _head_index(name: str) -> str:
    tail = name.rsplit(".", 1)[-1]
    return tail.removeprefix("head")


def analyze(
    recipe: str,
    tier: str,
    out: str | Path,
    data_dir: str | Path | None = None,
    *,
    overrides: Iterable[str] = (),
    num_samples: int | None = None,
    num_probes: int = 4,
    info_share: float = 0.9,
    max_panels: int = 6,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse recipe ``recipe`` at ``tier`` into ``out`` (see the module docstring for what is written).

    Args:
        recipe, tier: a registered MAT-comparison recipe and tier (as ``ntkit run``).
        out: output directory; its ``checkpoints/vanilla_seed<s>/`` are read when present.
        data_dir: dataset directory (as ``ntkit run --data-dir``).
        overrides: ``key=value`` config overrides of the recipe.
        num_samples: S, probe samples for the mNTK and the Hessian batch (default: the recipe's
            MAT ``num_samples`` when it has one, else 32).
        num_probes: Hutchinson probes per Hessian-trace estimate (≥ 1).
        info_share: the information space's share of the NTK trace, in (0, 1].
        max_panels: at most this many epoch panels in the heatmap figure (evenly spaced, ≥ 2).
        progress: show a tqdm bar over the analysed snapshots (and the training bar).

    Returns:
        ``{"epochs": [...], "files": [...], "trained": bool, "info_share", "num_samples", "seed"}``.
    """
    check(isinstance(num_probes, int) and num_probes >= 1, "num_probes", num_probes, "an integer >= 1")
    check(isinstance(max_panels, int) and max_panels >= 2, "max_panels", max_panels, "an integer >= 2")
    check(0.0 < info_share <= 1.0, "info_share", info_share, "a number in (0, 1]")
    out = Path(out)
    ddir = None if data_dir is None else Path(data_dir)
    if ddir is not None and not ddir.is_dir():
        raise ConfigError(f"data_dir={str(ddir)!r}: no such directory")
    cfg, task = _task(recipe, tier, ddir, overrides)
    if num_samples is None:
        mat = getattr(cfg, "methods", {}).get("mat")
        num_samples = int(getattr(getattr(mat, "config", None), "num_samples", 32))
    check(isinstance(num_samples, int) and num_samples >= 2, "num_samples", num_samples, "an integer >= 2")
    num_samples = min(num_samples, task.num_train)
    seed = int(cfg.seeds[0])
    out.mkdir(parents=True, exist_ok=True)
    snaps, _, trained = _snapshots(task, cfg, seed, out / "checkpoints" / f"vanilla_seed{seed}", progress)

    from tqdm.auto import tqdm

    from ntkit.train.checkpoint import load_checkpoint

    torch.manual_seed(seed)
    model = task.build_model()  # the initial weights of the run (same seed → same init)
    todo: list[tuple[int, int, Path | None]] = [(0, 0, None), *[s for s in snaps if s[1] > 0]]
    head_rows: list[dict] = []
    spec_rows: list[dict] = []
    train_rows: list[dict] = []
    per_epoch: list[dict] = []
    for epoch, step, path in tqdm(todo, desc="analyze: mNTK, spectra, Hessian trace", disable=not progress):
        if path is not None:
            load_checkpoint(path, model, restore_rng=False)
        m = _measure(task, model, seed, num_samples, num_probes)
        heads, sp, fs, ht = m["heads"], m["spec"], m["full"], m["hessian"]
        for i, g in enumerate(heads):
            head_rows.append({
                "epoch": epoch, "step": step, "module": g.name, "layer": g.layer, "head": _head_index(g.name),
                "lambda_max": float(sp.lambda_max[i]), "lambda_min": float(sp.lambda_min[i]),
                "effective_rank": float(sp.effective_rank[i]), "condition_number": float(sp.condition_number[i]),
            })
        norm, cum, k = info_split(fs.eigenvalues[0], info_share)
        ev_desc = fs.eigenvalues[0].sort(descending=True).values
        for j in range(norm.numel()):
            spec_rows.append({"epoch": epoch, "index": j + 1, "eigenvalue": float(ev_desc[j]),
                              "normalised": float(norm[j]), "cumulative_share": float(cum[j]),
                              "part": "information" if j < k else "nuisance"})
        train_rows.append({
            "epoch": epoch, "step": step, "ntk_lambda_max": float(fs.lambda_max[0]),
            "ntk_lambda_min": float(fs.lambda_min[0]), "ntk_condition_number": float(fs.condition_number[0]),
            "ntk_effective_rank": float(fs.effective_rank[0]), "info_rank": k,
            "hessian_trace": float(ht.trace[0]), "hessian_trace_stderr": float(ht.stderr[0]),
        })
        per_epoch.append({"epoch": epoch, "heads": heads, "lmax": sp.lambda_max.clone(),
                          "erank": sp.effective_rank.clone(), "norm": norm, "k": k})

    _write_csv(out / "heads.csv", HEADS_COLUMNS, head_rows)
    _write_csv(out / "spectrum.csv", SPECTRUM_COLUMNS, spec_rows)
    _write_csv(out / "training.csv", TRAINING_COLUMNS, train_rows)
    _plot_all(out, per_epoch, train_rows, recipe, tier, info_share, max_panels)
    files = [*FIGURES, "heads.csv", "spectrum.csv", "training.csv", "analysis.json"]
    doc = {"recipe": recipe, "tier": tier, "seed": seed, "num_samples": num_samples, "num_probes": num_probes,
           "info_share": info_share, "trained": trained, "epochs": [r["epoch"] for r in train_rows],
           "files": files, "training": train_rows}
    (out / "analysis.json").write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return doc


# ------------------------------------------------------------------------------------ plots
def _grid(heads: Any, values: torch.Tensor) -> tuple[list[str], int, torch.Tensor]:
    """(layer names, max heads per layer, [L, Hmax] float64 with NaN padding)."""
    by_layer = heads.groups_by_layer()
    names = list(by_layer)
    width = max(len(v) for v in by_layer.values())
    grid = torch.full((len(names), width), math.nan, dtype=torch.float64)
    for r, idx in enumerate(by_layer.values()):
        grid[r, : len(idx)] = values[idx].to(torch.float64)
    return names, width, grid


def _short(layer: str) -> str:
    """A compact layer label: the first number in the name with its parent (``blocks.3.attn`` → ``L3``)."""
    parts = [p for p in layer.split(".") if p.isdigit()]
    return f"L{parts[0]}" if parts else layer[-12:]


def _plot_all(out: Path, per_epoch: list[dict], train_rows: list[dict], recipe: str, tier: str,
              info_share: float, max_panels: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    title = f"{recipe} ({tier}), vanilla"
    epochs = [p["epoch"] for p in per_epoch]
    # 1. λmax heatmaps, layer × head, one panel per (evenly spaced) epoch, shared log colour scale
    pick = sorted({round(i * (len(per_epoch) - 1) / max(1, min(max_panels, len(per_epoch)) - 1))
                   for i in range(min(max_panels, len(per_epoch)))})
    grids = [_grid(per_epoch[i]["heads"], per_epoch[i]["lmax"]) for i in pick]
    vals = torch.cat([g[2].flatten() for g in grids])
    pos = vals[torch.isfinite(vals) & (vals > 0)]
    norm = LogNorm(vmin=float(pos.min()), vmax=float(pos.max())) if pos.numel() else None
    fig, axes = plt.subplots(1, len(pick), figsize=(2.2 + 2.0 * len(pick), 3.4), squeeze=False, layout="constrained")
    im = None
    for ax, i, (names, width, grid) in zip(axes[0], pick, grids, strict=True):
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", norm=norm)
        ax.set_title(f"epoch {per_epoch[i]['epoch']}", fontsize=10)
        ax.set_xlabel("head")
        ax.set_xticks(range(width))
        ax.set_yticks(range(len(names)), [_short(n) for n in names])
    axes[0][0].set_ylabel("layer")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="mNTK λmax (log scale)")
    fig.suptitle(f"λmax of each head across layers and over training — {title}", fontsize=11)
    fig.savefig(out / "lambda_max_heads.png", dpi=120)
    plt.close(fig)

    # 2. λmax of every head (rows) over epochs (columns)
    heads = per_epoch[0]["heads"]
    mat = torch.stack([p["lmax"].to(torch.float64) for p in per_epoch], dim=1)  # [M, E]
    labels = [f"{_short(g.layer)} h{_head_index(g.name)}" for g in heads]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(epochs) + 3), max(3.0, 0.28 * len(labels) + 1.5)),
                           layout="constrained")
    im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) <= 32 else 5)
    ax.set_xlabel("epoch (0 = initialisation)")
    ax.set_ylabel("head")
    fig.colorbar(im, ax=ax, label="mNTK λmax (log scale)")
    ax.set_title(f"λmax per head over training — {title}", fontsize=10)
    fig.savefig(out / "lambda_max_over_training.png", dpi=120)
    plt.close(fig)

    # 3. λmax and effective rank per head, at init and at the last epoch
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.32 * len(labels) + 2), 6.0), sharex=True, layout="constrained")
    x = torch.arange(len(labels)).numpy()
    for p, style in ((per_epoch[0], "o--"), (per_epoch[-1], "s-")):
        axes[0].plot(x, p["lmax"].numpy(), style, ms=4, label=f"epoch {p['epoch']}")
        axes[1].plot(x, p["erank"].numpy(), style, ms=4, label=f"epoch {p['epoch']}")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mNTK λmax (log)")
    axes[1].set_ylabel("effective rank exp(ρ)")
    axes[1].set_xticks(x, labels, rotation=90, fontsize=8 if len(labels) <= 32 else 5)
    axes[1].set_xlabel("head")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"λmax and effective rank per head — {title}", fontsize=10)
    fig.savefig(out / "head_lambda_max_erank.png", dpi=120)
    plt.close(fig)

    # 4. normalised NTK eigen-spectrum per epoch, information part solid, nuisance part dotted
    fig, ax = plt.subplots(figsize=(7.0, 4.5), layout="constrained")
    cmap = plt.get_cmap("plasma")
    for n, p in enumerate(per_epoch):
        nv, k = p["norm"].numpy(), p["k"]
        idx = torch.arange(1, len(nv) + 1).numpy()
        color = cmap(n / max(1, len(per_epoch) - 1) * 0.85)
        keep = nv > 0
        ax.plot(idx[:k][keep[:k]], nv[:k][keep[:k]], "-", color=color, lw=1.8, label=f"epoch {p['epoch']} (info rank {k})")
        ax.plot(idx[k - 1 :][keep[k - 1 :]], nv[k - 1 :][keep[k - 1 :]], ":", color=color, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("normalised eigenvalue λᵢ / Σλ (log)")
    ax.set_title(f"NTK eigen-spectrum: information (solid, first {info_share:.0%} of the trace) "
                 f"vs nuisance (dotted)\n{title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(out / "ntk_spectrum.png", dpi=120)
    plt.close(fig)

    # 5. condition number and Hessian trace over training
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), layout="constrained")
    ep = [r["epoch"] for r in train_rows]
    cond = [r["ntk_condition_number"] for r in train_rows]
    axes[0].plot(ep, cond, "o-")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch (0 = initialisation)")
    axes[0].set_ylabel("NTK condition number λmax/λmin (log)")
    axes[0].set_title("NTK condition number", fontsize=10)
    tr = [r["hessian_trace"] for r in train_rows]
    err = [0.0 if math.isnan(r["hessian_trace_stderr"]) else r["hessian_trace_stderr"] for r in train_rows]
    axes[1].errorbar(ep, tr, yerr=err, fmt="s-", capsize=3)
    axes[1].set_xlabel("epoch (0 = initialisation)")
    axes[1].set_ylabel("Hessian trace Tr(H) (Hutchinson ± s.e.)")
    axes[1].set_title("Hessian trace of the training loss", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.set_xticks(ep)
    fig.suptitle(title, fontsize=11)
    fig.savefig(out / "condition_hessian.png", dpi=120)
    plt.close(fig)
