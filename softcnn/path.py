"""Regularization paths: warm-started fits along penalty strengths, from strong to weak."""

from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import check_scoring
from sklearn.model_selection import train_test_split
from sklearn.utils import _safe_indexing, check_random_state
from sklearn.utils.validation import check_scalar
from tqdm.auto import tqdm

__all__ = ["SoftConvPath", "soft_conv_path", "penalty_grid", "Track"]

#: Patience (``n_iter_no_change``, at most) of L-BFGS at warm-started path points. A warm start
#: typically gains less than ``tol * max(J, 1)`` from its first iteration, so the stopping rule
#: only counts its patience down; the objective still creeps lower meanwhile, so a smaller
#: patience trades training loss at each point for time. Measured (``benchmarks/README.md``):
#: digits CV curves from 5-iteration points are within a few images of 11- and 41-iteration
#: ones, and the digits CV fit took 19.5 instead of 24.4 CPU seconds.
PATH_N_ITER_NO_CHANGE = 4
_DIAGNOSTICS = ("tying_deviation_", "locality_ratio_", "n_params_", "flops_", "n_iter_")


@dataclass
class SoftConvPath:
    """What :func:`soft_conv_path` returns; every per-point array has one entry per fit.

    Attributes
    ----------
    param : str or tuple of str
        The strength(s) varied: ``'tying'``, or ``('tying', 'locality')`` for a grid.
    values : ndarray of shape (n_points,) or (n_points, 2)
        Strengths in the order fitted (strong to weak; for a grid, localities
        in the outer loop and tyings in the inner one).
    grid_shape : tuple or None
        ``(n_localities, n_tyings)`` for a grid: ``a.reshape(grid_shape)`` turns a
        per-point array into a table.
    train_loss : ndarray
        Final training objective (data loss plus penalties) of each fit.
    train_score, validation_score : ndarray or None
        Score (``scoring``) on the training data and on the validation data.
    tying_deviation, locality_ratio : ndarray
        The fitted diagnostics of the same names.
    n_params, flops : ndarray or None
        Effective size, when the estimator reports ``n_params_`` / ``flops_``.
    n_iter, fit_time : ndarray
    weights : list of dict or None
        With ``return_weights=True``: each fit's ``state_dict`` (CPU tensors).
    """

    param: str | tuple
    values: np.ndarray
    grid_shape: tuple | None = None
    train_loss: np.ndarray = None
    train_score: np.ndarray | None = None
    validation_score: np.ndarray | None = None
    tying_deviation: np.ndarray = None
    locality_ratio: np.ndarray = None
    n_params: np.ndarray | None = None
    flops: np.ndarray | None = None
    n_iter: np.ndarray = None
    fit_time: np.ndarray = None
    weights: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.values)


def penalty_grid(estimator, X, y, param: str = "tying", *, n_values: int = 20, eps: float = 1e-3,
                 sample_weight=None) -> np.ndarray:
    """A geometric grid of ``n_values`` strengths from a data-driven maximum down to ``eps`` times it.

    The maximum is :func:`softcnn.limits.tying_max` / :func:`softcnn.limits.locality_max`:
    exact for the lasso-type penalties (every deviation, or every far weight,
    is zero there), a documented scale for ridge-type ones.
    """
    from . import limits

    _check_grid(n_values, eps)
    maxima = {"tying": limits.tying_max, "locality": limits.locality_max}
    if param not in maxima:
        raise ValueError(
            f"No data-driven maximum for param={param!r}; pass values=... explicitly "
            f"(data-driven grids exist for {sorted(maxima)})."
        )
    return _geometric_grid(float(maxima[param](estimator, X, y, sample_weight=sample_weight)), param,
                          n_values=n_values, eps=eps)


def _check_patience(value) -> None:
    """``path_n_iter_no_change``: None or an int >= 1."""
    if value is not None:
        check_scalar(value, "path_n_iter_no_change", numbers.Integral, min_val=1)


def _check_grid(n_values: int, eps: float) -> None:
    if n_values < 1:
        raise ValueError(f"n_values must be >= 1, got {n_values}.")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}.")


