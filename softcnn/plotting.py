"""Plots for soft-convolution models: paths, CV curves, kernel maps, frontiers.

matplotlib is an optional dependency (``pip install softcnn[plot]``); it is
imported when a function is called. Every function takes ``ax=None`` (a new
figure is created) and returns the Axes it drew on; none calls ``plt.show()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_path", "plot_cv", "plot_kernels", "plot_frontier"]

_LABELS = {
    "validation_score": "validation score",
    "train_loss": "training loss",
    "tying_deviation": "tying deviation",
    "locality_ratio": "locality ratio",
    "n_params": "effective parameters",
    "flops": "FLOPs (multiply-adds)",
}


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "softcnn.plotting needs matplotlib; install it with `pip install softcnn[plot]` "
            "(or `pip install matplotlib`)."
        ) from exc
    return plt


def _label(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " "))


def _set_penalty_scale(ax, values: np.ndarray) -> None:
    """Log x-axis for positive values; symlog (linear around 0) when 0 is among them."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and np.all(v > 0):
        ax.set_xscale("log")
    elif v.size and np.all(v >= 0):
        pos = v[v > 0]
        ax.set_xscale("symlog", linthresh=float(pos.min()) if pos.size else 1.0)
    # negative strengths are not meaningful: keep a linear axis


def _metric(obj: Any, name: str) -> np.ndarray | None:
    val = getattr(obj, name, None)
    if val is None:
        return None
    return np.asarray(val, dtype=float)


def _series(path: Any, values: np.ndarray) -> tuple[str, list[tuple[np.ndarray, str | None]]]:
    """Split a path into lines: ``(x-axis name, [(row indices, legend label), ...])``.

    A 1-D path is one line. A grid path (``values`` of shape (n_points, 2),
    ``param`` a pair) gives one line per value of the first parameter, along
    the second.
    """
    param = getattr(path, "param", "penalty")
    if values.ndim == 1:
        return str(param), [(np.arange(values.size), None)]
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(f"path.values should have shape (n,) or (n, 2); got {values.shape}.")
    names = tuple(param) if isinstance(param, (tuple, list)) else ("param 0", "param 1")
    outer = values[:, 0]
    groups = []
    for g in dict.fromkeys(outer.tolist()):  # order of appearance
        groups.append((np.flatnonzero(outer == g), f"{names[0]}={g:.3g}"))
    return str(names[1]), groups


