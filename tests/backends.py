"""Running a test on both implementations of an operator: the compiled CPU kernels
(:mod:`softcnn._kernels`) and the torch code they stand in for on CPU (and that runs elsewhere)."""

import contextlib

import softcnn._kernels

BACKENDS = ("compiled", "torch")


@contextlib.contextmanager
def backend(name: str):
    """Within the block, CPU inputs go to the compiled kernels (``"compiled"``) or not (``"torch"``)."""
    kept = softcnn._kernels.ENABLED
    softcnn._kernels.ENABLED = name == "compiled"
    try:
        yield
    finally:
        softcnn._kernels.ENABLED = kept
