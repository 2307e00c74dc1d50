"""Residual-coupled channels: which layers write and read the same channel, and one partition group
per such channel.

In a ResNet, a stage's channels are *produced* by several layers at once — the stem conv (or the
stage's first 1×1 shortcut conv) and every block's ``conv2``, each followed by its BatchNorm — and
added together by the residual sums; they are *consumed* by every block's ``conv1``, the next
stage's first ``conv1`` and shortcut, and the classifier. Channel c of such a **coupling set** can
only go as a whole: from every producer (dim 0) and every consumer (dim 1).

* :func:`coupling_sets` finds the sets; :func:`coupled_channel_groups` turns them into a
  :class:`~ntkit.partition.Partition` with one group per coupled channel (kind ``"channel"``, layer
  = the set's name, group ``"<set>.channel<c>"``), whose slices are the producers' parameter slices
  along dim 0 (conv weight and bias, BatchNorm weight and bias) — masking a group
  (``SparseController.set_pruned``) zeroes that channel wherever it is written, so every residual
  sum carries an exact zero there.
* :func:`~ntkit.sparse.surgery.remove_groups` removes such groups through the ``"channel"`` kind
  rule registered here: producers lose the channel along dim 0 (BatchNorm running statistics
  too), consumers along dim 1 (convs' input channels, the Linear's input columns), and the layers'
  ``out_channels`` / ``in_channels`` / ``num_features`` / ``in_features`` follow.

Two backends find the sets (:data:`Backend`):

* ``"zoo"``: an explicit rule registered per model class (:func:`register_coupling`); the zoo's
  :class:`~ntkit.models.ResNet56` (built from :class:`~ntkit.models.BasicBlock` s) has one. Needs
  nothing extra, and surgery needs no example input.
* ``"torch_pruning"``: the dependency graph of the optional ``torch-pruning`` package
  (``pip install 'ntkit[prune]'``), traced from one forward of ``example_input`` — any model of
  Conv2d / Linear / BatchNorm layers whose coupling maps channel c to channel c (residual sums,
  pooling, activations). Index-remapping couplings (concatenation, flatten into a Linear) are
  refused with :class:`~ntkit.errors.UnsupportedModelError`.

A set is "coupled" when at least two weight layers (Conv2d / Linear) write it; channels written by
one conv alone (a ResNet block's ``conv1``, every VGG conv) are the ``"filter"`` groups of
:func:`ntkit.partition.conv_filters` (``include_filters=True`` appends them).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ntkit.errors import ConfigError, UnsupportedModelError, check
from ntkit.partition import ModuleGroup, ParamSlice, Partition, conv_filters

__all__ = ["Backend", "CouplingSet", "coupled_channel_groups", "coupling_sets", "register_coupling"]

#: how to find coupling sets: ``"auto"`` (torch-pruning when installed, else a registered zoo
#: rule), ``"torch_pruning"`` (the traced dependency graph; needs the ``prune`` extra and an example
#: input) or ``"zoo"`` (the rule registered for the model's class; no extra, no input).
Backend = Literal["auto", "torch_pruning", "zoo"]
_BACKENDS = ("auto", "torch_pruning", "zoo")

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class CouplingSet:
    """Layers sharing one channel space (channel c of each producer output is channel c of each
    consumer input).

    Attributes:
        name: the set's name — the longest common module prefix of its producing weight layers, or
            else the top-level module holding most of them (``"layer2"``; ``"layer1"`` for a
            ResNet's first stage, whose stem conv sits at the top).
        channels: the number of channels (C).
        producers: module names writing the channels along their dim 0 (Conv2d / Linear / BatchNorm),
            in ``named_modules()`` order.
        consumers: module names reading them as input channels along dim 1 (Conv2d / Linear), in
            ``named_modules()`` order.
    """

    name: str
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]


# ======================================================================== zoo rules
#: a coupling rule: model → [(producers, consumers)] per coupled channel space (module names).
CouplingRule = Callable[[nn.Module], list[tuple[list[str], list[str]]]]
_RULES: dict[type, CouplingRule] = {}
_ZOO: list[bool] = []


def register_coupling(model_type: type) -> Callable[[CouplingRule], CouplingRule]:
    """Register the explicit coupling rule (backend ``"zoo"``) for ``model_type`` models: a function
    ``model → [(producer module names, consumer module names)]``, one pair per channel space."""

    def deco(fn: CouplingRule) -> CouplingRule:
        _RULES[model_type] = fn
        return fn

    return deco


def _rule_for(model: nn.Module) -> CouplingRule | None:
    _register_zoo()
    for cls in type(model).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def _basic_block(block: nn.Module, prefix: str, cur: tuple[list[str], list[str]],
                 spaces: list[tuple[list[str], list[str]]]) -> tuple[list[str], list[str]]:
    """Thread the running channel space ``cur`` through a :class:`~ntkit.models.BasicBlock`:
    ``conv1`` (and a conv shortcut) read it; a conv shortcut closes it and opens the block's output
    space (written by ``shortcut.0/1``); ``conv2`` / ``bn2`` write the output space."""
    cur[1].append(f"{prefix}.conv1")
    if isinstance(block.shortcut, nn.Sequential):
        cur[1].append(f"{prefix}.shortcut.0")
        spaces.append(cur)
        cur = ([f"{prefix}.shortcut.0", f"{prefix}.shortcut.1"], [])
    cur[0].extend([f"{prefix}.conv2", f"{prefix}.bn2"])
    return cur


def _register_zoo() -> None:
    if _ZOO:
        return
    _ZOO.append(True)
    from ntkit.models import BasicBlock, ResNet56

    @register_coupling(ResNet56)
    def _resnet(model: nn.Module) -> list[tuple[list[str], list[str]]]:
        spaces: list[tuple[list[str], list[str]]] = []
        cur: tuple[list[str], list[str]] = (["conv1", "bn1"], [])
        for stage in ("layer1", "layer2", "layer3"):
            for j, block in enumerate(getattr(model, stage)):
                if not isinstance(block, BasicBlock):
                    raise UnsupportedModelError(f"coupling: {stage}.{j} is a {type(block).__name__}, not a BasicBlock")
                cur = _basic_block(block, f"{stage}.{j}", cur, spaces)
        cur[1].append("fc")
        spaces.append(cur)
        return spaces


# ======================================================================== torch-pruning backend
def _torch_pruning() -> Any:
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        raise UnsupportedModelError(
            "torch-pruning is not installed: pip install 'ntkit[prune]' for backend='torch_pruning'"
        ) from None


def _call(model: nn.Module, example_input: object) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _tp_spaces(model: nn.Module, example_input: object) -> list[tuple[list[str], list[str]]]:
    """Channel spaces from torch-pruning's dependency graph (traced in eval mode, so BatchNorm
    running statistics are untouched; modes restored after)."""
    if example_input is None:
        raise ConfigError("coupling: example_input=None: backend='torch_pruning' traces one forward; pass an input")
    tp = _torch_pruning()
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, forward_fn=lambda m, x: _call(m, x)
        )
        groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    finally:
        for m, mode in modes.items():
            m.training = mode
    names = {id(m): n for n, m in model.named_modules()}
    spaces = []
    for group in groups:
        producers: list[str] = []
        consumers: list[str] = []
        root = None
        for item in group.items:
            mod = item.dep.target.module
            if not any(True for _ in mod.parameters(recurse=False)):
                continue  # parameter-free nodes: residual sums, activations, pooling, reshapes
            name = names.get(id(mod))
            if name is None:
                raise UnsupportedModelError(f"coupling: torch-pruning named a module outside the model ({item.dep})")
            idxs = [int(getattr(i, "idx", i)) for i in item.idxs]
            if root is None:
                root = idxs
            if idxs != root:
                raise UnsupportedModelError(
                    f"coupling: {name!r} sees the channels of {producers[:1] or [name]} re-indexed "
                    f"(concatenation / flatten); only identity couplings are supported"
                )
            out = graph.is_out_channel_pruning_fn(item.dep.handler)
            if not isinstance(mod, (nn.Conv2d, nn.Linear, _BN)) or (not out and isinstance(mod, _BN)):
                raise UnsupportedModelError(
                    f"coupling: {name!r} ({type(mod).__name__}) shares channels of a residual set; "
                    f"supported: Conv2d, Linear, BatchNorm"
                )
            (producers if out else consumers).append(name)
        spaces.append((producers, consumers))
    return spaces


# ======================================================================== public
def _set_name(producers: Sequence[str], modules: Mapping[str, nn.Module]) -> str:
    weights = [p for p in producers if not isinstance(modules[p], _BN)]
    parts = [w.split(".") for w in weights]
    common: list[str] = []
    for col in zip(*parts):
        if len(set(col)) != 1:
            break
        common.append(col[0])
    if common and all(len(p) > len(common) for p in parts):
        return ".".join(common)
    counts: dict[str, int] = {}
    for p in parts:
        counts[p[0]] = counts.get(p[0], 0) + 1
    return max(counts, key=lambda k: counts[k])  # first-seen wins ties (dicts keep order)


def _resolve(backend: str, model: nn.Module) -> str:
    check(backend in _BACKENDS, "backend", backend, f"one of {_BACKENDS}")
    if backend != "auto":
        return backend
    if importlib.util.find_spec("torch_pruning") is not None:
        return "torch_pruning"
    if _rule_for(model) is not None:
        return "zoo"
    raise UnsupportedModelError(
        f"coupling: backend='auto' for {type(model).__name__}: no registered coupling rule and torch-pruning "
        f"is not installed (pip install 'ntkit[prune]')"
    )


def coupling_sets(model: nn.Module, example_input: object = None, *, backend: Backend = "auto") -> list[CouplingSet]:
    """The residual-coupled channel spaces of ``model`` (those written by ≥ 2 weight layers).

    Args:
        model: the model (not modified; a torch-pruning trace runs one eval-mode forward).
        example_input: what ``model(...)`` takes (a tuple/list is unpacked as positional, a mapping
            as keyword arguments); needed by ``backend="torch_pruning"`` only.
        backend: see :data:`Backend`.

    Returns: the sets in ``named_modules()`` order of their first producer; names are unique.

    Raises UnsupportedModelError (no rule for the model, torch-pruning missing, an unsupported
    layer or index-remapping coupling) or ConfigError (bad ``backend``, no input for a trace).
    """
    which = _resolve(backend, model)
    if which == "zoo":
        rule = _rule_for(model)
        if rule is None:
            raise UnsupportedModelError(
                f"coupling: backend='zoo': no coupling rule registered for {type(model).__name__} "
                f"(ntkit.pruning.dependency.register_coupling)"
            )
        spaces = rule(model)
    else:
        spaces = _tp_spaces(model, example_input)
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    out: list[CouplingSet] = []
    for producers, consumers in spaces:
        prod = sorted(set(producers), key=order.__getitem__)
        weights = [p for p in prod if not isinstance(modules[p], _BN)]
        if len(weights) < 2:
            continue
        first = modules[weights[0]]
        chans = int(first.weight.shape[0])  # type: ignore[union-attr,index]
        out.append(CouplingSet(_set_name(prod, modules), chans, tuple(prod),
                               tuple(sorted(set(consumers), key=order.__getitem__))))
    out.sort(key=lambda s: order[s.producers[0]])
    seen: dict[str, int] = {}
    for i, s in enumerate(out):
        k = seen.get(s.name, 0)
        seen[s.name] = k + 1
        if k:
            out[i] = CouplingSet(f"{s.name}#{k}", s.channels, s.producers, s.consumers)
    return out


def _producer_params(model: nn.Module, producers: Sequence[str]) -> list[str]:
    """Parameter names (as in ``named_parameters()``) of the producers' weights and biases."""
    names = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    out = []
    for mname in producers:
        for attr in ("weight", "bias"):
            p = getattr(modules[mname], attr, None)
            if isinstance(p, nn.Parameter):
                out.append(names[id(p)])
    return out


