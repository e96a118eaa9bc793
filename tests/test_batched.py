"""Many models as one: stacked fits give the fits one would get one at a time."""

import warnings

import numpy as np
import pytest
import torch
from joblib import parallel_backend
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold

from softcnn import SoftConvClassifier, SoftConvClassifierCV, SoftConvRegressor
from softcnn import batched
from softcnn.batched import StackedProblem, can_stack, fit_together
from softcnn.datasets import load_digits_images, make_soft_conv_data
from softcnn.limits import _freeze_deviations
from softcnn.solvers import lbfgs, lbfgs_models


@pytest.fixture(scope="module")
def folds():
    X, y = load_digits_images(return_X_y=True)
    X, y = X[:240], y[:240]
    splits = list(StratifiedKFold(3).split(X, y))
    return [X[tr] for tr, _ in splits], [y[tr] for tr, _ in splits]


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn()


def weights(est):
    return torch.cat([p.detach().reshape(-1) for p in est.network_.parameters()]).numpy()


def prepared(ests, Xs, ys):
    return [est._prepare_fit(X, y, None, incremental=False).objective for est, X, y in zip(ests, Xs, ys)]


def test_stacked_fits_are_the_one_at_a_time_fits(folds):
    """On the CPU each model is evaluated on its own inside the shared run: bitwise the same fits."""
    Xs, ys = folds
    # different strengths in one stack: each model has its own penalties and preconditioner
    ests = [SoftConvClassifier(channels=3, tying=t, max_iter=40, random_state=0) for t in (10.0, 1e-2, 0.0)]
    assert can_stack(prepared([clone(e) for e in ests], Xs, ys))
    alone = [quiet(lambda e=e, X=X, y=y: clone(e).fit(X, y)) for e, X, y in zip(ests, Xs, ys)]
    together = quiet(lambda: fit_together([clone(e) for e in ests], Xs, ys))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(weights(a), weights(b))
        assert a.n_iter_ == b.n_iter_ and a.loss_ == b.loss_ and a.loss_curve_ == b.loss_curve_


def test_vectorized_evaluation_matches_the_models_own(folds):
    """The vmap'd (K, P) evaluation gives every model's own J and gradient (to round-off)."""
    Xs, ys = folds
    ests = [SoftConvClassifier(channels=3, tying=t, random_state=k) for k, t in enumerate((1.0, 1e-2, 0.0))]
    objectives = prepared(ests, Xs, ys)
    stacked = StackedProblem(objectives, vectorize=True)
    x = stacked.read()
    value, grad = stacked.value_and_grad(x, torch.arange(3))
    one_by_one = StackedProblem(objectives, vectorize=False).value_and_grad(x, torch.arange(3))
    np.testing.assert_allclose(value.numpy(), one_by_one[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), one_by_one[1].numpy(), rtol=1e-9, atol=1e-13)
    # a subset of models (those still running) is evaluated alone
    v_sub, g_sub = stacked.value_and_grad(x[[0, 2]], torch.tensor([0, 2]))
    np.testing.assert_allclose(v_sub.numpy(), value[[0, 2]].numpy(), rtol=1e-12)


def test_vectorized_solver_run_matches_one_at_a_time_runs(folds):
    """Stated tolerance: after 15 L-BFGS iterations, weights agree to 1e-6 relative (round-off only)."""
    Xs, ys = folds
    ests = [SoftConvClassifier(channels=3, tying=t, random_state=0) for t in (1.0, 1e-3)]
    stacked = StackedProblem(prepared(ests, Xs[:2], ys[:2]), vectorize=True)
    results = lbfgs_models(stacked, max_iter=15, tol=1e-4)
    for k, est in enumerate(ests):
        objective = prepared([clone(est)], Xs[k : k + 1], ys[k : k + 1])[0]
        params = list(objective.net.parameters())
        alone = lbfgs(objective, params, max_iter=15, tol=1e-4)
        assert alone.n_iter == results[k].n_iter
        w_alone = torch.cat([p.detach().reshape(-1) for p in params])
        w_stacked = torch.cat([p.detach().reshape(-1) for p in stacked.objectives[k].net.parameters()])
        np.testing.assert_allclose(w_stacked.numpy(), w_alone.numpy(), rtol=1e-6, atol=1e-9)


def test_each_model_stops_on_its_own():
    """Per-model convergence: a model that converges early stops there; the others run on."""
    X, y, _ = make_soft_conv_data(60, (5, 5), task="regression", random_state=0)
    easy = SoftConvRegressor(channels=1, alpha=10.0, tying=10.0, tol=1e-3, max_iter=200, random_state=0)
    hard = SoftConvRegressor(channels=1, alpha=1e-6, tying=0.0, tol=1e-12, max_iter=60, random_state=0)
    alone = [quiet(lambda e=e: clone(e).fit(X, y)) for e in (easy, hard)]
    together = quiet(lambda: fit_together([clone(easy), clone(hard)], [X, X], [y, y]))
    assert alone[0].n_iter_ < alone[1].n_iter_ == 60
    assert [e.n_iter_ for e in together] == [e.n_iter_ for e in alone]


def test_the_memory_budget_splits_the_stack(folds, monkeypatch):
    Xs, ys = folds
    ests = [SoftConvClassifier(channels=3, max_iter=2, random_state=0) for _ in Xs]
    problems = [(e, e._prepare_fit(X, y, None, incremental=False)) for e, X, y in zip(ests, Xs, ys)]
    need = batched.fit_memory(problems[0][1].objective)
    assert need > 0
    monkeypatch.setattr(batched, "_free_memory", lambda device: int(2.5 * need / batched.MEMORY_SHARE))
    assert [len(g) for g in batched._groups(problems, "auto")] == [2, 1]
    monkeypatch.setattr(batched, "_free_memory", lambda device: 0)
    assert [len(g) for g in batched._groups(problems, "auto")] == [1, 1, 1]
    assert [len(g) for g in batched._groups(problems, True)] == [3]
    assert [len(g) for g in batched._groups(problems, False)] == [1, 1, 1]


