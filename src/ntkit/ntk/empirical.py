"""The full empirical NTK over all logits, differentiable (used by NTT, seed 003).

For a model f: R^d → R^k with parameters θ and inputs X₁ (N₁ samples), X₂ (N₂ samples):

    Θ[(i,a),(j,b)] = Σ_θ ∂f_a(x1_i)/∂θ · ∂f_b(x2_j)/∂θ,     Θ ∈ R^{N₁k × N₂k},

rows ordered sample-major: row ``i·k + a`` is (sample i, logit a). The output of ``f`` may have
any shape per sample; it is flattened to k = its number of elements.

Masks. NTT's student computes with effective weights ``m ⊙ θ̃`` and trains the raw ``θ̃``; its
kernel is the NTK of ``x ↦ f(x; m ⊙ θ̃)`` w.r.t. ``θ̃``: ∂/∂θ̃ = m ⊙ ∂f/∂w at w = m ⊙ θ̃, so

    Θ = Σ_θ m² · ∂f_a(x1_i)/∂w · ∂f_b(x2_j)/∂w

— for 0/1 masks, the NTK of the sparse network over its surviving weights. Pass ``masks``
(``{param_name: tensor shaped like the parameter}``) and/or ``params`` (``{param_name: tensor}``,
values that replace the model's parameters, e.g. the student's raw weights); the kernel is taken
w.r.t. those values. With ``create_graph=True`` Θ is differentiable w.r.t. them (and w.r.t. the
model's own parameters where not overridden), so ‖Θ_student − Θ_teacher‖² can be minimised by
ordinary backpropagation (second order through the kernel).

Implementations (private, chosen by :class:`NTKImplementation`):

* ``STRUCTURED`` — layer-wise, for models whose parameters all live in ``nn.Linear`` (2-D
  inputs [N, in]) and ``nn.Conv2d`` (groups = 1, zero padding) modules, each called once per
  forward, with any parameter-free operations between them (activations, pooling, flatten,
  reshape). One forward records each layer's input aˡ and output zˡ; one *batched* backward
  (``is_grads_batched``, k basis cotangents) gives the back-propagated signals
  δˡ_{i,a} = ∂f_a(x_i)/∂zˡ for all logits. Then per layer:

  - Linear, unmasked: Θˡ = (A₁A₂ᵀ + 1[bias]) ⊗ 1_{k×k} ⊙ (D₁D₂ᵀ) — an input Gram [N₁, N₂] times a
    signal Gram [N₁k, N₂k]; no per-parameter Jacobian is ever formed. Cost ≈ N₁N₂·in + N₁N₂k²·out.
  - Linear, masked (M = m²): Θˡ[(i,a),(j,b)] = Σ_o D₁[i,a,o] D₂[j,b,o] C[i,j,o] with
    C[i,j,o] = Σ_c M[o,c] a₁[i,c] a₂[j,c]. Cost ≈ N₁N₂·in·out + N₁N₂k²·out, still far below the
    N₁k·N₂k·in·out of per-parameter Jacobians.
  - Conv2d: per-(sample, logit) weight gradients Gᵢₐ = δᵢₐ Uᵢᵀ [C_out, C_in·kh·kw] from the
    unfolded input patches Uᵢ (spatial positions summed inside the matmul), then
    Θˡ = (G₁ ⊙ M) G₂ᵀ; bias: spatially summed δ. (The "token Gram" alternative, Σ_{p,q} over pairs
    of positions, costs (N·k·P)²·C_out and only wins at a few positions; not implemented.)

  Every step is a differentiable torch op, so ``create_graph=True`` is exact second order.
  Fastest for MLPs and CNNs (LeNet-300-100, LeNet-5, Conv-4): see ``bench/empirical_ntk.py``.
* ``JACOBIAN`` — generic: ``torch.func.jacrev`` of ``functional_call`` w.r.t. every parameter,
  then Θ = Σ_θ J₁ J₂ᵀ. Works for any model that ``torch.func`` can transform (attention, norms,
  embeddings, weight sharing); memory N·k·|θ|. Differentiable through ordinary autograd.
* ``AUTO`` — ``STRUCTURED`` when the model qualifies (checked on the actual forward), else
  ``JACOBIAN``. :func:`explain_empirical_ntk` reports the choice and the reason.

Requirements (both paths): sample i's output depends only on sample i — dropout layers with
p > 0 (also attention dropout), batch-norm layers and MoE layers with expert capacity must be in
eval mode, and batch norm must have running statistics (refused otherwise, the same check as
:func:`~ntkit.ntk.modular_ntk`). The structured path
assumes each parameter is used only through its own module's forward (a weight also used
functionally elsewhere is not detected; force ``JACOBIAN`` for such models).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ntkit.errors import ConfigError, UnsupportedModelError, check
from ntkit.ntk._layers import check_independent, unfold
from ntkit.partition import param_owners

__all__ = ["NTKImplementation", "NTKPlan", "empirical_ntk", "explain_empirical_ntk"]

log = logging.getLogger(__name__)


class NTKImplementation(str, enum.Enum):
    """How :func:`empirical_ntk` computes the kernel.

    * ``AUTO`` — ``STRUCTURED`` when the model qualifies, else ``JACOBIAN`` (the default).
    * ``STRUCTURED`` — layer-wise (input Gram) ⊙ (back-propagated-signal Gram) for Linear /
      Conv2d models; fastest for MLPs and CNNs, never materialises per-parameter Jacobians of
      Linear layers. Raises :class:`UnsupportedModelError` on other models.
    * ``JACOBIAN`` — ``torch.func.jacrev`` over all parameters, then Σ J₁J₂ᵀ; any model, memory
      N·k·|θ|, the reference the structured path is tested against.
    """

    AUTO = "auto"
    STRUCTURED = "structured"
    JACOBIAN = "jacobian"


@dataclass(frozen=True)
class NTKPlan:
    """What :func:`empirical_ntk` would do for a model and inputs.

    Attributes:
        implementation: ``STRUCTURED`` or ``JACOBIAN`` (never ``AUTO``).
        reason: why (for ``JACOBIAN`` under ``AUTO``: what disqualified the structured path).
        layers: for ``STRUCTURED``, ``{module_name: form}`` with form one of
            ``"linear-gram"``, ``"linear-masked-gram"``, ``"conv-per-sample"``.
    """

    implementation: NTKImplementation
    reason: str
    layers: dict[str, str] = field(default_factory=dict)


class _Unsupported(Exception):
    """Internal: the structured path does not apply (message says why)."""


# ------------------------------------------------------------------------------------------ inputs
def _effective_params(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    masks: Mapping[str, Tensor] | None,
    create_graph: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(raw, masks)``: the raw parameter values w.r.t. which the kernel is taken (overrides
    applied; detached unless ``create_graph``) and the validated masks (same dtype/device)."""
    named = dict(model.named_parameters())
    params = dict(params or {})
    masks = dict(masks or {})
    for n, t in params.items():
        check(n in named, "params", n, "names of model.named_parameters()")
        check(tuple(t.shape) == tuple(named[n].shape), f"params[{n!r}].shape", tuple(t.shape),
              f"{tuple(named[n].shape)}")
    for n, t in masks.items():
        check(n in named, "masks", n, "names of model.named_parameters()")
        check(tuple(t.shape) == tuple(named[n].shape), f"masks[{n!r}].shape", tuple(t.shape),
              f"{tuple(named[n].shape)}")
    raw = {}
    for n, p in named.items():
        t = params.get(n, p)
        raw[n] = t if create_graph else t.detach()
    ms = {n: m.detach().to(device=raw[n].device, dtype=raw[n].dtype) for n, m in masks.items()}
    return raw, ms


