"""Behaviour of SoftConvClassifier / SoftConvRegressor beyond sklearn's generic checks."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.base import clone
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from softcnn import DivergenceWarning, SoftConvClassifier, SoftConvRegressor
from softcnn.datasets import make_soft_conv_data

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture(scope="module")
def small_images():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 5, 5))
    y_reg = X[:, 1:4, 1:4].sum(axis=(1, 2))
    y_clf = (y_reg > 0).astype(int)
    return X, y_reg, y_clf


def fit_quietly(est, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(*args, **kwargs)


# ------------------------------------------------------------------ quality
@pytest.mark.slow
def test_default_classifier_reaches_097_on_digits():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16, y, test_size=0.3, stratify=y, random_state=0)
    clf = fit_quietly(SoftConvClassifier(random_state=0), X_train, y_train)
    assert clf.score(X_test, y_test) >= 0.97


@pytest.mark.slow
def test_strong_tying_reaches_the_cnn_and_no_tying_does_not():
    """On data from a CNN teacher: strong tying gives a CNN, tying 0 a clearly unshared model."""
    X, y, info = make_soft_conv_data(100, (6, 6), teacher="cnn", noise=0.3, random_state=0)
    assert info.tying_deviation == 0
    strong = fit_quietly(SoftConvRegressor(channels=2, tying=1e3, random_state=0), X, y)
    free = fit_quietly(SoftConvRegressor(channels=2, tying=0.0, random_state=0), X, y)
    assert strong.tying_deviation_ < 1e-3
    assert free.tying_deviation_ > 0.1
    # the CNN limit is a real fit, not a collapsed one
    assert strong.score(X, y) > 0.8


def test_strong_locality_zeroes_weights_outside_the_window(small_images):
    X, y, _ = small_images
    reg = fit_quietly(SoftConvRegressor(channels=2, locality=1e3, random_state=0), X, y)
    loose = fit_quietly(SoftConvRegressor(channels=2, locality=0.0, random_state=0), X, y)
    assert reg.locality_ratio_ < 1e-3 < loose.locality_ratio_


# ------------------------------------------------------------------- inputs
def test_image_inputs_of_every_form_give_the_same_model(small_images):
    X, y, _ = small_images
    kw = dict(channels=2, max_iter=30, random_state=0)
    a = fit_quietly(SoftConvRegressor(**kw), X, y)
    b = fit_quietly(SoftConvRegressor(**kw), X[:, None], y)
    c = fit_quietly(SoftConvRegressor(**kw), X.reshape(len(X), -1), y)
    d = fit_quietly(SoftConvRegressor(image_shape=(5, 5), **kw), X.reshape(len(X), -1), y)
    for est in (a, b, c, d):
        assert est.n_features_in_ == 25 and est.image_shape_ == (1, 5, 5)
    np.testing.assert_array_equal(a.predict(X), b.predict(X[:, None]))
    np.testing.assert_array_equal(a.predict(X), c.predict(X.reshape(len(X), -1)))
    np.testing.assert_array_equal(a.predict(X), d.predict(X.reshape(len(X), -1)))


def test_multichannel_and_non_square_images():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(40, 3, 4, 6))
    y = X[:, 0, :2, :2].sum(axis=(1, 2))
    reg = fit_quietly(SoftConvRegressor(channels=(2, 3), pooling="max", max_iter=20, random_state=0), X, y)
    assert reg.image_shape_ == (3, 4, 6) and reg.n_features_in_ == 72
    assert [k.shape[2:4] for k in reg.kernels_] == [(2, 3), (3, 2)]
    flat = fit_quietly(
        SoftConvRegressor(channels=2, image_shape=(3, 4, 6), max_iter=5, random_state=0), X.reshape(40, -1), y
    )
    assert flat.predict(X.reshape(40, -1)).shape == (40,)


def test_auto_image_shape_for_non_square_feature_counts():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(30, 7))
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=5, random_state=0), X, X[:, 0])
    assert reg.image_shape_ == (1, 1, 7)


def test_multi_output_regression_and_string_labels(small_images):
    X, y, yc = small_images
    Y = np.column_stack([y, -y, 2 * y])
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=50, random_state=0), X, Y)
    assert reg.predict(X).shape == (60, 3) and reg.n_outputs_ == 3
    assert reg.score(X, Y) > 0.8
    labels = np.array(["cat", "dog", "emu"])[(y > -1).astype(int) + (y > 1).astype(int)]
    clf = fit_quietly(SoftConvClassifier(channels=2, max_iter=50, random_state=0), X, labels)
    assert set(clf.predict(X)) <= set(labels) and list(clf.classes_) == ["cat", "dog", "emu"]
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_allclose(np.log(proba), clf.predict_log_proba(X), atol=1e-10)
    assert clf.decision_function(X).shape == (60, 3)


def test_binary_decision_function_is_one_dimensional(small_images):
    X, _, yc = small_images
    clf = fit_quietly(SoftConvClassifier(channels=2, max_iter=30, random_state=0), X, yc)
    scores = clf.decision_function(X)
    assert scores.shape == (60,)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[(scores > 0).astype(int)])


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_X_is_rejected(small_images, bad):
    X, y, _ = small_images
    X = X.copy()
    X[3, 2, 2] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        SoftConvRegressor().fit(X, y)


def test_errors_name_the_problem_and_the_fix(small_images):
    X, y, yc = small_images
    flat = X.reshape(len(X), -1)
    with pytest.raises(ValueError, match=r"image_shape=\(4, 4\) has 16 pixels but X has 25 features"):
        SoftConvRegressor(image_shape=(4, 4)).fit(flat, y)
    with pytest.raises(ValueError, match="does not match X's images"):
        SoftConvRegressor(image_shape=(1, 25)).fit(X, y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples|samples but y has"):
        SoftConvRegressor().fit(X, y[:-1])
    with pytest.raises(ValueError, match="only one class"):
        SoftConvClassifier().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="negative values"):
        SoftConvRegressor().fit(X, y, sample_weight=-np.ones(len(X)))
    with pytest.raises(ValueError, match="padding='same'"):
        SoftConvRegressor(kernel_size=7, padding="valid").fit(X, y)
    with pytest.raises(ValueError, match="tying must be a finite number"):
        SoftConvRegressor(tying=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="supported combinations"):
        SoftConvRegressor(tying_graph="diagonal").fit(X, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error raised where CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error(small_images):
    X, y, _ = small_images
    with pytest.raises(ValueError, match="CUDA is not available.*device='cpu'"):
        SoftConvRegressor(device="cuda").fit(X, y)


def test_failed_fit_leaves_the_fitted_estimator_untouched(small_images):
    X, y, _ = small_images
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=20, random_state=0), X, y)
    before = {k: v for k, v in vars(reg).items()}
    pred = reg.predict(X)
    for bad_fit in (
        # fails after validate_data has reset n_features_in_ for the new X
        lambda: reg.fit(X.reshape(len(X), -1)[:, :16], y, sample_weight=-np.ones(len(X))),
        lambda: reg.set_params(tying=-1.0).fit(X, y),
        lambda: reg.set_params(tying=0.0).fit(X, y[:10]),
    ):
        with pytest.raises(ValueError):
            bad_fit()
        assert vars(reg).keys() == before.keys()
        assert all(vars(reg)[k] is before[k] for k in before if k != "tying")
        np.testing.assert_array_equal(reg.predict(X), pred)


def test_diverging_fit_warns_and_keeps_finite_weights(small_images):
    X, y, _ = small_images
    reg = SoftConvRegressor(channels=2, solver="sgd", learning_rate=1e6, max_iter=20, random_state=0)
    with pytest.warns(DivergenceWarning, match="learning_rate"):
        reg.fit(X * 100, y * 1e3)
    assert all(torch.isfinite(p).all() for p in reg.network_.parameters())
    assert np.isfinite(reg.predict(X)).all()


# ------------------------------------------------------ state and devices
def test_same_random_state_gives_identical_predictions(small_images):
    X, y, yc = small_images
    for est, target in ((SoftConvRegressor, y), (SoftConvClassifier, yc)):
        a = fit_quietly(est(channels=2, max_iter=20, random_state=3), X, target)
        b = fit_quietly(est(channels=2, max_iter=20, random_state=3), X, target)
        c = fit_quietly(est(channels=2, max_iter=20, random_state=4), X, target)
        out = "predict" if est is SoftConvRegressor else "predict_proba"
        np.testing.assert_array_equal(getattr(a, out)(X), getattr(b, out)(X))
        assert not np.array_equal(getattr(a, out)(X), getattr(c, out)(X))
    adam = [
        fit_quietly(SoftConvRegressor(channels=2, solver="adam", max_iter=5, random_state=1), X, y).predict(X)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(*adam)


def test_device_auto_resolves_and_is_stored(small_images):
    X, y, _ = small_images
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=3), X, y)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert reg.device_.startswith(expected) or reg.device_ == "mps"
    assert reg.get_params()["device"] == "auto"  # fitted state never leaks into the parameters


def test_pickle_round_trip_and_gpu_pickle_loads_on_cpu(small_images):
    X, y, _ = small_images
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=10, random_state=0), X, y)
    again = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(again.predict(X), reg.predict(X))
    # an estimator fitted on a GPU: pickles store CPU tensors and the device it came from
    reg.device_ = "cuda:3"
    blob = pickle.dumps(reg)
    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3; the CPU fallback cannot be exercised")
    with pytest.warns(UserWarning, match="not available here; it was loaded on the CPU"):
        moved = pickle.loads(blob)
    assert moved.device_ == "cpu"
    np.testing.assert_array_equal(moved.predict(X), reg.predict(X))


@cuda
def test_cuda_fit_predicts_like_cpu_and_unpickles(small_images):
    X, y, _ = small_images
    kw = dict(channels=2, max_iter=20, random_state=0, dtype="float64")
    cpu = fit_quietly(SoftConvRegressor(device="cpu", **kw), X, y)
    gpu = fit_quietly(SoftConvRegressor(device="cuda", **kw), X, y)
    assert gpu.device_.startswith("cuda")
    np.testing.assert_allclose(gpu.predict(X), cpu.predict(X), rtol=1e-4, atol=1e-4)
    state = pickle.loads(pickle.dumps(gpu))
    np.testing.assert_array_equal(state.predict(X), gpu.predict(X))


# ---------------------------------------------------------------- export
def test_to_torch_soft_is_the_fitted_network(small_images):
    X, y, _ = small_images
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=20, random_state=0), X, y)
    net = reg.to_torch()
    out = net(torch.as_tensor(X[:, None])).detach().numpy()[:, 0]
    np.testing.assert_allclose(out, reg.predict(X), rtol=1e-12)


def test_to_torch_hard_matches_the_soft_model_at_the_limit():
    X, y, info = make_soft_conv_data(80, (6, 6), teacher="cnn", task="classification", n_classes=3,
                                     random_state=0)
    clf = fit_quietly(
        SoftConvClassifier(channels=2, tying=1e5, locality=1e5, padding="same", random_state=0), X, y
    )
    hard = clf.to_torch(hard=True)
    assert any(isinstance(m, torch.nn.Conv2d) for m in hard)
    assert not any(type(m).__name__ == "SoftConv2d" for m in hard)
    conv = [m for m in hard if isinstance(m, torch.nn.Conv2d)][0]
    assert conv.kernel_size == (3, 3)
    logits = hard(torch.as_tensor(X[:, None])).detach().numpy()
    np.testing.assert_allclose(logits, clf.decision_function(X), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(clf.classes_[logits.argmax(1)], clf.predict(X))


# ------------------------------------------------------ incremental & meta
def test_partial_fit_continues_and_needs_classes(small_images):
    X, _, yc = small_images
    clf = SoftConvClassifier(channels=2, random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X, yc)
    clf.partial_fit(X, yc, classes=[0, 1])
    first = clf.network_.soft_layers[0].shared.detach().clone()
    for _ in range(3):
        clf.partial_fit(X, yc)
    assert clf.n_iter_ == 4 and len(clf.loss_curve_) == 4
    assert not torch.equal(first, clf.network_.soft_layers[0].shared)
    with pytest.raises(ValueError, match="stochastic solver"):
        SoftConvClassifier(solver="lbfgs").partial_fit(X, yc, classes=[0, 1])


def test_warm_start_resumes_from_the_previous_weights(small_images):
    X, y, _ = small_images
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=200, random_state=0, warm_start=True), X, y)
    loss = reg.loss_
    fit_quietly(reg.set_params(max_iter=1), X, y)
    assert reg.loss_ <= loss * (1 + 1e-9)  # one more step from the optimum cannot undo the fit
    cold = fit_quietly(SoftConvRegressor(channels=2, max_iter=1, random_state=0), X, y)
    assert cold.loss_ > 10 * reg.loss_


def test_loss_is_the_objective_at_the_fitted_weights(small_images):
    """``loss_`` is the solver's last value (no extra pass): it is J recomputed at the final weights."""
    X, _, y = small_images
    for solver in ("lbfgs", "fista"):
        est = SoftConvClassifier(channels=2, tying=0.1, locality=0.01, solver=solver, max_iter=15,
                                 random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
        again = est.set_params(warm_start=True)._prepare_fit(X, y, None, incremental=False).objective.total()
        assert est.loss_ == pytest.approx(again, rel=1e-12)


@pytest.mark.parametrize("n_iter_no_change", [3, 10])
def test_lbfgs_stops_when_the_objective_stalls(small_images, n_iter_no_change):
    """L-BFGS follows MLPClassifier's rule: more than n_iter_no_change iterations gaining < tol."""
    X, y, _ = small_images
    tol = 1e-3
    reg = fit_quietly(SoftConvRegressor(channels=2, max_iter=1000, tol=tol, n_iter_no_change=n_iter_no_change,
                                        random_state=0), X, y)
    curve = np.asarray(reg.loss_curve_)
    assert reg.n_iter_ < 1000 and len(curve) == reg.n_iter_
    scale = np.maximum(np.maximum(np.abs(curve[:-1]), np.abs(curve[1:])), 1.0)
    small = -np.diff(curve) < tol * scale
    run = n_iter_no_change + 1
    assert small[-run:].all()  # the stall that stopped it ...
    assert not small[-run - 1]  # ... which began there, not earlier
    # a longer patience runs at least as long from the same start
    longer = fit_quietly(clone(reg).set_params(n_iter_no_change=n_iter_no_change + 20), X, y)
    assert longer.n_iter_ > reg.n_iter_ and longer.loss_ <= reg.loss_


def test_early_stopping_records_validation_scores(small_images):
    X, y, _ = small_images
    reg = SoftConvRegressor(channels=2, solver="adam", early_stopping=True, max_iter=15,
                            n_iter_no_change=3, random_state=0)
    fit_quietly(reg, X, y)
    assert len(reg.validation_scores_) == reg.n_iter_
    assert reg.best_validation_score_ == max(reg.validation_scores_)


def test_pipeline_and_grid_search(small_images):
    X, _, yc = small_images
    pipe = make_pipeline(
        FunctionTransformer(lambda Z: Z / np.abs(Z).max()),
        SoftConvClassifier(channels=2, max_iter=30, random_state=0),
    )
    search = GridSearchCV(pipe, {"softconvclassifier__tying": [0.0, 10.0]}, cv=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X.reshape(len(X), -1), yc)
    assert search.best_params_["softconvclassifier__tying"] in (0.0, 10.0)
    assert search.score(X.reshape(len(X), -1), yc) > 0.7


def test_verbose_shows_progress(small_images, capsys):
    X, y, _ = small_images
    fit_quietly(SoftConvRegressor(channels=2, max_iter=5, verbose=1, random_state=0), X, y)
    assert "L-BFGS" in capsys.readouterr().err
