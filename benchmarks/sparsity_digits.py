"""Sparsity on digits: ridge, L1, channel group lasso and transformed L1 + channel.

Same architecture for all four models (one soft-conv layer, 8 channels, 3x3
nominal kernel, default support 7x7, tanh, read-out), the same ridge ``alpha``
and the same solver, FISTA (what ``solver='auto'`` picks once a non-smooth
penalty is on), so that the rows differ only by the penalty; ridge with
L-BFGS (the 'auto' choice for a smooth fit) is printed as a reference row. The comparison follows the transformed-L1 study
(L1, sparse group lasso, transformed L1 + group):

1. ridge            ``alpha`` only
2. l1               ``sparsity``, ``sparsity_penalty='l1'``
3. channel          ``channel_sparsity`` (group lasso per output channel)
4. tl1 + channel    ``sparsity``, ``sparsity_penalty='tl1'``, ``tl1_a``, ``channel_sparsity``

Data: sklearn digits (8x8, pixels/16), stratified 70/30 train/test split with
``random_state=seed`` for seeds 0, 1, 2 (the seed is also the estimator's
``random_state``). Reported per model, mean ± sd over the seeds: test
accuracy, share of connections kept (nonzero soft-conv weights at existing
offsets / all existing soft-conv weights; biases and read-out excluded),
channels removed (``channels - n_active_channels_``, summed over layers),
``flops_`` and ``n_params_``.

Strengths: chosen once by the pilot (``--pilot``) on seed 0's *training* set
only (an inner stratified 70/30 split; no test data): on each grid, the
cheapest setting (fewest ``flops_``, then fewest ``n_params_``) whose validation
accuracy is within ``--slack`` (1.5 points) of ridge (FISTA)'s. The chosen values are
fixed in ``STRENGTHS`` below and printed with every run.

    python benchmarks/sparsity_digits.py [--max-iter 200] [--pilot]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from softcnn import SoftConvClassifier
from softcnn.datasets import load_digits_images

SEEDS = (0, 1, 2)
TL1_A = 0.25
BASE = dict(channels=8, kernel_size=3, alpha=1e-4, solver="fista")
#: chosen by `--pilot` (seed 0, inner validation split of its training set); see the README
STRENGTHS = {
    "ridge": {},
    "ridge (L-BFGS)": dict(solver="lbfgs"),  # reference only: the default solver of a smooth fit
    "l1": dict(sparsity=1e-2, sparsity_penalty="l1"),
    "channel": dict(channel_sparsity=3.0),
    "tl1 + channel": dict(sparsity=3e-3, sparsity_penalty="tl1", tl1_a=TL1_A, channel_sparsity=1.5),
}
#: pilot grids
L1_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
CHANNEL_GRID = (0.3, 1.0, 2.0, 3.0, 5.0)
TL1_GRID = (1e-3, 3e-3, 1e-2)


def split(seed):
    X, y = load_digits_images(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)


@torch.no_grad()
def connections_kept(clf) -> float:
    """Nonzero soft-conv weights at existing offsets over all existing soft-conv weights."""
    kept = total = 0
    for layer in clf.network_.soft_layers:
        w = layer.kernels()[..., :-1]  # (L, F, K - 1): biases dropped
        exists = layer.mask[:, None, :-1].expand_as(w)
        kept += int(((w != 0) & exists).sum())
        total += int(exists.sum())
    return kept / total


def fit_one(params, X_train, y_train, X_test, y_test, seed, max_iter):
    clf = SoftConvClassifier(**{**BASE, **params}, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        clf.fit(X_train, y_train)
        elapsed = time.perf_counter() - start
    channels = BASE["channels"] if np.ndim(BASE["channels"]) else [BASE["channels"]]
    return {
        "accuracy": clf.score(X_test, y_test),
        "kept": connections_kept(clf),
        "removed": sum(channels) - sum(clf.n_active_channels_),
        "flops": clf.flops_,
        "n_params": clf.n_params_,
        "n_iter": clf.n_iter_,
        "capped": any("did not converge" in str(w.message) for w in caught),
        "time": elapsed,
        "solver": clf.solver_,
    }


def describe(params) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or f"alpha={BASE['alpha']} only"


def pilot(max_iter, slack):
    X_tr, _, y_tr, _ = split(0)
    X_a, X_v, y_a, y_v = train_test_split(X_tr, y_tr, test_size=0.3, stratify=y_tr, random_state=0)

    def run(params):
        r = fit_one(params, X_a, y_a, X_v, y_v, 0, max_iter)
        print(f"  {describe(params):<75} val acc {r['accuracy']:.4f}  kept {r['kept']:.3f}  "
              f"ch removed {r['removed']}  flops {r['flops']}  params {r['n_params']}  "
              f"iter {r['n_iter']}{' (cap)' if r['capped'] else ''}", flush=True)
        return r

    def choose(name, grid, floor):
        results = [(p, run(p)) for p in grid]
        ok = [(p, r) for p, r in results if r["accuracy"] >= floor]
        best = min(ok, key=lambda pr: (pr[1]["flops"], pr[1]["n_params"]))[0] if ok else None
        print(f"  -> {name}: {describe(best) if best else 'none within slack'}\n", flush=True)
        return best

    print(f"pilot: seed 0, inner 70/30 split of its training set ({len(y_a)} fit / {len(y_v)} validation)")
    ridge = run({})
    floor = ridge["accuracy"] - slack
    print(f"  -> accuracy floor {floor:.4f} (ridge - {slack})\n")
    choice = {"ridge": {}}
    choice["l1"] = choose("l1", [dict(sparsity=s, sparsity_penalty="l1") for s in L1_GRID], floor)
    choice["channel"] = choose("channel", [dict(channel_sparsity=c) for c in CHANNEL_GRID], floor)
    c = (choice["channel"] or {}).get("channel_sparsity", CHANNEL_GRID[0])
    grid = [dict(sparsity=s, sparsity_penalty="tl1", tl1_a=TL1_A, channel_sparsity=cc)
            for cc in (c / 2, c) for s in TL1_GRID]
    choice["tl1 + channel"] = choose("tl1 + channel", grid, floor)
    return choice


def fmt(values, spec):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():{spec}} ± {values.std(ddof=1):{spec}}"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--pilot", action="store_true", help="rerun the strength pilot (seed 0) instead")
    parser.add_argument("--slack", type=float, default=0.015, help="pilot: accuracy allowed below ridge")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    machine = (f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
               f"python {platform.python_version()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    if args.pilot:
        print(machine)
        choice = pilot(args.max_iter, args.slack)
        print("chosen:", {k: describe(v) if v is not None else None for k, v in choice.items()})
        print(f"total time {time.perf_counter() - start:.1f} s")
        return

    print("softcnn sparsity on digits")
    print(machine)
    print(f"architecture: {describe(BASE)}, support auto (7x7), tanh, max_iter={args.max_iter}")
    print("strengths (pilot on seed 0's training set, fixed before the reported runs):")
    for name, params in STRENGTHS.items():
        print(f"  {name:<14} {describe(params)}")
    rows = {}
    for name, params in STRENGTHS.items():
        rows[name] = []
        for seed in SEEDS:
            X_train, X_test, y_train, y_test = split(seed)
            rows[name].append(fit_one(params, X_train, y_train, X_test, y_test, seed, args.max_iter))
            r = rows[name][-1]
            print(f"  {name:<14} seed {seed}: acc {r['accuracy']:.4f}  kept {r['kept']:.3f}  "
                  f"removed {r['removed']}  flops {r['flops']}  params {r['n_params']}  "
                  f"{r['solver']} {r['n_iter']} it{' (cap)' if r['capped'] else ''}  {r['time']:.1f} s",
                  flush=True)

    print()
    print(f"Digits, 70/30 stratified split, mean ± sd over seeds {', '.join(map(str, SEEDS))}; "
          f"8 channels, 3x3 kernel, 7x7 support; max_iter={args.max_iter}.")
    print()
    print("| model | accuracy | connections kept | channels removed | flops_ | n_params_ | fits at max_iter |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        col = {k: [r[k] for r in rs] for k in rs[0]}
        print(f"| {name} | {fmt(col['accuracy'], '.3f')} | {fmt(col['kept'], '.3f')} | "
              f"{fmt(col['removed'], '.1f')} | {fmt(col['flops'], '.0f')} | {fmt(col['n_params'], '.0f')} | "
              f"{sum(col['capped'])}/{len(rs)} |")
    print()
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
