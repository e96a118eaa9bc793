"""The soft-convolution layer.

A :class:`SoftConv2d` has the output positions of the matching ``nn.Conv2d``
but every unit ``(p, f)`` owns its kernel over a *support* of offsets around
the anchor of its nominal ``k x k`` window. Weights are stored as a shared
kernel plus per-position deviations, ``w_p = m + d_p``: the tied part is the
CNN, and the tying penalties fall on ``d``.

All penalties see a layer through one view: per-unit *kernel vectors* of
length ``K = C * Sh * Sw + 1`` (the last entry is the bias) with a boolean
existence mask of shape ``(L, K)``: an offset that falls outside the image at
a position does not exist there. How the deviations are stored is the layer's
business (with ``support='full'`` only the existing offsets are, about a
quarter of ``K``); everything else reads and writes them in that view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _kernels

__all__ = ["AxisGeometry", "NeighbourPairs", "SoftConv2d", "axis_geometry", "choose_tile", "tile_macs"]


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


@dataclass(frozen=True, eq=False)
class NeighbourPairs:
    """One kind of 4-neighbour pairs of positions (vertical or horizontal) in a layer's storage.

    ``t = values[rows].view(shape)`` for a tensor ``values`` in the layout of ``deviation``;
    ``t[first] - t[second]`` is then ``v_q - v_p`` for every entry (offset and channel) that
    exists at both positions ``p`` and ``q`` of every pair, times ``exists`` (0/1 numbers,
    broadcastable; None where the slices hold only such entries). ``position_dims`` are the
    dimensions of that difference indexing the pair (the others are the entries); ``axis`` is
    0 for vertical pairs, 1 for horizontal ones (a storage may hold a kind in several parts).
    """

    axis: int
    rows: slice
    shape: tuple
    first: tuple
    second: tuple
    exists: torch.Tensor | None
    position_dims: tuple

    def difference(self, values: torch.Tensor) -> torch.Tensor:
        """``v_q - v_p`` over the pairs, absent entries 0 (a new tensor; differentiable)."""
        t = values[self.rows].view(self.shape)
        diff = t[self.first] - t[self.second]
        return diff if self.exists is None else diff.mul_(self.exists)

    def add_adjoint_(self, out: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        """``out += D^T diff`` (in place) for a difference shaped as :meth:`difference`'s."""
        t = out[self.rows].view(self.shape)
        t[self.first] += diff
        t[self.second] -= diff
        return out


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


#: Formulations of :class:`SoftConv2d` (see its ``formulation`` parameter).
FORMULATIONS = ("auto", "tiled", "unfold", "dense")
#: :func:`choose_tile` models a tile's matmul with ``Q`` output columns (positions x channels
#: of the tile) as running at ``Q / (Q + TILE_HALF_RATE_COLUMNS)`` of the peak rate: narrow
#: products are slow (fitted on ``benchmarks/bench_layer.py --sweep``, see its README section).
TILE_HALF_RATE_COLUMNS = 64


@dataclass(frozen=True)
class _AxisTiles:
    """One axis of the tiling: ``n_tiles`` tiles of ``length`` outputs, each reading ``patch`` rows.

    The input, padded by ``pad_before``/``pad_after`` (negative: cropped), holds
    the patch of tile ``t`` at rows ``[t step, t step + patch)``. ``offset``
    ``(n_tiles, length, patch)`` is the support offset index (``0..S-1``)
    reaching each patch row from each output of the tile, ``valid`` whether
    it is one (in the support and in the image).
    """

    n_tiles: int
    length: int
    patch: int
    step: int
    pad_before: int
    pad_after: int
    offset: np.ndarray
    valid: np.ndarray


def _patch_length(g: AxisGeometry, length: int) -> int:
    """Rows read by a tile of ``length`` outputs; one tile reads only the rows in the image."""
    if length == g.n_out:
        a = g.anchors()
        return min(a[-1] + g.lo + g.extent, g.size) - max(a[0] + g.lo, 0)
    return (length - 1) * g.stride + g.extent


def _axis_tiles(g: AxisGeometry, length: int) -> _AxisTiles:
    n_tiles = g.n_out // length
    a = g.anchors()
    patch = _patch_length(g, length)
    if n_tiles == 1:
        step, starts = patch, np.array([max(a[0] + g.lo, 0)])
    else:
        step = length * g.stride
        starts = a[0] + g.lo + step * np.arange(n_tiles)
    rows = starts[:, None, None] + np.arange(patch)[None, None, :]
    offset = rows - a.reshape(n_tiles, length)[:, :, None] - g.lo
    valid = (offset >= 0) & (offset < g.extent) & (rows >= 0) & (rows < g.size)
    return _AxisTiles(n_tiles, length, patch, step, int(-starts[0]), int(starts[-1] + patch - g.size),
                      np.where(valid, offset, 0), valid)


