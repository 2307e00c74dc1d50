"""Image classification datasets: readers for the standard file formats and one result type.

Every loader returns an :class:`ImageData`: float32 images [N, C, H, W] normalised with the
per-channel mean and (population) standard deviation of the *returned* train split, int64
labels [N]. Readers check what they read (idx magic and length, npz array names, dtypes and
shapes, label ranges) and raise :class:`ntkit.errors.DataError` naming the file and what was
expected.

Formats, first match wins:

=================  ===========================================================================
dataset            files under the data dir
=================  ===========================================================================
mnist              ``mnist.npz``; idx ``{mnist,MNIST/raw,.}/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
fashion_mnist      ``fashion_mnist.npz``; idx as above under ``fashion_mnist``, ``fashion-mnist``, ``FashionMNIST/raw``
cifar10            ``cifar-10-batches-py/`` (python pickles); ``cifar10.npz``; ``cifar10_subset.npz``
cifar100           ``cifar-100-python/`` (python pickles); ``cifar100.npz``
svhn               ``{svhn,.}/{train,test}_32x32.mat`` (needs scipy)
digits             embedded (``ntkit/data/_embedded/digits.csv.gz``), never a data dir
=================  ===========================================================================

``.npz`` layout (as in shared/data/README.md): ``x_train`` uint8 [N, H, W] or [N, H, W, C],
``y_train`` integer [N], ``x_test``, ``y_test``, optional ``class_names``. The CIFAR python
batches are Python pickles — the one standard format read with :mod:`pickle`; only open files
you trust.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ntkit.data import files
from ntkit.data.files import resolve_data_dir
from ntkit.errors import DataError, check

__all__ = [
    "DIGITS_SPLIT",
    "ImageData",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_svhn",
    "read_idx",
    "val_split",
]

_EMBEDDED = Path(__file__).resolve().parent / "_embedded"

#: Train / test sizes of the fixed digits split (``RandomState(0).permutation(1797)``).
DIGITS_SPLIT = (1437, 360)


@dataclass(frozen=True, eq=False)
class ImageData:
    """An image classification dataset, ready for a model.

    Attributes:
        name: registry name (``"mnist"``, …).
        train_x: float32 [N_train, C, H, W], normalised (see ``mean`` / ``std``).
        train_y: int64 [N_train], values in ``[0, num_classes)``.
        test_x: float32 [N_test, C, H, W], normalised with the *train* statistics.
        test_y: int64 [N_test].
        num_classes: number of classes.
        in_shape: (C, H, W).
        note: one line saying what this is, for reports (e.g. "CIFAR-10 10k/10k subset, JPEG q75").
        mean: per-channel mean of the raw train pixels (raw units, e.g. 0..255), length C.
        std: per-channel population std of the raw train pixels, length C.
        classes: class names when the files provide them, else ``()``.
        val_x: float32 [N_val, C, H, W] held out from train by :func:`val_split`, else None.
        val_y: int64 [N_val] or None.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_shape: tuple[int, int, int]
    note: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()
    val_x: Tensor | None = field(default=None)
    val_y: Tensor | None = field(default=None)

    def __repr__(self) -> str:
        val = "" if self.val_x is None else f", val={len(self.val_x)}"
        return (
            f"ImageData(name={self.name!r}, train={len(self.train_x)}{val}, test={len(self.test_x)}, "
            f"in_shape={self.in_shape}, num_classes={self.num_classes}, note={self.note!r})"
        )


def val_split(data: ImageData, frac: float = 0.1, seed: int = 0) -> ImageData:
    """Hold out a random ``frac`` of the train split as validation (``val_x`` / ``val_y``).

    The held-out indices come from ``torch.randperm`` with a generator seeded by ``seed``; both
    parts keep the original order. Normalisation is unchanged (statistics of the full train
    split; they use no labels). The note gains ``", val <n> held out of train (seed <seed>)"``.

    Returns:
        A new :class:`ImageData` with the reduced train split and the validation split.
    """
    check(0.0 < frac < 1.0, "frac", frac, "a fraction in (0, 1)")
    check(data.val_x is None, "data.val_x", "set", "data without a validation split yet")
    n = len(data.train_x)
    n_val = round(frac * n)
    check(0 < n_val < n, "frac", frac, f"a fraction leaving both parts non-empty for {n} train samples")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx = perm[:n_val].sort().values
    tr_idx = perm[n_val:].sort().values
    return replace(
        data,
        train_x=data.train_x[tr_idx],
        train_y=data.train_y[tr_idx],
        val_x=data.train_x[val_idx],
        val_y=data.train_y[val_idx],
        note=f"{data.note}, val {n_val} held out of train (seed {seed})",
    )


