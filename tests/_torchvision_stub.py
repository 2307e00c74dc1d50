"""Import timm on machines without a working torchvision (test helper, not part of ntkit).

Why this exists: timm (PyPI) requires torchvision, and there is no CPU torchvision for the
project's torch 2.13 CPU build in the package registry — the PyPI torchvision 0.28 wheel links
``libtorch_cuda`` and fails to import, and ``pip install timm`` would pull a CUDA torch 2.14. So CI
installs timm with ``--no-deps`` (``.ci/run``). timm's *model* code does not use torchvision; it is
only imported at ``import timm``, by ``timm.data`` (transforms, datasets), by
``timm.layers`` / ``timm.utils`` (``FrozenBatchNorm2d``, for isinstance checks and for freezing
BatchNorm) and, optionally, by FX feature extraction.

:func:`import_timm` first tries the real ``import torchvision``. Only when that fails does it install
a stub — a :class:`importlib.abc.MetaPathFinder` that serves ``torchvision`` and every
``torchvision.*`` module as an empty package whose attributes are placeholder classes — for the
duration of ``import timm``, then removes the finder and the stub modules from ``sys.modules``
(timm keeps the placeholders it bound), so nothing else in the test session sees a torchvision
(e.g. ``importlib.util.find_spec("torchvision")`` and transformers' ``is_torchvision_available()``
stay false). Each attribute of a placeholder class is another, distinct placeholder class (timm
builds a dict keyed by ``InterpolationMode.NEAREST``, ``.BILINEAR``, …, so they must differ);
instantiating a placeholder raises ``RuntimeError("torchvision stub: …")``, so a code path that
really needs torchvision fails loudly instead of silently doing something else.

:func:`import_timm` skips the test when timm is not installed — unless ``NTKIT_REQUIRE_EXTRAS=1``
(set by CI), then it fails.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any, ClassVar

import pytest

_STUB_MARK = "__ntkit_torchvision_stub__"


class _PlaceholderMeta(type):
    """Class attribute ``X`` of a placeholder → a placeholder subclass named ``X``, one per name."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("_"):
            raise AttributeError(name)
        subs = cls.__dict__["_subs"]
        if name not in subs:
            subs[name] = _PlaceholderMeta(name, (cls,), {"_subs": {}, "__module__": cls.__module__})
        return subs[name]


class _Placeholder(metaclass=_PlaceholderMeta):
    _subs: ClassVar[dict[str, type]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"torchvision stub: {type(self).__module__}.{type(self).__qualname__} is not "
                           "available (torchvision is not installed; see tests/_torchvision_stub.py)")


def _module_getattr(module_name: str, cache: dict[str, type]):
    def __getattr__(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        if name not in cache:
            cache[name] = _PlaceholderMeta(name, (_Placeholder,), {"_subs": {}, "__module__": module_name})
        return cache[name]

    return __getattr__


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and ``torchvision.*`` as empty stub packages."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, "torchvision stub (tests/_torchvision_stub.py)")
        module.__path__ = []  # a package: any submodule import goes through the finder again
        setattr(module, _STUB_MARK, True)
        module.__getattr__ = _module_getattr(spec.name, {})  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _drop_torchvision_modules(only_stubs: bool) -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        if not only_stubs or getattr(sys.modules[name], _STUB_MARK, False):
            del sys.modules[name]


def _real_torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 — ImportError, or OSError / RuntimeError from a wheel built for another torch
        _drop_torchvision_modules(only_stubs=False)  # half-imported leftovers
        return False
    return True


def import_timm() -> types.ModuleType:
    """``import timm`` (with the torchvision stub only if the real torchvision fails to import).

    Skips the calling test when timm is not installed; fails it instead when
    ``NTKIT_REQUIRE_EXTRAS=1``."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        msg = "timm is not installed (pip install -c constraints.txt --no-deps timm==1.0.15)"
        if os.environ.get("NTKIT_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"NTKIT_REQUIRE_EXTRAS=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    if _real_torchvision_imports():
        return importlib.import_module("timm")
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        timm = importlib.import_module("timm")
        importlib.import_module("timm.utils")  # the last timm module importing torchvision at import time
    finally:
        sys.meta_path.remove(finder)
        _drop_torchvision_modules(only_stubs=True)
    return timm
