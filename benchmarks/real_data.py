"""Real-data results: Fashion-MNIST, MNIST and USPS, five models, accuracy ± sd and fit time.

Models (every neural model but the MLP shares one geometry, see ``ARCH``):

1. ``logistic regression``  ``LogisticRegressionCV`` (lbfgs) on the pixels, ``C`` from
   ``LR_CS`` by 3-fold CV;
2. ``MLP``                  ``MLPClassifier``, one hidden layer of 100 ReLU units,
   ``early_stopping=True``;
3. ``CNN (hard)``           ``SoftConvClassifier`` with ``support=kernel_size`` (5x5) and
   ``tying_penalty='l1'`` at ``tying=HARD_TYING``: the proximal step sets every deviation
   to exactly 0 after every Adam step, so the model *is* the 5x5 CNN (a shared kernel and
   bias per channel) and is trained by the same solver as the others. Each fit is checked:
   all positions tied (``n_tied_positions_``) and the ``to_torch(hard=True)``
   ``nn.Conv2d`` export reproduces the test logits;
4. ``locally connected``    ``SoftConvClassifier(tying=0, locality=0)``, 9x9 support;
5. ``SoftConvClassifierCV`` the same 9x9 soft layer, ``locality=0``, tying chosen by
   3-fold CV (rule ``'min'``) over ``TYINGS`` = (1, 0.03, 0), strong to weak (l2 tying
   to the mean kernel, the default): at 1 the fit is a CNN with 9x9 kernels up to ~0.5% of
   the kernel energy (``tying_deviation_``, in the pilot), at 0 it is model 4.

Data: for each data set and ``n_train``, a stratified random subset of the training split
drawn with the seed (``n_train`` at least the split's size: the whole split, so USPS at
10000 is its 7291 training images); the seed is also every model's ``random_state``. All
models and seeds are scored on one fixed stratified subset of ``--n-test`` (2000) test
images, drawn once with ``random_state=0`` (USPS: its whole test split, 2007 images, since
a stratified draw must leave an image of each class out). Pixels in [0, 1], nothing else.

Soft-conv training (models 3-5, also inside the CV): Adam, float32, learning rate 3e-3,
batches of 100, ``early_stopping`` (10% held out, patience 10 epochs, best epoch kept), at
most ``epochs(n)`` epochs: ``MAX_EPOCHS`` (40), fewer where that exceeds ``MAX_STEPS``
(1200) optimizer steps, never fewer than ``MIN_EPOCHS`` (10): 40 epochs at n_train 500 and
2000, 18 at 7291, 13 at 10000. These settings (and the stride 2 that keeps a 28x28 fit
affordable) were fixed by a pilot on MNIST *training* images (seed 0, 2000 held-out
training images as validation), and by the run's time budget (about an hour on one core).

Reported per data set, ``n_train`` and model: test accuracy mean ± sd over the seeds, mean
fit time (the whole ``fit``, cross-validation and refit included for the CV estimators),
and the strength each CV estimator selected, per seed.

    python benchmarks/real_data.py [--datasets fashion_mnist,mnist,usps] [--sizes 500,2000,10000]
                                   [--seeds 0,1] [--n-test 2000] [--out PREFIX] [--quick]

``--out PREFIX`` writes ``PREFIX.md`` (the run's header and the table), ``PREFIX.csv`` (the
same table) and ``PREFIX_header.txt`` (the header), which ``docs/real_data.rst`` includes
from ``docs/_static/real_data*``, and ``PREFIX_runs.csv`` (one row per fit). ``--quick`` is
a smoke run (one small size, seed 0, 500 test images, 5 epochs, two tyings): it checks that
everything runs, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.neural_network import MLPClassifier

from softcnn import SoftConvClassifier, SoftConvClassifierCV
from softcnn.datasets import get_data_home, load_mnist, load_usps

DATASETS = ("fashion_mnist", "mnist", "usps")
PRETTY = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "usps": "USPS"}
SIZES = (500, 2000, 10000)
SEEDS = (0, 1)
N_TEST = 2000
TEST_SEED = 0

#: one geometry for every soft-conv model: 8 channels, 5x5 nominal kernel, stride 2, 'same'
#: padding, tanh, 2x2 max pooling, linear read-out (28x28 -> 14x14 positions -> 8x7x7 = 392
#: read-out features; USPS 16x16 -> 8x8 -> 8x4x4 = 128)
ARCH = dict(channels=8, kernel_size=5, stride=2, padding="same", activation="tanh", pooling="max", alpha=1e-4)
SOFT_SUPPORT = 9  # kernel_size + 4, the 'auto' rule, written out
TRAIN = dict(solver="adam", dtype="float32", learning_rate=3e-3, batch_size=100, early_stopping=True,
             validation_fraction=0.1, n_iter_no_change=10)
MAX_EPOCHS, MIN_EPOCHS, MAX_STEPS = 40, 10, 1200
#: 'l1' tying this strong zeroes every deviation in each proximal step: an exact CNN
HARD_TYING = 1e6
#: CV grid of SoftConvClassifierCV, strong to weak (l2 'mean' tying, the default)
TYINGS = (1.0, 0.03, 0.0)
CV_FOLDS = 3
LR_CS = (0.01, 0.1, 1.0)
MLP_HIDDEN = (100,)
MODELS = ("logistic regression", "MLP", "CNN (hard)", "locally connected", "SoftConvClassifierCV")
QUICK = dict(sizes=(300,), seeds=(0,), n_test=500, max_epochs=5, tyings=(1.0, 0.0))


def epochs(n_train: int, max_epochs: int = MAX_EPOCHS) -> int:
    """Epoch cap of the soft-conv fits: ``max_epochs``, fewer above MAX_STEPS steps, at least MIN_EPOCHS."""
    steps_per_epoch = math.ceil((1 - TRAIN["validation_fraction"]) * n_train / TRAIN["batch_size"])
    return int(min(max_epochs, max(MIN_EPOCHS, round(MAX_STEPS / steps_per_epoch))))


#: sizes of the splits, so that a subset is drawn only when it is smaller (checked on loading)
SPLIT_SIZES = {"fashion_mnist": {"train": 60000, "test": 10000}, "mnist": {"train": 60000, "test": 10000},
               "usps": {"train": 7291, "test": 2007}}
N_CLASSES = 10


def load(dataset: str, subset: str, n_samples, random_state):
    """Images (n, H, W) in [0, 1] and labels: the loaders' stratified draw, or the whole split."""
    # the loaders' stratified draw must leave one image per class out: near the split's size, take it all
    if n_samples is not None and n_samples > SPLIT_SIZES[dataset][subset] - N_CLASSES:
        n_samples = None
    kw = dict(subset=subset, n_samples=n_samples, random_state=random_state)
    X, y = load_usps(**kw) if dataset == "usps" else load_mnist(dataset, **kw)
    if n_samples is None and len(y) != SPLIT_SIZES[dataset][subset]:
        raise RuntimeError(f"{dataset} {subset}: {len(y)} images, expected {SPLIT_SIZES[dataset][subset]}")
    return X, y


