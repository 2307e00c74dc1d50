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

The report opens with the verdict: per density, the sparse method with the best mean
last-iteration test accuracy, its margin over the runner-up and whether that margin exceeds the
seed std (:func:`winners`). With ``toy_figure`` (MNIST, on from the quick tier up) it adds seed
003's output-evolution toy (:func:`run_output_toy`, figure ``toy_output_evolution.png``).
"""

from __future__ import annotations

import copy
import json
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
from ntkit.recipes import register_recipe
from ntkit.recipes.report import fmt_mean_std, line_plot, mean_std

__all__ = [
    "PAPER_ANCHORS", "TIERS_CIFAR", "TIERS_FASHION", "TIERS_MNIST", "NTTRecipeConfig", "plot_output_toy",
    "run_ntt_sweep", "run_output_toy", "save_toy_trajectories", "winners",
]

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
        toy_figure: also run the output-evolution toy (seed 003 §4.1; MNIST only): dense teacher,
            NTT student and a uniform-random-mask student trained side by side (:func:`run_output_toy`).
        toy_images: toy images from the train split, half 0s and half 1s (paper: 500), even.
        toy_density: the toy students' density (the paper does not state it; ours: 0.05).
        toy_ntt_steps: full-batch NTT steps of the toy (paper: 5000; Adam, lr / γ² of Table 2's
            visualisation rows, β = 0).
        toy_sgd_steps: full-batch gradient-descent steps of the supervised toy phase.
        toy_sgd_lr: its learning rate (DESIGN §5 / seed 003 B.3: SGD 0.01).
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
    toy_figure: bool = False
    toy_images: int = 500
    toy_density: float = 0.05
    toy_ntt_steps: int = 5000
    toy_sgd_steps: int = 5000
    toy_sgd_lr: float = 0.01

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
        check(isinstance(self.toy_figure, bool), "toy_figure", self.toy_figure, "true or false")
        check(self.toy_images >= 4 and self.toy_images % 2 == 0, "toy_images", self.toy_images, "an even int >= 4")
        check(0 < self.toy_density <= 1, "toy_density", self.toy_density, "a number in (0, 1]")
        check(self.toy_ntt_steps >= 1, "toy_ntt_steps", self.toy_ntt_steps, "an int >= 1")
        check(self.toy_sgd_steps >= 1, "toy_sgd_steps", self.toy_sgd_steps, "an int >= 1")
        check(self.toy_sgd_lr > 0, "toy_sgd_lr", self.toy_sgd_lr, "a number > 0")


# ----------------------------------------------------------------------------------------- pieces
def _pct_fmt(v: float) -> str:
    return f"{v:.2f}"


def _build(cfg: NTTRecipeConfig, data: ImageData) -> nn.Module:
    c, h, _ = data.in_shape
    kw = {"num_classes": data.num_classes, "in_channels": c, "image_size": h}
    if cfg.model == "conv4":
        kw["padding"] = "valid"
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


# -------------------------------------------------------------------------------------- the toy
#: Table 2's visualisation rows: NTT (lr, γ²) per model, full batch, β = 0.
_TOY_NTT = {"lenet300_100": (1e-3, 1e-5), "lenet5_caffe": (5e-4, 1e-6)}
_TOY_NETS = ("teacher (dense)", "NTT student", "random-mask student")


def _toy_images(data: ImageData, n: int) -> tuple[Tensor, Tensor]:
    """The first n/2 train images of digit 0 and of digit 1: inputs [n, C, H, W] as raw pixels in
    [0, 1] (not standardised: with standardised MNIST ‖x‖² ≈ 784 and the dense teacher's NTK puts
    gradient descent at lr 0.01 past its edge of stability — the loss first blows up), targets
    [n, 2] (one-hot, regression)."""
    idx = []
    for digit in (0, 1):
        sel = (data.train_y == digit).nonzero().flatten()[: n // 2]
        check(len(sel) == n // 2, "toy_images", n, f"at most {2 * len(sel)} (train has {len(sel)} images of {digit})")
        idx.append(sel)
    order = torch.cat(idx)
    y = F.one_hot(data.train_y[order], 2).to(data.train_x.dtype)
    mean = torch.as_tensor(data.mean, dtype=data.train_x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(data.std, dtype=data.train_x.dtype).view(1, -1, 1, 1)
    return (data.train_x[order] * std + mean) / 255.0, y


def run_output_toy(cfg: NTTRecipeConfig, data: ImageData, seed: int, device: torch.device) -> dict[str, Any]:
    """Seed 003 §4.1: the output evolution of a dense teacher and its sparse students under
    full-batch gradient descent on ``cfg.toy_images`` MNIST 0/1 images with 2 linear outputs.

    The teacher is ``cfg.model`` with 2 outputs at the authors' init; the NTT student comes from
    it (layerwise, ``toy_density``, ``toy_ntt_steps`` full-batch Adam steps with Table 2's
    visualisation lr / γ², β = 0; NTT sees the images, never the targets); the random student is
    the teacher with a uniform random mask of the same density. Each is then trained with plain
    gradient descent (lr ``toy_sgd_lr``) on the mean over samples of ½‖f(x) − y‖² (y one-hot),
    masks fixed.

    Returns ``{"steps": [T], "outputs": {net: [T, P, 2]}, "loss": {net: [T]}, "probe_digits": [P],
    "rel_dist_to_teacher": {net: float}, "ntt": {"start", "end"}}`` (lists, JSON-able); outputs are
    on P = 10 probe images (5 of each digit) at the T recorded steps; ``rel_dist_to_teacher`` is
    RMS over steps, probes and outputs of (f_student − f_teacher) / RMS of f_teacher's
    displacement from its own start (0 = the student's outputs move exactly as the teacher's).
    """
    check(cfg.model in _TOY_NTT, "model", cfg.model, f"one of {', '.join(_TOY_NTT)} for the toy")
    x, y = _toy_images(data, cfg.toy_images)
    x, y = x.to(device), y.to(device)
    c, h, _ = data.in_shape
    torch.manual_seed(seed)
    teacher = build_model(cfg.model, num_classes=2, in_channels=c, image_size=h)
    glorot_truncated_init_(teacher, torch.Generator().manual_seed(seed * 31 + 7))
    teacher.to(device)
    student = copy.deepcopy(teacher)
    lr, gamma2 = _TOY_NTT[cfg.model]
    ntt = build_method("ntt", density=cfg.toy_density, scope="layerwise", steps=cfg.toy_ntt_steps,
                       batch_size=len(x), lr=lr, gamma2=gamma2, beta=0.0, teacher_init="model",
                       mask_update_freq=100 if cfg.toy_ntt_steps > 200 else 0)
    ctx = LoopContext(model=student, sample_inputs=lambda n, g: x[:n], seed=seed)  # full batch, images only
    ntt.at_init(ctx)
    assert ntt.weight_mask is not None and ntt.masks is not None
    ntt.weight_mask.detach()
    rand = copy.deepcopy(teacher)
    rmask = random_mask(rand, cfg.toy_density, torch.Generator().manual_seed(seed * 13 + 1))
    with torch.no_grad():
        for n, p in rand.named_parameters():
            if n in rmask:
                p.mul_(rmask[n])
    nets: dict[str, tuple[nn.Module, dict[str, Tensor] | None]] = {
        _TOY_NETS[0]: (teacher, None), _TOY_NETS[1]: (student, ntt.masks), _TOY_NETS[2]: (rand, rmask)}
    probe = torch.cat([torch.arange(5), len(x) // 2 + torch.arange(5)])
    every = max(1, cfg.toy_sgd_steps // 50)
    steps = [s for s in range(cfg.toy_sgd_steps + 1) if s % every == 0 or s == cfg.toy_sgd_steps]
    outputs: dict[str, list] = {}
    losses: dict[str, list] = {}
    for name, (net, masks) in nets.items():
        net.eval()  # no dropout / batch statistics in these models; keeps outputs per sample
        opt = torch.optim.SGD(net.parameters(), lr=cfg.toy_sgd_lr)
        wm = WeightMask(net, masks).attach(opt) if masks is not None else None
        outs, ls = [], []
        for s in range(cfg.toy_sgd_steps + 1):
            out = net(x)
            loss = 0.5 * (out - y).pow(2).sum(1).mean()
            if s in steps:
                outs.append(out[probe].detach().cpu())
                ls.append(float(loss.detach()))
            if s == cfg.toy_sgd_steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if wm is not None:
            wm.detach()
        outputs[name] = torch.stack(outs)  # [T, P, 2]
        losses[name] = ls
    ref = outputs[_TOY_NETS[0]]
    scale = float((ref - ref[:1]).pow(2).mean().sqrt()) or 1.0
    dist = {n: float((o - ref).pow(2).mean().sqrt()) / scale for n, o in outputs.items() if n != _TOY_NETS[0]}
    rec = ntt.history[-1]
    return {"steps": steps, "outputs": {n: o.tolist() for n, o in outputs.items()}, "loss": losses,
            "probe_digits": [0] * 5 + [1] * 5, "rel_dist_to_teacher": dist,
            "ntt": {"start": rec["start"], "end": rec["end"], "steps": rec["steps"]},
            "density": cfg.toy_density, "images": len(x)}


def save_toy_trajectories(toy: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the toy's trajectories (``steps``, ``outputs`` rounded to 5 decimals, ``loss``,
    ``probe_digits``) as compact JSON to ``path``; return the rest of ``toy`` (for results.json)
    with ``"trajectories": path.name``."""
    traj = {k: toy[k] for k in ("steps", "outputs", "loss", "probe_digits")}
    traj["outputs"] = {n: torch.tensor(o).round(decimals=5).tolist() for n, o in traj["outputs"].items()}
    path.write_text(json.dumps(traj, separators=(",", ":")) + "\n")
    return {**{k: v for k, v in toy.items() if k not in traj}, "trajectories": path.name}


