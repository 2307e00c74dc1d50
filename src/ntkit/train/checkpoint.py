"""Atomic checkpoints and bit-identical resume.

A checkpoint holds everything that influences the rest of a run:

* model, optimizer and LR-scheduler ``state_dict``\\s;
* the global RNG states: torch (CPU and every CUDA device), numpy's legacy global generator,
  Python's ``random``;
* the data position: any object with ``state_dict``/``load_state_dict`` passed in ``stateful``
  (e.g. :class:`ntkit.train.SeededBatchSampler`, a training method, a :class:`FlopCounter`);
* ``step`` and a free-form ``extra`` dict (plain Python data).

Resume contract: save *after* finishing step k (optimizer stepped, scheduler stepped, sampler
advanced); load restores all of the above, so continuing the loop from step k+1 reproduces the
uninterrupted run bit for bit (same machine, same thread count, deterministic kernels).

Loading is safe by default: the payload holds only tensors and plain Python data (RNG states
included), so it is read with ``torch.load(weights_only=True)``; ``trusted=True`` allows custom
pickled objects in ``extra`` / ``stateful`` states.

Writes are atomic: the file is written to a temporary name in the same directory, flushed,
``fsync``\\ed, then ``os.replace``\\d over the target and the directory is ``fsync``\\ed — a crash
or a failing write at any point leaves either the previous file or the new one, never a torn one.
:class:`CheckpointManager` keeps the last ``k`` checkpoints of a run directory, deletes older ones
only after the new one is durable, and never deletes the newest loadable checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ntkit.errors import DataError, check

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "Stateful",
    "atomic_write",
    "atomic_write_text",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

_FORMAT = 1


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict(state)``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Atomically create/replace ``path`` with what ``write(binary_file)`` writes.

    The temporary file lives in the same directory (``.<name>.tmp-XXXX``) so ``os.replace`` is a
    same-filesystem rename. If ``write`` raises, the temporary file is removed and ``path`` is
    left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


# --------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """Global RNG states: torch CPU, torch CUDA (all devices, if initialised), numpy, python.

    Only tensors and plain Python values, so checkpoints load with ``torch.load(weights_only=True)``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states captured by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU + CUDA), numpy's global generator and Python's ``random``."""
    check(isinstance(seed, int) and seed >= 0, "seed", seed, "an int >= 0")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --------------------------------------------------------------------------- save / load
@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns besides restoring the objects in place.

    Attributes:
        path: the file loaded.
        step: the step saved (the last completed step).
        extra: the free-form dict saved.
    """

    path: Path
    step: int
    extra: dict = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
    *,
    stateful: Mapping[str, Stateful] | None = None,
    save_rng: bool = True,
) -> Path:
    """Atomically save a full training state to ``path`` (``torch.save`` format).

    Args:
        path: target file; its directory is created.
        model / optimizer / scheduler: saved through their ``state_dict()``.
        step: the last completed step.
        extra: free-form picklable data (metrics so far, …).
        stateful: named objects with ``state_dict`` to save (sampler, method, flop counter, …);
            pass the same names to :func:`load_checkpoint`.
        save_rng: include the global RNG states (needed for exact resume).
    Returns the path.
    """
    check(isinstance(step, int) and step >= 0, "step", step, "an int >= 0")
    payload = {
        "format": _FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "stateful": {k: v.state_dict() for k, v in (stateful or {}).items()},
        "rng": get_rng_state() if save_rng else None,
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    out = atomic_write(path, lambda f: f.write(data))
    atomic_write_text(_digest_path(out), f"{hashlib.sha256(data).hexdigest()}  {out.name}\n")
    return out


def _digest_path(path: Path) -> Path:
    """The checksum file written beside a checkpoint: ``<name>.sha256``."""
    return path.with_name(path.name + ".sha256")


def _verify(path: Path) -> None:
    """Raise DataError when ``path`` does not match the SHA-256 written beside it (a file without
    one, e.g. from an older ntkit or a run killed between the two writes, is not checked)."""
    digest = _digest_path(path)
    if not digest.is_file():
        return
    want = digest.read_text(encoding="utf-8").split()[:1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if want != [h.hexdigest()]:
        raise DataError(f"checkpoint={str(path)!r}: checksum mismatch (corrupt or truncated)")


def _read(path: Path, map_location: Any, trusted: bool = False) -> dict:
    if not path.is_file():
        raise DataError(f"checkpoint={str(path)!r}: no such file")
    _verify(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if not trusted and "Unsupported global" in str(e):
            raise DataError(
                f"checkpoint={str(path)!r}: holds pickled objects beyond tensors and plain Python data; "
                "pass trusted=True only if you trust the file"
            ) from None
        raise DataError(f"checkpoint={str(path)!r}: unreadable (not a torch.save file?)") from None
    except Exception as e:  # noqa: BLE001 — truncated zip, foreign format, …
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"checkpoint={str(path)!r}: unreadable ({type(e).__name__}: {first})") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise DataError(f"checkpoint={str(path)!r}: not an ntkit checkpoint (format {_FORMAT})")
    return payload


def _apply(
    path: Path,
    payload: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    stateful: Mapping[str, Stateful] | None,
    restore_rng: bool,
    strict: bool,
) -> Checkpoint:
    saved = payload["stateful"]
    for name in stateful or {}:  # check everything before mutating anything
        if name not in saved:
            raise DataError(f"checkpoint={str(path)!r}: has no state for {name!r} (has {sorted(saved)})")
    for what, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and payload[what] is None:
            raise DataError(f"checkpoint={str(path)!r}: has no {what} state")
    model.load_state_dict(payload["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    for name, obj in (stateful or {}).items():
        obj.load_state_dict(saved[name])
    if restore_rng and payload["rng"] is not None:
        set_rng_state(payload["rng"])
    return Checkpoint(path=path, step=int(payload["step"]), extra=payload["extra"])


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    stateful: Mapping[str, Stateful] | None = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
    strict: bool = True,
    trusted: bool = False,
) -> Checkpoint:
    """Restore a checkpoint written by :func:`save_checkpoint` into the given objects.

    Loading uses ``torch.load(weights_only=True)`` (no arbitrary code from the file) unless
    ``trusted=True`` — needed only when ``extra`` or a ``stateful`` object saved custom classes.

    Raises:
        DataError: missing, truncated or foreign file; a ``stateful`` name, optimizer or scheduler
            state not in the file (nothing is modified then).
    """
    path = Path(path)
    payload = _read(path, map_location, trusted)
    return _apply(path, payload, model, optimizer, scheduler, stateful, restore_rng, strict)


# --------------------------------------------------------------------------- a run's checkpoints
class CheckpointManager:
    """The checkpoints of one run directory: ``<dir>/<prefix>-<step:09d>.pt``, keep the last k.

    Args:
        directory: where checkpoints live (created).
        keep_last: how many of the newest checkpoints to keep (≥ 1).
        prefix: file-name prefix.

    Pruning happens after a save has become durable and only removes files older than the ``k``
    newest (and temporaries left by a writer that was killed mid-write), so the checkpoint just
    written — the newest good one — is never removed. :meth:`latest` / :meth:`resume` skip files
    that do not load (torn or foreign) and fall back to the previous checkpoint. Under
    ``torch.distributed`` save on rank 0 only (:func:`ntkit.train.dist.is_main`).
    """

    def __init__(self, directory: str | Path, keep_last: int = 2, prefix: str = "ckpt") -> None:
        check(isinstance(keep_last, int) and keep_last >= 1, "keep_last", keep_last, "an int >= 1")
        check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", prefix)), "prefix", prefix, "letters, digits, _ . -")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.pt")

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{step:09d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint file, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = self._pattern.fullmatch(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def newest_payload(self, map_location: Any = "cpu", trusted: bool = False) -> dict | None:
        """The content of the newest checkpoint that loads (None when there is none); a newer file
        that is corrupt, truncated or foreign is skipped with a warning naming it."""
        found = self._newest(map_location, trusted)
        return None if found is None else found[1]

    def _newest(self, map_location: Any = "cpu", trusted: bool = False) -> tuple[Path, dict] | None:
        bad: list[str] = []
        for _, p in reversed(self.checkpoints()):
            try:
                payload = _read(p, map_location, trusted)
            except DataError as e:
                bad.append(str(e))
                continue  # torn, corrupt or foreign: fall back to the previous one
            if bad:
                warnings.warn(f"{'; '.join(bad)} — using {p.name} instead", RuntimeWarning, stacklevel=3)
            return p, payload
        if bad:
            warnings.warn(f"{'; '.join(bad)} — no loadable checkpoint left", RuntimeWarning, stacklevel=3)
        return None

    def latest(self) -> Path | None:
        """The newest checkpoint that loads, or None."""
        found = self._newest()
        return None if found is None else found[0]

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        step: int = 0,
        extra: Mapping[str, Any] | None = None,
        *,
        stateful: Mapping[str, Stateful] | None = None,
    ) -> Path:
        """:func:`save_checkpoint` to :meth:`path_for` ``(step)``, then prune old checkpoints."""
        path = save_checkpoint(
            self.path_for(step), model, optimizer, scheduler, step, extra, stateful=stateful
        )
        self._prune(newest=path)
        return path

    def _prune(self, newest: Path) -> None:
        ckpts = [p for _, p in self.checkpoints()]
        keep = set(ckpts[-self.keep_last :]) | {newest}
        # temporaries left by a writer killed mid-write (one writer per run directory)
        stale = [p for pat in (f".{self.prefix}-*.pt.tmp-*", f".{self.prefix}-*.pt.sha256.tmp-*")
                 for p in self.directory.glob(pat) if p.is_file()]
        old = [p for p in ckpts if p not in keep]
        for p in [*old, *(_digest_path(p) for p in old), *stale]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        *,
        stateful: Mapping[str, Stateful] | None = None,
        map_location: Any = "cpu",
        trusted: bool = False,
        prune: bool = True,
    ) -> Checkpoint | None:
        """Load the newest loadable checkpoint into the objects; None when there is none. Then,
        with ``prune`` (pass False on every process but the one that writes), apply the retention
        (``keep_last`` newest, never the one loaded): a run killed between writing a checkpoint
        and pruning the old ones keeps one too many, and one killed after its last checkpoint
        writes none on resume that would prune it."""
        found = self._newest(map_location, trusted)
        if found is None:
            return None
        path, payload = found
        ck = _apply(path, payload, model, optimizer, scheduler, stateful, restore_rng=True, strict=True)
        if prune:
            self._prune(newest=path)
        return ck
