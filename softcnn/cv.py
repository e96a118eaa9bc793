"""Cross-validated soft convolution: choose tying (and locality) like ``LassoCV``."""

from __future__ import annotations

import inspect
import numbers
import time
import warnings

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import clone, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import check_cv
from sklearn.utils import _safe_indexing
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import _check_sample_weight, check_scalar, indexable

from .estimators import BaseSoftConv, SoftConvClassifier, SoftConvRegressor, _atomic_fit
from .path import (PATH_N_ITER_NO_CHANGE, Track, _check_grid, _check_patience, _cnn_limit_starts, _fit_paths,
                   _geometric_grid, fitted_state, penalty_grid, set_fitted_state)

__all__ = ["SoftConvClassifierCV", "SoftConvRegressorCV", "select_strengths"]

_CV_PARAMS = {
    "tyings": 10,
    "localities": None,
    "cv": 5,
    "scoring": None,
    "selection": "min",
    "eps": 1e-3,
    "n_jobs": None,
    "refit": True,
    "path_n_iter_no_change": PATH_N_ITER_NO_CHANGE,
}


def select_strengths(scores: np.ndarray, tyings: np.ndarray, localities: np.ndarray,
                     selection: str = "min") -> tuple[int, int]:
    """Index ``(i_locality, i_tying)`` chosen from fold scores of shape (n_localities, n_tyings, n_folds).

    ``'min'``: the best mean score (the minimum CV error). ``'1se'`` (glmnet's
    rule): among the points whose mean score is within one standard error of
    the best, the one with the strongest tying, then the strongest locality.
    So ``'1se'`` never picks weaker tying than ``'min'``.
    """
    mean = scores.mean(axis=2)
    best = np.unravel_index(np.nanargmax(mean), mean.shape)
    if selection == "min":
        return tuple(int(i) for i in best)
    n_folds = scores.shape[2]
    se = scores[best].std(ddof=1) / np.sqrt(n_folds) if n_folds > 1 else 0.0
    ok = mean >= mean[best] - se
    candidates = np.argwhere(ok)
    key = [(tyings[j], localities[i]) for i, j in candidates]
    i, j = candidates[max(range(len(key)), key=key.__getitem__)]
    return int(i), int(j)


def _is_count(spec) -> bool:
    """Whether a grid spec asks for a data-driven grid of that many values."""
    return isinstance(spec, numbers.Integral) and not isinstance(spec, bool)


def _fold_tracks(X, y, sample_weight, folds) -> list[Track]:
    def part(index):
        return None if sample_weight is None else sample_weight[index]

    return [Track(_safe_indexing(X, train), y[train], part(train), _safe_indexing(X, test), y[test], part(test))
            for train, test in folds]


def _fold_starts(estimator, X, y, sample_weight, folds, locality) -> tuple[list, list[float]]:
    """Each training fold's path started at its CNN limit, and its ``tying_max_`` there."""
    return _cnn_limit_starts(estimator, _fold_tracks(X, y, sample_weight, folds), {"locality": locality})


def _fold_paths(estimator, X, y, sample_weight, folds, tyings, localities, scoring, patience,
                started=None) -> list[np.ndarray]:
    """Validation scores ``(n_localities, n_tyings)`` of each fold's path; the folds move together."""
    records = _fit_paths(estimator, _fold_tracks(X, y, sample_weight, folds), ("tying", "locality"),
                         [(t, l) for l in localities for t in tyings], row_length=len(tyings), scoring=scoring,
                         train_score=False, started=started, patience=patience)
    return [r["validation_score"].reshape(len(localities), len(tyings)) for r in records]


