"""Proximal operators of the penalties used by soft convolution.

Every function computes

.. math::

    \\operatorname{prox}_{t g}(x) = \\arg\\min_u \\tfrac12 \\|u - x\\|_2^2 + t\\, g(u),
    \\qquad t \\ge 0,

for one penalty ``g``. They are pure functions of torch tensors: the input is
never modified in place (except by the functions that take an ``out`` tensor
and are given ``out=x``), the result has the dtype, device and shape of ``x``,
and all work is vectorised over the entries (Python loops run only over a
small number of groups or iterations; on CPU, :func:`tv_prox` runs compiled
loops with numba). ``t`` may be a Python number or a 0-d
tensor. Inputs must be floating point (float32 and float64 are tested);
:func:`pairwise_l1_prox` accumulates in float64 where the device supports it.
The iterative and sorting operators (:func:`tv_prox`, :func:`pairwise_l1_prox`)
also take a ``workspace`` dict that keeps their scratch buffers between calls of
a fit: on CPU, fresh memory (page faults) costs more than the arithmetic.

Functions
---------
soft_threshold
    Weighted elementwise :math:`\\ell_1` (lasso) penalty.
group_soft_threshold
    Sum of Euclidean norms of blocks (group lasso).
nested_group_prox
    Sum of Euclidean norms over a chain of nested groups (hierarchical lasso).
pairwise_l1_prox
    :math:`\\sum_{p<q} |u_p - u_q|` (pairwise "weight-sharing" penalty).
tv_prox
    Anisotropic or group total variation on a 2-D grid of positions.
tl1_prox
    Transformed :math:`\\ell_1` (nonconvex), closed form.
"""

from __future__ import annotations

import math
import numbers
import sys
import weakref
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import _kernels

__all__ = [
    "soft_threshold",
    "group_soft_threshold",
    "nested_group_prox",
    "pairwise_l1_prox",
    "tv_prox",
    "tl1_prox",
]

Scalar = float | torch.Tensor

# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _check_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _scalar(
    value: Scalar, name: str, like: torch.Tensor, *, strictly_positive: bool = False
) -> tuple[torch.Tensor, float]:
    """Validate a scalar parameter; return it as a 0-d tensor and as a float."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(
                f"{name} must be a Python number or a 0-d tensor, got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        as_float = float(value.detach().to("cpu", torch.float64))
        tensor = value.to(dtype=like.dtype, device=like.device)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        as_float = float(value)
        tensor = torch.tensor(as_float, dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {as_float}")
    if strictly_positive and as_float <= 0:
        raise ValueError(f"{name} must be > 0, got {as_float}")
    if not strictly_positive and as_float < 0:
        raise ValueError(f"{name} must be >= 0, got {as_float}")
    return tensor, as_float


def _weights(
    weights: torch.Tensor | Sequence[float] | float,
    like: torch.Tensor,
    target_shape: Sequence[int],
    what: str,
) -> torch.Tensor:
    """Validate non-negative finite weights broadcastable to ``target_shape``."""
    w = torch.as_tensor(weights, device=like.device)
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"weights must be real numbers, got dtype {w.dtype}")
    w = w.to(like.dtype)
    target_shape = tuple(target_shape)
    try:
        shape = torch.broadcast_shapes(w.shape, target_shape)
    except RuntimeError as exc:
        raise ValueError(
            f"weights of shape {tuple(w.shape)} are not broadcastable to {what} shape {target_shape}"
        ) from exc
    if tuple(shape) != target_shape:
        raise ValueError(
            f"weights of shape {tuple(w.shape)} would broadcast {what} shape {target_shape} "
            f"to {tuple(shape)}"
        )
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite")
    if w.numel() and bool((w < 0).any()):
        raise ValueError("weights must be >= 0")
    return w


def _normalize_dims(dim: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if len(dims) == 0:
        raise ValueError("dim must name at least one dimension")
    out = []
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"dim must be an int or a tuple of ints, got {dim!r}")
        if not -ndim <= d < ndim:
            raise ValueError(f"dim {d} is out of range for a tensor with {ndim} dimensions")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"dim contains repeated dimensions: {dim!r}")
    return tuple(sorted(out))


def _check_out(out: torch.Tensor | None, x: torch.Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must have the shape, dtype and device of x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
        )


def _scratch(
    workspace: dict | None,
    name: str,
    shape: Sequence[int],
    like: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """An uninitialised tensor (device of ``like``, its dtype unless ``dtype``), kept in
    ``workspace`` under ``name`` when one is given, and reused while it fits: on CPU, fresh
    memory costs more than the arithmetic done in it."""
    dtype = like.dtype if dtype is None else dtype
    buf = None if workspace is None else workspace.get(name)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype or buf.device != like.device:
        buf = torch.empty(tuple(shape), dtype=dtype, device=like.device)
        if workspace is not None:
            workspace[name] = buf
    return buf


def _cached(workspace: dict | None, name: str, key: tuple, build):
    """``build()``, kept in ``workspace`` under ``name`` while ``key`` is the same: its tensors
    compared by memory, shape, strides and version (so an in-place change rebuilds; the entry
    holds them, so their memory cannot pass to another tensor meanwhile), the rest by equality."""
    ids = tuple((k.data_ptr(), k.shape, k.stride(), k._version, k.dtype) if isinstance(k, torch.Tensor)
                else k for k in key)
    hit = None if workspace is None else workspace.get(name)
    if hit is not None and hit[0] == ids:
        return hit[2]
    value = build()
    if workspace is not None:
        workspace[name] = (ids, key, value)
    return value


def _max_abs(x: torch.Tensor) -> float:
    """``max |x|`` without a temporary ``|x|`` (and faster than ``vector_norm``'s inf norm on CPU)."""
    return max(float(x.amax()), -float(x.amin()))


def _shrink_factor(norm: torch.Tensor, thr: torch.Tensor | float) -> torch.Tensor:
    """Block soft thresholding's factor ``max(0, 1 - thr / norm)``, exactly 0 where ``norm <= thr``
    (zero groups included)."""
    keep = norm > thr
    return torch.where(keep, 1 - thr / torch.where(keep, norm, torch.ones_like(norm)), 0.0)


def _block_shrink(x: torch.Tensor, norm: torch.Tensor, thr: torch.Tensor, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``x * max(0, 1 - thr / norm)`` with exact (+0) zeros where ``norm <= thr`` (into ``out``)."""
    return torch.addcmul(x.new_zeros(()), x, _shrink_factor(norm, thr), out=out)  # 0 + x * 0 is +0


# ---------------------------------------------------------------------------
# l1 and group penalties
# ---------------------------------------------------------------------------


def soft_threshold(
    x: torch.Tensor,
    t: Scalar,
    weights: torch.Tensor | float | None = None,
    *,
    out: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Proximal operator of the (weighted) elementwise l1 norm.

    Parameters
    ----------
    x : torch.Tensor
        Input of any shape (floating point).
    t : float or 0-d torch.Tensor
        Step size, ``t >= 0``.
    weights : torch.Tensor or float, optional
        Non-negative weights broadcastable to ``x.shape`` (the result keeps the
        shape of ``x``). ``None`` means all ones.
    out : torch.Tensor, optional
        Where to write the result (shape, dtype and device of ``x``); it may be
        ``x`` itself or a view of it.
    workspace : dict, optional
        Scratch buffers kept between calls (a full-size one with ``weights``).

    Returns
    -------
    torch.Tensor
        ``prox_{t g}(x)``, same shape, dtype and device as ``x`` (``out`` if given).

    Notes
    -----
    With :math:`g(u) = \\sum_i w_i |u_i|` the problem separates into scalar
    problems solved by soft thresholding,

    .. math:: u_i = \\operatorname{sign}(x_i) \\max(|x_i| - t w_i, 0)
              = x_i - \\operatorname{clip}(x_i, -t w_i, t w_i).

    The second form is used: entries with :math:`|x_i| \\le t w_i` are exactly
    ``+0``. Cost :math:`O(\\text{numel})`.
    """
    _check_input(x)
    t_, t_float = _scalar(t, "t", x)
    _check_out(out, x)
    if weights is None:  # a fused pass, the same numbers; + 0 turns its -0 (x * 0 for x < 0) into +0
        u = F.softshrink(x, t_float) if out is None else torch._C._nn.softshrink(x, t_float, out=out)
        return u.add_(0.0)
    thr = t_ * _weights(weights, x, x.shape, "x")
    clipped = torch.clamp(x, -thr, thr, out=_scratch(workspace, "clipped", x.shape, x))
    return torch.sub(x, clipped, out=out)


def group_soft_threshold(
    x: torch.Tensor,
    t: Scalar,
    dim: int | Sequence[int],
    weights: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Proximal operator of the group-lasso penalty (block soft thresholding).

    Parameters
    ----------
    x : torch.Tensor
        Input of any shape (floating point).
    t : float or 0-d torch.Tensor
        Step size, ``t >= 0``.
    dim : int or tuple of int
        Dimensions spanned by one group: a group is the set of all entries of
        ``x`` along ``dim`` for a fixed index of the remaining dimensions.
    weights : torch.Tensor or float, optional
        Non-negative per-group weights, broadcastable to the reduced shape with
        ``keepdim=True`` (``x.shape`` with the ``dim`` entries set to 1).

    Returns
    -------
    torch.Tensor
        ``prox_{t g}(x)``, same shape, dtype and device as ``x``.

    Notes
    -----
    With :math:`g(u) = \\sum_g w_g \\|u_g\\|_2` the groups decouple and

    .. math:: u_g = \\max\\Bigl(0, 1 - \\frac{t w_g}{\\|x_g\\|_2}\\Bigr) x_g .

    Groups with :math:`\\|x_g\\|_2 \\le t w_g` (including all-zero groups) are
    returned as exact zeros. Cost :math:`O(\\text{numel})`.
    """
    _check_input(x)
    t_, _ = _scalar(t, "t", x)
    dims = _normalize_dims(dim, x.ndim)
    reduced = tuple(1 if i in dims else s for i, s in enumerate(x.shape))
    thr = t_ if weights is None else t_ * _weights(weights, x, reduced, "reduced (keepdim)")
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True)
    return _block_shrink(x, norm, thr)


def nested_group_prox(
    x: torch.Tensor,
    t: Scalar,
    groups: torch.Tensor,
    dim: int = -1,
    weights: torch.Tensor | Sequence[float] | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proximal operator of a sum of group norms over nested groups.

    Parameters
    ----------
    x : torch.Tensor
        Input of any shape (floating point).
    t : float or 0-d torch.Tensor
        Step size, ``t >= 0``.
    groups : torch.Tensor of bool, shape (N, M)
        Group membership along the feature axis ``dim`` (``M == x.shape[dim]``).
        Rows are ordered from the smallest group to the largest and each row
        must be a superset of the previous one:
        :math:`G_1 \\subseteq G_2 \\subseteq \\dots \\subseteq G_N`.
    dim : int, default -1
        The feature axis. The penalty applies independently to every 1-D slice
        of ``x`` along ``dim``.
    weights : torch.Tensor or sequence of float, optional, shape (N,)
        Non-negative per-group weights :math:`w_n` (default all ones).
    out : torch.Tensor, optional
        Where to write the result (shape, dtype and device of ``x``); it may be
        ``x`` itself or a view of it, to save a full-size temporary.

    Returns
    -------
    torch.Tensor
        ``prox_{t g}(x)``, same shape, dtype and device as ``x`` (``out`` if given).

    Raises
    ------
    ValueError
        If ``groups`` has the wrong shape or is not nested, or ``out`` does not
        match ``x``.

    Notes
    -----
    The penalty is :math:`g(u) = \\sum_{n=1}^N w_n \\|u_{G_n}\\|_2`. For
    nested (more generally tree-structured) groups the proximal operator is
    the composition of the single-group operators, applied from the smallest
    group to the largest (Jenatton, Mairal, Obozinski & Bach, "Proximal
    methods for hierarchical sparse coding", JMLR 2011):

    .. math:: \\operatorname{prox}_{t g} = \\operatorname{prox}_{t w_N \\|\\cdot_{G_N}\\|}
              \\circ \\dots \\circ \\operatorname{prox}_{t w_1 \\|\\cdot_{G_1}\\|}.

    Each step is block soft thresholding restricted to :math:`G_n`, so zeros
    are exact, and the support of the result is the complement of some
    :math:`G_k` (entries of the smallest groups, which carry the most penalty
    terms, vanish first).

    The composition is evaluated in closed form. Step ``n`` scales all of
    :math:`G_n` by :math:`\\alpha_n = \\max(0, 1 - t w_n / \\nu_n)`, where the
    norm before the step, :math:`\\nu_n^2 = (\\alpha_{n-1} \\nu_{n-1})^2 +
    \\|x_{R_n}\\|^2`, needs only the norms of the rings
    :math:`R_n = G_n \\setminus G_{n-1}` of ``x``; an entry of :math:`R_j` ends
    up scaled by :math:`\\prod_{n \\ge j} \\alpha_n`. So the cost is
    :math:`O(\\text{numel} + N \\cdot \\text{numel} / M)`: a few passes over
    ``x`` and a recursion over the groups on the per-slice ring norms.
    """
    _check_input(x)
    t_, _ = _scalar(t, "t", x)
    (d,) = _normalize_dims(dim, x.ndim)
    g = torch.as_tensor(groups, device=x.device)
    if g.dtype != torch.bool:
        raise TypeError(f"groups must be a boolean tensor, got dtype {g.dtype}")
    if g.ndim != 2 or g.shape[1] != x.shape[d]:
        raise ValueError(
            f"groups must have shape (N, {x.shape[d]}) (M = x.shape[dim]), got {tuple(g.shape)}"
        )
    n_groups = g.shape[0]
    if n_groups > 1 and bool((g[:-1] & ~g[1:]).any()):
        raise ValueError(
            "groups must be nested: each row must be a superset of the previous row "
            "(rows ordered from the smallest group to the largest)"
        )
    w = None if weights is None else _weights(weights, x, (n_groups,), "groups (N,)")
    _check_out(out, x)
    if n_groups == 0 or x.numel() == 0:
        return x.clone() if out is None else out.copy_(x)
    thr = t_.expand(n_groups) if w is None else t_ * w
    return _nested_prox_by_ring(x, thr.tolist(), _feature_rings(g), d, out)


def _feature_rings(groups: torch.Tensor) -> torch.Tensor:
    """The ring of each feature of nested ``groups`` ``(N, M)``: the first group holding it (N: none)."""
    return torch.where(groups.any(0), groups.to(torch.uint8).argmax(0), groups.shape[0])


def _nested_ring_scales(ring_sq: torch.Tensor, thr: list[float]) -> torch.Tensor:
    """The factor of each ring in the nested group prox, from the rings' squared norms ``ring_sq``
    ``(N (+ 1), ...)`` (ring ``j``: the features first held by group ``j``) and the thresholds.

    Returns ``(N + 1, ...)``: row ``N - j`` is the scale of ring ``j``, ``alpha_j ... alpha_{N-1}``,
    and row 0 is 1 (features outside all groups); a product of factors <= 1, so the scale grows
    with ``j``.
    """
    n_groups = len(thr)
    # row N - n holds alpha_n after a leading row of 1: the cumulative product does the rest
    alphas = ring_sq.new_empty((n_groups + 1, *ring_sq.shape[1:]))
    alphas[0] = 1
    shrunk = torch.zeros_like(ring_sq[0])  # norm of G_{n-1} after its step
    alpha_rows = alphas.unbind()
    for n, (sq, thr_n) in enumerate(zip(ring_sq.unbind()[:n_groups], thr, strict=True)):
        norm = torch.addcmul(sq, shrunk, shrunk).sqrt_()
        alpha = alpha_rows[n_groups - n]
        if thr_n == 0:
            alpha.fill_(1)
        else:  # max(0, 1 - thr / norm) as (norm - thr) / norm: <= 0 exactly when norm <= thr
            torch.sub(norm, thr_n, out=alpha).div_(norm).clamp_min_(0)
        shrunk = norm.mul_(alpha)
    return alphas.cumprod_(0)


def _nested_prox_by_ring(
    x: torch.Tensor, thr: list[float], ring: torch.Tensor, dim: int, out: torch.Tensor | None
) -> torch.Tensor:
    """:func:`nested_group_prox` from the thresholds ``t w_n`` and :func:`_feature_rings`, unchecked."""
    n_groups = len(thr)
    xm = x.movedim(dim, -1)
    # the only full-size temporary: the squares, then each entry's scale
    buf = torch.empty(xm.shape, dtype=x.dtype, device=x.device)
    flat = torch.mul(xm, xm, out=buf).view(-1, ring.numel())
    member = torch.nn.functional.one_hot(ring, n_groups + 1).to(x.dtype)
    ring_sq = member.T @ flat.T  # (N + 1, slices): the fast orientation, and contiguous rows
    torch.index_select(_nested_ring_scales(ring_sq, thr).T, -1, n_groups - ring, out=flat)
    res = buf if out is None else out.movedim(dim, -1)
    # 0 + x * scale: exact zeros are +0, as in the single-group operators
    torch.addcmul(torch.zeros((), dtype=x.dtype, device=x.device), xm, buf, out=res)
    return res.movedim(-1, dim) if out is None else out


def _sort_rows(
    x: torch.Tensor, indices: bool = True, workspace: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch.sort(x, dim=-1)`` of a 2-D tensor, faster on CPU: ``(values, indices)``.

    Parameters
    ----------
    x : torch.Tensor, shape (B, n)
        Rows to sort (no NaN); not modified. The result holds no autograd graph.
    indices : bool, default True
        Whether to return the permutation (else ``None``): sorting values
        alone is faster.
    workspace : dict, optional
        Scratch buffers kept between calls (see :func:`tv_prox`); the results
        are then among them, valid until the next call with this dict.

    Returns
    -------
    values : torch.Tensor, shape (B, n)
        Each row in ascending order (``-0.0`` may come before ``+0.0``).
    indices : torch.Tensor of int64, shape (B, n), or None
        ``values[b, i] = x[b, indices[b, i]]``; equal values keep the order
        of their indices on CPU.

    Notes
    -----
    On CPU, float32 and float64 rows are sorted by NumPy, whose sorts use
    SIMD kernels (x86-simd-sort) several times faster than ``torch.sort``
    there. For the permutation of float32 rows, each value and its index are
    packed into one int64 key (order-preserving integer bits of the value
    above, the index below), so one sort of keys gives both (about 1.3x
    faster than an argsort and a gather). Other devices and dtypes use
    ``torch.sort``.
    """
    x = x.detach()
    n = x.shape[-1]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or n >= 2**31:
        values, order = torch.sort(x, dim=-1)
        return values, order if indices else None
    x = x.contiguous()
    if not indices:
        return torch.from_numpy(np.sort(x.numpy(), axis=-1)), None
    if x.dtype == torch.float64:
        order = torch.from_numpy(x.numpy().argsort(axis=-1))
        return x.gather(-1, order), order
    # flipping the magnitude bits of negative floats orders their int32 bits like the floats
    bits = x.view(torch.int32)
    flip = torch.bitwise_right_shift(bits, 31, out=_scratch(workspace, "bits", x.shape, bits))
    flip.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)
    key = _scratch(workspace, "keys", x.shape, x, torch.int64).copy_(flip)
    key.bitwise_left_shift_(32).bitwise_or_(torch.arange(n))
    key.numpy().sort(axis=-1)
    # the values' bits back, from the upper halves of the keys (flipping again undoes the flip)
    high = key.view(torch.int32)[:, 1::2] if sys.byteorder == "little" else (key >> 32).to(torch.int32)
    torch.bitwise_right_shift(high, 31, out=flip).bitwise_and_(0x7FFFFFFF).bitwise_xor_(high)
    return flip.view(torch.float32), key.bitwise_and_(0xFFFFFFFF)


def _ramp_block_mean(
    csum: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, n: int, t: torch.Tensor
) -> torch.Tensor:
    """Mean of ``v_i = xs_i - t (2 i - n - 1)`` (1-based ``i``) over ``[start, stop)``.

    Works column-wise: ``csum`` of shape (n + 1, R) holds the cumulative sums of
    the sorted columns of ``xs`` with a leading zero row, ``start`` and
    ``stop`` are integer tensors with R columns. The mean of the ramp
    ``2 i - n - 1`` over the 0-based positions ``start..stop-1`` is the exact
    integer ``start + stop - n``, so the block holding all ``n`` entries gets a
    ramp term of exactly 0. Empty blocks give NaN.
    """
    dt = csum.dtype
    total = csum.gather(0, stop) - csum.gather(0, start)
    return total / (stop - start).to(dt) - t * (start + stop - n).to(dt)


def _stack_pav(csum: torch.Tensor, starts: torch.Tensor, n: int, t: torch.Tensor) -> torch.Tensor:
    """Exact pool-adjacent-violators from given initial blocks, vectorised over columns.

    ``starts`` of shape (W, R) lists, per column, the start positions of its
    initial blocks in increasing order, padded with ``n`` (at least one
    padding row). Every column runs its own stack machine; one vectorised step
    either merges the two top blocks of a column (if their means violate the
    order) or pushes the column's next initial block. A column with ``m``
    initial blocks is done after at most ``2 m - 1`` steps (``m`` pushes and
    fewer than ``m`` merges): at most ``2 W`` steps of ``O(R)`` work. Returns
    the final block starts in the same padded format.
    """
    width, cols = starts.shape
    device = starts.device
    bstart = torch.zeros(width, cols, dtype=torch.long, device=device)  # stack of block starts
    top = torch.zeros(1, cols, dtype=torch.long, device=device)  # stack pointer
    pos = torch.ones(1, cols, dtype=torch.long, device=device)  # top block ends at starts[pos]
    nxt = starts[1:2].clone()
    max_steps = 2 * int((starts < n).sum(0).max()) + 8
    for step in range(max_steps):
        left = bstart.gather(0, (top - 1).clamp_min(0))
        right = bstart.gather(0, top)
        left_mean = _ramp_block_mean(csum, left, right, n, t)
        right_mean = _ramp_block_mean(csum, right, nxt, n, t)
        viol = (top >= 1) & (left_mean > right_mean)
        push = ~viol & (nxt < n)
        if step % 8 == 7 and not bool((viol | push).any()):
            break
        top = top - viol.long() + push.long()
        bstart.scatter_(0, top, torch.where(push, nxt, bstart.gather(0, top)))
        pos = pos + push.long()
        nxt = torch.where(push, starts.gather(0, pos.clamp_max(width - 1)), nxt)
    else:  # pragma: no cover - the step bound is a theorem
        raise RuntimeError("pool-adjacent-violators did not terminate")
    rows = torch.arange(width, device=device).unsqueeze(1)
    return torch.where(rows <= top, bstart, torch.full_like(bstart, n))


# Cost model of ``_isotonic_pav`` in units of "one column of one stack step":
# a parallel pass costs about 4 units per (block, column) plus a fixed overhead,
# a stack step has a fixed (interpreter / kernel launch) overhead of about 2500.
_PASS_COST_PER_ENTRY = 4
_PASS_OVERHEAD = 3000
_STACK_STEP_OVERHEAD = 2500


def _isotonic_ramp(xs: torch.Tensor, t: torch.Tensor, workspace: dict | None = None) -> torch.Tensor:
    """Isotonic regression of ``v_i = xs_i - t (2 i - n - 1)`` for the rows of ``xs``.

    ``xs`` has shape (B, n), each row sorted ascending. A row whose ``v`` is
    already non-decreasing (no two entries closer than ``2 t``: the usual
    case for a small step) is its own regression; only the other rows run
    :func:`_isotonic_pav` (on columns). The result and a temporary are kept
    in ``workspace`` when given.
    """
    n = xs.shape[-1]
    ramp = 2 * torch.arange(1, n + 1, dtype=xs.dtype, device=xs.device) - n - 1
    v = torch.sub(xs, t * ramp, out=_scratch(workspace, "ramp", xs.shape, xs))
    # the smallest gap (faster than comparing the neighbours)
    gaps = torch.sub(v[:, 1:], v[:, :-1], out=_scratch(workspace, "gaps", (xs.shape[0], n - 1), xs))
    unsorted = gaps.amin(1) < 0
    if bool(unsorted.any()):
        rows = unsorted.nonzero().squeeze(1)
        v[rows] = _isotonic_pav(xs[rows].T, t).T
    return v


def _isotonic_pav(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Isotonic regression of ``xs_i - t (2 i - n - 1)`` for the columns of ``xs``, by PAV.

    ``xs`` has shape (n, B), each column sorted ascending. A partition into
    blocks is stored per column as the padded, increasing list of block
    starts. Phase 1 runs parallel PAV passes: any two adjacent blocks whose
    means violate the order lie in one level set of the solution, so all of
    them are merged at once; columns without violators are final and leave the
    active set. Passes can cascade (up to ``n`` of them), so following a
    "ski rental" rule they run only while their total cost stays below the
    cost of the exact stack PAV; phase 2 finishes the remaining columns with
    :func:`_stack_pav` from their current blocks. The result is exact either
    way, at a cost of at most about twice the cheaper strategy.
    """
    n, ncols = xs.shape
    device = xs.device
    csum = torch.cat([xs.new_zeros(1, ncols), xs.cumsum(0)], dim=0)
    final = torch.full((n + 1, ncols), n, dtype=torch.long, device=device)
    cols = torch.arange(ncols, device=device)
    starts = torch.arange(n + 1, device=device).unsqueeze(1).expand(n + 1, ncols)
    cs = csum
    budget = 2 * n * (ncols + _STACK_STEP_OVERHEAD)
    spent = 0
    while True:
        width, active = starts.shape
        cost = _PASS_COST_PER_ENTRY * width * active + _PASS_OVERHEAD
        if spent + cost > budget:
            break
        spent += cost
        mean = _ramp_block_mean(cs, starts[:-1], starts[1:], n, t)
        viol = (starts[1:-1] < n) & (mean[:-1] > mean[1:])
        still = viol.any(0)
        if not bool(still.all()):
            done = ~still
            final[:width, cols[done]] = starts[:, done]
            cols, cs, starts, viol = cols[still], cs[:, still], starts[:, still], viol[:, still]
            if cols.numel() == 0:
                break
        # drop the start of every block that merges into its left neighbour
        keep = starts < n
        keep[1:-1] &= ~viol
        dest = keep.cumsum(0) - 1
        new_width = int(dest[-1].max()) + 2
        merged = torch.full((width + 1, cols.numel()), n, dtype=torch.long, device=device)
        merged.scatter_(0, torch.where(keep, dest, torch.full_like(dest, width)), starts)
        starts = merged[:new_width]
    if cols.numel():
        out = _stack_pav(cs, starts.contiguous(), n, t)
        final[: out.shape[0], cols] = out
    # expand block means to the positions
    width = int((final < n).sum(0).max()) + 1
    final = final[:width]
    mean = _ramp_block_mean(csum, final[:-1], final[1:], n, t)
    flags = torch.zeros(n + 1, ncols, dtype=torch.bool, device=device)
    flags.scatter_(0, final[:-1], True)
    block = flags[:n].cumsum(0) - 1
    return mean.gather(0, block)


def pairwise_l1_prox(
    x: torch.Tensor,
    t: Scalar,
    dim: int = 0,
    mask: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Proximal operator of the pairwise (weight-sharing) l1 penalty.

    Parameters
    ----------
    x : torch.Tensor
        Input of any shape (floating point).
    t : float or 0-d torch.Tensor
        Step size, ``t >= 0``.
    dim : int, default 0
        The axis whose entries are compared pairwise; the problem is solved
        independently for every index of the other dimensions.
    mask : torch.Tensor of bool, optional
        Broadcastable to ``x.shape``; only the entries where it holds exist:
        each slice's penalty is over the pairs of its existing entries, and
        the other entries are returned unchanged. Slices with different
        numbers of entries are solved in one batch.
    out : torch.Tensor, optional
        Where to write the result (shape, dtype and device of ``x``); it may be
        ``x`` itself.
    workspace : dict, optional
        Scratch buffers kept between calls (see :func:`tv_prox`): pass the
        same dict to successive calls on inputs of one shape, dtype and device.

    Returns
    -------
    torch.Tensor
        ``prox_{t g}(x)``, same shape, dtype and device as ``x``.

    Notes
    -----
    The penalty is :math:`g(u) = \\sum_{p<q} |u_p - u_q|` over the ``n``
    entries along ``dim``. The prox preserves the order of ``x``. With
    :math:`x_{(1)} \\le \\dots \\le x_{(n)}` sorted, the subgradient of ``g``
    at sorted position ``i`` is :math:`2i - n - 1` when values are distinct,
    so the solution in sorted order is the isotonic (non-decreasing)
    regression of

    .. math:: v_i = x_{(i)} - t (2i - n - 1), \\qquad i = 1, \\dots, n,

    which is then un-sorted. Ties are pooled by the isotonic regression.
    Block means are computed as
    :math:`\\operatorname{mean}(x_{(j..k)}) - t (j + k - n - 1)` from
    cumulative sums (in float64 where the device supports it), so for large
    ``t`` every entry equals the same number, the mean of ``x``.

    Algorithm and complexity, for ``n`` entries and ``B`` independent slices
    (all steps vectorised over the slices): sorting costs
    :math:`O(B n \\log n)`. The isotonic regression (pool adjacent violators,
    PAV) first runs *parallel* PAV passes, each merging every pair of adjacent
    blocks that violates the order (valid because such a pair always lies in
    one level set of the solution) at :math:`O(Bn)` cost; slices without
    violators drop out. Passes usually finish in a few rounds but can cascade,
    so they stop once their cost reaches that of the alternative, and the
    remaining slices are finished by an exact stack-based PAV started from the
    current blocks: at most :math:`2n` vectorised steps of :math:`O(B)` work.
    Total: :math:`O(B n \\log n)` work, :math:`O(B n)` memory and
    :math:`O(n)` Python-level iterations (no :math:`O(n^2)` memory).

    On CPU (float32/float64, ``n <= 2**16``) the same solution is computed by
    :mod:`softcnn._kernels`: one NumPy sort of 32-bit keys per row (the
    value's order-preserving float32 bits with the low ``ceil(log2 n)``
    replaced by the index: ties of these shortened values are put in order
    by an insertion sort, or a merge sort if they are many), then one
    compiled pass per row for the isotonic regression (a sequential PAV
    stack) and the write-back; absent entries are skipped, not padded.

    With a ``mask``, a slice with :math:`n_k < n` entries is padded with
    values above all of them by more than :math:`2tn` and :math:`4t` apart
    (so its padding sorts last and never pools with them or with itself) and
    solved with the ramp of :math:`n`,
    which shifts its :math:`v_i` by the constant :math:`t (n - n_k)`; the
    isotonic regression moves by the same constant, which is subtracted.
    """
    _check_input(x)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    acc = torch.float64 if x.device.type != "mps" else x.dtype
    t_, t_float = _scalar(t, "t", x.new_empty((), dtype=acc))
    (d,) = _normalize_dims(dim, x.ndim)
    n = x.shape[d]
    if mask is not None:
        m = torch.as_tensor(mask, device=x.device)
        if m.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor, got dtype {m.dtype}")
        try:
            m.broadcast_to(x.shape)
        except RuntimeError as exc:
            raise ValueError(
                f"mask of shape {tuple(m.shape)} is not broadcastable to x shape {tuple(x.shape)}"
            ) from exc
    _check_out(out, x)
    if n <= 1 or t_float == 0 or x.numel() == 0:
        return x.clone() if out is None else out.copy_(x)
    moved = x.movedim(d, -1)  # one row per slice: sorts and scatters are fastest along rows
    if not moved.is_contiguous():
        moved = _scratch(workspace, "rows", moved.shape, x).copy_(moved)
    rows = moved.view(-1, n)
    if _kernels.runs_on(x) and n <= 2**16:
        u = _pairwise_compiled(rows, None if mask is None else m, d, moved.shape, t_float, workspace)
        return _pairwise_result(u.view(moved.shape).movedim(-1, d), out, workspace)
    keys = rows
    if mask is not None:
        # the mask as 0/1 numbers, at its own size (broadcast, not expanded): on CPU, arithmetic
        # on them is several times faster than boolean selections
        e = m.reshape((1,) * (x.ndim - m.ndim) + tuple(m.shape)).movedim(d, -1).to(x.dtype)
        n_small = e.sum(-1, keepdim=True)  # entries per slice, at the mask's size
        count = n_small.expand(*moved.shape[:-1], 1).reshape(-1, 1)
        # absent entries sort last: the max with +inf there, and with -inf at the others
        sel = e.mul(-2).add_(1).mul_(float("inf"))
        keys = torch.maximum(moved, sel, out=_scratch(workspace, "keys_in", moved.shape, x)).view(-1, n)
    xs, order = _sort_rows(keys, workspace=workspace)
    xs = _scratch(workspace, "sorted", xs.shape, x, acc).copy_(xs)
    if mask is not None:
        # in place of the +inf after the existing entries of a row (the min with finite values
        # above them all), padding above every entry by more than 2 t n, and 4 t apart: it is
        # its own (non-decreasing) regression and never pools with the entries
        big = 2 * (_max_abs(x.detach()) + 2 * t_float * n) + 1
        torch.minimum(xs, torch.arange(n, dtype=acc, device=x.device).mul_(4 * t_).add_(big), out=xs)
    us = _isotonic_ramp(xs, t_, workspace)
    if mask is not None:
        us -= t_ * (n - count).to(acc)
    us = _scratch(workspace, "solution", us.shape, x).copy_(us)
    u = _scratch(workspace, "unsorted", rows.shape, x).scatter_(1, order, us).view(moved.shape)
    if mask is not None:  # absent entries, and slices with one entry, are unchanged: u e + x (1 - e)
        e = e * (n_small > 1)
        u.mul_(e).addcmul_(moved, e.neg_().add_(1))
    return _pairwise_result(u.movedim(-1, d), out, workspace)


def _pairwise_result(u: torch.Tensor, out: torch.Tensor | None, workspace: dict | None) -> torch.Tensor:
    if out is not None:
        return out.copy_(u)
    # a new tensor: u may be the workspace's
    return u.contiguous() if workspace is None else u.clone(memory_format=torch.contiguous_format)


def _pairwise_compiled(rows: torch.Tensor, mask: torch.Tensor | None, d: int, shape: torch.Size, t: float,
                       workspace: dict | None) -> torch.Tensor:
    """:func:`pairwise_l1_prox` of contiguous ``rows`` ``(B, n)`` on CPU: 32-bit keys
    (:func:`softcnn._kernels.pairwise_keys`), one NumPy sort, then one compiled pass per row
    (:func:`softcnn._kernels.pairwise_solve`); ``mask`` as given (broadcastable to the input),
    ``shape`` the rows' shape before flattening (the input with ``dim`` last)."""
    B, n = rows.shape
    a = _kernels.array

    def exists():  # 0/1 per entry of a row, repeating every len(result) rows where it can
        if mask is None:
            return torch.ones(1, n, dtype=torch.uint8)
        e = mask.reshape((1,) * (len(shape) - mask.ndim) + tuple(mask.shape)).movedim(d, -1)
        lead = 0
        while lead < e.ndim - 1 and e.shape[lead] == 1:
            lead += 1
        e = e[(0,) * lead]  # leading size-1 dimensions: rows repeat with the period of the rest
        # (row-major: the kernels read it along rows; a transposed mask keeps its strides otherwise)
        return e.expand(*shape[lead:]).reshape(-1, n).to(torch.uint8, memory_format=torch.contiguous_format)

    present = _cached(workspace, "exists", (mask, tuple(shape), d), exists)
    bits = _kernels.pairwise_index_bits(n)
    keys = _scratch(workspace, "keys32", rows.shape, rows, torch.int32)
    as32 = rows  # the keys read float32 bits: float64 rows rounded first (rounding keeps the order)
    if rows.dtype != torch.float32:
        as32 = _scratch(workspace, "as32", rows.shape, rows, torch.float32).copy_(rows)
    _kernels.pairwise_keys(a(as32.view(torch.int32)), a(present), bits, a(keys))
    a(keys).sort(axis=-1)
    u = _scratch(workspace, "unsorted", rows.shape, rows)
    _kernels.pairwise_solve(a(rows), a(keys), a(present), bits, t, a(u))
    return u


# ---------------------------------------------------------------------------
# total variation on a 2-D grid
# ---------------------------------------------------------------------------


def _columns(t: torch.Tensor, cols: torch.Tensor, rest: tuple[int, ...]) -> torch.Tensor:
    """The flat columns ``cols`` of ``rest`` from ``t`` of shape ``(..., *r)``, ``r`` broadcastable
    to ``rest`` (index 0 along its size-1 dimensions): shape ``(..., len(cols))``."""
    at = torch.unravel_index(cols, rest)
    at = [i if s > 1 else torch.zeros_like(i) for i, s in zip(at, t.shape[t.ndim - len(rest):], strict=True)]
    return t[(..., *at)]


# Anisotropic TV drops converged columns from its iterations once at least this many (and at
# least half) have converged: copying the others out costs about as much as a few iterations of
# this many columns.
_MIN_DROP = 64


def tv_prox(
    x: torch.Tensor,
    t: Scalar,
    grid_shape: tuple[int, int],
    kind: str = "l1",
    n_iter: int = 200,
    tol: float = 1e-10,
    mask: torch.Tensor | None = None,
    *,
    dual: torch.Tensor | None = None,
    return_dual: bool = False,
    out: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Proximal operator of total variation over a 2-D grid of positions.

    Parameters
    ----------
    x : torch.Tensor, shape (Lh * Lw, \*rest)
        Values at the positions of an ``Lh x Lw`` grid, positions first in
        row-major order.
    t : float or 0-d torch.Tensor
        Step size, ``t >= 0``.
    grid_shape : tuple of int
        ``(Lh, Lw)``.
    kind : {"l1", "group"}, default "l1"
        ``"l1"``: anisotropic TV, independently for every entry of ``rest``.
        ``"group"``: group fused lasso, the difference between two positions
        is measured by the Euclidean norm over all of ``rest``.
    n_iter : int, default 200
        Maximum number of dual iterations.
    tol : float, default 1e-10
        Stop once the largest change of the dual variable over one iteration
        is at most ``max(tol, eps / 8) * max|x|``, ``eps`` the machine epsilon
        of the dtype: a change below ``eps / 8 * max|x|`` (the step 1/8 times
        an ulp of ``max|x|``) is round-off, which float32 never gets under
        ``1e-10``. Checked after each of the first 10 iterations (where a warm
        start usually stops), then every 10. For ``"l1"`` every entry of
        ``rest`` is its own problem and is tested on its own: once most have
        stopped, the others iterate alone, and then are checked every iteration.
    mask : torch.Tensor of bool, optional
        Broadcastable to ``x.shape``; ``mask[p, j]`` says whether entry ``j``
        exists at position ``p``. A pair ``(p, q)`` is compared at entry ``j``
        only where both ``mask[p, j]`` and ``mask[q, j]`` hold; entries that do
        not exist are returned unchanged (their dual variables are 0; a -0.0 may
        come back as +0.0).
    dual : torch.Tensor, shape (E, R), optional
        Starting point of the dual iterations (warm start), typically the
        ``dual`` returned by a call on a nearby ``x``: ``E = Lh (Lw - 1) +
        (Lh - 1) Lw`` edges (the horizontal pairs, then the vertical ones,
        each row-major) and ``R = prod(rest)``. Any tensor of that shape is a
        valid start: the first iterate is projected onto the feasible set of
        this call (radius ``t``, ``mask``), with no momentum before it. It is
        not modified (unless it is the dual kept in ``workspace``). ``None``
        starts from 0.
    return_dual : bool, default False
        Also return the final dual iterate, to warm-start a later call.
    out : torch.Tensor, optional
        Where to write ``u`` (shape, dtype and device of ``x``); it may be
        ``x`` itself, which is read until the end.
    workspace : dict, optional
        Scratch buffers kept between calls: pass the same dict (empty at
        first) to successive calls on inputs of one shape, dtype and device,
        such as the steps of a proximal-gradient fit, and the dual-sized
        buffers are allocated once (fresh memory costs more than the
        arithmetic on CPU). The returned dual is then one of them: it stays
        valid until the next call with this dict, which may take it as
        ``dual``.

    Returns
    -------
    u : torch.Tensor
        The (approximate) ``prox_{t g}(x)``, same shape, dtype and device as
        ``x``.
    dual : torch.Tensor, shape (E, R)
        Only with ``return_dual=True``: the final (feasible) dual iterate.

    Notes
    -----
    Let ``D`` map ``u`` to its differences :math:`u_q - u_p` over the
    4-neighbour pairs ``p ~ q`` of the grid (horizontal and vertical), masked
    as described above. The penalty is :math:`g(u) = \sum_{p\sim q}
    \varphi(u_q - u_p)` with :math:`\varphi = \|\cdot\|_1` (``"l1"``) or
    :math:`\|\cdot\|_2` (``"group"``). By duality,

    .. math:: \operatorname{prox}_{t g}(x) = x - D^\top z^\star, \qquad
              z^\star \in \arg\min_{z \in C_t} \tfrac12 \|x - D^\top z\|_2^2,

    where :math:`C_t` is the product of the dual-norm balls of radius ``t``:
    boxes :math:`|z_{e,j}| \le t` for ``"l1"`` and Euclidean balls
    :math:`\|z_e\|_2 \le t` for ``"group"``. The dual is solved by FISTA
    (Beck & Teboulle 2009) with projected gradient steps of size
    :math:`1/8 \le 1/\|D\|^2` (a 2-D grid difference operator has
    :math:`\|D\|^2 \le 8`) and the gradient-based adaptive restart of
    O'Donoghue & Candes (2015), from 0 or from ``dual``. The
    returned ``u = x - D^T z`` for the last (feasible) dual iterate; the
    primal error satisfies :math:`\|u - u^\star\|^2 \le 2 (F(z) - F^\star)`
    where ``F`` is the dual objective, which FISTA drives to 0 at rate
    :math:`O(1/k^2)` from any feasible start, so a start near
    :math:`z^\star` (the previous step's dual in a proximal-gradient loop)
    meets the same stopping test in fewer iterations. Each iteration costs
    :math:`O(\text{numel})` (about ten passes over the dual, in place).

    Anisotropic TV is first *screened*, exactly. At the solution
    :math:`|u_p - x_p| \le 4t` (a position has at most four edges, each
    :math:`|z_e| \le t`), so an edge with :math:`|(Dx)_e| > 8t` keeps the
    sign of :math:`(Dx)_e` and its dual is :math:`z_e = t \operatorname{sign}
    (Dx)_e` whatever the others. An entry (column of ``rest``) whose edges are
    all such is solved without iterating: after a step of a fit with a small
    ``t``, all but a few dozen of hundreds. Given those, an edge that is not
    fixed and shares no position with another such edge is a two-point
    problem, :math:`z_e = \operatorname{clip}((Dr)_e / 2, -t, t)` with
    :math:`r = x - D^\top z` over the fixed edges, also exact. Only the
    entries with chains of unfixed edges run the iterations above (if they
    are at most half of them, as a smaller problem of their own).

    On CPU (float32 and float64 tensors) both kinds run as compiled loops
    (numba) instead of a dozen tensor operations an iteration. ``"group"``
    runs the same iterations, each one pass over the positions and one over
    the edges. ``"l1"`` screens as above in one pass, then solves each entry that
    has unfixed edges on those edges alone: FISTA with the step
    :math:`1 / \max_{e=(p,q)} (\deg p + \deg q)` over the unfixed edges, in
    float64, from the warm dual, stopped once the duality gap
    :math:`\sum_e t |(Du)_e| - z_e (Du)_e` (zero on the fixed edges) is at
    most ``stop**2 / 2``, which bounds :math:`\|u - u^\star\|_2` by
    ``stop`` (``stop`` the change threshold above), or after ``n_iter``.
    """
    _check_input(x)
    t_, t_float = _scalar(t, "t", x)
    if kind not in ("l1", "group"):
        raise ValueError(f"kind must be 'l1' or 'group', got {kind!r}")
    try:
        lh, lw = (int(s) for s in grid_shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"grid_shape must be a pair of ints (Lh, Lw), got {grid_shape!r}") from exc
    if lh < 1 or lw < 1:
        raise ValueError(f"grid_shape must be positive, got {grid_shape!r}")
    if x.ndim < 1 or x.shape[0] != lh * lw:
        raise ValueError(
            f"x must have shape (Lh * Lw, *rest) = ({lh * lw}, ...), got {tuple(x.shape)}"
        )
    if not isinstance(n_iter, numbers.Integral) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol must be >= 0, got {tol!r}")

    shape = x.shape
    rest = tuple(shape[1:])
    X = x.reshape(lh, lw, -1)
    n_rest = X.shape[-1]
    n_h, n_v = lh * (lw - 1), (lh - 1) * lw  # horizontal and vertical edges
    n_e = n_h + n_v
    if dual is not None:
        if not isinstance(dual, torch.Tensor) or tuple(dual.shape) != (n_e, n_rest):
            got = tuple(dual.shape) if isinstance(dual, torch.Tensor) else type(dual).__name__
            raise ValueError(f"dual must be a tensor of shape (E, R) = ({n_e}, {n_rest}), got {got}")
        dual = dual.to(dtype=x.dtype, device=x.device)
    if mask is not None:
        m = torch.as_tensor(mask, device=x.device)
        if m.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor, got dtype {m.dtype}")
        try:
            m.broadcast_to(shape)
        except RuntimeError as exc:
            raise ValueError(
                f"mask of shape {tuple(m.shape)} is not broadcastable to x shape {tuple(shape)}"
            ) from exc
        # expanded over positions only: along rest it keeps its own extent, so the bounds built
        # from it cost a fraction of the dual's memory traffic (e.g. one channel's worth)
        m = m.reshape((1,) * (len(shape) - m.ndim) + tuple(m.shape))
        m = m.expand(lh * lw, *m.shape[1:]).reshape(lh, lw, *m.shape[1:])
        edge_mask = _cached(workspace, "edge_mask", (m, lh), lambda: torch.cat(
            [(m[:, 1:] & m[:, :-1]).flatten(0, 1), (m[1:] & m[:-1]).flatten(0, 1)]))
    else:
        m = edge_mask = None

    _check_out(out, x)

    def no_change():
        u = x.clone() if out is None else out.copy_(x)
        return (u, x.new_zeros(n_e, n_rest)) if return_dual else u

    def buffer(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _scratch(workspace, name, shape, x)

    if t_float == 0 or lh * lw == 1 or x.numel() == 0:
        return no_change()
    compiled = _kernels.runs_on(x)
    x_scale = _max_abs(x.detach())
    if x_scale == 0:
        return no_change()

    def residual(z: torch.Tensor, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # out = X - D^T z; masked entries of z are always exactly zero
        c = z.shape[1]
        if compiled and z.is_contiguous() and X.is_contiguous() and out.is_contiguous():
            a = _kernels.array
            _kernels.residual(a(X.view(lh * lw, c)), a(z), lh, lw, a(out.view(lh * lw, c)))
            torch.autograd.graph.increment_version(out)  # (it may be a parameter: autograd must see the write)
            return out
        zh, zv = z[:n_h].view(lh, lw - 1, c), z[n_h:].view(lh - 1, lw, c)
        torch.sub(X[:, 1:], zh, out=out[:, 1:])  # (no copy of X first: one pass less)
        out[:, 0] = X[:, 0]
        out[:, :-1] += zh
        out[1:] -= zv
        out[:-1] += zv
        return out

    def degree(w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # out = |D|^T w: per position, the sum of w over its edges
        c = w.shape[1]
        wh, wv = w[:n_h].view(lh, lw - 1, c), w[n_h:].view(lh - 1, lw, c)
        out[:, 0] = 0
        out[:, 1:] = wh
        out[:, :-1] += wh
        out[1:] += wv
        out[:-1] += wv
        return out

    def grad(r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # out = D r, unmasked: project_ zeroes the masked edges
        c = out.shape[1]
        torch.sub(r[:, 1:], r[:, :-1], out=out[:n_h].view(lh, lw - 1, c))
        torch.sub(r[1:], r[:-1], out=out[n_h:].view(lh - 1, lw, c))
        return out

    # the projection reads the bounds through a view of the dual as (E, *view), which
    # broadcasts against them: (E, *rest) at first, (E, R') once columns are dropped
    view = rest
    if kind == "l1":
        # the box of radius t, of radius 0 on masked edges: one clamp projects and masks
        hi = box = t_ if edge_mask is None else _cached(
            workspace, "box", (edge_mask, t_float, x.dtype), lambda: torch.where(edge_mask, t_, torch.zeros_like(t_)))
        lo = -hi
        keep = None

        def project_(z: torch.Tensor) -> torch.Tensor:
            z.view(n_e, *view).clamp_(lo, hi)
            return z

    else:
        # masked edges stay 0 (the start is masked, and the gradient steps are 0 there), so the
        # projection onto the balls need not mask
        keep = None if edge_mask is None else _cached(workspace, "keep", (edge_mask, x.dtype),
                                                      lambda: edge_mask.to(x.dtype))

        def project_(z: torch.Tensor) -> torch.Tensor:
            norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
            return z.mul_(t_ / torch.maximum(norm, t_))

    step = 1.0 / 8.0
    # below the round-off of one update (step times an ulp of max|x|) the change is noise
    stop = max(tol, step * torch.finfo(x.dtype).eps) * x_scale

    def ascend(y: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # out = y + step g, with steps of 0 on the edges that keep (if any) masks
        if keep is None:
            return torch.add(y, g, alpha=step, out=out)
        torch.addcmul(y.view(n_e, *view), g.view(n_e, *view), keep * step, out=out.view(n_e, *view))
        return out

    # z and new swap at every iteration: the dual handed back may be either, and is read here
    # before either is written (copying a tensor onto itself is harmless)
    z, new = buffer("z", (n_e, n_rest)), buffer("new", (n_e, n_rest))
    if dual is not None and dual.data_ptr() == new.data_ptr():
        z, new = new, z
    # no projection of the start: the first iterate is projected, and there is no momentum before
    # it (the usual start, the last call's dual, is feasible already)
    # the dual this workspace last returned (the same tensor, unchanged since: its version) for the
    # same mask is 0 on the masked edges already (the multiply costs 7% of a warm group solve)
    last = None if workspace is None else workspace.get("masked_dual")
    masked = dual is None or keep is None or (
        last is not None and last[0] is keep and last[1]() is dual and last[2] == dual._version)
    z = z.zero_() if dual is None else z.copy_(dual)
    if not masked:
        z.view(n_e, *view).mul_(keep)
    ra = buffer("r", X.shape)
    n_loop = int(n_iter)
    # the screening's margin: 8 t, and a few ulps for the round-off of D x
    margin = 8 * (1 + 8 * torch.finfo(x.dtype).eps)
    if compiled:  # the same problem by compiled loops (see the Notes)
        a, X2 = _kernels.array, X.reshape(lh * lw, n_rest)
        if kind == "l1":  # from the warm dual in z, into new
            _kernels.tv_l1(a(X2), a(_kernels.repeating_rows(hi, rest, n_e)), lh, lw, margin, a(z),
                           dual is not None, stop, n_loop, a(new))
            z = new
        else:
            steps = _cached(workspace, "steps", (keep, x.dtype),
                            lambda: step * (torch.ones((), dtype=x.dtype) if keep is None else keep))
            _, in_new = _kernels.tv_group(
                a(X2), a(_kernels.repeating_rows(steps, rest, n_e)), lh, lw, t_float, stop, n_loop, a(z), a(new),
                a(buffer("y", z.shape)), a(ra.view(lh * lw, n_rest)), *_kernels.bits(torch.empty(n_rest, dtype=x.dtype)),
            )
            z = new if in_new else z
        n_loop = 0
    elif kind == "l1":
        # Screening, exact: at the solution |u_p - x_p| <= 4 t (at most four edges, |z_e| <= t
        # each), so an edge whose difference in x exceeds 8 t keeps its sign there and its dual
        # is t sign((D x)_e). Columns made only of such edges (after a step of a fit, all but a
        # few dozen of hundreds) need no iteration; the others, if few, are a smaller problem.
        dx = grad(X, buffer("g", z.shape))
        # t sign((D x)_e) on every edge, 0 on masked ones, in one pass: the unsure edges' values
        # are replaced below (by the smaller problem's dual, the warm dual or the closed form)
        start = new
        torch.copysign(hi, dx.view(n_e, *view), out=start.view(n_e, *view))
        gap = dx.abs_()
        # (a margin of a few ulps for the round-off of D x; masked edges are sure, with dual 0)
        gap.view(n_e, *view).sub_(hi * margin)
        left = (gap.amin(0) < 0).nonzero().squeeze(1)
        if n_rest - left.numel() >= max(n_rest // 2, 1):
            if left.numel():
                X_left = X.index_select(2, left)
                scale_left = _max_abs(X_left)
                _, start[:, left] = tv_prox(
                    X_left.view(lh * lw, -1), t_, (lh, lw), kind, n_iter,
                    stop / scale_left if scale_left else tol,
                    None if m is None else _columns(m, left, rest).reshape(lh * lw, -1),
                    dual=z.index_select(1, left), return_dual=True,
                )
            z, new, n_loop = start, z, 0
        else:
            # Most columns have unsure edges. Where those share no position, each is a two-point
            # problem given the sure edges: its dual is clamp((D r)_e / 2, -t, t) exactly, with
            # r = x - D^T z over the sure edges. The other columns start from the warm dual on
            # their unsure edges (and the exact one on the sure edges).
            unsure = gap < 0
            start.masked_fill_(unsure, 0.0)
            weight = unsure.to(x.dtype)
            pairs = project_(grad(residual(start, X, ra), gap).mul_(0.5))
            paired = degree(weight, ra).amax((0, 1)) <= 1
            torch.where(unsure & ~paired, z, start.addcmul_(pairs, weight), out=start)
            z, new, n_loop = start, z, 0 if bool(paired.all()) else n_loop
    # y is z itself while there is no momentum (at first, and after a restart)
    y, ybuf, g = z, None, buffer("g", z.shape)
    full = None  # the whole dual, once columns have been dropped from z
    cols = torch.arange(n_rest, device=x.device)  # the columns z holds
    Xa = X
    tau = 1.0
    for it in range(n_loop):
        grad(residual(y, Xa, ra), g)
        project_(ascend(y, g, new))
        diff = torch.sub(new, z, out=z)  # z's buffer is free: new holds the next iterate
        z, new = new, diff
        done = None
        if it < 10 or it % 10 == 9 or full is not None:
            if kind == "group" or cols.numel() < _MIN_DROP:  # (too few columns left to drop any)
                if _max_abs(diff) <= stop:
                    break
            else:
                # anisotropic TV: each column is its own problem and stops on its own test
                done = torch.maximum(diff.amax(0), diff.amin(0).neg_()) <= stop
                n_done = int(done.sum())
                if n_done == cols.numel():
                    break
        no_restart = y is new  # y was the previous iterate (its buffer now holds diff)
        if done is not None and n_done >= max(cols.numel() // 2, _MIN_DROP):
            # most columns are done (after a warm start, all but a few dozen of hundreds): the
            # others go on alone, on copies of their columns, from the momentum step on
            if full is None:
                full = z  # z's buffer is left to the whole dual
            else:
                full[:, cols] = z
            left = (~done).nonzero().squeeze(1)
            cols = cols[left]
            y = ybuf = None if no_restart else y.index_select(1, left)
            z, diff, Xa = z.index_select(1, left), diff.index_select(1, left), Xa.index_select(2, left)
            new, g, ra = torch.empty_like(z), torch.empty_like(z), torch.empty_like(Xa)
            if edge_mask is not None:  # the bounds of the columns left
                hi = _columns(box, cols, rest)
                lo = -hi
            view = (cols.numel(),)
        tau_next = (1 + math.sqrt(1 + 4 * tau * tau)) / 2
        # restart the momentum when the step goes against the gradient mapping, (y - z).diff > 0
        restart = not no_restart and bool(
            torch.dot(y.view(-1), diff.view(-1)) > torch.dot(z.view(-1), diff.view(-1))
        )
        beta, tau = (0.0, 1.0) if restart else ((tau - 1) / tau_next, tau_next)
        if beta == 0.0:
            y = z
        else:
            if ybuf is None:  # (the workspace keeps buffers of the whole dual only)
                ybuf = buffer("y", z.shape) if full is None else torch.empty_like(z)
            y = torch.add(z, diff, alpha=beta, out=ybuf)
    if full is not None:
        full[:, cols] = z
        z = full
    # the dual is 0 on every edge of an absent entry: it comes back unchanged, no selection needed
    direct = out is not None and out.is_contiguous()
    u = residual(z, X, out.view(X.shape) if direct else torch.empty_like(X)).view(shape)
    if out is not None and not direct:
        u = out.copy_(u)
    if keep is not None and workspace is not None:
        workspace["masked_dual"] = (keep, weakref.ref(z), z._version)
    return (u, z) if return_dual else u


# ---------------------------------------------------------------------------
# transformed l1
# ---------------------------------------------------------------------------


# Taylor coefficients of P in p = c / s^3 (see tl1_prox), binomial(3k + 1, k) / (k + 1), for small steps
_TL1_SERIES = (1.0, 2.0, 7.0, 30.0, 143.0)


def tl1_prox(
    x: torch.Tensor, t: Scalar, a: Scalar, *, out: torch.Tensor | None = None, workspace: dict | None = None
) -> torch.Tensor:
    """Proximal operator of the transformed l1 penalty (nonconvex), closed form.

    Parameters
    ----------
    x : torch.Tensor
        Input of any shape (floating point).
    t : float or 0-d torch.Tensor
        Step size, ``t >= 0``.
    a : float or 0-d torch.Tensor
        Shape parameter, ``a > 0``. Small ``a`` approaches the l0 penalty,
        large ``a`` the l1 penalty.
    out : torch.Tensor, optional
        Where to write the result (shape, dtype and device of ``x``); it may be
        ``x`` itself or a view of it.
    workspace : dict, optional
        Scratch buffers kept between calls for an input run by chunks (a large contiguous one).
        A whole input takes fresh ones: memory the allocator has just freed is in cache, where
        kept buffers have gone cold since the last call (measured at 28x28, support 9).

    Returns
    -------
    torch.Tensor
        A global minimiser of the (elementwise) prox objective, same shape,
        dtype and device as ``x`` (``out`` if given).

    Notes
    -----
    The penalty is :math:`\\rho_a(u) = \\frac{(a+1)|u|}{a+|u|}` elementwise
    (Zhang & Xin 2017, "Minimization of transformed L1 penalty: closed form
    representation and iterative thresholding algorithms"). The prox is a
    thresholding rule with threshold

    .. math:: \\tau = \\begin{cases} t \\frac{a+1}{a} &
              t \\le \\frac{a^2}{2(a+1)} \\\\
              \\sqrt{2t(a+1)} - \\frac a2 & \\text{otherwise,} \\end{cases}

    :math:`u = 0` for :math:`|x| \\le \\tau`, and otherwise

    .. math:: u = \\operatorname{sign}(x) \\Bigl(\\tfrac23 (a+|x|)
              \\cos\\tfrac{\\varphi}{3} - \\tfrac{2a}{3} + \\tfrac{|x|}{3}\\Bigr),
              \\qquad \\varphi = \\arccos\\Bigl(1 - \\frac{27 t a (a+1)}
              {2 (a+|x|)^3}\\Bigr).

    With :math:`s = a + |x|`, :math:`q = 27 t a (a+1) / (4 s^3)` and
    :math:`\\varphi = 2 \\arcsin \\sqrt q` (equal to the arccos form, and
    accurate for tiny :math:`q`), the magnitude is evaluated without
    cancellation as

    .. math:: |u| = |x| - \\tfrac43 s \\sin^2 \\tfrac{\\varphi}{6}
              = |x| - \\frac{t a (a+1)}{s^2} P(p), \\qquad
              P(p) = \\sum_k \\tfrac{1}{k+1} \\tbinom{3k+1}{k} p^k
              = 1 + 2p + 7p^2 + 30p^3 + \\dots

    with :math:`p = t a (a+1) / s^3 = 4q/27` (the second form is the stationarity condition
    :math:`u = x - t \\rho_a'(u)`). When :math:`p \\le t (a+1) / a^2` is small enough
    that a few terms of :math:`P` are exact to the dtype's precision (the
    small steps of a proximal-gradient fit), the polynomial is used: no
    transcendental functions. At :math:`|x| = \\tau` in the second case both
    0 and the nonzero root are minimisers; 0 is returned. Cost
    :math:`O(\\text{numel})`.
    """
    _check_input(x)
    t_, t_float = _scalar(t, "t", x)
    a_, a_float = _scalar(a, "a", x, strictly_positive=True)
    _check_out(out, x)
    if t_float == 0:
        return x.clone() if out is None else out.copy_(x)
    if t_float <= a_float * a_float / (2 * (a_float + 1)):
        thr = t_ * (a_ + 1) / a_
    else:
        thr = torch.sqrt(2 * t_ * (a_ + 1)) - a_ / 2
    c = t_float * a_float * (a_float + 1)
    # terms of P needed for the dtype's precision at the largest p (s = a); none: the closed form
    p_max, eps = c / a_float**3, torch.finfo(x.dtype).eps
    n_terms = next((k for k in range(1, len(_TL1_SERIES)) if _TL1_SERIES[k] * p_max**k <= eps / 8), None)
    res = torch.empty_like(x) if out is None else out
    if x.numel() > _CHUNK and x.is_contiguous() and res.is_contiguous():  # by chunks that stay in cache
        for part, part_out in zip(x.view(-1).split(_CHUNK), res.view(-1).split(_CHUNK)):
            _tl1_magnitudes(part, thr, a_float, c, n_terms, part_out, workspace, _CHUNK)
        return res
    return _tl1_magnitudes(x, thr, a_float, c, n_terms, res, None, x.numel())


#: Elementwise proxes of many steps run on chunks of this many entries when the input is larger:
#: a chunk's temporaries stay in the CPU's cache, where whole ones (20 MB at 28x28 'full') spill
#: at each of the steps (tl1 at 28x28 'full': 12.9 ms instead of 18.6; 1 << 16 and 1 << 20 slower).
_CHUNK = 1 << 18


def _tl1_magnitudes(x, thr, a_float, c, n_terms, out, workspace, size):
    """:func:`tl1_prox` after its checks, into ``out``, on scratch buffers of ``size`` entries kept in
    ``workspace`` (the chunk size: every chunk uses the same ones)."""
    # in place on four buffers (temporaries cost more than the arithmetic), with no boolean
    # masks (slow on CPU): keep is 1 where |x| > thr, else 0, the comparison written as numbers
    def buffer(name):  # (a fresh one without a workspace: slicing and viewing cost more than it)
        if workspace is None:
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        return _scratch(workspace, name, (size,), x)[: x.numel()].view(x.shape)

    mag = torch.abs(x, out=buffer("mag"))
    keep = torch.gt(mag, thr, out=buffer("keep"))
    r = torch.add(mag, a_float, out=buffer("r")).reciprocal_()  # 1 / s
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    corr = buffer("corr")
    if n_terms is None:
        torch.mul(r, r, out=corr).mul_(r).mul_(27 * c / 4).clamp_(max=1)  # q
        corr.sqrt_().asin_().div_(3).sin_().square_().div_(r).mul_(4 / 3)  # (4/3) s sin^2(phi / 6)
    else:
        torch.addcmul(zero, r, r, value=c, out=corr)  # c / s^2, in one pass
        if n_terms > 1:  # corr *= P(p) as corr += corr (P(p) - 1), one multiply-add
            p = r.mul_(corr)  # c / s^3
            if n_terms == 2:
                corr.addcmul_(corr, p, value=_TL1_SERIES[1])
            else:  # P(p) - 1 by Horner
                tail = torch.mul(p, _TL1_SERIES[n_terms - 1], out=buffer("poly"))
                for k in range(n_terms - 2, 0, -1):
                    tail.add_(_TL1_SERIES[k]).mul_(p)
                corr.addcmul_(corr, tail)
    mag.sub_(corr)
    # 0 + |u| * (+-1 or +-0): the sign of x, and exact +0 below the threshold
    return torch.addcmul(zero, mag, keep.copysign_(x), out=out)
