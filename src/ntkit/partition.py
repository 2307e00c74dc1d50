"""How a model divides into modules.

A :class:`Partition` is an ordered list of named :class:`ModuleGroup` s (attention heads, MoE
experts, conv filters, neurons, whole layers). Each group is a set of :class:`ParamSlice` s: a
contiguous range ``[start, stop)`` along one dimension of one parameter (named as in
``model.named_parameters()``). Group ``kind`` (e.g. ``"head"``, ``"expert"``, ``"filter"``) lets
methods decide per kind; ``layer`` names the layer the group belongs to (e.g. the attention
module), which the protecting strategies use ("keep ≥ 1 module per layer").

Parameters not covered by any group are "shared": methods train them normally.

Rules (checked by :meth:`Partition.validate`): every parameter named exists; slices lie inside
their parameter; all slices of one parameter use the same dimension and are pairwise disjoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError
from ntkit.structure import structure_of

__all__ = [
    "ModuleGroup",
    "ParamOwner",
    "ParamSlice",
    "Partition",
    "attention_heads",
    "auto",
    "conv_filters",
    "layers",
    "linear_neurons",
    "moe_experts",
    "param_owners",
]


@dataclass(frozen=True)
class ParamSlice:
    """Elements ``[start, stop)`` along dimension ``dim`` of parameter ``param``."""

    param: str
    dim: int
    start: int
    stop: int

    def select(self, t: Tensor) -> Tensor:
        """The view of ``t`` (shaped like the parameter) that this slice covers."""
        return t.narrow(self.dim, self.start, self.stop - self.start)

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ModuleGroup:
    """One module: ``name`` (unique), ``kind`` (head/expert/filter/neuron/layer/…), the ``layer``
    it belongs to, and its parameter slices."""

    name: str
    kind: str
    layer: str
    slices: tuple[ParamSlice, ...]

    def numel(self, params: Mapping[str, Tensor]) -> int:
        total = 0
        for s in self.slices:
            shape = list(params[s.param].shape)
            shape[s.dim] = s.size
            total += int(torch.Size(shape).numel())
        return total


def _runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted unique indices → list of contiguous [start, stop) runs."""
    idx = sorted({int(i) for i in indices})
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