def _flatten_out(out: Tensor, n: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != n:
        raise UnsupportedModelError(
            f"model output shape {getattr(out, 'shape', type(out))}: expected a tensor [N={n}, ...]"
        )
    return out.reshape(n, -1)


# ------------------------------------------------------------------------------------ generic path
def _ntk_jacobian(
    model: nn.Module, x: Tensor, n1: int, raw: dict[str, Tensor], masks: dict[str, Tensor], same: bool
) -> Tensor:
    buffers = dict(model.named_buffers())

    def f(p: dict[str, Tensor]) -> Tensor:
        eff = {n: (t * masks[n] if n in masks else t) for n, t in p.items()}
        return _flatten_out(functional_call(model, {**buffers, **eff}, (x,)), x.shape[0])

    jac = jacrev(f)(raw)  # {name: [N, k, *shape]}
    theta = None
    for j in jac.values():
        n, k = j.shape[0], j.shape[1]
        j = j.reshape(n * k, -1)
        j1 = j[: n1 * k]
        j2 = j1 if same else j[n1 * k :]
        t = j1 @ j2.T
        theta = t if theta is None else theta + t
    if theta is None:  # a model without parameters has a zero kernel
        out = f(raw)
        k = out.shape[1]
        n2 = x.shape[0] - n1 if not same else n1
        theta = out.new_zeros(n1 * k, n2 * k)
    return theta


# --------------------------------------------------------------------------------- structured path
def _param_owners(model: nn.Module) -> dict[str, nn.Module]:
    """``{module_name: module}`` for every module with parameters; raises :class:`_Unsupported`
    unless each is a supported leaf layer owning its parameters exclusively."""
    first = param_owners(model)
    owners: dict[str, nn.Module] = {}
    for mname, mod in model.named_modules():
        own = [(pn, p) for pn, p in mod._parameters.items() if p is not None]
        if not own:
            continue
        if type(mod) is nn.Linear:
            pass
        elif type(mod) is nn.Conv2d:
            if mod.groups != 1 or mod.padding_mode != "zeros":
                raise _Unsupported(f"{mname} (Conv2d groups={mod.groups}, padding_mode={mod.padding_mode!r})")
        else:
            raise _Unsupported(f"{mname or 'model'} ({type(mod).__name__} has parameters)")
        extra = sorted(pn for pn, _ in own if pn not in ("weight", "bias"))
        if extra:  # e.g. the old-style weight_norm hook (weight_g, weight_v)
            raise _Unsupported(f"{mname} ({type(mod).__name__} with parameters {extra})")
        for pn, p in own:
            o = first[id(p)][0]
            if o.module is not mod:
                raise _Unsupported(f"parameter {_pname(mname, pn)} is shared with {_pname(o.name, o.attr)}")
        owners[mname] = mod
    return owners


def _plan_layer(mod: nn.Module, name: str, masks: Mapping[str, Tensor]) -> str:
    if isinstance(mod, nn.Linear):
        return "linear-masked-gram" if f"{name}.weight" in masks else "linear-gram"
    return "conv-per-sample"


def _pname(mname: str, pn: str) -> str:
    return f"{mname}.{pn}" if mname else pn


def _structured_forward(
    model: nn.Module, x: Tensor, raw: dict[str, Tensor], masks: dict[str, Tensor], clone: bool
) -> tuple[Tensor, dict[str, nn.Module], dict[str, Tensor], dict[str, Tensor], bool]:
    """Forward with hooks recording each parameterised layer's input and output.

    Returns ``(out, owners, inputs, outputs, modified)``; ``modified`` is True when an in-place
    operation changed a recorded tensor after it was recorded (then call again with
    ``clone=True``: the hooks record the tensors and hand copies on to the rest of the model)."""
    owners = _param_owners(model)
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    versions: dict[str, tuple[int, int]] = {}
    handles = []

    def make_hook(mname: str):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            calls[mname] = calls.get(mname, 0) + 1
            if len(args) != 1 or not isinstance(out, Tensor):
                raise _Unsupported(f"{mname} called with {len(args)} positional inputs")
            a = args[0]
            want = 2 if isinstance(mod, nn.Linear) else 4
            if a.dim() != want:
                raise _Unsupported(f"{mname} ({type(mod).__name__}) input of shape {tuple(a.shape)}; "
                                   f"the structured path needs {want}-D inputs")
            inputs[mname] = a.clone() if clone else a
            outputs[mname] = out
            versions[mname] = (inputs[mname]._version, out._version)
            return out.clone() if clone else None

        return hook

    for mname, mod in owners.items():
        handles.append(mod.register_forward_hook(make_hook(mname)))
    try:
        buffers = dict(model.named_buffers())
        eff = {n: (t * masks[n] if n in masks else t) for n, t in raw.items()}
        out = functional_call(model, {**buffers, **eff}, (x,))
    finally:
        for h in handles:
            h.remove()
    for mname in owners:
        c = calls.get(mname, 0)
        if c != 1:
            raise _Unsupported(f"module {mname} was called {c} times in one forward (need exactly 1)")
    modified = any(versions[m] != (inputs[m]._version, outputs[m]._version) for m in owners)
    return out, owners, inputs, outputs, modified


def _signals(out: Tensor, zs: list[Tensor], create_graph: bool) -> list[Tensor | None]:
    """δ = ∂f_a(x_i)/∂z for every logit a: one backward with the k basis cotangents, batched by
    autograd (``is_grads_batched``); one backward per logit if some op has no vmap rule.
    Returns, per z [N, ...], a tensor [k, N, ...] (None where z does not reach the output)."""
    n, k = out.shape
    basis = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, n, k)
    try:
        return list(torch.autograd.grad(
            out, zs, grad_outputs=basis, is_grads_batched=True, create_graph=create_graph,
            allow_unused=True, retain_graph=True,
        ))
    except RuntimeError as e:
        log.debug("empirical_ntk: batched signal backward failed (%s); one backward per logit", e)
    per = [
        torch.autograd.grad(out, zs, grad_outputs=basis[a], create_graph=create_graph, allow_unused=True,
                            retain_graph=True)
        for a in range(k)
    ]
    return [None if per[0][li] is None else torch.stack([p[li] for p in per]) for li in range(len(zs))]


