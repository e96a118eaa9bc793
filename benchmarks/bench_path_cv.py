"""Cost of a warm-started path and of SoftConvClassifierCV, measured in one run.

(a) a 20-point warm-started ``soft_conv_path`` divided by one cold fit
    (target <= 4); every cold fit that a ratio divides by is the best of 3 runs;
(b) ``SoftConvClassifierCV`` over 5 folds x 10 tyings divided by
    ``GridSearchCV(SoftConvClassifier)`` over the same folds and grid
    (target <= 0.25), with both runs' chosen tying and CV score;
(c) issue 5: ``SoftConvClassifierCV`` on all of digits, 5 folds x 10 tyings
    (the data-driven grid), its whole ``fit`` (grid, fold paths, refit)
    divided by one cold fit on all of digits (target <= 10); the folds move
    along the path as one stacked model;
(d) one evaluation of J and its gradient for the 5 stacked fold models:
    vectorized (``vmap``) against one model after the other.

    python benchmarks/bench_path_cv.py [--n-samples 600] [--n-jobs 1] [--skip-ab]
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
from softcnn.batched import StackedProblem
from softcnn.datasets import load_digits_images


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def best_of(fn, repeats=3):
    """The fastest of ``repeats`` runs: the reference a ratio divides by is then never a slow outlier."""
    runs = [timed(fn) for _ in range(repeats)]
    return min(runs, key=lambda r: r[0])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-samples", type=int, default=600)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--skip-ab", action="store_true", help="only (c) and (d)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", ConvergenceWarning)
    X_all, y_all = load_digits_images(return_X_y=True)
    X, y = X_all[: args.n_samples], y_all[: args.n_samples]
    est = SoftConvClassifier(random_state=0)
    tyings = np.geomspace(1.0, 1e-4, 10)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"n_jobs={args.n_jobs}; digits, {len(y)} samples")

    if not args.skip_ab:
        part_ab(X, y, est, tyings, args)
    part_cd(X_all, y_all)


def part_ab(X, y, est, tyings, args):
    cold, _ = best_of(lambda: SoftConvClassifier(tying=1e-2, random_state=0).fit(X, y))
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


def part_cd(X, y):
    cold, one = best_of(lambda: SoftConvClassifier(random_state=0).fit(X, y))
    cv_est = SoftConvClassifierCV(tyings=10, cv=StratifiedKFold(5), random_state=0)
    total, cv = timed(lambda: cv_est.fit(X, y))
    print(f"(c) all of digits ({len(y)} samples): cold fit {cold:.1f} s ({one.n_iter_} iterations); "
          f"SoftConvClassifierCV(tyings=10, cv=5).fit {total:.1f} s, of which the 5 fold paths "
          f"{cv.cv_time_:.1f} s (their CNN-limit starts give the grid; the rest: the refit); chosen tying {cv.tying_:.3g}, "
          f"CV accuracy {cv.best_score_:.4f}; ratio {total / cold:.1f} (target <= 10), "
          f"fold paths alone {cv.cv_time_ / cold:.1f}")

    folds = list(StratifiedKFold(5).split(X, y))
    objectives = [SoftConvClassifier(random_state=0)._prepare_fit(X[tr], y[tr], None, incremental=False).objective
                  for tr, _ in folds]
    everyone = torch.arange(len(objectives))
    times = {}
    for vectorize in (True, False):
        stacked = StackedProblem(objectives, vectorize=vectorize)
        x = stacked.read()
        stacked.value_and_grad(x, everyone)
        times[vectorize] = min(timed(lambda: stacked.value_and_grad(x, everyone))[0] for _ in range(5))
    print(f"(d) J and gradient of 5 stacked fold models: vmap {1e3 * times[True]:.1f} ms, one after the "
          f"other {1e3 * times[False]:.1f} ms; ratio {times[True] / times[False]:.2f} "
          "(the CPU default is one after the other)")


if __name__ == "__main__":
    main()