@dataclass
class Partition:
    """Ordered named module groups. ``len(partition)`` = M, the number of modules."""

    groups: list[ModuleGroup] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for g in self.groups:
            if g.name in seen:
                raise ConfigError(f"partition group name={g.name!r}: duplicate")
            seen.add(g.name)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_slices(
        cls,
        spec: Mapping[str, Sequence[tuple[str, int, object]]],
        *,
        kind: str | Mapping[str, str] = "module",
        layer: str | Mapping[str, str] | None = None,
    ) -> Partition:
        """Build from ``{group_name: [(param_name, dim, indices), ...]}``.

        ``indices`` is ``None`` (the whole dimension; the size is resolved by
        :meth:`validate`-time checks, so prefer explicit indices), an int, a ``range``, a
        ``slice`` with explicit start/stop, or any iterable of ints (split into contiguous runs).
        ``kind`` / ``layer`` are one value for all groups or a mapping per group name
        (default layer: the group name).
        """
        groups = []
        for name, entries in spec.items():
            slices = []
            for entry in entries:
                if len(entry) != 3:
                    raise ConfigError(f"partition slice={entry!r}: expected (param_name, dim, indices)")
                pname, dim, ind = entry
                if isinstance(ind, slice):
                    if ind.start is None or ind.stop is None or ind.step not in (None, 1):
                        raise ConfigError(f"partition slice indices={ind!r}: need explicit start:stop, step 1")
                    runs = [(ind.start, ind.stop)]
                elif isinstance(ind, int):
                    runs = [(ind, ind + 1)]
                elif ind is None:
                    runs = [(0, -1)]  # whole dimension, resolved in bind()
                else:
                    runs = _runs(ind)  # type: ignore[arg-type]
                slices += [ParamSlice(pname, int(dim), a, b) for a, b in runs]
            k = kind if isinstance(kind, str) else kind[name]
            lay = name if layer is None else (layer if isinstance(layer, str) else layer[name])
            groups.append(ModuleGroup(name, k, lay, tuple(slices)))
        return cls(groups)

    def bind(self, model: nn.Module) -> Partition:
        """Resolve whole-dimension slices against ``model`` and :meth:`validate`; returns self."""
        params = dict(model.named_parameters())
        for gi, g in enumerate(self.groups):
            if any(s.stop == -1 for s in g.slices):
                fixed = []
                for s in g.slices:
                    if s.stop == -1:
                        if s.param not in params:
                            raise ConfigError(f"partition group {g.name!r}: param={s.param!r} not in model")
                        s = ParamSlice(s.param, s.dim, 0, params[s.param].shape[s.dim])
                    fixed.append(s)
                self.groups[gi] = ModuleGroup(g.name, g.kind, g.layer, tuple(fixed))
        self.validate(model)
        return self

    def validate(self, model: nn.Module) -> None:
        """Raise :class:`ConfigError` naming the group/parameter on any rule violation."""
        params = dict(model.named_parameters())
        by_param: dict[str, list[tuple[ParamSlice, str]]] = {}
        for g in self.groups:
            if not g.slices:
                raise ConfigError(f"partition group {g.name!r}: has no parameter slices")
            for s in g.slices:
                if s.param not in params:
                    raise ConfigError(f"partition group {g.name!r}: param={s.param!r} not in model")
                p = params[s.param]
                if not 0 <= s.dim < p.dim():
                    raise ConfigError(f"partition group {g.name!r}: dim={s.dim} out of range for {s.param} {tuple(p.shape)}")
                if not 0 <= s.start < s.stop <= p.shape[s.dim]:
                    raise ConfigError(
                        f"partition group {g.name!r}: slice [{s.start}, {s.stop}) outside {s.param} "
                        f"dim {s.dim} of size {p.shape[s.dim]}"
                    )
                by_param.setdefault(s.param, []).append((s, g.name))
        for pname, items in by_param.items():
            dims = {s.dim for s, _ in items}
            if len(dims) > 1:
                raise ConfigError(f"partition param={pname!r}: sliced along several dims {sorted(dims)}")
            items = sorted(items, key=lambda it: it[0].start)
            for (a, ga), (b, gb) in itertools.pairwise(items):
                if b.start < a.stop:
                    raise ConfigError(
                        f"partition param={pname!r}: groups {ga!r} and {gb!r} overlap on [{b.start}, {min(a.stop, b.stop)})"
                    )

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def __getitem__(self, i: int) -> ModuleGroup:
        return self.groups[i]

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def kinds(self) -> list[str]:
        return [g.kind for g in self.groups]

    @property
    def layers(self) -> list[str]:
        return [g.layer for g in self.groups]

    def kind_mask(self, kind: str | Iterable[str] | None) -> Tensor:
        """bool [M] (CPU): True for the groups of ``kind`` (one kind, or any of several kinds);
        ``None`` selects every group."""
        if kind is None:
            return torch.ones(len(self.groups), dtype=torch.bool)
        kinds = {kind} if isinstance(kind, str) else set(kind)
        return torch.tensor([g.kind in kinds for g in self.groups], dtype=torch.bool)

    def indices(self, kind: str | None = None) -> list[int]:
        """Indices of the groups of ``kind`` (all groups when None)."""
        return [i for i, g in enumerate(self.groups) if kind is None or g.kind == kind]

    def groups_by_layer(self, kind: str | None = None) -> dict[str, list[int]]:
        """``{layer: [group indices]}`` in first-seen order, for the groups of ``kind`` (all when
        None) — what per-layer rules such as "keep ≥ 1 module per layer" iterate over."""
        out: dict[str, list[int]] = {}
        for i in self.indices(kind):
            out.setdefault(self.groups[i].layer, []).append(i)
        return out

    def subset(self, indices: Sequence[int]) -> Partition:
        return Partition([self.groups[i] for i in indices])

    def covered_params(self) -> list[str]:
        """Names of the parameters that some group slices (in first-seen order)."""
        out: dict[str, None] = {}
        for g in self.groups:
            for s in g.slices:
                out.setdefault(s.param, None)
        return list(out)

    def param_slices(self) -> dict[str, list[tuple[int, ParamSlice]]]:
        """``{param_name: [(group_index, slice), ...]}`` sorted by slice start."""
        out: dict[str, list[tuple[int, ParamSlice]]] = {}
        for gi, g in enumerate(self.groups):
            for s in g.slices:
                out.setdefault(s.param, []).append((gi, s))
        for v in out.values():
            v.sort(key=lambda it: it[1].start)
        return out

    def group_index(self, model: nn.Module) -> dict[str, tuple[int, Tensor]]:
        """``{param_name: (dim, owner)}`` for every covered parameter: the sliced dimension and
        ``owner`` int64 [size of that dim] (CPU), the index of the group owning each position, −1
        where no group owns it (shared)."""
        params = dict(model.named_parameters())
        out: dict[str, tuple[int, Tensor]] = {}
        for pname, items in self.param_slices().items():
            dim = items[0][1].dim
            owner = [-1] * params[pname].shape[dim]  # list slicing: ~100× cheaper than tensor setitem
            for gi, s in items:
                owner[s.start : s.stop] = [gi] * (s.stop - s.start)
            out[pname] = (dim, torch.tensor(owner, dtype=torch.long))
        return out

    def element_masks(self, model: nn.Module, active: Tensor | Sequence[bool]) -> dict[str, Tensor]:
        """Boolean masks (shaped like each covered parameter, on its device): True where the
        element belongs to an active group. Elements of a covered parameter that no group owns
        are True (they are shared, trained normally)."""
        act = torch.as_tensor(active, dtype=torch.bool).tolist()
        if len(act) != len(self):
            raise ConfigError(f"active has {len(act)} entries: expected {len(self)} (one per module)")
        params = dict(model.named_parameters())
        masks: dict[str, Tensor] = {}
        for pname, items in self.param_slices().items():
            p = params[pname]
            m = torch.ones(p.shape, dtype=torch.bool, device=p.device)
            for gi, s in items:
                if not act[gi]:
                    s.select(m).fill_(False)
            masks[pname] = m
        return masks


