"""Image data sets and synthetic teacher data for soft convolution.

Real data sets (MNIST, Fashion-MNIST, USPS) are read from a local *data
folder*; nothing is ever downloaded. The folder is found, in order, from

1. the ``data_home`` argument of a loader,
2. the environment variable ``SOFTCNN_DATA``,
3. ``../shared/data`` relative to the current working directory, then
   ``../shared/data`` relative to the repository that holds this package.

The expected layout is::

    <data folder>/
        mnist/            train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
                          t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
        fashion_mnist/    (the same four file names)
        usps/usps.h5      train/data, train/target, test/data, test/target

:func:`make_soft_conv_data` draws synthetic data from a known one-layer
"teacher" network whose kernels are shared everywhere (a CNN), shared within
two image halves, or untied (a locally connected network), so that the
benefit of soft weight tying can be studied against a known truth.
"""

from __future__ import annotations

import gzip
import numbers
import os
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "get_data_home",
    "load_digits_images",
    "load_idx",
    "load_mnist",
    "load_mnist_folder",
    "load_usps",
    "make_soft_conv_data",
]

_ENV_VAR = "SOFTCNN_DATA"

# IDX type code -> (big-endian numpy dtype)
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_KINDS = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_FASHION_NAMES = np.array(
    [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
)

_TEACHERS = ("cnn", "regions", "local")
_READOUTS = ("dense", "sum")
_TASKS = ("regression", "classification")


# --------------------------------------------------------------------------
# data folder
# --------------------------------------------------------------------------


def _default_candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[1]
    candidates = [
        Path.cwd() / ".." / "shared" / "data",
        repo_root.parent / "shared" / "data",
    ]
    out: list[Path] = []
    for c in candidates:
        c = c.resolve()
        if c not in out:
            out.append(c)
    return out


def get_data_home(data_home: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds the real data sets.

    Parameters
    ----------
    data_home : str or path-like, default=None
        Explicit folder. When None, the environment variable
        ``SOFTCNN_DATA`` is used if set, else ``../shared/data`` relative to
        the current working directory, else ``../shared/data`` relative to the
        repository that contains the :mod:`softcnn` package.

    Returns
    -------
    path : pathlib.Path
        An existing directory. Nothing is created or downloaded.

    Raises
    ------
    FileNotFoundError
        If the explicit folder or the folder named by ``SOFTCNN_DATA`` does
        not exist, or if no default location exists. The message lists what
        was searched.

    Examples
    --------
    >>> from softcnn.datasets import get_data_home
    >>> get_data_home("/nonexistent/folder")  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    FileNotFoundError: data_home='/nonexistent/folder' is not a directory...
    """
    if data_home is not None:
        path = Path(data_home).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data_home={str(data_home)!r} is not a directory. Pass the folder "
                "that holds the data sets (e.g. mnist/, fashion_mnist/, usps/)."
            )
        return path
    env = os.environ.get(_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"The environment variable {_ENV_VAR}={env!r} does not name a directory. "
                "Point it at the folder that holds the data sets, or unset it."
            )
        return path
    candidates = _default_candidates()
    for c in candidates:
        if c.is_dir():
            return c
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        "No data folder found. Searched: the data_home argument (not given), "
        f"the environment variable {_ENV_VAR} (not set), and {searched}. "
        f"Pass data_home=<folder> or set {_ENV_VAR}=<folder>; softcnn never "
        "downloads data."
    )


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def load_digits_images(
    *, return_X_y: bool = False, scale: bool = True
) -> Bunch | tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's bundled 8x8 digits as images.

    Parameters
    ----------
    return_X_y : bool, default=False
        If True, return ``(X, y)`` instead of a Bunch.
    scale : bool, default=True
        If True, divide the pixel values (integers 0..16) by 16 so that they
        lie in ``[0, 1]``.

    Returns
    -------
    data : sklearn.utils.Bunch
        With ``images`` (1797, 8, 8) float64, ``data`` (1797, 64) the
        flattened images, ``target`` (1797,) int64, ``target_names``
        (0..9) and ``DESCR``.
    (X, y) : tuple of ndarray
        If ``return_X_y`` is True: images (1797, 8, 8) and labels (1797,).

    Examples
    --------
    >>> from softcnn.datasets import load_digits_images
    >>> X, y = load_digits_images(return_X_y=True)
    >>> X.shape, y.shape
    ((1797, 8, 8), (1797,))
    >>> float(X.max())
    1.0
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float64)
    if scale:
        images = images / 16.0
    target = np.asarray(d.target, dtype=np.int64)
    if return_X_y:
        return images, target
    return Bunch(
        images=images,
        data=images.reshape(len(images), -1),
        target=target,
        target_names=np.arange(10),
        DESCR=(
            "Optical recognition of handwritten digits (UCI), as bundled with "
            "scikit-learn: 1797 grey-scale 8x8 images, 10 classes, pixel values "
            "0..16" + (" divided by 16." if scale else ".")
        ),
    )


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"\x1f\x8b":  # gzip magic, whatever the file name
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (EOFError, OSError) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc}).") from exc
    return path.read_bytes()


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file, plain or gzip-compressed.

    The IDX format (used by MNIST) is a big-endian header: two zero bytes,
    one type-code byte, one byte giving the number of dimensions ``d``, then
    ``d`` unsigned 32-bit sizes, then the data in C order. Type codes:
    0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64. MNIST images have magic 0x00000803 (3-D uint8) and labels
    0x00000801 (1-D uint8).

    Parameters
    ----------
    path : str or path-like
        File to read. Gzip compression is detected from the file's content.

    Returns
    -------
    array : ndarray
        Array of shape given by the header, in native byte order
        (e.g. ``(n, rows, cols)`` uint8 for images, ``(n,)`` for labels).

    Raises
    ------
    ValueError
        If the magic number is invalid (non-zero leading bytes, unknown type
        code, zero dimensions) or the data size does not match the header
        (truncated file or trailing bytes).

    Examples
    --------
    >>> import tempfile, os, numpy as np
    >>> from softcnn.datasets import load_idx
    >>> header = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "labels-idx1-ubyte")
    ...     with open(p, "wb") as fh:
    ...         _ = fh.write(header + bytes([7, 2, 1]))
    ...     load_idx(p)
    array([7, 2, 1], dtype=uint8)
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes).")
    magic = int.from_bytes(raw[:4], "big")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08X}; expected 0x0000TTDD with type "
            "code TT in {08, 09, 0B, 0C, 0D, 0E} and DD >= 1 dimensions "
            "(e.g. 0x00000803 for images, 0x00000801 for labels)."
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header; {ndim} dimensions need {header_len} bytes "
            f"but the file has {len(raw)}."
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: header says shape {shape} of {dtype.name} "
            f"({expected} data bytes) but the file holds {actual} data bytes."
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


# --------------------------------------------------------------------------
# MNIST-like folders
# --------------------------------------------------------------------------


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # Accept the standard names and the common dotted variant
    # ("train-images.idx3-ubyte"), each gzipped or not.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        p = folder / name
        if p.is_file():
            return p
    return None


def _has_mnist_files(folder: Path, subset: str) -> bool:
    return all(_find_idx_file(folder, s) is not None for s in _MNIST_FILES[subset])


def _check_subset(subset: str) -> None:
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}.")


def load_mnist_folder(
    path: str | os.PathLike, subset: Literal["train", "test"] = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Read one subset of any folder in MNIST layout.

    The folder must hold ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each optionally ending in ``.gz``; the
    dotted variant ``train-images.idx3-ubyte`` is also accepted).

    Parameters
    ----------
    path : str or path-like
        The folder.
    subset : {"train", "test"}, default="train"
        Which pair of files to read.

    Returns
    -------
    images : ndarray of shape (n, rows, cols)
        Raw pixel values as stored (uint8 for MNIST).
    labels : ndarray of shape (n,)
        Labels as int64.

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    ValueError
        If a file is corrupt or images and labels disagree in number.

    Examples
    --------
    >>> from softcnn.datasets import load_mnist_folder
    >>> images, labels = load_mnist_folder("../shared/data/mnist", "test")  # doctest: +SKIP
    >>> images.shape, images.dtype  # doctest: +SKIP
    ((10000, 28, 28), dtype('uint8'))
    """
    _check_subset(subset)
    folder = Path(path)
    files = []
    for stem in _MNIST_FILES[subset]:
        p = _find_idx_file(folder, stem)
        if p is None:
            raise FileNotFoundError(
                f"{folder}: no file {stem} (or {stem}.gz) found; a folder in MNIST layout "
                "holds train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz)."
            )
        files.append(p)
    images = load_idx(files[0])
    labels = load_idx(files[1])
    if images.ndim != 3:
        raise ValueError(f"{files[0]}: expected a 3-D image array, got shape {images.shape}.")
    if labels.ndim != 1:
        raise ValueError(f"{files[1]}: expected a 1-D label array, got shape {labels.shape}.")
    if len(images) != len(labels):
        raise ValueError(
            f"{folder}: {len(images)} images but {len(labels)} labels in subset {subset!r}."
        )
    return images, labels.astype(np.int64)


def _stratified_indices(y: np.ndarray, n_samples, random_state) -> np.ndarray:
    n = len(y)
    if (
        not isinstance(n_samples, numbers.Integral)
        or isinstance(n_samples, bool)
        or not 1 <= n_samples <= n
    ):
        raise ValueError(f"n_samples must be None or an integer in [1, {n}], got {n_samples!r}.")
    if n_samples == n:
        return np.arange(n)
    try:
        idx, _ = train_test_split(
            np.arange(n), train_size=int(n_samples), stratify=y, random_state=random_state
        )
    except ValueError as exc:
        n_classes = len(np.unique(y))
        raise ValueError(
            f"Cannot draw a stratified subset of n_samples={n_samples} from {n} samples "
            f"with {n_classes} classes: both the subset and the rest must hold at least "
            f"{n_classes} samples ({exc})."
        ) from exc
    return np.sort(idx)


def load_mnist(
    kind: Literal["mnist", "fashion_mnist", "fashion-mnist"] = "mnist",
    *,
    subset: Literal["train", "test"] = "train",
    n_samples: int | None = None,
    data_home: str | os.PathLike | None = None,
    scale: bool = True,
    random_state=None,
    return_X_y: bool = True,
) -> Bunch | tuple[np.ndarray, np.ndarray]:
    """Load MNIST or Fashion-MNIST from local IDX files.

    Parameters
    ----------
    kind : {"mnist", "fashion_mnist"}, default="mnist"
        Which data set; ``"fashion-mnist"`` is accepted as an alias.
    subset : {"train", "test"}, default="train"
        The 60000 training or the 10000 test images.
    n_samples : int, default=None
        If given, return a stratified random subset of this size (class
        proportions kept, drawn with ``random_state``), in file order.
    data_home : str or path-like, default=None
        Data folder holding ``<kind>/`` (see :func:`get_data_home`), or a
        folder that itself holds the four IDX files.
    scale : bool, default=True
        If True, images are float64 in ``[0, 1]`` (pixel / 255). If False,
        the raw uint8 pixel values are returned.
    random_state : int, RandomState instance or None, default=None
        Seed of the subset draw.
    return_X_y : bool, default=True
        If False, return a Bunch.

    Returns
    -------
    (X, y) : tuple of ndarray
        Images of shape (n, 28, 28) and int64 labels of shape (n,).
    data : sklearn.utils.Bunch
        If ``return_X_y`` is False: ``images``, ``data`` (flattened, (n, 784)),
        ``target``, ``target_names`` (digits 0..9, or the Fashion-MNIST class
        names), ``indices`` (rows of the full subset that were kept) and
        ``DESCR``.

    Raises
    ------
    FileNotFoundError
        If no data folder or no IDX files are found; the message says what
        was searched and how to point softcnn at the data.

    Examples
    --------
    >>> from softcnn.datasets import load_mnist
    >>> X, y = load_mnist("fashion_mnist", n_samples=1000, random_state=0)  # doctest: +SKIP
    >>> X.shape  # doctest: +SKIP
    (1000, 28, 28)
    """
    if kind not in _MNIST_KINDS:
        raise ValueError(
            f"kind must be one of 'mnist', 'fashion_mnist' ('fashion-mnist'), got {kind!r}."
        )
    kind = _MNIST_KINDS[kind]
    _check_subset(subset)
    home = get_data_home(data_home)
    candidates = [home / kind]
    if kind == "fashion_mnist":
        candidates.append(home / "fashion-mnist")
    candidates.append(home)
    folder = next((c for c in candidates if c.is_dir() and _has_mnist_files(c, subset)), None)
    if folder is None:
        names = " and ".join(_MNIST_FILES[subset])
        searched = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"{kind} files ({names}, optionally .gz) not found; searched {searched}. "
            f"Pass data_home=<folder containing {kind}/> or set {_ENV_VAR}=<folder>; "
            "softcnn never downloads data."
        )
    images, labels = load_mnist_folder(folder, subset)
    if n_samples is not None:
        idx = _stratified_indices(labels, n_samples, random_state)
        images, labels = images[idx], labels[idx]
    else:
        idx = np.arange(len(labels))
    X = images.astype(np.float64) / 255.0 if scale else images
    if return_X_y:
        return X, labels
    pretty = "MNIST" if kind == "mnist" else "Fashion-MNIST"
    return Bunch(
        images=X,
        data=X.reshape(len(X), -1),
        target=labels,
        target_names=np.arange(10) if kind == "mnist" else _FASHION_NAMES.copy(),
        indices=idx,
        DESCR=(
            f"{pretty} {subset} subset read from {folder}: {len(X)} grey-scale "
            f"{images.shape[1]}x{images.shape[2]} images, 10 classes"
            + (", pixel values divided by 255." if scale else ", raw uint8 pixels.")
        ),
    )


# --------------------------------------------------------------------------
# USPS
# --------------------------------------------------------------------------


def load_usps(
    *,
    subset: Literal["train", "test"] = "train",
    n_samples: int | None = None,
    data_home: str | os.PathLike | None = None,
    random_state=None,
    return_X_y: bool = True,
) -> Bunch | tuple[np.ndarray, np.ndarray]:
    """Load the USPS handwritten digits (16x16) from ``usps/usps.h5``.

    Parameters
    ----------
    subset : {"train", "test"}, default="train"
        The 7291 training or the 2007 test images.
    n_samples : int, default=None
        If given, return a stratified random subset of this size, in file
        order.
    data_home : str or path-like, default=None
        Data folder holding ``usps/usps.h5`` (see :func:`get_data_home`); a
        folder holding ``usps.h5`` directly, or the file itself, also works.
    random_state : int, RandomState instance or None, default=None
        Seed of the subset draw.
    return_X_y : bool, default=True
        If False, return a Bunch.

    Returns
    -------
    (X, y) : tuple of ndarray
        Images (n, 16, 16) float64 in ``[0, 1]`` and int64 labels (n,).
    data : sklearn.utils.Bunch
        If ``return_X_y`` is False: ``images``, ``data`` (n, 256),
        ``target``, ``target_names``, ``indices`` and ``DESCR``.

    Raises
    ------
    ImportError
        If h5py is not installed.
    FileNotFoundError
        If ``usps.h5`` is not found.

    Examples
    --------
    >>> from softcnn.datasets import load_usps
    >>> X, y = load_usps(subset="test")  # doctest: +SKIP
    >>> X.shape  # doctest: +SKIP
    (2007, 16, 16)
    """
    _check_subset(subset)
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_usps needs h5py to read usps.h5; install it with `pip install h5py`."
        ) from exc
    if data_home is not None and Path(data_home).is_file():
        candidates = [Path(data_home)]
    else:
        home = get_data_home(data_home)
        candidates = [home / "usps" / "usps.h5", home / "usps.h5"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        searched = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"usps.h5 not found; searched {searched}. Pass data_home=<folder containing "
            f"usps/usps.h5> or set {_ENV_VAR}=<folder>; softcnn never downloads data."
        )
    with h5py.File(path, "r") as f:
        if subset not in f or "data" not in f[subset] or "target" not in f[subset]:
            raise ValueError(f"{path}: expected datasets {subset}/data and {subset}/target.")
        data = np.asarray(f[subset]["data"][()], dtype=np.float64)
        labels = np.asarray(f[subset]["target"][()]).astype(np.int64).ravel()
    side = int(round(np.sqrt(data.shape[1])))
    images = data.reshape(len(data), side, side)
    if n_samples is not None:
        idx = _stratified_indices(labels, n_samples, random_state)
        images, labels = images[idx], labels[idx]
    else:
        idx = np.arange(len(labels))
    if return_X_y:
        return images, labels
    return Bunch(
        images=images,
        data=images.reshape(len(images), -1),
        target=labels,
        target_names=np.arange(10),
        indices=idx,
        DESCR=(
            f"USPS {subset} subset read from {path}: {len(images)} grey-scale "
            f"{side}x{side} digit images in [0, 1], 10 classes (Hull, 1994)."
        ),
    )


