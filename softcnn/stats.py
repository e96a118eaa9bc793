"""Statistics of fitted soft-conv kernels: how local, how tied.

* :func:`locality_statistic` — the LOCO-REG study's table of learned 3x3
  kernels: is the centre weight larger (in absolute value) than its edge
  neighbours, and are those larger than the corners? Mean differences,
  standardised effect sizes and one-sided t-tests, per soft-conv layer.
* :func:`tying_statistic` — a map of how far each position's kernel is from
  the shared (mean) kernel.

Both accept a fitted :class:`~softcnn.SoftConvClassifier` /
:class:`~softcnn.SoftConvRegressor` (anything with ``kernels_`` and
``shared_kernels_``); :func:`locality_statistic` also takes raw arrays.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as _sps
from sklearn.utils import Bunch

__all__ = ["LocalityStatistic", "locality_statistic", "tying_statistic"]

_COMPARISONS = (("centre_edge", "centre - edge"), ("edge_corner", "edge - corner"))


# --------------------------------------------------------------------- helpers
def _soft_layer(estimator: Any, index: int):
    """The ``index``-th fitted :class:`~softcnn.layers.SoftConv2d`, or None."""
    net = getattr(estimator, "network_", None)
    layers = getattr(net, "soft_layers", None)
    if layers is None:
        return None
    try:
        return layers[index]
    except (IndexError, TypeError):
        return None


def _existence(layer, shape: tuple[int, ...]) -> np.ndarray | None:
    """Offset existence ``(Lh, Lw, Sh, Sw)`` from a layer's ``(L, K)`` mask, or None."""
    mask = getattr(layer, "mask", None)
    if mask is None:
        return None
    mask = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask, dtype=bool)
    Lh, Lw, _, C, Sh, Sw = shape
    try:
        ex = mask[:, :-1].reshape(Lh, Lw, C, Sh, Sw)
    except ValueError:
        return None
    # The existence of an offset does not depend on the input channel.
    return ex.all(axis=2)


def _window_origin(layer) -> tuple[int, int] | None:
    """Top-left corner of the nominal window in support coordinates, or None."""
    gh, gw = getattr(layer, "gh", None), getattr(layer, "gw", None)
    if gh is None or gw is None:
        return None
    return (-int(gh.lo), -int(gw.lo))


def _crop(a: np.ndarray, row: int, col: int, size: int, fill: Any) -> np.ndarray:
    """``a[..., row:row+size, col:col+size]``, filled with ``fill`` out of range."""
    Sh, Sw = a.shape[-2:]
    out = np.full(a.shape[:-2] + (size, size), fill, dtype=a.dtype)
    r0, r1 = max(row, 0), min(row + size, Sh)
    c0, c1 = max(col, 0), min(col + size, Sw)
    if r0 < r1 and c0 < c1:
        out[..., r0 - row : r1 - row, c0 - col : c1 - col] = a[..., r0:r1, c0:c1]
    return out


def _one_sided(d: np.ndarray) -> Bunch:
    """Mean, SD, effect size, t and one-sided p-value (H1: mean > 0) of ``d``."""
    n = d.size
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    effect = mean / sd if n > 1 and sd > 0 else float("nan")
    if n > 1 and sd > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = _sps.ttest_1samp(d, 0.0, alternative="greater")
        t, p = float(res.statistic), float(res.pvalue)
    else:  # constant differences: no variance, no test
        t = p = float("nan")
    return Bunch(mean=mean, sd=sd, effect_size=effect, t=t, p_value=p, n=n)


