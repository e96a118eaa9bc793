"""Validation of images, hyperparameters and devices (clear errors that name the fix)."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.utils.validation import check_scalar

__all__ = ["flatten_images", "resolve_image_shape", "resolve_device", "check_positive_ints"]


def flatten_images(X):
    """Flatten an image batch ``(n, H, W)`` or ``(n, C, H, W)`` to ``(n, d)``.

    Returns the 2-D array-like and the image shape ``(C, H, W)`` implied by X
    (``None`` for 2-D input, which sklearn's validation handles as it is:
    DataFrames keep their column names).
    """
    ndim = getattr(X, "ndim", None)
    if ndim is None and isinstance(X, (list, tuple)):
        ndim = np.ndim(X)
    if ndim is None or ndim <= 2:
        return X, None
    X = np.asarray(X)
    if X.ndim > 4:
        raise ValueError(
            f"X has {X.ndim} dimensions; expected (n, d), (n, H, W) or (n, C, H, W) images."
        )
    shape = (1, *X.shape[1:]) if X.ndim == 3 else X.shape[1:]
    return X.reshape(X.shape[0], -1), tuple(int(s) for s in shape)


def resolve_image_shape(image_shape, n_features: int, implied=None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` of the images from the ``image_shape`` parameter and X.

    ``'auto'``: the shape of 3-D/4-D X; for 2-D X a square grayscale image when
    ``n_features`` is a perfect square, otherwise a single row ``(1, 1, d)``.
    """
    if isinstance(image_shape, str) and image_shape == "auto":
        if implied is not None:
            return implied
        side = math.isqrt(n_features)
        return (1, side, side) if side * side == n_features else (1, 1, n_features)
    if (
        not isinstance(image_shape, (tuple, list))
        or len(image_shape) not in (2, 3)
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in image_shape)
    ):
        raise ValueError(
            f"image_shape must be 'auto', (H, W) or (C, H, W) with positive ints; got {image_shape!r}."
        )
    shape = tuple(int(s) for s in image_shape)
    shape = (1, *shape) if len(shape) == 2 else shape
    if implied is not None and implied != shape:
        raise ValueError(
            f"image_shape={image_shape!r} does not match X's images of shape {implied}; "
            "pass image_shape='auto' or reshape X."
        )
    if math.prod(shape) != n_features:
        raise ValueError(
            f"image_shape={image_shape!r} has {math.prod(shape)} pixels but X has {n_features} "
            "features per sample; pass the matching image_shape, or image_shape='auto'."
        )
    return shape


def resolve_device(device) -> torch.device:
    """``'auto'`` -> cuda, then mps, then cpu; an unavailable explicit device is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}.")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a valid torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False). Use device='cpu' or device='auto', or "
                "install a CUDA build of PyTorch."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "use device='cuda:0' or device='auto'."
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device={device!r} was requested but MPS is not available; use device='cpu' or 'auto'."
            )
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}.")
    return dev


def check_positive_ints(value, name: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    """An int or a sequence of ints >= 1 as a tuple."""
    if value is None:
        value = ()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or (not value and not allow_empty):
        raise ValueError(f"{name} must be an int or a non-empty tuple of ints >= 1; got {value!r}.")
    for v in value:
        check_scalar(v, name, numbers.Integral, min_val=1)
    return tuple(int(v) for v in value)


def warn_device_fallback(device: str) -> None:
    warnings.warn(
        f"This estimator was fitted on {device!r}, which is not available here; it was loaded "
        "on the CPU (device_='cpu').",
        UserWarning,
        stacklevel=3,
    )