# --------------------------------------------------------------------------
# synthetic teacher data
# --------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _same_padding(k: int) -> tuple[int, int]:
    before = (k - 1) // 2
    return before, k - 1 - before


def _local_conv(X: np.ndarray, kernels: np.ndarray, batch_elems: int = 1 << 22) -> np.ndarray:
    """Stride-1 'same' correlation with per-position kernels.

    ``X`` (n, H, W), ``kernels`` (H, W, C, k, k) -> (n, H, W, C).
    """
    n, H, W = X.shape
    C, k = kernels.shape[2], kernels.shape[3]
    before, after = _same_padding(k)
    Xp = np.pad(X, ((0, 0), (before, after), (before, after)))
    windows = sliding_window_view(Xp, (k, k), axis=(1, 2))  # (n, H, W, k, k)
    out = np.empty((n, H, W, C), dtype=np.float64)
    step = max(1, batch_elems // max(1, H * W * k * k))
    for s in range(0, n, step):
        out[s : s + step] = np.einsum("nhwij,hwcij->nhwc", windows[s : s + step], kernels)
    return out


def make_soft_conv_data(
    n_samples: int = 500,
    image_shape: tuple[int, int] = (8, 8),
    *,
    teacher: Literal["cnn", "regions", "local"] = "cnn",
    n_channels: int = 2,
    kernel_size: int = 3,
    task: Literal["regression", "classification"] = "regression",
    n_classes: int = 2,
    noise: float = 0.1,
    kernel_scale: float = 1.0,
    readout: Literal["dense", "sum"] = "dense",
    random_state=None,
) -> tuple[np.ndarray, np.ndarray, Bunch]:
    """Draw images and targets from a known one-layer teacher network.

    The images ``X`` are i.i.d. standard normal. The teacher is a
    stride-1 ``'same'``-padded convolution-like layer with ``n_channels``
    output channels and ``kernel_size x kernel_size`` kernels (correlation
    convention, as :class:`torch.nn.Conv2d`; zero padding
    ``(k - 1) // 2`` before and ``k - 1 - (k - 1) // 2`` after), followed by
    ``tanh`` and a fixed random linear read-out over the (channel, position)
    units (``readout``). The kernel used at each output position depends on
    ``teacher``:

    - ``"cnn"``: one kernel per channel, shared by every position;
    - ``"regions"``: columns ``< W // 2`` use one kernel per channel, the
      other columns another, drawn independently;
    - ``"local"``: every position has its own kernel (locally connected).

    Kernel entries are drawn ``kernel_scale * N(0, 1) / k`` (so each
    pre-activation has standard deviation about ``kernel_scale``: near 1 the
    ``tanh`` is mildly nonlinear, from about 2 on it saturates), per-channel
    biases N(0, 0.1^2), read-out weights N(0, 1) / sqrt(n_channels * H * W):
    one per (channel, position) with ``readout="dense"``, one per channel,
    shared by all positions (global sum pooling), with ``readout="sum"``.

    Parameters
    ----------
    n_samples : int, default=500
        Number of images.
    image_shape : tuple of 2 int, default=(8, 8)
        Image height and width ``(H, W)``.
    teacher : {"cnn", "regions", "local"}, default="cnn"
        How the teacher's kernels are tied across positions.
    n_channels : int, default=2
        Number of teacher channels.
    kernel_size : int, default=3
        Side ``k`` of the square kernels.
    task : {"regression", "classification"}, default="regression"
        Regression: ``y = s + noise * std(s) * e`` with ``e ~ N(0, 1)``, so
        ``noise`` is the noise-to-signal ratio. Classification with two
        classes: ``y = 1`` where the noisy score exceeds its median (balanced
        classes). With more classes there are ``n_classes`` read-outs and
        ``y`` is the argmax of the noisy scores (each score's noise scaled by
        its own standard deviation).
    n_classes : int, default=2
        Number of classes (classification only), at least 2.
    noise : float, default=0.1
        Noise-to-signal ratio, >= 0.
    kernel_scale : float, default=1.0
        Multiplies the teacher's kernels, > 0. Larger values make the teacher
        more nonlinear (``tanh`` saturates), so that it is no longer close to
        a linear map of the pixels that any student could fit equally well.
    readout : {"dense", "sum"}, default="dense"
        ``"dense"``: an independent read-out weight for every (channel,
        position) unit. ``"sum"``: one weight per channel, shared by all
        positions (global sum pooling, as in a CNN's global pooling head); the
        target then has few parameters besides the kernels, so the cost of
        estimating the kernels decides which student wins.
    random_state : int, RandomState instance or None, default=None
        Seed; the same seed gives identical output.

    Returns
    -------
    X : ndarray of shape (n_samples, H, W)
        Float64 images.
    y : ndarray of shape (n_samples,)
        Float64 targets (regression) or int64 labels (classification).
    info : sklearn.utils.Bunch
        ``kernels`` (H, W, n_channels, k, k): the kernel at each position;
        ``regions`` (H, W) int: region labels (all 0 for ``"cnn"``, 0/1 for
        the left/right halves of ``"regions"``, ``arange(H * W)`` for
        ``"local"``); ``tying_deviation``: the share of kernel energy not
        explained by the mean kernel,
        ``sum_p ||w_p - w_mean||^2 / sum_p ||w_p||^2`` (exactly 0 for
        ``"cnn"``); ``bias`` (n_channels,); ``readout``
        (n_scores, n_channels, H, W) (constant over positions for
        ``readout="sum"``) with ``n_scores = n_classes`` for
        classification with more than 2 classes and 1 otherwise; ``scores``
        (n_samples,) or (n_samples, n_classes): the noise-free teacher
        scores; ``noise_std``: the standard deviation of the added noise
        (per score); ``teacher``; ``task``.

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the bad value and
        the allowed ones.

    Examples
    --------
    >>> from softcnn.datasets import make_soft_conv_data
    >>> X, y, info = make_soft_conv_data(200, (8, 8), teacher="regions", random_state=0)
    >>> X.shape, y.shape, info.kernels.shape
    ((200, 8, 8), (200,), (8, 8, 2, 3, 3))
    >>> X, y, info = make_soft_conv_data(100, teacher="cnn", random_state=0)
    >>> info.tying_deviation
    0.0
    """
    n_samples = _check_int("n_samples", n_samples, 1)
    try:
        H, W = image_shape
        valid_shape = all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
            for v in (H, W)
        )
    except (TypeError, ValueError):
        valid_shape = False
    if not valid_shape:
        raise ValueError(
            f"image_shape must be a pair of positive integers (H, W), got {image_shape!r}."
        )
    H, W = int(H), int(W)
    if teacher not in _TEACHERS:
        raise ValueError(f"teacher must be one of {_TEACHERS}, got {teacher!r}.")
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}.")
    n_channels = _check_int("n_channels", n_channels, 1)
    k = _check_int("kernel_size", kernel_size, 1)
    n_classes = _check_int("n_classes", n_classes, 2)
    if (
        not isinstance(noise, numbers.Real)
        or isinstance(noise, bool)
        or not np.isfinite(noise)
        or noise < 0
    ):
        raise ValueError(f"noise must be a finite real number >= 0, got {noise!r}.")
    if (
        not isinstance(kernel_scale, numbers.Real)
        or isinstance(kernel_scale, bool)
        or not np.isfinite(kernel_scale)
        or kernel_scale <= 0
    ):
        raise ValueError(f"kernel_scale must be a finite real number > 0, got {kernel_scale!r}.")
    if readout not in _READOUTS:
        raise ValueError(f"readout must be one of {_READOUTS}, got {readout!r}.")
    if teacher == "regions" and W < 2:
        raise ValueError(
            f"teacher='regions' splits the image into left/right halves and needs width "
            f">= 2, got image_shape={image_shape!r}."
        )
    rng = check_random_state(random_state)

    X = rng.standard_normal((n_samples, H, W))

    if teacher == "cnn":
        regions = np.zeros((H, W), dtype=np.int64)
        n_regions = 1
    elif teacher == "regions":
        regions = np.broadcast_to((np.arange(W) >= W // 2).astype(np.int64), (H, W)).copy()
        n_regions = 2
    else:
        regions = np.arange(H * W, dtype=np.int64).reshape(H, W)
        n_regions = H * W
    region_kernels = rng.standard_normal((n_regions, n_channels, k, k)) / k
    if kernel_scale != 1.0:
        region_kernels = kernel_scale * region_kernels
    kernels = region_kernels[regions]  # (H, W, C, k, k)
    bias = 0.1 * rng.standard_normal(n_channels)

    multiclass = task == "classification" and n_classes > 2
    n_scores = n_classes if multiclass else 1
    if readout == "dense":
        readout_w = rng.standard_normal((n_scores, n_channels, H, W)) / np.sqrt(n_channels * H * W)
    else:
        per_channel = rng.standard_normal((n_scores, n_channels)) / np.sqrt(n_channels * H * W)
        readout_w = np.broadcast_to(per_channel[:, :, None, None], (n_scores, n_channels, H, W)).copy()

    hidden = np.tanh(_local_conv(X, kernels) + bias)  # (n, H, W, C)
    scores = np.einsum("nhwc,ochw->no", hidden, readout_w)  # (n, n_scores)
    noise_std = noise * scores.std(axis=0)
    noisy = scores + noise_std * rng.standard_normal(scores.shape)

    if task == "regression":
        y = noisy[:, 0].copy()
    elif not multiclass:
        y = (noisy[:, 0] > np.median(noisy[:, 0])).astype(np.int64)
    else:
        y = np.argmax(noisy, axis=1).astype(np.int64)

    if teacher == "cnn":
        tying_deviation = 0.0
    else:
        w = kernels.reshape(H * W, -1)
        total = float(np.sum(w**2))
        dev = float(np.sum((w - w.mean(axis=0)) ** 2))
        tying_deviation = dev / total if total > 0 else 0.0

    info = Bunch(
        kernels=kernels,
        regions=regions,
        tying_deviation=tying_deviation,
        bias=bias,
        readout=readout_w,
        scores=scores if multiclass else scores[:, 0],
        noise_std=noise_std if multiclass else float(noise_std[0]),
        teacher=teacher,
        task=task,
    )
    return X, y, info