# ----------------------------------------------------------------------- path
def plot_path(
    path: Any,
    *,
    metrics: Sequence[str] = ("validation_score", "tying_deviation", "locality_ratio"),
    ax: Any = None,
) -> Any:
    """Plot scores and diagnostics against the penalty strength along a regularization path.

    Parameters
    ----------
    path : path result
        The result of :func:`softcnn.soft_conv_path` or any object with
        ``param`` (name of the penalty, e.g. ``'tying'``), ``values`` (the
        strengths, strong to weak) and, for each requested metric, a 1-D array
        of the same length (``train_loss``, ``validation_score``,
        ``tying_deviation``, ``locality_ratio``, ``n_params``, ...).
    metrics : sequence of str, default=("validation_score", "tying_deviation", "locality_ratio")
        Attributes of ``path`` to plot. Metrics that are missing or ``None``
        (e.g. no validation data) are skipped.
    ax : Axes or sequence of Axes, optional
        ``None``: a new figure with one subplot per metric, stacked with a
        shared x-axis (the metrics have different scales). A sequence of Axes
        (one per plotted metric): one metric on each. A single Axes: all
        metrics on it, with a legend.

    Returns
    -------
    axes : ndarray of Axes or Axes
        The array of Axes (one per metric) when ``ax`` is None or a sequence;
        the given Axes otherwise.

    Notes
    -----
    The strengths are drawn on a log x-axis, or a symmetric-log one
    (linear below the smallest positive strength) when the path contains 0.
    Points are joined in path order (strong to weak), the way
    ``lasso_path`` plots are read. A grid path (``param`` a pair such as
    ``('tying', 'locality')`` and ``values`` of shape (n_points, 2)) is drawn
    as one line per value of the first parameter, against the second.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from softcnn.plotting import plot_path
    >>> path = SimpleNamespace(param="tying", values=np.logspace(1, -3, 5),
    ...                        validation_score=np.linspace(0.7, 0.9, 5),
    ...                        tying_deviation=np.linspace(0, 0.5, 5),
    ...                        locality_ratio=np.linspace(0, 0.2, 5))
    >>> axes = plot_path(path)
    >>> len(axes)
    3
    """
    plt = _pyplot()
    values = np.asarray(path.values, dtype=float)
    param, series = _series(path, values)
    xvals = values if values.ndim == 1 else values[:, 1]
    data = []
    for name in metrics:
        y = _metric(path, name)
        if y is None:
            continue
        if y.shape != xvals.shape:
            raise ValueError(f"path.{name} has shape {y.shape}, expected {xvals.shape} (one per point).")
        data.append((name, y))
    if not data:
        raise ValueError(f"None of the metrics {tuple(metrics)} is available on the path.")

    single = ax is not None and not isinstance(ax, (Sequence, np.ndarray))
    if ax is None:
        fig, axes = plt.subplots(
            len(data), 1, sharex=True, squeeze=False, figsize=(6.0, 1.5 + 1.8 * len(data))
        )
        axes = axes[:, 0]
    elif single:
        axes = np.array([ax] * len(data), dtype=object)
    else:
        axes = np.asarray(ax, dtype=object).ravel()
        if axes.size != len(data):
            raise ValueError(f"Got {axes.size} Axes for {len(data)} metrics.")

    for a, (name, y) in zip(axes, data):
        for rows, group in series:
            label = _label(name) if group is None else (group if not single else f"{_label(name)}, {group}")
            a.plot(xvals[rows], y[rows], marker="o", markersize=3, label=label)
        _set_penalty_scale(a, xvals)
        if not single:
            a.set_ylabel(_label(name))
            if len(series) > 1:
                a.legend(fontsize="x-small")
        a.grid(True, alpha=0.3)
    xlabel = f"{param} strength"
    if single:
        ax.set_ylabel("value")
        ax.set_xlabel(xlabel)
        ax.legend()
        return ax
    axes[-1].set_xlabel(xlabel)
    if ax is None:
        axes[0].set_title(f"Regularization path over {param}")
    return axes


