"""Physical surgery: remove pruned heads / experts / filters, so the model really gets smaller.

The contract with the training loop (see :mod:`ntkit.methods.base`): a method that removes
modules hands the loop a :class:`StructureChange`; the loop rebuilds the sparse controller and
the optimizer (carrying each surviving slice's state over with :func:`carry_optimizer_state`) and
re-binds the method.

* :func:`remove_groups` removes named partition groups. Every slice of a removed group goes (its
  indices are dropped along the slice's dim); then a rule registered for the group's layer module
  (the module named by ``ModuleGroup.layer``) removes what is coupled to it and updates counts:

  - :class:`~ntkit.models.layers.MultiHeadSelfAttention` heads: q/k/v rows of ``qkv`` and the
    columns of ``proj`` (the group's slices); ``num_heads`` decreases (``head_dim`` stays).
  - :class:`~ntkit.models.layers.SwitchFFN` experts: the expert modules leave ``experts`` (later
    experts are renumbered: ``experts.3.*`` may become ``experts.2.*``, see
    :attr:`StructureChange.renamed`), the router loses their rows, ``num_experts`` decreases.
    Tokens then go to the best *remaining* expert: the reduced model equals the masked model whose
    router logits of the removed experts are −∞ — **not** the controller's ``set_pruned`` model,
    whose router still sends tokens to a zeroed expert (their FFN output is dropped).
  - ``nn.Conv2d`` filters: the conv's output channels, its BatchNorm's channels (affine and
    running statistics) and the input channels of the layer(s) that consume them, found by a rule
    registered per model class: :class:`~ntkit.models.VGG16` (the next conv of ``features``, or the
    ``classifier`` after the last one) and :class:`~ntkit.models.ResNet56` (only ``conv1`` of a
    basic block, consumed by its ``conv2``; every other ResNet conv feeds a residual sum, whose
    channels are coupled across a whole stage: see the next item).
  - residual-coupled channels (group kind ``"channel"``, from
    :func:`ntkit.pruning.dependency.coupled_channel_groups`): a rule registered *by group kind*
    (:func:`register_kind_rule`) in :mod:`ntkit.pruning.dependency` removes the channel from every
    layer writing it (dim 0 of conv / BatchNorm weight, bias, running statistics) and every layer
    reading it (dim 1 of the following convs, the classifier's input columns). The coupling comes
    from the rule registered for the model class (the zoo ResNet56), else from torch-pruning's
    dependency graph traced on ``example_input``.
* Group names are stable: the new partition is the old one minus the removed groups, its slices
  re-indexed (not rebuilt by a builder), so a record of removed names stays meaningful for the
  original model and :func:`replay` of every surgery's names reproduces the structure.
* :func:`carry_optimizer_state` moves Adam moments / momentum (and :class:`SlicedAdamW`'s
  per-index ``step`` counts) to the new parameters by ``index_select``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.partition import ModuleGroup, ParamSlice, Partition, param_owners

__all__ = [
    "StructureChange",
    "carry_optimizer_state",
    "register_consumers",
    "register_kind_rule",
    "register_layer_rule",
    "remove_groups",
    "replay",
]


@dataclass
class StructureChange:
    """The result of surgery.

    Attributes:
        model: the model after surgery (usually the same object, its parameters replaced).
        partition: the partition of the new model (removed groups gone, the others re-indexed).
        kept: parameter name (unchanged by surgery) → ``(dim, indices)``: the new parameter is the
            old one's ``index_select(dim, indices)``. Parameters whose shape did not change are
            absent; parameters removed entirely map to ``(dim, empty indices)``.
        removed: names of the partition groups that were removed (JSON-able; replaying the same
            removals on a freshly built model reproduces the structure, e.g. to load a pruned
            checkpoint).
        also_kept: for the few parameters that shrink along a second dim in the same surgery (a
            conv whose filters and input channels both go): ``(dim, indices)`` applied *after*
            ``kept``. Use :meth:`select` to apply both.
        renamed: old parameter name → new name, for surviving parameters whose name changed
            (experts renumbered in their ``ModuleList``). ``kept`` / ``also_kept`` use old names.
        old_param_ids: ``id`` of each parameter object before surgery → its old name (so
            :func:`carry_optimizer_state` can read the old optimizer's state, keyed by object).
    """

    model: nn.Module
    partition: Partition
    kept: dict[str, tuple[int, Tensor]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    also_kept: dict[str, tuple[int, Tensor]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    old_param_ids: dict[int, str] = field(default_factory=dict, repr=False)

    def selections(self, name: str) -> list[tuple[int, Tensor]]:
        """The ``(dim, kept indices)`` selections of old parameter ``name``, in order ([] = unchanged)."""
        return [sel[name] for sel in (self.kept, self.also_kept) if name in sel]

    def select(self, name: str, t: Tensor) -> Tensor:
        """``t`` (shaped like old parameter ``name``) reduced as the parameter was."""
        for dim, idx in self.selections(name):
            t = t.index_select(dim, idx.to(t.device))
        return t


# ======================================================================== the removal plan
class _Plan:
    """What to remove: per parameter / buffer name, per dim, a set of indices."""

    def __init__(self, example_input: object = None) -> None:
        self.params: dict[str, dict[int, set[int]]] = {}
        self.buffers: dict[str, dict[int, set[int]]] = {}
        self.example_input = example_input  # for rules that trace the model (coupled channels)

    def remove(self, name: str, dim: int, indices: Sequence[int] | range, *, buffer: bool = False) -> None:
        table = self.buffers if buffer else self.params
        table.setdefault(name, {}).setdefault(int(dim), set()).update(int(i) for i in indices)


#: a layer rule: (model, layer name, layer module, removed groups of that layer, plan) → callables
#: run after the parameters shrank (attribute updates, module removal).
LayerRule = Callable[[nn.Module, str, nn.Module, list[ModuleGroup], _Plan], list[Callable[[], None]]]
_LAYER_RULES: dict[type, LayerRule] = {}
#: a consumer rule: (model, conv name) → [(parameter name, dim)] reading the conv's output channels.
ConsumerRule = Callable[[nn.Module, str], list[tuple[str, int]]]
_CONSUMERS: dict[type, ConsumerRule] = {}
#: rules keyed by group kind (checked before the layer-module rules): for groups whose ``layer`` is
#: not one module, e.g. a residual-coupled channel set. The rule's ``layer module`` is the module
#: named ``layer`` if there is one, else None.
_KIND_RULES: dict[str, LayerRule] = {}


def register_layer_rule(layer_type: type) -> Callable[[LayerRule], LayerRule]:
    """Register the surgery rule for groups whose layer module is a ``layer_type``."""

    def deco(fn: LayerRule) -> LayerRule:
        _LAYER_RULES[layer_type] = fn
        return fn

    return deco


def register_kind_rule(kind: str) -> Callable[[LayerRule], LayerRule]:
    """Register the surgery rule for groups of ``kind`` (whatever their layer module is)."""

    def deco(fn: LayerRule) -> LayerRule:
        _KIND_RULES[kind] = fn
        return fn

    return deco


def register_consumers(model_type: type) -> Callable[[ConsumerRule], ConsumerRule]:
    """Register how to find, in a ``model_type`` model, the layers that read a conv's channels."""

    def deco(fn: ConsumerRule) -> ConsumerRule:
        _CONSUMERS[model_type] = fn
        return fn

    return deco


def _lookup(table: dict[type, Any], obj: object) -> Any:
    for cls in type(obj).__mro__:
        if cls in table:
            return table[cls]
    return None


def _names_of(module: nn.Module, prefix: str) -> dict[int, str]:
    return {id(p): f"{prefix}.{n}" if prefix else n for n, p in module.named_parameters()}


# ======================================================================== layer rules
def _heads_rule(model: nn.Module, layer: str, m: nn.Module, groups: list[ModuleGroup], plan: _Plan):
    left = m.num_heads - len(groups)
    if left < 1:
        raise ConfigError(f"remove_groups: layer {layer!r} would lose all {m.num_heads} heads; keep >= 1")

    def post() -> None:
        m.num_heads = left

    return [post]


def _experts_rule(model: nn.Module, layer: str, m: nn.Module, groups: list[ModuleGroup], plan: _Plan):
    ids = {id(p): n for n, p in model.named_parameters()}  # the names partitions use
    by_name = {ids[id(p)]: e for e, ex in enumerate(m.experts) for p in ex.parameters()}
    gone: set[int] = set()
    for g in groups:
        es = {by_name.get(s.param) for s in g.slices}
        es.discard(None)
        if len(es) != 1:
            raise UnsupportedModelError(f"remove_groups: group {g.name!r} is not one expert of {layer!r}")
        gone |= es  # type: ignore[arg-type]
    if len(gone) >= len(m.experts):
        raise ConfigError(f"remove_groups: layer {layer!r} would lose all {len(m.experts)} experts; keep >= 1")
    for e in gone:
        for name, p in m.experts[e].named_parameters():
            full = ids[id(p)]
            plan.remove(full, 0, range(p.shape[0]) if p.dim() else [])
    plan.remove(ids[id(m.router.weight)], 0, sorted(gone))
    if m.router.bias is not None:
        plan.remove(ids[id(m.router.bias)], 0, sorted(gone))

    def post() -> None:
        m.experts = nn.ModuleList(ex for e, ex in enumerate(m.experts) if e not in gone)
        m.num_experts = len(m.experts)

    return [post]


def _filters_rule(model: nn.Module, layer: str, m: nn.Module, groups: list[ModuleGroup], plan: _Plan):
    idx: set[int] = set()
    modules = dict(model.named_modules())
    for g in groups:
        for s in g.slices:
            mod_name, _, attr = s.param.rpartition(".")
            sub = modules.get(mod_name)
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                for buf in ("running_mean", "running_var"):
                    plan.remove(f"{mod_name}.{buf}", 0, range(s.start, s.stop), buffer=True)
            if sub is m and attr == "weight":
                idx.update(range(s.start, s.stop))
    if len(idx) >= m.out_channels:
        raise ConfigError(f"remove_groups: conv {layer!r} would lose all {m.out_channels} filters; keep >= 1")
    rule = _lookup(_CONSUMERS, model)
    if rule is None:
        raise UnsupportedModelError(
            f"remove_groups: no consumer rule for {type(model).__name__} (which layers read {layer!r}'s "
            f"channels); register one with ntkit.sparse.surgery.register_consumers"
        )
    for pname, dim in rule(model, layer):
        plan.remove(pname, dim, sorted(idx))
    return []


_ZOO: list[bool] = []


def _register_zoo() -> None:
    """Register the zoo's rules (once, lazily: the core imports no model code at import time)."""
    if _ZOO:
        return
    _ZOO.append(True)
    from ntkit.models import VGG16, ResNet56
    from ntkit.models.layers import MultiHeadSelfAttention, SwitchFFN

    register_layer_rule(MultiHeadSelfAttention)(_heads_rule)
    register_layer_rule(SwitchFFN)(_experts_rule)
    register_layer_rule(nn.Conv2d)(_filters_rule)

    @register_consumers(VGG16)
    def _vgg(model: nn.Module, conv: str) -> list[tuple[str, int]]:
        feats = list(model.features.named_children())  # type: ignore[union-attr]
        pos = [f"features.{n}" for n, _ in feats].index(conv) if conv.startswith("features.") else -1
        if pos < 0:
            raise UnsupportedModelError(f"remove_groups: {conv!r} is not a conv of VGG16.features")
        for n, mod in feats[pos + 1 :]:
            if isinstance(mod, nn.Conv2d):
                return [(f"features.{n}.weight", 1)]
        return [("classifier.weight", 1)]  # global average pool: one classifier input per channel

    @register_consumers(ResNet56)
    def _resnet(model: nn.Module, conv: str) -> list[tuple[str, int]]:
        head, _, last = conv.rpartition(".")
        block = dict(model.named_modules()).get(head)
        from ntkit.models import BasicBlock

        if last != "conv1" or not isinstance(block, BasicBlock):
            raise UnsupportedModelError(
                f"remove_groups: conv {conv!r} feeds a residual sum (channels coupled across the stage); "
                f"only BasicBlock conv1 filters can be removed"
            )
        return [(f"{head}.conv2.weight", 1)]

    import ntkit.pruning.dependency  # noqa: F401  (registers the "channel" kind rule)


# ======================================================================== surgery
def _attached(model: nn.Module) -> bool:
    return any("_ntk_plan" in m.__dict__ for m in model.modules())


def _fix_meta(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.Conv2d):
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        ref = m.weight if m.weight is not None else m.running_mean
        m.num_features = int(ref.shape[0])  # type: ignore[union-attr]


def _keep(size: int, gone: set[int]) -> Tensor:
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def remove_groups(
    model: nn.Module, partition: Partition, names: Sequence[str], *, controller: Any = None,
    example_input: object = None,
) -> StructureChange:
    """Physically remove the partition groups ``names`` from ``model`` (in place).

    Args:
        model: the model (its modules are edited; parameters that shrink are replaced by new
            ``nn.Parameter`` objects, keeping ``requires_grad`` and memory format).
        partition: ``model``'s partition; every name must be one of its groups.
        names: the groups to remove (order and duplicates do not matter).
        controller: the :class:`~ntkit.sparse.SparseController` attached to ``model``, if any; it
            is detached first (attach a new one to the returned model and partition). A model with
            a controller attached and none given raises :class:`ConfigError`.
        example_input: what ``model(...)`` takes; only for ``"channel"`` groups of a model with no
            registered coupling rule (traced once with torch-pruning to find the coupled layers).

    Returns:
        :class:`StructureChange` (``kept`` / ``also_kept`` / ``renamed`` / the re-indexed partition).

    Raises ConfigError (unknown name, a layer left without heads / experts / filters) or
    UnsupportedModelError (a group whose layer has no surgery rule).
    """
    names = list(dict.fromkeys(names))
    known = set(partition.names)
    for n in names:
        if n not in known:
            raise ConfigError(f"remove_groups: name={n!r} is not a group of the partition")
    if controller is not None:
        controller.detach()
    if _attached(model):
        raise ConfigError("remove_groups: controller=None but a SparseController is attached; pass it (or detach())")
    _register_zoo()
    gone = set(names)
    old_ids = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    plan = _Plan(example_input)
    by_layer: dict[str, list[ModuleGroup]] = {}
    for g in partition:
        if g.name in gone:
            by_layer.setdefault(g.layer, []).append(g)
            for s in g.slices:
                plan.remove(s.param, s.dim, range(s.start, s.stop))
    modules = dict(model.named_modules())
    posts: list[Callable[[], None]] = []
    for layer, groups in by_layer.items():
        mod = modules.get(layer)
        kinds = {g.kind for g in groups} & set(_KIND_RULES)
        if len(kinds) > 1 or (kinds and len({g.kind for g in groups}) > 1):
            raise UnsupportedModelError(
                f"remove_groups: layer {layer!r} holds groups of kinds {sorted({g.kind for g in groups})}; "
                f"one kind per layer"
            )
        if kinds:
            rule = _KIND_RULES[kinds.pop()]
        else:
            rule = None if mod is None else _lookup(_LAYER_RULES, mod)
        if rule is None:
            raise UnsupportedModelError(
                f"remove_groups: layer {layer!r} ({type(mod).__name__}) has no surgery rule "
                f"(supported: attention heads, MoE experts, conv filters, coupled channels)"
            )
        posts += rule(model, layer, mod, groups, plan)
    owners = {pid: len(os_) for pid, os_ in param_owners(model).items()}
    kept: dict[str, tuple[int, Tensor]] = {}
    also: dict[str, tuple[int, Tensor]] = {}
    touched: list[nn.Module] = []
    for pname, dims in plan.params.items():
        p = params[pname]
        sels = [(d, _keep(p.shape[d], dims[d])) for d in sorted(dims)]
        kept[pname] = sels[0]
        if len(sels) > 1:
            also[pname] = sels[1]
        if len(sels) > 2:
            raise UnsupportedModelError(f"remove_groups: param={pname!r} would shrink along 3 dims")
        if any(idx.numel() == 0 for _, idx in sels):
            continue  # removed entirely (its module leaves the model in a rule's post step)
        if owners[id(p)] > 1:
            raise UnsupportedModelError(f"remove_groups: param={pname!r} is tied to another module")
        mod_name, _, attr = pname.rpartition(".")
        mod = modules[mod_name]
        data = p.detach()
        for d, idx in sels:
            data = data.index_select(d, idx)
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
            data = data.contiguous(memory_format=torch.channels_last)
        setattr(mod, attr, nn.Parameter(data.clone(), requires_grad=p.requires_grad))
        touched.append(mod)
    buffers = dict(model.named_buffers())
    for bname, dims in plan.buffers.items():
        mod_name, _, attr = bname.rpartition(".")
        b = buffers[bname]
        for d in sorted(dims):
            b = b.index_select(d, _keep(b.shape[d], dims[d]))
        setattr(modules[mod_name], attr, b.clone())
    for mod in touched:
        _fix_meta(mod)
    for post in posts:
        post()
    new_ids = {id(p): n for n, p in model.named_parameters()}
    renamed = {old: new_ids[pid] for pid, old in old_ids.items() if pid in new_ids and new_ids[pid] != old}
    change = StructureChange(model, Partition([]), kept, names, also, renamed, old_ids)
    change.partition = _reindex(partition, gone, change).bind(model)
    return change


def _reindex(partition: Partition, gone: set[str], change: StructureChange) -> Partition:
    groups = []
    for g in partition:
        if g.name in gone:
            continue
        slices = []
        for s in g.slices:
            start, stop = s.start, s.stop
            for d, idx in change.selections(s.param):
                if d != s.dim:
                    continue
                pos = torch.searchsorted(idx, torch.tensor([start, stop - 1]))
                a, b = int(pos[0]), int(pos[1])
                if b - a != stop - 1 - start or b >= idx.numel() or int(idx[b]) != stop - 1:
                    raise UnsupportedModelError(f"remove_groups: group {g.name!r} lost part of {s.param!r}")
                start, stop = a, b + 1
            slices.append(ParamSlice(change.renamed.get(s.param, s.param), s.dim, start, stop))
        groups.append(ModuleGroup(g.name, g.kind, g.layer, tuple(slices)))
    return Partition(groups)


def replay(
    model: nn.Module, partition: Partition, removed: Sequence[str] | Sequence[Sequence[str]], *,
    example_input: object = None,
) -> StructureChange:
    """Reproduce recorded surgery on a freshly built ``model`` (+ its original ``partition``), e.g.
    before ``load_state_dict`` of a pruned checkpoint.

    ``removed``: the group names of one surgery, or one list per surgery (``StructureChange.removed``
    of each, in order). Group names are stable across surgeries, so all rounds are applied at once.
    ``example_input``: as in :func:`remove_groups`.
    """
    flat: list[str] = []
    for item in removed:
        flat += [item] if isinstance(item, str) else list(item)
    dup = {n for n in flat if flat.count(n) > 1}
    if dup:
        raise ConfigError(f"replay: removed={sorted(dup)!r}: each group can be removed once")
    return remove_groups(model, partition, flat, example_input=example_input)


# ======================================================================== optimizer state
def carry_optimizer_state(old_optimizer: torch.optim.Optimizer, new_optimizer: torch.optim.Optimizer,
                          change: StructureChange) -> None:
    """Move the old optimizer's per-parameter state onto the new optimizer's parameters.

    The new optimizer must optimise ``change.model``'s parameters (built after surgery). Each
    state tensor shaped like its old parameter (Adam ``exp_avg`` / ``exp_avg_sq``, SGD
    ``momentum_buffer``) gets the parameter's selections (:meth:`StructureChange.select`);
    :class:`~ntkit.sparse.SlicedAdamW`'s per-index ``step`` (float32 [size along the sliced dim])
    gets the selection along that dim only; scalars (torch AdamW's ``step``) and parameters not
    in ``kept`` carry unchanged. Param-group options (``lr``, …) are copied when both optimizers
    have the same number of param groups. The old optimizer is flushed first (SlicedAdamW keeps
    gathered moments) and is not modified otherwise.
    """
    flush = getattr(old_optimizer, "flush", None)
    if flush is not None:
        flush()
    ctl = getattr(old_optimizer, "ctl", None)
    sliced_dim = {n: sl.dim for n, sl in ctl.slicings.items()} if ctl is not None else {}
    old_by_name: dict[str, tuple[Tensor, dict]] = {}
    for p, st in old_optimizer.state.items():
        name = change.old_param_ids.get(id(p))
        if name is not None and st:
            old_by_name[name] = (p, st)
    inverse = {new: old for old, new in change.renamed.items()}
    new_names = {id(p): n for n, p in change.model.named_parameters()}
    for group in new_optimizer.param_groups:
        for p in group["params"]:
            name = new_names.get(id(p))
            if name is None:
                continue
            old = inverse.get(name, name)
            if old not in old_by_name:
                continue
            p_old, st = old_by_name[old]
            sels = change.selections(old)
            out: dict[str, Any] = {}
            for key, v in st.items():
                if isinstance(v, Tensor) and sels and v.shape == p_old.shape:
                    v = change.select(old, v)
                elif isinstance(v, Tensor) and sels and key == "step" and v.dim() == 1 and old in sliced_dim:
                    for d, idx in sels:
                        if d == sliced_dim[old]:
                            v = v.index_select(0, idx.to(v.device))
                out[key] = v.clone() if isinstance(v, Tensor) else v
            new_optimizer.state[p] = out
    if len(old_optimizer.param_groups) == len(new_optimizer.param_groups):
        for g_old, g_new in zip(old_optimizer.param_groups, new_optimizer.param_groups):
            g_new.update({k: v for k, v in g_old.items() if k != "params"})
