"""NTT — Neural Tangent Transfer (Liu & Zenke 2020; seed 003): a trainable sparse network at init.

Label-free: everything happens in :meth:`NTT.at_init` from unlabelled inputs
(``ctx.sample_inputs``). The dense network at its initialisation is the *teacher* g (never
trained). The *student* has the same architecture, raw parameters θ̃ (a copy of the teacher's)
and a 0/1 mask m over its weight tensors; it computes with m ⊙ θ̃ (biases never masked). Each
step draws an unlabelled minibatch X (``batch_size`` inputs), splits it into halves X₁, X₂ and
minimises (:func:`ntt_loss`)

    L(θ̃) = mean_{i,a} (g_a(x_i) − f_a(x_i))²                       over the whole batch
         + γ² · mean_{(i,a),(j,b)} (Θ_g − Θ_f)[(i,a),(j,b)]²       the FULL cross-NTK on (X₁, X₂)
         + (β / density) · Σ_weights ‖m ⊙ θ̃‖²

with Adam on θ̃; gradients reach θ̃ through the mask (masked entries get zero, not absent,
gradients, so Adam momentum still moves them for a while) and, second order, through the kernel
(:func:`ntkit.ntk.empirical_ntk` with ``create_graph=True``, the layer-wise STRUCTURED path:
input Gram ⊙ back-propagated-signal Gram — per-parameter Jacobians are never formed). Every
``mask_update_freq`` steps the mask is recomputed by magnitude of the raw θ̃ (pruned weights may
come back), except during the last interval, exactly as the authors' code does
(``step % freq == 0 and step < total − freq``). At the end the model holds m ⊙ θ̃ and the mask
stays fixed for training (gradient hooks + re-masking after each step, see :meth:`NTT.after_step`).

The student kernel (``kernel``):

* ``"effective"`` (default) — the authors' code: the NTK of the dense parameterisation evaluated
  at w = m ⊙ θ̃ (the pruned weights' Jacobian columns included: ∂f/∂w is not zero where w is),
  differentiated back to θ̃ through m ⊙ θ̃. Reproduces the published procedure, and is cheaper:
  the layer Grams stay unmasked (about 7× faster per step than ``"sparse"`` on LeNet-300-100).
* ``"sparse"`` — the NTK w.r.t. the raw θ̃ of x ↦ f(x; m ⊙ θ̃): Σ m² (∂f/∂w)(∂f/∂w)ᵀ,
  i.e. the tangent kernel of the sparse network over its surviving weights — the kernel that
  governs its supervised training with the mask fixed (what the paper's text motivates); costs
  N₁N₂·in·out per masked Linear layer.

Teacher initialisation (``teacher_init="glorot_truncated"``, :func:`glorot_truncated_init_`):
the authors' JAX ``glorot_normal`` — a truncated normal (±2σ′, σ′ = σ/0.8796…) with variance
2/(fan_in + fan_out) — and biases N(0, 0.01²) for every layer (``stax.Dense``/``Conv`` with
``b_init=normal()``), a fresh draw per run (seeded from ``ctx.seed``). The zoo's own init
(untruncated Glorot, conv biases N(0, 10⁻¹²)) is kept with ``teacher_init="model"``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ntkit.errors import ConfigError, check
from ntkit.methods._common import overhead, unwrap
from ntkit.methods.base import LoopContext, TrainingMethod, make_config, register_method
from ntkit.methods.masks import (
    SCOPES,
    WeightMask,
    logit_snip_mask,
    magnitude_mask,
    mask_density,
    maskable_weights,
)
from ntkit.ntk.empirical import empirical_ntk

__all__ = ["KERNELS", "NTT", "NTTConfig", "glorot_truncated_init_", "ntt_loss", "ntt_targets"]

#: Student kernels (module docstring).
KERNELS = ("effective", "sparse")
_INIT_MASKS = ("auto", "magnitude", "logit_snip")
_TEACHER_INITS = ("glorot_truncated", "model")

#: std of a standard normal truncated to ±2 (JAX's correction factor for truncated_normal).
_TRUNC_STD = 0.87962566103423978


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class NTTConfig:
    """Settings of Neural Tangent Transfer (defaults: seed 003 Table 2, LeNet-300-100 on MNIST).

    Attributes:
        density: kept fraction of weights, in (0, 1].
        scope: ``"layerwise"`` (density per weight tensor; the paper's main setting) or
            ``"global"`` (pooled over all weight tensors).
        init_mask: the initial mask — ``"magnitude"`` of the teacher's weights, ``"logit_snip"``
            on ``snip_samples`` unlabelled inputs, or ``"auto"`` (magnitude for layerwise,
            Logit-SNIP for global, as in seed 003 §C).
        epochs: NTT length in passes over the training set (Table 2: 20), used when ``steps`` is 0:
            steps = round(epochs · ctx.steps_per_epoch · ctx.batch_size / batch_size).
        steps: NTT optimizer steps (> 0 overrides ``epochs``).
        batch_size: unlabelled inputs per step, even and ≥ 2 (split into halves for the kernel);
            Table 2: 64 (CIFAR/SVHN 32).
        lr: Adam learning rate (5e-4).
        gamma2: γ², weight of the kernel distance (1e-3).
        beta: β of the (β / density) · ‖m ⊙ θ̃‖² penalty (1e-4 MLP, 1e-5 LeNet-5, 1e-8 Conv-4).
        mask_update_freq: recompute the mask by magnitude every this many steps (100; 0 = never).
        kernel: student kernel, one of :data:`KERNELS` (module docstring).
        teacher_init: ``"glorot_truncated"`` re-initialises the model as the authors' code does
            before copying it as teacher; ``"model"`` keeps the model's current weights.
        snip_samples: inputs for the Logit-SNIP initial mask (authors: 128).
        log_every: log the loss parts every this many steps (0 = only first and last).
    """

    density: float = 0.05
    scope: str = "layerwise"
    init_mask: str = "auto"
    epochs: float = 20.0
    steps: int = 0
    batch_size: int = 64
    lr: float = 5e-4
    gamma2: float = 1e-3
    beta: float = 1e-4
    mask_update_freq: int = 100
    kernel: str = "effective"
    teacher_init: str = "glorot_truncated"
    snip_samples: int = 128
    log_every: int = 100

    def __post_init__(self) -> None:
        check(_is_num(self.density) and 0.0 < self.density <= 1.0, "density", self.density, "a number in (0, 1]")
        check(self.scope in SCOPES, "scope", self.scope, f"one of {', '.join(SCOPES)}")
        check(self.init_mask in _INIT_MASKS, "init_mask", self.init_mask, f"one of {', '.join(_INIT_MASKS)}")
        check(_is_num(self.epochs) and self.epochs > 0, "epochs", self.epochs, "a number > 0")
        check(_is_int(self.steps) and self.steps >= 0, "steps", self.steps, "an integer >= 0")
        ok = _is_int(self.batch_size) and self.batch_size >= 2 and self.batch_size % 2 == 0
        check(ok, "batch_size", self.batch_size, "an even integer >= 2")
        check(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        check(_is_num(self.gamma2) and self.gamma2 >= 0, "gamma2", self.gamma2, "a number >= 0")
        check(_is_num(self.beta) and self.beta >= 0, "beta", self.beta, "a number >= 0")
        ok = _is_int(self.mask_update_freq) and self.mask_update_freq >= 0
        check(ok, "mask_update_freq", self.mask_update_freq, "an integer >= 0")
        check(self.kernel in KERNELS, "kernel", self.kernel, f"one of {', '.join(KERNELS)}")
        check(self.teacher_init in _TEACHER_INITS, "teacher_init", self.teacher_init,
              f"one of {', '.join(_TEACHER_INITS)}")
        check(_is_int(self.snip_samples) and self.snip_samples >= 1, "snip_samples", self.snip_samples,
              "an integer >= 1")
        check(_is_int(self.log_every) and self.log_every >= 0, "log_every", self.log_every, "an integer >= 0")


@torch.no_grad()
def glorot_truncated_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """The NTT authors' init, in place: every Linear / Conv weight ~ truncated normal on ±2σ′ with
    variance 2/(fan_in + fan_out) (JAX ``glorot_normal``), every bias ~ N(0, 0.01²). Returns model.

    ``generator`` (CPU) makes it reproducible; values are drawn on the CPU in float32 order of
    ``model.modules()`` and copied to the parameter's device/dtype.
    """
    for mod in model.modules():
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        w = mod.weight
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
        std = math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNC_STD
        t = torch.empty(w.shape, dtype=torch.float32)
        nn.init.trunc_normal_(t, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)
        w.copy_(t)
        if mod.bias is not None:
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=generator) * 0.01)
    return model


def _student_kernel(
    model: nn.Module, x1: Tensor, x2: Tensor, raw: Mapping[str, Tensor], masks: Mapping[str, Tensor],
    kernel: str, implementation: str,
) -> Tensor:
    if kernel == "sparse":
        return empirical_ntk(model, x1, x2, params=raw, masks=masks, create_graph=True,
                             implementation=implementation)
    eff = {n: (t * masks[n] if n in masks else t) for n, t in raw.items()}
    return empirical_ntk(model, x1, x2, params=eff, create_graph=True, implementation=implementation)


@torch.no_grad()
def ntt_targets(teacher: nn.Module, x: Tensor, implementation: str = "structured") -> tuple[Tensor, Tensor]:
    """The teacher's outputs g(x) [B, k] and cross-NTK Θ_g(X₁, X₂) [B/2·k, (B − B/2)·k] (detached),
    X₁ = x[:B//2], X₂ = x[B//2:]."""
    h = x.shape[0] // 2
    out = teacher(x).reshape(x.shape[0], -1)
    return out, empirical_ntk(teacher, x[:h], x[h:], implementation=implementation)


def ntt_loss(
    model: nn.Module,
    x: Tensor,
    teacher_out: Tensor,
    teacher_ntk: Tensor,
    raw: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    *,
    gamma2: float,
    beta: float,
    density: float,
    kernel: str = "effective",
    implementation: str = "structured",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The NTT objective (module docstring) of the student with raw parameters ``raw``.

    Args:
        model: the architecture (its own parameter values are not used; every parameter must be
            in ``raw``); eval mode (no active dropout / batch statistics).
        x: unlabelled inputs [B, ...], B ≥ 2; halves X₁ = x[:B//2], X₂ = x[B//2:].
        teacher_out: g(x) [B, k]; teacher_ntk: Θ_g(X₁, X₂) [B//2·k, (B − B//2)·k] (see :func:`ntt_targets`).
        raw: ``{param_name: Tensor}`` the student's raw θ̃ (all parameters; gradients flow to these).
        masks: ``{weight_name: 0/1 Tensor}``.
        gamma2, beta, density: γ², β and the density of the penalty (β / density) · Σ ‖m ⊙ θ̃‖².
        kernel: ``"effective"`` or ``"sparse"`` (module docstring).
        implementation: passed to :func:`ntkit.ntk.empirical_ntk` (``"structured"``: layer-wise).

    Returns:
        ``(loss, parts)``: scalar loss in the parameters' dtype, differentiable w.r.t. ``raw``;
        parts (detached scalars) ``target`` (mean squared output difference), ``kernel`` (mean
        squared kernel difference, before γ²) and ``norm`` (Σ ‖m ⊙ θ̃‖² over weights).
    """
    check(x.shape[0] >= 2, "x.shape[0]", x.shape[0], "an integer >= 2 (the batch is split in halves)")
    h = x.shape[0] // 2
    eff = {n: (t * masks[n] if n in masks else t) for n, t in raw.items()}
    out = functional_call(model, {**dict(model.named_buffers()), **eff}, (x,)).reshape(x.shape[0], -1)
    target = (out - teacher_out).pow(2).mean()
    if gamma2 > 0:
        theta = _student_kernel(model, x[:h], x[h:], raw, masks, kernel, implementation)
        kdist = (theta - teacher_ntk).pow(2).mean()
    else:
        kdist = target.new_zeros(())
    norm = sum((eff[n].pow(2).sum() for n in masks), target.new_zeros(()))
    loss = target + gamma2 * kdist + (beta / density) * norm
    return loss, {"target": target.detach(), "kernel": kdist.detach(), "norm": norm.detach()}


@register_method("ntt", config=NTTConfig)
class NTT(TrainingMethod):
    """Neural Tangent Transfer at initialisation (label-free); the mask then stays fixed.

    Args:
        config: an :class:`NTTConfig` or a mapping of its fields (or the fields as keywords).

    After :meth:`at_init`: ``masks`` (``{weight_name: 0/1 float tensor}``), ``weight_mask`` (the
    attached :class:`ntkit.methods.masks.WeightMask`), ``history`` with one ``{"event": "ntt",
    "steps", "density", "mask_updates", "start": parts, "end": parts}`` record (parts:
    target / kernel / norm / loss on the first and last batch). ``ctx.log`` gets
    ``{"event": "ntt_step", "step", "loss", "target", "kernel", "norm"}`` every ``log_every`` steps.
    """

    name = "ntt"
    needs_labels = False

    def __init__(self, config: NTTConfig | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = make_config(NTTConfig, config, kw, self.name)
        self.masks: dict[str, Tensor] | None = None
        self.weight_mask: WeightMask | None = None
        self.done = False

    def bind(self, model: nn.Module, partition: Any, controller: Any) -> None:
        super().bind(model, partition, controller)
        self._model = unwrap(model)
        if self.masks is not None:
            self._attach(self._model)

    def _attach(self, model: nn.Module) -> None:
        if self.weight_mask is not None:
            self.weight_mask.detach()
        assert self.masks is not None
        self.weight_mask = WeightMask(model, self.masks).attach()

    def _num_steps(self, ctx: LoopContext) -> int:
        c = self.config
        if c.steps > 0:
            return c.steps
        return max(1, round(c.epochs * ctx.steps_per_epoch * ctx.batch_size / c.batch_size))

    def at_init(self, ctx: LoopContext) -> None:
        if self.done:
            return
        if ctx.sample_inputs is None:
            raise ConfigError("ntt: the loop context has no sample_inputs (NTT needs unlabelled inputs)")
        with overhead(ctx):
            self.transfer(ctx)

    def transfer(self, ctx: LoopContext) -> dict[str, Tensor]:
        """Run NTT on ``ctx.model`` (see the module docstring); returns the final masks."""
        c = self.config
        model = unwrap(ctx.model)
        gen = torch.Generator().manual_seed(int(ctx.seed) * 1000 + 303)
        if c.teacher_init == "glorot_truncated":
            glorot_truncated_init_(model, gen)
        was_training = model.training
        model.eval()  # dropout only in the supervised phase (authors' code)
        teacher = copy.deepcopy(model).requires_grad_(False)
        dev = next(model.parameters()).device

        def inputs(n: int) -> Tensor:
            x = ctx.sample_inputs(n, gen)  # type: ignore[misc]
            check(isinstance(x, Tensor), "sample_inputs", type(x).__name__, "a Tensor of inputs (no labels)")
            return x.to(dev)

        raw = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        weights = list(maskable_weights(model))
        init = c.init_mask if c.init_mask != "auto" else ("magnitude" if c.scope == "layerwise" else "logit_snip")
        if init == "magnitude":
            masks = magnitude_mask({n: raw[n] for n in weights}, c.density, c.scope)
        else:
            masks = logit_snip_mask(teacher, inputs(c.snip_samples), c.density, c.scope)
        opt = torch.optim.Adam(list(raw.values()), lr=c.lr)
        total = self._num_steps(ctx)
        freq = c.mask_update_freq
        updates = 0
        start: dict[str, float] = {}
        parts: dict[str, Tensor] = {}
        loss = torch.zeros(())
        for it in range(1, total + 1):
            x = inputs(c.batch_size)
            g_out, g_ntk = ntt_targets(teacher, x)
            loss, parts = ntt_loss(model, x, g_out, g_ntk, raw, masks, gamma2=c.gamma2, beta=c.beta,
                                   density=c.density, kernel=c.kernel)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not start:
                start = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
            opt.step()
            if it == 1 or it == total or (c.log_every and it % c.log_every == 0):
                ctx.log({"event": "ntt_step", "step": it, "loss": float(loss.detach()),
                         **{k: float(v) for k, v in parts.items()}})
            if freq and it % freq == 0 and it < total - freq:
                masks = magnitude_mask({n: raw[n] for n in weights}, c.density, c.scope)
                updates += 1
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, t in raw.items():
                params[n].copy_(t * masks[n] if n in masks else t)
        model.train(was_training)
        self.masks = {n: m.detach().clone() for n, m in masks.items()}
        self._attach(model)
        self.done = True
        rec = {"event": "ntt", "steps": total, "density": mask_density(self.masks), "mask_updates": updates,
               "start": start, "end": {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}}
        self.history.append(rec)
        ctx.log(rec)
        return self.masks

    def after_step(self, ctx: LoopContext) -> None:
        """Re-apply the fixed mask (gradients of masked weights are already zero)."""
        if self.weight_mask is not None:
            self.weight_mask.apply()

    def state_dict(self) -> dict:
        """JSON-able: ``history``, ``done`` and the masks as ``{name: {"shape", "kept"}}`` (flat kept indices)."""
        st: dict[str, Any] = {**super().state_dict(), "done": self.done}
        if self.masks is not None:
            st["masks"] = {
                n: {"shape": list(m.shape), "kept": m.reshape(-1).nonzero().flatten().tolist()}
                for n, m in self.masks.items()
            }
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.done = bool(state.get("done", False))
        if "masks" in state:
            self.masks = {}
            for n, spec in state["masks"].items():
                m = torch.zeros(math.prod(spec["shape"]))
                m[torch.as_tensor(spec["kept"], dtype=torch.long)] = 1.0
                self.masks[n] = m.view(spec["shape"])
            model = getattr(self, "_model", None)
            if model is not None:
                self._attach(model)