# ------------------------------------------------------------------------- CV
def plot_cv(
    cv_estimator: Any,
    *,
    locality_index: int | None = None,
    ax: Any = None,
    ddof: int = 1,
) -> Any:
    """Plot the mean cross-validated score against tying, with a ±1 SE band.

    Like glmnet's ``plot.cv.glmnet``: the mean score over folds with a band of
    one standard error, and vertical lines at the tying chosen by the
    ``'min'`` rule (best mean score) and by the ``'1se'`` rule (strongest
    tying within one SE of the best).

    Parameters
    ----------
    cv_estimator : fitted CV estimator
        A fitted ``SoftConvClassifierCV`` / ``SoftConvRegressorCV`` or any
        object with ``tyings_`` (n_tyings,), ``localities_`` (n_localities,),
        ``scores_path_`` (n_localities, n_tyings, n_folds), ``index_min_``
        and ``index_1se_`` (``(i_locality, i_tying)``), and optionally
        ``selection`` (``'min'`` or ``'1se'``).
    locality_index : int, optional
        Row of the locality grid to plot; default: the locality of the
        selected model (``index_1se_`` with ``selection='1se'``, else
        ``index_min_``).
    ax : Axes, optional
        Axes to draw on; a new figure when None.
    ddof : int, default=1
        Delta degrees of freedom of the standard deviation over folds
        (1 as glmnet).

    Returns
    -------
    ax : Axes

    Notes
    -----
    For each tying :math:`t`, with the fold scores :math:`s_1, \\dots, s_K`
    (NaN ignored): mean :math:`\\bar s`, standard error
    :math:`\\mathrm{SE} = \\mathrm{sd}(s) / \\sqrt{K}`, band
    :math:`[\\bar s - \\mathrm{SE}, \\bar s + \\mathrm{SE}]`. The vertical
    lines are at ``tyings_[index_min_[1]]`` and ``tyings_[index_1se_[1]]``;
    the selected rule is drawn solid, the other dashed. When a choice was
    made at another locality than the one plotted, its label says so.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from softcnn.plotting import plot_cv
    >>> rng = np.random.default_rng(0)
    >>> cv = SimpleNamespace(tyings_=np.logspace(-3, 1, 6), localities_=np.array([0.0]),
    ...                      scores_path_=rng.uniform(0.8, 0.9, size=(1, 6, 5)),
    ...                      index_min_=(0, 2), index_1se_=(0, 4), selection="1se")
    >>> ax = plot_cv(cv)
    >>> ax.get_xscale()
    'log'
    """
    plt = _pyplot()
    tyings = np.asarray(cv_estimator.tyings_, dtype=float)
    localities = np.asarray(getattr(cv_estimator, "localities_", [np.nan]), dtype=float)
    scores = np.asarray(cv_estimator.scores_path_, dtype=float)
    if scores.ndim == 2:  # a single locality
        scores = scores[None]
    if scores.ndim != 3 or scores.shape[1] != tyings.size:
        raise ValueError(
            f"scores_path_ should have shape (n_localities, {tyings.size}, n_folds); got {scores.shape}."
        )
    selection = getattr(cv_estimator, "selection", "min")
    idx_min = tuple(int(i) for i in cv_estimator.index_min_)
    idx_1se = tuple(int(i) for i in cv_estimator.index_1se_)
    if locality_index is None:
        locality_index = (idx_1se if selection == "1se" else idx_min)[0]
    row = scores[locality_index]  # (n_tyings, n_folds)
    n_folds = np.sum(np.isfinite(row), axis=1)
    mean = np.nanmean(row, axis=1)
    sd = np.nanstd(row, axis=1, ddof=ddof) if row.shape[1] > ddof else np.zeros_like(mean)
    se = sd / np.sqrt(np.maximum(n_folds, 1))

    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 4.0))
    order = np.argsort(tyings)
    x, m, s = tyings[order], mean[order], se[order]
    ax.fill_between(x, m - s, m + s, alpha=0.25, color="C0", label="±1 SE")
    ax.plot(x, m, marker="o", markersize=4, color="C0", label="mean CV score")
    for name, idx, color in (("min", idx_min, "C3"), ("1se", idx_1se, "C2")):
        label = f"{name}: tying={tyings[idx[1]]:.3g}"
        if idx[0] != locality_index and idx[0] < localities.size:
            label += f" (at locality={localities[idx[0]]:.3g})"
        ax.axvline(
            tyings[idx[1]],
            color=color,
            linestyle="-" if name == selection else "--",
            linewidth=1.2,
            label=label,
        )
    _set_penalty_scale(ax, tyings)
    ax.set_xlabel("tying strength")
    scoring = getattr(cv_estimator, "scoring", None)
    ax.set_ylabel(f"CV score ({scoring})" if isinstance(scoring, str) else "mean CV score")
    if localities.size and locality_index < localities.size:
        ax.set_title(f"Cross-validation at locality={localities[locality_index]:.3g}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax


# -------------------------------------------------------------------- kernels
def _kernel_mosaic(tiles: np.ndarray) -> np.ndarray:
    """(Lh, Lw, Sh, Sw) -> (Lh*(Sh+1), Lw*(Sw+1)) with NaN gaps after each tile."""
    Lh, Lw, Sh, Sw = tiles.shape
    mosaic = np.full((Lh, Sh + 1, Lw, Sw + 1), np.nan)
    mosaic[:, :Sh, :, :Sw] = tiles.transpose(0, 2, 1, 3)
    return mosaic.reshape(Lh * (Sh + 1), Lw * (Sw + 1))


def _tick_positions(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    step = max(1, math.ceil(n / 8))
    idx = np.arange(0, n, step)
    return idx * (size + 1) + (size - 1) / 2.0, idx


def plot_kernels(
    estimator: Any,
    *,
    layer: int = 0,
    channel: int = 0,
    in_channel: int = 0,
    ax: Any = None,
    cmap: str = "RdBu_r",
    show_window: bool = True,
    kernel_size: int | None = None,
) -> Any:
    """Show the kernel of every output position on the image grid.

    Each output position gets its ``Sh x Sw`` kernel as a tile, placed where
    the position lies in the image: with strong tying all tiles look alike (a
    CNN); with weak tying the "colour families" of soft weight sharing show
    as regions of similar tiles.

    Parameters
    ----------
    estimator : fitted estimator or ndarray
        A fitted soft-conv estimator (``kernels_[layer]`` is used), or a raw
        kernels array of shape ``(Lh, Lw, F, C, Sh, Sw)``.
    layer : int, default=0
        Soft-conv layer (ignored for an array).
    channel : int, default=0
        Output channel ``f``.
    in_channel : int, default=0
        Input channel ``c``.
    ax : Axes, optional
        Axes to draw on; a new figure when None.
    cmap : str, default="RdBu_r"
        A diverging colormap; the colour scale is symmetric around 0.
    show_window : bool, default=True
        Outline the nominal ``k x k`` window on each tile. Its location is read
        from the estimator's layer; for an array it is assumed centred in the
        support and drawn only when ``kernel_size`` is given.
    kernel_size : int, optional
        Nominal window size for an array input (overrides the estimator's).

    Returns
    -------
    ax : Axes

    Notes
    -----
    The image is an ``(Lh*(Sh+1)) x (Lw*(Sw+1))`` mosaic: the tile of position
    ``(i, j)`` occupies rows ``i*(Sh+1) : i*(Sh+1)+Sh`` and columns
    ``j*(Sw+1) : j*(Sw+1)+Sw``; the one-pixel gaps are NaN (blank). The
    values are those of ``kernels_`` (offsets that fall outside the image at
    a position are 0). The colour limits are ``±max|w|`` over the channel
    shown, and the title reports the estimator's ``tying_deviation_``.

    Examples
    --------
    >>> import numpy as np
    >>> from softcnn.plotting import plot_kernels
    >>> k = np.random.default_rng(0).normal(size=(4, 4, 2, 1, 5, 5))
    >>> ax = plot_kernels(k, kernel_size=3)
    >>> ax.images[0].get_array().shape
    (24, 24)
    """
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    is_array = isinstance(estimator, np.ndarray)
    kernels = estimator if is_array else estimator.kernels_[layer]
    kernels = np.asarray(kernels, dtype=float)
    if kernels.ndim != 6:
        raise ValueError(f"Expected kernels of shape (Lh, Lw, F, C, Sh, Sw); got {kernels.shape}.")
    Lh, Lw, F, C, Sh, Sw = kernels.shape
    if not (0 <= channel < F and 0 <= in_channel < C):
        raise ValueError(f"channel must be in [0, {F}) and in_channel in [0, {C}); got {channel}, {in_channel}.")
    tiles = kernels[:, :, channel, in_channel]
    mosaic = _kernel_mosaic(tiles)
    vmax = float(np.nanmax(np.abs(tiles))) if tiles.size else 0.0
    vmax = vmax if vmax > 0 else 1.0

    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 5.2))
    im = ax.imshow(mosaic, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, label="weight")

    if show_window:
        origin = None
        k = kernel_size
        if not is_array:
            soft = getattr(getattr(estimator, "network_", None), "soft_layers", None)
            lay = soft[layer] if soft is not None and layer < len(soft) else None
            if lay is not None:
                origin = (-int(lay.gh.lo), -int(lay.gw.lo))
                k = k or int(lay.kernel_size)
            k = k or getattr(estimator, "kernel_size", None)
        if k is not None and origin is None:
            origin = ((Sh - int(k)) // 2, (Sw - int(k)) // 2)
        if k is not None and (int(k) < Sh or int(k) < Sw):  # the window is worth outlining
            k = int(k)
            r0, c0 = origin
            r1, c1 = min(r0 + k, Sh), min(c0 + k, Sw)
            r0, c0 = max(r0, 0), max(c0, 0)
            segs = []
            for i in range(Lh):
                for j in range(Lw):
                    top, left = i * (Sh + 1) + r0 - 0.5, j * (Sw + 1) + c0 - 0.5
                    bottom, right = i * (Sh + 1) + r1 - 0.5, j * (Sw + 1) + c1 - 0.5
                    segs.append([(left, top), (right, top), (right, bottom), (left, bottom), (left, top)])
            ax.add_collection(LineCollection(segs, colors="k", linewidths=0.5, alpha=0.6))

    xt, xl = _tick_positions(Lw, Sw)
    yt, yl = _tick_positions(Lh, Sh)
    ax.set_xticks(xt, [str(v) for v in xl])
    ax.set_yticks(yt, [str(v) for v in yl])
    ax.set_xlabel("output column (one tile per position)")
    ax.set_ylabel("output row")
    title = f"layer {layer}, channel {channel} ← input {in_channel}" if not is_array else (
        f"channel {channel} ← input {in_channel}"
    )
    dev = None if is_array else getattr(estimator, "tying_deviation_", None)
    if dev is not None:
        title += f"\ntying deviation = {float(dev):.3g}"
    ax.set_title(title)
    return ax


# ------------------------------------------------------------------- frontier
def plot_frontier(
    path: Any,
    *,
    x: str = "n_params",
    y: str = "validation_score",
    ax: Any = None,
    xscale: str | None = None,
) -> Any:
    """Plot a score against the effective model size along a regularization path.

    Parameters
    ----------
    path : path result
        As for :func:`plot_path`: ``param``, ``values`` and 1-D arrays named
        by ``x`` and ``y``.
    x : str, default="n_params"
        Attribute giving the effective size (``'n_params'`` or ``'flops'``).
    y : str, default="validation_score"
        Attribute giving the score.
    ax : Axes, optional
        Axes to draw on; a new figure when None.
    xscale : {'linear', 'log'}, optional
        Default: log when all sizes are positive and span more than two
        decades, linear otherwise.

    Returns
    -------
    ax : Axes

    Notes
    -----
    Points are joined in path order (strong to weak penalty) and each is
    annotated with its penalty strength, so the trade-off between accuracy
    and size — the "frontier" — reads along the line. For a grid path, one
    line per value of the first parameter, points labelled by the second.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from softcnn.plotting import plot_frontier
    >>> path = SimpleNamespace(param="tying", values=np.array([10.0, 1.0, 0.1]),
    ...                        n_params=np.array([100, 500, 2000]),
    ...                        validation_score=np.array([0.80, 0.86, 0.85]))
    >>> ax = plot_frontier(path)
    >>> len(ax.texts)
    3
    """
    plt = _pyplot()
    values = np.asarray(path.values, dtype=float)
    param, series = _series(path, values)
    inner = values if values.ndim == 1 else values[:, 1]
    xs, ys = _metric(path, x), _metric(path, y)
    for name, arr in ((x, xs), (y, ys)):
        if arr is None:
            raise ValueError(f"The path has no {name!r} (it is missing or None).")
        if arr.shape != inner.shape:
            raise ValueError(f"path.{name} has shape {arr.shape}, expected {inner.shape}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 4.0))
    for rows, group in series:
        ax.plot(xs[rows], ys[rows], marker="o", markersize=4, label=group)
    if len(series) > 1:
        ax.legend(fontsize="small")
    for xi, yi, v in zip(xs, ys, inner):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(
                f"{v:.2g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize="x-small"
            )
    if xscale is None:
        fin = xs[np.isfinite(xs)]
        xscale = "log" if fin.size and np.all(fin > 0) and fin.max() / fin.min() > 100 else "linear"
    ax.set_xscale(xscale)
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.set_title(f"Frontier along the {param} path (points labelled by {param})")
    ax.grid(True, alpha=0.3)
    return ax
