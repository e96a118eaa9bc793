"""The soft-convolution layer.

A :class:`SoftConv2d` has the output positions of the matching ``nn.Conv2d``
but every unit ``(p, f)`` owns its kernel over a *support* of offsets around
the anchor of its nominal ``k x k`` window. Weights are stored as a shared
kernel plus per-position deviations, ``w_p = m + d_p``: the tied part is the
CNN, and the tying penalties fall on ``d``.

All penalties see a layer through one view: per-unit *kernel vectors* of
length ``K = C * Sh * Sw + 1`` (the last entry is the bias) with a boolean
existence mask of shape ``(L, K)``: an offset that falls outside the image at
a position does not exist there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftConv2d", "AxisGeometry", "axis_geometry"]


@dataclass(frozen=True)
class AxisGeometry:
    """Geometry of one spatial axis of a soft-conv layer.

    Attributes
    ----------
    size : int
        Input length along the axis.
    kernel_size, stride : int
        Nominal window length and stride.
    n_out : int
        Number of output positions (as ``nn.Conv2d``).
    pad_before, pad_after : int
        Zero padding of the matching ``nn.Conv2d`` (``pad_after`` may differ
        from ``pad_before`` for ``'same'`` with an even kernel).
    lo : int
        First support offset relative to the anchor (top-left corner of the
        nominal window). The nominal window is offsets ``[0, kernel_size)``.
    extent : int
        Number of support offsets, ``S``.
    """

    size: int
    kernel_size: int
    stride: int
    n_out: int
    pad_before: int
    pad_after: int
    lo: int
    extent: int

    def anchors(self) -> np.ndarray:
        return np.arange(self.n_out) * self.stride - self.pad_before

    def offsets(self) -> np.ndarray:
        return np.arange(self.lo, self.lo + self.extent)

    def exists(self) -> np.ndarray:
        """Boolean ``(n_out, extent)``: offset exists (falls in the image)."""
        pix = self.anchors()[:, None] + self.offsets()[None, :]
        return (pix >= 0) & (pix < self.size)

    def in_window(self) -> np.ndarray:
        """Boolean ``(extent,)``: offset lies in the nominal window."""
        off = self.offsets()
        return (off >= 0) & (off < self.kernel_size)


def axis_geometry(size: int, kernel_size: int, stride: int, padding: str, support) -> AxisGeometry:
    """Compute the geometry of one axis; ``support`` is an int or ``'full'``."""
    if padding == "valid":
        if size < kernel_size:
            raise ValueError(
                f"padding='valid' needs images at least as large as kernel_size={kernel_size} "
                f"but an image axis has length {size}; use padding='same' or a smaller kernel_size."
            )
        n_out = (size - kernel_size) // stride + 1
        pad_before = pad_after = 0
    elif padding == "same":
        n_out = math.ceil(size / stride)
        total = max((n_out - 1) * stride + kernel_size - size, 0)
        pad_before = total // 2
        pad_after = total - pad_before
    else:  # validated by the estimator; kept for direct users of the layer
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}.")
    first = -pad_before
    last = (n_out - 1) * stride - pad_before
    # Offsets that exist at some position: those reaching a pixel from an anchor.
    full_lo, full_hi = -last, size - 1 - first
    if support == "full":
        lo, hi = full_lo, full_hi
    else:
        lo = -((support - kernel_size) // 2)
        hi = lo + support - 1
        lo, hi = max(lo, full_lo), min(hi, full_hi)
    return AxisGeometry(size, kernel_size, stride, n_out, pad_before, pad_after, lo, hi - lo + 1)


class SoftConv2d(nn.Module):
    r"""Locally connected 2-D layer whose units may share, or not, their kernels.

    Unit ``(p, f)`` computes
    :math:`z_{f,p} = b_{p,f} + \sum_{c,\delta} w_{p,f,c,\delta}\, x_{c, a(p)+\delta}`
    with its own weights over the support offsets :math:`\delta`; ``w_p = m + d_p``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels ``C`` in and ``F`` out.
    kernel_size : int
        Nominal window ``k`` (the kernel of the CNN limit).
    input_shape : tuple of int
        ``(H, W)`` of the input images.
    stride : int, default=1
    padding : {'valid', 'same'}, default='valid'
    support : int or 'full', default='full'
        ``S x S`` window centred on the nominal window, or the whole image.
    formulation : {'auto', 'unfold', 'dense'}, default='auto'
        ``'unfold'``: batched matmul over unfolded patches; ``'dense'``: one
        GEMM with a gathered dense weight matrix (best when the support covers
        most of the image). ``'auto'`` picks by the share of the image covered.
    generator : torch.Generator, optional
        Source of randomness for the initial shared kernel.
    dtype, device : optional
        As for torch modules.

    Attributes
    ----------
    shared : Parameter of shape (F, K)
        Shared kernels ``m`` (bias last).
    deviation : Parameter of shape (L, F, K)
        Per-position deviations ``d_p``; initialised at zero, so the layer
        starts as a CNN.
    mask : Tensor of shape (L, K)
        ``True`` where the offset exists at the position.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_shape: tuple[int, int],
        *,
        stride: int = 1,
        padding: str = "valid",
        support: int | str = "full",
        formulation: str = "auto",
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> None:
        super().__init__()
        H, W = input_shape
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.input_shape = (H, W)
        self.gh = axis_geometry(H, kernel_size, stride, padding, support)
        self.gw = axis_geometry(W, kernel_size, stride, padding, support)
        self.support = support
        Sh, Sw = self.gh.extent, self.gw.extent
        self.output_shape = (self.gh.n_out, self.gw.n_out)
        L = self.gh.n_out * self.gw.n_out
        K = in_channels * Sh * Sw + 1
        if formulation == "auto":
            formulation = "dense" if 2 * Sh * Sw >= H * W else "unfold"
        if formulation not in ("unfold", "dense"):
            raise ValueError(f"formulation must be 'auto', 'unfold' or 'dense', got {formulation!r}.")
        self.formulation = formulation

        factory = {"dtype": dtype, "device": device}
        self.shared = nn.Parameter(torch.zeros(out_channels, K, **factory))
        self.deviation = nn.Parameter(torch.zeros(L, out_channels, K, **factory))
        # m = shared_scale * shared, d_p = deviation_scale * deviation: a diagonal
        # preconditioner (see set_scales); the model itself does not depend on it.
        self.register_buffer("shared_scale", torch.ones(K, **factory))
        self.register_buffer("deviation_scale", torch.ones(K, **factory))

        ex = self.gh.exists()[:, None, :, None] & self.gw.exists()[None, :, None, :]
        ex = np.broadcast_to(ex.reshape(L, 1, Sh * Sw), (L, in_channels, Sh * Sw)).reshape(L, -1)
        mask = np.concatenate([ex, np.ones((L, 1), dtype=bool)], axis=1)
        self.register_buffer("mask", torch.as_tensor(mask, device=device), persistent=False)
        win = np.outer(self.gh.in_window(), self.gw.in_window()).ravel()
        self.register_buffer("window", torch.as_tensor(win, device=device), persistent=False)
        if formulation == "dense":
            self._build_dense_index(device)
        self.reset_parameters(generator)

    # ------------------------------------------------------------------ init
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform shared kernel inside the nominal window; zero deviations."""
        C, k = self.in_channels, self.kernel_size
        bound = 1.0 / math.sqrt(C * k * k)
        with torch.no_grad():
            u = torch.rand(self.shared.shape, generator=generator, dtype=torch.float64)
            u = (2 * u - 1) * bound * math.sqrt(3.0)
            inside = torch.cat([self.window.cpu().repeat(C), torch.zeros(1, dtype=torch.bool)])
            u[:, ~inside] = 0.0
            u[:, -1] = (2 * torch.rand(self.out_channels, generator=generator, dtype=torch.float64) - 1) * bound
            self.shared.copy_(u.to(self.shared))
            self.deviation.zero_()

    def _build_dense_index(self, device) -> None:
        # For each position and pixel: index of the offset reaching it (or -1).
        gh, gw = self.gh, self.gw
        oh = np.arange(gh.size)[None, :] - gh.anchors()[:, None] - gh.lo  # (Lh, H)
        ow = np.arange(gw.size)[None, :] - gw.anchors()[:, None] - gw.lo  # (Lw, W)
        vh = (oh >= 0) & (oh < gh.extent)
        vw = (ow >= 0) & (ow < gw.extent)
        idx = oh[:, None, :, None] * gw.extent + ow[None, :, None, :]
        valid = vh[:, None, :, None] & vw[None, :, None, :]
        L = gh.n_out * gw.n_out
        idx = np.where(valid, idx, 0).reshape(L, -1)
        self.register_buffer("_dense_idx", torch.as_tensor(idx, device=device), persistent=False)
        self.register_buffer(
            "_dense_valid", torch.as_tensor(valid.reshape(L, -1), device=device), persistent=False
        )

    # ----------------------------------------------------------------- views
    @property
    def n_positions(self) -> int:
        return self.deviation.shape[0]

    @property
    def support_shape(self) -> tuple[int, int]:
        return (self.gh.extent, self.gw.extent)

    def set_scales(self, shared_scale: torch.Tensor, deviation_scale: torch.Tensor) -> None:
        """Re-express ``m`` and ``d`` in new per-entry scales ``(K,)`` without changing them.

        L-BFGS is sensitive to how differently the objective curves along
        parameters: a strong penalty makes the entries it charges stiff, and
        each ``d_p`` (one position) is curved about ``1/L`` as much as ``m``.
        Optimising ``m / c_m`` and ``d / c_d`` with ``c = 1 / sqrt(curvature)``
        (see :func:`softcnn.penalties.preconditioner`) evens this out, so
        fits reach the CNN limit at strong tying instead of crawling.
        """
        with torch.no_grad():
            self.shared.mul_(self.shared_scale / shared_scale)
            self.deviation.mul_(self.deviation_scale / deviation_scale)
            self.shared_scale.copy_(shared_scale)
            self.deviation_scale.copy_(deviation_scale)

    def shared_kernel(self) -> torch.Tensor:
        """The shared kernels ``m`` of shape ``(F, K)``."""
        return self.shared * self.shared_scale

    def deviations(self) -> torch.Tensor:
        """Deviations ``d_p`` of shape ``(L, F, K)`` (all offsets)."""
        return self.deviation * self.deviation_scale

    def kernels(self) -> torch.Tensor:
        """Effective kernel vectors ``m + d_p`` of shape ``(L, F, K)``, zero where absent."""
        return (self.shared_kernel().unsqueeze(0) + self.deviations()) * self.mask.unsqueeze(1)

    def masked_deviation(self) -> torch.Tensor:
        """Deviations ``d_p`` restricted to existing offsets, ``(L, F, K)``."""
        return self.deviations() * self.mask.unsqueeze(1)

    def mean_kernel(self) -> torch.Tensor:
        """Mean of the effective kernels over the positions where each offset exists, ``(F, K)``."""
        count = self.mask.sum(0).clamp(min=1).to(self.shared.dtype)
        return self.kernels().sum(0) / count

    def kernel_levels(self) -> np.ndarray:
        """Per offset ``(Sh, Sw)``: the size of the smallest centred window containing it.

        Windows of size ``s`` are ``[⌈(k - s)/2⌉, ⌈(k - s)/2⌉ + s)`` along each
        axis (relative to the anchor): the nominal window for ``s = k``,
        centred on it when ``s - k`` is even and one half-pixel off towards
        the bottom/right otherwise, so the windows of sizes 1, 2, 3, … are
        nested and each adds a half-ring.
        """
        k = self.kernel_size

        def axis_levels(offsets):
            s = np.arange(1, 2 * (np.abs(offsets).max() + k) + 2)
            start = -((s - k) // 2)  # ceil((k - s) / 2)
            inside = (offsets[:, None] >= start[None, :]) & (offsets[:, None] < start[None, :] + s[None, :])
            return s[inside.argmax(1)]

        return np.maximum.outer(axis_levels(self.gh.offsets()), axis_levels(self.gw.offsets()))

    @torch.no_grad()
    def canonicalize(self) -> None:
        """Where an entry's effective weight is 0 at every existing position, set ``m`` and ``d`` to 0.

        The model is unchanged; pruned entries stop counting as deviations.
        """
        w = self.kernels()
        dead = ~(w != 0).any(0)  # (F, K)
        if dead.any():
            self.shared.masked_fill_(dead, 0.0)
            self.deviation.masked_fill_(dead.unsqueeze(0), 0.0)

    @torch.no_grad()
    def snap(self, threshold: float) -> int:
        """Set deviations and weights smaller than ``threshold`` in magnitude to exactly 0.

        First deviations ``|d_p| < τ`` (exact ties with ``m``), then effective
        weights ``|w_p| < τ`` (biases excluded; ``d_p = -m``), at existing
        offsets. Returns how many entries were changed.
        """
        if threshold <= 0:
            self.canonicalize()
            return 0
        ex = self.mask.unsqueeze(1)
        m = self.shared_kernel().unsqueeze(0)
        d = self.deviations()
        small_d = ex & (d != 0) & (d.abs() < threshold)
        d = torch.where(small_d, torch.zeros_like(d), d)
        w = m + d
        small_w = ex & (w != 0) & (w.abs() < threshold)
        small_w[..., -1] = False
        d = torch.where(small_w, -m.expand_as(d), d)
        self.deviation.copy_(d / self.deviation_scale)
        self.canonicalize()
        return int(small_d.sum() + small_w.sum())

    def offset_map(self, values: torch.Tensor, bias_value: float = 0.0) -> torch.Tensor:
        """Spread a per-offset ``(Sh, Sw)`` map over the kernel vector ``(K,)``."""
        flat = values.reshape(-1).repeat(self.in_channels)
        return torch.cat([flat, flat.new_full((1,), bias_value)])

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        L, Fo, K = self.deviation.shape
        w = self.kernels()
        weight, bias = w[..., :-1], w[..., -1]  # (L, F, K-1), (L, F)
        if self.formulation == "dense":
            Sh, Sw = self.support_shape
            C = self.in_channels
            wk = weight.reshape(L, Fo, C, Sh * Sw)
            idx = self._dense_idx.unsqueeze(1).unsqueeze(1).expand(L, Fo, C, -1)
            dense = wk.gather(-1, idx) * self._dense_valid.unsqueeze(1).unsqueeze(1)
            out = x.reshape(n, -1) @ dense.reshape(L * Fo, -1).T  # (n, L*F)
            out = out.reshape(n, L, Fo) + bias
        else:
            cols = self._unfold(x)  # (n, K-1, L)
            out = torch.bmm(cols.permute(2, 0, 1), weight.transpose(1, 2))  # (L, n, F)
            out = out.permute(1, 0, 2) + bias
        return out.permute(0, 2, 1).reshape(n, Fo, *self.output_shape)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = self.gh, self.gw
        pads = []
        for g in (gw, gh):  # F.pad takes the last axis first
            before = g.pad_before - g.lo
            after = (g.n_out - 1) * g.stride + g.extent - g.size - before
            pads += [before, after]
        x = F.pad(x, pads)  # negative values crop: offsets that never exist
        return F.unfold(x, (gh.extent, gw.extent), stride=(gh.stride, gw.stride))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_shape={self.input_shape}, stride={self.stride}, padding={self.padding!r}, "
            f"support={self.support!r} -> {self.support_shape}, formulation={self.formulation!r}"
        )

    # ---------------------------------------------------------------- export
    def to_conv2d(self, size: int | None = None, out_channels=None, in_channels=None) -> nn.Sequential:
        """The ``nn.Conv2d`` (with explicit zero padding) of the mean kernel cropped to a window.

        Parameters
        ----------
        size : int, optional
            Kernel size of the conv: the centred window of that size (see
            :meth:`kernel_levels`); default the nominal ``kernel_size``.
        out_channels, in_channels : boolean array, optional
            Channels to keep (default all).

        Exact when the deviations and the weights outside the window are zero
        (and dropped channels carry no weight).
        """
        gh, gw, C = self.gh, self.gw, self.in_channels
        k = self.kernel_size if size is None else int(size)
        start = -((k - self.kernel_size) // 2)  # window offsets [start, start + k)
        mean = self.mean_kernel().detach()
        Sh, Sw = self.support_shape
        kern = mean[:, :-1].reshape(self.out_channels, C, Sh, Sw)
        bias = mean[:, -1]
        if out_channels is not None:
            idx = torch.as_tensor(np.flatnonzero(out_channels), device=kern.device)
            kern, bias = kern[idx], bias[idx]
        if in_channels is not None:
            kern = kern[:, torch.as_tensor(np.flatnonzero(in_channels), device=kern.device)]
        Fo, Ci = kern.shape[:2]
        full = kern.new_zeros(Fo, Ci, k, k)
        # Copy the part of the window that lies in the support (all of it unless the
        # image is smaller than the kernel, where the rest never touches a pixel).
        h0, h1 = max(start, gh.lo), min(start + k, gh.lo + Sh)
        w0, w1 = max(start, gw.lo), min(start + k, gw.lo + Sw)
        full[:, :, h0 - start : h1 - start, w0 - start : w1 - start] = kern[
            :, :, h0 - gh.lo : h1 - gh.lo, w0 - gw.lo : w1 - gw.lo
        ]
        conv = nn.Conv2d(Ci, Fo, k, stride=self.stride, padding=0)
        conv = conv.to(dtype=full.dtype, device=full.device)
        with torch.no_grad():
            conv.weight.copy_(full)
            conv.bias.copy_(bias)
        pads = []
        for g in (gw, gh):  # input padding so that output i reads anchor(i) + [start, start + k)
            before = g.pad_before - start
            pads += [before, (g.n_out - 1) * g.stride + k - g.size - before]
        return nn.Sequential(nn.ZeroPad2d(tuple(pads)), conv)
