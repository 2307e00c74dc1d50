"""Recipe registry and runner: tier presets, typed ``key=value`` overrides, run directory layout.

A run directory holds::

    config.json    the fully resolved config (+ recipe, tier, overrides, versions, machine), written first
    results.json   {"recipe", "tier", "config", "results": <what the recipe returned>, "wall_clock_s", …}
    report.md      markdown rendered from results.json (re-render with ``ntkit report RUN_DIR``)
    *.png          plots the recipe wrote
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import json
import math
import platform
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ntkit._registry import Registry
from ntkit.errors import ConfigError, DataError, NtkitError, check

__all__ = [
    "RECIPES",
    "TIERS",
    "Recipe",
    "apply_overrides",
    "config_to_dict",
    "get_recipe",
    "list_recipes",
    "parse_overrides",
    "register_recipe",
    "rerender_report",
    "resolve_config",
    "run_recipe",
    "to_jsonable",
    "write_json",
]

#: The four tiers every recipe defines, cheapest first.
TIERS = ("ci", "quick", "cpu", "paper")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A registered experiment.

    Attributes:
        name: registry name.
        fn: ``fn(cfg, out_dir: Path, data_dir: Path | None) -> dict`` (JSON-able results).
        tiers: tier name → preset config (instances of ``config_cls``), one for each of ``TIERS``.
        config_cls: the config dataclass.
        description: one line for ``ntkit ls recipes``.
        report: optional ``report(doc, out_dir) -> str`` markdown renderer.
    """

    name: str
    fn: Callable[..., dict]
    tiers: Mapping[str, Any]
    config_cls: type
    description: str = ""
    report: Callable[[dict, Path], str] | None = None

    @classmethod
    def create(
        cls,
        name: str,
        fn: Callable[..., dict],
        tiers: Mapping[str, Any],
        description: str = "",
        report: Callable[[dict, Path], str] | None = None,
    ) -> Recipe:
        """Validate the tier presets (programming errors raise ValueError/TypeError)."""
        missing = [t for t in TIERS if t not in tiers]
        extra = [t for t in tiers if t not in TIERS]
        if missing or extra:
            raise ValueError(
                f"recipe {name!r}: tiers must be exactly {TIERS}; missing {missing}, unknown {extra}"
            )
        cfg_types = {type(c) for c in tiers.values()}
        if len(cfg_types) != 1 or not dataclasses.is_dataclass(next(iter(cfg_types))):
            raise TypeError(f"recipe {name!r}: every tier must be an instance of one config dataclass")
        return cls(name, fn, dict(tiers), cfg_types.pop(), description, report)

    def config(self, tier: str) -> Any:
        """A private copy of the preset of ``tier`` (ConfigError for an unknown tier)."""
        check(tier in TIERS, "tier", tier, f"one of {', '.join(TIERS)}")
        return copy.deepcopy(self.tiers[tier])


RECIPES: Registry[Recipe] = Registry("recipe")
_LOADED = False


def register_recipe(
    name: str,
    *,
    tiers: Mapping[str, Any],
    description: str = "",
    report: Callable[[dict, Path], str] | None = None,
) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator registering ``fn(cfg, out_dir, data_dir) -> dict`` as recipe ``name``.

    Args:
        name: registry name (``ntkit run <name>``); a duplicate raises ValueError.
        tiers: ``{"ci": cfg, "quick": cfg, "cpu": cfg, "paper": cfg}`` — one instance of the same
            config dataclass per tier (all four required).
        description: one line for ``ntkit ls recipes``.
        report: optional custom renderer ``report(doc, out_dir) -> str`` (markdown), where ``doc``
            is the content of ``results.json``.

    Returns the function unchanged.
    """

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        RECIPES.add(name, Recipe.create(name, fn, tiers, description, report))
        return fn

    return deco


def _load_all() -> None:
    """Import every module of ``ntkit.recipes`` once, so their ``@register_recipe`` run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import pkgutil

    pkg = importlib.import_module("ntkit.recipes")
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"ntkit.recipes.{info.name}")


