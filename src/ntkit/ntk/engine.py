"""The modular NTK engine: per-module Gram matrices Θˡ = Jˡ Jˡᵀ for S samples.

One public entry point, :func:`modular_ntk`; the algorithms behind it are private and picked by
:class:`Strategy`. For module l (a :class:`~ntkit.partition.ModuleGroup`: attention head, expert,
filter, neuron, layer, …) and samples x_1..x_S, Jˡ is the Jacobian of a per-sample scalar
(``output="sum_logits"``: the sum of the sample's logits, at the masked positions for MLM) — or
of all k logits (``output="logits"``, Grams [M, S·k, S·k], sample-major) — w.r.t. the
module's parameter slices.

Cost floor (``output="sum_logits"``; N = S samples, L tokens / spatial positions per sample)
----------------------------------------------------------------------------------------
Every strategy needs the layer inputs ``a`` and output gradients ``δ`` of one forward and one
backward over the S samples. A plain forward+backward of a Linear layer ``[O, I]`` costs
≈ 6·N·L·I·O FLOPs (forward, input gradient, weight gradient). The hook strategy freezes the
weights, so its backward costs only the input-gradient half (4·N·L·I·O for forward+backward),
and then spends, per layer, the cheaper of

* materialise: per-sample gradients ``G_i = Σ_l δ_il a_ilᵀ`` (2·N·L·I·O, the same as the weight
  gradient it replaces) plus the slice Grams (2·N²·P for the P covered elements), or
* contract: ``⟨G_i, G_j⟩ = Σ_{l,l'} (a_il·a_jl')(δ_il·δ_jl')`` per output row:
  2·(NL)²·I + 2·(NL)²·O + 2·N²·L·O — far cheaper when L is small (MLPs, 4×4 / 2×2 conv maps).

So the floor of the engine is ≈ (6·N·L·I·O + 2·N²·P) per layer against 6·N·L·I·O for a plain
forward+backward: 1 + N/(3·L) when materialising, less with the contraction — and layers the
partition does not cover skip their weight gradients entirely, so the engine can undercut a
plain forward+backward. Measured (``bench/ntk_engine.py``, CPU, 2 threads, S = 64; FLOPs from
``FlopCounterMode``; docs/benchmarks.md): BERT-mini heads, T = 128, MLM head at the 15% masked
positions only (packed outputs): 132 GFLOP against 171 for fwd+bwd (also packed), 0.85× its
time (the forward and the input-gradient backward are ≈ 85% of the engine's time; with logits at
all T positions, as torch.func needs them, 191 GFLOP, a third of them in the 8000-word decoder);
VGG-16 filters (P = 14.7 M, every conv / BN parameter): 111 against 120 GFLOP but 1.28–1.37× the
time (1.44–1.48× with the self-check), the per-sample gradients of the 8×8 layers (GEMMs with
inner dimension L = 64) and the 4×4 contraction (inner dimension 16) being slower per FLOP than
oneDNN convolutions. GPT-2-small (HF, 124 M, S = 64, T = 128): 0.78×.

The S-pass loop costs S forward+backward passes of batch 1 (≈ the FLOPs of one batched pass, at
batch-1 efficiency) plus S reads of the full gradients; ``vmap(grad)`` pays per-sample full
gradients (S·P memory) before any Gram.

Capture by use, never silently wrong: the hook forward runs under
:class:`~ntkit.ntk._checks.UseTracker`, which records every torch op consuming a covered parameter
outside the forward of a layer with a rule. Layers with rules: ``nn.Linear``, ``nn.Conv2d`` (the
fast forms for groups = 1 with zero padding; any groups, dilation, stride, ``'same'`` and
reflect / replicate / circular padding by per-sample patches), ``nn.Conv1d``, ``nn.Embedding``,
``nn.LayerNorm``, ``nn.GroupNorm``, eval ``BatchNorm``, and layers that declare an affine layout
through :func:`ntkit.structure.declare` (HF's ``Conv1D``). Uses elsewhere with a per-op rule
become one more hooked use, so a parameter used k times contributes all k uses: ``F.linear(X, P)``,
``X @ P``, ``torch.einsum(eq, X, P)``, ``F.embedding(ids, P)``, ``X ± P`` and ``X * P`` with P
broadcast over the samples (position embeddings, LayerScale, RMSNorm weights), ``P.expand(S, …)``
(class tokens), and an embedding looked up once with ids [1, …] and added to every sample (HF
position ids). Any other use sends the parameter to torch.func, reported as
``"tok.weight: used by Tensor.t outside tok"``. Then a self-check (``self_check=True``) compares
every group's hook Gram on two samples with autograd's gradient of their summed output and
recomputes failing groups by torch.func. What still falls back (named in
:attr:`ModularNTK.fallback_layers`): layer types without a rule whose parameters are consumed by
ops without one (``nn.MultiheadAttention``'s fused kernel, custom autograd functions),
subclasses that override ``forward`` (their math may differ), and layers whose input batch
dimension is not the sample dimension — e.g. a 1-D ``arange(T)`` lookup broadcast over the
batch. MoE layers declare their experts, router and dispatch (:func:`ntkit.structure.declare`;
the zoo's :class:`~ntkit.models.layers.SwitchFFN` does), so expert rows map back to their samples.
The sample dimension is recognised by shape (dim 0 of the layer input equals S; 1-D ids must be a
model input), so a table of S rows built inside ``forward`` and broadcast over samples afterwards
would be misread — the self-check then catches it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.errors import ConfigError, UnsupportedModelError, check
from ntkit.ntk._checks import UseTracker, check_tolerance, gram_self_check, subset_rows, watch_map
from ntkit.ntk._grams import add_to_groups, contract_linear_grams, linear_costs
from ntkit.ntk._layers import check_independent
from ntkit.ntk._rules import Owner, bind_args, owners_of, rule_of
from ntkit.ntk._uses import (
    BUDGET,
    ConvForm,
    Direct,
    EmbeddingForm,
    LinearForm,
    Use,
    chunked_grams,
    conv_weight_per_sample,
    embedding_compact,
    pad_rows,
    per_sample_sum_to,
)
from ntkit.partition import ParamSlice, Partition
from ntkit.structure import structure_of

if TYPE_CHECKING:
    from ntkit.ntk.spectrum import Spectrum

__all__ = ["ModularNTK", "Strategy", "modular_ntk", "packed_rows_ambiguous"]

_OUTPUTS = ("sum_logits", "logits")
_CONTRACT_BUDGET = 1 << 20
class Strategy(str, Enum):
    """How :func:`modular_ntk` computes per-module Grams.

    * ``HOOKS`` — one forward and one backward over the S samples with the weights frozen;
      forward hooks keep layer inputs, tensor hooks take output gradients, and each layer's
      slice Grams are reduced inside the hook (per layer the cheaper of materialised per-sample
      gradients and the token-Gram contraction). Fastest whenever every covered parameter sits
      in a supported layer: 0.85× (BERT-mini heads) to 1.9× (VGG-16 filters) a plain
      forward+backward.
    * ``FUNCTORCH`` — ``torch.func.vmap(grad)`` per-sample gradients of the covered parameters
      (``vjp`` over one-hot cotangents when the model has data-dependent control flow such as
      MoE routing). Generic: any differentiable module; costs S·P memory for P covered
      parameters and runs ≈ 1.3× (BERT-mini) to 17× (VGG-16) a forward+backward. Used for the
      layers hooks cannot see.
    * ``BRUTE_FORCE`` — explicit per-sample Jacobian: one batch-1 forward per sample and one
      backward per output. The reference the others are tested against; slow.
    * ``AUTO`` — hooks for every supported layer, functorch for the rest (reported in
      :attr:`ModularNTK.fallback_layers`).
    """

    AUTO = "auto"
    HOOKS = "hooks"
    FUNCTORCH = "functorch"
    BRUTE_FORCE = "brute_force"


@dataclass
class ModularNTK:
    """Per-module NTK Grams.

    Attributes:
        grams: Tensor [M, N, N] (N = S for ``sum_logits``, S·k for ``logits``, sample-major),
            symmetric PSD, dtype = the accumulation dtype.
        names, kinds, layers: per module (from the partition), length M.
        strategy: the strategy that ran (``"hooks"``, ``"functorch"``, ``"brute_force"``, or
            ``"hooks+functorch"`` when ``auto`` fell back for some layers).
        fallback_layers: ``"<module>: <reason>"`` for each layer computed by torch.func.
        flops: estimated FLOPs of the Gram work (per-sample gradients + Grams), hooks only.
        output: ``"sum_logits"`` or ``"logits"``.
    """

    grams: Tensor
    names: list[str]
    kinds: list[str]
    layers: list[str]
    strategy: str
    fallback_layers: list[str] = field(default_factory=list)
    flops: int = 0
    output: str = "sum_logits"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key: int | str) -> Tensor:
        """The Gram of module ``key`` (index or name): Tensor [N, N]."""
        if isinstance(key, str):
            if key not in self.names:
                raise ConfigError(f"module={key!r}: not in this mNTK (names: {', '.join(self.names[:5])}, …)")
            key = self.names.index(key)
        return self.grams[key]

    @property
    def full(self) -> Tensor:
        """Σ over modules: the NTK of all covered parameters, Tensor [N, N]."""
        return self.grams.sum(0)

    def spectrum(self) -> Spectrum:
        """:func:`ntkit.ntk.spectrum.spectrum` of :attr:`grams`."""
        from ntkit.ntk.spectrum import spectrum

        return spectrum(self.grams)


# --------------------------------------------------------------------------- inputs / outputs
def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any], int]:
    """Normalise ``inputs`` to (args, kwargs, S); tensors are detached."""
    if isinstance(inputs, Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    else:
        raise ConfigError(f"inputs={type(inputs).__name__}: expected a Tensor, a tuple/list of args or a dict of kwargs")
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
    check(bool(tensors) and tensors[0].dim() >= 1, "inputs", type(inputs).__name__, "at least one batched Tensor")
    s = int(tensors[0].shape[0])
    for t in tensors:
        check(t.dim() >= 1 and t.shape[0] == s, "inputs shape", tuple(t.shape), f"first dim S={s} for every tensor")
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    kwargs = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
    return args, kwargs, s


def _logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits") and isinstance(out.logits, Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise UnsupportedModelError(f"model output={type(out).__name__}: expected a Tensor, a tuple or a dict with 'logits'")


def _mask_samples(mask: Tensor) -> Tensor:
    """The sample of each True entry of ``mask`` [S, T], in row-major order (packed-row owners)."""
    return torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]


def packed_rows_ambiguous(mask: Tensor) -> bool:
    """Whether packed logits for ``mask`` [S, T] (one row per True entry) cannot be used: with
    n == S rows and not exactly one position per sample, the layers after the gather cannot be
    told from per-sample ones. Callers that can choose pass outputs [S, T, V] then."""
    return int(mask.sum()) == mask.shape[0] and not bool((mask.sum(1) == 1).all())


def _per_sample(out: Any, output: str, mask: Tensor | None) -> Tensor:
    """Model output → per-sample scalars [S] (``sum_logits``) or logits [S, k] (``logits``).

    With ``mask`` [S, T], the output is either [S, T, V] (masked here) or *packed*: [n, V] with
    one row per True entry of ``mask`` in row-major order (``BertMLM(..., positions=mask)``)."""
    z = _logits_of(out)
    if mask is not None and z.dim() == 2:
        s, n = mask.shape[0], int(mask.sum())
        check(z.shape[0] == n, "model output rows", z.shape[0], f"{n} (output_mask's True count: packed logits) or an output [S, T, V]")
        if output == "sum_logits":
            return z.new_zeros(s).index_add(0, _mask_samples(mask).to(z.device), z.sum(-1))
        counts = mask.sum(1).tolist()
        check(len(set(counts)) <= 1, "output_mask", f"counts {counts[:8]}", "the same number of positions per sample")
        return z.reshape(s, -1)
    s = z.shape[0]
    if z.dim() >= 3 and mask is not None:
        check(tuple(mask.shape) == tuple(z.shape[:2]), "output_mask shape", tuple(mask.shape), f"{tuple(z.shape[:2])}")
        if output == "sum_logits":
            return (z.reshape(s, z.shape[1], -1).sum(-1) * mask.to(z.dtype)).sum(-1)
        counts = mask.sum(1).tolist()
        check(len(set(counts)) <= 1, "output_mask", f"counts {counts[:8]}", "the same number of positions per sample")
        return z[mask].reshape(s, -1)
    if output == "sum_logits":
        return z.reshape(s, -1).sum(-1)
    return z.reshape(s, -1)


def _sample(args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    a = tuple(x[i : i + 1] if isinstance(x, Tensor) else x for x in args)
    k = {n: (x[i : i + 1] if isinstance(x, Tensor) else x) for n, x in kwargs.items()}
    return a, k


# --------------------------------------------------------------------------- hooks strategy
@dataclass
class _Call:
    module: nn.Module
    kind: str
    x: Tensor
    rows: tuple[Any, ...] | None
    grads: dict[int, Tensor] = field(default_factory=dict)
    sign: float = 1.0  # of the parameter's term (``X - P``: −1)


class _HookRun:
    """State of one hook pass (forward + one backward per traced output)."""

    def __init__(
        self,
        model: nn.Module,
        s: int,
        hook_params: dict[str, list[Owner]],
        slices: dict[str, list[tuple[int, ParamSlice]]],
        params: dict[str, nn.Parameter],
        grams: Tensor,
        stream: bool,
        budget: int,
    ) -> None:
        self.model, self.s, self.slices, self.params = model, s, slices, params
        self.grams, self.stream, self.budget = grams, stream, budget
        self.acc = grams.dtype
        self.module_params: dict[int, list[tuple[str, str]]] = defaultdict(list)  # id(m) → (attr, pname)
        self.modules: dict[int, tuple[nn.Module, str, str]] = {}
        for pname, owners in hook_params.items():
            for o in owners:
                self.module_params[id(o.module)].append((o.attr, pname))
                self.modules[id(o.module)] = (o.module, o.kind or "", o.name)
        self.calls: dict[str, list[_Call]] = defaultdict(list)
        self.fallback: dict[str, str] = {}
        self.done: set[str] = set()
        self.fired: set[str] = set()  # parameters whose module's forward ran (with a sample dim)
        self.flops = 0
        self.deferred: dict[tuple[int, ...], list[Tensor]] = {}
        self.pass_index = 0
        self.leaf: Tensor | None = None
        self.expert_of: dict[int, tuple[nn.Module, int]] = {}  # id(expert submodule) → (MoE layer, e)
        self.router_of: dict[int, nn.Module] = {}
        self.ctx: dict[int, dict[str, Any]] = {}
        self.active: dict[int, int] = defaultdict(int)  # id(module) → forwards running (UseTracker)
        self.holders: list[nn.Module] = []  # stand-ins for functional uses (see capture)
        self.input_ptrs: set[int] = set()  # storages of the user's input tensors
        self.packed: Tensor | None = None  # sample of each output_mask position (packed outputs)
        self.tracker: UseTracker | None = None
        self.bcast: dict[int, tuple[nn.Module, Tensor]] = {}  # id(lookup output) → (embedding, ids [1, …])
        self.moe: dict[int, Any] = {}  # id(MoE layer) → its declared Structure
        for m in model.modules():
            st = structure_of(m)
            if st is None or st.experts is None or st.dispatch is None:
                continue
            self.moe[id(m)] = st
            router = st.router(m) if st.router is not None else None
            if router is not None:
                self.router_of[id(router)] = m
            for e, ex in enumerate(st.experts(m)):
                for c in ex.modules():
                    self.expert_of[id(c)] = (m, e)

    # -- hooks
    def register(self) -> list[Any]:
        handles = []
        for (m, kind, name) in self.modules.values():
            handles.append(m.register_forward_pre_hook(self._enter))
            handles.append(m.register_forward_hook(self._forward_hook(kind, name)))
        needed = {id(ffn) for ffn, _ in self.expert_of.values()}
        for m in self.model.modules():
            if id(m) in needed:
                handles.append(m.register_forward_pre_hook(self._ffn_pre))
                handles.append(m.register_forward_hook(self._ffn_post))
        return handles

    def _enter(self, m: nn.Module, args: Any) -> None:
        self.active[id(m)] += 1

    def _ffn_pre(self, m: nn.Module, args: Any) -> None:
        self.ctx[id(m)] = {}

    def _ffn_post(self, m: nn.Module, args: Any, out: Any) -> None:
        ctx = self.ctx[id(m)]
        dispatch, t = self.moe[id(m)].dispatch(m)
        ctx["dispatch"], ctx["T"] = list(dispatch), int(t)

    def _forward_hook(self, kind: str, name: str) -> Callable[..., Any]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            self.active[id(m)] -= 1
            if not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
                return self._refuse(m, f"{name}: non-tensor input/output")
            x = args[0]
            rows: tuple[Any, ...] | None = None
            if id(m) in self.expert_of and kind in ("linear", "linear_t"):
                ffn, e = self.expert_of[id(m)]
                rows = ("expert", self.ctx[id(ffn)], e)
            elif id(m) in self.router_of and kind in ("linear", "linear_t") and x.dim() == 2 and x.shape[0] % self.s == 0:
                rows = ("flat",)
            elif (
                self.packed is not None and x.dim() >= 2 and x.shape[0] == self.packed.numel() != self.s
                and kind in ("linear", "linear_t", "layernorm")
            ):  # after a gather of the output positions (packed logits): rows → their samples
                rows = ("packed", self.packed)
            elif (
                kind == "embedding" and x.dim() >= 2 and x.shape[0] == 1 != self.s and self.tracker is not None
                and id(m) not in self.expert_of
            ):  # ids shared by all samples (position ids [1, T]): watch the lookup's broadcast uses
                for _, pname in self.module_params[id(m)]:
                    self.fired.add(pname)
                    self.bcast[id(out)] = (m, x.detach())
                    self.tracker.watch_tensor(out, pname, name)
                return None
            elif x.dim() < (1 if kind == "embedding" else 2) or x.shape[0] != self.s or id(m) in self.expert_of:
                return self._refuse(m, f"{name}: input {tuple(x.shape)} has no sample dim of size S={self.s}")
            elif x.dim() == 1 and x.untyped_storage().data_ptr() not in self.input_ptrs:
                # 1-D ids of length S made inside forward (e.g. arange(T) with T == S, broadcast later)
                return self._refuse(m, f"{name}: 1-D input {tuple(x.shape)} is not a model input; its dim 0 may not be samples")
            for _, pname in self.module_params[id(m)]:
                self.fired.add(pname)
            if not torch.is_grad_enabled():  # run under no_grad inside forward: no gradient reaches it
                return None
            call = _Call(m, kind, x.detach(), rows)
            for _, pname in self.module_params[id(m)]:
                self.calls[pname].append(call)
            return self._traced(out, call)

        return hook

    def capture(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], pname: str, t: Tensor) -> Tensor | None:
        """Per-op rules for a covered parameter P used outside a module with a rule (a
        :class:`UseTracker` ``capture``); X below has sample dim 0 of size S:

        * ``F.linear(X, P[, b])`` (b None or not a parameter), ``X @ P`` / ``torch.matmul(X, P)``
          with P 2-D (``y = X P``), ``F.embedding(ids, P)`` (no max_norm / scale_grad_by_freq),
          ``torch.einsum(eq, X, P)`` (either order; X's first index is the sample index, first in
          the output, not in P; no ellipsis, repeated or P-only indices);
        * element-wise shift and scale by P broadcast over the samples: ``X + P``, ``P + X``,
          ``X - P``, ``P - X``, ``X * P``, ``P * X`` (operators, ``torch.add`` / ``sub`` / ``mul``
          and the Tensor methods, without ``alpha``) — position embeddings, class tokens added,
          LayerScale, RMSNorm weights;
        * ``P.expand(S, …)`` — a class token broadcast over the samples.

        The use becomes one more call of the parameter (a parameter used k times contributes all k
        uses). A lookup of an embedding with ids [1, …] shared by all samples (position ids) is
        watched as a tensor ``t`` in its own right: its shift into X [S, …] gives each sample's
        gradient of the lookup. Returns the op's output, or None when no rule applies (the
        parameter then falls back to torch.func, named with the op)."""
        if id(t) in self.bcast:
            return self._capture_bcast(func, args, kwargs, pname, t)
        p = self.params[pname]
        rule = rule_of(func, args, kwargs, p, self.s)
        if rule is None:
            return None
        kind, x, sign = rule
        rows = None
        if kind == "einsum":
            rows, sign = ("einsum", sign), 1.0
        if x.dim() == 1 and x.untyped_storage().data_ptr() not in self.input_ptrs:
            return None  # 1-D ids of length S made inside forward: dim 0 may not be samples
        holder = nn.Module()  # stands for the op: holds the parameter as ``weight``
        holder.weight = p
        if kind == "embedding":
            pad = bind_args(func, args, kwargs).get("padding_idx")
            holder.padding_idx = None if pad is None else int(pad) % p.shape[0]
        self.holders.append(holder)
        self.module_params[id(holder)].append(("weight", pname))
        self.fired.add(pname)
        out = func(*args, **kwargs)  # every rule's output has sample dim 0 of size S
        if not torch.is_grad_enabled():
            return out
        keep = x.detach() if kind in ("linear", "linear_t", "embedding", "scale", "einsum") else x.new_empty(0)
        call = _Call(holder, kind, keep, rows, sign=sign)
        self.calls[pname].append(call)
        return self._traced(out, call)

    def _capture_bcast(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], pname: str, t: Tensor) -> Tensor | None:
        """``X ± E`` with E = embedding(ids [1, …]) broadcast over X's samples (see :meth:`capture`)."""
        rule = rule_of(func, args, kwargs, t, self.s)
        if rule is None or rule[0] != "shift":
            return None
        m, ids = self.bcast[id(t)]
        out = func(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        call = _Call(m, "embedding_bcast", ids, ("bcast", t.shape), sign=rule[2])
        self.calls[pname].append(call)
        return self._traced(out, call)

    def _traced(self, out: Tensor, call: _Call) -> Tensor:
        """``out`` with a hook that records its gradient for ``call`` (frozen weights: an output
        that needs no gradient is joined to a zero leaf so the backward reaches it)."""
        if not out.requires_grad:
            if self.leaf is None:
                self.leaf = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            out = out + self.leaf.to(out.dtype)
        out.register_hook(lambda g, c=call: self._on_grad(c, g))
        return out

    def _refuse(self, m: nn.Module, reason: str) -> None:
        for _, pname in self.module_params[id(m)]:
            self.fallback.setdefault(pname, reason)

    def _on_grad(self, call: _Call, g: Tensor) -> None:
        call.grads[self.pass_index] = g.detach()
        if not self.stream:
            return
        for attr, pname in self.module_params[id(call.module)]:
            if pname not in self.fallback and len(self.calls[pname]) == 1 and pname not in self.done:
                self._process(pname, npass=1)
        if all(p in self.done or p in self.fallback for _, p in self.module_params[id(call.module)]):
            call.grads.clear()

    def flush(self) -> None:
        """Grams of the deferred one-element-per-module parameters: one bmm per module list."""
        for key, cols in self.deferred.items():
            y = torch.stack(cols, -1).transpose(0, 1)  # [n_modules, N, n_params]
            self.flops += 2 * self.s * self.s * y.shape[0] * y.shape[2]
            add_to_groups(self.grams, list(key), torch.bmm(y, y.transpose(1, 2)))
        self.deferred.clear()

    # -- per-sample quantities of one call
    def _uses(self, call: _Call, attr: str, j: int) -> Use | None:
        g = call.grads.get(j)
        if g is None:
            return None
        acc, s = self.acc, self.s
        x = call.x
        m = call.module
        p = getattr(m, attr)
        if call.rows is not None and call.rows[0] == "packed":  # [n, …] → zero-padded [S, Lmax, …]
            x, g = pad_rows(x, g, call.rows[1], s)
        if call.kind in ("linear", "linear_t"):
            a, d = x.to(acc), g.to(acc)
            if call.rows is not None and call.rows[0] == "expert":
                ctx, e = call.rows[1], call.rows[2]
                a, d = pad_rows(a, d, ctx["dispatch"][e] // ctx["T"], s)
            else:
                a, d = a.reshape(s, -1, a.shape[-1]), d.reshape(s, -1, d.shape[-1])
            if attr == "weight":
                # W [in, out] (y = x W): the rows of its gradient Σ_l a_l δ_lᵀ are indexed by the
                # inputs, so the same form with the roles of a and δ swapped
                return LinearForm(a, d, p.shape) if call.kind == "linear" else LinearForm(d, a, p.shape)
            return Direct(d.sum(1))
        if call.kind == "conv2d":
            d4 = g.to(acc)
            if attr == "weight":
                return ConvForm(x.to(acc), d4, m, p.shape)  # type: ignore[arg-type]
            return Direct(d4.sum((2, 3)))
        if call.kind == "embedding":
            return EmbeddingForm(x, g.to(acc), m.padding_idx)  # type: ignore[arg-type]
        if call.kind == "conv_any":
            d = g.to(acc)
            if attr == "bias":
                return Direct(d.sum(tuple(range(2, d.dim()))))
            return Direct(conv_weight_per_sample(x.to(acc), d, m))  # type: ignore[arg-type]
        if call.kind == "groupnorm":
            d = g.to(acc)
            red = tuple(range(2, d.dim()))
            if attr == "bias":
                return Direct(d.sum(red) if red else d)
            xh = F.group_norm(x.to(acc), m.num_groups, None, None, m.eps)  # type: ignore[arg-type]
            return Direct((d * xh).sum(red) if red else d * xh)
        if call.kind == "embedding_bcast":  # lookup E of ids [1, …] shifted into X [S, …]
            d = per_sample_sum_to(g.to(acc), call.rows[1]) * call.sign  # [S, 1, …, D]
            d = d.reshape(s, *x.shape[1:], d.shape[-1])
            return EmbeddingForm(x.expand(s, *x.shape[1:]), d, m.padding_idx)  # type: ignore[arg-type]
        if call.kind == "einsum":
            return Direct(torch.einsum(call.rows[1], g.to(acc), x.to(acc)))  # type: ignore[index]
        if call.kind in ("shift", "scale", "expand"):  # P broadcast over the samples
            d = g.to(acc) if call.kind != "scale" else g.to(acc) * x.to(acc)
            return Direct(per_sample_sum_to(d, p.shape) * call.sign)
        if call.kind == "layernorm":
            ns = tuple(m.normalized_shape)  # type: ignore[attr-defined]
            d = g.to(acc).reshape(s, -1, *ns)
            if attr == "bias":
                return Direct(d.sum(1))
            xh = F.layer_norm(x.to(acc), ns, None, None, m.eps).reshape(s, -1, *ns)  # type: ignore[arg-type]
            return Direct((d * xh).sum(1))
        if call.kind == "batchnorm":
            d = g.to(acc)
            red = tuple(range(2, d.dim()))
            if attr == "bias":
                return Direct(d.sum(red) if red else d)
            view = (1, -1) + (1,) * len(red)
            rm = m.running_mean.to(acc).view(view)  # type: ignore[union-attr]
            rv = m.running_var.to(acc).view(view)  # type: ignore[union-attr]
            xh = (x.to(acc) - rm) * torch.rsqrt(rv + m.eps)  # type: ignore[operator]
            return Direct((d * xh).sum(red) if red else d * xh)
        raise AssertionError(call.kind)

    # -- Gram of one parameter from all its uses
    def _process(self, pname: str, npass: int) -> None:
        self.done.add(pname)
        calls = self.calls.pop(pname, [])
        slices = self.slices[pname]
        shape = self.params[pname].shape
        per_pass: list[list[Use]] = []
        for j in range(npass):
            uses = []
            for c in calls:
                attr = next(a for a, p in self.module_params[id(c.module)] if p == pname)
                u = self._uses(c, attr, j)
                if u is not None:
                    uses.append(u)
            per_pass.append(uses)
        if not any(per_pass):
            return  # no gradient reached this parameter: zero Gram contribution
        if npass == 1:
            uses = per_pass[0]
            u0 = uses[0]
            if len(uses) == 1 and isinstance(u0, LinearForm):
                dims = {s.dim for _, s in slices}
                conv_ok = not isinstance(u0, ConvForm) or dims == {0}
                if conv_ok and len(dims) == 1 and dims <= {0, 1}:
                    covered = sum(s.size * (int(math.prod(shape)) // shape[s.dim]) for _, s in slices)
                    dim = dims.pop()
                    k_cost, raw = u0.patch_gram_cost() if isinstance(u0, ConvForm) else (None, False)
                    mat, con = linear_costs(u0.n, u0.length, u0.fan_in, u0.fan_out, covered, dim, k_cost)
                    if con < mat:
                        spec = [(gi, s.dim, s.start, s.stop) for gi, s in slices]
                        k = u0.patch_gram() if raw else None  # type: ignore[union-attr]
                        a = u0.d if raw else u0.a.reshape(u0.n, u0.length, -1)  # a unused when k given
                        contract_linear_grams(a, u0.d, spec, self.grams, budget=_CONTRACT_BUDGET, k=k)
                        self.flops += con
                        return
            if len(uses) == 1 and isinstance(u0, EmbeddingForm):
                self.flops += embedding_compact(u0, slices, self.grams, self.budget)
                return
            if len(shape) == 1 and all(isinstance(u, Direct) for u in uses) and all(sl.size == 1 for _, sl in slices):
                # one element per module (conv bias, BN / LN affine per filter or neuron): batch
                # every such parameter with the same module list into one bmm at the end
                g = uses[0].g
                for u in uses[1:]:
                    g = g + u.g  # type: ignore[attr-defined]
                starts = [sl.start for _, sl in slices]
                key = tuple(gi for gi, _ in slices)
                if starts == list(range(starts[0], starts[0] + len(starts))):
                    col = g[:, starts[0] : starts[0] + len(starts)]
                else:
                    col = g[:, torch.tensor(starts, device=g.device)]
                self.deferred.setdefault(key, []).append(col)
                return

            def rows(r0: int, r1: int) -> Tensor:
                out = uses[0].rows(r0, r1)
                for u in uses[1:]:
                    out = out + u.rows(r0, r1)
                return out

            fpr = sum(u.flops_per_row for u in uses)
            self.flops += chunked_grams(rows, shape, self.s, slices, self.grams, self.budget, fpr)
            return

        def rows_k(r0: int, r1: int) -> Tensor:
            parts = []
            for uses in per_pass:
                if not uses:
                    ref = self.params[pname]
                    parts.append(torch.zeros(self.s, r1 - r0, *shape[1:], dtype=self.acc, device=ref.device))
                    continue
                out = uses[0].rows(r0, r1)
                for u in uses[1:]:
                    out = out + u.rows(r0, r1)
                parts.append(out)
            return torch.stack(parts, 1).reshape(self.s * npass, r1 - r0, *shape[1:])

        self.flops += chunked_grams(rows_k, shape, self.s * npass, slices, self.grams, self.budget)


def _check_packed(run: _HookRun, z: Tensor, mask: Tensor | None) -> None:
    """After the forward: layers that took packed rows are valid only if the output is packed,
    and packed outputs with n == S rows are ambiguous unless each sample has one position."""
    packed = mask is not None and z.dim() == 2
    if not packed:
        for calls in run.calls.values():
            for c in calls:
                if c.rows is not None and c.rows[0] == "packed":
                    run._refuse(c.module, f"{type(c.module).__name__}: input rows match output_mask's count, not S")
        return
    assert mask is not None
    if packed_rows_ambiguous(mask):
        raise UnsupportedModelError(
            f"output_mask: packed logits with n = S = {run.s} rows but uneven positions per sample; layers "
            "after the gather cannot be told from per-sample ones — pass outputs [S, T, V] for this batch"
        )


# --------------------------------------------------------------------------- functorch / brute
def _functorch_grads(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    names: Sequence[str],
    output: str,
    mask: Tensor | None,
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """Per-sample gradients {name: [S, *shape]} (``logits``: [S, k, *shape]) by torch.func."""
    from torch.func import functional_call, grad, jacrev, vjp, vmap

    params = dict(model.named_parameters())
    primals = {n: params[n].detach() for n in names}
    arg_dims = tuple(0 if isinstance(a, Tensor) else None for a in args)
    kw_dims = {k: (0 if isinstance(v, Tensor) else None) for k, v in kwargs.items()}

    def one(pp: dict[str, Tensor], a: tuple[Any, ...], kw: dict[str, Any], m: Tensor | None) -> Tensor:
        a1 = tuple(x.unsqueeze(0) if isinstance(x, Tensor) else x for x in a)
        kw1 = {k: (x.unsqueeze(0) if isinstance(x, Tensor) else x) for k, x in kw.items()}
        out = functional_call(model, pp, a1, kw1)
        return _per_sample(out, output, None if m is None else m.unsqueeze(0))[0]

    fn = grad(one) if output == "sum_logits" else jacrev(one)
    try:
        return vmap(fn, in_dims=(None, arg_dims, kw_dims, None if mask is None else 0), chunk_size=chunk_size)(
            primals, args, kwargs, mask
        )
    except RuntimeError:
        pass  # data-dependent control flow (e.g. MoE routing): vjp over one-hot cotangents

    def batched(pp: dict[str, Tensor]) -> Tensor:
        return _per_sample(functional_call(model, pp, args, kwargs), output, mask)

    ys, pull = vjp(batched, primals)
    flat = ys.reshape(-1)
    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device).view(-1, *ys.shape)
    (g,) = vmap(pull, chunk_size=chunk_size)(eye)
    return {n: t.reshape(*ys.shape, *params[n].shape) for n, t in g.items()}


def _brute_force(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    s: int,
    part: Partition,
    output: str,
    mask: Tensor | None,
    acc: torch.dtype,
) -> Tensor:
    params = dict(model.named_parameters())
    names = part.covered_params()
    ps = [params[n] for n in names]
    rows: list[list[Tensor]] = [[] for _ in part.groups]
    for i in range(s):
        a, kw = _sample(args, kwargs, i)
        y = _per_sample(model(*a, **kw), output, None if mask is None else mask[i : i + 1])[0].reshape(-1)
        for j in range(y.numel()):
            gs = torch.autograd.grad(y[j], ps, retain_graph=True, allow_unused=True)
            full = {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, ps, gs)}
            for gi, grp in enumerate(part.groups):
                rows[gi].append(torch.cat([sl.select(full[sl.param]).reshape(-1) for sl in grp.slices]).to(acc))
    return torch.stack([torch.stack(r) @ torch.stack(r).T for r in rows])


def _self_check(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    s: int,
    part: Partition,
    output: str,
    mask: Tensor | None,
    grams: Tensor,
    n_out: int,
    checked: dict[str, nn.Parameter],
    slices: dict[str, list[tuple[int, ParamSlice]]],
) -> dict[int, float]:
    """:func:`~ntkit.ntk._checks.gram_self_check` of the hook Grams on samples
    :func:`~ntkit.ntk._checks.subset_rows`: one forward + backward of that subset with the
    ``checked`` parameters trainable (the whole batch if the model refuses the subset)."""
    rows = subset_rows(s)
    idx = torch.tensor(rows)
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in checked)
        with torch.enable_grad():
            try:
                a = tuple(x[idx.to(x.device)] if isinstance(x, Tensor) else x for x in args)
                kw = {k: (x[idx.to(x.device)] if isinstance(x, Tensor) else x) for k, x in kwargs.items()}
                y = _per_sample(model(*a, **kw), output, None if mask is None else mask[idx.to(mask.device)])
            except (RuntimeError, ValueError, UnsupportedModelError, ConfigError):
                rows = list(range(s))  # a model tied to its batch size: check the whole batch
                y = _per_sample(model(*args, **kwargs), output, mask)
            ps = list(checked.values())
            gs = torch.autograd.grad(y.sum(), ps, allow_unused=True) if y.requires_grad else [None] * len(ps)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    grads = {n: (None if g is None else g.detach()) for n, g in zip(checked, gs)}
    rtol = check_tolerance(next(iter(checked.values())).dtype)
    return gram_self_check(grams, n_out, rows, grads, {n: slices[n] for n in checked}, rtol)


# --------------------------------------------------------------------------- entry point
def modular_ntk(
    model: nn.Module,
    inputs: Tensor | Sequence[Any] | Mapping[str, Any],
    partition: Partition,
    *,
    output: str = "sum_logits",
    strategy: str | Strategy = "auto",
    output_mask: Tensor | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    self_check: bool = True,
) -> ModularNTK:
    """Per-module NTK Grams of ``model`` on a batch of S samples.

    Args:
        model: a module whose samples are independent (eval-mode BatchNorm, no active dropout,
            eval-mode :class:`~ntkit.models.layers.SwitchFFN`); never switched silently.
        inputs: a Tensor (first dim S), a tuple/list of positional args or a dict of kwargs
            (every tensor with first dim S).
        partition: the modules (groups of parameter slices); whole-dim slices are resolved.
        output: ``"sum_logits"`` — one scalar per sample, the sum of its logits (for outputs
            [S, T, V]: over the vocabulary at positions where ``output_mask`` is True) — Grams
            [M, S, S]; or ``"logits"`` — all k logits per sample, Grams [M, S·k, S·k]
            (sample-major: row i·k + j is sample i, logit j).
        strategy: see :class:`Strategy`.
        output_mask: bool [S, T] for outputs with a token dim; None = all positions. The model
            may instead return *packed* logits [n, k], one row per True entry in row-major order
            (``BertMLM(ids, positions=output_mask)``: the head runs at those positions only —
            for BERT-mini at T = 128 a third less work). Layers after that gather see n rows,
            which hooks map back to their samples (Linear, LayerNorm; others fall back). With
            n == S rows and uneven counts per sample this is ambiguous and refused.
        dtype: accumulation / result dtype (default: the covered parameters' dtype). Pass
            ``torch.float64`` for ill-conditioned kernels.
        chunk_size: vmap chunk size of the functorch strategy (None = all samples at once).
        self_check: after the hook strategy, one forward + backward of 2 samples with the
            hooked parameters trainable checks every group: ``Σ_{i,j∈B} Θ_ij`` must equal
            ``‖∂(Σ_{i∈B} y_i)/∂θ_group‖²`` from autograd (relative 1e-9 in float64, 1e-4
            otherwise); a group that fails is recomputed by torch.func and named in
            ``fallback_layers``. Costs ≈ 2/S of a forward+backward; ``False`` skips it.

    Returns:
        :class:`ModularNTK` with ``grams`` Tensor [M, N, N] of ``dtype``.

    Raises:
        UnsupportedModelError: coupled samples (names the module), or ``strategy="hooks"`` with
            a layer hooks cannot handle.
        ConfigError: bad argument values.
    """
    check(output in _OUTPUTS, "output", output, "one of " + ", ".join(_OUTPUTS))
    try:
        strat = Strategy(strategy)
    except ValueError:
        raise ConfigError(f"strategy={strategy!r}: expected one of {', '.join(s.value for s in Strategy)}") from None
    check(isinstance(partition, Partition) and len(partition) > 0, "partition", type(partition).__name__, "a non-empty Partition")
    check_independent(model, "modular_ntk")
    part = Partition(list(partition.groups)).bind(model)
    args, kwargs, s = _split_inputs(inputs)
    if output_mask is not None:
        check(isinstance(output_mask, Tensor) and output_mask.dtype == torch.bool, "output_mask", type(output_mask).__name__, "a bool Tensor [S, T]")
        check(output_mask.dim() == 2 and output_mask.shape[0] == s, "output_mask shape", tuple(output_mask.shape), f"[S={s}, T]")
    params = dict(model.named_parameters())
    names = part.covered_params()
    acc = dtype or params[names[0]].dtype
    check(acc.is_floating_point, "dtype", dtype, "a floating dtype")
    slices = part.param_slices()
    result = {"names": part.names, "kinds": part.kinds, "layers": part.layers, "output": output}
    device = params[names[0]].device

    if strat is Strategy.BRUTE_FORCE:
        saved = {n: p.requires_grad for n, p in params.items()}
        try:
            for n, p in params.items():
                p.requires_grad_(n in slices)
            with torch.enable_grad():
                grams = _brute_force(model, args, kwargs, s, part, output, output_mask, acc)
        finally:
            for n, p in params.items():
                p.requires_grad_(saved[n])
        return ModularNTK(grams=grams, strategy=strat.value, **result)  # type: ignore[arg-type]

    owners = owners_of(model)
    fallback: dict[str, str] = {}
    hook_params: dict[str, list[Owner]] = {}
    no_rule: dict[str, str] = {}  # parameter → an owner without a layer rule, and why
    if strat is not Strategy.FUNCTORCH:
        # capture by use: a parameter's owners with a layer rule are hooked; every other use of
        # it (in the forward of an owner without a rule, or anywhere else) is seen by the
        # UseTracker and either taken by a per-op rule or sent to torch.func, naming the op
        for n in names:
            os_ = owners[id(params[n])]
            hook_params[n] = [o for o in os_ if o.kind is not None]
            bad = [o for o in os_ if o.kind is None]
            if bad:
                no_rule[n] = f"{bad[0].name}: {bad[0].reason}"
    else:
        fallback = {n: "strategy=functorch" for n in names}

    grams: Tensor | None = None
    flops = 0
    n_out = 1
    redo: dict[str, list[tuple[int, ParamSlice]]] = {}  # slices of groups that failed the self-check
    group_fallback: dict[int, str] = {}
    if hook_params:
        saved = {n: p.requires_grad for n, p in params.items()}
        run: _HookRun | None = None
        handles: list[Any] = []
        try:
            for p in params.values():
                p.requires_grad_(False)
            with torch.enable_grad():
                # size N is only known after the forward for output="logits": allocate lazily
                run = _HookRun(model, s, hook_params, slices, params, torch.empty(0, dtype=acc, device=device),
                               stream=output == "sum_logits", budget=BUDGET)
                if output == "sum_logits":
                    grams = torch.zeros(len(part), s, s, dtype=acc, device=device)
                    run.grams = grams
                run.input_ptrs = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, Tensor)}
                if output_mask is not None:
                    run.packed = _mask_samples(output_mask)
                handles = run.register()
                watch = watch_map(params, {p: [(o.module, o.name) for o in os_] for p, os_ in hook_params.items()},
                                  labels={p: [o.name for o in owners[id(params[p])]] for p in hook_params})
                with UseTracker(watch, run.active, run.capture) as tracker:
                    run.tracker = tracker
                    z = _logits_of(model(*args, **kwargs))
                for pname, why in tracker.found.items():
                    run.fallback.setdefault(pname, f"{why} ({no_rule[pname]})" if pname in no_rule else why)
                _check_packed(run, z, output_mask)
                y = _per_sample(z, output, output_mask)
                n_out = 1 if y.dim() == 1 else y.shape[1]
                if grams is None:
                    grams = torch.zeros(len(part), s * n_out, s * n_out, dtype=acc, device=device)
                    run.grams = grams
                for h in handles:
                    h.remove()
                handles = []
                for pname in hook_params:
                    # no use seen at all: a zero Gram — unless the self-check is off, then
                    # torch.func confirms it (a use the tracker cannot see would be missed)
                    if pname not in run.fallback and pname not in run.fired and not self_check:
                        owner = (hook_params[pname] or owners[id(params[pname])])[0].name
                        run.fallback[pname] = f"{owner}: no use of {pname} seen in the forward (self_check=False)"
                if run.leaf is not None and y.requires_grad:
                    ys = y.reshape(s, -1)
                    for j in range(n_out):
                        run.pass_index = j
                        torch.autograd.grad(ys[:, j].sum(), [run.leaf], retain_graph=j < n_out - 1, allow_unused=True)
                for pname in list(run.calls):
                    if pname not in run.fallback and pname not in run.done:
                        run._process(pname, npass=n_out)
                run.flush()
            flops = run.flops
            fallback.update(run.fallback)
        finally:
            for h in handles:
                h.remove()
            for n, p in params.items():
                p.requires_grad_(saved[n])
            del run
        checked = [n for n in hook_params if n not in fallback]
        if self_check and checked:
            assert grams is not None
            failed = _self_check(model, args, kwargs, s, part, output, output_mask, grams, n_out,
                                 {n: params[n] for n in checked}, slices)
            for gi, err in failed.items():
                grams[gi].zero_()
                reason = f"{part.names[gi]}: self-check failed (relative error {err:.2g} against autograd)"
                for gj, sl in ((gj, sl) for n in checked for gj, sl in slices[n] if gj == gi):
                    redo.setdefault(sl.param, []).append((gj, sl))
                group_fallback[gi] = reason
    if strat is Strategy.HOOKS and (fallback or group_fallback):
        first = next(iter(fallback.values())) if fallback else next(iter(group_fallback.values()))
        raise UnsupportedModelError(f"strategy=hooks: layer {first}; use strategy='auto' to fall back to torch.func")
    todo = {n: slices[n] for n in fallback}
    for n, its in redo.items():
        todo.setdefault(n, its)
    if todo:
        with torch.no_grad():  # torch.func ignores the outer no_grad; this keeps the outer graph away
            pg = _functorch_grads(model, args, kwargs, list(todo), output, output_mask, chunk_size)
        k = next(iter(pg.values())).shape[1] if output == "logits" else 1
        nn_ = s * k
        if grams is None:
            grams = torch.zeros(len(part), nn_, nn_, dtype=acc, device=device)
        for pname, g in pg.items():
            gg = g.reshape(nn_, *params[pname].shape).to(acc)
            chunked_grams(lambda r0, r1, gg=gg: gg[:, r0:r1], gg.shape[1:], nn_, todo[pname], grams, BUDGET)
    assert grams is not None
    if strat is Strategy.FUNCTORCH:
        used = "functorch"
    elif todo:
        used = "hooks+functorch" if hook_params and len(fallback) < len(names) else "functorch"
    else:
        used = "hooks"
    reasons = {*fallback.values(), *group_fallback.values()}
    layers_fb = sorted(reasons) if strat is not Strategy.FUNCTORCH else []
    return ModularNTK(grams=grams, strategy=used, fallback_layers=layers_fb, flops=flops, **result)  # type: ignore[arg-type]
