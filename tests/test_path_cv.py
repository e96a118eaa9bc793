"""Regularization paths and the cross-validated estimators."""

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from softcnn import (
    SoftConvClassifier,
    SoftConvClassifierCV,
    SoftConvRegressor,
    SoftConvRegressorCV,
    soft_conv_path,
)
from softcnn.cv import select_strengths
from softcnn.datasets import make_soft_conv_data
from softcnn import limits
from softcnn.limits import _freeze_deviations
from softcnn.path import PATH_N_ITER_NO_CHANGE


@pytest.fixture(scope="module")
def cnn_data():
    X, y, _ = make_soft_conv_data(120, (6, 6), teacher="cnn", noise=0.2, random_state=0)
    return X, y


# ------------------------------------------------------------------ path
def test_path_goes_from_strong_to_weak_and_loosens_the_ties(cnn_data):
    X, y = cnn_data
    est = SoftConvRegressor(channels=2, max_iter=100, random_state=0)
    path = soft_conv_path(est, X, y, values=[1e-3, 10.0, 0.1], validation_fraction=0.25)
    np.testing.assert_array_equal(path.values, [10.0, 0.1, 1e-3])
    assert len(path) == 3 and path.grid_shape is None
    # weaker tying: kernels deviate more from the shared one
    assert np.all(np.diff(path.tying_deviation) > 0)
    assert path.tying_deviation[0] < 1e-3
    # warm-started descent: J_weak(θ_weak) <= J_weak(θ_strong) <= J_strong(θ_strong)
    assert np.all(np.diff(path.train_loss) <= 1e-12)
    assert path.validation_score.shape == (3,) and np.all(np.isfinite(path.validation_score))
    assert est.get_params()["tying"] == 0.0 and not hasattr(est, "network_")  # the template is untouched