def list_recipes() -> list[str]:
    """Names of all registered recipes (imports the recipe modules on first call)."""
    _load_all()
    return RECIPES.names()


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``; unknown names raise :class:`ConfigError`."""
    _load_all()
    return RECIPES.get(name)


# --------------------------------------------------------------------------- typed overrides
def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["lr=1e-3", "model.depth=2"]`` → ``{"lr": "1e-3", "model.depth": "2"}`` (later wins)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        out[key] = value.strip()
    return out


def load_overrides_file(path: str | Path) -> dict[str, str]:
    """Overrides from a YAML (or JSON) mapping file, flattened to dotted keys, as strings.

    ``{"lr": 0.001, "optim": {"betas": [0.9, 0.98]}}`` → ``{"lr": "0.001", "optim.betas": "[0.9, 0.98]"}``;
    they are then typed by the config's fields exactly like command-line overrides.

    Raises:
        DataError: the file is missing or is not a YAML mapping.
    """
    import yaml

    p = Path(path).expanduser()
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"config={str(path)!r}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"config={str(path)!r}: not valid YAML ({' '.join(str(e).split())})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise DataError(f"config={str(path)!r}: expected a mapping of config keys to values")

    def text(v: Any) -> str:
        if v is None:
            return "none"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(text(x) for x in v) + "]"
        return str(v)

    out: dict[str, str] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = text(v)

    walk(doc, "")
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", "~"}


def _split_seq(text: str) -> list[str]:
    t = text.strip()
    if len(t) >= 2 and t[0] + t[-1] in ("[]", "()"):
        t = t[1:-1]
    return [p.strip() for p in t.split(",") if p.strip()] if t.strip() else []


def _parse(text: str, tp: Any, key: str) -> Any:
    """Convert ``text`` to type ``tp``; raise ConfigError naming ``key`` and ``text`` on failure."""
    fail = ConfigError(f"{key}={text!r}: expected {_type_name(tp)}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        import yaml

        return yaml.safe_load(text)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(text, a, key)
            except ConfigError:
                continue
        raise fail
    if origin is typing.Literal:
        for a in args:
            if str(a) == text or (isinstance(a, bool) and text.lower() in (_TRUE if a else _FALSE)):
                return a
        raise ConfigError(f"{key}={text!r}: expected one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        parts = _split_seq(text)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(parts) != len(args):
                raise ConfigError(
                    f"{key}={text!r}: expected {len(args)} comma-separated values ({_type_name(tp)})"
                )
            vals = [_parse(p, a, key) for p, a in zip(parts, args)]
        else:
            elem = args[0] if args else str
            vals = [_parse(p, elem, key) for p in parts]
        return tuple(vals) if origin is tuple else vals
    if origin is dict or tp is dict:
        try:
            val = json.loads(text)
        except json.JSONDecodeError:
            raise fail from None
        if not isinstance(val, dict):
            raise fail
        return val
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r}: expected a bool (true/false)")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            pass
        try:
            f = float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an int") from None
        if math.isfinite(f) and f.is_integer():
            return int(f)
        raise ConfigError(f"{key}={text!r}: expected an int")
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a float") from None
    if tp is str:
        return text
    if isinstance(tp, type) and issubclass(tp, Path):
        return tp(text)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for m in tp:
            if text in (m.name, str(m.value)):
                return m
        raise ConfigError(f"{key}={text!r}: expected one of {', '.join(m.name for m in tp)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key}={text!r}: {key} is a group; set its fields as {key}.<field>=value")
    raise ConfigError(f"{key}={text!r}: cannot parse a value of type {_type_name(tp)} from the command line")


def _is_methods_field(tp: Any) -> bool:
    """Whether a config field is a ``dict[str, MethodEntry]`` (a recipe's composed methods)."""
    from ntkit.harness.compose import MethodEntry

    args = typing.get_args(tp)
    return typing.get_origin(tp) is dict and len(args) == 2 and args[1] is MethodEntry


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def apply_overrides(cfg: Any, overrides: Mapping[str, str] | Iterable[str]) -> Any:
    """A copy of dataclass ``cfg`` with string overrides applied, typed by the field annotations.

    ``overrides`` is ``{"key": "text"}`` or ``["key=text", …]``; dotted keys reach into nested
    dataclass fields (``optim.lr=3e-4``). The dataclass is rebuilt with :func:`dataclasses.replace`,
    so its ``__post_init__`` validation runs on the new values.

    Raises:
        ConfigError: unknown key, or a value that does not parse as the field's type, or one the
            config's own validation rejects — one line naming the key and the value.
    """
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    grouped: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    composed: dict[str, tuple[str | None, dict[str, str]]] = {}
    fields = _fields(type(cfg))
    for key, text in overrides.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{key}={text!r}: unknown config key; known keys: {known}")
        if _is_methods_field(fields[head]):  # methods=a,b / methods.<label>.<field>=v
            sel, sub = composed.get(head, (None, {}))
            if rest:
                sub[rest] = text
            else:
                sel = text
            composed[head] = (sel, sub)
        elif rest:
            sub = getattr(cfg, head)
            if not dataclasses.is_dataclass(sub):
                raise ConfigError(f"{key}={text!r}: {head} has no fields")
            nested.setdefault(head, {})[rest] = text
        else:
            grouped[head] = _parse(text, fields[head], key)
    for head, sub_over in nested.items():
        try:
            grouped[head] = apply_overrides(getattr(cfg, head), sub_over)
        except ConfigError as e:
            raise ConfigError(f"{head}.{e}") from None
    for head, (sel, sub) in composed.items():
        from ntkit.harness.compose import apply_method_overrides

        grouped[head] = apply_method_overrides(getattr(cfg, head), sel, sub, _parse)
    try:
        return dataclasses.replace(cfg, **grouped)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a config that validates with plain ValueError/TypeError
        shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise ConfigError(f"{shown}: {e}") from None


def resolve_config(recipe: Recipe | str, tier: str, overrides: Mapping[str, str] | Iterable[str] = ()) -> Any:
    """The config of ``recipe`` at ``tier`` with ``overrides`` applied and validated."""
    rec = get_recipe(recipe) if isinstance(recipe, str) else recipe
    return apply_overrides(rec.config(tier), overrides)


# --------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """Recursively convert dataclasses, tuples, Paths, enums, numpy/torch scalars and arrays to JSON.

    Non-finite floats are kept (Python's json writes them as ``NaN``/``Infinity``). Objects with a
    ``to_jsonable()`` method (e.g. :class:`ntkit.harness.MethodEntry`) convert themselves.
    """
    if hasattr(obj, "to_jsonable") and not isinstance(obj, type):
        return obj.to_jsonable()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def config_to_dict(cfg: Any) -> dict:
    """The config dataclass as a JSON-able dict."""
    return to_jsonable(cfg)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` (made JSON-able) as indented JSON."""
    from ntkit.train.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(to_jsonable(obj), indent=2) + "\n")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is it a run directory written by `ntkit run`?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object")
    return doc


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import ntkit

    return {
        "ntkit": ntkit.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _machine() -> dict[str, Any]:
    """Where a run ran, for ``ntkit report`` to say which machines merged runs came from."""
    import os

    import torch

    acc = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "hostname": platform.node(),
        "platform": platform.platform(terse=True),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": acc,
    }


# --------------------------------------------------------------------------- running
def run_recipe(
    recipe: Recipe | str,
    tier: str,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    overrides: Mapping[str, str] | Iterable[str] = (),
    *,
    resume: bool = False,
) -> dict:
    """Run ``recipe`` at ``tier`` into ``out_dir``; return the ``results.json`` document.

    Steps: resolve + validate the config (ConfigError on bad tier/override), check ``data_dir``
    (DataError if given but not a directory), check ``out_dir`` (below), write ``config.json``,
    call the recipe inside a :func:`ntkit.harness.run_context` (checkpoints in
    ``out_dir/checkpoints``, metrics in ``out_dir/metrics.jsonl``), write ``results.json`` and
    ``report.md``.

    ``out_dir`` rules (no run ever loses a checkpoint): without ``resume``, a directory holding
    the checkpoints of an unfinished run (no ``results.json``) is refused, and a finished run's
    directory is reused (its checkpoints and results replaced); with ``resume``,
    ``out_dir/config.json`` must exist and hold the same recipe, tier and resolved config.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here (gloo on CPU,
    NCCL on GPU); every rank trains its shard of each batch, only rank 0 writes; ``results.json``
    records ``distributed: {world_size, backend}``.
    """
    from ntkit.harness import run_context
    from ntkit.train import dist

    rec = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    cfg = resolve_config(rec, tier, overrides)
    data_path: Path | None = None
    if data_dir is not None:
        data_path = Path(data_dir).expanduser()
        if not data_path.is_dir():
            raise DataError(f"data_dir={str(data_dir)!r}: no such directory")
        data_path = data_path.resolve()
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out_dir)!r}: exists and is not a directory")
    config = config_to_dict(cfg)
    _check_out_dir(out, rec.name, tier, config, resume)
    dist.init_from_env()
    main = dist.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / "checkpoints").is_dir():  # a finished run's: replaced by this one
            shutil.rmtree(out / "checkpoints")
    dist.barrier()
    out = out.resolve()
    header = {
        "recipe": rec.name,
        "tier": tier,
        "config": config,
        "overrides": dict(overrides),
        "data_dir": str(data_path) if data_path else None,
        "versions": _versions(),
        "machine": _machine(),
        "started_utc": _now(),
    }
    if main and not (resume and (out / "config.json").is_file()):
        write_json(out / "config.json", header)
    distributed = {"world_size": dist.world_size(), "backend": _backend()}
    # ranks other than 0 write their plots and reports into a scratch directory that is dropped
    scratch = None if main else tempfile.TemporaryDirectory(prefix=f"ntkit-rank{dist.rank()}-")
    logger = None
    t0 = time.perf_counter()
    try:
        if main:
            from ntkit.train.log import MetricsLogger

            logger = MetricsLogger(out / "metrics.jsonl", tensorboard=None)
        with run_context(out / "checkpoints", resume=resume, logger=logger):
            results = rec.fn(cfg, out if main else Path(scratch.name), data_path)  # type: ignore[union-attr]
    finally:
        if logger is not None:
            logger.close()
        if scratch is not None:
            scratch.cleanup()
    wall = time.perf_counter() - t0
    if not isinstance(results, Mapping):
        raise TypeError(f"recipe {rec.name!r} returned {type(results).__name__}, expected a dict")
    doc = {**header, "results": to_jsonable(results), "distributed": distributed, "wall_clock_s": wall,
           "finished_utc": _now()}
    if main:
        write_json(out / "results.json", doc)
        _write_report(rec, doc, out)
    dist.barrier()
    return doc