# --------------------------------------------------------------------------- normalisation


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and population std of uint8 [N, C, H, W], in float64."""
    c = x.shape[1]
    mean = np.empty(c)
    std = np.empty(c)
    levels = np.arange(256, dtype=np.float64)
    for ch in range(c):
        hist = np.bincount(np.ascontiguousarray(x[:, ch]).reshape(-1), minlength=256).astype(np.float64)
        total = hist.sum()
        m = (hist * levels).sum() / total
        mean[ch] = m
        std[ch] = math.sqrt(max((hist * (levels - m) ** 2).sum() / total, 0.0))
    return mean, std


def _normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Tensor:
    """uint8 [N, C, H, W] -> float32 tensor ``(x - mean[c]) / std[c]`` (std 0 treated as 1)."""
    out = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    for ch in range(x.shape[1]):
        out[:, ch].sub_(float(mean[ch])).div_(float(std[ch]) if std[ch] > 0 else 1.0)
    return out


@dataclass
class _Raw:
    """Raw arrays as read: uint8 [N, C, H, W] images, integer [N] labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    classes: tuple[str, ...] = ()
    n_train_total: int | None = None  # when only a prefix of the train files was read


def _limits(limit: int | None, test_limit: int | None) -> tuple[int | None, int | None]:
    check(limit is None or limit > 0, "limit", limit, "a positive int or None")
    check(test_limit is None or test_limit > 0, "test_limit", test_limit, "a positive int or None")
    return limit, limit if test_limit is None else test_limit


def _finish(
    name: str,
    raw: _Raw,
    num_classes: int,
    title: str,
    limit: int | None,
    test_limit: int | None,
    extra: str = "",
) -> ImageData:
    lim, tlim = _limits(limit, test_limit)
    n_tr, n_te = raw.n_train_total or len(raw.train_x), len(raw.test_x)
    trx, try_ = raw.train_x[:lim], raw.train_y[:lim]
    tex, tey = raw.test_x[:tlim], raw.test_y[:tlim]
    mean, std = _channel_stats(trx)
    size = f"{_k(n_tr)}/{_k(n_te)}"
    if len(trx) != n_tr or len(tex) != n_te:
        size = f"first {len(trx)}/{len(tex)} of {size}"
    note = f"{title} {size}{extra} ({raw.source})"
    return ImageData(
        name=name,
        train_x=_normalise(trx, mean, std),
        train_y=torch.from_numpy(try_.astype(np.int64)),
        test_x=_normalise(tex, mean, std),
        test_y=torch.from_numpy(tey.astype(np.int64)),
        num_classes=num_classes,
        in_shape=tuple(int(s) for s in trx.shape[1:]),  # type: ignore[arg-type]
        note=note,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        classes=raw.classes,
    )


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def _check_arrays(path: Path | str, raw: _Raw, hw: tuple[int, int], channels: int, num_classes: int) -> _Raw:
    """Validate shapes / dtypes / label ranges of freshly read arrays (images uint8 NCHW)."""
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        want = (
            f"uint8 [N, {channels}, {hw[0]}, {hw[1]}] images and integer [N] labels in 0..{num_classes - 1}"
        )
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (channels, *hw):
            raise DataError(f"{path}: {split} images are {x.dtype} {list(x.shape)}; expected {want}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{path}: {split} labels are {y.dtype} {list(y.shape)} for {len(x)} images; expected {want}"
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(
                f"{path}: {split} labels span {int(y.min())}..{int(y.max())}; expected 0..{num_classes - 1}"
            )
    return raw


# --------------------------------------------------------------------------- file readers


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format, optionally gzip-compressed) of unsigned bytes.

    Args:
        path: ``*-ubyte`` or ``*-ubyte.gz``.
        ndim: expected number of dimensions (3 for images, 1 for labels), or None.

    Returns:
        uint8 array (writable) with the dims from the header.

    Raises:
        DataError: unreadable / truncated gzip, magic mismatch, or wrong data length.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); expected an idx file") from e
    want = f"0x0000080{ndim}" if ndim else "0x000008NN"
    if len(data) < 4:
        raise DataError(f"{path}: truncated idx file ({len(data)} bytes); expected magic {want}")
    magic = struct.unpack(">I", data[:4])[0]
    nd = data[3]
    if data[:3] != b"\x00\x00\x08" or nd == 0 or (ndim is not None and nd != ndim):
        raise DataError(f"{path}: idx magic is 0x{magic:08x}; expected {want} (unsigned bytes, {ndim} dims)")
    header = 4 + 4 * nd
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{nd}I", data[4:header])
    n = math.prod(dims)
    got = len(data) - header
    if got != n:
        what = "truncated" if got < n else "oversized"
        raise DataError(f"{path}: {what} idx file: {got} data bytes; expected {n} for dims {list(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_npz(path: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    want = f"an np.savez archive with arrays {', '.join(names)}"
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single {type(z).__name__}; expected {want}")
        with z:
            missing = [k for k in names if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)}; expected {want}")
            return {k: z[k] for k in (*names, *[o for o in optional if o in z.files])}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, KeyError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); expected {want}") from e