# ===================================================================== partition builders
#
# Each builder walks ``model.named_modules()`` (shared modules are visited once) and names every
# parameter as ``model.named_parameters()`` does (a parameter shared by several modules, e.g. a
# tied MLM decoder, keeps the first name). Group names are ``<module>.<kind><index>``; ``layer``
# is the qualified name of the module the group lives in ("<root>" for the model itself).
# Every builder returns a bound, validated Partition, and raises UnsupportedModelError (one line)
# when the model has nothing of the requested kind.

_ROOT = "<root>"


class ParamOwner(NamedTuple):
    """A module that registers a parameter directly: ``getattr(module, attr) is parameter``."""

    name: str  # qualified module name as in ``named_modules()`` ("" for the model itself)
    module: nn.Module
    attr: str


def param_owners(model: nn.Module) -> dict[int, list[ParamOwner]]:
    """``id(parameter)`` → every module registering it directly, in ``named_modules()`` order
    (tied / shared weights: several; a module registered under several names appears once,
    under its first name)."""
    out: dict[int, list[ParamOwner]] = {}
    for mname, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append(ParamOwner(mname, m, attr))
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) → its name in ``model.named_parameters()`` (first name of shared ones)."""
    return {id(p): n for n, p in model.named_parameters()}


def _whole(name: str, p: Tensor) -> ParamSlice:
    return ParamSlice(name, 0, 0, int(p.shape[0]))


def _qual(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def _layer_name(mname: str) -> str:
    return mname or _ROOT


@dataclass
class _SeparateQKV:
    """An attention module with separate Q/K/V Linears (HF layouts), as found by
    :func:`_separate_qkv`."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear | None  # output projection (columns by head), None when not found
    num_heads: int
    head_dim: int


def _num_heads(m: nn.Module) -> int | None:
    cfg = getattr(m, "config", None)
    for obj, attr in ((m, "num_attention_heads"), (m, "num_heads"), (cfg, "num_attention_heads")):
        val = getattr(obj, attr, None)
        if isinstance(val, int) and val >= 1:
            return val
    return None


