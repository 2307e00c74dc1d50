"""Image loaders: real files, every on-disk format (written to tmp_path), normalisation, errors."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ntkit.data import ImageData, available_datasets, list_datasets, load_dataset, read_idx, val_split
from ntkit.errors import ConfigError, DataError

# --------------------------------------------------------------------------- helpers


def _brute_normalise(train_raw: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """float64 reference: per-channel (x - mean) / std with population std of train_raw (NCHW)."""
    t = train_raw.astype(np.float64)
    mean = t.mean(axis=(0, 2, 3), keepdims=True)
    std = t.std(axis=(0, 2, 3), keepdims=True)
    return (raw.astype(np.float64) - mean) / std


def _check_image_data(d: ImageData, n_train: int, n_test: int, shape: tuple[int, int, int], k: int) -> None:
    assert d.train_x.shape == (n_train, *shape) and d.train_x.dtype == torch.float32
    assert d.test_x.shape == (n_test, *shape) and d.test_x.dtype == torch.float32
    assert d.train_y.shape == (n_train,) and d.train_y.dtype == torch.int64
    assert d.test_y.shape == (n_test,) and d.test_y.dtype == torch.int64
    assert d.in_shape == shape and d.num_classes == k
    assert int(d.train_y.min()) >= 0 and int(d.train_y.max()) < k
    m = d.train_x.double().mean(dim=(0, 2, 3))
    s = d.train_x.double().std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(m, torch.zeros_like(m), atol=1e-5, rtol=0)
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool = False, magic: int | None = None) -> Path:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">I", magic if magic is not None else 0x0800 + arr.ndim)
    head += struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _tiny_mnist(seed: int = 0, n_tr: int = 40, n_te: int = 15) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_tr, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_tr).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_te, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_te).astype(np.uint8),
    }


def _write_mnist_idx(folder: Path, a: dict[str, np.ndarray], gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / "train-images-idx3-ubyte", a["x_train"], gz=gz)
    _write_idx(folder / "train-labels-idx1-ubyte", a["y_train"], gz=gz)
    _write_idx(folder / "t10k-images-idx3-ubyte", a["x_test"], gz=gz)
    _write_idx(folder / "t10k-labels-idx1-ubyte", a["y_test"], gz=gz)


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert list_datasets() == sorted(
        ["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "wikitext2", "tinyshakespeare"]
    )
    with pytest.raises(ConfigError, match="dataset='nope'"):
        load_dataset("nope")
    with pytest.raises(ConfigError, match="limt=5: not an option of dataset 'digits'"):
        load_dataset("digits", limt=5)


def test_available_datasets(data_dir: Path, tmp_path: Path) -> None:
    assert available_datasets(tmp_path) == ["digits"]
    have = available_datasets(data_dir)
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "wikitext2", "tinyshakespeare"} <= set(have)


# --------------------------------------------------------------------------- digits (embedded)


def test_digits_without_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NTKIT_DATA_DIR", str(tmp_path / "does-not-exist"))
    d = load_dataset("digits")
    _check_image_data(d, 1437, 360, (1, 8, 8), 10)
    # the split is a partition of the 1797 images, identical on every call
    d2 = load_dataset("digits")
    assert torch.equal(d.train_x, d2.train_x) and torch.equal(d.test_y, d2.test_y)
    all_x = torch.cat([d.train_x, d.test_x]).flatten(1)
    assert torch.unique(all_x, dim=0).shape[0] >= 1790  # a handful of exact duplicates exist in the data
    assert torch.bincount(torch.cat([d.train_y, d.test_y])).tolist() == [
        178, 182, 177, 183, 181, 182, 181, 179, 174, 180,
    ]  # fmt: skip
    assert "1437/360" in d.note


def test_digits_matches_raw_file() -> None:
    from ntkit.data import images

    with gzip.open(images._EMBEDDED / "digits.csv.gz", "rt") as f:
        table = np.array([[int(v) for v in line.split(",")] for line in f])
    perm = np.random.RandomState(0).permutation(1797)
    raw_tr = table[perm[:1437], :64].reshape(-1, 1, 8, 8)
    raw_te = table[perm[1437:], :64].reshape(-1, 1, 8, 8)
    d = load_dataset("digits", limit=100, test_limit=50)
    ref = _brute_normalise(raw_tr[:100], raw_te[:50])
    np.testing.assert_allclose(d.test_x.double().numpy(), ref, atol=1e-5)
    assert d.test_y.tolist() == table[perm[1437:1487], 64].tolist()


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_like_real(data_dir: Path, name: str) -> None:
    d = load_dataset(name, data_dir, limit=2000, test_limit=500)
    _check_image_data(d, 2000, 500, (1, 28, 28), 10)
    with np.load(data_dir / f"{name}.npz") as z:
        xtr, ytr, xte, yte = (
            z["x_train"][:2000, None],
            z["y_train"][:2000],
            z["x_test"][:500, None],
            z["y_test"],
        )
    np.testing.assert_allclose(d.test_x.double().numpy(), _brute_normalise(xtr, xte), atol=1e-5)
    assert d.train_y.tolist() == ytr.tolist() and d.test_y.tolist() == yte[:500].tolist()
    assert d.note.startswith("MNIST first 2000/500 of 60k/10k" if name == "mnist" else "Fashion-MNIST first")


def test_full_files_match_readme_figures(data_dir: Path) -> None:
    """Golden figures from shared/data/README.md (published values), on the full files."""
    m = load_dataset("mnist", data_dir)
    assert (len(m.train_x), len(m.test_x)) == (60000, 10000)
    assert m.mean[0] / 255 == pytest.approx(0.1306604762738429, abs=1e-12)
    assert m.std[0] / 255 == pytest.approx(0.3081078, abs=1e-7)
    assert torch.bincount(m.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(m.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    f = load_dataset("fashion_mnist", data_dir)
    assert f.mean[0] / 255 == pytest.approx(0.2860405969887955, abs=1e-12)
    assert (
        torch.bincount(f.train_y).tolist() == [6000] * 10 and torch.bincount(f.test_y).tolist() == [1000] * 10
    )
    c = load_dataset("cifar10", data_dir)
    assert (len(c.train_x), len(c.test_x)) == (10000, 10000) and c.note == (
        "CIFAR-10 10k/10k subset, JPEG q75 (cifar10_subset.npz)"
    )
    assert sum(c.mean) / 3 / 255 == pytest.approx(0.4745, abs=5e-5)
    assert torch.bincount(c.test_y).tolist() == [1000] * 10


def test_cifar10_subset_real(data_dir: Path) -> None:
    d = load_dataset("cifar10", data_dir, limit=500, test_limit=200)
    _check_image_data(d, 500, 200, (3, 32, 32), 10)
    assert "subset, JPEG q75" in d.note and "cifar10_subset.npz" in d.note
    assert d.classes[:2] == ("airplane", "automobile")
    assert torch.bincount(d.train_y).tolist() == [50] * 10  # class-interleaved prefix
    with np.load(data_dir / "cifar10_subset.npz") as z:
        xtr = z["x_train"][:500].transpose(0, 3, 1, 2)
        xte = z["x_test"][:200].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(d.test_x.double().numpy(), _brute_normalise(xtr, xte), atol=1e-5)


def test_val_split(data_dir: Path) -> None:
    d = load_dataset("mnist", data_dir, limit=1000, test_limit=100)
    v = val_split(d, 0.1, seed=3)
    assert len(v.train_x) == 900 and v.val_x is not None and v.val_y is not None and len(v.val_x) == 100
    assert torch.equal(v.test_x, d.test_x)
    # train and val partition the original train split
    both = torch.cat([v.train_x, v.val_x]).flatten(1)
    orig = d.train_x.flatten(1)
    key = lambda t: sorted(map(tuple, t[:, 300:310].tolist()))
    assert key(both) == key(orig)
    assert torch.equal(val_split(d, 0.1, seed=3).val_y, v.val_y)
    assert not torch.equal(val_split(d, 0.1, seed=4).val_y, v.val_y)
    assert "val 100 held out" in v.note
    with pytest.raises(ConfigError, match="frac=1.5"):
        val_split(d, 1.5)


# --------------------------------------------------------------------------- every format, tmp files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_equals_npz(tmp_path: Path, gz: bool) -> None:
    a = _tiny_mnist()
    np.savez_compressed(_mk(tmp_path / "npz") / "mnist.npz", **a)
    _write_mnist_idx(tmp_path / "idx" / "mnist", a, gz=gz)
    d1 = load_dataset("mnist", tmp_path / "npz")
    d2 = load_dataset("mnist", tmp_path / "idx")
    assert torch.equal(d1.train_x, d2.train_x) and torch.equal(d1.test_x, d2.test_x)
    assert torch.equal(d1.train_y, d2.train_y) and torch.equal(d1.test_y, d2.test_y)
    assert "idx" in d2.note and "mnist.npz" in d1.note
    assert np.array_equal(read_idx(next((tmp_path / "idx" / "mnist").glob("t10k-labels*"))), a["y_test"])


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_fashion_idx_layout_torchvision(tmp_path: Path) -> None:
    a = _tiny_mnist(1)
    _write_mnist_idx(tmp_path / "FashionMNIST" / "raw", a, gz=True)
    d = load_dataset("fashion_mnist", tmp_path, limit=10)
    assert d.train_y.tolist() == a["y_train"][:10].tolist()


def _cifar_pickle(path: Path, x_nhwc: np.ndarray, labels: np.ndarray, key: bytes = b"labels") -> None:
    flat = x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), -1)
    with path.open("wb") as f:
        pickle.dump({b"data": flat, key: labels.tolist(), b"batch_label": b"x"}, f)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = _mk(tmp_path / "cifar-10-batches-py")
    xs = [rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) for _ in range(6)]
    ys = [rng.integers(0, 10, 6) for _ in range(6)]
    for i in range(5):
        _cifar_pickle(folder / f"data_batch_{i + 1}", xs[i], ys[i])
    _cifar_pickle(folder / "test_batch", xs[5], ys[5])
    # the same data as an .npz (which the batches take precedence over)
    np.savez(tmp_path / "cifar10.npz", x_train=np.concatenate(xs[:5]), y_train=np.concatenate(ys[:5]),
             x_test=xs[5], y_test=ys[5])  # fmt: skip
    d = load_dataset("cifar10", tmp_path)
    assert "cifar-10-batches-py" in d.note and d.train_x.shape == (30, 3, 32, 32)
    (folder / "data_batch_1").rename(tmp_path / "moved")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    d2 = load_dataset("cifar10", tmp_path)
    assert "cifar10.npz" in d2.note
    assert torch.equal(d.train_x, d2.train_x) and torch.equal(d.test_y, d2.test_y)


def test_cifar10_batches_limit_reads_prefix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = _mk(tmp_path / "cifar-10-batches-py")
    for i in range(5):
        _cifar_pickle(folder / f"data_batch_{i + 1}", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                      rng.integers(0, 10, 4))  # fmt: skip
    _cifar_pickle(folder / "test_batch", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.arange(4))
    (folder / "data_batch_5").write_bytes(b"garbage")  # never read when the limit is met earlier
    d = load_dataset("cifar10", tmp_path, limit=6)
    assert len(d.train_x) == 6 and "first 6/4 of 20/4" in d.note
    with pytest.raises(DataError, match="data_batch_5: cannot unpickle"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_python(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = _mk(tmp_path / "cifar-100-python")
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        flat = x.transpose(0, 3, 1, 2).reshape(n, -1)
        with (folder / split).open("wb") as f:
            pickle.dump({b"data": flat, b"fine_labels": list(range(100 - n, 100)) if split == "train" else [0] * n,
                         b"coarse_labels": [19] * n}, f)  # fmt: skip
    fine = load_dataset("cifar100", tmp_path)
    assert fine.num_classes == 100 and fine.train_y.tolist() == list(range(88, 100))
    coarse = load_dataset("cifar100", tmp_path, label_mode="coarse")
    assert coarse.num_classes == 20 and set(coarse.train_y.tolist()) == {19}
    with pytest.raises(ConfigError, match="label_mode='x'"):
        load_dataset("cifar100", tmp_path, label_mode="x")


def test_svhn_mat(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    folder = _mk(tmp_path / "svhn")
    for split, n in (("train", 7), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10, 1, 2, 3, 4, 5, 9][:n], dtype=np.uint8).reshape(-1, 1)
        scipy_io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "train":
            x_train = x
    d = load_dataset("svhn", tmp_path)
    assert d.train_y.tolist() == [0, 1, 2, 3, 4, 5, 9]  # label 10 is the digit 0
    ref = _brute_normalise(x_train.transpose(3, 2, 0, 1), x_train.transpose(3, 2, 0, 1))
    np.testing.assert_allclose(d.train_x.double().numpy(), ref, atol=1e-5)
    (folder / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="test_32x32.mat: cannot read"):
        load_dataset("svhn", tmp_path)


# --------------------------------------------------------------------------- errors


def test_missing_files_name_path_and_expected(tmp_path: Path) -> None:
    for name, expected in [
        ("mnist", "mnist.npz or"),
        ("fashion_mnist", "fashion_mnist.npz"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train,test}_32x32.mat"),
    ]:
        with pytest.raises(DataError) as e:
            load_dataset(name, tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path) in msg and expected in msg and "download=True" in msg


def test_corrupt_npz(tmp_path: Path) -> None:
    a = _tiny_mnist()
    good = tmp_path / "good.npz"
    np.savez_compressed(good, **a)
    raw = good.read_bytes()
    cases = {
        "garbage": b"this is not a zip file at all",
        "truncated": raw[: len(raw) // 2],
    }
    npy = io.BytesIO()
    np.save(npy, a["x_train"])
    cases["npy"] = npy.getvalue()
    for label, data in cases.items():
        d = _mk(tmp_path / label)
        (d / "mnist.npz").write_bytes(data)
        with pytest.raises(DataError, match=r"mnist\.npz: (cannot read|holds a single ndarray)") as e:
            load_dataset("mnist", d)
        assert "\n" not in str(e.value), label


def test_npz_wrong_content(tmp_path: Path) -> None:
    a = _tiny_mnist()
    bad = {
        "shape": ({**a, "x_train": a["x_train"][:, :20]}, r"train images are uint8 \[40, 1, 20, 28\]"),
        "dtype": ({**a, "x_test": a["x_test"].astype(np.float32)}, "test images are float32"),
        "nlabels": ({**a, "y_train": a["y_train"][:-1]}, "train labels are uint8 \\[39\\] for 40 images"),
        "range": ({**a, "y_test": a["y_test"] + 10}, "test labels span"),
        "missing": ({k: v for k, v in a.items() if k != "y_test"}, "missing arrays y_test"),
    }
    for label, (arrays, pattern) in bad.items():
        d = _mk(tmp_path / label)
        np.savez(d / "mnist.npz", **arrays)
        with pytest.raises(DataError, match=pattern):
            load_dataset("mnist", d)


def test_idx_errors(tmp_path: Path) -> None:
    a = _tiny_mnist()
    f = _write_idx(tmp_path / "img-idx3-ubyte", a["x_train"])
    assert read_idx(f, 3).shape == (40, 28, 28)
    data = f.read_bytes()
    (tmp_path / "trunc").write_bytes(data[:-5])
    with pytest.raises(DataError, match=r"trunc: truncated idx file: 31355 data bytes; expected 31360"):
        read_idx(tmp_path / "trunc", 3)
    with pytest.raises(DataError, match=r"idx magic is 0x00000803; expected 0x00000801"):
        read_idx(f, 1)
    bad_magic = _write_idx(tmp_path / "bad", a["x_train"], magic=0x12345678)
    with pytest.raises(DataError, match="idx magic is 0x12345678"):
        read_idx(bad_magic)
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DataError, match=r"trunc.gz: cannot read \(EOFError"):
        read_idx(tmp_path / "trunc.gz")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated idx file"):
        read_idx(tmp_path / "tiny")


def test_truncated_idx_via_loader(tmp_path: Path) -> None:
    a = _tiny_mnist()
    folder = tmp_path / "mnist"
    _write_mnist_idx(folder, a)
    p = folder / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: truncated idx file"):
        load_dataset("mnist", tmp_path)
    (folder / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing idx files train-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path)


def test_bad_limit() -> None:
    with pytest.raises(ConfigError, match="limit=0"):
        load_dataset("digits", limit=0)