def _ntk_structured(
    model: nn.Module,
    x: Tensor,
    n1: int,
    raw: dict[str, Tensor],
    masks: dict[str, Tensor],
    same: bool,
    create_graph: bool,
) -> tuple[Tensor, dict[str, str]]:
    # The signal backward needs a graph from every layer output to f: make leaves of whatever
    # does not already require grad (frozen or detached values; Θ is detached by the caller
    # unless create_graph).
    raw = {n: (t if t.requires_grad else t.detach().requires_grad_(True)) for n, t in raw.items()}
    out, owners, inputs, outputs, modified = _structured_forward(model, x, raw, masks, clone=False)
    if modified:  # an in-place op touched a recorded tensor: redo, recording copies
        out, owners, inputs, outputs, _ = _structured_forward(model, x, raw, masks, clone=True)
    n = x.shape[0]
    out = _flatten_out(out, n)
    k = out.shape[1]
    n2 = n1 if same else n - n1
    names = list(owners)
    plan = {m: _plan_layer(owners[m], m, masks) for m in names}
    if not names:
        return out.new_zeros(n1 * k, n2 * k), plan
    # δ for all logits: one backward with k basis cotangents, vmapped by autograd.
    grads = _signals(out, [outputs[m] for m in names], create_graph)
    theta4 = out.new_zeros(n1, k, n2, k)  # [i, a, j, b]
    for mname, g in zip(names, grads):
        mod = owners[mname]
        z = outputs[mname]
        if g is None:  # the layer does not reach the output: zero contribution
            continue
        if not create_graph:
            g = g.detach()
        a = inputs[mname] if create_graph else inputs[mname].detach()
        d = g.movedim(0, 1)  # [N, k, *z.shape[1:]]
        wname, bname = _pname(mname, "weight"), _pname(mname, "bias")
        mw = masks.get(wname)
        mb = masks.get(bname)
        has_bias = getattr(mod, "bias", None) is not None
        if isinstance(mod, nn.Linear):
            d = d.reshape(n, k, z.shape[-1])
            d1, a1 = d[:n1], a[:n1]
            d2, a2 = (d1, a1) if same else (d[n1:], a[n1:])
            if mw is None:
                ga = a1 @ a2.T  # [N1, N2]
                if has_bias and mb is None:
                    ga = ga + 1.0
                gd = (d1.reshape(n1 * k, -1) @ d2.reshape(n2 * k, -1).T).view(n1, k, n2, k)
                theta4 = theta4 + gd * ga[:, None, :, None]
            else:
                mm = mw * mw  # [out, in]
                c = ((a1[:, None, :] * a2[None, :, :]).reshape(n1 * n2, -1) @ mm.T).view(n1, n2, -1)
                t = d1[:, None, :, :] * c[:, :, None, :]  # [N1, N2, k, out]
                blk = torch.matmul(t.transpose(0, 1), d2.transpose(1, 2)[:, None])  # [N2, N1, k, k]
                theta4 = theta4 + blk.permute(1, 2, 0, 3)
                if has_bias and mb is None:
                    theta4 = theta4 + (d1.reshape(n1 * k, -1) @ d2.reshape(n2 * k, -1).T).view(n1, k, n2, k)
            if has_bias and mb is not None:
                b1 = d1.reshape(n1 * k, -1)
                b2 = d2.reshape(n2 * k, -1)
                theta4 = theta4 + ((b1 * (mb * mb)) @ b2.T).view(n1, k, n2, k)
        else:  # Conv2d
            cout = z.shape[1]
            d = d.reshape(n, k, cout, -1)  # [N, k, C_out, P]
            u = unfold(a, mod)  # [N, C_in·kh·kw, P]
            # per-(sample, logit) weight gradients, one bmm per sample: [N, k·C_out, C_in·kh·kw]
            gw = torch.bmm(d.reshape(n, k * cout, -1), u.transpose(1, 2)).view(n, k, cout, -1)
            g1 = gw[:n1].reshape(n1 * k, -1)
            g2 = g1 if same else gw[n1:].reshape(n2 * k, -1)
            lhs = g1 if mw is None else g1 * (mw * mw).reshape(1, -1)
            theta4 = theta4 + (lhs @ g2.T).view(n1, k, n2, k)
            if has_bias:
                db = d.sum(-1)  # [N, k, C_out]
                b1 = db[:n1].reshape(n1 * k, cout)
                b2 = b1 if same else db[n1:].reshape(n2 * k, cout)
                lhs = b1 if mb is None else b1 * (mb * mb)
                theta4 = theta4 + (lhs @ b2.T).view(n1, k, n2, k)
    return theta4.reshape(n1 * k, n2 * k), plan