class LocalityStatistic(list):
    """Per-layer results of :func:`locality_statistic` (a list of :class:`~sklearn.utils.Bunch`).

    Each item has the keys ``layer``, ``n_kernels``, ``n_excluded``,
    ``centre``, ``edge``, ``corner`` (mean absolute weights over the kernels),
    and ``centre_edge``, ``edge_corner``: Bunches with ``mean``, ``sd``,
    ``effect_size``, ``t``, ``p_value`` and ``n`` of the paired differences.

    Examples
    --------
    >>> import numpy as np
    >>> from softcnn.stats import locality_statistic
    >>> rng = np.random.default_rng(0)
    >>> w = rng.normal(size=(100, 3, 3))
    >>> res = locality_statistic([w])
    >>> res[0].n_kernels
    100
    >>> print(res.to_table().splitlines()[0].split()[:2])
    ['layer', 'comparison']
    """

    def to_table(self, digits: int = 3) -> str:
        """Format the results as a plain-text table, one row per layer and comparison.

        Parameters
        ----------
        digits : int, default=3
            Significant digits of the floating-point columns.

        Returns
        -------
        table : str
        """
        header = ("layer", "comparison", "n", "mean diff", "effect size", "t", "p (one-sided)")
        rows = []
        for res in self:
            for key, label in _COMPARISONS:
                s = res[key]
                rows.append(
                    (
                        str(res.layer),
                        label,
                        str(s.n),
                        f"{s.mean:.{digits}g}",
                        f"{s.effect_size:.{digits}g}",
                        f"{s.t:.{digits}g}",
                        f"{s.p_value:.{digits}g}",
                    )
                )
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = lambda r: "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(header), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