def _geometric_grid(top: float, param: str, *, n_values: int, eps: float) -> np.ndarray:
    """``n_values`` strengths from ``top`` (a data-driven maximum of ``param``) down to ``eps * top``.

    ``n_values`` and ``eps`` are checked by the caller (:func:`_check_grid`), before any fit.
    """
    if not np.isfinite(top) or top <= 0:
        raise ValueError(f"The data-driven maximum of {param} is {top}; pass values=... explicitly.")
    return np.geomspace(top, top * eps, n_values)


def _as_strengths(values, name: str) -> np.ndarray:
    values = np.sort(np.asarray(values, dtype=float).ravel())[::-1]  # strong to weak
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name} values must be a non-empty array of finite numbers >= 0.")
    return values


def soft_conv_path(
    estimator,
    X,
    y,
    *,
    param="tying",
    values=None,
    n_values: int = 20,
    eps: float = 1e-3,
    sample_weight=None,
    X_val=None,
    y_val=None,
    sample_weight_val=None,
    validation_fraction: float | None = None,
    scoring=None,
    return_weights: bool = False,
    verbose: int = 0,
    path_n_iter_no_change: int | None = PATH_N_ITER_NO_CHANGE,
) -> SoftConvPath:
    """Fit an estimator along a warm-started path of penalty strengths.

    Like :func:`sklearn.linear_model.lasso_path`: strengths go from strong to
    weak and each fit starts from the previous one, so neighbouring points
    follow one solution. A path over ``tying`` starts at the CNN: the CNN
    limit (every deviation frozen at zero) is fitted first, cold (with the
    estimator's ``n_init``), and the first point is warm-started from it.
    That is cheaper and better than a cold fit at the strongest tying, which
    starts from untied random weights and must tie them against a stiff
    penalty (on digits: 97 instead of 200 L-BFGS iterations, and a lower
    objective). Each warm-started point stops by the estimator's rule
    (``tol``) with L-BFGS's patience at most ``path_n_iter_no_change``: a warm
    start usually gains less than ``tol`` from its first iteration, so the
    rule only counts the patience down while the objective creeps lower, and
    the patience sets both the cost of a point and how far it gets (with 4,
    typically 5 iterations; measured in ``benchmarks/README.md``).

    Parameters
    ----------
    estimator : SoftConvClassifier or SoftConvRegressor
        Template; it is cloned, never modified.
    X, y : array-like
        Training data (any input form the estimator accepts).
    param : str or tuple of str, default='tying'
        Any penalty strength parameter of the estimator (``'tying'``,
        ``'locality'``, ``'alpha'``, ...), or ``('tying', 'locality')`` for a
        2-D grid.
    values : array-like, or tuple of two for a grid, default=None
        Strengths; ``None`` builds a geometric grid (:func:`penalty_grid`)
        from the data-driven maximum down to ``eps`` times it (tying and
        locality only). For ``param='tying'`` the maximum is evaluated at the
        CNN-limit fit the path starts from, as the fitted ``tying_max_`` is
        (no reference fit of its own where that fit solves the reference
        problem of :func:`softcnn.limits.tying_max`).
    n_values : int, default=20
        Points per axis when ``values`` is None.
    eps : float, default=1e-3
        Ratio of the smallest to the largest strength of the grid.
    sample_weight : array-like, default=None
    X_val, y_val, sample_weight_val : array-like, default=None
        Validation data for ``validation_score``.
    validation_fraction : float, default=None
        Without ``X_val``: hold out this share of X (stratified for classifiers).
    scoring : str or callable, default=None
        Scorer (the estimator's ``score`` when None).
    return_weights : bool, default=False
        Keep each fit's ``state_dict``.
    verbose : int, default=0
        A tqdm progress bar over path points when > 0.
    path_n_iter_no_change : int or None, default=4
        L-BFGS's patience at warm-started points, at most the estimator's
        ``n_iter_no_change`` (None: the estimator's). Larger values get each
        point closer to its solution, at a cost.

    Returns
    -------
    SoftConvPath

    Examples
    --------
    >>> from softcnn import SoftConvRegressor, soft_conv_path
    >>> from softcnn.datasets import make_soft_conv_data
    >>> X, y, _ = make_soft_conv_data(100, (6, 6), random_state=0)
    >>> path = soft_conv_path(SoftConvRegressor(channels=2, random_state=0), X, y,
    ...                       values=[1.0, 0.1, 0.01], validation_fraction=0.25)
    >>> path.tying_deviation.shape
    (3,)
    """
    est = clone(estimator)
    _check_patience(path_n_iter_no_change)
    grid = isinstance(param, (tuple, list))
    params = tuple(param) if grid else (param,)
    known = est.get_params()
    for name in params:
        if name not in known:
            raise ValueError(f"param={name!r} is not a parameter of {type(est).__name__}.")
    if grid and len(params) != 2:
        raise ValueError(f"A grid takes two parameters, e.g. ('tying', 'locality'); got {param!r}.")

    if X_val is None and validation_fraction is not None:
        rng = check_random_state(est.get_params().get("random_state"))
        stratify = y if is_classifier(est) else None
        split = train_test_split(np.arange(len(y)), test_size=validation_fraction, random_state=rng,
                                 stratify=stratify)
        idx_train, idx_val = split
        X, X_val = _safe_indexing(X, idx_train), _safe_indexing(X, idx_val)
        y, y_val = np.asarray(y)[idx_train], np.asarray(y)[idx_val]
        if sample_weight is not None:
            sample_weight, sample_weight_val = (np.asarray(sample_weight)[idx_train],
                                                np.asarray(sample_weight)[idx_val])

    track = Track(X, y, sample_weight, X_val, y_val, sample_weight_val)
    started, start_time = None, time.perf_counter()
    if values is None and params == ("tying",):  # the grid's top from the CNN limit the path starts at
        _check_grid(n_values, eps)
        started, (top,) = _cnn_limit_starts(est, [track], {})
        axes = [_geometric_grid(top, "tying", n_values=n_values, eps=eps)]
    elif values is None:
        axes = [penalty_grid(est, X, y, name, n_values=n_values, eps=eps, sample_weight=sample_weight)
                for name in params]
    else:
        raw = values if grid else (values,)
        if grid and len(raw) != 2:
            raise ValueError("For a grid, values must be a pair (values of param[0], values of param[1]).")
        axes = [_as_strengths(v, name) for v, name in zip(raw, params)]

    if grid:
        outer, inner = axes[1], axes[0]
        points = [(t, o) for o in outer for t in inner]
    else:
        points = [(t,) for t in axes[0]]
    (record,) = _fit_paths(est, [track], params, points, row_length=len(axes[0]) if grid else None,
                           scoring=scoring, return_weights=return_weights, verbose=verbose, started=started,
                           start_time=start_time, patience=path_n_iter_no_change)
    return SoftConvPath(
        param=params if grid else param,
        values=np.array(points) if grid else np.array([p[0] for p in points]),
        grid_shape=(len(axes[1]), len(axes[0])) if grid else None,
        **record,
    )