class _BaseSoftConvCV:
    """Grid of tying x locality fitted along warm-started paths per fold, then refit."""

    def _base_estimator(self) -> BaseSoftConv:
        return self._base_class(**{k: v for k, v in self.get_params(deep=False).items() if k not in _CV_PARAMS})

    def _strengths(self, base, X, y, sample_weight):
        """The grids of tying and locality, strong to weak; None for a tying grid the folds make."""
        out = []
        for name, spec in (("tying", self.tyings), ("locality", self.localities)):
            if spec is None:
                out.append(np.array([float(getattr(base, name))]))
            elif _is_count(spec):
                check_scalar(spec, f"{name}s", numbers.Integral, min_val=1)
                if name == "tying" and not _is_count(self.localities):
                    _check_grid(int(spec), self.eps)
                    out.append(None)  # from the folds' CNN-limit fits (see fit)
                else:
                    out.append(penalty_grid(base, X, y, name, n_values=int(spec), eps=self.eps,
                                            sample_weight=sample_weight))
            else:
                values = np.asarray(spec, dtype=float).ravel()
                if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
                    raise ValueError(f"{name}s must be an int or a non-empty array of finite numbers >= 0.")
                out.append(np.sort(values)[::-1])
        return out

    @_atomic_fit
    def fit(self, X, y, sample_weight=None):
        """Cross-validate the grid, select the strengths, refit on all data.

        Parameters
        ----------
        X, y, sample_weight
            As for the base estimator's ``fit``.

        Returns
        -------
        self : object
        """
        if self.selection not in ("min", "1se"):
            raise ValueError(f"selection must be 'min' or '1se'; got {self.selection!r}.")
        _check_patience(self.path_n_iter_no_change)
        base = self._base_estimator()
        # The base estimator validates X and y (and fails clearly) before any fold is fitted.
        template = clone(base).set_params(max_iter=1)
        _quiet_fit(template, X, y, sample_weight)
        X, y = indexable(X, y)
        y = np.asarray(y)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, np.empty((len(y), 1)))
        tyings, localities = self._strengths(base, X, y, sample_weight)
        cv = check_cv(self.cv, y, classifier=is_classifier(base))
        folds = list(cv.split(X, y))
        start = time.perf_counter()
        # folds in one job move along the path together (one batched model per point)
        n_groups = min(effective_n_jobs(self.n_jobs), len(folds))
        groups = [[folds[i] for i in g] for g in np.array_split(np.arange(len(folds)), n_groups)]
        starts = [None] * n_groups
        if tyings is None:  # the grid's top: the largest training fold's tying_max at its CNN limit
            fitted = Parallel(n_jobs=self.n_jobs)(
                delayed(_fold_starts)(base, X, y, sample_weight, g, localities[0]) for g in groups
            )
            starts = [ests for ests, _ in fitted]
            top = float(np.max([m for _, maxima in fitted for m in maxima]))  # NaN propagates, then raises
            tyings = _geometric_grid(top, "tying", n_values=int(self.tyings), eps=self.eps)
        results = Parallel(n_jobs=self.n_jobs)(
            delayed(_fold_paths)(base, X, y, sample_weight, g, tyings, localities, self.scoring,
                                 self.path_n_iter_no_change, started)
            for g, started in zip(groups, starts)
        )
        cv_time = time.perf_counter() - start
        scores = np.stack([s for r in results for s in r], axis=2)  # (n_localities, n_tyings, n_folds)
        index_min = select_strengths(scores, tyings, localities, "min")
        index_1se = select_strengths(scores, tyings, localities, "1se")
        chosen = index_min if self.selection == "min" else index_1se

        if self.refit:
            best = clone(base).set_params(tying=tyings[chosen[1]], locality=localities[chosen[0]])
            best.fit(X, y, sample_weight=sample_weight)  # its warnings reach the user
            set_fitted_state(self, fitted_state(best))
        else:
            self.n_features_in_ = template.n_features_in_
            if hasattr(template, "feature_names_in_"):
                self.feature_names_in_ = template.feature_names_in_
        self.tyings_, self.localities_ = tyings, localities
        self.scores_path_ = scores
        self.index_min_, self.index_1se_ = index_min, index_1se
        self.tying_, self.locality_ = float(tyings[chosen[1]]), float(localities[chosen[0]])
        self.best_score_ = float(scores[chosen].mean())
        self.cv_results_ = _cv_results(scores, tyings, localities)
        self.cv_time_ = cv_time
        return self

    @available_if(lambda self: False)
    def partial_fit(self, X, y, **kwargs):
        """Not available: a CV estimator refits a grid, it does not learn incrementally."""


def _quiet_fit(est, X, y, sample_weight):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y, sample_weight=sample_weight)


def _cv_results(scores, tyings, localities) -> dict:
    """A ``GridSearchCV``-style ``cv_results_`` (one row per tying x locality)."""
    n_loc, n_ty, n_folds = scores.shape
    flat = scores.reshape(n_loc * n_ty, n_folds)
    mean, std = flat.mean(1), flat.std(1)
    order = np.argsort(-mean, kind="stable")
    rank = np.empty(len(mean), dtype=np.int32)
    rank[order] = np.arange(1, len(mean) + 1)
    params = [{"tying": float(t), "locality": float(l)} for l in localities for t in tyings]
    out = {
        "param_tying": np.array([p["tying"] for p in params]),
        "param_locality": np.array([p["locality"] for p in params]),
        "params": params,
        "mean_test_score": mean,
        "std_test_score": std,
        "rank_test_score": rank,
    }
    for k in range(n_folds):
        out[f"split{k}_test_score"] = flat[:, k]
    return out