def _npz_images(path: Path, hw: tuple[int, int], channels: int, num_classes: int, source: str) -> _Raw:
    """Read the shared/data ``.npz`` layout; images [N, H, W] or [N, H, W, C] -> NCHW."""
    z = _read_npz(path, ("x_train", "y_train", "x_test", "y_test"), optional=("class_names",))

    def to_nchw(x: np.ndarray) -> np.ndarray:
        if x.ndim == 3 and channels == 1:
            return x[:, None]
        if x.ndim == 4 and x.shape[-1] == channels and x.shape[1:3] == hw:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x  # wrong shape: reported by _check_arrays with the original dims

    raw = _Raw(to_nchw(z["x_train"]), z["y_train"], to_nchw(z["x_test"]), z["y_test"], source)
    if "class_names" in z:
        raw.classes = tuple(str(c) for c in z["class_names"].tolist())
    return _check_arrays(path, raw, hw, channels, num_classes)


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _idx_images(folder: Path, num_classes: int, source: str) -> _Raw:
    paths = [_idx_path(folder, s) for s in _IDX_FILES]
    missing = [s for s, p in zip(_IDX_FILES, paths) if p is None]
    if missing:
        raise DataError(f"{folder}: missing idx files {', '.join(m + '[.gz]' for m in missing)}")
    a = [read_idx(p, 3 if "images" in p.name else 1) for p in paths if p is not None]
    raw = _Raw(a[0][:, None], a[1], a[2][:, None], a[3], source)
    return _check_arrays(folder, raw, (28, 28), 1, num_classes)