def _separate_qkv(model: nn.Module, mname: str, m: nn.Module) -> _SeparateQKV | None:
    """Recognise HF-style attention with separate projections:

    * BERT family (``BertSelfAttention``, RoBERTa, transformers-4 ViT): ``query``/``key``/``value``
      and the output projection in the sibling ``<parent>.output.dense``;
    * ``q_proj``/``k_proj``/``v_proj`` with ``o_proj`` or ``out_proj`` on the module itself
      (Llama, BART, transformers-5 ViT, …).

    Heads: ``num_attention_heads``, ``num_heads`` or ``config.num_attention_heads``; head size:
    ``attention_head_size``, ``head_dim`` or q.out_features / heads.
    """
    names = ("query", "key", "value") if hasattr(m, "query") else ("q_proj", "k_proj", "v_proj")
    lins = [getattr(m, a, None) for a in names]
    if not all(isinstance(lin, nn.Linear) for lin in lins):
        return None
    q, k, v = lins  # type: ignore[misc]
    n_heads = _num_heads(m)
    if n_heads is None:
        return None
    dh = getattr(m, "attention_head_size", None) or getattr(m, "head_dim", None) or q.out_features // n_heads
    dh = int(dh)
    if dh < 1 or q.out_features != n_heads * dh:
        return None
    out = None
    for attr in ("o_proj", "out_proj"):
        cand = getattr(m, attr, None)
        if isinstance(cand, nn.Linear):
            out = cand
            break
    if out is None and mname:
        parent = mname.rsplit(".", 1)[0] if "." in mname else ""
        try:
            cand = model.get_submodule(_qual(parent, "output.dense"))
        except AttributeError:
            cand = None
        if isinstance(cand, nn.Linear):
            out = cand
    if out is not None and out.in_features != n_heads * dh:
        out = None
    return _SeparateQKV(q, k, v, out, n_heads, dh)  # type: ignore[arg-type]


def _declared_heads(model: nn.Module, mname: str, m: nn.Module, fn) -> list[ModuleGroup]:
    names = _param_names(model)
    layer = _layer_name(mname)
    groups = []
    for h, slices in enumerate(fn(m)):
        ps = tuple(ParamSlice(names[id(sl.param)], sl.dim, sl.start, sl.stop) for sl in slices if sl.param is not None)
        groups.append(ModuleGroup(_qual(mname, f"head{h}"), "head", layer, ps))
    return groups


def _head_groups(model: nn.Module) -> list[ModuleGroup]:
    names = _param_names(model)
    groups: list[ModuleGroup] = []
    for mname, m in model.named_modules():
        layer = _layer_name(mname)
        st = structure_of(m)
        if st is not None and st.heads is not None:  # declared (the zoo's fused QKV, HF GPT-2, …)
            groups += _declared_heads(model, mname, m, st.heads)
            continue
        att = _separate_qkv(model, mname, m)
        if att is None:
            continue
        # K/V rows are per head only without grouped-query sharing; with fewer K/V heads (GQA /
        # MQA) they serve several query heads and stay shared.
        per_head = [att.q]
        if att.k.out_features == att.q.out_features and att.v.out_features == att.q.out_features:
            per_head += [att.k, att.v]
        for h in range(att.num_heads):
            a, b = h * att.head_dim, (h + 1) * att.head_dim
            slices = []
            for lin in per_head:
                slices.append(ParamSlice(names[id(lin.weight)], 0, a, b))
                if lin.bias is not None:
                    slices.append(ParamSlice(names[id(lin.bias)], 0, a, b))
            if att.out is not None:
                slices.append(ParamSlice(names[id(att.out.weight)], 1, a, b))
            groups.append(ModuleGroup(_qual(mname, f"head{h}"), "head", layer, tuple(slices)))
    return groups


def _expert_groups(model: nn.Module) -> list[ModuleGroup]:
    names = _param_names(model)
    groups: list[ModuleGroup] = []
    for mname, m in model.named_modules():
        st = structure_of(m)
        if st is not None and st.experts is not None:
            for e, expert in enumerate(st.experts(m)):
                slices = tuple(_whole(names[id(p)], p) for p in expert.parameters() if p.dim() > 0)
                groups.append(ModuleGroup(_qual(mname, f"expert{e}"), "expert", _layer_name(mname), slices))
    return groups


