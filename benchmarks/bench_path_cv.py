"""Cost of a warm-started path and of SoftConvClassifierCV, measured in one run.

(a) a 20-point warm-started ``soft_conv_path`` divided by one cold fit
    (target <= 4);
(b) ``SoftConvClassifierCV`` over 5 folds x 10 tyings divided by
    ``GridSearchCV(SoftConvClassifier)`` over the same folds and grid
    (target <= 0.25), with both runs' chosen tying and CV score.

    python benchmarks/bench_path_cv.py [--n-samples 600] [--n-jobs 1]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from softcnn import SoftConvClassifier, SoftConvClassifierCV, soft_conv_path
from softcnn.datasets import load_digits_images


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-samples", type=int, default=600)
    parser.add_argument("--n-jobs", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", ConvergenceWarning)
    X, y = load_digits_images(return_X_y=True)
    X, y = X[: args.n_samples], y[: args.n_samples]
    est = SoftConvClassifier(random_state=0)
    tyings = np.geomspace(1.0, 1e-4, 10)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"n_jobs={args.n_jobs}; digits, {len(y)} samples")

    cold, _ = timed(lambda: SoftConvClassifier(tying=1e-2, random_state=0).fit(X, y))
    path_time, path = timed(lambda: soft_conv_path(est, X, y, values=np.geomspace(1.0, 1e-4, 20)))
    print(f"(a) cold fit {cold:.1f} s; 20-point path {path_time:.1f} s "
          f"(mean {path.n_iter.mean():.0f} iterations a point); ratio {path_time / cold:.2f} (target <= 4)")

    folds = StratifiedKFold(5)
    cv_time, cv = timed(lambda: SoftConvClassifierCV(tyings=tyings, cv=folds, n_jobs=args.n_jobs,
                                                     random_state=0).fit(X, y))
    grid_time, grid = timed(lambda: GridSearchCV(est, {"tying": list(tyings)}, cv=folds,
                                                 n_jobs=args.n_jobs).fit(X, y))
    print(f"(b) SoftConvClassifierCV {cv_time:.1f} s: tying={cv.tying_:.3g}, CV accuracy {cv.best_score_:.4f}")
    print(f"    GridSearchCV        {grid_time:.1f} s: tying={grid.best_params_['tying']:.3g}, "
          f"CV accuracy {grid.best_score_:.4f}")
    print(f"    ratio {cv_time / grid_time:.2f} (target <= 0.25)")


if __name__ == "__main__":
    main()
