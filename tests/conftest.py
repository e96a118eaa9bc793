"""Fixtures shared by several test modules."""

import os

# sklearn's check_array_api_input skips itself unless SciPy's array API support is on (read
# when SciPy is first imported, so before sklearn): with it the check runs, and passes.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import pytest  # noqa: E402
from backends import BACKENDS, backend  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from softcnn import SoftConvClassifier  # noqa: E402


@pytest.fixture(params=BACKENDS)
def kernel_backend(request):
    """Runs the test on the compiled CPU kernels and on the torch code."""
    with backend(request.param):
        yield request.param


@pytest.fixture(scope="session")
def fitted():
    """A small classifier fitted on 200 digits (for plots and statistics of real kernels)."""
    X, y = load_digits(return_X_y=True)
    est = SoftConvClassifier(channels=2, max_iter=20, random_state=0)
    with pytest.warns(Warning):  # ConvergenceWarning at max_iter=20
        est.fit(X[:200] / 16.0, y[:200])
    return est