# ------------------------------------------------------------------- locality
def locality_statistic(
    est_or_kernels: Any,
    *,
    kernel_size: int | None = None,
    layer_windows: Sequence[tuple[int, int] | None] | None = None,
    exclude_border: bool = True,
) -> LocalityStatistic:
    r"""Centre vs. edge vs. corner weight magnitudes of learned 3x3 kernels, per layer.

    The method of the LOCO-REG study's table of learned 3x3 kernels: if a
    layer has learned local filters, the centre of each kernel's nominal
    window carries more weight than its 4 edge neighbours, which carry more
    than its 4 corners.

    Parameters
    ----------
    est_or_kernels : estimator or sequence of ndarray
        A fitted soft-conv estimator (``kernels_`` is read, and the window
        location and offset existence come from ``network_``), or one array
        per layer. An array whose last two axes are ``(3, 3)`` is used as is
        (already cropped to the window); its leading axes are any number of
        kernels, e.g. ``(Lh, Lw, F, C, 3, 3)`` or ``(n_kernels, 3, 3)``. A
        larger array ``(..., Sh, Sw)`` is cropped to its window (see
        ``layer_windows``).
    kernel_size : int, optional
        Nominal window ``k`` (at least 3). Defaults to the layer's or the
        estimator's ``kernel_size``, else 3. For ``k > 3`` the central 3x3 of
        the ``k x k`` window is used (starting at ``(k - 3) // 2``, so for even
        ``k`` the upper-left of the two central blocks).
    layer_windows : sequence of (int, int) or None, optional
        Per layer, the ``(row, col)`` of the nominal window's top-left corner
        in support coordinates (the last two axes). Overrides what an
        estimator says; for uncropped arrays the default is a window centred
        in the support, ``((Sh - k) // 2, (Sw - k) // 2)`` (where
        ``support=S`` puts it).
    exclude_border : bool, default=True
        With an estimator, leave out the kernels of positions where part of
        the cropped 3x3 window falls outside the image (``'same'`` padding at
        the border): ``kernels_`` holds 0 there, which would bias the
        comparison. Arrays carry no existence information and are used whole.

    Returns
    -------
    result : LocalityStatistic
        A list with one :class:`~sklearn.utils.Bunch` per layer (keys
        ``layer``, ``n_kernels``, ``n_excluded``, ``centre``, ``edge``,
        ``corner``, ``centre_edge``, ``edge_corner``); ``centre_edge`` and
        ``edge_corner`` hold ``mean``, ``sd``, ``effect_size``, ``t``,
        ``p_value``, ``n``. ``str(result)`` / ``result.to_table()`` is a text
        table.

    Notes
    -----
    Every kernel — each output position :math:`p`, output channel :math:`f`
    and input channel :math:`c` — is one observation. With :math:`w` its
    cropped 3x3 window (rows and columns 0, 1, 2),

    .. math::

        a_{ctr} = |w_{11}|, \quad
        a_{edge} = \tfrac14(|w_{01}| + |w_{10}| + |w_{12}| + |w_{21}|), \quad
        a_{cor} = \tfrac14(|w_{00}| + |w_{02}| + |w_{20}| + |w_{22}|),

    and the paired differences :math:`d^{(1)} = a_{ctr} - a_{edge}`,
    :math:`d^{(2)} = a_{edge} - a_{cor}`. For each, over the :math:`n`
    kernels of a layer: the mean :math:`\bar d`, the sample SD :math:`s`
    (``ddof=1``), the standardised effect size :math:`\bar d / s` (Cohen's
    :math:`d_z`), the statistic :math:`t = \bar d / (s / \sqrt n)` and the
    one-sided p-value for :math:`H_1: E[d] > 0`
    (``scipy.stats.ttest_1samp(d, 0, alternative='greater')``). Constant
    differences (:math:`s = 0`) give NaN effect size, t and p.

    The kernels of one layer are not independent (they are fitted on the same
    data, and tying pulls the positions together — in the CNN limit the
    ``L`` positions repeat the same ``F * C`` kernels), so read the p-values
    as descriptive; the effect size does not grow with ``n``.

    Examples
    --------
    >>> import numpy as np
    >>> from softcnn.stats import locality_statistic
    >>> rng = np.random.default_rng(0)
    >>> w = rng.normal(scale=0.1, size=(200, 3, 3))
    >>> w[:, 1, 1] += 1.0  # centre-heavy kernels
    >>> res = locality_statistic([w])
    >>> bool(res[0].centre_edge.p_value < 0.01)
    True
    """
    is_estimator = hasattr(est_or_kernels, "kernels_")
    if is_estimator:
        kernels_list = list(est_or_kernels.kernels_)
    elif isinstance(est_or_kernels, np.ndarray):
        kernels_list = [est_or_kernels]
    else:
        kernels_list = list(est_or_kernels)
    if layer_windows is not None and len(layer_windows) != len(kernels_list):
        raise ValueError(
            f"layer_windows has {len(layer_windows)} entries but there are {len(kernels_list)} layers."
        )

    out = LocalityStatistic()
    for i, kernels in enumerate(kernels_list):
        w = np.asarray(kernels, dtype=float)
        if w.ndim < 2:
            raise ValueError(f"Layer {i}: kernels need at least 2 dimensions, got shape {w.shape}.")
        layer = _soft_layer(est_or_kernels, i) if is_estimator else None
        k = kernel_size
        if k is None:
            k = getattr(layer, "kernel_size", None) or getattr(est_or_kernels, "kernel_size", None) or 3
        k = int(k)
        if k < 3:
            raise ValueError(f"locality_statistic needs a kernel_size of at least 3, got {k}.")
        origin = layer_windows[i] if layer_windows is not None else None
        exists = None
        if w.shape[-2:] == (3, 3) and origin is None and not is_estimator:
            cropped = w  # already the 3x3 window
        else:
            if origin is None and layer is not None:
                origin = _window_origin(layer)
            if origin is None:
                origin = ((w.shape[-2] - k) // 2, (w.shape[-1] - k) // 2)
            shift = (k - 3) // 2
            r, c = int(origin[0]) + shift, int(origin[1]) + shift
            cropped = _crop(w, r, c, 3, 0.0)
            if is_estimator and exclude_border:
                ex = _existence(layer, w.shape) if w.ndim == 6 else None
                if ex is None:
                    ex = np.ones(w.shape[:2] + w.shape[-2:], dtype=bool) if w.ndim == 6 else None
                if ex is not None:
                    ex3 = _crop(ex, r, c, 3, False)
                    exists = ex3.all(axis=(-2, -1))  # (Lh, Lw)
        a = np.abs(cropped)
        centre = a[..., 1, 1]
        edge = (a[..., 0, 1] + a[..., 1, 0] + a[..., 1, 2] + a[..., 2, 1]) / 4.0
        corner = (a[..., 0, 0] + a[..., 0, 2] + a[..., 2, 0] + a[..., 2, 2]) / 4.0
        n_total = centre.size
        if exists is not None:
            keep = exists
            centre, edge, corner = centre[keep], edge[keep], corner[keep]
        centre, edge, corner = centre.ravel(), edge.ravel(), corner.ravel()
        out.append(
            Bunch(
                layer=i,
                n_kernels=int(centre.size),
                n_excluded=int(n_total - centre.size),
                centre=float(centre.mean()) if centre.size else float("nan"),
                edge=float(edge.mean()) if edge.size else float("nan"),
                corner=float(corner.mean()) if corner.size else float("nan"),
                centre_edge=_one_sided(centre - edge),
                edge_corner=_one_sided(edge - corner),
            )
        )
    return out


# ---------------------------------------------------------------------- tying
def tying_statistic(estimator: Any, *, layer: int = 0) -> Bunch:
    r"""Per-position distance of the kernels from the shared kernel, as a map.

    Parameters
    ----------
    estimator : fitted estimator
        A fitted soft-conv estimator, or any object with ``kernels_`` (list of
        ``(Lh, Lw, F, C, Sh, Sw)`` arrays) and ``shared_kernels_`` (list of
        ``(F, C, Sh, Sw)`` arrays); ``network_`` is used for the offset
        existence mask when present.
    layer : int, default=0
        Which soft-conv layer.

    Returns
    -------
    result : Bunch
        ``norms`` : ndarray of shape (Lh, Lw)
            :math:`\|w_p - \bar w\|_2` over output channels, input channels
            and the offsets existing at ``p``.
        ``relative`` : ndarray of shape (Lh, Lw)
            ``norms`` divided by :math:`\|\bar w\|_2` over the same entries
            (NaN where that is 0).
        ``mean`` : float
            Mean of ``norms`` over positions.
        ``mean_relative`` : float
            Mean of ``relative`` over positions (ignoring NaN).
        ``exists`` : ndarray of bool, shape (Lh, Lw, Sh, Sw)
            The offsets that were compared.

    Notes
    -----
    :math:`\bar w` is ``shared_kernels_[layer]``, the mean kernel, each offset
    averaged over the positions where it exists. Biases are not included.
    Offsets that fall outside the image at a position do not exist there
    (``kernels_`` holds 0), so they are left out using the layer's mask
    (``network_.soft_layers[layer].mask``). Without a fitted network the
    mask is unknown and all offsets are compared: at border positions the
    absent offsets then count :math:`|\bar w|` as a deviation (an
    over-estimate). All norms are 0 for a CNN.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from softcnn.stats import tying_statistic
    >>> m = np.ones((2, 1, 3, 3))
    >>> k = np.broadcast_to(m, (4, 4, 2, 1, 3, 3)).copy()
    >>> k[0, 0] += 0.5
    >>> res = tying_statistic(SimpleNamespace(kernels_=[k], shared_kernels_=[m]))
    >>> float(res.norms[0, 0])  # sqrt(18 * 0.25)
    2.1213203435596424
    >>> float(res.norms[1, 1])
    0.0
    """
    try:
        kernels = np.asarray(estimator.kernels_[layer], dtype=float)
        shared = np.asarray(estimator.shared_kernels_[layer], dtype=float)
    except AttributeError as exc:
        raise TypeError(
            "tying_statistic needs a fitted estimator with kernels_ and shared_kernels_."
        ) from exc
    if kernels.ndim != 6 or shared.shape != kernels.shape[2:]:
        raise ValueError(
            f"Expected kernels (Lh, Lw, F, C, Sh, Sw) and shared kernels (F, C, Sh, Sw); "
            f"got {kernels.shape} and {shared.shape}."
        )
    Lh, Lw, _, _, Sh, Sw = kernels.shape
    exists = _existence(_soft_layer(estimator, layer), kernels.shape)
    if exists is None:
        exists = np.ones((Lh, Lw, Sh, Sw), dtype=bool)
    ex = exists[:, :, None, None, :, :]
    diff = (kernels - shared) * ex
    norms = np.sqrt((diff**2).sum(axis=(2, 3, 4, 5)))
    ref = np.sqrt(((np.broadcast_to(shared, kernels.shape) * ex) ** 2).sum(axis=(2, 3, 4, 5)))
    relative = np.full_like(norms, np.nan)
    np.divide(norms, ref, out=relative, where=ref > 0)
    mean_rel = float(np.nanmean(relative)) if np.isfinite(relative).any() else float("nan")
    return Bunch(
        norms=norms,
        relative=relative,
        mean=float(norms.mean()),
        mean_relative=mean_rel,
        exists=exists,
    )