def coupled_channel_groups(
    model: nn.Module, example_input: object = None, *, backend: Backend = "auto", include_filters: bool = False
) -> Partition:
    """One partition group per residual-coupled channel.

    Group ``"<set>.channel<c>"`` (kind ``"channel"``, layer = the :class:`CouplingSet` name, e.g.
    ``"layer2"``) holds, for every producer of the set, the parameter slice ``[c, c+1)`` along dim 0
    of its weight and bias (Conv2d / Linear weight and bias, BatchNorm affine weight and bias).
    Groups come set by set, channel by channel.

    Args:
        model, example_input, backend: as in :func:`coupling_sets`.
        include_filters: also append :func:`ntkit.partition.conv_filters`' ``"filter"`` groups of the
            convs that produce no coupled set (for a ResNet: every block's ``conv1``), giving a
            partition of all prunable channels.

    Returns: a bound, validated :class:`~ntkit.partition.Partition`.
    """
    check(isinstance(include_filters, bool), "include_filters", include_filters, "a bool")
    sets = coupling_sets(model, example_input, backend=backend)
    if not sets:
        raise UnsupportedModelError(f"coupling: model {type(model).__name__} has no residual-coupled channels")
    groups: list[ModuleGroup] = []
    for s in sets:
        params = _producer_params(model, s.producers)
        for c in range(s.channels):
            slices = tuple(ParamSlice(p, 0, c, c + 1) for p in params)
            groups.append(ModuleGroup(f"{s.name}.channel{c}", "channel", s.name, slices))
    if include_filters:
        coupled = {p for s in sets for p in s.producers}
        groups += [g for g in conv_filters(model) if g.layer not in coupled]
    return Partition(groups).bind(model)