def _bn_by_structure(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Conv name → the BatchNorm2d that consumes its output, by module structure:

    1. the conv's next sibling in an ``nn.Sequential`` (VGG features, ResNet shortcut /
       torchvision ``downsample``);
    2. else a sibling attribute named like the conv with ``conv`` → ``bn`` (``conv1`` → ``bn1``,
       ``conv`` → ``bn``; ResNet basic/bottleneck blocks and stems).
    A candidate must have ``num_features == out_channels``; a BN claimed by an earlier conv is
    not given to a second one.
    """
    out: dict[str, nn.BatchNorm2d] = {}
    claimed: set[int] = set()
    for pname, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (cname, child) in enumerate(children):
            if not isinstance(child, nn.Conv2d):
                continue
            cand: nn.Module | None = None
            if isinstance(parent, nn.Sequential) and i + 1 < len(children):
                cand = children[i + 1][1]
            elif "conv" in cname:
                cand = getattr(parent, cname.replace("conv", "bn"), None)
            if (
                isinstance(cand, nn.BatchNorm2d)
                and cand.num_features == child.out_channels
                and id(cand) not in claimed
            ):
                claimed.add(id(cand))
                out.setdefault(_qual(pname, cname), cand)
    return out


def _bn_by_tracing(model: nn.Module, example_input: object) -> dict[str, nn.BatchNorm2d]:
    """Conv name → the BatchNorm2d whose input *is* that conv's output tensor, found by running
    ``model(example_input)`` once in eval mode under ``no_grad`` (running stats untouched)."""
    conv_of_output: dict[int, str] = {}
    keep: list[Tensor] = []  # hold outputs so their ids stay unique during the forward
    found: dict[str, nn.BatchNorm2d] = {}
    handles = []
    modules = dict(model.named_modules())

    def conv_hook(name: str):
        def hook(_m: nn.Module, _inp: object, out: Tensor) -> None:
            keep.append(out)
            conv_of_output[id(out)] = name

        return hook

    def bn_hook(bn: nn.BatchNorm2d):
        def hook(_m: nn.Module, inp: tuple[Tensor, ...]) -> None:
            name = conv_of_output.get(id(inp[0]))
            if name is not None and bn.num_features == inp[0].shape[1]:
                found.setdefault(name, bn)

        return hook

    for name, m in modules.items():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook(m)))
    modes = {name: m.training for name, m in modules.items()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        for name, m in modules.items():
            m.training = modes[name]
    return found


def _filter_groups(model: nn.Module, example_input: object = None) -> list[ModuleGroup]:
    names = _param_names(model)
    bns = _bn_by_structure(model) if example_input is None else _bn_by_tracing(model, example_input)
    groups: list[ModuleGroup] = []
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        layer = _layer_name(mname)
        w = names[id(m.weight)]
        b = names[id(m.bias)] if m.bias is not None else None
        bn = bns.get(mname)
        bn_params = [] if bn is None or not bn.affine else [names[id(bn.weight)], names[id(bn.bias)]]
        for c in range(m.out_channels):
            slices = [ParamSlice(w, 0, c, c + 1)]
            if b is not None:
                slices.append(ParamSlice(b, 0, c, c + 1))
            slices += [ParamSlice(p, 0, c, c + 1) for p in bn_params]
            groups.append(ModuleGroup(_qual(mname, f"filter{c}"), "filter", layer, tuple(slices)))
    return groups


def _neuron_groups(model: nn.Module) -> list[ModuleGroup]:
    names = _param_names(model)
    owners = param_owners(model)
    groups: list[ModuleGroup] = []
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Linear) or len(owners[id(m.weight)]) > 1:
            continue
        w = names[id(m.weight)]
        b = names[id(m.bias)] if m.bias is not None and len(owners[id(m.bias)]) == 1 else None
        layer = _layer_name(mname)
        for r in range(m.out_features):
            slices = [ParamSlice(w, 0, r, r + 1)]
            if b is not None:
                slices.append(ParamSlice(b, 0, r, r + 1))
            groups.append(ModuleGroup(_qual(mname, f"neuron{r}"), "neuron", layer, tuple(slices)))
    return groups


def _finish(model: nn.Module, groups: list[ModuleGroup], what: str) -> Partition:
    if not groups:
        from ntkit.errors import UnsupportedModelError

        raise UnsupportedModelError(f"model {type(model).__name__}: has no {what} to partition")
    return Partition(groups).bind(model)


def attention_heads(model: nn.Module) -> Partition:
    """One group per attention head (kind ``"head"``, layer = the attention module's name).

    * :class:`ntkit.models.layers.MultiHeadSelfAttention` (fused QKV): head h of H (head_dim dh,
      block size B = qkv.out_features / 3) owns ``qkv.weight`` / ``qkv.bias`` rows
      ``[j·B + h·dh, j·B + (h+1)·dh)`` for j = 0, 1, 2 (its q, k and v rows) and ``proj.weight``
      columns ``[h·dh, (h+1)·dh)``. ``proj.bias`` is shared by all heads and left out.
    * HF-style attention with separate projections — ``query``/``key``/``value`` (BERT family;
      output projection = the sibling ``<parent>.output.dense``) or ``q_proj``/``k_proj``/
      ``v_proj`` with ``o_proj``/``out_proj`` (Llama, BART, transformers-5 ViT), with the head
      count in ``num_attention_heads``, ``num_heads`` or ``config.num_attention_heads``: rows
      ``[h·dh, (h+1)·dh)`` of each projection's weight and bias and the same columns of the output
      projection (when found and of H·dh inputs; its bias is shared). With grouped-query / multi-
      query attention (fewer K/V rows than Q rows) K and V serve several heads and stay shared:
      a head is then its Q rows and output columns.

    * any layer whose class declares ``heads`` (:func:`ntkit.structure.declare`): HF GPT-2's
      fused ``c_attn`` Conv1D (head h: its q, k, v columns and ``c_attn.bias`` entries, rows
      ``[h·dh, (h+1)·dh)`` of ``c_proj.weight``), timm's ViT ``Attention`` (fused ``qkv``
      Linear: head h's q, k, v rows of ``qkv.weight`` / ``qkv.bias``, columns
      ``[h·dh, (h+1)·dh)`` of ``proj.weight``) and your own layers.

    Raises UnsupportedModelError when the model has no such modules.
    """
    return _finish(model, _head_groups(model), "attention heads")


def moe_experts(model: nn.Module) -> Partition:
    """One group per expert of every layer that declares ``experts``
    (:func:`ntkit.structure.declare`; e.g. :class:`ntkit.models.layers.SwitchFFN`), kind
    ``"expert"``, layer = the MoE layer's name: every parameter of the expert, as whole tensors.
    The router is shared (not covered)."""
    return _finish(model, _expert_groups(model), "MoE experts")


def conv_filters(model: nn.Module, example_input: object = None) -> Partition:
    """One group per Conv2d output channel (kind ``"filter"``, layer = the conv's name): the
    conv weight's row (dim 0), the conv bias entry if any, and — when a BatchNorm2d consumes the
    conv's output — that BN's weight and bias at the channel (its running stats are buffers).

    Which BN consumes a conv: without ``example_input``, by structure (the next module in an
    ``nn.Sequential``; else the sibling named like the conv with ``conv`` → ``bn``, e.g.
    ``conv1`` → ``bn1``; the channel counts must match). With ``example_input`` (what
    ``model(...)`` takes; a tuple/list is unpacked as positional, a mapping as keyword
    arguments), by tracing one eval-mode, no-grad forward:
    the BN whose input tensor *is* the conv's output — robust to any module layout. No BN found:
    the conv alone. Grouped/depthwise convs work (a filter is still one output channel).
    """
    return _finish(model, _filter_groups(model, example_input), "Conv2d filters")


def linear_neurons(model: nn.Module) -> Partition:
    """One group per ``nn.Linear`` output unit (kind ``"neuron"``, layer = the Linear's name):
    weight row r and bias entry r. Linears whose weight is registered by another module too
    (e.g. an MLM decoder tied to the token embedding) are skipped: their rows are also
    embedding rows, used twice, and slicing them per neuron would mix two roles."""
    return _finish(model, _neuron_groups(model), "nn.Linear layers")


def layers(model: nn.Module) -> Partition:
    """One group per module that registers parameters directly (kind ``"layer"``): its
    parameters as whole tensors. A shared parameter belongs to the module whose name
    ``named_parameters`` reports (the first owner). Together the groups cover every parameter
    with ≥ 1 dimension, so Σ over groups of the mNTK is the full NTK. Group and layer names are
    the module names (``"<root>"`` for parameters of the model itself, e.g. a ViT class token)."""
    names = _param_names(model)
    groups: list[ModuleGroup] = []
    for mname, m in model.named_modules():
        slices = tuple(
            _whole(names[id(p)], p)
            for local, p in m.named_parameters(recurse=False)
            if p.dim() > 0 and names.get(id(p)) == _qual(mname, local)
        )
        if slices:
            lay = _layer_name(mname)
            groups.append(ModuleGroup(lay, "layer", lay, slices))
    return _finish(model, groups, "parameters")


def auto(model: nn.Module) -> Partition:
    """The natural modules of ``model``: attention heads (+ MoE experts) for Transformers, conv
    filters for conv nets (no attention), Linear neurons for MLPs. Raises UnsupportedModelError
    when none applies."""
    groups = _head_groups(model) + _expert_groups(model)
    if groups:
        return _finish(model, groups, "modules")
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return conv_filters(model)
    return linear_neurons(model)

