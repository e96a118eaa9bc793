"""tying_max / locality_max: where every deviation (far weight) becomes exactly zero."""

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from softcnn import SoftConvRegressor, limits
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


@pytest.mark.parametrize("support", [3, "full"])  # 'full': the compact storage of deviations
def test_tying_max_l1_mean_is_exact(data, support):
    X, y = data
    est = SoftConvRegressor(channels=1, activation="identity", alpha=1e-2, tying_penalty="l1", support=support,
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


@pytest.mark.parametrize("support", [5, "full"])
def test_locality_max_l1_zeroes_far_weights(data, support):
    X, y = data
    est = SoftConvRegressor(channels=1, activation="identity", alpha=1e-2, locality_penalty="l1", support=support,
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


# ------------------------------------------------------- the fitted tying_max_
# the setting of test_tying_max_l1_mean_is_exact: one channel, identity activation, tight fits
L1_MEAN = dict(channels=1, activation="identity", alpha=1e-2, tying_penalty="l1", support=3, max_iter=1500,
               tol=1e-9)


def test_tying_max_attribute_is_tying_max_computed_from_the_fit(data, monkeypatch):
    X, y = data
    est = SoftConvRegressor(random_state=4, **L1_MEAN)
    tm = tying_max(est, X, y)
    # Agreement to rel=1e-5: the reference problem is bilinear (kernel x read-out), so it has several
    # stationary points, each with its own tying_max; with this seed the cold reference fit of tying_max
    # and the fits below reach the same one, and the two values then differ only through the solvers'
    # stopping rules (L-BFGS at tol 1e-7 there, tol=1e-9 here), about 1e-6 relative.
    real_reference_fit = limits._reference_fit

    def no_reference_fit(*args, **kwargs):
        raise AssertionError("the tied fit is its own reference solution")

    monkeypatch.setattr(limits, "_reference_fit", no_reference_fit)
    tied = fit(clone(est).set_params(tying=2 * tm), X, y)
    assert tied.n_tied_positions_ == [25]
    assert tied.tying_max_ == pytest.approx(tm, rel=1e-5)
    monkeypatch.setattr(limits, "_reference_fit", real_reference_fit)
    # not the reference solution: early stopping fitted 90% of the data (tying_max uses all of them), a
    # non-smooth channel penalty changes the objective; a reference fit starts from the fitted kernels
    for extra in (dict(early_stopping=True), dict(channel_sparsity=1e-6)):
        other = fit(clone(est).set_params(tying=2 * tm, **extra), X, y)
        assert other.n_tied_positions_ == [25]
        assert other.tying_max_ == pytest.approx(tm, rel=1e-5)


def test_tying_max_attribute_is_where_every_deviation_vanishes(data):
    X, y = data
    est = fit(SoftConvRegressor(tying=1.0, warm_start=True, random_state=0, **L1_MEAN), X, y)
    tm = est.tying_max_
    assert est.n_tied_positions_ == [25] and 0 < tm < 1.0
    # Refits start from this CNN solution (warm_start), as along a path: a cold refit may reach another
    # stationary point of the tied problem, which has its own tying_max (see the test above).
    fit(est.set_params(tying=1.01 * tm), X, y)
    assert max_deviation(est) == 0.0
    fit(est.set_params(tying=0.5 * tm), X, y)
    assert max_deviation(est) > 1e-3
    assert est.tying_max_ == tm  # same data, same reference problem: reused, not recomputed


def test_tying_max_attribute_sees_weights_as_repeated_samples(data):
    X, y = data
    w = np.ones(len(y))
    w[:10] = 2.0
    X2, y2 = np.concatenate([X, X[:10]]), np.concatenate([y, y[:10]])
    base = dict(channels=1, activation="identity", tying_penalty="l1", support=3, max_iter=100, random_state=0)
    for tying in (1.0, 0.01):  # tied (evaluated on the fit), not tied (a warm-started reference fit)
        est = SoftConvRegressor(tying=tying, **base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            weighted = clone(est).fit(X, y, sample_weight=w)
            repeated = clone(est).fit(X2, y2)
        assert weighted.tying_max_ == pytest.approx(repeated.tying_max_, rel=1e-9)


def test_tying_max_attribute_only_describes_l1_and_group_fits(data):
    X, y = data
    est = fit(SoftConvRegressor(channels=1, support=3, tying=0.1, max_iter=20, random_state=0), X, y)
    assert not hasattr(est, "tying_max_")  # 'l2' tying: no finite strength ties exactly
    fit(est.set_params(tying_penalty="group"), X, y)
    assert est.tying_max_ > 0
    fit(est.set_params(tying_penalty="l2"), X, y)
    assert not hasattr(est, "tying_max_")  # not left over from the previous fit
    fit(est.set_params(tying_penalty="l1", solver="adam"), X, y)
    assert est.tying_max_ > 0
    est.partial_fit(X, y)
    assert not hasattr(est, "tying_max_")  # the weights changed on a batch: it no longer describes them


def test_tying_max_attribute_adds_no_warning_and_a_failure_changes_nothing(data, monkeypatch):
    X, y = data
    est = SoftConvRegressor(channels=1, support=3, tying=0.01, tying_penalty="l1", max_iter=5, random_state=0)
    with pytest.warns(ConvergenceWarning) as record:
        est.fit(X, y)  # the warm-started reference fit, also at max_iter=5, does not converge either
    assert len(record) == 1 and hasattr(est, "tying_max_")
    before = dict(vars(est))

    def fail(*args, **kwargs):
        raise RuntimeError("no reference")

    monkeypatch.setattr(limits, "_tying_max_at", fail)
    with pytest.raises(RuntimeError, match="no reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    assert vars(est).keys() == before.keys()
    assert all(vars(est)[k] is v for k, v in before.items())  # the fit is atomic
