"""Download path, exercised only against local files (file:// URLs and a patched transfer)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import stat
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

import ntkit.data.files as dl
from ntkit.data import load_dataset
from ntkit.data.files import SOURCES, RemoteFile, download, fetch, file_digest, resolve_data_dir
from ntkit.errors import DataError

TS_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_resolve_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NTKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir() == tmp_path / ".cache" / "ntkit" / "data"
    monkeypatch.setenv("NTKIT_DATA_DIR", str(tmp_path / "x"))
    assert resolve_data_dir() == tmp_path / "x"
    assert resolve_data_dir(tmp_path / "y") == tmp_path / "y"


def test_readme_digests(data_dir: Path) -> None:
    """The digests our SOURCES use for the text files match the shared copies (README values)."""
    valid, test = data_dir / "wikitext-2" / "valid.txt", data_dir / "wikitext-2" / "test.txt"
    assert file_digest(valid, "gitblob") == "eec944eb2d9e46061cd34a6913528797db6842fc"
    assert file_digest(test, "gitblob") == "6f3fc88e4cd88456ea892971f9f12243e8428624"
    by_dest = {rf.dest: rf.digest for rf in SOURCES["wikitext2"] + SOURCES["tinyshakespeare"]}
    assert by_dest["wikitext-2/valid.txt"] == f"sha256:{file_digest(valid, 'sha256')}"
    assert by_dest["wikitext-2/test.txt"] == f"sha256:{file_digest(test, 'sha256')}"
    assert by_dest["tinyshakespeare/input.txt"] == f"sha256:{TS_SHA}"
    assert file_digest(data_dir / "tinyshakespeare" / "input.txt", "sha256") == TS_SHA


def test_fetch_file_url(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "tinyshakespeare" / "input.txt"
    dest = tmp_path / "out" / "input.txt"
    fetch(src.as_uri(), dest, f"sha256:{TS_SHA}")
    assert dest.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert [p.name for p in dest.parent.iterdir()] == ["input.txt"]  # no temporary left


def test_fetch_bad_digest_leaves_nothing(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "tinyshakespeare" / "input.txt"
    dest = tmp_path / "input.txt"
    with pytest.raises(DataError, match=r"sha256 is 86c4e6aa.*expected 0000 \(corrupt or changed download\)"):
        fetch(src.as_uri(), dest, "sha256:0000")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="download of file:///nonexistent/x to .* failed"):
        fetch("file:///nonexistent/x", dest)
    assert list(tmp_path.iterdir()) == []


def test_load_with_mirror(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ntkit_cache: Path
) -> None:
    """End to end: missing files + download=True fetch from $NTKIT_DATA_MIRROR (a file:// URL)."""
    monkeypatch.setenv("NTKIT_DATA_MIRROR", data_dir.as_uri())
    root = tmp_path / "data"
    with pytest.raises(DataError, match="tinyshakespeare: no data under"):
        load_dataset("tinyshakespeare", root)
    d = load_dataset(
        "tinyshakespeare", root, download=True, limit=2, vocab_size=500, cache_dir=tmp_path / "c"
    )
    assert (root / "tinyshakespeare" / "input.txt").read_bytes() == (
        data_dir / "tinyshakespeare" / "input.txt"
    ).read_bytes()
    assert d.train.shape == (2, 128)
    # the shared mirror has no WikiText-2 train split: the error names the URL, nothing half-written
    with pytest.raises(DataError, match=r"download of file://.*wikitext-2/train\.txt .* failed"):
        download("wikitext2", root)
    assert not (root / "wikitext-2").exists() or list((root / "wikitext-2").iterdir()) == []


def _idx_gz(arr: np.ndarray) -> bytes:
    head = struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def test_mnist_download_patched_transfer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    blobs = {
        "train-images-idx3-ubyte.gz": _idx_gz(rng.integers(0, 256, (30, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx_gz(np.arange(30) % 10),
        "t10k-images-idx3-ubyte.gz": _idx_gz(rng.integers(0, 256, (8, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx_gz(np.arange(8) % 10),
    }
    url = "https://example.invalid/mnist/"
    monkeypatch.setitem(
        SOURCES,
        "mnist",
        tuple(
            RemoteFile(f"mnist/{n}", url + n, f"md5:{hashlib.md5(b, usedforsecurity=False).hexdigest()}")
            for n, b in blobs.items()
        ),
    )
    calls: list[str] = []

    def fake_urlopen_copy(u: str, out: Path) -> None:  # stands in for the network
        calls.append(u)
        out.write_bytes(blobs[u.rsplit("/", 1)[1]])

    monkeypatch.setattr(dl, "_urlopen_copy", fake_urlopen_copy)
    monkeypatch.delenv("NTKIT_DATA_MIRROR", raising=False)
    d = load_dataset("mnist", tmp_path, download=True)
    assert d.train_x.shape == (30, 1, 28, 28) and d.test_y.tolist() == list(range(8))
    assert sorted(calls) == sorted(url + n for n in blobs)
    load_dataset("mnist", tmp_path, download=True)  # present now: no second transfer
    assert len(calls) == 4


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_cifar10_download_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)

    def batch(n: int) -> bytes:
        return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [3] * n})

    members = {f"cifar-10-batches-py/data_batch_{i}": batch(2) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = batch(3)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "cifar-10-python.tar.gz").write_bytes(_tar_gz(members))
    digest = f"sha256:{file_digest(mirror / 'cifar-10-python.tar.gz', 'sha256')}"
    monkeypatch.setitem(
        SOURCES, "cifar10", (RemoteFile("cifar-10-python.tar.gz", "https://x.invalid/c.tgz", digest, True),)
    )
    monkeypatch.setenv("NTKIT_DATA_MIRROR", mirror.as_uri())
    d = load_dataset("cifar10", tmp_path / "data", download=True)
    assert d.train_x.shape == (10, 3, 32, 32) and set(d.train_y.tolist()) == {3}
    assert "cifar-10-batches-py" in d.note


def test_unsafe_archive_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "cifar-10-python.tar.gz").write_bytes(_tar_gz({"../evil.txt": b"x"}))
    monkeypatch.setitem(
        SOURCES, "cifar10", (RemoteFile("cifar-10-python.tar.gz", "https://x.invalid/c.tgz", None, True),)
    )
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: .*"):
        download("cifar10", tmp_path / "data", mirror=mirror.as_uri())
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(DataError, match="dataset='digits': nothing to download"):
        download("digits", tmp_path)