def _unpickle(path: Path) -> dict[bytes, object]:
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(
            f"{path}: cannot unpickle ({type(e).__name__}: {e}); expected a CIFAR python batch"
        ) from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: holds a {type(d).__name__}; expected a CIFAR python batch dict")
    return d


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if b"data" not in d or label_key not in d:
        raise DataError(f"{path}: keys {sorted(d)}; expected b'data' and {label_key!r}")
    x = np.asarray(d[b"data"])
    y = np.asarray(d[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise DataError(
            f"{path}: data is {x.dtype} {list(x.shape)} with {len(y)} labels; expected uint8 [N, 3072], N labels"
        )
    return x.reshape(-1, 3, 32, 32), y


def _cifar_pickles(
    folder: Path, train: list[str], test: list[str], label_key: bytes, num_classes: int, need: int | None
) -> _Raw:
    missing = [f for f in (*train, *test) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}")
    xs, ys = [], []
    for f in train:  # stop early when a small limit is enough (batches hold 10k images each)
        x, y = _cifar_batch(folder / f, label_key)
        xs.append(x)
        ys.append(y)
        if need is not None and sum(len(v) for v in ys) >= need:
            break
    tx, ty = _cifar_batch(folder / test[0], label_key)
    raw = _Raw(np.concatenate(xs), np.concatenate(ys), tx, ty, folder.name)
    if len(xs) < len(train):
        raw.n_train_total = len(train) * len(xs[0])  # standard batches are equal-sized
    return _check_arrays(folder, raw, (32, 32), 3, num_classes)


# --------------------------------------------------------------------------- finding files


def _missing(name: str, root: Path, expected: str) -> DataError:
    return DataError(
        f"{name}: no data under {root}; expected {expected} (set data_dir / NTKIT_DATA_DIR, "
        f"or pass download=True)"
    )


def _maybe_download(name: str, root: Path, download: bool, expected: str) -> None:
    if not download:
        raise _missing(name, root, expected)
    files.download(name, root)


def _load_mnist_like(
    name: str,
    title: str,
    root: Path,
    npz: str,
    folders: tuple[str, ...],
    download: bool,
    limit: int | None,
    test_limit: int | None,
) -> ImageData:
    _limits(limit, test_limit)  # validate before touching files
    expected = f"{npz} or {{{','.join(folders)}}}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]"
    for attempt in range(2):
        if (root / npz).is_file():
            raw = _npz_images(root / npz, (28, 28), 1, 10, npz)
            return _finish(name, raw, 10, title, limit, test_limit)
        for sub in (*folders, "."):
            folder = root / sub
            if _idx_path(folder, _IDX_FILES[0]) is not None:
                src = "idx" if sub == "." else f"{sub}/ idx"
                return _finish(name, _idx_images(folder, 10, src), 10, title, limit, test_limit)
        if attempt == 0:
            _maybe_download(name, root, download, expected)
    raise _missing(name, root, expected)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    download: bool = False,
) -> ImageData:
    """MNIST (60k/10k, 1×28×28, 10 classes) from ``mnist.npz`` or idx files.

    Args:
        data_dir: see :func:`ntkit.data.files.resolve_data_dir`.
        limit: keep the first ``limit`` train (and test, unless ``test_limit``) samples.
        test_limit: keep the first ``test_limit`` test samples.
        download: fetch the idx files into ``<data_dir>/mnist/`` when nothing is found.
    """
    folders = ("mnist", "MNIST/raw")
    return _load_mnist_like(
        "mnist", "MNIST", resolve_data_dir(data_dir), "mnist.npz", folders, download, limit, test_limit
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    download: bool = False,
) -> ImageData:
    """Fashion-MNIST (60k/10k, 1×28×28, 10 classes) from ``fashion_mnist.npz`` or idx files.

    Arguments as :func:`load_mnist`; downloads go to ``<data_dir>/fashion_mnist/``.
    """
    folders = ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw")
    return _load_mnist_like(
        "fashion_mnist",
        "Fashion-MNIST",
        resolve_data_dir(data_dir),
        "fashion_mnist.npz",
        folders,
        download,
        limit,
        test_limit,
    )


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    download: bool = False,
) -> ImageData:
    """CIFAR-10 (3×32×32, 10 classes) from the best copy present.

    Order: ``cifar-10-batches-py/`` (full, lossless, 50k/10k), ``cifar10.npz`` (full),
    ``cifar10_subset.npz`` (10k/10k, class-interleaved so every prefix of 10·k is balanced;
    pixels decoded from JPEG quality 75 — the note says so). Downloads fetch the python batches.
    """
    root = resolve_data_dir(data_dir)
    expected = "cifar-10-batches-py/{data_batch_1..5,test_batch}, cifar10.npz or cifar10_subset.npz"
    lim, tlim = _limits(limit, test_limit)
    for attempt in range(2):
        folder = root / "cifar-10-batches-py"
        if folder.is_dir():
            raw = _cifar_pickles(
                folder, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10, lim
            )
            raw.classes = _CIFAR10_CLASSES
            return _finish("cifar10", raw, 10, "CIFAR-10", lim, tlim)
        for fname, extra in (("cifar10.npz", ""), ("cifar10_subset.npz", " subset, JPEG q75")):
            if (root / fname).is_file():
                raw = _npz_images(root / fname, (32, 32), 3, 10, fname)
                raw.classes = raw.classes or _CIFAR10_CLASSES
                return _finish("cifar10", raw, 10, "CIFAR-10", lim, tlim, extra)
        if attempt == 0:
            _maybe_download("cifar10", root, download, expected)
    raise _missing("cifar10", root, expected)