@dataclass
class Track:
    """One training set followed along a path, with its validation data (None: no validation score)."""

    X: object
    y: object
    sample_weight: object = None
    X_val: object = None
    y_val: object = None
    sample_weight_val: object = None


def _fit_paths(estimator, tracks: list[Track], params: tuple, points: list, *, row_length: int | None = None,
               scoring=None, return_weights: bool = False, verbose: int = 0, batch="auto",
               train_score: bool = True, started: list | None = None, start_time: float | None = None,
               patience: int | None = PATH_N_ITER_NO_CHANGE) -> list[dict]:
    """Warm-started fits of ``estimator`` at ``points`` (strengths of ``params``), one path per track.

    The tracks move through the points together: at each point all their
    fits are solved as one batched model where they can be
    (:func:`softcnn.batched.fit_together`). For a grid (``row_length``
    points per row), each row starts from the first point of the previous
    row. Returns per track the per-point arrays of :class:`SoftConvPath`
    (``train_score=False``: no training score, one prediction pass less a point).
    """
    start = time.perf_counter() if start_time is None else start_time
    first = dict(zip(params, points[0]))
    ests = started if started is not None else _start_paths(
        estimator, tracks, first if first.get("tying", 0.0) > 0 else None, batch=batch)
    scorer = check_scoring(ests[0], scoring=scoring)
    records = [{k: [] for k in ("train_loss", "train_score", "validation_score", "fit_time", *_DIAGNOSTICS)}
               for _ in tracks]
    weights = [[] if return_weights else None for _ in tracks]
    row_starts = None  # warm start of each grid row: the strong-tying end of the previous row
    bar = tqdm(points, desc=f"path over {'x'.join(params)}", disable=verbose <= 0, leave=False)
    for i, point in enumerate(bar):
        row_start = row_length is not None and i % row_length == 0
        if row_start and row_starts is not None:
            for est, state in zip(ests, row_starts):
                set_fitted_state(est, state)
        for est in ests:
            est.set_params(**dict(zip(params, point)))
        warm = hasattr(ests[0], "network_")  # every point but a path's cold first one
        _solve_quietly(ests, tracks, batch, lbfgs_patience=patience if warm else None)
        elapsed = (time.perf_counter() - start) / len(tracks)  # a shared run: split evenly
        if row_start:
            row_starts = [fitted_state(est) for est in ests]
        for est, t, record, w in zip(ests, tracks, records, weights):
            record["fit_time"].append(elapsed)
            record["train_loss"].append(est.loss_)
            record["train_score"].append(_score(scorer, est, t.X, t.y, t.sample_weight) if train_score else np.nan)
            record["validation_score"].append(
                _score(scorer, est, t.X_val, t.y_val, t.sample_weight_val) if t.X_val is not None else np.nan
            )
            for name in _DIAGNOSTICS:
                record[name].append(getattr(est, name, np.nan))
            if return_weights:
                w.append({k: v.detach().cpu().clone() for k, v in est.network_.state_dict().items()})
        start = time.perf_counter()
    bar.close()

    def arr(record, name):
        a = np.asarray(record[name], dtype=float)
        return None if np.all(np.isnan(a)) else a

    return [
        dict(
            train_loss=arr(r, "train_loss"),
            train_score=arr(r, "train_score"),
            validation_score=arr(r, "validation_score"),
            tying_deviation=arr(r, "tying_deviation_"),
            locality_ratio=arr(r, "locality_ratio_"),
            n_params=arr(r, "n_params_"),
            flops=arr(r, "flops_"),
            n_iter=np.asarray(r["n_iter_"], dtype=int),
            fit_time=np.asarray(r["fit_time"]),
            weights=w,
        )
        for r, w in zip(records, weights)
    ]


