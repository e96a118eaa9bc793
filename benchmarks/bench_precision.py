"""Mixed precision and ``torch.compile`` against float32 eager: where do they pay?

1. One training step (forward + backward + ``Adam.step``) of the estimators' ``SoftConvNet``
   (one soft-conv layer, k = 5, F = 8, read-out to 10 classes) on a batch of 128 28x28x1
   images, supports 5, 9 and 'full', in four ways: float32 eager (the reference); the forward
   under ``torch.autocast`` to bfloat16, then to float16 (float32 parameters and optimizer);
   and ``torch.compile(net)`` in float32 (its compile time printed apart, a failure as such).
   Each is printed as ms per step and as a ratio to float32 eager (< 1: faster).
2. Whole fits, where accuracy is judged: ``SoftConvClassifier`` (Adam, ``--epochs`` epochs of
   batches of 128, tying 0.01 to the mean) on 4000 Fashion-MNIST training images (from
   ``../shared/data`` or ``SOFTCNN_DATA``), scored on 2000 test images, with
   ``mixed_precision=None`` and ``'bfloat16'`` from the same seed, supports 5 and 9: fit time,
   its ratio, and both test accuracies.

A way is kept in the package only if it is faster and the fits' accuracy holds (the
estimators offer ``mixed_precision='bfloat16'``; see ``benchmarks/README.md``).

    python benchmarks/bench_precision.py [--device cpu|cuda] [--threads 1 --clock cpu] [--epochs 15] [--no-fits]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch
import torch.nn.functional as F

import bench_layer
from softcnn import SoftConvClassifier
from softcnn.datasets import load_mnist
from softcnn.network import SoftConvNet
from softcnn.solvers import Objective

SUPPORTS = (5, 9, "full")
FIT_SUPPORTS = (5, 9)
AUTOCASTS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def training_step(net, X, y, autocast=None):
    """One Adam step on ``(X, y)`` through the estimators' :class:`~softcnn.solvers.Objective`
    (its forward under ``torch.autocast`` to ``autocast`` if given)."""
    objective = Objective(net, F.cross_entropy, X, y, torch.ones(len(y), device=X.device), [], autocast=autocast)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        objective().backward()
        opt.step()

    return step


def step_table(args, device):
    gen = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(128, 1, 28, 28, device=device, generator=gen)
    y = torch.randint(0, 10, (128,), device=device, generator=gen)
    print(f"{'support':>7} | {'fp32 ms':>8} | {'bf16 ms':>8} {'ratio':>5} | {'fp16 ms':>8} {'ratio':>5} | "
          f"{'compiled ms':>11} {'ratio':>5} {'compile s':>9}")
    for support in SUPPORTS:
        def network():
            return SoftConvNet((1, 28, 28), (8,), 5, padding="same", support=support, n_outputs=10,
                               generator=torch.Generator().manual_seed(0)).to(device, torch.float32)

        t32 = bench_layer.best_time(training_step(network(), X, y), args.repeats, device)
        cells = [f"{support!s:>7} | {t32 * 1e3:8.2f}"]
        for dtype in AUTOCASTS.values():
            t = bench_layer.best_time(training_step(network(), X, y, dtype), args.repeats, device)
            cells.append(f"{t * 1e3:8.2f} {t / t32:5.2f}")
        step = training_step(torch.compile(network()), X, y)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # autograd's trace of a failing compiled backward
                step()  # compiles
        except Exception as exc:  # noqa: BLE001 - any compiler failure is the measurement
            cells.append(f"fails: {type(exc).__name__}")
        else:
            compile_s = time.perf_counter() - start
            t = bench_layer.best_time(step, args.repeats, device)
            cells.append(f"{t * 1e3:11.2f} {t / t32:5.2f} {compile_s:9.1f}")
        print(" | ".join(cells), flush=True)


def fit_table(args, device):
    try:
        X, y = load_mnist("fashion_mnist", subset="train", n_samples=4000, random_state=0)
        X_test, y_test = load_mnist("fashion_mnist", subset="test", n_samples=2000, random_state=0)
    except FileNotFoundError as exc:
        print(f"fits skipped: {exc}")
        return
    print(f"\nfits: 4000 Fashion-MNIST images, Adam, {args.epochs} epochs, tying 0.01; accuracy on 2000 test images")
    print(f"{'support':>7} | {'fp32 s':>7} {'acc':>6} | {'bf16 s':>7} {'acc':>6} {'ratio':>5}")
    for support in FIT_SUPPORTS:
        cells = [f"{support!s:>7}"]
        t32 = None
        for precision in (None, "bfloat16"):
            clf = SoftConvClassifier(channels=(8,), kernel_size=5, support=support, solver="adam", tying=0.01,
                                     batch_size=128, max_iter=args.epochs, n_iter_no_change=10**6,
                                     random_state=0, device=str(device), mixed_precision=precision)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # max_iter reached on purpose
                start = bench_layer.CLOCK()
                clf.fit(X, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = bench_layer.CLOCK() - start
            t32 = t if t32 is None else t32
            cells.append(f"{t:7.1f} {clf.score(X_test, y_test):6.4f}" + ("" if precision is None else f" {t / t32:5.2f}"))
        print(" | ".join(cells), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=list(bench_layer.CLOCKS),
                        help="'cpu': process CPU time, robust on a shared machine with --threads 1 (CPU only)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--no-fits", action="store_true", help="only the training-step table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() > 1):
        parser.error("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    bench_layer.CLOCK = bench_layer.CLOCKS[args.clock]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {name}, {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock; training step: batch 128, 28x28x1, k=5, F=8, best of >= {args.repeats}")
    step_table(args, device)
    if not args.no_fits:
        fit_table(args, device)


if __name__ == "__main__":
    main()