def plot_output_toy(toy: dict[str, Any], path: Path, title: str = "") -> Path:
    """Side-by-side panels, one per network: each probe image's 2-D output (f₀, f₁) over the
    supervised steps (circle = start, cross = end, colour = digit; stars: the one-hot targets),
    and a last panel with the full-batch loss of every network."""
    from ntkit.recipes.report import _figure

    names = list(toy["outputs"])
    fig = _figure((4.0 * (len(names) + 1), 4.0))
    axes = fig.subplots(1, len(names) + 1)
    colours = {0: "tab:blue", 1: "tab:orange"}
    allpts = torch.tensor([toy["outputs"][n] for n in names])  # [nets, T, P, 2]
    lo = float(min(allpts.min(), 0.0)) - 0.1
    hi = float(max(allpts.max(), 1.0)) + 0.1
    for ax, name in zip(axes, names):
        o = torch.tensor(toy["outputs"][name])
        for p, digit in enumerate(toy["probe_digits"]):
            ax.plot(o[:, p, 0], o[:, p, 1], color=colours[digit], linewidth=1, alpha=0.8)
            ax.plot(o[0, p, 0], o[0, p, 1], "o", color=colours[digit], markersize=4)
            ax.plot(o[-1, p, 0], o[-1, p, 1], "x", color=colours[digit], markersize=6)
        ax.plot([1, 0], [0, 1], "*", color="black", markersize=10)
        sub = name if name not in toy["rel_dist_to_teacher"] else (
            f"{name}\nrel. distance to teacher {toy['rel_dist_to_teacher'][name]:.2f}")
        ax.set_title(sub, fontsize=10)
        ax.set_xlabel("output 0 (target 1 for digit 0)")
        ax.set_ylabel("output 1 (target 1 for digit 1)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.grid(True, alpha=0.3)
    axes[0].plot([], [], color=colours[0], label="digit 0 images")
    axes[0].plot([], [], color=colours[1], label="digit 1 images")
    axes[0].plot([], [], "*", color="black", label="targets")
    axes[0].legend(fontsize=8, loc="best")
    ax = axes[-1]
    for name in names:
        ax.plot(toy["steps"], toy["loss"][name], label=name)
    ax.set_xlabel("gradient-descent step (full batch)")
    ax.set_ylabel("½‖f − y‖² (mean over images)")
    ax.set_yscale("log")
    ax.set_title("training loss", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------- verdicts
def winners(runs: list[dict[str, Any]], densities: tuple[float, ...], key: str = "test_last") -> list[dict[str, Any]]:
    """Per density, the sparse method with the best mean ``key`` over seeds (``dense`` is the
    reference, not a contender), the runner-up, the margin in percentage points and whether it
    exceeds the larger of the two methods' seed std (None with a single seed).

    Returns rows ``{"density", "winner", "winner %", "runner-up", "runner-up %", "margin (pp)",
    "margin > seed std", "sentence"}`` (accuracies in %, mean over seeds)."""
    rows = []
    for d in densities:
        stats = []
        for m in dict.fromkeys(r["method"] for r in runs if r["method"] != "dense"):
            vals = [100 * r[key] for r in runs if r["method"] == m and r["density"] == d]
            if vals:
                stats.append((m, mean_std(vals)))
        if not stats:
            continue
        stats.sort(key=lambda t: -t[1]["mean"])
        (w, ws), rest = stats[0], stats[1:]
        row: dict[str, Any] = {"density": d, "winner": w, "winner %": round(ws["mean"], 2)}
        if not rest:
            row.update({"runner-up": "—", "runner-up %": None, "margin (pp)": None, "margin > seed std": None,
                        "sentence": f"density {d:g}: {w} ({ws['mean']:.2f}%) is the only sparse method run."})
            rows.append(row)
            continue
        r, rs = rest[0]
        margin = ws["mean"] - rs["mean"]
        n_seeds = min(ws["n"], rs["n"])
        std = max(ws["std"] or 0.0, rs["std"] or 0.0) if n_seeds > 1 else None
        beyond = None if std is None else bool(margin > std)
        if margin == 0:
            verdict = f"density {d:g}: tie between {w} and {r} at {ws['mean']:.2f}%"
        else:
            verdict = (f"density {d:g}: **{w} won** with {ws['mean']:.2f}%, {margin:.2f} pp ahead of the "
                       f"runner-up {r} ({rs['mean']:.2f}%)")
        if std is None:
            verdict += "; one seed, so no seed std to judge the margin against."
        else:
            verdict += (f"; the margin {'exceeds' if beyond else 'does not exceed'} the seed std "
                        f"({std:.2f} pp, {n_seeds} seeds).")
        if w != "ntt":
            nt = next((s for m, s in stats if m == "ntt"), None)
            if nt is not None:
                verdict += f" NTT: {nt['mean']:.2f}% (rank {[m for m, _ in stats].index('ntt') + 1} of {len(stats)})."
        row.update({"runner-up": r, "runner-up %": round(rs["mean"], 2), "margin (pp)": round(margin, 2),
                    "margin > seed std": "n/a (1 seed)" if beyond is None else ("yes" if beyond else "no"),
                    "sentence": verdict})
        rows.append(row)
    return rows


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
    won = winners(runs, cfg.densities)
    dense = [100 * r["test_last"] for r in runs if r["method"] == "dense"]
    verdicts = [w.pop("sentence") for w in won]
    if dense:
        verdicts.append(f"dense reference (not a contender): {fmt_mean_std(dense, _pct_fmt)}%.")
    notes = [*verdicts, *notes, f"torch threads: {torch.get_num_threads()}"]
    tables: dict[str, Any] = {"Winner per density (test % at the last iteration, mean over seeds)": won,
                              "Test accuracy vs density": rows}
    if anchors:
        tables["Sanity anchors (MNIST, layerwise, density 0.03)"] = anchors
    summary: dict[str, Any] = {"model": cfg.model, "dataset": cfg.dataset, "runs": len(runs)}
    for w in won:
        margin = "" if w["margin (pp)"] is None else f" (+{w['margin (pp)']:.2f} pp over {w['runner-up']})"
        summary[f"winner at density {w['density']:g}"] = f"{w['winner']} {w['winner %']:.2f}%{margin}"
    plots = [plot]
    doc: dict[str, Any] = {"tables": tables, "plots": plots, "notes": notes, "runs": runs}
    if cfg.toy_figure:
        if cfg.dataset != "mnist" or cfg.model not in _TOY_NTT:
            notes.append(f"toy figure skipped: it is defined for MNIST with {' / '.join(_TOY_NTT)} "
                         f"(here {cfg.dataset}, {cfg.model}).")
        else:
            t = time.perf_counter()
            toy = run_output_toy(cfg, data, cfg.seeds[0], device)
            plot_output_toy(toy, out_dir / "toy_output_evolution.png",
                            title=f"{cfg.model}, {toy['images']} MNIST 0/1 images, 2 linear outputs, "
                                  f"density {cfg.toy_density:g}, GD lr {cfg.toy_sgd_lr:g}")
            plots.append("toy_output_evolution.png")
            tables["Toy: output evolution vs the dense teacher (seed 003 §4.1)"] = [
                {"network": n, "relative distance to the teacher's outputs": round(v, 4),
                 "final ½‖f − y‖²": round(toy["loss"][n][-1], 5)} for n, v in toy["rel_dist_to_teacher"].items()]
            notes.append(
                f"toy: {toy['images']} MNIST 0/1 images, NTT {toy['ntt']['steps']} full-batch steps "
                f"(kernel distance {toy['ntt']['start']['kernel']:.3g} → {toy['ntt']['end']['kernel']:.3g}), then "
                f"{cfg.toy_sgd_steps} gradient-descent steps (lr {cfg.toy_sgd_lr:g}); relative distance = RMS of "
                f"(f_student − f_teacher) over steps, 10 probe images and both outputs, over the RMS of the "
                f"teacher's own displacement ({time.perf_counter() - t:.0f} s).")
            doc["toy"] = save_toy_trajectories(toy, out_dir / "toy_output_evolution.json")
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return {"summary": summary, **doc}


# ------------------------------------------------------------------------------------------ tiers
def _tiers(base: NTTRecipeConfig, *, paper_epochs: int) -> dict[str, NTTRecipeConfig]:
    toy = base.dataset == "mnist"  # the toy figure is an MNIST 0/1 experiment
    return {
        # seconds: tiny data, one density, 3 NTT steps, one short epoch
        "ci": replace(base, densities=(0.1,), train_limit=400, test_limit=200, ntt_steps=2, ntt_batch=8,
                      snip_samples=32, epochs=1, steps_per_epoch=3, mask_update_freq=1),
        # ≤ 20 min on 2 CPU cores shared with other jobs (~6 CPU-minutes): three densities, 1 NTT
        # epoch, 3 supervised epochs on all data, one seed; the toy with 200 NTT and 500 GD steps
        "quick": replace(base, densities=(0.1, 0.03, 0.01), ntt_epochs=1.0, epochs=3, toy_figure=toy,
                         toy_ntt_steps=200, toy_sgd_steps=500),
        # hours: all densities, 3 seeds, 2 NTT epochs, 20 supervised epochs
        "cpu": replace(base, seeds=(0, 1, 2), ntt_epochs=2.0, epochs=20, toy_figure=toy, toy_ntt_steps=2000),
        # seed 003: 20 NTT epochs, 50 (CIFAR 600) supervised epochs, 5 runs
        "paper": replace(base, seeds=(0, 1, 2, 3, 4), epochs=paper_epochs, toy_figure=toy),
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