def test_path_points_equal_warm_started_fits(cnn_data):
    """The first point is warm-started from the CNN limit, each later one from the previous point,
    with L-BFGS's patience capped at PATH_N_ITER_NO_CHANGE."""
    X, y = cnn_data
    est = SoftConvRegressor(channels=2, max_iter=50, random_state=0)
    path = soft_conv_path(est, X, y, values=[1.0, 0.01], return_weights=True)
    by_hand = clone(est).set_params(warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        by_hand._fit(X, y, None, incremental=False, _constrain=_freeze_deviations)  # the CNN limit
        assert by_hand.tying_deviation_ < 1e-12
        for t in (1.0, 0.01):
            by_hand.set_params(tying=t, n_iter_no_change=PATH_N_ITER_NO_CHANGE).fit(X, y)
    state = by_hand.network_.state_dict()
    for k, v in path.weights[-1].items():
        np.testing.assert_array_equal(v.numpy(), state[k].numpy())
    assert path.validation_score is None


def test_two_dimensional_grid(cnn_data):
    X, y = cnn_data
    est = SoftConvRegressor(channels=2, max_iter=30, random_state=0)
    path = soft_conv_path(est, X, y, param=("tying", "locality"), values=([1.0, 0.01], [10.0, 0.0, 0.1]),
                          X_val=X[:30], y_val=y[:30])
    assert path.grid_shape == (3, 2) and path.values.shape == (6, 2)
    table = path.values.reshape(*path.grid_shape, 2)
    np.testing.assert_array_equal(table[..., 0], [[1.0, 0.01]] * 3)
    np.testing.assert_array_equal(table[:, 0, 1], [10.0, 0.1, 0.0])
    ratio = path.locality_ratio.reshape(path.grid_shape)
    assert np.all(ratio[0] < ratio[-1])  # strong locality keeps weights inside the window


def test_path_errors(cnn_data):
    X, y = cnn_data
    est = SoftConvRegressor(channels=2)
    with pytest.raises(ValueError, match="not a parameter"):
        soft_conv_path(est, X, y, param="tyingg", values=[1.0])
    with pytest.raises(ValueError, match=">= 0"):
        soft_conv_path(est, X, y, values=[1.0, -1.0])
    with pytest.raises(ValueError, match="pass values"):
        soft_conv_path(est, X, y, param="alpha")


# -------------------------------------------------------------- selection
def test_one_standard_error_rule_by_hand():
    tyings = np.array([10.0, 1.0, 0.1])
    localities = np.array([0.0])
    # fold scores: best mean at tying 0.1 (0.90); tying 1.0 within one SE; 10 is not
    scores = np.array([[[0.70, 0.72, 0.68], [0.88, 0.90, 0.89], [0.88, 0.92, 0.90]]])
    assert select_strengths(scores, tyings, localities, "min") == (0, 2)
    se = scores[0, 2].std(ddof=1) / np.sqrt(3)
    assert scores[0, 1].mean() >= 0.90 - se
    assert select_strengths(scores, tyings, localities, "1se") == (0, 1)


@pytest.mark.parametrize("seed", range(5))
def test_1se_never_picks_weaker_tying_than_min(seed):
    rng = np.random.RandomState(seed)
    tyings, localities = np.geomspace(10, 1e-3, 6), np.array([1.0, 0.1])
    scores = rng.normal(0.8, 0.05, size=(2, 6, 5))
    i_min, j_min = select_strengths(scores, tyings, localities, "min")
    i_1se, j_1se = select_strengths(scores, tyings, localities, "1se")
    assert tyings[j_1se] >= tyings[j_min]


# -------------------------------------------------------------------- CV
def test_classifier_cv_selects_refits_and_predicts_like_its_refit():
    X, y, _ = make_soft_conv_data(90, (6, 6), teacher="cnn", task="classification", random_state=1)
    cv = SoftConvClassifierCV(channels=2, tyings=[1.0, 0.01, 1e-4], cv=3, max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv.fit(X, y)
    assert cv.scores_path_.shape == (1, 3, 3)
    np.testing.assert_array_equal(cv.tyings_, [1.0, 0.01, 1e-4])
    assert cv.tying_ == cv.tyings_[cv.index_min_[1]]
    assert cv.best_score_ == pytest.approx(cv.scores_path_[cv.index_min_].mean())
    res = cv.cv_results_
    assert len(res["params"]) == 3 and set(res["rank_test_score"]) == {1, 2, 3}
    np.testing.assert_allclose(res["mean_test_score"], cv.scores_path_[0].mean(1))
    assert res["params"][int(np.argmin(res["rank_test_score"]))]["tying"] == cv.tying_
    refit = SoftConvClassifier(channels=2, tying=cv.tying_, max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        refit.fit(X, y)
    np.testing.assert_array_equal(cv.predict_proba(X), refit.predict_proba(X))
    assert not hasattr(cv, "partial_fit")


def test_regressor_cv_grid_with_1se_and_no_refit(cnn_data):
    X, y = cnn_data
    kw = dict(channels=2, tyings=[1.0, 0.01], localities=[1.0, 0.0], cv=KFold(3), max_iter=30, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = SoftConvRegressorCV(selection="1se", **kw).fit(X, y)
        b = SoftConvRegressorCV(selection="min", refit=False, **kw).fit(X, y)
    assert a.scores_path_.shape == (2, 2, 3)
    np.testing.assert_array_equal(a.scores_path_, b.scores_path_)
    assert a.tying_ >= b.tying_
    assert not hasattr(b, "network_") and b.n_features_in_ == 36
    assert a.predict(X).shape == (120,)


def test_data_driven_tying_grid_starts_at_the_largest_training_fold_tying_max(cnn_data, monkeypatch):
    """tyings=int: the grid's top is tying_max_ at each training fold's CNN limit, the largest over the
    folds; no reference fit on all data (tying_max) unless a data-driven locality grid needs one."""
    X, y = cnn_data
    folds = list(KFold(3).split(X))
    base = dict(channels=2, tying_penalty="l1", max_iter=60, random_state=0)
    calls = []
    real_tying_max = limits.tying_max
    monkeypatch.setattr(limits, "tying_max", lambda *a, **k: calls.append(1) or real_tying_max(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv = SoftConvRegressorCV(tyings=3, eps=1e-2, cv=folds, refit=False, **base).fit(X, y)
        in_two_jobs = SoftConvRegressorCV(tyings=3, eps=1e-2, cv=folds, refit=False, n_jobs=2, **base).fit(X, y)
        assert not calls
        maxima = []
        for train, _ in folds:  # by hand: the CNN limit of the training fold, then its tying_max_
            cnn = SoftConvRegressor(warm_start=True, **base).set_params(tying=0.0)
            cnn._fit(X[train], y[train], None, incremental=False, _constrain=_freeze_deviations)
            maxima.append(limits._fitted_tying_max(cnn, X[train], y[train])[0])
        SoftConvRegressorCV(tyings=2, localities=[1.0, 0.0], cv=folds, refit=False, **base).fit(X, y)
        assert not calls  # explicit localities: the folds' starts still give the tying grid
        SoftConvRegressorCV(tyings=2, localities=2, cv=folds, refit=False, **base).fit(X, y)
        assert len(calls) == 1  # a data-driven locality grid: both grids from all data
    assert len(set(maxima)) == 3  # the folds disagree, so taking the largest matters
    top = max(maxima)
    np.testing.assert_allclose(cv.tyings_, [top, top / 10, top / 100], rtol=1e-12)
    # the paths continue from the starts made in the jobs (returned to the parent and sent back)
    np.testing.assert_array_equal(in_two_jobs.tyings_, cv.tyings_)
    np.testing.assert_array_equal(in_two_jobs.scores_path_, cv.scores_path_)


def test_path_patience_is_a_parameter(cnn_data):
    """path_n_iter_no_change=None: warm points keep the estimator's n_iter_no_change (11 iterations
    where every iteration gains less than tol); the default caps it; bad values fail before fitting."""
    X, y = cnn_data
    est = SoftConvRegressor(channels=2, max_iter=200, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        capped = soft_conv_path(est, X, y, values=[1.0, 0.5, 0.25])
        uncapped = soft_conv_path(est, X, y, values=[1.0, 0.5, 0.25], path_n_iter_no_change=None)
    assert np.all(capped.n_iter <= uncapped.n_iter) and np.any(capped.n_iter < uncapped.n_iter)
    assert np.all(uncapped.n_iter >= est.n_iter_no_change + 1)
    for bad in (0, 2.5, "4"):
        with pytest.raises((ValueError, TypeError), match="path_n_iter_no_change"):
            soft_conv_path(est, X, y, values=[1.0], path_n_iter_no_change=bad)
        with pytest.raises((ValueError, TypeError), match="path_n_iter_no_change"):
            SoftConvRegressorCV(tyings=[1.0], path_n_iter_no_change=bad).fit(X, y)


def test_data_driven_path_over_tying_starts_at_its_cnn_limit_tying_max(cnn_data, monkeypatch):
    X, y = cnn_data
    base = dict(channels=2, tying_penalty="l1", max_iter=60, random_state=0)
    monkeypatch.setattr(limits, "tying_max", lambda *a, **k: pytest.fail("a reference fit on all data"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        path = soft_conv_path(SoftConvRegressor(**base), X, y, n_values=3, eps=1e-2)
        cnn = SoftConvRegressor(warm_start=True, **base).set_params(tying=0.0)
        cnn._fit(X, y, None, incremental=False, _constrain=_freeze_deviations)
        top = limits._fitted_tying_max(cnn, X, y)[0]
    np.testing.assert_allclose(path.values, [top, top / 10, top / 100], rtol=1e-12)
    assert path.tying_deviation[0] == 0.0  # 'l1' at its tying_max: the CNN, exactly


def test_cv_in_pipeline_and_in_grid_search(cnn_data):
    X, y = cnn_data
    pipe = make_pipeline(
        FunctionTransformer(lambda Z: Z / np.abs(Z).max()),
        SoftConvRegressorCV(channels=1, tyings=[1.0, 0.01], cv=2, max_iter=20, random_state=0),
    )
    search = GridSearchCV(pipe, {"softconvregressorcv__kernel_size": [1, 3]}, cv=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X.reshape(len(X), -1), y)
    assert search.best_params_["softconvregressorcv__kernel_size"] in (1, 3)
    assert np.isfinite(search.score(X.reshape(len(X), -1), y))


def test_cv_runs_under_dask_on_a_local_cluster(cnn_data):
    distributed = pytest.importorskip("dask.distributed", reason="dask[distributed] is in the test extra")
    import joblib

    X, y = cnn_data
    kw = dict(channels=2, tyings=[1.0, 0.01], cv=2, max_iter=20, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = SoftConvRegressorCV(**kw).fit(X, y)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", dashboard_address=None) as cluster:
            with distributed.Client(cluster):
                with joblib.parallel_backend("dask"):
                    remote = SoftConvRegressorCV(n_jobs=2, **kw).fit(X, y)
    np.testing.assert_array_equal(remote.scores_path_, local.scores_path_)
    assert remote.tying_ == local.tying_


@parametrize_with_checks(
    [
        SoftConvClassifierCV(tyings=[1.0, 1e-3], cv=2, max_iter=50, random_state=0),
        SoftConvRegressorCV(tyings=[1.0, 1e-3], cv=2, max_iter=50, random_state=0),
    ],
    legacy=True,
)
def test_cv_estimators_pass_sklearn_checks(estimator, check):
    check(estimator)
