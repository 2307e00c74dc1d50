"""Recipes compose methods: ``{label: {method: name, **method_config}}``.

A recipe config holds a field ``methods: dict[str, MethodEntry]``; each entry names a registered
method and carries that method's own validated config dataclass — method fields live only in
the method's config class (:func:`ntkit.methods.base.register_method`). The label is what the
tables show (``"snip_50"``, ``"mat"``)::

    methods = methods_of({
        "vanilla": {"method": "vanilla"},
        "mat": {"method": "mat", "alpha": {"head": 0.1}, "start_epoch": 5},
        "snip_50": {"method": "snip_struct", "fraction": 0.5},
    })

Command-line overrides (:func:`apply_method_overrides`, called by the recipe runner for such a
field):

* ``methods=vanilla,mat`` — keep only these labels, in this order;
* ``methods.mat.alpha=0.2`` — a field of label ``mat``'s config, typed by that config class and
  re-validated;
* ``methods.mat2.method=mat`` — a new label (or a label switched to another method) starting
  from that method's defaults; further ``methods.mat2.<field>=…`` apply on top.

Every unknown label, unknown field or bad value is a one-line :class:`~ntkit.errors.ConfigError`
naming the key and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ntkit.errors import ConfigError

__all__ = ["MethodEntry", "apply_method_overrides", "methods_of"]


@dataclasses.dataclass
class MethodEntry:
    """One method of a comparison: registry name ``method`` and its validated ``config``.

    ``config`` may be given as a mapping of fields (or None for the defaults); it is turned into
    the method's config dataclass and validated on construction.
    """

    method: str
    config: Any = None

    def __post_init__(self) -> None:
        from ntkit.methods import method_config

        if not isinstance(self.method, str):
            raise ConfigError(f"method={self.method!r}: expected a registered method name")
        self.config = method_config(self.method, self.config)

    def to_jsonable(self) -> dict[str, Any]:
        """``{"method": name, **fields}`` — the form configs are written and read in."""
        from ntkit.recipes._runner import to_jsonable

        return {"method": self.method, **to_jsonable(self.config)}

    def with_seed(self, seed: int) -> Any:
        """The config with its ``seed`` field (if it has one) set to the run's ``seed``."""
        if any(f.name == "seed" for f in dataclasses.fields(self.config)):
            return dataclasses.replace(self.config, seed=seed)
        return self.config


def methods_of(spec: Mapping[str, Mapping[str, Any] | MethodEntry]) -> dict[str, MethodEntry]:
    """``{label: {"method": name, **fields}}`` (or entries) → ``{label: MethodEntry}``, validated."""
    out: dict[str, MethodEntry] = {}
    for label, entry in spec.items():
        if isinstance(entry, MethodEntry):
            out[label] = entry
            continue
        if not isinstance(entry, Mapping) or "method" not in entry:
            raise ConfigError(f"methods.{label}={entry!r}: expected a mapping with a 'method' key")
        fields = {k: v for k, v in entry.items() if k != "method"}
        try:
            out[label] = MethodEntry(entry["method"], fields)
        except ConfigError as e:
            raise ConfigError(f"methods.{label}: {e}") from None
    return out


def apply_method_overrides(
    methods: Mapping[str, MethodEntry],
    selection: str | None,
    fields: Mapping[str, str],
    parse: Callable[[str, Any, str], Any],
) -> dict[str, MethodEntry]:
    """Apply ``methods=…`` (``selection``) and ``methods.<label>.<field>=…`` (``fields``, keyed
    ``"<label>.<field>"``) to ``methods``; ``parse(text, type, key)`` types a value.

    Returns a new mapping; the input is not modified.
    """
    from ntkit.methods import METHODS, method_info

    out = dict(methods)
    by_label: dict[str, dict[str, str]] = {}
    for key, text in fields.items():
        label, _, field = key.partition(".")
        if not label or not field or "." in field:
            raise ConfigError(f"methods.{key}={text!r}: expected methods.<label>.<field>=value")
        by_label.setdefault(label, {})[field] = text
    for label, sub in by_label.items():
        full = f"methods.{label}"
        if "method" in sub:
            name = sub.pop("method")
            if name not in METHODS:
                raise ConfigError(f"{full}.method={name!r}: unknown method; choose one of {', '.join(METHODS.names())}")
            out[label] = MethodEntry(name)
        if label not in out:
            known = ", ".join(out) or "none"
            raise ConfigError(
                f"{full}.{next(iter(sub))}={next(iter(sub.values()))!r}: unknown method label "
                f"(labels: {known}; add one with {full}.method=<name>)"
            )
        entry = out[label]
        cls = method_info(entry.method).config_class
        hints = _field_types(cls)
        values: dict[str, Any] = {}
        for field, text in sub.items():
            if field not in hints:
                raise ConfigError(
                    f"{full}.{field}={text!r}: unknown field of method {entry.method!r}; "
                    f"expected one of {', '.join(sorted(hints))}"
                )
            values[field] = parse(text, hints[field], f"{full}.{field}")
        try:
            out[label] = MethodEntry(entry.method, dataclasses.replace(entry.config, **values))
        except ConfigError as e:
            raise ConfigError(f"{full}.{e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{full}: {' '.join(str(e).split())}") from None
    if selection is not None:
        labels = [s.strip() for s in selection.strip().strip("[]()").split(",") if s.strip()]
        if not labels:
            raise ConfigError(f"methods={selection!r}: expected a comma-separated list of method labels")
        for lab in labels:
            if lab not in out:
                raise ConfigError(f"methods={selection!r}: unknown method label {lab!r}; labels: {', '.join(out)}")
        out = {lab: out[lab] for lab in labels}
    return out


def _field_types(cls: type) -> dict[str, Any]:
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
