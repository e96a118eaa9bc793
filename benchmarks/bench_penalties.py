"""Cost of every registered penalty against one training step.

The network is the estimators' ``SoftConvNet`` (one soft-conv layer, ReLU, read-out to 10
classes) on 28x28x1 images, k = 5, F = 8, in float32 (what Adam/SGD fit in), for
support k + 4 and 'full'. One *training step* is forward + backward + ``Adam.step`` on a
batch of 128. For every penalty in the registry (``softcnn.penalties.supported_penalties``)
it times what a step adds:

* a smooth penalty: its ``value`` plus the backward of that value (autograd);
* a non-smooth penalty: its ``prox_net`` (applied after every step), timed as in a fit: each
  timed call follows an untimed training step, from the same parameters and optimizer state
  for every penalty, so a prox that warm-starts from its previous call (the TV proxes) gets
  the change of one step, not a repeat of its last input; its first (cold) call is not
  timed. Its ``value`` (no gradient) is also shown, though the solvers compute it once per
  epoch, not per step.

Each cost is printed as a percentage of the step (target: <= 10% each) with the sum over
all penalties, and then the floor of the exact pairwise prox (tying l1/all): sorting its rows
alone, as it sorts them. Times are the best of ``--repeats`` (more while under 0.2 s) after a first
call, or that first call alone when it takes over 0.5 s (not for the step or a prox); the
deviations are set to small random values first (a zero ``d`` makes some proxes trivial).

    python benchmarks/bench_penalties.py [--batch 128] [--repeats 5] [--threads 1 --clock cpu] [--supports 9]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from softcnn import SoftConvClassifier, _kernels
from softcnn.network import SoftConvNet
from softcnn.penalties import make_penalties, supported_penalties

#: the estimator parameters naming each strength's options (the registry's keys)
OPTIONS = {
    "tying": ("tying_penalty", "tying_graph"),
    "locality": ("locality_penalty",),
    "sparsity": ("sparsity_penalty",),
    "channel_sparsity": (),
    "alpha": (),
}
STRENGTH = 0.1
LEARNING_RATE = 1e-3
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn, repeats, clock, setup=None, min_time=0.2, max_repeats=50, slow=0.5, warm_up=False):
    """Best of ``repeats`` timed calls after a first call; a first call slower than ``slow`` s is
    the only one (the TV proxes take minutes at 'full'), unless ``warm_up`` (the first call sets
    up state, like Adam's moments or a prox's warm start): then it is not timed, and one more
    call is, if it was slow."""
    if setup:
        setup()
    t0 = clock()
    fn()
    first = clock() - t0
    if first > slow:
        if not warm_up:
            return first
        repeats = 1
    times, start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < max_repeats):
        if setup:
            setup()
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def every_penalty():
    """``(name, Penalty)`` for every registered option of every strength, from default estimator params."""
    base = SoftConvClassifier().get_params()
    for strength, names in OPTIONS.items():
        for key in supported_penalties(strength):
            params = {**base, **{s: 0.0 for s in OPTIONS}, strength: STRENGTH, **dict(zip(names, key))}
            (_, pen), = make_penalties(params)
            yield f"{strength}" + (f" {'/'.join(key)}" if key else ""), pen


def run_support(support, X, y, gen, args, clock) -> dict:
    """Print the step's and every penalty's cost for one support; return each penalty's share of the step."""
    net = SoftConvNet((1, 28, 28), (8,), 5, padding="same", support=support, n_outputs=10,
                      generator=torch.Generator().manual_seed(0)).float()
    layer = net.soft_layers[0]
    with torch.no_grad():
        layer.deviation.normal_(0.0, 0.01, generator=gen)
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=LEARNING_RATE)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(X), y).backward()
        opt.step()

    t_step = best_time(step, args.repeats, clock, warm_up=True)
    snapshot = [p.detach().clone() for p in params]
    opt_snapshot = copy.deepcopy(opt.state_dict())

    def restore():
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        opt.load_state_dict(copy.deepcopy(opt_snapshot))

    print(f"\nsupport={support} ({layer.formulation}, tile {layer.tile_shape[0]}x{layer.tile_shape[1]}): "
          f"training step {t_step * 1e3:.2f} ms")
    print(f"  {'penalty':<20} {'kind':<10} {'per step':>9} {'% step':>7} | {'value':>9} {'% step':>7}")
    total, shares = 0.0, {}
    for name, pen in every_penalty():
        kind, t, value = penalty_cost(pen, net, params, restore, step, args, clock)
        total += t
        shares[name] = t / t_step
        v = f"{'':9} {'':7}" if math.isnan(value) else f"{value * 1e3:9.2f} {100 * value / t_step:6.1f}%"
        flag = "" if t / t_step <= 0.10 else "  > 10%"
        print(f"  {name:<20} {kind:<10} {t * 1e3:9.2f} {100 * t / t_step:6.1f}% | {v}{flag}")
    print(f"  {'all penalties':<20} {'':<10} {total * 1e3:9.2f} {100 * total / t_step:6.1f}%")
    # the floor of an exact pairwise prox: sorting its rows (one per kernel entry, positions along
    # them) with the 32-bit keys its CPU path sorts, on this layer's kernel view
    rows = layer.unmasked_kernels().detach().movedim(0, -1).reshape(-1, layer.n_positions).contiguous()
    bits = _kernels.pairwise_index_bits(rows.shape[1])
    keys = np.empty(rows.shape, np.int32)
    _kernels.pairwise_keys(rows.numpy().view(np.int32), np.ones((1, rows.shape[1]), np.uint8), bits, keys)
    t_sort = best_time(lambda: keys.copy().sort(axis=-1), args.repeats, clock)
    t_copy = best_time(keys.copy, args.repeats, clock)  # (a sort of sorted keys would be faster)
    t_sort -= t_copy
    print(f"  (sorting the 32-bit keys of the {rows.shape[0]} rows of {rows.shape[1]} positions that tying "
          f"l1/all sorts: {t_sort * 1e3:.2f} ms, {100 * t_sort / t_step:.1f}% of the step)")
    return shares