def test_fits_that_cannot_be_stacked_run_one_at_a_time(folds):
    Xs, ys = folds
    est = SoftConvClassifier(channels=2, tying=0.1, tying_penalty="l1", max_iter=5, random_state=0)
    assert not can_stack(prepared([clone(est), clone(est)], Xs[:2], ys[:2]))
    alone = [quiet(lambda X=X, y=y: clone(est).fit(X, y)) for X, y in zip(Xs[:2], ys[:2])]
    together = quiet(lambda: fit_together([clone(est), clone(est)], Xs[:2], ys[:2]))
    for a, b in zip(alone, together):
        assert b.solver_ == "fista"
        np.testing.assert_array_equal(weights(a), weights(b))


def test_fits_with_frozen_deviations_are_stacked_and_equal_one_at_a_time(folds):
    """The CNN limit (deviations out of the fit) stacks; a gradient-masked fit does not."""
    Xs, ys = folds
    est = SoftConvClassifier(channels=2, tying=0.0, max_iter=20, random_state=0)

    def problems(constrain):
        return [(e, e._prepare_fit(X, y, None, incremental=False, _constrain=constrain))
                for e, X, y in zip([clone(est) for _ in Xs], Xs, ys)]

    def masked(net):  # the same constraint as a gradient hook
        return [layer.deviation.register_hook(torch.zeros_like) for layer in net.soft_layers]

    assert [len(g) for g in batched._groups(problems(_freeze_deviations), "auto")] == [3]
    assert [len(g) for g in batched._groups(problems(masked), "auto")] == [1, 1, 1]
    alone = [quiet(lambda X=X, y=y: clone(est)._fit(X, y, None, incremental=False,
                                                     _constrain=_freeze_deviations)) for X, y in zip(Xs, ys)]
    together = quiet(lambda: fit_together([clone(est) for _ in Xs], Xs, ys, constrain=_freeze_deviations))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(weights(a), weights(b))
        assert a.n_iter_ == b.n_iter_ and b.tying_deviation_ == 0.0
        layer = b.network_.soft_layers[0]
        assert layer.deviation.requires_grad and not layer.deviation.any()  # back in the model, still zero


def test_a_failing_stacked_fit_changes_no_estimator(folds):
    Xs, ys = folds
    fitted = quiet(lambda: SoftConvClassifier(channels=2, max_iter=3, random_state=0).fit(Xs[0], ys[0]))
    before = weights(fitted)
    bad_y = ys[1].astype(float).copy()
    bad_y[:] = 1.0  # one class: the second fit is refused while preparing
    with pytest.raises(ValueError, match="only one class"):
        fit_together([fitted, clone(fitted)], Xs[:2], [ys[0], bad_y])
    np.testing.assert_array_equal(weights(fitted), before)


def test_cv_with_folds_together_equals_cv_with_a_job_per_fold(folds):
    X, y = load_digits_images(return_X_y=True)
    X, y = X[:150], y[:150]
    kw = dict(channels=2, tyings=[1.0, 1e-3], cv=3, max_iter=15, random_state=0, refit=False)
    together = quiet(lambda: SoftConvClassifierCV(**kw).fit(X, y))
    with parallel_backend("threading", n_jobs=3):
        per_fold = quiet(lambda: SoftConvClassifierCV(**kw, ).set_params(n_jobs=3).fit(X, y))
    np.testing.assert_array_equal(together.scores_path_, per_fold.scores_path_)


# ------------------------------------------------------------------ n_init
def test_more_initialisations_never_end_higher():
    """init 0 is the n_init=1 fit, so the best of several is at most its objective (here: far below)."""
    X, y, _ = make_soft_conv_data(200, (8, 8), n_channels=1, kernel_size=3, noise=0.3, kernel_scale=2.0,
                                  readout="sum", random_state=0)
    base = SoftConvRegressor(channels=1, support=3, pooling="avg", tying=10.0, random_state=0)
    one = quiet(lambda: clone(base).fit(X, y))
    several = quiet(lambda: clone(base).set_params(n_init=4).fit(X, y))
    assert several.loss_ <= one.loss_
    # init 0 starts where n_init=1 starts; the others elsewhere
    starts = [clone(base)._prepare_fit(X, y, None, incremental=False, init=k).objective.net for k in (0, 0, 1)]
    flat = [torch.cat([p.detach().reshape(-1) for p in net.parameters()]) for net in starts]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])


def test_n_init_is_ignored_by_warm_starts_and_accepts_random_state_instances():
    X, y, _ = make_soft_conv_data(60, (5, 5), task="regression", random_state=0)
    est = SoftConvRegressor(channels=1, max_iter=5, n_init=3, warm_start=True,
                            random_state=np.random.RandomState(0))
    assert len(est._init_random_states()) == 3
    quiet(lambda: est.fit(X, y))
    assert len(est._init_random_states()) == 1  # fitted and warm: one initialisation, the previous weights
    with pytest.raises(ValueError, match="n_init"):
        SoftConvRegressor(n_init=0).fit(X, y)
    with pytest.raises(TypeError, match="n_init"):
        SoftConvRegressor(n_init=2.5).fit(X, y)