def load_cifar100(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    label_mode: str = "fine",
    download: bool = False,
) -> ImageData:
    """CIFAR-100 (3×32×32; 100 fine or 20 coarse classes) from ``cifar-100-python/`` or ``cifar100.npz``.

    Args:
        label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses; python format only).
    """
    check(label_mode in ("fine", "coarse"), "label_mode", label_mode, "'fine' or 'coarse'")
    root = resolve_data_dir(data_dir)
    k = 100 if label_mode == "fine" else 20
    expected = "cifar-100-python/{train,test} or cifar100.npz"
    lim, tlim = _limits(limit, test_limit)
    for attempt in range(2):
        folder = root / "cifar-100-python"
        if folder.is_dir():
            raw = _cifar_pickles(folder, ["train"], ["test"], f"{label_mode}_labels".encode(), k, None)
            meta = folder / "meta"
            if meta.is_file():
                names = _unpickle(meta).get(f"{label_mode}_label_names".encode(), [])
                raw.classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)  # type: ignore[union-attr]
            return _finish("cifar100", raw, k, f"CIFAR-100 ({label_mode})", lim, tlim)
        if (root / "cifar100.npz").is_file():
            check(label_mode == "fine", "label_mode", label_mode, "'fine' for cifar100.npz")
            raw = _npz_images(root / "cifar100.npz", (32, 32), 3, 100, "cifar100.npz")
            return _finish("cifar100", raw, 100, "CIFAR-100 (fine)", lim, tlim)
        if attempt == 0:
            _maybe_download("cifar100", root, download, expected)
    raise _missing("cifar100", root, expected)


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import scipy.io
    except ImportError as e:
        raise DataError(f"{path}: reading SVHN .mat files needs scipy (pip install scipy)") from e
    try:
        m = scipy.io.loadmat(path)
    except Exception as e:
        raise DataError(
            f"{path}: cannot read ({type(e).__name__}: {e}); expected a MATLAB file with X, y"
        ) from e
    if "X" not in m or "y" not in m:
        raise DataError(
            f"{path}: variables {sorted(k for k in m if not k.startswith('__'))}; expected X and y"
        )
    x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X is {list(x.shape)}; expected [32, 32, 3, N]")
    y = y.astype(np.int64)
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def load_svhn(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    download: bool = False,
) -> ImageData:
    """SVHN cropped digits (73,257/26,032, 3×32×32, 10 classes; label 10 read as 0).

    Files ``{svhn,.}/{train,test}_32x32.mat``; needs scipy (imported only here).
    """
    root = resolve_data_dir(data_dir)
    expected = "svhn/{train,test}_32x32.mat"
    lim, tlim = _limits(limit, test_limit)
    for attempt in range(2):
        for sub in ("svhn", "."):
            folder = root / sub
            if (folder / "train_32x32.mat").is_file() and (folder / "test_32x32.mat").is_file():
                trx, trY = _read_mat(folder / "train_32x32.mat")
                tex, teY = _read_mat(folder / "test_32x32.mat")
                raw = _check_arrays(folder, _Raw(trx, trY, tex, teY, "train/test_32x32.mat"), (32, 32), 3, 10)
                return _finish("svhn", raw, 10, "SVHN", lim, tlim)
        if attempt == 0:
            _maybe_download("svhn", root, download, expected)
    raise _missing("svhn", root, expected)


def load_digits(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    download: bool = False,
) -> ImageData:
    """scikit-learn's digits (1797 images, 1×8×8, 10 classes), embedded in ntkit.

    Fixed split: ``numpy.random.RandomState(0).permutation(1797)``, first 1437 train, last 360
    test (legacy RandomState streams are frozen by numpy's compatibility policy). ``data_dir``
    and ``download`` are accepted for a uniform signature and ignored. Raw pixels are 0..16.
    """
    del data_dir, download
    _limits(limit, test_limit)
    path = _EMBEDDED / "digits.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot read ({type(e).__name__}: {e}); expected 1797 rows of 65 ints"
        ) from e
    if table.shape != (1797, 65) or table[:, :64].min() < 0 or table[:, :64].max() > 16:
        raise DataError(
            f"{path}: table is {list(table.shape)}; expected 1797 rows of 64 pixels in 0..16 + label"
        )
    x = table[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8)
    y = table[:, 64]
    perm = np.random.RandomState(0).permutation(len(x))
    tr, te = perm[: DIGITS_SPLIT[0]], perm[DIGITS_SPLIT[0] :]
    raw = _Raw(x[tr], y[tr], x[te], y[te], "embedded scikit-learn copy, RandomState(0) split")
    raw.classes = tuple(str(i) for i in range(10))
    return _finish("digits", _check_arrays(path, raw, (8, 8), 1, 10), 10, "digits", limit, test_limit)
