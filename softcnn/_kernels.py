"""Fused CPU kernels (numba) for the steps whose eager torch form is memory or call bound.

An eager torch prox runs one pass over its operands per operation: a dozen passes for one TV
dual iteration. On CPU each pass costs more than its arithmetic, so the CPU paths of
:func:`softcnn.prox.tv_prox` and :func:`softcnn.prox.pairwise_l1_prox`, and of a layer whose
support covers the image (``softcnn.layers._CoveringDense``), are one compiled loop per stage
here, on NumPy views of the tensors' memory (no copy). Other devices keep the torch code,
which these kernels must agree with (tested).

Compiled on first use and cached on disk (``cache=True``), by dtype, not by shape.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

_JIT = dict(nogil=True, cache=True)
# reductions may be reordered (so that they vectorise); no assumption about NaN or inf
_JIT_SUMS = dict(_JIT, fastmath={"reassoc", "contract", "nsz", "arcp"})
# a division by 0 gives inf or nan (as in NumPy) instead of raising: the check per division stops
# a loop from vectorising (7x slower)
_JIT_DIVIDES = dict(_JIT, error_model="numpy")


# False sends every input to the torch code (the tests compare the two)
ENABLED = True


def runs_on(x: torch.Tensor) -> bool:
    """Whether the compiled kernels take ``x``: a plain float32/float64 CPU tensor (not one of
    ``torch.func``'s wrappers, nor a batch of a batched backward, ``is_grads_batched``: NumPy
    cannot see their memory)."""
    functorch = torch._C._functorch
    return (
        ENABLED
        and x.is_cpu
        and x.dtype in (torch.float32, torch.float64)
        and not functorch.is_functorch_wrapped_tensor(x)
        and not functorch.is_legacy_batchedtensor(x)
    )


def array(x: torch.Tensor) -> np.ndarray:
    """The NumPy view of ``x``'s memory (no copy)."""
    return x.detach().numpy()


