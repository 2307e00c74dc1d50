"""Recipes ``ntt-mnist``, ``ntt-fashion``, ``ntt-cifar`` — seed 003: sparse networks found at init
by Neural Tangent Transfer against the at-init pruning baselines, accuracy vs density.

For each density, method and seed: a fresh network with the NTT authors' init
(:func:`ntkit.methods.ntt.glorot_truncated_init_`), then the method's mask / sparse init —

* ``ntt`` — label-free NTT (:class:`ntkit.methods.ntt.NTT`, layerwise by default);
* ``snip`` / ``layerwise_snip`` — |θ·∂L/∂θ| on ``snip_samples`` labelled training samples;
* ``logit_snip`` / ``logit_snip_layerwise`` — |θ·∂Z/∂θ|, Z = Σ‖f(x)‖², label-free;
* ``random`` — a uniform random mask (exact density per layer) on the standard init;
  ``random_rescaled`` — the same with the weights × √(1/density);
* ``dense`` — no mask (trained once per seed; shown at every density)

— then supervised training with the mask fixed (:class:`ntkit.methods.masks.WeightMask`): Adam
(lr 1e-3, β 0.9/0.999), batch 64, L2 1e-8 on the weights (authors' code), 10 % of train held out
for validation. Both the test accuracy at the last iteration (what the authors report) and at
the best-validation epoch are reported, mean ± std over seeds, with an accuracy-vs-density plot
and the authors' notebook anchors (MNIST, layerwise, density 0.03) beside ours.

The loop is written out plainly here (the shared harness is not used on purpose: the mask and
the per-method init are the only moving parts). ``ntt-cifar`` uses the offline CIFAR-10 10k/10k
subset (JPEG q75) — the report labels it so — and Conv-4 with VALID convolutions (3200 features)
as in the authors' code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.data import load_dataset
from ntkit.data.images import ImageData, val_split
from ntkit.errors import check
from ntkit.methods import LoopContext, build_method
from ntkit.methods.masks import (
    WeightMask,
    logit_snip_mask,
    mask_density,
    maskable_weights,
    random_mask,
    rescale_weights_,
    snip_mask,
)
from ntkit.methods.ntt import KERNELS, glorot_truncated_init_
from ntkit.models import build_model
from ntkit.models.vision import Conv4
from ntkit.recipes import register_recipe
from ntkit.recipes.report import fmt_mean_std, line_plot, mean_std

__all__ = ["PAPER_ANCHORS", "TIERS_CIFAR", "TIERS_FASHION", "TIERS_MNIST", "NTTRecipeConfig", "run_ntt_sweep"]

#: Every method the sweep knows.
ALL_METHODS = ("ntt", "snip", "layerwise_snip", "logit_snip", "logit_snip_layerwise", "random",
               "random_rescaled", "dense")
_MODELS = ("lenet300_100", "lenet5_caffe", "conv4")
#: β of NTT per model (seed 003 Table 2).
_BETA = {"lenet300_100": 1e-4, "lenet5_caffe": 1e-5, "conv4": 1e-8}
#: The authors' notebooks: MNIST, layerwise, density 0.03, test accuracy % (two runs each);
#: from ``reference/paper_numbers.json`` → ``ntt_reference_code``.
PAPER_ANCHORS = {
    "lenet300_100": {"ntt": (96.46, 96.46), "random": (93.78, 93.15)},
    "lenet5_caffe": {"ntt": (98.18, 98.17), "random": (96.43, 97.02)},
}


@dataclass
class NTTRecipeConfig:
    """One accuracy-vs-density sweep.

    Attributes:
        dataset: ``mnist``, ``fashion_mnist`` or ``cifar10``.
        model: ``lenet300_100``, ``lenet5_caffe`` or ``conv4`` (VALID convolutions).
        densities: kept weight fractions, each in (0, 1].
        methods: subset of :data:`ALL_METHODS`.
        seeds: one run per seed (fresh init, data order, mask randomness).
        scope: NTT's mask scope, ``layerwise`` (paper main text) or ``global``.
        ntt_steps: NTT steps (0 = ``ntt_epochs`` passes over the train split).
        ntt_epochs: NTT length in epochs when ``ntt_steps`` is 0 (Table 2: 20).
        ntt_batch: NTT minibatch (64; CIFAR 32). ntt_lr: NTT Adam lr (5e-4).
        gamma2: γ² (1e-3). beta: NTT β (None = Table 2's per model: 1e-4 / 1e-5 / 1e-8).
        mask_update_freq: NTT mask update interval in steps (100).
        ntt_kernel: NTT student kernel (``effective`` = authors' code, or ``sparse``).
        snip_samples: samples scored by the SNIP variants (Logit-SNIP: no labels).
        epochs: supervised epochs (50 at the paper tier). steps_per_epoch: 0 = a full pass.
        batch_size: supervised batch (64). lr: supervised Adam lr (1e-3).
        weight_decay: L2 coefficient on the weights in the supervised loss (authors: 1e-8).
        val_fraction: share of train held out for validation (0.1).
        train_limit / test_limit: use the first N samples of each split (0 = all).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    dataset: str = "mnist"
    model: str = "lenet300_100"
    densities: tuple[float, ...] = (0.2, 0.1, 0.05, 0.03, 0.02, 0.01)
    methods: tuple[str, ...] = ALL_METHODS
    seeds: tuple[int, ...] = (0,)
    scope: str = "layerwise"
    ntt_steps: int = 0
    ntt_epochs: float = 20.0
    ntt_batch: int = 64
    ntt_lr: float = 5e-4
    gamma2: float = 1e-3
    beta: float | None = None
    mask_update_freq: int = 100
    ntt_kernel: str = "effective"
    snip_samples: int = 128
    epochs: int = 50
    steps_per_epoch: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-8
    val_fraction: float = 0.1
    train_limit: int = 0
    test_limit: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check(self.dataset in ("mnist", "fashion_mnist", "cifar10"), "dataset", self.dataset,
              "one of mnist, fashion_mnist, cifar10")
        check(self.model in _MODELS, "model", self.model, f"one of {', '.join(_MODELS)}")
        self.densities = tuple(self.densities)
        self.methods = tuple(self.methods)
        self.seeds = tuple(self.seeds)
        check(len(self.densities) > 0 and all(0 < d <= 1 for d in self.densities), "densities",
              self.densities, "numbers in (0, 1]")
        bad = [m for m in self.methods if m not in ALL_METHODS]
        check(len(self.methods) > 0 and not bad, "methods", ",".join(self.methods),
              f"a subset of {', '.join(ALL_METHODS)}")
        check(len(self.seeds) > 0, "seeds", self.seeds, "at least one seed")
        check(self.scope in ("layerwise", "global"), "scope", self.scope, "layerwise or global")
        check(self.ntt_steps >= 0, "ntt_steps", self.ntt_steps, "an int >= 0")
        check(self.ntt_epochs > 0, "ntt_epochs", self.ntt_epochs, "a number > 0")
        check(self.ntt_batch >= 2 and self.ntt_batch % 2 == 0, "ntt_batch", self.ntt_batch, "an even int >= 2")
        check(self.ntt_kernel in KERNELS, "ntt_kernel", self.ntt_kernel, f"one of {', '.join(KERNELS)}")
        check(self.beta is None or self.beta >= 0, "beta", self.beta, "a number >= 0 or none")
        check(self.snip_samples >= 1, "snip_samples", self.snip_samples, "an int >= 1")
        check(self.epochs >= 1, "epochs", self.epochs, "an int >= 1")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", self.steps_per_epoch, "an int >= 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a fraction in (0, 1)")
        check(self.train_limit >= 0 and self.test_limit >= 0, "train_limit/test_limit",
              (self.train_limit, self.test_limit), "ints >= 0")
        check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "auto, cpu or cuda")


# ----------------------------------------------------------------------------------------- pieces
def _pct_fmt(v: float) -> str:
    return f"{v:.2f}"


def _build(cfg: NTTRecipeConfig, data: ImageData) -> nn.Module:
    c, h, _ = data.in_shape
    kw = {"num_classes": data.num_classes, "in_channels": c, "image_size": h}
    if cfg.model == "conv4":
        return Conv4(**kw, padding="valid")
    return build_model(cfg.model, **kw)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch].to(device)).argmax(1) == y[i:i + batch].to(device)).sum())
    return correct / max(1, len(x))