#: scikit-learn >= 1.8: the l2 penalty and the new fitted attributes, said explicitly (no FutureWarning)
_LR_NEW_API = (dict(l1_ratios=(0.0,), use_legacy_attributes=False)
               if "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters else {})


def make_model(name: str, seed: int, n_train: int, max_epochs: int, tyings):
    soft = dict(**ARCH, **TRAIN, max_iter=epochs(n_train, max_epochs), random_state=seed)
    if name == "logistic regression":
        return LogisticRegressionCV(Cs=list(LR_CS), cv=CV_FOLDS, scoring="accuracy", max_iter=1000, **_LR_NEW_API)
    if name == "MLP":
        return MLPClassifier(hidden_layer_sizes=MLP_HIDDEN, early_stopping=True, random_state=seed)
    if name == "CNN (hard)":
        return SoftConvClassifier(**soft, support=ARCH["kernel_size"], tying=HARD_TYING, tying_penalty="l1")
    if name == "locally connected":
        return SoftConvClassifier(**soft, support=SOFT_SUPPORT, tying=0.0, locality=0.0)
    if name == "SoftConvClassifierCV":
        return SoftConvClassifierCV(**soft, support=SOFT_SUPPORT, locality=0.0, tyings=list(tyings),
                                    localities=None, cv=CV_FOLDS, selection="min")
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def fit_one(name, model, X_train, y_train, X_test, y_test):
    flat = name in ("logistic regression", "MLP")
    Xtr = X_train.reshape(len(X_train), -1) if flat else X_train
    Xte = X_test.reshape(len(X_test), -1) if flat else X_test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model.fit(Xtr, y_train)
        elapsed = time.perf_counter() - start
    capped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:  # anything but the expected "stopped at max_iter" is shown once
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    row = {"accuracy": float(model.score(Xte, y_test)), "fit_time": elapsed, "selected": "",
           "n_iter": getattr(model, "n_iter_", ""), "capped": capped, "note": ""}
    if name == "logistic regression":
        row["selected"] = f"{float(np.ravel(model.C_)[0]):g}"
        row["n_iter"] = int(np.max(model.n_iter_))
    elif name == "SoftConvClassifierCV":
        row["selected"] = f"{model.tying_:g}"
        row["note"] = (f"tying_deviation_ {model.tying_deviation_:.3g}, CV acc {model.best_score_:.4f}, "
                       f"cv_time {model.cv_time_:.1f} s")
    elif name == "locally connected":
        row["note"] = f"tying_deviation_ {model.tying_deviation_:.3g}"
    elif name == "CNN (hard)":
        row["note"] = hard_cnn_check(model, X_test)
    return row


@torch.no_grad()
def hard_cnn_check(model, X_test) -> str:
    """Is the fit exactly a CNN? All positions tied, and the nn.Conv2d export gives the same logits."""
    layer = model.network_.soft_layers[0]
    tied = model.n_tied_positions_[0] == layer.n_positions
    cnn = model.to_torch(hard=True)
    param = next(cnn.parameters())
    x = torch.as_tensor(X_test[:, None], dtype=param.dtype, device=param.device)
    diff = float((cnn(x).double().cpu() - torch.as_tensor(model.decision_function(X_test))).abs().max())
    exact = tied and diff < 1e-4
    note = f"tied {model.n_tied_positions_[0]}/{layer.n_positions}, export max |logit diff| {diff:.1e}"
    return note if exact else note + "  ** NOT an exact CNN **"


def mean_sd(values, spec) -> str:
    v = np.asarray(values, dtype=float)
    sd = f"{v.std(ddof=1):{spec}}" if len(v) > 1 else "–"
    return f"{v.mean():{spec}} ± {sd}"


def summarise(runs):
    """One row per (dataset, n_train, model), in run order."""
    keys = list(dict.fromkeys((r["dataset"], r["n_train"], r["model"]) for r in runs))
    table = []
    for key in keys:
        rs = [r for r in runs if (r["dataset"], r["n_train"], r["model"]) == key]
        selected = " / ".join(r["selected"] for r in rs) if any(r["selected"] for r in rs) else ""
        if selected:
            selected = ("C " if key[2] == "logistic regression" else "tying ") + selected
        table.append({
            "dataset": PRETTY[key[0]], "n_train": key[1], "model": key[2],
            "test accuracy": mean_sd([r["accuracy"] for r in rs], ".3f"),
            "fit time (s)": f"{np.mean([r['fit_time'] for r in rs]):.1f}",
            "selected (per seed)": selected,
            "seeds": len(rs),
        })
    return table


COLUMNS = ("dataset", "n_train", "model", "test accuracy", "fit time (s)", "selected (per seed)")


def markdown(table) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in table]
    return "\n".join(lines)


