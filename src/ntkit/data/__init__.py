"""Datasets: image classification (:class:`ImageData`) and masked language modelling (:class:`MLMData`).

One entry point::

    from ntkit.data import load_dataset, list_datasets
    data = load_dataset("cifar10", limit=1000)          # ImageData, normalised float32 NCHW
    text = load_dataset("wikitext2", block_size=128)    # MLMData, int64 blocks + WordPiece
    batch = text.collator(generator=torch.Generator().manual_seed(0))(text.train[:32])

``data_dir=None`` means ``$NTKIT_DATA_DIR``, else ``~/.cache/ntkit/data``; ``digits`` is embedded
and needs no data dir. Missing or corrupt files raise :class:`ntkit.errors.DataError` naming the
file and what was expected; ``download=True`` fetches missing files from the published URLs
(see :mod:`ntkit.data.files`). Formats and splits are documented in :mod:`ntkit.data.images`
and :mod:`ntkit.data.text`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from ntkit._registry import Registry
from ntkit.data.files import SOURCES, download, resolve_cache_dir, resolve_data_dir
from ntkit.data.images import (
    ImageData,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_svhn,
    read_idx,
    val_split,
)
from ntkit.data.text import (
    MLMCollator,
    MLMData,
    WordCounts,
    load_tinyshakespeare,
    load_wikitext2,
    mask_tokens,
    word_counts,
)
from ntkit.errors import ConfigError

__all__ = [
    "DATASETS",
    "SOURCES",
    "ImageData",
    "MLMCollator",
    "MLMData",
    "WordCounts",
    "available_datasets",
    "download",
    "list_datasets",
    "load_dataset",
    "mask_tokens",
    "read_idx",
    "resolve_cache_dir",
    "resolve_data_dir",
    "val_split",
    "word_counts",
]

#: name -> loader ``f(data_dir=None, **kw) -> ImageData | MLMData``.
DATASETS: Registry[Callable[..., ImageData | MLMData]] = Registry("dataset")
DATASETS.add("digits", load_digits)
DATASETS.add("mnist", load_mnist)
DATASETS.add("fashion_mnist", load_fashion_mnist)
DATASETS.add("cifar10", load_cifar10)
DATASETS.add("cifar100", load_cifar100)
DATASETS.add("svhn", load_svhn)
DATASETS.add("wikitext2", load_wikitext2)
DATASETS.add("tinyshakespeare", load_tinyshakespeare)


def _idx_any(root: Path, folders: tuple[str, ...]) -> bool:
    return any(
        (root / f / s).is_file()
        for f in folders
        for s in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")
    )


_PRESENT: dict[str, Callable[[Path], bool]] = {
    "digits": lambda r: True,
    "mnist": lambda r: (r / "mnist.npz").is_file() or _idx_any(r, ("mnist", "MNIST/raw", ".")),
    "fashion_mnist": lambda r: (
        (r / "fashion_mnist.npz").is_file()
        or _idx_any(r, ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"))
    ),
    "cifar10": lambda r: (
        (r / "cifar-10-batches-py").is_dir()
        or (r / "cifar10.npz").is_file()
        or (r / "cifar10_subset.npz").is_file()
    ),
    "cifar100": lambda r: (r / "cifar-100-python").is_dir() or (r / "cifar100.npz").is_file(),
    "svhn": lambda r: any((r / d / "train_32x32.mat").is_file() for d in ("svhn", ".")),
    "wikitext2": lambda r: any((r / "wikitext-2" / n).is_file() for n in ("wiki.valid.tokens", "valid.txt")),
    "tinyshakespeare": lambda r: (r / "tinyshakespeare" / "input.txt").is_file(),
}


def list_datasets() -> list[str]:
    """All registered dataset names (sorted), whether or not their files are present."""
    return DATASETS.names()


def available_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Registered names whose files are found under the data dir (checks names only, reads nothing)."""
    root = resolve_data_dir(data_dir)
    return [n for n in DATASETS.names() if _PRESENT.get(n, lambda r: False)(root)]


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, **kw: object
) -> ImageData | MLMData:
    """Load dataset ``name`` (see :func:`list_datasets`); ``kw`` go to its loader.

    Image loaders take ``limit``, ``test_limit``, ``download``; text loaders take ``vocab_size``,
    ``block_size``, ``lowercase``, ``limit`` (blocks per split), ``cache_dir``, ``download``.

    Raises:
        ConfigError: unknown name or bad argument value.
        DataError: files missing (and ``download`` not set), truncated or corrupt.
    """
    loader = DATASETS.get(name)
    params = inspect.signature(loader).parameters
    for k, v in kw.items():
        if k not in params or k == "data_dir":
            allowed = ", ".join(p for p in params if p != "data_dir")
            raise ConfigError(f"{k}={v!r}: not an option of dataset {name!r} (options: {allowed})")
    return loader(data_dir, **kw)
