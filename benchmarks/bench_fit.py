"""Time of one SoftConvClassifier fit against a hand-written torch loop and skorch.

All three train the same SoftConvNet module (float32, Adam, lr 1e-3, batches of
200, the same number of epochs, no penalty) on the same data, in this process.
Prints the fit time of each and the ratios; targets: <= 1.1 vs the hand loop,
<= 1.0 vs skorch.

    python benchmarks/bench_fit.py [--dataset digits|mnist] [--epochs 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings

import numpy as np
import torch

from softcnn import SoftConvClassifier
from softcnn.datasets import load_digits_images, load_mnist


def data(name: str):
    if name == "digits":
        X, y = load_digits_images(return_X_y=True)
    else:
        X, y = load_mnist("mnist", n_samples=5000, random_state=0)
    return X.astype(np.float32), y


def fit_softcnn(X, y, epochs):
    clf = SoftConvClassifier(solver="adam", max_iter=epochs, n_iter_no_change=10**6, tol=0.0,
                             batch_size=200, alpha=0.0, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        clf.fit(X, y)
        elapsed = time.perf_counter() - start
    assert clf.n_iter_ == epochs
    return elapsed, clf


def fit_hand(module, X, y, epochs):
    module = copy.deepcopy(module).float()
    Xt = torch.as_tensor(X[:, None])
    yt = torch.as_tensor(y)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(Xt), generator=gen)
        for i in range(0, len(Xt), 200):
            idx = perm[i : i + 200]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(Xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def fit_skorch(module, X, y, epochs):
    from skorch import NeuralNetClassifier

    net = NeuralNetClassifier(
        copy.deepcopy(module).float(), criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
        lr=1e-3, max_epochs=epochs, batch_size=200, train_split=None, verbose=0, device="cpu",
    )
    start = time.perf_counter()
    net.fit(X[:, None], y.astype(np.int64))
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    X, y = data(args.dataset)
    _, clf = fit_softcnn(X, y, 1)  # warm-up, and the module to copy
    module = clf.network_
    times = {"softcnn": [], "hand loop": [], "skorch": []}
    for _ in range(args.repeats):  # interleaved, so drift hits all three alike
        times["softcnn"].append(fit_softcnn(X, y, args.epochs)[0])
        times["hand loop"].append(fit_hand(module, X, y, args.epochs))
        times["skorch"].append(fit_skorch(module, X, y, args.epochs))
    best = {k: min(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; data: {args.dataset} {X.shape}, {args.epochs} epochs, "
          f"best of {args.repeats}")
    for k, v in best.items():
        print(f"  {k:<10} {v:7.3f} s")
    print(f"  ratio softcnn / hand loop = {best['softcnn'] / best['hand loop']:.3f}  (target <= 1.1)")
    print(f"  ratio softcnn / skorch    = {best['softcnn'] / best['skorch']:.3f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
