"""tying_max / locality_max: where every deviation (far weight) becomes exactly zero."""

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from softcnn import SoftConvRegressor
from softcnn.datasets import make_soft_conv_data
from softcnn.limits import locality_max, tying_max


@pytest.fixture(scope="module")
def data():
    X, y, _ = make_soft_conv_data(80, (5, 5), teacher="regions", task="regression", random_state=0)
    return X, y


def fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def max_deviation(est):
    return float(est.network_.soft_layers[0].masked_deviation().detach().abs().max())


def test_tying_max_l1_mean_is_exact(data):
    X, y = data
    est = SoftConvRegressor(channels=1, activation="identity", alpha=1e-2, tying_penalty="l1", support=3,
                            max_iter=1500, tol=1e-9, random_state=0)
    tm = tying_max(est, X, y)
    assert np.isfinite(tm) and tm > 0
    above = fit(est.set_params(tying=1.01 * tm), X, y)
    assert max_deviation(above) == 0.0
    below = fit(est.set_params(tying=0.5 * tm), X, y)
    assert max_deviation(below) > 1e-3


def test_tying_max_grid_is_a_sufficient_bound(data):
    X, y = data
    est = SoftConvRegressor(channels=1, activation="identity", alpha=1e-2, tying_penalty="l1",
                            tying_graph="grid", support=3, max_iter=400, tol=1e-9, random_state=0)
    tm = tying_max(est, X, y)
    above = fit(est.set_params(tying=1.01 * tm), X, y)
    assert max_deviation(above) < 1e-8  # tv_prox ties up to its dual tolerance
    below = fit(est.set_params(tying=0.5 * tm), X, y)
    assert max_deviation(below) > 1e-3


@pytest.mark.parametrize("penalty,graph", [("group", "mean"), ("l1", "all"), ("group", "grid"), ("l2", "mean"),
                                           ("l2", "grid")])
def test_tying_max_is_finite_positive_for_every_penalty(data, penalty, graph):
    X, y = data
    est = SoftConvRegressor(channels=1, tying_penalty=penalty, tying_graph=graph, support=3, max_iter=50,
                            random_state=0)
    tm = tying_max(est, X, y)
    assert np.isfinite(tm) and tm > 0


def test_tying_max_all_matches_the_mean_graph_scale(data):
    """The pairwise penalty charges each pair 1/(L-1): its limit is of the order of the mean graph's."""
    X, y = data
    base = dict(channels=1, activation="identity", alpha=1e-2, support=3, max_iter=200, random_state=0)
    t_mean = tying_max(SoftConvRegressor(tying_penalty="l1", **base), X, y)
    t_all = tying_max(SoftConvRegressor(tying_penalty="l1", tying_graph="all", **base), X, y)
    # |S_1| / (1 (n-1)) * L (L-1) = L max|G| when a single position carries the gradient; sums only add
    assert 0.25 * t_mean <= t_all <= 2 * t_mean * 25


def test_locality_max_l1_zeroes_far_weights(data):
    X, y = data
    est = SoftConvRegressor(channels=1, activation="identity", alpha=1e-2, locality_penalty="l1", support=5,
                            max_iter=400, tol=1e-9, random_state=0)
    lm = locality_max(est, X, y)
    assert np.isfinite(lm) and lm > 0
    below = fit(est.set_params(locality=0.5 * lm), X, y)
    far_ratio_below = below.locality_ratio_
    above = fit(est.set_params(locality=1.5 * lm), X, y)
    assert above.locality_ratio_ == 0.0
    assert far_ratio_below > 1e-4
    for pen in ("l2", "rings"):
        v = locality_max(est.set_params(locality_penalty=pen, max_iter=50), X, y)
        assert np.isfinite(v) and v > 0


def test_l2_maxima_start_the_path_at_the_limit():
    """For ridge-type penalties the returned strength is where the fit is (nearly) at the limit:
    the linearised largest deviation is 1% of the largest weight, so the energy share is ~1e-4."""
    from sklearn.datasets import load_digits

    from softcnn import SoftConvClassifier
    from softcnn.limits import locality_max, tying_max

    X, y = load_digits(return_X_y=True)
    X, y = X[:300] / 16, y[:300]
    est = SoftConvClassifier(channels=4, max_iter=100, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t_max, l_max = tying_max(est, X, y), locality_max(est, X, y)
        at_t = clone(est).set_params(tying=t_max).fit(X, y)
        below_t = clone(est).set_params(tying=t_max / 100).fit(X, y)
        at_l = clone(est).set_params(locality=l_max).fit(X, y)
    assert at_t.tying_deviation_ < 1e-3 < below_t.tying_deviation_
    assert at_l.locality_ratio_ < 1e-3


@pytest.mark.parametrize("penalty,graph", [("l1", "mean"), ("group", "mean"), ("l1", "all")])
def test_tying_max_is_exact_along_a_path_from_the_cnn(data, penalty, graph):
    """Like lasso's alpha_max: at the CNN solution, zero deviation stays optimal down to tying_max.

    The model is bilinear (kernel x read-out), so a cold fit may reach another local solution
    where the bound does not apply; the path warm-starts from the CNN, as ``soft_conv_path`` does.
    """
    X, y = data
    est = SoftConvRegressor(channels=1, activation="identity", alpha=1e-2, tying_penalty=penalty,
                            tying_graph=graph, support=3, max_iter=1500, tol=1e-9, random_state=0,
                            warm_start=True)
    tm = tying_max(est, X, y)
    fit(est.set_params(tying=100 * tm), X, y)
    fit(est.set_params(tying=1.01 * tm), X, y)
    assert est.n_tied_positions_ == [25]  # every position has exactly the shared kernel
    fit(est.set_params(tying=0.5 * tm), X, y)
    assert est.n_tied_positions_[0] < 25 and est.tying_deviation_ > 1e-3