def _make_masks(
    method: str, model: nn.Module, density: float, cfg: NTTRecipeConfig, data: ImageData, seed: int,
    device: torch.device,
) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
    """The method's masks (None = dense) on ``model`` (modified in place for ntt / random_rescaled)."""
    gen = torch.Generator().manual_seed(seed * 7919 + 11)
    train_x = data.train_x
    if method == "dense":
        return None, {}
    if method == "ntt":
        beta = _BETA[cfg.model] if cfg.beta is None else cfg.beta
        steps = cfg.ntt_steps or max(1, round(cfg.ntt_epochs * len(train_x) / cfg.ntt_batch))
        ntt = build_method("ntt", density=density, scope=cfg.scope, steps=steps, batch_size=cfg.ntt_batch,
                           lr=cfg.ntt_lr, gamma2=cfg.gamma2, beta=beta, mask_update_freq=cfg.mask_update_freq,
                           kernel=cfg.ntt_kernel, teacher_init="model", snip_samples=cfg.snip_samples)

        def sample_inputs(n: int, g: torch.Generator) -> Tensor:  # unlabelled inputs only
            return train_x[torch.randint(0, len(train_x), (n,), generator=g)].to(device)

        ctx = LoopContext(model=model, sample_inputs=sample_inputs, seed=seed)
        ntt.at_init(ctx)
        assert ntt.weight_mask is not None and ntt.masks is not None
        ntt.weight_mask.detach()  # the sweep's own WeightMask takes over
        rec = ntt.history[-1]
        return ntt.masks, {"ntt_steps": steps, "ntt_start": rec["start"], "ntt_end": rec["end"]}
    idx = torch.randperm(len(train_x), generator=gen)[: cfg.snip_samples]
    x, y = train_x[idx].to(device), data.train_y[idx].to(device)
    model.eval()
    if method in ("snip", "layerwise_snip"):
        return snip_mask(model, x, y, density, "global" if method == "snip" else "layerwise"), {}
    if method in ("logit_snip", "logit_snip_layerwise"):
        return logit_snip_mask(model, x, density, "global" if method == "logit_snip" else "layerwise"), {}
    masks = random_mask(model, density, gen)
    if method == "random_rescaled":
        rescale_weights_(model, masks, math.sqrt(1.0 / density))
    return masks, {}