def _make_init(base: type):
    """An ``__init__`` whose signature is the CV parameters plus every base parameter.

    scikit-learn reads parameters from the signature; generating it keeps the
    base estimator's parameters in one place.
    """
    base_sig = inspect.signature(base.__init__)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in _CV_PARAMS.items()]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in base_sig.parameters.items() if n != "self"]
    signature = inspect.Signature(params)

    def __init__(self, **kwargs):
        bound = signature.bind(self, **kwargs)
        bound.apply_defaults()
        for name, value in list(bound.arguments.items())[1:]:
            setattr(self, name, value)

    __init__.__signature__ = signature
    return __init__


_CV_DOC = """
    Parameters
    ----------
    tyings : int or array-like, default=10
        Tying strengths: an int builds a geometric grid of that many values
        from a data-driven maximum down to ``eps`` times it. The maximum is
        the condition of :func:`softcnn.limits.tying_max` (exact for
        lasso-type tying), evaluated as the fitted ``tying_max_`` is: unless
        ``localities`` is an int, at each training fold's CNN-limit fit
        (where its path starts; a short reference fit warm-started from it
        only where that fit does not solve the reference problem, e.g. with
        ``early_stopping``, other non-smooth penalties or snapping), the
        largest over the folds; with a data-driven locality grid, on all data.
    localities : None, int or array-like, default=None
        Locality strengths likewise; None keeps the single value ``locality``.
    cv : int, cross-validation generator or iterable, default=5
        As :func:`sklearn.model_selection.check_cv` (stratified for classifiers).
    scoring : str or callable, default=None
        Validation score (higher is better); the estimator's ``score`` when None.
    selection : {'min', '1se'}, default='min'
        ``'min'``: the best mean score. ``'1se'``: glmnet's rule, the strongest
        tying within one standard error of the best.
    eps : float, default=1e-3
        Smallest to largest strength of generated grids.
    n_jobs : int, default=None
        Folds fitted in parallel with joblib (any joblib backend, e.g. Dask).
    refit : bool, default=True
        Refit on all data with the chosen strengths; the object then predicts.
    path_n_iter_no_change : int or None, default=4
        L-BFGS's patience at the paths' warm-started points, at most
        ``n_iter_no_change`` (None: ``n_iter_no_change``); see
        :func:`softcnn.soft_conv_path`. The refit uses ``n_iter_no_change``.
    **base parameters
        Every parameter of the base estimator (``channels``, ``kernel_size``,
        ``tying_penalty``, ``solver``, ...); ``tying``/``locality`` serve only
        when the matching grid is None.

    Attributes
    ----------
    tying_, locality_ : float
        Chosen strengths.
    tyings_, localities_ : ndarray
        The grids, strong to weak.
    scores_path_ : ndarray of shape (n_localities, n_tyings, n_folds)
        Validation score of every grid point on every fold.
    index_min_, index_1se_ : tuple of int
        ``(i_locality, i_tying)`` of the 'min' and '1se' choices.
    best_score_ : float
        Mean CV score at the chosen point.
    cv_results_ : dict
        ``GridSearchCV``-style results (``params``, ``mean_test_score``,
        ``std_test_score``, ``rank_test_score``, ``split{k}_test_score``).
    cv_time_ : float
        Seconds spent fitting the fold paths.
    network_, n_features_in_, ... : see the base estimator
        After the refit, every fitted attribute of the base estimator.

    Notes
    -----
    Each fold fits one warm-started path per locality, tyings from strong to
    weak (:func:`softcnn.soft_conv_path`); the folds given to one joblib job
    move along the path together, their fits at each point solved as one
    stacked model (:func:`softcnn.batched.fit_together`: per-model L-BFGS
    state and stopping; one ``vmap`` evaluation on GPUs). Validation scores
    use the validation fold's sample weights.
"""


class SoftConvClassifierCV(_BaseSoftConvCV, SoftConvClassifier):
    __doc__ = (
        """:class:`SoftConvClassifier` with tying (and locality) chosen by cross-validation.
"""
        + _CV_DOC
        + """
    See Also
    --------
    SoftConvClassifier, softcnn.soft_conv_path, sklearn.linear_model.LogisticRegressionCV

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from softcnn import SoftConvClassifierCV
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = SoftConvClassifierCV(channels=2, tyings=[1.0, 1e-3], cv=3, random_state=0)
    >>> clf.fit(X[:150] / 16, y[:150]).tying_ in (1.0, 1e-3)
    True
    """
    )
    _base_class = SoftConvClassifier
    __init__ = _make_init(SoftConvClassifier)


class SoftConvRegressorCV(_BaseSoftConvCV, SoftConvRegressor):
    __doc__ = (
        """:class:`SoftConvRegressor` with tying (and locality) chosen by cross-validation.
"""
        + _CV_DOC
        + """
    See Also
    --------
    SoftConvRegressor, softcnn.soft_conv_path, sklearn.linear_model.RidgeCV
    """
    )
    _base_class = SoftConvRegressor
    __init__ = _make_init(SoftConvRegressor)