# ======================================================================== surgery rule
def _set_of(model: nn.Module, layer: str, example_input: object) -> CouplingSet:
    if _rule_for(model) is not None:
        sets = coupling_sets(model, backend="zoo")
    elif example_input is not None:
        sets = coupling_sets(model, example_input, backend="torch_pruning")
    else:
        raise UnsupportedModelError(
            f"remove_groups: channel groups of {layer!r}: {type(model).__name__} has no registered coupling rule; "
            f"pass example_input= to trace it with torch-pruning (pip install 'ntkit[prune]')"
        )
    for s in sets:
        if s.name == layer:
            return s
    raise UnsupportedModelError(f"remove_groups: {layer!r} is not a coupled channel set of {type(model).__name__}")


def _channels_rule(model: nn.Module, layer: str, m: nn.Module | None, groups: list[ModuleGroup], plan: Any):
    """Surgery for ``"channel"`` groups: the channel leaves every producer (dim 0: weight, bias,
    BatchNorm running statistics) and every consumer (dim 1 of the weight)."""
    from ntkit.sparse.surgery import _fix_meta

    cset = _set_of(model, layer, getattr(plan, "example_input", None))
    modules = dict(model.named_modules())
    pnames = set(_producer_params(model, cset.producers))
    idx: set[int] = set()
    for g in groups:
        starts = {(s.start, s.stop) for s in g.slices if s.param in pnames and s.dim == 0}
        if len(starts) != 1 or next(iter(starts))[1] - next(iter(starts))[0] != 1:
            raise UnsupportedModelError(f"remove_groups: group {g.name!r} is not one channel of the set {layer!r}")
        idx.add(next(iter(starts))[0])
    chans = int(modules[cset.producers[0]].weight.shape[0])  # type: ignore[union-attr,index]
    if len(idx) >= chans:
        raise ConfigError(f"remove_groups: channel set {layer!r} would lose all {chans} channels; keep >= 1")
    gone = sorted(idx)
    names = {id(p): n for n, p in model.named_parameters()}
    for mname in cset.producers:
        mod = modules[mname]
        for attr in ("weight", "bias"):
            p = getattr(mod, attr, None)
            if isinstance(p, nn.Parameter):
                plan.remove(names[id(p)], 0, gone)
        if isinstance(mod, _BN) and mod.track_running_stats:
            for buf in ("running_mean", "running_var"):
                plan.remove(f"{mname}.{buf}", 0, gone, buffer=True)
    for mname in cset.consumers:
        mod = modules[mname]
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            raise UnsupportedModelError(f"remove_groups: consumer {mname!r} is a grouped conv (groups={mod.groups})")
        plan.remove(names[id(mod.weight)], 1, gone)

    def post() -> None:
        for mname in (*cset.producers, *cset.consumers):
            _fix_meta(modules[mname])

    return [post]


def _register_surgery() -> None:
    from ntkit.sparse.surgery import register_kind_rule

    register_kind_rule("channel")(_channels_rule)


_register_surgery()