def _train(
    model: nn.Module, masks: dict[str, Tensor] | None, cfg: NTTRecipeConfig, data: ImageData, seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Supervised training with the mask fixed; test accuracy at the last iteration and at the
    best-validation epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    wm = WeightMask(model, masks).attach(opt) if masks is not None else None
    weights = list(maskable_weights(model).values())
    assert data.val_x is not None and data.val_y is not None
    gen = torch.Generator().manual_seed(seed * 104729 + 5)
    n = len(data.train_x)
    steps = cfg.steps_per_epoch or math.ceil(n / cfg.batch_size)
    best_val, best_test = -1.0, 0.0
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = perm[(i * cfg.batch_size) % n:][: cfg.batch_size]
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            if cfg.weight_decay:
                loss = loss + cfg.weight_decay * sum(w.pow(2).sum() for w in weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = _accuracy(model, data.val_x, data.val_y, device)
        test = _accuracy(model, data.test_x, data.test_y, device)
        if val > best_val:
            best_val, best_test = val, test
    if wm is not None:
        wm.detach()
    return {"test_last": test, "test_best_val": best_test, "val_best": best_val,
            "density": 1.0 if masks is None else mask_density(masks)}


def _load(cfg: NTTRecipeConfig, data_dir: Path | None) -> ImageData:
    kw: dict[str, Any] = {}
    if cfg.train_limit:
        kw["limit"] = cfg.train_limit
    if cfg.test_limit:
        kw["test_limit"] = cfg.test_limit
    data = load_dataset(cfg.dataset, data_dir, **kw)
    assert isinstance(data, ImageData)
    return val_split(data, cfg.val_fraction, seed=0)


# ------------------------------------------------------------------------------------------ sweep
def run_ntt_sweep(cfg: NTTRecipeConfig, out_dir: Path, data_dir: Path | None) -> dict:
    """Run the sweep (module docstring); returns the results document (tables, plot, anchors)."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    data = _load(cfg, data_dir)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            for density in (cfg.densities if method != "dense" else (1.0,)):
                torch.manual_seed(seed)
                model = _build(cfg, data)
                glorot_truncated_init_(model, torch.Generator().manual_seed(seed))
                model.to(device)
                t = time.perf_counter()
                masks, info = _make_masks(method, model, density, cfg, data, seed, device)
                t_mask = time.perf_counter() - t
                res = _train(model, masks, cfg, data, seed, device)
                runs.append({"method": method, "density": density, "seed": seed, **res, **info,
                             "mask_s": t_mask, "wall_s": time.perf_counter() - t})
                print(f"[{method} d={density:g} seed={seed}] test last {res['test_last']:.4f} "
                      f"best-val {res['test_best_val']:.4f} ({time.perf_counter() - t:.1f}s)", flush=True)
    rows, series_last = [], {}
    for method in cfg.methods:
        xs, ys, sds = [], [], []
        for density in cfg.densities:
            sel = [r for r in runs if r["method"] == method and (method == "dense" or r["density"] == density)]
            last = mean_std(100 * r["test_last"] for r in sel)
            best = mean_std(100 * r["test_best_val"] for r in sel)
            row = {"density": density, "method": method, "test % (last iter)": fmt_mean_std(last, _pct_fmt),
                   "test % (best val)": fmt_mean_std(best, _pct_fmt), "seeds": len(sel)}
            if method == "ntt":
                row["NTT target/kernel dist (start → end)"] = ", ".join(
                    f"{r['ntt_start']['target']:.3g}/{r['ntt_start']['kernel']:.3g} → "
                    f"{r['ntt_end']['target']:.3g}/{r['ntt_end']['kernel']:.3g}" for r in sel)
            rows.append(row)
            xs.append(density)
            ys.append(last["mean"])
            sds.append(last["std"])
        series_last[method] = {"x": xs, "y": ys, "std": sds}
    plot = "accuracy_vs_density.png"
    line_plot(out_dir / plot, series_last, xlabel="density (kept weights)", ylabel="test accuracy % (last iter)",
              title=f"{cfg.model} on {cfg.dataset}", logx=True)
    anchors = []
    if cfg.dataset == "mnist" and cfg.model in PAPER_ANCHORS and cfg.scope == "layerwise":
        for method, paper in PAPER_ANCHORS[cfg.model].items():
            sel = [r for r in runs if r["method"] == method and r["density"] == 0.03]
            anchors.append({"method": method, "density": 0.03, "paper notebooks (authors' code) %":
                            " / ".join(f"{v:.2f}" for v in paper),
                            "ours % (last iter)": fmt_mean_std([100 * r["test_last"] for r in sel], _pct_fmt)
                            if sel else "— (density 0.03 / method not run)"})
    notes = [f"data: {data.note}", f"device: {device}",
             ("'random' here is the paper's uniform random mask (the authors' code shuffles rows of a "
             "magnitude mask instead); 'dense' is trained once per seed and repeated at every density."),
             (f"NTT: {cfg.scope}, kernel={cfg.ntt_kernel}, γ²={cfg.gamma2}, "
             f"β={_BETA[cfg.model] if cfg.beta is None else cfg.beta}, lr={cfg.ntt_lr}, batch={cfg.ntt_batch}")]
    if cfg.dataset == "cifar10":
        notes.append("CIFAR-10: the offline 10k-train subset (JPEG q75), not the full 50k; not comparable "
                     "to the paper's CIFAR numbers.")
    tables: dict[str, Any] = {"Test accuracy vs density": rows}
    if anchors:
        tables["Sanity anchors (MNIST, layerwise, density 0.03)"] = anchors
    return {"summary": {"model": cfg.model, "dataset": cfg.dataset, "runs": len(runs),
                        "wall_s": round(time.perf_counter() - t0, 1)},
            "tables": tables, "plots": [plot], "notes": notes, "runs": runs}


# ------------------------------------------------------------------------------------------ tiers
def _tiers(base: NTTRecipeConfig, *, paper_epochs: int) -> dict[str, NTTRecipeConfig]:
    return {
        # seconds: tiny data, one density, 3 NTT steps, one short epoch
        "ci": replace(base, densities=(0.1,), train_limit=400, test_limit=200, ntt_steps=2, ntt_batch=8,
                      snip_samples=32, epochs=1, steps_per_epoch=3, mask_update_freq=1),
        # minutes on 2 CPU cores: two densities, 300 NTT steps, 3 supervised epochs on all data
        "quick": replace(base, densities=(0.1, 0.03), ntt_steps=300, epochs=3),
        # hours: all densities, 3 seeds, 2 NTT epochs, 20 supervised epochs
        "cpu": replace(base, seeds=(0, 1, 2), ntt_epochs=2.0, epochs=20),
        # seed 003: 20 NTT epochs, 50 (CIFAR 600) supervised epochs, 5 runs
        "paper": replace(base, seeds=(0, 1, 2, 3, 4), epochs=paper_epochs),
    }


TIERS_MNIST = _tiers(NTTRecipeConfig(dataset="mnist"), paper_epochs=50)
TIERS_FASHION = _tiers(NTTRecipeConfig(dataset="fashion_mnist"), paper_epochs=50)
TIERS_CIFAR = _tiers(NTTRecipeConfig(dataset="cifar10", model="conv4", ntt_batch=32), paper_epochs=600)
TIERS_CIFAR["ci"] = replace(TIERS_CIFAR["ci"], train_limit=100, test_limit=100, ntt_batch=2, ntt_steps=1,
                            snip_samples=8, steps_per_epoch=1, methods=("ntt", "snip", "random", "dense"))


@register_recipe("ntt-mnist", tiers=TIERS_MNIST,
                 description="seed 003: NTT vs SNIP / Logit-SNIP / random masks, accuracy vs density on MNIST "
                             "(model=lenet300_100|lenet5_caffe)")
def ntt_mnist(cfg: NTTRecipeConfig, out_dir: Path, data_dir: Path | None) -> dict:
    return run_ntt_sweep(cfg, out_dir, data_dir)


@register_recipe("ntt-fashion", tiers=TIERS_FASHION,
                 description="seed 003: NTT vs at-init pruning baselines on Fashion-MNIST, accuracy vs density")
def ntt_fashion(cfg: NTTRecipeConfig, out_dir: Path, data_dir: Path | None) -> dict:
    return run_ntt_sweep(cfg, out_dir, data_dir)


@register_recipe("ntt-cifar", tiers=TIERS_CIFAR,
                 description="seed 003: NTT vs at-init pruning baselines, Conv-4 on the CIFAR-10 10k subset")
def ntt_cifar(cfg: NTTRecipeConfig, out_dir: Path, data_dir: Path | None) -> dict:
    return run_ntt_sweep(cfg, out_dir, data_dir)