def _backend() -> str | None:
    from ntkit.train import dist

    if not dist.is_distributed():
        return None
    import torch.distributed as tdist

    return str(tdist.get_backend())


def _check_out_dir(out: Path, recipe: str, tier: str, config: dict, resume: bool) -> None:
    """Refuse an ``out`` that would lose or mix runs (see :func:`run_recipe`)."""
    ckpts = out / "checkpoints"
    has_ckpts = ckpts.is_dir() and any(ckpts.rglob("*.pt"))
    if not resume:
        if has_ckpts and not (out / "results.json").is_file():
            raise ConfigError(
                f"out={str(out)!r}: holds checkpoints of an unfinished run; pass --resume to continue it "
                "or choose another --out"
            )
        return
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"resume: out={str(out)!r} has no config.json (not a run directory of `ntkit run`)")
    prev = _read_json(cfg_path)
    if prev.get("recipe") != recipe or prev.get("tier") != tier:
        raise ConfigError(
            f"resume: out={str(out)!r} holds a run of recipe {prev.get('recipe')!r} tier {prev.get('tier')!r}, "
            f"not {recipe!r} tier {tier!r}; choose another --out"
        )
    if json.loads(json.dumps(prev.get("config"))) != json.loads(json.dumps(config)):
        diff = sorted(k for k in set(prev.get("config", {})) | set(config)
                      if prev.get("config", {}).get(k) != config.get(k))
        raise ConfigError(
            f"resume: out={str(out)!r} was run with another config (differs in {', '.join(diff)}); "
            "resume with the same overrides or choose another --out"
        )


def _write_report(rec: Recipe | None, doc: dict, out: Path) -> Path:
    from ntkit.recipes.report import render_report
    from ntkit.train.checkpoint import atomic_write_text

    text = rec.report(doc, out) if rec is not None and rec.report is not None else render_report(doc, out)
    path = out / "report.md"
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")
    return path


def rerender_report(run_dir: str | Path) -> Path:
    """Re-render ``run_dir/report.md`` from ``run_dir/results.json``; return the report's path.

    Uses the recipe's own renderer when the recipe is registered, else the generic one.
    """
    out = Path(run_dir).expanduser()
    if not out.is_dir():
        raise DataError(f"run_dir={str(run_dir)!r}: no such directory")
    doc = _read_json(out / "results.json")
    rec = None
    name = doc.get("recipe")
    if isinstance(name, str):
        try:
            rec = get_recipe(name)
        except NtkitError:
            rec = None
    return _write_report(rec, doc, out.resolve())