def bits(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """``x``'s memory as floats, as unsigned integers of its width, and the mask that clears
    their sign bit (a vectorisable ``max |x|``, see :func:`_group_edge`)."""
    f = array(x)
    u = f.view(np.uint32 if f.dtype == np.float32 else np.uint64)
    return f, u, u.dtype.type(np.iinfo(u.dtype).max >> 1)


def repeating_rows(bound: torch.Tensor, rest: tuple[int, ...], n_rows: int) -> torch.Tensor:
    """``bound`` (a 0-d tensor, or ``(n_rows, *r)`` with ``r`` broadcastable to ``rest``) as the
    ``(n_rows or 1, Rm)`` array the kernels read, ``Rm`` dividing ``prod(rest)``: column ``j`` of
    a row reads entry ``j % Rm``. Expanded only when ``r`` varies along a leading dimension."""
    if bound.ndim == 0:
        return bound.reshape(1, 1)
    r = tuple(bound.shape[1:])
    r = (1,) * (len(rest) - len(r)) + r
    lead = 0
    while lead < len(rest) and r[lead] == 1:
        lead += 1
    if r[lead:] != tuple(rest[lead:]):
        return bound.reshape(n_rows, *r).expand(n_rows, *rest).reshape(n_rows, -1)
    return bound.reshape(n_rows, -1).contiguous()


@numba.njit(**_JIT)
def _edge_ends(e, lh, lw):
    """The two positions ``(p, q)`` of edge ``e``: horizontal edges first, then vertical, each
    row-major; ``(D x)_e = x_q - x_p``."""
    n_h = lh * (lw - 1)
    if e < n_h:
        p = (e // (lw - 1)) * lw + e % (lw - 1)
        return p, p + 1
    p = e - n_h
    return p, p + lw


@numba.njit(**_JIT)
def residual(X, z, lh, lw, u):
    """``u = X - D^T z`` over all columns, one position row at a time (``u`` may be ``X``)."""
    n_h = lh * (lw - 1)
    R = X.shape[1]
    for i in range(lh):
        for c in range(lw):
            p = i * lw + c
            for j in range(R):
                v = X[p, j]
                if c < lw - 1:
                    v += z[i * (lw - 1) + c, j]
                if c > 0:
                    v -= z[i * (lw - 1) + c - 1, j]
                if i < lh - 1:
                    v += z[n_h + p, j]
                if i > 0:
                    v -= z[n_h + p - lw, j]
                u[p, j] = v


@numba.njit(**_JIT)
def _screen_l1(X, box, lh, lw, margin, z, unsure_cols):
    """Every edge's dual set to ``box sign((D x)_e)`` (exact where ``|(D x)_e| > margin box``);
    ``unsure_cols[j]`` set where a column has an edge that is not. ``box`` is ``(E or 1, Rm)``
    with ``Rm`` dividing the column count (its values repeat along the columns)."""
    R = X.shape[1]
    n_e = lh * (lw - 1) + (lh - 1) * lw
    Rm = box.shape[1]
    for e in range(n_e):
        p, q = _edge_ends(e, lh, lw)
        be = e if box.shape[0] > 1 else 0
        for a in range(R // Rm):
            for k in range(Rm):
                j = a * Rm + k
                b = box[be, k]
                d = X[q, j] - X[p, j]
                z[e, j] = math.copysign(b, d)
                if abs(d) <= margin * b and b > 0:
                    unsure_cols[j] = True


@numba.njit(**_JIT)
def _gather_columns(A, cols, n_rows, out):
    """``out[i, p] = A[p, cols[i] % Rm]`` for ``p < n_rows`` (row 0 of ``A`` if it has one row):
    the columns as contiguous rows, read row by row."""
    at = cols % A.shape[1]
    for p in range(n_rows):
        pa = p if A.shape[0] > 1 else 0
        for i in range(cols.shape[0]):
            out[i, p] = A[pa, at[i]]


@numba.njit(**_JIT)
def _sort_edge_l1(x, bound, margin, e, p, q, r, deg, edges, ends, n_u):
    """One edge of a column in :func:`_solve_column_l1`: a sure edge is folded into the residual
    ``r``, an unsure one appended to ``edges``/``ends``; returns the unsure count."""
    b = bound[e]
    d = x[q] - x[p]
    if b > 0 and abs(d) <= margin * b:
        edges[n_u] = e
        ends[n_u, 0] = p
        ends[n_u, 1] = q
        deg[p] += 1
        deg[q] += 1
        return n_u + 1
    v = math.copysign(b, d)
    r[p] += v
    r[q] -= v
    return n_u


@numba.njit(**_JIT)
def _unsure_residual(r, zu, ends, n_u, out):
    """``out = r - D_U^T zu`` at the ends of the unsure edges (the only entries read)."""
    for i in range(n_u):
        out[ends[i, 0]] = r[ends[i, 0]]
        out[ends[i, 1]] = r[ends[i, 1]]
    for i in range(n_u):
        out[ends[i, 0]] += zu[i]
        out[ends[i, 1]] -= zu[i]


@numba.njit(**_JIT)
def _solve_column_l1(x, bound, lh, lw, margin, warm, j, has_warm, stop, n_iter, r, rr, deg, edges,
                     ends, zu, yu, new):
    """Anisotropic TV of one column ``x`` (``bound`` its box per edge) given its sure edges:
    FISTA on the unsure edges alone, with the sure ones (dual ``bound sign((D x)_e)``) folded into
    the residual; the closed form when no two unsure edges share a position. The unsure edges
    and their duals come back in ``edges[:n]`` and ``zu[:n]``; returns ``n`` and the iterations
    run."""
    n_h = lh * (lw - 1)
    for p in range(lh * lw):
        r[p] = x[p]
        deg[p] = 0
    n_u = 0
    for i in range(lh):
        for c in range(lw - 1):
            p = i * lw + c
            n_u = _sort_edge_l1(x, bound, margin, i * (lw - 1) + c, p, p + 1, r, deg, edges, ends, n_u)
    for p in range(n_h, n_h + (lh - 1) * lw):
        n_u = _sort_edge_l1(x, bound, margin, p, p - n_h, p - n_h + lw, r, deg, edges, ends, n_u)
    lip = 0
    for i in range(n_u):
        zu[i] = 0.0
        if has_warm:
            zu[i] = min(max(warm[edges[i], j], -bound[edges[i]]), bound[edges[i]])
        lip = max(lip, deg[ends[i, 0]] + deg[ends[i, 1]])
    if lip <= 2:  # two-point problems: exact in one step
        for i in range(n_u):
            b = bound[edges[i]]
            zu[i] = min(max((r[ends[i, 1]] - r[ends[i, 0]]) / 2, -b), b)
        return n_u, 1
    step = 1.0 / lip  # ||D_U||^2 <= max over edges of deg(p) + deg(q)
    for i in range(n_u):
        yu[i] = zu[i]
    tau = 1.0
    n_run = 0
    for it in range(n_iter):
        n_run = it + 1
        _unsure_residual(r, yu, ends, n_u, rr)
        mom = 0.0
        for i in range(n_u):
            b = bound[edges[i]]
            v = min(max(yu[i] + step * (rr[ends[i, 1]] - rr[ends[i, 0]]), -b), b)
            new[i] = v
            mom += (yu[i] - v) * (v - zu[i])
        # duality gap at the new iterate, sum of b |(D u)_e| - z_e (D u)_e over the unsure edges
        # (0 on the sure ones, whose sign cannot change): ||u - u*||^2 <= 2 gap
        _unsure_residual(r, new, ends, n_u, rr)
        gap = 0.0
        for i in range(n_u):
            g = rr[ends[i, 1]] - rr[ends[i, 0]]
            gap += bound[edges[i]] * abs(g) - new[i] * g
        if gap <= 0.5 * stop * stop:
            for i in range(n_u):
                zu[i] = new[i]
            break
        if mom > 0:  # the step goes against the gradient mapping: restart the momentum
            tau = 1.0
            for i in range(n_u):
                zu[i] = new[i]
                yu[i] = new[i]
        else:
            tau_next = (1 + math.sqrt(1 + 4 * tau * tau)) / 2
            beta = (tau - 1) / tau_next
            tau = tau_next
            for i in range(n_u):
                yu[i] = new[i] + beta * (new[i] - zu[i])
                zu[i] = new[i]
    return n_u, n_run


@numba.njit(**_JIT)
def tv_l1(X, box, lh, lw, margin, warm, has_warm, stop, n_iter, z):
    """The dual of the anisotropic TV prox of every column of ``X`` (``(L, R)``, positions first)
    into ``z`` (``(E, R)``, not ``warm``). Screening fixes the edges with ``|(D x)_e| > margin
    box``; each column with others is solved on those alone. Returns the largest number of
    iterations a column ran."""
    L, R = X.shape
    n_e = z.shape[0]
    unsure_cols = np.zeros(R, dtype=np.bool_)
    _screen_l1(X, box, lh, lw, margin, z, unsure_cols)
    cols = np.nonzero(unsure_cols)[0]
    xs = np.empty((cols.shape[0], L), X.dtype)
    bounds = np.empty((cols.shape[0], n_e), X.dtype)
    _gather_columns(X, cols, L, xs)
    _gather_columns(box, cols, n_e, bounds)
    # the small problems in float64, so that their duality gap can meet the tolerance in float32
    r = np.empty(L, np.float64)
    rr = np.empty(L, np.float64)
    deg = np.empty(L, np.int64)
    edges = np.empty(n_e, np.int64)
    ends = np.empty((n_e, 2), np.int64)
    zu = np.empty(n_e, np.float64)
    yu = np.empty(n_e, np.float64)
    new = np.empty(n_e, np.float64)
    most = 0
    for i in range(cols.shape[0]):
        j = cols[i]
        n_u, n_run = _solve_column_l1(xs[i], bounds[i], lh, lw, margin, warm, j, has_warm, stop,
                                      n_iter, r, rr, deg, edges, ends, zu, yu, new)
        most = max(most, n_run)
        for k in range(n_u):
            z[edges[k], j] = zu[k]
    return most


@numba.njit(**_JIT_SUMS)
def _group_edge(ye, ze, ne, rp, rq, step_e, t, diff, bits, magnitude):
    """One edge of a group TV dual iteration: ``ne`` = the projection onto the ball of radius
    ``t`` of ``ye + step_e (rq - rp)`` (``step_e`` repeats along the entries). Returns the
    largest change from ``ze`` and ``(ye - ne) . (ne - ze)``."""
    R = ye.shape[0]
    Rm = step_e.shape[0]
    diff[0] = 0
    s = diff[0]  # (the data's dtype for the sums too)
    for a in range(0, R, Rm):  # (slices of step_e's length: an index j % Rm does not vectorise)
        ys, ns, ps, qs = ye[a:a + Rm], ne[a:a + Rm], rp[a:a + Rm], rq[a:a + Rm]
        for k in range(Rm):
            v = ys[k] + step_e[k] * (qs[k] - ps[k])
            ns[k] = v
            s += v * v
    diff[0] = t / max(math.sqrt(s), t)
    shrink = diff[0]
    diff[0] = 0
    mom = diff[0]
    for j in range(R):
        v = ne[j] * shrink
        ne[j] = v
        d = v - ze[j]
        diff[j] = d
        mom += (ye[j] - v) * d
    # max |d| on the bits (|d| orders as its bits with the sign cleared): a float max does not
    # vectorise; a NaN comes out as the largest
    top = bits[0] & magnitude
    for j in range(R):
        b = bits[j] & magnitude
        top = b if b > top else top
    bits[0] = top
    return abs(diff[0]), mom


@numba.njit(**_JIT_SUMS)
def tv_group(X, steps, lh, lw, t, stop, n_iter, z, new, y, r, diff, bits, magnitude):
    """Group TV dual by FISTA with adaptive restart, as :func:`softcnn.prox.tv_prox` runs it
    (step 1/8, ``steps`` the step per edge: 0 on masked ones; the largest change tested after
    each of the first 10 iterations, then every 10), each iteration one residual pass and one
    pass over the edges. ``z`` holds the start; the final dual is left in ``z`` or ``new``:
    returns ``(iterations, 1 if in new)``. ``bits`` is ``diff``'s memory as unsigned integers,
    ``magnitude`` their mask without the sign bit."""
    n_e = lh * (lw - 1) + (lh - 1) * lw
    tau = 1.0
    momentum = False  # y is a separate point (else it is z itself)
    swapped = 0
    n_run = 0
    for it in range(n_iter):
        n_run = it + 1
        yy = y if momentum else z
        residual(X, yy, lh, lw, r)
        change = 0.0
        mom = 0.0
        for e in range(n_e):
            p, q = _edge_ends(e, lh, lw)
            ch, mo = _group_edge(yy[e], z[e], new[e], r[p], r[q], steps[e if steps.shape[0] > 1 else 0],
                                 t, diff, bits, magnitude)
            change = max(change, ch)
            mom += mo
        z, new = new, z
        swapped = 1 - swapped
        if change <= stop and (it < 10 or it % 10 == 9):
            break
        tau_next = (1 + math.sqrt(1 + 4 * tau * tau)) / 2
        if momentum and mom > 0:  # the step goes against the gradient mapping: restart
            beta, tau = 0.0, 1.0
        else:
            beta, tau = (tau - 1) / tau_next, tau_next
        momentum = beta != 0.0
        if momentum:  # y = z + beta (z - z_previous), z the new iterate
            for e in range(y.shape[0]):
                ye, ze, pe = y[e], z[e], new[e]
                for j in range(ye.shape[0]):
                    ye[j] = ze[j] + beta * (ze[j] - pe[j])
    return n_run, swapped


# --------------------------------------------------------------- a layer covering the image
# ``softcnn.layers._CoveringDense`` on CPU: its weight block built, and its weight gradient
# reduced and scaled, in one pass each. The block's rows are the pixels in the image's own
# order, so the GEMMs read the input as it is and return its gradient as it is (the storage,
# ``deviation``, has them flipped). ``geometry`` is the layer's ``(C, H, W, Lh, Lw, sh, sw)``.


@numba.njit(**_JIT)
def _window(H, W, Lh, Lw, sh, sw):
    """``(Sh, Sw)``: the kernel's extent, which reaches the whole image from every position."""
    return H + (Lh - 1) * sh, W + (Lw - 1) * sw


@numba.njit(**_JIT)
def _flip(c, a, b, Sh, Sw):
    """The kernel entry of flipped offset ``(c, a, b)``, flat in ``(C, Sh, Sw)``."""
    return (c * Sh + Sh - 1 - a) * Sw + Sw - 1 - b


@numba.njit(**_JIT)
def _stored_row(r, H, W):
    """The stored row of pixel ``r`` (image order, flat in ``(C, H, W)``): its coordinates
    ``(c, h, w)``, the pixel flipped within its channel, and its flat index."""
    hw = H * W
    c, h, w = r // hw, H - 1 - (r % hw) // W, W - 1 - r % W
    return c, h, w, (c * H + h) * W + w


@numba.njit(**_JIT)
def _run_start(c, i, h, w, Sh, Sw, sh):
    """Where, in the flipped kernels, the run of ``Lw`` offsets starts that positions row ``i``
    read at stored row ``(c, h, w)`` (consecutive positions: the next offset at stride ``sw``)."""
    return (c * Sh + i * sh + h) * Sw + w


@numba.njit(**_JIT)
def _flipped_kernels(m, ms, C, Sh, Sw):
    """``m * ms`` without the bias column, each ``Sh x Sw`` kernel flipped: ``(F, C Sh Sw)``."""
    out = np.empty((m.shape[0], C * Sh * Sw), m.dtype)
    for f in range(m.shape[0]):
        for c in range(C):
            for a in range(Sh):
                for b in range(Sw):
                    k = _flip(c, a, b, Sh, Sw)
                    out[f, (c * Sh + a) * Sw + b] = m[f, k] * ms[k]
    return out


@numba.njit(**_JIT_SUMS)
def covering_block(m, ms, dev, sc, C, H, W, Lh, Lw, sh, sw, block):
    """The weight ``block (C H W + 1, F, L)``: ``block[r, f, p]`` for pixel ``r`` (image order),
    output channel ``f`` and position ``p``, the bias row last.

    ``m (F, K)`` and ``ms (K,)``: the shared kernels and their scales; ``dev (C H W + 1, F, L)``
    and ``sc (C H W + 1, L)``: the stored deviations and their scales. The entry is
    ``m ms`` at the offset that reaches the pixel from the position, plus ``dev sc`` at the
    pixel's stored row (its flipped one). Reads and writes run along the positions, one row of
    positions at a time (contiguous segments at stride 1: they vectorise).
    """
    Sh, Sw = _window(H, W, Lh, Lw, sh, sw)
    nf, hw = block.shape[1], H * W
    mf = _flipped_kernels(m, ms, C, Sh, Sw)
    for r in range(C * hw):
        c, h, w, rs = _stored_row(r, H, W)
        for f in range(nf):
            out, d, s, k = block[r, f], dev[rs, f], sc[rs], mf[f]
            for i in range(Lh):
                p, base = i * Lw, _run_start(c, i, h, w, Sh, Sw, sh)
                oo, do, so = out[p : p + Lw], d[p : p + Lw], s[p : p + Lw]
                if sw == 1:  # a contiguous slice (a strided one's loop does not vectorise)
                    ko = k[base : base + Lw]
                    for j in range(Lw):
                        oo[j] = ko[j] + do[j] * so[j]
                else:
                    for j in range(Lw):
                        oo[j] = k[base + j * sw] + do[j] * so[j]
    K, chw = m.shape[1], C * hw
    for f in range(nf):
        b = m[f, K - 1] * ms[K - 1]
        for p in range(Lh * Lw):
            block[chw, f, p] = b + dev[chw, f, p] * sc[chw, p]


@numba.njit(**_JIT_SUMS)
def covering_adjoint(g, go, ms, sc, C, H, W, Lh, Lw, sh, sw, gm):
    """The weight gradient ``g (C H W + 1, F, L)`` (pixels in image order; its bias row, last, is
    written here from the output's gradient ``go (n, F L)``) to the parameters': in place, ``g``
    becomes the stored deviations' (rows flipped as stored, times ``sc``), and ``gm (F, K)`` is
    the shared kernels' (``g`` summed onto the offsets, times ``ms``: the adjoint of
    :func:`covering_block`). A pixel's row and its stored one are read and written together
    (the flip swaps them)."""
    Sh, Sw = _window(H, W, Lh, Lw, sh, sw)
    nf, chw, K = g.shape[1], C * H * W, gm.shape[1]
    acc = np.zeros((nf, C * Sh * Sw), g.dtype)  # onto the flipped offsets, as in covering_block
    for r in range(chw):
        c, h, w, rs = _stored_row(r, H, W)  # g[r] is the gradient of stored row rs, and g[rs] of row r
        if rs < r:
            continue
        for second in range(2):  # each row onto its stored row's offsets (coordinates hx, wx)
            if second and rs == r:  # the centre pixel is its own stored row: once
                break
            x, hx, wx = (rs, H - 1 - h, W - 1 - w) if second else (r, h, w)
            for f in range(nf):
                gx, acc_f = g[x, f], acc[f]
                for i in range(Lh):
                    base = _run_start(c, i, hx, wx, Sh, Sw, sh)
                    gi = gx[i * Lw : (i + 1) * Lw]
                    if sw == 1:  # a contiguous slice (a strided one's loop does not vectorise)
                        ka = acc_f[base : base + Lw]
                        for j in range(Lw):
                            ka[j] += gi[j]
                    else:
                        for j in range(Lw):
                            acc_f[base + j * sw] += gi[j]
        a, b, sa, sb = g[r], g[rs], sc[rs], sc[r]  # swapped and scaled, whole rows
        for f in range(nf):
            for p in range(Lh * Lw):
                u = a[f, p]
                a[f, p] = b[f, p] * sb[p]
                b[f, p] = u * sa[p]
    bias = g[chw].reshape(nf * Lh * Lw)
    bias[:] = 0
    for b in range(go.shape[0]):
        row = go[b]
        for q in range(bias.shape[0]):
            bias[q] += row[q]
    for f in range(nf):
        s = 0.0
        for p in range(Lh * Lw):
            v = g[chw, f, p]
            s += v
            g[chw, f, p] = v * sc[chw, p]
        gm[f, K - 1] = s * ms[K - 1]
        for c in range(C):
            for a in range(Sh):
                for b in range(Sw):
                    k = _flip(c, a, b, Sh, Sw)
                    gm[f, k] = acc[f, (c * Sh + a) * Sw + b] * ms[k]


# ------------------------------------------------------ penalties on a compact ('full') storage
# The compact storage of a layer covering the image, ``(C H W + 1, F, L)`` (see above): the weight
# at entry ``(r, f, p)`` is ``w = m[f, k] + scale[k] raw[r, f, p]`` for the kernel entry ``k`` that
# reaches stored row ``r`` from position ``p`` (the bias row: the last entry). A weighted l1 prox
# on ``w`` read it, thresholded it and wrote ``raw`` back in five strided passes over 20 MB at
# 28x28; this kernel does it in one, reading the kernels through their flipped windows as
# :func:`covering_block` does (contiguous runs along the positions).


@numba.njit(**_JIT_DIVIDES)
def stored_soft_threshold(raw, m, neg_m, scale, thr, C, H, W, Lh, Lw, sh, sw):
    """In place: ``raw = neg_m[f, k] + soft(w, thr[k]) / scale[k]``, ``soft(w, c) = w - clip(w, -c,
    c)`` (exactly +0 where ``|w| <= c``): ``set_stored_kernels(soft_threshold(stored_kernels(),
    thr))`` with ``neg_m = -m_new / scale`` for the new shared kernels ``m_new``, the same
    operations in the same order."""
    (Sh, Sw), hw = _window(H, W, Lh, Lw, sh, sw), H * W
    nf, K = raw.shape[1], m.shape[1]
    one = np.ones(K, m.dtype)
    mf, nmf = _flipped_kernels(m, one, C, Sh, Sw), _flipped_kernels(neg_m, one, C, Sh, Sw)
    sf = _flipped_kernels(scale.reshape(1, K), one, C, Sh, Sw)[0]
    tf = _flipped_kernels(thr.reshape(1, K), one, C, Sh, Sw)[0]
    for r in range(C * hw):
        c, h, w = r // hw, (r % hw) // W, r % W  # the stored row's coordinates
        for f in range(nf):
            row, k, nk = raw[r, f], mf[f], nmf[f]
            for i in range(Lh):
                p, b = i * Lw, _run_start(c, i, h, w, Sh, Sw, sh)
                ro = row[p : p + Lw]
                if sw == 1:  # contiguous slices (they vectorise)
                    ko, no, so, to = k[b : b + Lw], nk[b : b + Lw], sf[b : b + Lw], tf[b : b + Lw]
                    for j in range(Lw):
                        v = ko[j] + so[j] * ro[j]
                        ro[j] = no[j] + (v - min(max(v, -to[j]), to[j])) / so[j]
                else:
                    for j in range(Lw):
                        q = b + j * sw
                        v = k[q] + sf[q] * ro[j]
                        ro[j] = nk[q] + (v - min(max(v, -tf[q]), tf[q])) / sf[q]
    for f in range(nf):  # the bias row
        row, mb, nb, sb, tb = raw[C * hw, f], m[f, K - 1], neg_m[f, K - 1], scale[K - 1], thr[K - 1]
        for p in range(Lh * Lw):
            v = mb + sb * row[p]
            row[p] = nb + (v - min(max(v, -tb), tb)) / sb


# ------------------------------------------------------------------- pairwise l1 (all pairs)
# ``softcnn.prox.pairwise_l1_prox`` on CPU: each row sorted by one NumPy sort of 32-bit keys (the
# value's order-preserving bits above, its index below: half the work of 64-bit keys), then one
# compiled pass per row puts the ties of the shortened values in order, runs the isotonic
# regression and writes the row back.


def pairwise_index_bits(n: int) -> int:
    """Bits of a 32-bit key that hold the index in a row of ``n``: ``ceil(log2 n)``, at least 1."""
    return max(1, (n - 1).bit_length())


@numba.njit(**_JIT)
def pairwise_keys(bits32, exists, bits, keys):
    """``keys[b, i]``: the order-preserving int32 form of the float32 bits ``bits32[b, i]`` with
    its lowest ``bits`` replaced by ``i``; absent entries (``exists[b % exists.shape[0], i]``
    zero) above every value. Dropping low bits keeps the order of the values, ties aside."""
    B, n = bits32.shape
    low = np.int32((1 << bits) - 1)
    top = np.int32(0x7FFFFFFF) & ~low
    for b in range(B):
        e, u, out = exists[b % exists.shape[0]], bits32[b], keys[b]
        for i in range(n):
            k = u[i] ^ ((u[i] >> 31) & np.int32(0x7FFFFFFF))  # negative floats: magnitude bits flipped
            out[i] = ((k & ~low) if e[i] else top) | np.int32(i)


@numba.njit(**_JIT)
def _ramp_mean(total, start, k, m, t):
    """Mean of ``v_i = x_(i) - t (2 i + 1 - m)`` (0-based ``i``) over block ``k``: the ramp's mean
    over ``[s, e)`` is the integer ``s + e - m`` (0 for a block of every entry: its mean is x's)."""
    s, e = start[k], start[k + 1]
    return total[k] / (e - s) - t * (s + e - m)


@numba.njit(**_JIT)
def pairwise_solve(x, keys, exists, bits, t, out):
    """The prox of ``t sum_{p<q} |u_p - u_q|`` over the existing entries of each row of ``x``, from
    its sorted keys (:func:`pairwise_keys`, each row sorted): into ``out`` (which may be ``x``;
    absent entries and rows of one entry are copied).

    Per row of ``m`` existing entries: the values gathered in key order by an insertion sort,
    which only moves values within runs whose keys agree above the index bits (usually of one
    entry; a merge sort instead once it has shifted more than twice the entries); then
    pool-adjacent-violators on ``v_i = x_(i) - t (2 i + 1 - m)`` (0-based ``i``) in float64 (a
    stack of blocks: their starts, sums of ``x`` and means of ``v``, a block's mean computed from
    its sum when it forms), and each block's mean written to its entries; ``v`` itself where
    nothing pooled (one pass, no blocks).
    """
    B, n = x.shape
    low = np.int32((1 << bits) - 1)
    idx = np.empty(n, np.int64)
    val = np.empty(n, np.float64)
    start = np.empty(n + 1, np.int64)
    total = np.empty(n + 1, np.float64)
    mean = np.empty(n + 1, np.float64)
    for b in range(B):
        e, row, kr, o = exists[b % exists.shape[0]], x[b], keys[b], out[b]
        m = 0
        for i in range(n):
            m += e[i] != 0
            o[i] = row[i]  # absent entries, and a row of one entry, as they are
        if m <= 1:
            continue
        # gathered in key order, each value inserted in place: out of order only within runs of
        # equal keys, which are short (one shift per entry on average, or a row of near-equal
        # values: then a merge sort)
        shifts = 0
        for a in range(m):
            j = kr[a] & low
            v = row[j]
            c = a - 1
            while c >= 0 and val[c] > v:
                val[c + 1] = val[c]
                idx[c + 1] = idx[c]
                c -= 1
            val[c + 1] = v
            idx[c + 1] = j
            shifts += a - 1 - c
            if shifts > 2 * m:
                for r in range(a + 1, m):
                    idx[r] = kr[r] & low
                    val[r] = row[idx[r]]
                order = np.argsort(val[:m], kind="mergesort")
                vs, js = val[:m][order], idx[:m][order]
                val[:m] = vs
                idx[:m] = js
                break
        top = 0  # blocks [start[k], start[k + 1]): sums of x total[k], means of v mean[k]
        pooled = False
        for i in range(m):
            vi = val[i] - t * (2 * i + 1 - m)  # (no division for a block of one)
            start[top] = i
            total[top] = val[i]
            mean[top] = vi
            top += 1
            if top > 1 and mean[top - 2] > vi:  # pool the violators
                pooled = True
                start[top] = i + 1
                while top > 1 and mean[top - 2] > mean[top - 1]:
                    total[top - 2] += total[top - 1]
                    start[top - 1] = start[top]
                    top -= 1
                    mean[top - 1] = _ramp_mean(total, start, top - 1, m, t)
        if not pooled:  # every block is one entry
            for i in range(m):
                o[idx[i]] = mean[i]
            continue
        start[top] = m
        for k in range(top):
            for i in range(start[k], start[k + 1]):
                o[idx[i]] = mean[k]