def _start_paths(estimator, tracks: list[Track], strengths: dict | None, *, batch="auto") -> list:
    """One warm-startable clone of ``estimator`` per track, where its path starts.

    A path over ``tying`` (from a positive tying) starts at the CNN limit (see
    :func:`soft_conv_path`): with ``strengths`` (the first point's other
    strengths) it is fitted here on each track; with None the clones are
    left unfitted.
    """
    from .limits import _freeze_deviations

    ests = [clone(estimator).set_params(warm_start=True) for _ in tracks]
    if strengths is not None:
        for est in ests:  # tying=0 keeps L-BFGS for a smooth rest
            est.set_params(**{**strengths, "tying": 0.0})
        _solve_quietly(ests, tracks, batch, constrain=_freeze_deviations)
    return ests


def _cnn_limit_starts(estimator, tracks: list[Track], strengths: dict) -> tuple[list, list[float]]:
    """Paths over tying started at each track's CNN limit, and the ``tying_max_`` of each start.

    :func:`softcnn.limits.tying_max`'s condition is evaluated on the start
    itself, as the fitted ``tying_max_`` is, so a data-driven tying grid costs
    no fit beyond the ones its paths start from, except a short reference fit
    warm-started from a start that does not solve the reference problem
    (``early_stopping``, other non-smooth penalties, snapping, ``max_iter``).
    """
    from .limits import _fitted_tying_max

    ests = _start_paths(estimator, tracks, strengths)
    return ests, [_fitted_tying_max(est, t.X, t.y, t.sample_weight)[0] for est, t in zip(ests, tracks)]


def _solve_quietly(ests, tracks, batch, **kwargs) -> None:
    """Fit each estimator on its track together; path points are not converged fits to warn about."""
    from .batched import fit_together

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit_together(ests, [t.X for t in tracks], [t.y for t in tracks], [t.sample_weight for t in tracks],
                     batch=batch, **kwargs)


def _score(scorer, est, X, y, sample_weight):
    if sample_weight is None:
        return scorer(est, X, y)
    return scorer(est, X, y, sample_weight=sample_weight)


def fitted_state(est) -> dict:
    """Everything a fit set on ``est`` (all attributes that are not constructor parameters)."""
    params = est.get_params(deep=False)
    return {k: v for k, v in vars(est).items() if k not in params}


def set_fitted_state(est, state: dict) -> None:
    for k, v in state.items():
        setattr(est, k, v)