def penalty_cost(pen, net, params, restore, step, args, clock):
    """``(kind, seconds per step, seconds of the value)``: value + backward, or prox (value: NaN if smooth).

    A prox is timed after ``restore`` (the same start for every penalty), each call after an
    untimed training ``step``, as in a fit."""
    if pen.smooth:
        def cost():
            for p in params:
                p.grad = None
            (STRENGTH * pen.value(net)).backward()

        return "smooth", best_time(cost, args.repeats, clock), float("nan")

    restore()
    t = best_time(lambda: pen.prox_net(net, LEARNING_RATE * STRENGTH), args.repeats, clock, setup=step,
                  warm_up=True)
    restore()

    def value_only():
        with torch.no_grad():
            pen.value(net)

    return "prox", t, best_time(value_only, args.repeats, clock)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS))
    parser.add_argument("--supports", nargs="+", default=["9", "full"],
                        help="supports to run (default: 9 full; 'full' takes minutes: the TV proxes)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1")
    clock = CLOCKS[args.clock]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32, batch {args.batch}, 28x28x1, k=5, F=8, "
          f"best of >= {args.repeats}, {args.clock} clock")
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(args.batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    worst = {}
    for support in [s if s == "full" else int(s) for s in args.supports]:
        worst.update({(support, name): r for name, r in run_support(support, X, y, gen, args, clock).items()})
    over = {k: v for k, v in worst.items() if v > 0.10}
    print("\ntarget: every penalty <= 10% of a training step: " + ("met" if not over else "MISSED by"))
    for (s, n), v in over.items():
        print(f"  {n} (support={s}) {100 * v:.0f}%")


if __name__ == "__main__":
    main()