# ------------------------------------------------------------------------------------- entry point
def _prepare(x1: Tensor, x2: Tensor | None) -> tuple[Tensor, int, bool]:
    check(isinstance(x1, Tensor) and x1.dim() >= 1 and x1.shape[0] >= 1, "x1", getattr(x1, "shape", x1),
          "a tensor [N1 >= 1, ...]")
    if x2 is None:
        return x1, x1.shape[0], True
    check(isinstance(x2, Tensor) and x2.shape[1:] == x1.shape[1:] and x2.shape[0] >= 1, "x2",
          getattr(x2, "shape", x2), f"a tensor [N2 >= 1, {', '.join(map(str, x1.shape[1:]))}]")
    return torch.cat([x1, x2.to(dtype=x1.dtype, device=x1.device)]), x1.shape[0], False


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    params: Mapping[str, Tensor] | None = None,
    create_graph: bool = False,
    masks: Mapping[str, Tensor] | None = None,
    implementation: NTKImplementation | str = NTKImplementation.AUTO,
) -> Tensor:
    """The full empirical cross-NTK over all logits.

    Args:
        model: f with outputs [N, ...] (flattened per sample to k logits); must treat samples
            independently (eval-mode batch norm, no active dropout).
        x1: inputs [N1, ...].
        x2: inputs [N2, ...] (same per-sample shape); ``None`` means ``x1`` (Θ is then symmetric,
            computed from one forward/backward).
        params: ``{param_name: tensor}`` values used in place of the model's parameters
            (``torch.func.functional_call``); the kernel is taken w.r.t. them.
        create_graph: return Θ differentiable w.r.t. the raw parameter values (the ``params``
            overrides and the model's own parameters otherwise). Default: detached.
        masks: ``{param_name: tensor shaped like it}``; effective weights are ``mask ⊙ raw`` and
            the kernel is w.r.t. the raw values: Θ = Σ mask²·(∂f/∂w)(∂f/∂w)ᵀ (module docstring).
            Masks themselves are treated as constants.
        implementation: see :class:`NTKImplementation` (``"auto"``, ``"structured"``,
            ``"jacobian"``).

    Returns:
        Tensor [N1·k, N2·k] in the model's output dtype; entry ``[i·k + a, j·k + b]`` is
        ∂f_a(x1_i)/∂θ · ∂f_b(x2_j)/∂θ.

    Raises:
        UnsupportedModelError: samples are coupled (training-mode batch norm / dropout), the
            output is not [N, ...], or ``"structured"`` was forced on a model it cannot handle.
        ConfigError: unknown parameter / mask names or shapes, bad inputs or implementation.
    """
    theta, _ = _empirical_ntk(model, x1, x2, params, create_graph, masks, implementation)
    return theta


