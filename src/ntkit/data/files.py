"""Where datasets live, and how users with internet access fetch them.

Directories:

* **data dir** — where the dataset files are read from (and downloaded to): the ``data_dir``
  argument, else ``$NTKIT_DATA_DIR``, else ``~/.cache/ntkit/data``.
* **cache dir** — derived artefacts (trained tokenizers, tokenized blocks): the ``cache_dir``
  argument, else ``$NTKIT_CACHE_DIR``, else ``~/.cache/ntkit``. Kept apart from the data dir
  because data dirs are often read-only (e.g. a shared offline copy).

Downloads never happen unless asked for (``download=True``). Every remote file has a known URL
and, where a published checksum exists, a hash (``"sha256:…"``, ``"md5:…"`` or ``"gitblob:…"`` —
the git blob id, which is how the WikiText-2 train split is identified in ``pytorch/examples``).
Files are written atomically (temporary file in the destination folder, checked, then renamed),
so an interrupted download never leaves a file that looks complete. ``$NTKIT_DATA_MIRROR`` (or
``mirror=``) replaces every URL by ``<mirror>/<relative destination path>`` — for internal mirrors
and for testing with ``file://`` URLs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ntkit.errors import DataError

__all__ = [
    "SOURCES",
    "RemoteFile",
    "atomic_write_bytes",
    "download",
    "fetch",
    "file_digest",
    "resolve_cache_dir",
    "resolve_data_dir",
]

_CHUNK = 1 << 20
_FILE_MODE = 0o644  # mkstemp creates 0600; data and cache files are meant to be shareable


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset as published.

    Attributes:
        dest: path relative to the data dir where the file is stored (POSIX separators).
        url: where to fetch it from.
        digest: ``"<algo>:<hex>"`` with algo in sha256 / md5 / gitblob, or None (no check).
        extract: for ``.tar.gz`` archives, extract into the data dir after download.
    """

    dest: str
    url: str
    digest: str | None = None
    extract: bool = False


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_WT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"

