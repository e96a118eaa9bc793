"""mixed_precision='bfloat16': where it applies, what it leaves in float32, its errors, and that
accuracy holds."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from softcnn import SoftConvClassifier, SoftConvClassifierCV, SoftConvRegressor
from softcnn.network import SoftConvNet
from softcnn.penalties import make_penalties
from softcnn.solvers import Objective


def quiet_fit(est, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(*args, **kwargs)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X.reshape(-1, 8, 8) / 16.0, y, test_size=0.25, random_state=0, stratify=y)


def test_the_forward_runs_in_bfloat16_and_the_rest_in_float32():
    gen = torch.Generator().manual_seed(0)
    net = SoftConvNet((1, 8, 8), (3,), 3, padding="same", support=5, n_outputs=4, generator=gen).float()
    X = torch.randn(16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (16,), generator=gen)
    seen = []
    net.soft_layers[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    penalties = make_penalties(SoftConvClassifier(tying=0.1, alpha=1e-3).get_params())
    mixed = Objective(net, torch.nn.functional.cross_entropy, X, y, torch.ones(16), penalties,
                      autocast=torch.bfloat16)
    loss = mixed()
    assert seen == [torch.bfloat16]  # the layer's products ran in bfloat16
    assert loss.dtype == torch.float32 and mixed.outputs(X).dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    # the same objective in float32 differs by bfloat16's rounding, not more
    with torch.no_grad():
        exact = float(Objective(net, torch.nn.functional.cross_entropy, X, y, torch.ones(16), penalties)())
    assert seen[-1] == torch.float32
    assert float(loss.detach()) != exact and abs(float(loss.detach()) - exact) < 2**-6 * exact


def test_bfloat16_fits_with_adam_keeps_float32_and_predicts_in_float32(digits):
    X_train, X_test, y_train, y_test = digits
    clf = quiet_fit(SoftConvClassifier(channels=2, max_iter=3, random_state=0, mixed_precision="bfloat16"),
                    X_train[:300], y_train[:300])
    assert clf.solver_ == "adam" and clf.dtype_ == "float32"  # 'auto' picks Adam with mixed precision
    assert all(p.dtype == torch.float32 for p in clf.network_.parameters())
    assert clf.get_params()["mixed_precision"] == "bfloat16"
    # predictions are float32 forwards, untouched by the training's autocast
    proba = clf.predict_proba(X_test[:20])
    with torch.no_grad():
        ref = torch.softmax(clf.network_(torch.as_tensor(X_test[:20, None], dtype=torch.float32)), 1).numpy()
    np.testing.assert_allclose(proba, ref, rtol=1e-6, atol=1e-7)
    # a fixed random_state repeats the fit bit for bit on a CPU, mixed precision included
    again = quiet_fit(SoftConvClassifier(channels=2, max_iter=3, random_state=0, mixed_precision="bfloat16"),
                      X_train[:300], y_train[:300])
    np.testing.assert_array_equal(again.predict_proba(X_test[:20]), proba)
    # partial_fit continues in mixed precision
    clf.partial_fit(X_train[300:400], y_train[300:400])
    assert clf.n_iter_ == 4


@pytest.mark.slow
def test_bfloat16_accuracy_holds_against_float32(digits):
    """From one seed, bfloat16 products and float32 reach the same test accuracy (to 3 points:
    two standard errors of an accuracy near 0.9 on 450 digits, the fits' batches being the
    same) and training objectives within 5%; bfloat16's rounding (2^-9 relative) is far below
    the noise of Adam's mini-batches."""
    X_train, X_test, y_train, y_test = digits
    scores, losses = {}, {}
    for precision in (None, "bfloat16"):
        clf = quiet_fit(SoftConvClassifier(channels=4, solver="adam", max_iter=40, tying=1e-3, random_state=0,
                                           mixed_precision=precision), X_train, y_train)
        scores[precision], losses[precision] = clf.score(X_test, y_test), clf.loss_
    assert scores[None] > 0.9  # a fit worth comparing
    assert abs(scores["bfloat16"] - scores[None]) <= 0.03
    assert abs(losses["bfloat16"] - losses[None]) <= 0.05 * losses[None]
    assert losses["bfloat16"] != losses[None]  # autocast did change the arithmetic


def test_mixed_precision_errors_name_the_problem_and_the_fix(digits, monkeypatch):
    X, y = digits[0][:50], digits[2][:50]
    with pytest.raises(ValueError, match=r"mixed_precision must be None or 'bfloat16'; got 'float16'"):
        SoftConvClassifier(mixed_precision="float16").fit(X, y)
    with pytest.raises(ValueError, match=r"mixed_precision must be None"):
        SoftConvClassifier(mixed_precision=["bfloat16"]).fit(X, y)
    for solver in ("lbfgs", "fista"):
        with pytest.raises(ValueError, match=rf"needs a mini-batch solver, but solver='{solver}'.*solver='adam'"):
            SoftConvRegressor(solver=solver, mixed_precision="bfloat16").fit(X, y.astype(float))
    with pytest.raises(ValueError, match=r"dtype='float64' contradicts it.*dtype='auto' or 'float32'"):
        SoftConvClassifier(dtype="float64", mixed_precision="bfloat16").fit(X, y)
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ValueError, match=r"not supported on device 'cpu'.*mixed_precision=None"):
        SoftConvClassifier(mixed_precision="bfloat16").fit(X, y)


def test_a_failed_mixed_precision_fit_leaves_the_estimator_untouched(digits):
    X, y = digits[0][:60], digits[2][:60]
    clf = quiet_fit(SoftConvClassifier(channels=2, max_iter=2, random_state=0), X, y)
    before = {k: v for k, v in vars(clf).items()}
    clf.set_params(solver="lbfgs", mixed_precision="bfloat16")
    with pytest.raises(ValueError, match="needs a mini-batch solver"):
        clf.fit(X, y)
    assert all(vars(clf)[k] is v for k, v in before.items() if k not in ("solver", "mixed_precision"))


def test_cv_estimators_pass_mixed_precision_to_their_fits(digits):
    X, y = digits[0][:90], digits[2][:90]
    cv = quiet_fit(SoftConvClassifierCV(channels=2, tyings=[1.0, 1e-2], cv=2, max_iter=2, random_state=0,
                                        mixed_precision="bfloat16"), X, y)
    assert cv.solver_ == "adam" and cv.dtype_ == "float32"
    assert cv.get_params()["mixed_precision"] == "bfloat16"