def tile_macs(gh: AxisGeometry, gw: AxisGeometry, in_channels: int, out_channels: int,
              tile_shape: tuple[int, int]) -> int:
    """Multiply-adds per sample of the tiled forward with tiles of ``tile_shape`` outputs (bias excluded)."""
    th, tw = tile_shape
    tiles = (gh.n_out // th) * (gw.n_out // tw)
    return tiles * in_channels * _patch_length(gh, th) * _patch_length(gw, tw) * th * tw * out_channels


def choose_tile(gh: AxisGeometry, gw: AxisGeometry, in_channels: int, out_channels: int,
                formulation: str = "auto") -> tuple[int, int]:
    """Tile shape ``(th, tw)`` of a formulation; for ``'auto'``/``'tiled'`` the measured rule.

    Among the tiles whose sides divide the output shape, the one with the
    least modelled time ``MACs x (1 + TILE_HALF_RATE_COLUMNS / Q)``, fewer
    tiles on ties: ``MACs`` (:func:`tile_macs`) grows with the tile, as a
    patch larger than the support multiplies zeros, while the matmul's
    width ``Q = th tw F`` buys speed (:data:`TILE_HALF_RATE_COLUMNS`). For
    ``support='full'`` the whole output (``'dense'``) always wins: it has
    the fewest multiply-adds, no zeros. On the CPU this picks a tile within
    5% of the fastest in ``benchmarks/bench_layer.py --sweep`` for most
    geometries, at worst 1.24x (small passes of 3-11 ms).
    """
    if formulation == "unfold":
        return (1, 1)
    if formulation == "dense":
        return (gh.n_out, gw.n_out)
    best, best_key = None, None
    for th in _divisors(gh.n_out):
        for tw in _divisors(gw.n_out):
            q = th * tw * out_channels
            tiles = (gh.n_out // th) * (gw.n_out // tw)
            cost = Fraction(tile_macs(gh, gw, in_channels, out_channels, (th, tw)) * (q + TILE_HALF_RATE_COLUMNS), q)
            if best_key is None or (cost, tiles) < best_key:
                best, best_key = (th, tw), (cost, tiles)
    return best


def _divisors(m: int) -> list[int]:
    return [d for d in range(1, m + 1) if m % d == 0]


def _window_view(v: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """Per-offset values ``v`` ``(B, C Sh Sw)`` at each stored deviation: ``(C, H, W, B, Lh, Lw)``.

    For a support covering the image, the offset that reaches row
    ``(c, h, w)`` of the compact storage (pixel ``(c, H-1-h, W-1-w)``) from
    position ``(i, j)`` is ``(i sh + h, j sw + w)`` in the flipped support:
    each position reads a window of the flipped kernel (a Toeplitz matrix).
    A view of a copy unfolded along the columns, ``(C, B, W, Sh, Lw)``
    (about ``2 / Lh`` of the result's size): copying the result then reads
    runs of ``Lh Lw`` values at stride 1, not of ``Lw`` (1.5x faster at 8x8).
    """
    C, H, W, Lh, Lw, sh, sw = geometry
    Sh, Sw = H + (Lh - 1) * sh, W + (Lw - 1) * sw
    cols = v.reshape(-1, C, Sh, Sw).flip(2, 3).unfold(3, W, sw).permute(1, 0, 4, 2, 3).contiguous()
    return cols.unfold(3, H, sh).permute(0, 5, 2, 1, 3, 4)


def _window_adjoint(g: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """The adjoint of :func:`_window_view`: ``(C H W, B, L)`` summed onto the offsets, ``(B, C Sh Sw)``.

    Slice additions, one per row of the window (each adds a ``(W, B, C, Lh,
    Lw)`` slice of ``g`` to the rows of positions it reaches: runs of ``Lh
    Lw`` contiguous values on both sides at stride 1), then one per column:
    3-4x faster than additions per row of positions (runs of ``Lw``) at
    28x28, and than autograd through ``unfold``. The slices come from one
    ``unbind`` per side (a Python slice per addition cost as much as the
    additions at 8x8); ``add_`` in a loop, not ``torch._foreach_add_`` (no
    vmap rule).
    """
    C, H, W, Lh, Lw, sh, sw = geometry
    Sh, Sw = H + (Lh - 1) * sh, W + (Lw - 1) * sw
    B = g.shape[1]
    if torch.is_grad_enabled() and g.requires_grad:  # differentiably (create_graph): in-place adds into
        # unbind's views are refused there; fold is the same sum (im2col's adjoint), slower
        cols = g.reshape(C * H * W, B, Lh * Lw).transpose(0, 1)
        return F.fold(cols, (Sh, Sw), (H, W), stride=(sh, sw)).flip(2, 3).reshape(B, -1)
    g = g.reshape(C, H, W, B, Lh, Lw)
    rows = g.new_zeros(W, B, C, Sh, Lw)  # rows[w, b, c, i sh + h, j] = sum over h of g[c, h, w, b, i, j]
    windows = rows.unfold(3, (Lh - 1) * sh + 1, 1)[..., ::sh].movedim(-1, 4).unbind(3)
    for window, part in zip(windows, g.permute(1, 2, 3, 0, 4, 5).unbind(0)):
        window.add_(part)
    acc = g.new_zeros(B, C, Sh, Sw)
    windows = acc.unfold(3, (Lw - 1) * sw + 1, 1)[..., ::sw].movedim(3, 0).unbind(0)
    for window, part in zip(windows, rows.unbind(0)):
        window.add_(part)
    return acc.flip(2, 3).reshape(B, -1)


def _stored_kernels(values: torch.Tensor, m: torch.Tensor | None, scale: torch.Tensor, geometry: tuple | None,
                    out: torch.Tensor | None = None, *, divide: bool = False) -> torch.Tensor:
    """``m + scale * values`` at each entry of a layer's storage (``m + values / scale`` with
    ``divide``, into ``out`` only; ``m`` None: no ``m`` term).

    ``values`` is in the layout of ``deviation``; ``m`` ``(F, K)`` and ``scale`` ``(K,)`` are read
    at each entry: broadcast over an ``(L, F, K)`` storage (``geometry`` None), through their
    windows (:func:`_window_view`) in a compact one ``(C H W + 1, F, L)``, bias row last: one
    strided pass (faster here than copying the windows first).
    Into ``out`` (not differentiable; it may be ``values``), else a new tensor (differentiable).
    """
    if m is None:
        op = torch.div if divide else torch.mul
    else:
        op = torch.addcdiv if divide else torch.addcmul
    if geometry is None:
        return op(values, scale, out=out) if m is None else op(m, values, scale, out=out)
    C, H, W, Lh, Lw, _, _ = geometry
    chw, Fo = C * H * W, values.shape[1]
    parts = [(values[:chw].view(C, H, W, Fo, Lh, Lw), _window_view(scale[None, :-1], geometry)),
             (values[chw], scale[-1])]
    if m is not None:
        parts = [(_window_view(m[:, :-1], geometry), *parts[0]), (m[:, -1:], *parts[1])]
    if out is None:  # in the layout of ``values`` (an addcmul would take the windows' strides)
        (t, v, c), (tb, vb, cb) = parts if m is not None else [(0, *p) for p in parts]
        return torch.cat([(v * c + t).view(chw, Fo, -1), (vb * cb + tb).unsqueeze(0)])
    op(*parts[0], out=out[:chw].view(C, H, W, Fo, Lh, Lw))
    op(*parts[1], out=out[chw])
    return out


def _stored_adjoint(g: torch.Tensor, geometry: tuple | None) -> torch.Tensor:
    """The adjoint of reading ``m`` at each stored entry (:func:`_stored_kernels`): ``g``, in the
    layout of ``deviation``, summed over the entries of each kernel entry, ``(F, K)``."""
    if geometry is None:
        return g.sum(0)
    chw = g.shape[0] - 1
    return torch.cat([_window_adjoint(g[:chw], geometry), g[chw].sum(-1).unsqueeze(-1)], dim=1)


def _vmap_per_model(fn, info, in_dims, *args):
    """A ``vmap`` rule for an autograd Function that writes into its own buffers (``out=``, which
    vmap cannot batch): ``fn`` on one model at a time, outputs stacked along dimension 0."""
    outs = [fn(*(a.select(d, b) if isinstance(a, torch.Tensor) and d is not None else a
                 for a, d in zip(args, in_dims)))
            for b in range(info.batch_size)]
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


#: :class:`_CoveringDense` keeps a weight block up to this size for the backward. A larger one is
#: built and multiplied in chunks of output channels of about ``_CHUNK_BYTES`` (in the cache), and
#: rebuilt chunk by chunk in the backward: allocators map a block that large anew at every call
#: (glibc above 32 MiB), and its page faults cost more than rebuilding it (see benchmarks/README.md).
_SAVED_BLOCK_BYTES = 32 << 20
_CHUNK_BYTES = 4 << 20


class _CoveringDense(torch.autograd.Function):
    """A layer whose support covers the image as one GEMM ``[x~ 1] W``, with its own backward.

    ``x~`` is the flipped image, next to a column of ones for the bias row of
    ``W = c d + T(m)``: the compact deviations ``(C H W + 1, F, L)`` times
    their scales ``c`` (``scale``, ``(C H W + 1, 1, L)``) plus the shared
    kernels ``m = shared * shared_scale`` at each stored deviation (their
    windows, :func:`_window_view`, and biases), built into one buffer.
    Autograd through these steps would copy the weight gradient for each
    slice of the parameter and each in-place add into a view; here the
    weight gradient is one GEMM with the saved ``[x~ 1]`` into a new tensor,
    reduced to ``m``'s gradient by :func:`_window_adjoint` and scaled in
    place into ``deviation``'s and ``shared``'s (the scaling inside: no
    autograd node for ``m``). Blocks over ``_SAVED_BLOCK_BYTES`` are built
    by chunks of output channels and rebuilt in the backward.

    On CPU, :class:`_CoveringDenseCompiled` builds the block and reduces
    its gradient by compiled passes instead.
    """

    @staticmethod
    def _chunk(deviation, geometry) -> int:
        """Output channels per chunk of the weight block (all of them: the block is kept)."""
        C, H, W, Lh, Lw, _, _ = geometry
        per_channel = C * H * W * Lh * Lw * deviation.element_size()
        Fo = deviation.shape[1]
        return Fo if Fo * per_channel <= _SAVED_BLOCK_BYTES else max(1, _CHUNK_BYTES // per_channel)

    @staticmethod
    def forward(x, deviation, shared, shared_scale, scale, geometry):
        C, H, W, Lh, Lw, _, _ = geometry
        chw, n, Fo, L = C * H * W, x.shape[0], shared.shape[0], Lh * Lw
        out = x.new_empty(n, Fo * L)
        fc = _CoveringDense._chunk(deviation, geometry)
        m = shared * shared_scale
        x1 = torch.cat([x.flip(2, 3).reshape(n, chw), x.new_ones(n, 1)], dim=1)  # the backward's too
        work = deviation.new_empty((chw + 1) * fc * L)
        for f0 in range(0, Fo, fc):
            f1 = min(f0 + fc, Fo)
            block = work[: (chw + 1) * (f1 - f0) * L].view(chw + 1, f1 - f0, L)
            # windows and biases, then the scaled deviations: a strided copy and a contiguous addcmul_
            # beat one strided addcmul (addcmul_ has no vmap rule: the backward's rebuild does without)
            block[:chw].view(C, H, W, f1 - f0, Lh, Lw).copy_(_window_view(m[f0:f1, :-1], geometry))
            block[chw].copy_(m[f0:f1, -1:])
            block.addcmul_(deviation[:, f0:f1], scale)
            torch.mm(x1, block.view(chw + 1, -1), out=out[:, f0 * L : f1 * L])
        return out.view(n, Fo, Lh, Lw), work if fc == Fo else work[:0], x1

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, deviation, shared, shared_scale, scale, geometry = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # the block gets no gradient: no full-size zeros for it
        ctx.save_for_backward(deviation, shared, shared_scale, scale, output[1], output[2])
        ctx.geometry = geometry

    @staticmethod
    @once_differentiable  # the saved block carries no graph: a double backward would be wrong
    def backward(ctx, grad_out, _, __):
        # Runs under torch.func.vmap in stacked fits: batchable ops only, in place only on own tensors.
        deviation, shared, shared_scale, scale, saved, x1 = ctx.saved_tensors
        C, H, W, Lh, Lw, _, _ = geometry = ctx.geometry
        chw, n, Fo, L = C * H * W, x1.shape[0], shared.shape[0], Lh * Lw
        g = grad_out.reshape(n, -1)
        grad_x = grad_d = grad_m = None
        if ctx.needs_input_grad[0]:
            if saved.numel():
                grad_x = g.mm(saved.view(chw + 1, -1)[:chw].T)
            else:  # rebuilt by chunks (as in the forward, up to rounding) in one buffer: fresh ones page-fault
                fc = _CoveringDense._chunk(deviation, geometry)
                d, S = deviation[:chw].view(C, H, W, Fo, Lh, Lw), scale[:chw].view(C, H, W, 1, Lh, Lw)
                m = shared * shared_scale
                work = g.new_empty(chw * fc * L)  # batched like g under vmap: in-place writes are allowed
                for f0 in range(0, Fo, fc):
                    f1 = min(f0 + fc, Fo)
                    block = work[: chw * (f1 - f0) * L].view(C, H, W, f1 - f0, Lh, Lw)
                    block.copy_(d[:, :, :, f0:f1]).mul_(S).add_(_window_view(m[f0:f1, :-1], geometry))  # batched
                    part, block = g[:, f0 * L : f1 * L], block.view(chw, -1)
                    grad_x = part.mm(block.T) if grad_x is None else torch.addmm(grad_x, part, block.T)
            grad_x = grad_x.view(n, C, H, W).flip(2, 3)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w = x1.T.mm(g).view(chw + 1, -1, L)  # (C H W + 1, F, L), the bias row last
            grad_d, grad_m = _CoveringDense._parameter_grads(ctx, grad_w, shared_scale, scale)
        return grad_x, grad_d, grad_m, None, None, None

    @staticmethod
    def _parameter_grads(ctx, grad_w, shared_scale, scale):
        """The stored deviations' and the shared kernels' gradients from the weight's, ``grad_w``
        in the storage's layout (rows of flipped pixels, the bias row last), which becomes the first."""
        grad_d = grad_m = None
        if ctx.needs_input_grad[2]:
            grad_m = _stored_adjoint(grad_w, ctx.geometry).mul_(shared_scale)  # into shared's gradient
        if ctx.needs_input_grad[1]:
            grad_d = grad_w.mul_(scale)
        return grad_d, grad_m

    @staticmethod
    def vmap(info, in_dims, x, deviation, shared, shared_scale, scale, geometry):
        return _vmap_per_model(_CoveringDense.apply, info, in_dims, x, deviation, shared, shared_scale, scale,
                               geometry)


class _CoveringDenseEager(_CoveringDense):
    """:class:`_CoveringDense` outside torch.func transforms, which need its ``setup_context`` form:
    with ``ctx`` in the forward, ``Function.apply`` skips binding the arguments to the forward's
    signature at each call (about 25 us, 4% of an 8x8 layer's forward and backward)."""

    setup_context = torch.autograd.Function.setup_context  # the default: not defined

    @staticmethod
    def forward(ctx, *inputs):
        output = _CoveringDense.forward(*inputs)
        _CoveringDense.setup_context(ctx, inputs, output)
        return output


class _CoveringDenseCompiled(torch.autograd.Function):
    """:class:`_CoveringDense` by compiled passes: plain CPU tensors outside torch.func transforms,
    a block kept whole (see :meth:`SoftConv2d.forward`).

    One pass (:func:`softcnn._kernels.covering_block`) builds the block
    with its rows in the image's order and the bias row last, so the
    forward is ``addmm(b, x, W)`` on the input as it is: no flipped copy
    of the input or of its gradient, no column of ones. One more
    (:func:`softcnn._kernels.covering_adjoint`) reduces, flips and scales
    the weight gradient. With one output and only what the backward reads
    saved, its per-call cost is the least: at 8x8 that cost is as large as
    the GEMMs'.
    """

    @staticmethod
    def forward(ctx, x, deviation, shared, shared_scale, scale, geometry):
        C, H, W, Lh, Lw, _, _ = geometry
        chw, n, Fo, L = C * H * W, x.shape[0], shared.shape[0], Lh * Lw
        a, block = _kernels.array, deviation.new_empty(chw + 1, Fo, L)  # the bias row last
        _kernels.covering_block(a(shared), a(shared_scale), a(deviation), a(scale.view(chw + 1, L)), *geometry,
                                a(block))
        ctx.geometry = geometry
        ctx.save_for_backward(x, block, shared_scale, scale)  # block: an intermediate, without a graph
        return torch.addmm(block[chw].view(-1), x.reshape(n, chw), block[:chw].view(chw, -1)).view(n, Fo, Lh, Lw)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: once_differentiable's error on a double backward
            return _CoveringDenseCompiled._once_differentiable(ctx, grad_out)
        return _CoveringDenseCompiled._backward(ctx, grad_out)  # (its no_grad() costs 4 us per call)

    @staticmethod
    def _backward(ctx, grad_out):
        x, block, shared_scale, scale = ctx.saved_tensors
        C, H, W, Lh, Lw, _, _ = geometry = ctx.geometry
        chw, n, L = C * H * W, x.shape[0], Lh * Lw
        Fo = block.shape[1]
        g = grad_out.reshape(n, -1)
        grad_x = grad_d = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = g.mm(block[:chw].view(chw, -1).T).view(x.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            xr = x.reshape(n, chw)
            if _kernels.runs_on(g):
                grad_w = g.new_empty(chw + 1, Fo, L)  # pixels in image order, the bias row by the kernel
                torch.mm(xr.T, g, out=grad_w[:chw].view(chw, -1))
                a, grad_m = _kernels.array, g.new_empty(Fo, shared_scale.shape[0])
                _kernels.covering_adjoint(a(grad_w), a(g), a(shared_scale), a(scale.view(chw + 1, L)), *geometry,
                                          a(grad_m))
                grad_d = grad_w if ctx.needs_input_grad[1] else None
                grad_m = grad_m if ctx.needs_input_grad[2] else None
            else:  # a batched backward (is_grads_batched): out= has no vmap rule; the rows flipped as stored
                grad_w = xr.T.mm(g).view(C, H, W, Fo, L).flip(1, 2).reshape(chw, Fo, L)
                stored = torch.cat([grad_w, g.sum(0).view(1, Fo, L)])
                grad_d, grad_m = _CoveringDense._parameter_grads(ctx, stored, shared_scale, scale)
        return grad_x, grad_d, grad_m, None, None, None

    _once_differentiable = staticmethod(once_differentiable(_backward))  # the saved block carries no graph


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
    formulation : {'auto', 'tiled', 'unfold', 'dense'}, default='auto'
        How the forward pass is computed; every choice gives the same outputs
        and gradients. The output positions are cut into rectangular *tiles*;
        each tile is one matrix product of the input patch it reads (the
        pixels its positions reach) with a weight block gathered from the
        kernels through precomputed index maps (zero where an offset does not
        exist or falls outside the tile's positions' support), and the tiles
        are one batched matmul. ``'unfold'``: one position per tile (a batched
        matmul over unfolded ``Sh x Sw`` patches); ``'dense'``: one tile of
        every position (one GEMM with a dense ``(L F, C H W)`` weight, the
        right choice when the support covers the image: the weight is then
        the stored deviations plus the shared kernels' windows, with a
        backward of its own, see ``deviation``, which has no second
        derivatives: a double backward through it raises, and
        ``'unfold'`` has them); ``'tiled'`` and
        ``'auto'``: the tile shape chosen by :func:`choose_tile` (the
        fewest multiply-adds, weighted by a model of the matmul's speed
        fitted in ``benchmarks/bench_layer.py --sweep``; ``'dense'`` for
        ``support='full'``). The attribute ``formulation`` then names the
        extreme the chosen tile is, if it is one.
    generator : torch.Generator, optional
        Source of randomness for the initial shared kernel.
    dtype, device : optional
        As for torch modules.

    Attributes
    ----------
    shared : Parameter of shape (F, K)
        Shared kernels ``m`` (bias last).
    deviation : Parameter of shape (L, F, K), or (C H W + 1, F, L) for a support covering the image
        Per-position deviations ``d_p`` (raw values, times ``deviation_scale``);
        initialised at zero, so the layer starts as a CNN. When every
        position's support covers the image (``support='full'``) only the
        ``C H W`` offsets that exist at a position are stored, in the order of
        the pixels of the flipped image, then the bias: the storage is the
        weight matrix of one GEMM. Read and write deviations through
        :meth:`deviations`, :meth:`set_deviations`,
        :meth:`as_deviation_storage` and :meth:`deviation_gradient`, which
        use the ``(L, F, K)`` layout whatever the storage.
    mask : Tensor of shape (L, K)
        ``True`` where the offset exists at the position.
    formulation : {'tiled', 'unfold', 'dense'}
        The formulation used (``'auto'`` resolved).
    tile_shape : tuple of int
        Output positions per tile ``(th, tw)``.
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
        if formulation not in FORMULATIONS:
            raise ValueError(
                f"formulation must be 'auto', 'tiled', 'unfold' or 'dense', got {formulation!r}."
            )

        # A support covering the image from every position: the offsets existing at a position
        # are in bijection with the pixels, so only those are stored (see `deviation`).
        self._compact = all(g.extent == g.size + (g.n_out - 1) * g.stride for g in (self.gh, self.gw))
        factory = {"dtype": dtype, "device": device}
        self.shared = nn.Parameter(torch.zeros(out_channels, K, **factory))
        shape = (in_channels * H * W + 1, out_channels, L) if self._compact else (L, out_channels, K)
        self.deviation = nn.Parameter(torch.zeros(shape, **factory))
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
        self._geometry = (in_channels, H, W, *self.output_shape, self.gh.stride, self.gw.stride)
        index = None
        if self._compact:  # the kernel entry of each stored deviation, (C H W + 1, L), the bias last
            index = torch.cat([_window_view(torch.arange(K - 1, device=device), self._geometry).reshape(-1, L),
                               torch.full((1, L), K - 1, device=device)])
        self.register_buffer("_compact_index", index, persistent=False)
        self._build_tiles(formulation, device)
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

    def _build_tiles(self, formulation: str, device=None, tile_shape: tuple[int, int] | None = None) -> None:
        """Set the formulation and the tiles' index maps (buffers, not saved in the state dict).

        ``_tile_index`` ``(Th, Tw, th, tw, 1, P + 1)``: for each output position
        of each tile (grouped by tile) and each entry of the tile's patch
        (``P = C ph pw``), then its bias, the kernel entry in ``0..K-1`` that
        multiplies it (0 where none does); ``_tile_valid``: where one does;
        ``_tile_rows`` (compact storage): the row of ``deviation`` holding
        that weight (``C H W + 1`` where none does).
        """
        if tile_shape is None:
            tile_shape = choose_tile(self.gh, self.gw, self.in_channels, self.out_channels, formulation)
        th, tw = tile_shape
        if self.gh.n_out % th or self.gw.n_out % tw:
            raise ValueError(f"tile_shape {tile_shape} must divide the output shape {self.output_shape}.")
        ah, aw = _axis_tiles(self.gh, th), _axis_tiles(self.gw, tw)
        # One tile and compact storage: the whole layer is one GEMM (_CoveringDense), no index maps.
        self._one_gemm = self._compact and ah.n_tiles == aw.n_tiles == 1
        (H, W), (Sh, Sw), C = self.input_shape, self.support_shape, self.in_channels

        def per_entry(rows, cols, row_stride, channel_stride):
            """Per-axis indices ``(Th, th, ph)``, ``(Tw, tw, pw)`` combined channel-major, then the bias."""
            idx = rows[:, None, :, None, :, None] * row_stride + cols[None, :, None, :, None, :]
            idx = idx[..., None, :, :] + (np.arange(C) * channel_stride)[:, None, None]
            head = idx.shape[:4]
            return np.concatenate([idx.reshape(*head, 1, -1), np.full((*head, 1, 1), C * channel_stride)], axis=-1)

        self.tile_shape = (th, tw)
        self._tiles = (ah, aw)
        if (th, tw) == (1, 1):
            self.formulation = "unfold"
        elif (th, tw) == self.output_shape:
            self.formulation = "dense"
        else:
            self.formulation = "tiled"
        if self._one_gemm:  # index maps unused: not built, stored or pickled (tens of MB at 28x28)
            for name in ("_tile_index", "_tile_valid", "_tile_rows"):
                self.register_buffer(name, None, persistent=False)
            return
        off = per_entry(ah.offset, aw.offset, Sw, Sh * Sw)
        ok = ah.valid[:, None, :, None, :, None] & aw.valid[None, :, None, :, None, :]  # in support and image
        head = ok.shape[:4]
        ok = np.broadcast_to(ok[..., None, :, :], (*head, C, *ok.shape[4:])).reshape(*head, 1, -1)
        ok = np.concatenate([ok, np.ones((*head, 1, 1), dtype=bool)], axis=-1)
        self.register_buffer("_tile_index", torch.as_tensor(np.where(ok, off, 0), device=device), persistent=False)
        self.register_buffer("_tile_valid", torch.as_tensor(ok, device=device), persistent=False)
        rows = None
        if self._compact:  # pixel (c, y, x) is row (c, H-1-y, W-1-x) of the storage
            ry = H - 1 - (self.gh.anchors().reshape(ah.n_tiles, th)[..., None] + self.gh.lo + ah.offset)
            rx = W - 1 - (self.gw.anchors().reshape(aw.n_tiles, tw)[..., None] + self.gw.lo + aw.offset)
            rows = torch.as_tensor(np.where(ok, per_entry(ry, rx, W, H * W), C * H * W + 1), device=device)
        self.register_buffer("_tile_rows", rows, persistent=False)

    # ----------------------------------------------------------------- views
    @property
    def n_positions(self) -> int:
        return self.gh.n_out * self.gw.n_out

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
            self.deviation.mul_(self.as_deviation_storage(self.deviation_scale / deviation_scale))
            self.shared_scale.copy_(shared_scale)
            self.deviation_scale.copy_(deviation_scale)

    def shared_kernel(self) -> torch.Tensor:
        """The shared kernels ``m`` of shape ``(F, K)``."""
        return self.shared * self.shared_scale

    def deviations(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Deviations ``d_p`` of shape ``(L, F, K)`` (differentiable; into ``out`` without autograd).

        Absent offsets hold arbitrary values (zero for a support covering the
        image, whose storage has none); use :meth:`masked_deviation` where
        they must not count.
        """
        if self._compact:  # scaled in the storage, a quarter of (L, F, K)
            d = self._from_storage(self.deviation * self._stored_scale())
            return d if out is None else out.copy_(d)
        return torch.mul(self.deviation, self.deviation_scale, out=out)

    def unmasked_kernels(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``m + d_p`` at every offset, ``(L, F, K)``, absent ones included (a prox's starting values).

        A new tensor, or ``out`` (without autograd); :meth:`kernels` zeroes the absent offsets.
        """
        m = self.shared_kernel()
        if self._compact:
            return torch.add(self.deviations(), m, out=out)
        return torch.addcmul(m, self.deviation, self.deviation_scale, out=out)  # one pass

    @torch.no_grad()
    def set_deviations(self, d: torch.Tensor, *, consume: bool = False) -> None:
        """Store deviations ``d`` ``(L, F, K)`` at the existing offsets; absent offsets keep their values.

        With ``consume=True`` the caller's ``d`` may be overwritten (it saves
        a full-size temporary). The write is exact for finite values.
        """
        self.set_raw_deviations(d.div_(self.deviation_scale) if consume else d / self.deviation_scale)

    @torch.no_grad()
    def set_raw_deviations(self, raw: torch.Tensor) -> None:
        """:meth:`set_deviations` for values already divided by ``deviation_scale`` (the parameter's units)."""
        if self._compact:
            self.deviation.copy_(self.as_deviation_storage(raw))
            return
        # a 0/1 selection in one in-place pass: lerp by 0 or 1 returns an end exactly (faster than
        # boolean indexing, full-size temporaries, or a multiply-add pair)
        self.deviation.lerp_(raw, self.stored_exists())

    def as_deviation_storage(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of shape ``(K,)``, ``(F or 1, K)`` or ``(L or 1, F or 1, K)``, in the layout of ``deviation``.

        Its existing offsets, broadcastable to ``deviation``: for multiplying
        the parameter or its gradient by per-entry factors whatever the storage.
        """
        if not self._compact:
            return values
        v = values.reshape((1,) * (3 - values.dim()) + tuple(values.shape))
        v = v.expand(self.n_positions, v.shape[1], v.shape[2]).permute(2, 1, 0)  # (K, F or 1, L)
        index = self._compact_index.unsqueeze(1).expand(-1, v.shape[1], -1)
        return v.gather(0, index)

    def deviation_gradient(self) -> torch.Tensor | None:
        """``∂J/∂d_p`` of shape ``(L, F, K)`` from the raw parameter's ``.grad`` (zero at absent offsets)."""
        grad = self.deviation.grad
        if grad is None:
            return None
        return self._from_storage(grad / (self._stored_scale() if self._compact else self.deviation_scale))

    def _from_storage(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the layout of ``deviation`` as ``(L, F, K)``, zero at offsets not stored."""
        if not self._compact:
            return t
        L, K = self.mask.shape
        index = self._compact_index.T.unsqueeze(1).expand(L, t.shape[1], -1)
        return t.new_zeros(L, t.shape[1], K).scatter(2, index, t.permute(2, 1, 0))  # scatter_: no vmap rule

    def _stored_scale(self) -> torch.Tensor:
        """``deviation_scale`` at each stored deviation, ``(C H W + 1, 1, L)`` (compact storage).

        ``as_deviation_storage(deviation_scale)`` through :func:`_window_view`
        (several times faster than the gather), kept while the buffer is
        the same tensor at the same version: in-place writes (``set_scales``,
        ``load_state_dict``) bump it, ``.to()`` replaces the tensor; a write
        through ``.data`` would not be seen. Not kept when built inside
        torch.func transforms (wrapped for them, swapped buffers), from a
        buffer that requires grad (a graph) or an inference tensor (no version);
        not pickled or deep-copied (``__getstate__``).
        """
        scale = self.deviation_scale
        cached = self.__dict__.get("_stored_scale_cache")
        if cached is not None and cached[0] is scale and cached[1] == scale._version:
            return cached[2]
        L = self.n_positions
        stored = torch.cat([_window_view(scale[:-1], self._geometry).reshape(-1, 1, L), scale[-1:].expand(1, 1, L)])
        if not (scale.requires_grad or scale.is_inference() or torch._C._are_functorch_transforms_active()):
            self.__dict__["_stored_scale_cache"] = (scale, scale._version, stored)
        return stored

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_stored_scale_cache", None)  # derived from a buffer: rebuilt at the first use
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_one_gemm" not in state:  # pickled before covering supports stored compact deviations
            self._rebuild_from_parameters()

    def _rebuild_from_parameters(self) -> None:
        """Rebuild the derived state (geometry, storage, index maps) of a layer unpickled from an
        earlier version, keeping its parameters' values (converted by :meth:`_load_from_state_dict`),
        its formulation and tile shape, and whether it is training."""
        values = {name: p.detach() for name, p in self._parameters.items()}
        values.update({name: self._buffers[name] for name in ("shared_scale", "deviation_scale")})
        ref = values["deviation"]
        fresh = SoftConv2d(self.in_channels, self.out_channels, self.kernel_size, self.input_shape,
                           stride=self.stride, padding=self.padding, support=self.support, dtype=ref.dtype,
                           device=ref.device)
        fresh._build_tiles(self.formulation, device=ref.device, tile_shape=self.tile_shape)
        fresh.load_state_dict(values)
        for name, p in self._parameters.items():
            fresh._parameters[name].requires_grad_(p.requires_grad)
        training = self.training
        self.__dict__.update(fresh.__dict__)
        self.training = training

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts saved before the compact storage hold (L, F, K) 'full' deviations
        key = prefix + "deviation"
        saved = state_dict.get(key)
        if self._compact and saved is not None and saved.shape == (self.n_positions, *self.shared.shape):
            state_dict[key] = self.as_deviation_storage(saved.to(self.mask.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kernels(self) -> torch.Tensor:
        """Effective kernel vectors ``m + d_p`` of shape ``(L, F, K)``, zero where absent."""
        return (self.shared_kernel().unsqueeze(0) + self.deviations()) * self.mask.unsqueeze(1)

    def masked_deviation(self) -> torch.Tensor:
        """Deviations ``d_p`` restricted to existing offsets, ``(L, F, K)``."""
        d = self.deviations()
        return d if self._compact else d * self.mask.unsqueeze(1)  # compact: absent offsets read 0

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
            self.deviation.masked_fill_(self.as_deviation_storage(dead), 0.0)

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
        self.set_deviations(d, consume=True)
        self.canonicalize()
        return int(small_d.sum() + small_w.sum())

    def offset_map(self, values: torch.Tensor, bias_value: float = 0.0) -> torch.Tensor:
        """Spread a per-offset ``(Sh, Sw)`` map over the kernel vector ``(K,)``."""
        flat = values.reshape(-1).repeat(self.in_channels)
        return torch.cat([flat, flat.new_full((1,), bias_value)])

    # ------------------------------------------------- stored entries (penalties)
    # Penalties that act entry by entry, or reduce over positions or channels, work in the
    # layout of ``deviation``: with compact storage the (L, F, K) view is four times larger
    # and building it costs several training steps.
    @property
    def stored_geometry(self) -> tuple | None:
        """The compact storage's geometry for the module functions on stored entries; None for
        an ``(L, F, K)`` storage."""
        return self._geometry if self._compact else None

    @property
    def stored_position_dim(self) -> int:
        """The dimension of ``deviation`` that indexes positions: 0, or 2 with compact storage."""
        return 2 if self._compact else 0

    def stored_exists(self) -> torch.Tensor | None:
        """Existence of each stored entry as 0/1 numbers broadcastable to ``deviation``, ``(L, 1, K)``;
        None when every stored entry exists (compact storage)."""
        return None if self._compact else self.mask.unsqueeze(1).to(self.deviation.dtype)

    def stored_weights(self, t: torch.Tensor) -> torch.Tensor:
        """The entries of ``t`` (in the layout of ``deviation``) that are weights, not biases (a view)."""
        return t[:-1] if self._compact else t[..., :-1]

    def stored_deviations(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Deviations ``d`` at the stored entries, in the layout of ``deviation`` (into ``out``
        without autograd); absent offsets of an ``(L, F, K)`` storage hold arbitrary values."""
        return _stored_kernels(self.deviation, None, self.deviation_scale, self.stored_geometry, out)

    def stored_kernels(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``m + d`` at the stored entries, in the layout of ``deviation`` (into ``out`` without
        autograd): :meth:`unmasked_kernels` for an ``(L, F, K)`` storage."""
        return _stored_kernels(self.deviation, self.shared_kernel(), self.deviation_scale, self.stored_geometry, out)

    def stored_neighbour_pairs(self) -> list[NeighbourPairs]:
        """The vertical and horizontal 4-neighbour pairs of positions in the layout of ``deviation``
        (:class:`NeighbourPairs`): an entry compared between neighbours is the same offset."""
        (Lh, Lw), Fo, every = self.output_shape, self.out_channels, slice(None)
        nxt, prev = slice(1, None), slice(None, -1)
        if not self._compact:  # the (Lh, Lw, F, K) grid; offsets compared where they exist at both
            m = self.mask.reshape(Lh, Lw, 1, -1).to(self.deviation.dtype)
            shape = (Lh, Lw, Fo, -1)
            return [NeighbourPairs(0, every, shape, (nxt,), (prev,), m[1:] * m[:-1], (0, 1)),
                    NeighbourPairs(1, every, shape, (every, nxt), (every, prev), m[:, 1:] * m[:, :-1], (0, 1))]
        # Compact rows are flipped pixels: the offset that reaches row h from position i reaches
        # row h - sh from position i + 1 (likewise for columns); a row without one has no pair.
        C, H, W, _, _, sh, sw = self._geometry
        chw = C * H * W
        rows, bias = slice(0, chw), slice(chw, chw + 1)
        shape = (C, H, W, Fo, Lh, Lw)
        return [
            NeighbourPairs(0, rows, shape, (every, slice(0, H - sh), every, every, nxt),
                           (every, slice(sh, None), every, every, prev), None, (4, 5)),
            NeighbourPairs(1, rows, shape, (every, every, slice(0, W - sw), every, every, nxt),
                           (every, every, slice(sw, None), every, every, prev), None, (4, 5)),
            NeighbourPairs(0, bias, (Fo, Lh, Lw), (every, nxt), (every, prev), None, (1, 2)),
            NeighbourPairs(1, bias, (Fo, Lh, Lw), (every, every, nxt), (every, every, prev), None, (1, 2)),
        ]

    @torch.no_grad()
    def set_stored_deviations(self, d: torch.Tensor, *, consume: bool = False) -> None:
        """Store deviations given in the layout of ``deviation`` (existing entries only, like
        :meth:`set_deviations`; ``consume=True`` lets ``d`` be overwritten)."""
        if not self._compact:
            self.set_deviations(d, consume=consume)
            return
        _stored_kernels(d, None, self.deviation_scale, self._geometry, out=self.deviation, divide=True)

    @torch.no_grad()
    def set_stored_kernels(self, w: torch.Tensor) -> None:
        """Store kernels ``w``, given in the layout of ``deviation``, as ``d = w - m`` (``m`` is kept).

        ``w`` may be overwritten (it may be ``deviation`` itself). The raw deviation
        ``(w - m) / c`` is computed in one pass as ``w / c - m / c``: the same numbers for the
        power-of-two scales of proximal fits, and exactly 0 where ``w = m``.
        """
        m_c = self.shared_kernel() / self.deviation_scale
        if self._compact:  # every stored entry exists: straight into the parameter
            _stored_kernels(w, -m_c, self.deviation_scale, self._geometry, out=self.deviation, divide=True)
        else:
            self.set_raw_deviations(torch.addcdiv(-m_c, w, self.deviation_scale, out=w))

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._one_gemm:
            d = self.deviation
            args = (x, d, self.shared, self.shared_scale, self._stored_scale(), self._geometry)
            if torch._C._are_functorch_transforms_active():  # its vmap rule runs the torch code
                return _CoveringDense.apply(*args)[0]
            # (the buffers follow the parameters' device and dtype)
            if (_kernels.runs_on(x) and _kernels.runs_on(d) and x.dtype == d.dtype == args[2].dtype
                    and _CoveringDense._chunk(d, self._geometry) == self.out_channels):
                return _CoveringDenseCompiled.apply(*args)
            return _CoveringDenseEager.apply(*args)[0]
        n = x.shape[0]
        ah, aw = self._tiles
        Th, Tw, th, tw = ah.n_tiles, aw.n_tiles, ah.length, aw.length
        Lh, Lw = self.output_shape
        Fo = self.out_channels
        block = self._tile_weights()  # (T, Q, P + 1), Q = th tw F, the bias last
        cols = self._patches(x)  # (T, n, P + 1), a column of ones last
        # The output is made contiguous (n, F, Lh, Lw) where that is cheap: in another layout later
        # elementwise ops and their backward run strided, and flattening copies.
        if Th * Tw == 1:
            if n >= block.shape[2]:  # the weight (Q, E) is the smaller: reorder its rows to (F, i, j)
                w = block[0].view(th, tw, Fo, -1).permute(2, 0, 1, 3).reshape(Fo * th * tw, -1)
                return cols[0].mm(w.T).view(n, Fo, Lh, Lw)
            out = cols[0].mm(block[0].T)  # (n, Lh Lw F): a small batch against a large weight
            return out.view(n, Lh, Lw, Fo).permute(0, 3, 1, 2)
        out = torch.bmm(cols, block.transpose(1, 2))  # (T, n, Q)
        return out.view(Th, Tw, n, th, tw, Fo).permute(2, 5, 0, 3, 1, 4).reshape(n, Fo, Lh, Lw)

    def _tile_weights(self) -> torch.Tensor:
        """Weight blocks ``(T, th tw F, P + 1)`` of the tiles, bias last, gathered from ``m`` and ``d``.

        Entry ``(t, (i, j, f), e)`` is ``w_{p, f, k}`` for the position ``p``
        at ``(i, j)`` in tile ``t`` and the kernel entry ``k`` that multiplies
        patch entry ``e`` there, or 0 where no offset does. Read straight from
        the parameters: no ``(L, F, K)`` intermediate (``kernels()``), whose
        ``K`` is about ``4 C H W`` for ``support='full'``.
        """
        ah, aw = self._tiles
        Th, Tw, th, tw = ah.n_tiles, aw.n_tiles, ah.length, aw.length
        Fo, K = self.out_channels, self.mask.shape[1]
        valid = self._tile_valid
        E = valid.shape[-1]
        lookup = torch.where(valid, self._tile_index, K)  # K: a zero appended to the kernels
        if self._compact:  # scaled first (the storage is the size of the weights), then a zero row
            d = F.pad(self.deviation * self._stored_scale(), (0, 0, 0, 0, 0, 1)).permute(2, 1, 0)
            index = self._tile_rows
        else:
            d, index = self.deviation, self._tile_index
        dev = d.reshape(Th, th, Tw, tw, Fo, -1).permute(0, 2, 1, 3, 4, 5)
        block = dev.gather(5, index.expand(Th, Tw, th, tw, Fo, E))
        if not self._compact:  # in place: the gather does not need its output for the backward
            block.mul_(F.pad(self.deviation_scale, (0, 1))[lookup])
        shared = F.pad(self.shared_kernel(), (0, 1)).T[lookup.view(Th, Tw, th, tw, E)]  # (..., E, F)
        block.add_(shared.transpose(-1, -2))
        return block.view(Th * Tw, th * tw * Fo, E)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """Input patches of the tiles and a column of ones (for the bias): ``(T, n, C ph pw + 1)``."""
        ah, aw = self._tiles
        pads = (aw.pad_before, aw.pad_after, ah.pad_before, ah.pad_after)
        if any(pads):
            x = F.pad(x, pads)  # negative values crop: rows no tile reads
        n = x.shape[0]
        T = ah.n_tiles * aw.n_tiles
        if T == 1:
            cols = x.reshape(1, n, -1)
        else:
            v = x.unfold(2, ah.patch, ah.step).unfold(3, aw.patch, aw.step)  # (n, C, Th, Tw, ph, pw)
            cols = v.permute(2, 3, 0, 1, 4, 5).reshape(T, n, -1)
        return torch.cat([cols, cols.new_ones(T, n, 1)], dim=2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_shape={self.input_shape}, stride={self.stride}, padding={self.padding!r}, "
            f"support={self.support!r} -> {self.support_shape}, formulation={self.formulation!r}, "
            f"tile_shape={self.tile_shape}"
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