def _empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None,
    params: Mapping[str, Tensor] | None,
    create_graph: bool,
    masks: Mapping[str, Tensor] | None,
    implementation: NTKImplementation | str,
) -> tuple[Tensor, NTKPlan]:
    try:
        impl = NTKImplementation(implementation)
    except ValueError:
        raise ConfigError(
            f"implementation={implementation!r}: expected one of {[e.value for e in NTKImplementation]}"
        ) from None
    check_independent(model, "empirical_ntk")
    x, n1, same = _prepare(x1, x2)
    raw, ms = _effective_params(model, params, masks, create_graph)
    if impl in (NTKImplementation.AUTO, NTKImplementation.STRUCTURED):
        try:
            with torch.enable_grad():
                theta, layers = _ntk_structured(model, x, n1, raw, ms, same, create_graph)
            if not create_graph:
                theta = theta.detach()
            plan = NTKPlan(NTKImplementation.STRUCTURED, "all parameters in Linear/Conv2d layers", layers)
            log.debug("empirical_ntk: structured path, layers %s", layers)
            return theta, plan
        except _Unsupported as e:
            if impl is NTKImplementation.STRUCTURED:
                raise UnsupportedModelError(f"implementation='structured' cannot handle this model: {e}") from None
            reason = f"structured path not applicable: {e}"
            log.debug("empirical_ntk: %s; using torch.func Jacobians", reason)
    else:
        reason = "requested"
    with torch.enable_grad():
        theta = _ntk_jacobian(model, x, n1, raw, ms, same)
    if not create_graph:
        theta = theta.detach()
    return theta, NTKPlan(NTKImplementation.JACOBIAN, reason)


def explain_empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    masks: Mapping[str, Tensor] | None = None,
    implementation: NTKImplementation | str = NTKImplementation.AUTO,
) -> NTKPlan:
    """Which implementation :func:`empirical_ntk` picks for these arguments, why, and (for the
    structured path) the form used per layer. Runs the computation once (detached)."""
    _, plan = _empirical_ntk(model, x1, x2, None, False, masks, implementation)
    return plan