#: Known remote files per dataset name. The checksums are the published ones (torchvision's
#: md5 lists; the sha256 / git blob ids in shared/data/README.md for the text files).
SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": tuple(
        RemoteFile(f"mnist/{f}", _MNIST + f, f"md5:{h}")
        for f, h in [
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ]
    ),
    "fashion_mnist": tuple(
        RemoteFile(f"fashion_mnist/{f}", _FASHION + f, f"md5:{h}")
        for f, h in [
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ]
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "md5:c58f30108f718f92721af3b95e74349a",
            extract=True,
        ),
    ),
    "cifar100": (
        RemoteFile(
            "cifar-100-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "md5:eb9058c3a382ffc7106e4002c42a8d85",
            extract=True,
        ),
    ),
    "svhn": (
        RemoteFile(
            "svhn/train_32x32.mat",
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "md5:e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        RemoteFile(
            "svhn/test_32x32.mat",
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "md5:eb5a983be6a315427106f1b164d9cef3",
        ),
    ),
    "wikitext2": (
        RemoteFile(
            "wikitext-2/train.txt", _WT2 + "train.txt", "gitblob:2d84b35af79e411d73ea7cae83c73964c6ac83b4"
        ),
        RemoteFile(
            "wikitext-2/valid.txt",
            _WT2 + "valid.txt",
            "sha256:f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        ),
        RemoteFile(
            "wikitext-2/test.txt",
            _WT2 + "test.txt",
            "sha256:d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        ),
    ),
    "tinyshakespeare": (
        RemoteFile(
            "tinyshakespeare/input.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data dir: ``data_dir``, else ``$NTKIT_DATA_DIR``, else ``~/.cache/ntkit/data``."""
    if data_dir is None:
        data_dir = os.environ.get("NTKIT_DATA_DIR") or Path.home() / ".cache" / "ntkit" / "data"
    return Path(data_dir).expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache dir: ``cache_dir``, else ``$NTKIT_CACHE_DIR``, else ``~/.cache/ntkit``."""
    if cache_dir is None:
        cache_dir = os.environ.get("NTKIT_CACHE_DIR") or Path.home() / ".cache" / "ntkit"
    return Path(cache_dir).expanduser()


def file_digest(path: str | os.PathLike[str], algo: str) -> str:
    """Hex digest of a file: ``algo`` in ``sha256``, ``md5``, ``gitblob`` (git's blob sha1)."""
    path = Path(path)
    if algo == "gitblob":
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"blob {path.stat().st_size}\0".encode())
    elif algo in ("sha256", "md5"):
        h = hashlib.new(algo, usedforsecurity=False)
    else:
        raise DataError(f"digest algorithm={algo!r}: expected sha256, md5 or gitblob")
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_digest(path: Path, digest: str | None, what: str) -> None:
    if digest is None:
        return
    algo, _, want = digest.partition(":")
    got = file_digest(path, algo)
    if got != want.lower():
        raise DataError(f"{what}: {algo} is {got}, expected {want} (corrupt or changed download)")


def atomic_write_bytes(dest: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """Write ``data`` to ``dest`` through a temporary file in the same folder + rename.

    Args:
        exclusive: first writer wins: if ``dest`` already exists (e.g. another process wrote it
            meanwhile), leave it and return False. Used for artefacts that are not bit-reproducible
            (trained tokenizers), so concurrent processes end up sharing one.

    Returns:
        True if ``dest`` now holds ``data``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)
        if not exclusive:
            os.replace(tmp, dest)
            return True
        try:
            os.link(tmp, dest)  # atomic, fails if dest exists
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: best effort
            if dest.exists():
                return False
            os.replace(tmp, dest)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _urlopen_copy(url: str, out: Path) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "ntkit"})
    with urllib.request.urlopen(req, timeout=60) as r, out.open("wb") as f:
        shutil.copyfileobj(r, f, _CHUNK)


Fetcher = Callable[[str, Path], None]


def fetch(url: str, dest: Path, digest: str | None = None, *, fetcher: Fetcher | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically, checking ``digest`` before the file appears.

    Args:
        url: http(s) or file:// URL.
        dest: final path; its folder is created.
        digest: ``"<algo>:<hex>"`` or None.
        fetcher: ``fetcher(url, tmp_path)`` writes the bytes; default urllib.

    Raises:
        DataError: the transfer failed or the digest does not match (``dest`` is untouched).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            (fetcher or _urlopen_copy)(url, tmp)
        except OSError as e:  # URLError, HTTPError, socket errors are OSErrors
            raise DataError(f"download of {url} to {dest} failed: {e}") from e
        _check_digest(tmp, digest, f"download of {url}")
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _extract(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tf:
            try:
                tf.extractall(into, filter="data")
            except TypeError:  # Python without extraction filters: refuse unsafe members ourselves
                for m in tf.getmembers():
                    target = (into / m.name).resolve()
                    if not (m.isfile() or m.isdir()) or into.resolve() not in target.parents:
                        raise DataError(f"{archive}: unsafe archive member {m.name!r}") from None
                tf.extractall(into)
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(
            f"{archive}: cannot extract ({e}); expected a valid .tar.gz archive (delete it to download again)"
        ) from e


def download(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    mirror: str | None = None,
    fetcher: Fetcher | None = None,
    force: bool = False,
) -> list[Path]:
    """Fetch the files of dataset ``name`` into the data dir (skipping files already there).

    Args:
        name: a key of :data:`SOURCES`.
        data_dir: see :func:`resolve_data_dir`.
        mirror: base URL replacing the published ones (default ``$NTKIT_DATA_MIRROR``).
        fetcher: custom transfer function (see :func:`fetch`).
        force: re-download files that exist.

    Returns:
        The local paths of the files (archives are also extracted).
    """
    if name not in SOURCES:
        raise DataError(f"dataset={name!r}: nothing to download (known: {', '.join(sorted(SOURCES))})")
    root = resolve_data_dir(data_dir)
    mirror = mirror if mirror is not None else os.environ.get("NTKIT_DATA_MIRROR")
    out: list[Path] = []
    for rf in SOURCES[name]:
        dest = root / rf.dest
        url = f"{mirror.rstrip('/')}/{rf.dest}" if mirror else rf.url
        if force or not dest.exists():
            fetch(url, dest, rf.digest, fetcher=fetcher)
        if rf.extract:  # only reached when the loader found no extracted copy, so (re)extract
            _extract(dest, root)
        out.append(dest)
    return out
