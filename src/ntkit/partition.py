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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ntkit.errors import ConfigError

__all__ = ["ParamSlice", "ModuleGroup", "Partition"]


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
    idx = sorted(set(int(i) for i in indices))
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
    ) -> "Partition":
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

    def bind(self, model: nn.Module) -> "Partition":
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
            for (a, ga), (b, gb) in zip(items, items[1:]):
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

    def indices(self, kind: str | None = None) -> list[int]:
        """Indices of the groups of ``kind`` (all groups when None)."""
        return [i for i, g in enumerate(self.groups) if kind is None or g.kind == kind]

    def subset(self, indices: Sequence[int]) -> "Partition":
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