def parse_list(text, kind):
    return tuple(kind(t) for t in text.split(",") if t.strip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, from " + ",".join(DATASETS))
    parser.add_argument("--sizes", default=None, help="n_train values, comma-separated (default 500,2000,10000)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the models")
    parser.add_argument("--n-test", type=int, default=None, help=f"test images per data set (default {N_TEST})")
    parser.add_argument("--max-epochs", type=int, default=None, help=f"soft-conv epoch cap (default {MAX_EPOCHS})")
    parser.add_argument("--out", default=None,
                        help="write PREFIX.md, PREFIX.csv, PREFIX_header.txt and PREFIX_runs.csv "
                             "(docs/_static/real_data for the docs page)")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + str(QUICK))
    args = parser.parse_args(argv)

    datasets = parse_list(args.datasets, str)
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}; choose from {DATASETS}")
    models = parse_list(args.models, str)
    if set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(models) - set(MODELS))}; choose from {MODELS}")
    defaults = QUICK if args.quick else dict(sizes=SIZES, seeds=SEEDS, n_test=N_TEST, max_epochs=MAX_EPOCHS,
                                               tyings=TYINGS)
    sizes = parse_list(args.sizes, int) if args.sizes else defaults["sizes"]
    seeds = parse_list(args.seeds, int) if args.seeds else defaults["seeds"]
    n_test = args.n_test or defaults["n_test"]
    max_epochs = args.max_epochs or defaults["max_epochs"]
    tyings = defaults["tyings"]

    start = time.perf_counter()
    header = [
        "softcnn on real data" + ("  [--quick: smoke run, the numbers mean nothing]" if args.quick else ""),
        "command: " + " ".join([os.path.relpath(sys.executable) if sys.executable else "python", *sys.argv]),
        (f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
         f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads "
         f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"),
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; data: {get_data_home()}",
        (f"datasets {', '.join(datasets)}; n_train {', '.join(map(str, sizes))} (stratified draws with the seed; "
         f"the whole training split where n_train reaches its size); seeds {', '.join(map(str, seeds))}; "
         f"test: {n_test} fixed stratified test images per data set (random_state={TEST_SEED}; "
         "the whole test split where n_test is within 10 images of its size)"),
        (f"soft-conv geometry: {', '.join(f'{k}={v}' for k, v in ARCH.items())}; support {SOFT_SUPPORT} "
         f"(hard CNN: {ARCH['kernel_size']}, l1 tying={HARD_TYING:g})"),
        (f"soft-conv training: {', '.join(f'{k}={v}' for k, v in TRAIN.items())}, max_iter = epochs(n): "
         f"{max_epochs} epochs, fewer above {MAX_STEPS} steps, at least {min(MIN_EPOCHS, max_epochs)} "
         f"({', '.join(f'{n}: {epochs(n, max_epochs)}' for n in sizes)})"),
        (f"SoftConvClassifierCV: tyings {list(tyings)}, locality 0, cv={CV_FOLDS}, selection 'min'; "
         f"LogisticRegressionCV: Cs {list(LR_CS)}, cv={CV_FOLDS}, lbfgs; MLPClassifier: hidden {MLP_HIDDEN}, "
         "early_stopping"),
    ]
    print("\n".join(header), flush=True)

    # untimed warm-up: the first torch fit of a process pays one-off start-up costs
    X_warm, y_warm = load(datasets[0], "test", 100, TEST_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("CNN (hard)", "locally connected"):
            make_model(name, 0, len(y_warm), 1, tyings).fit(X_warm, y_warm)

    runs = []
    for dataset in datasets:
        X_test, y_test = load(dataset, "test", n_test, TEST_SEED)
        for size in sizes:
            for seed in seeds:
                X_train, y_train = load(dataset, "train", size, seed)
                n_train = len(y_train)
                for name in models:
                    model = make_model(name, seed, n_train, max_epochs, tyings)
                    r = fit_one(name, model, X_train, y_train, X_test, y_test)
                    r.update(dataset=dataset, n_train=n_train, seed=seed, model=name)
                    runs.append(r)
                    print(f"  {PRETTY[dataset]:<13} n={n_train:<5} seed {seed}  {name:<21} acc {r['accuracy']:.4f}  "
                          f"{r['fit_time']:7.1f} s  iter {r['n_iter']}{' (cap)' if r['capped'] else ''}"
                          f"{'  selected ' + r['selected'] if r['selected'] else ''}"
                          f"{'  ' + r['note'] if r['note'] else ''}", flush=True)

    table = summarise(runs)
    total = time.perf_counter() - start
    caption = (f"Test accuracy (mean ± sd over seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}) "
               f"on {n_test} fixed test images per data set; fit time: mean seconds per fit. "
               f"Total run time {total:.0f} s.")
    md = markdown(table)
    print()
    print(caption)
    print()
    print(md)
    print()
    print(f"total run time {total:.1f} s ({len(runs)} fits)")

    if args.out:
        prefix = Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{prefix}.md").write_text("\n".join(header) + "\n\n" + caption + "\n\n" + md + "\n", encoding="utf-8")
        Path(f"{prefix}_header.txt").write_text("\n".join(header) + "\n" + caption + "\n", encoding="utf-8")
        with open(f"{prefix}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows([[row[c] for c in COLUMNS] for row in table])
        fields = ("dataset", "n_train", "seed", "model", "accuracy", "fit_time", "selected", "n_iter", "capped", "note")
        with open(f"{prefix}_runs.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(runs)
        print(f"wrote {prefix}.md, {prefix}.csv, {prefix}_runs.csv, {prefix}_header.txt")


if __name__ == "__main__":
    main()
