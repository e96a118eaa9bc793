"""Tests of softcnn.datasets."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.utils import Bunch

from softcnn.datasets import (
    get_data_home,
    load_digits_images,
    load_idx,
    load_mnist,
    load_mnist_folder,
    load_usps,
    make_soft_conv_data,
)


def _find_real_data() -> Path | None:
    env = os.environ.get("SOFTCNN_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    p = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return p if p.is_dir() else None


REAL_DATA = _find_real_data()
needs_data = pytest.mark.skipif(
    REAL_DATA is None, reason="real data folder ../shared/data not found; set SOFTCNN_DATA"
)


def _has(*parts: str) -> bool:
    return REAL_DATA is not None and (REAL_DATA.joinpath(*parts)).exists()


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def test_digits_images():
    ref = load_digits()
    X, y = load_digits_images(return_X_y=True)
    assert X.shape == (1797, 8, 8) and X.dtype == np.float64
    assert y.shape == (1797,) and np.issubdtype(y.dtype, np.integer)
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(X * 16, ref.images)
    np.testing.assert_array_equal(y, ref.target)

    b = load_digits_images(scale=False)
    assert isinstance(b, Bunch)
    np.testing.assert_array_equal(b.images, ref.images)
    np.testing.assert_array_equal(b.data, ref.data)
    assert b.data.shape == (1797, 64)
    np.testing.assert_array_equal(b.target_names, np.arange(10))
    assert isinstance(b.DESCR, str) and b.DESCR


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in arr.shape
    )
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for name, arr in [("img-idx3-ubyte", images), ("lab-idx1-ubyte", labels)]:
        data = _idx_bytes(arr, 0x08)
        path = tmp_path / (name + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(data) if compress else data)
        out = load_idx(path)
        assert out.dtype == np.uint8 and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)
    # the magic numbers are those of MNIST
    assert _idx_bytes(images, 0x08)[:4] == (0x00000803).to_bytes(4, "big")
    assert _idx_bytes(labels, 0x08)[:4] == (0x00000801).to_bytes(4, "big")


@pytest.mark.parametrize(
    "code, dtype",
    [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)],
)
def test_load_idx_general_types(tmp_path, code, dtype):
    arr = (np.arange(2 * 3 * 2 * 2) - 7).astype(dtype).reshape(2, 3, 2, 2)
    path = tmp_path / "x.idx"
    path.write_bytes(_idx_bytes(arr, code))
    out = load_idx(str(path))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0, 0] = 1  # writable


def test_load_idx_errors(tmp_path):
    good = _idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4), 0x08)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        load_idx(bad)
    bad.write_bytes(good[:2] + b"\x07" + good[3:])  # unknown type code
    with pytest.raises(ValueError, match="magic"):
        load_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(good[:-1])
    with pytest.raises(ValueError, match="truncated"):
        load_idx(short)
    shortgz = tmp_path / "short.gz"
    shortgz.write_bytes(gzip.compress(good[:-3]))
    with pytest.raises(ValueError, match="truncated"):
        load_idx(shortgz)
    brokengz = tmp_path / "broken.gz"
    brokengz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(ValueError):
        load_idx(brokengz)
    long = tmp_path / "long"
    long.write_bytes(good + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        load_idx(long)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError):
        load_idx(tiny)


def _write_fake_mnist(folder: Path, n_train=40, n_test=20, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = (np.arange(n) % 10).astype(np.uint8)
        pairs = [(f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labs)]
        for stem, arr in pairs:
            data = _idx_bytes(arr, 0x08)
            if gz:
                (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)


def test_mnist_layout_on_fake_data(tmp_path, monkeypatch):
    _write_fake_mnist(tmp_path / "mnist", gz=True)
    _write_fake_mnist(tmp_path / "fashion_mnist", gz=False)
    imgs, labs = load_mnist_folder(tmp_path / "mnist", "test")
    assert imgs.shape == (20, 28, 28) and imgs.dtype == np.uint8 and labs.dtype == np.int64

    X, y = load_mnist(data_home=tmp_path)
    assert X.shape == (40, 28, 28) and X.dtype == np.float64
    assert 0 <= X.min() and X.max() <= 1
    # data_home pointing directly at the folder with the IDX files; alias name
    X2, y2 = load_mnist("fashion-mnist", data_home=tmp_path / "fashion_mnist", subset="test")
    assert X2.shape == (20, 28, 28)
    # environment variable
    monkeypatch.setenv("SOFTCNN_DATA", str(tmp_path))
    b = load_mnist("fashion_mnist", return_X_y=False, scale=False, n_samples=20, random_state=0)
    assert b.images.dtype == np.uint8 and b.data.shape == (20, 784)
    assert len(b.target_names) == 10 and np.all(np.bincount(b.target) == 2)
    np.testing.assert_array_equal(b.indices, np.sort(b.indices))


def test_missing_data_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="SOFTCNN_DATA"):
        load_mnist(data_home=tmp_path)
    with pytest.raises(FileNotFoundError, match="data_home"):
        load_usps(data_home=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_data_home(tmp_path / "nope")
    monkeypatch.setenv("SOFTCNN_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="SOFTCNN_DATA"):
        load_mnist()
    monkeypatch.setenv("SOFTCNN_DATA", str(tmp_path))
    assert get_data_home() == tmp_path
    with pytest.raises(FileNotFoundError):
        load_mnist_folder(tmp_path)


def test_loader_argument_errors(tmp_path):
    _write_fake_mnist(tmp_path / "mnist")
    with pytest.raises(ValueError, match="kind"):
        load_mnist("cifar", data_home=tmp_path)
    with pytest.raises(ValueError, match="subset"):
        load_mnist(subset="validation", data_home=tmp_path)
    for bad in [0, 41, 2.5]:
        with pytest.raises(ValueError, match="n_samples"):
            load_mnist(n_samples=bad, data_home=tmp_path)
    with pytest.raises(ValueError, match="stratified"):
        load_mnist(n_samples=5, data_home=tmp_path)


# --------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------


@needs_data
@pytest.mark.skipif(not _has("mnist"), reason="mnist/ not in the data folder")
def test_real_mnist():
    X, y = load_mnist("mnist", data_home=REAL_DATA)
    assert X.shape == (60000, 28, 28) and y.shape == (60000,)
    assert X.min() == 0.0 and X.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    Xs, ys = load_mnist("mnist", data_home=REAL_DATA, n_samples=1000, random_state=0)
    assert Xs.shape == (1000, 28, 28)
    assert set(np.unique(ys)) <= set(range(10))
    expected = np.bincount(y, minlength=10) / len(y) * 1000
    counts = np.bincount(ys, minlength=10)
    assert np.all(np.abs(counts - expected) <= 2)
    assert np.all(np.abs(counts - 100) <= 15)  # MNIST classes are near-balanced
    Xs2, ys2 = load_mnist("mnist", data_home=REAL_DATA, n_samples=1000, random_state=0)
    np.testing.assert_array_equal(Xs, Xs2)


@needs_data
@pytest.mark.skipif(not _has("fashion_mnist"), reason="fashion_mnist/ not in the data folder")
def test_real_fashion_mnist_test():
    b = load_mnist("fashion_mnist", subset="test", data_home=REAL_DATA, return_X_y=False)
    assert b.images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(b.target), np.full(10, 1000))
    assert b.target_names[0] == "T-shirt/top"


@needs_data
@pytest.mark.skipif(not _has("usps", "usps.h5"), reason="usps/usps.h5 not in the data folder")
def test_real_usps():
    pytest.importorskip("h5py")
    X, y = load_usps(data_home=REAL_DATA)
    assert X.shape == (7291, 16, 16) and y.shape == (7291,)
    assert X.min() >= 0 and X.max() <= 1 and set(np.unique(y)) == set(range(10))
    b = load_usps(subset="test", n_samples=500, random_state=0, data_home=REAL_DATA,
                  return_X_y=False)
    assert b.images.shape == (500, 16, 16) and b.data.shape == (500, 256)


# --------------------------------------------------------------------------
# make_soft_conv_data
# --------------------------------------------------------------------------


def _brute_scores(X, info):
    """Teacher scores by explicit python loops (correlation, 'same' zero padding)."""
    n, H, W = X.shape
    _, _, C, k, _ = info.kernels.shape
    before = (k - 1) // 2
    n_scores = info.readout.shape[0]
    s = np.zeros((n, n_scores))
    for a in range(n):
        for h in range(H):
            for w in range(W):
                for c in range(C):
                    z = info.bias[c]
                    for i in range(k):
                        for j in range(k):
                            r, q = h - before + i, w - before + j
                            if 0 <= r < H and 0 <= q < W:
                                z += info.kernels[h, w, c, i, j] * X[a, r, q]
                    for o in range(n_scores):
                        s[a, o] += info.readout[o, c, h, w] * np.tanh(z)
    return s


@pytest.mark.parametrize("teacher", ["cnn", "regions", "local"])
@pytest.mark.parametrize("k", [3, 2])
def test_teacher_matches_brute_force(teacher, k):
    X, y, info = make_soft_conv_data(
        6, (4, 4), teacher=teacher, kernel_size=k, n_channels=2, noise=0.0, random_state=3
    )
    s = _brute_scores(X, info)[:, 0]
    np.testing.assert_allclose(y, s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(info.scores, s, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_cnn_teacher_matches_torch_conv():
    torch = pytest.importorskip("torch")
    X, _, info = make_soft_conv_data(5, (6, 7), teacher="cnn", kernel_size=4, n_channels=3,
                                     noise=0.0, random_state=0)
    conv = torch.nn.Conv2d(1, 3, 4, padding="same", bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(info.kernels[0, 0][:, None]))
        conv.bias.copy_(torch.from_numpy(info.bias))
        hidden = torch.tanh(conv(torch.from_numpy(X[:, None]))).numpy()  # (n, C, H, W)
    s = np.einsum("nchw,chw->n", hidden, info.readout[0])
    np.testing.assert_allclose(info.scores, s, rtol=1e-10, atol=1e-12)


def test_multiclass_matches_brute_force():
    X, y, info = make_soft_conv_data(8, (4, 4), teacher="local", task="classification",
                                     n_classes=3, noise=0.0, random_state=5)
    s = _brute_scores(X, info)
    assert info.readout.shape == (3, 2, 4, 4) and info.scores.shape == (8, 3)
    np.testing.assert_array_equal(y, np.argmax(s, axis=1))


def test_reproducible():
    a = make_soft_conv_data(50, teacher="regions", random_state=0)
    b = make_soft_conv_data(50, teacher="regions", random_state=0)
    c = make_soft_conv_data(50, teacher="regions", random_state=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2].kernels, b[2].kernels)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    rs = np.random.RandomState(0)
    d = make_soft_conv_data(50, teacher="regions", random_state=rs)
    np.testing.assert_array_equal(a[1], d[1])


def test_cnn_teacher_tying():
    X, y, info = make_soft_conv_data(20, (7, 5), teacher="cnn", n_channels=3, random_state=0)
    assert X.shape == (20, 7, 5) and X.dtype == np.float64
    assert info.kernels.shape == (7, 5, 3, 3, 3)
    assert np.all(info.kernels == info.kernels[0, 0])
    assert info.tying_deviation == 0
    np.testing.assert_array_equal(info.regions, np.zeros((7, 5)))
    assert info.teacher == "cnn"


def test_regions_teacher_tying():
    H, W = 6, 8
    _, _, info = make_soft_conv_data(20, (H, W), teacher="regions", random_state=0)
    left, right = info.kernels[:, : W // 2], info.kernels[:, W // 2 :]
    assert np.all(left == left[0, 0]) and np.all(right == right[0, 0])
    assert not np.allclose(left[0, 0], right[0, 0])
    assert info.tying_deviation > 0.1
    np.testing.assert_array_equal(info.regions[:, : W // 2], 0)
    np.testing.assert_array_equal(info.regions[:, W // 2 :], 1)
    # the definition of tying_deviation
    w = info.kernels.reshape(H * W, -1)
    expected = np.sum((w - w.mean(0)) ** 2) / np.sum(w**2)
    assert info.tying_deviation == pytest.approx(expected)


def test_local_teacher_tying():
    _, _, info = make_soft_conv_data(10, (8, 8), teacher="local", random_state=0)
    assert info.tying_deviation > 0.5
    np.testing.assert_array_equal(info.regions.ravel(), np.arange(64))
    flat = info.kernels.reshape(64, -1)
    assert len(np.unique(flat, axis=0)) == 64


def test_binary_classification_balanced():
    X, y, info = make_soft_conv_data(500, task="classification", noise=0.2, random_state=0)
    assert y.dtype == np.int64 and set(np.unique(y)) == {0, 1}
    assert np.mean(y) >= 0.3 and np.mean(y) <= 0.7
    assert info.readout.shape[0] == 1


def test_regression_noise_scale():
    X, y, info = make_soft_conv_data(2000, noise=0.5, random_state=0)
    assert np.all(np.isfinite(y)) and y.dtype == np.float64
    resid = y - info.scores
    assert info.noise_std == pytest.approx(0.5 * info.scores.std())
    assert resid.std() == pytest.approx(info.noise_std, rel=0.1)
    _, y0, info0 = make_soft_conv_data(50, noise=0.0, random_state=0)
    np.testing.assert_array_equal(y0, info0.scores)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_samples=0), "n_samples"),
        (dict(n_samples=2.5), "n_samples"),
        (dict(image_shape=(8,)), "image_shape"),
        (dict(image_shape=(0, 8)), "image_shape"),
        (dict(image_shape="ab"), "image_shape"),
        (dict(teacher="mlp"), "teacher.*'cnn', 'regions', 'local'"),
        (dict(task="ranking"), "task.*'regression', 'classification'"),
        (dict(n_channels=0), "n_channels"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(n_classes=1), "n_classes"),
        (dict(noise=-0.1), "noise"),
        (dict(noise=float("nan")), "noise"),
        (dict(teacher="regions", image_shape=(4, 1)), "width"),
    ],
)
def test_make_soft_conv_data_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_soft_conv_data(**kwargs)


# ------------------------------------------------------------------ teacher options
def test_kernel_scale_multiplies_the_kernels():
    _, _, base = make_soft_conv_data(30, (6, 6), teacher="regions", random_state=3)
    _, _, big = make_soft_conv_data(30, (6, 6), teacher="regions", kernel_scale=2.5, random_state=3)
    np.testing.assert_allclose(big.kernels, 2.5 * base.kernels)
    # scaling the kernels does not change how much they deviate from their mean
    assert big.tying_deviation == pytest.approx(base.tying_deviation)


def test_default_options_are_the_old_behaviour():
    a = make_soft_conv_data(40, (5, 7), teacher="local", random_state=1)
    b = make_soft_conv_data(40, (5, 7), teacher="local", kernel_scale=1.0, readout="dense",
                            random_state=1)
    for u, v in zip(a[:2], b[:2]):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a[2].readout, b[2].readout)


@pytest.mark.parametrize("task, n_classes", [("regression", 2), ("classification", 3)])
def test_sum_readout_is_shared_over_positions(task, n_classes):
    H, W = 5, 6
    X, y, info = make_soft_conv_data(50, (H, W), teacher="cnn", readout="sum", task=task,
                                     n_classes=n_classes, noise=0.0, random_state=0)
    r = info.readout
    assert r.shape == ((n_classes if task == "classification" and n_classes > 2 else 1), 2, H, W)
    np.testing.assert_array_equal(r, np.broadcast_to(r[:, :, :1, :1], r.shape))
    # the scores are the per-channel weight times the sum of the hidden units over positions
    from softcnn.datasets import _local_conv

    hidden = np.tanh(_local_conv(X, info.kernels) + info.bias)
    expected = np.einsum("nc,oc->no", hidden.sum(axis=(1, 2)), r[:, :, 0, 0])
    np.testing.assert_allclose(np.reshape(info.scores, expected.shape), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_scale=0.0), "kernel_scale"),
        (dict(kernel_scale=-1.0), "kernel_scale"),
        (dict(kernel_scale=float("inf")), "kernel_scale"),
        (dict(kernel_scale=True), "kernel_scale"),
        (dict(readout="mean"), "readout.*'dense', 'sum'"),
    ],
)
def test_teacher_option_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_soft_conv_data(**kwargs)
