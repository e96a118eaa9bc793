"""Forward + backward time and peak memory of one SoftConv2d against three references.

For every geometry (8x8x1, 28x28x1, 32x32x3 images), nominal kernel k = 3, 5, support
k, k + 4 and 'full', and F = 8, 32 output channels ('same' padding, stride 1, float32,
a batch of 128), one forward + backward (input gradient included) of:

* ``soft``: :class:`softcnn.layers.SoftConv2d` with ``formulation='auto'`` (the tile it
  picks is printed);
* ``conv``: ``nn.Conv2d`` of the same geometry (the CNN limit);
* ``matmul``: the GEMM ``(n, C H W) @ (C H W, L F)``, whose multiply-adds are those of
  the layer with full support (the limit for ``'full'``);
* ``naive``: what a user would write, ``nn.Linear(C H W, L F)`` whose weight is multiplied
  by the support mask in every forward.

Times are the best of ``--repeats`` runs (more while under 0.2 s; of 2 when one takes over
3 s) after a warm-up, the four passes of a row interleaved (one of each in turn, so that
their ratios are taken under the same conditions), wall clock, or with
``--threads 1 --clock cpu`` the process's CPU time (what an idle machine's wall clock would
read, and far less disturbed by other processes on a shared machine).
GFLOP/s = 2 x MACs x 3 / time: MACs (column MMAC) are the soft layer's forward multiply-adds
per batch over existing offsets only (bias excluded), n C H W L F for the matmul, and the
backward is counted as twice the forward. ``%mm`` is the soft layer's GFLOP/s
over the matmul's. Peak memory: bytes of all tensors allocated during one forward + backward
and alive at once (gradients included, inputs and parameters excluded), tracked op by op
with a TorchDispatchMode on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/bench_layer.py [--batch 128] [--repeats 3] [--device cpu|cuda] [--threads 1 --clock cpu]
    python benchmarks/bench_layer.py --sweep      # every tile shape, to check the 'auto' rule
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from softcnn.layers import SoftConv2d, choose_tile, tile_macs

IMAGES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]  # (C, H, W)
KERNELS = (3, 5)
CHANNELS = (8, 32)


def supports(k):
    return (k, k + 4, "full")


# ------------------------------------------------------------------ measuring
class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the mode and alive at once.

    Storages that existed before (inputs, parameters) are not counted; a storage
    is freed when its last reference dies (weakref finalizer). Workspace that a
    kernel allocates internally without dispatching an op is not seen.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live, self._external = {}, {}

    @staticmethod
    def _storages(tree):
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.nbytes():
                    yield st.data_ptr(), st

    def _drop(self, table, key, nbytes):
        if table.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key, st in self._storages((args, kwargs)):
            if key not in self._live and key not in self._external:
                self._external[key] = True
                weakref.finalize(st, self._drop, self._external, key, 0)
        out = func(*args, **(kwargs or {}))
        for key, st in self._storages(out):
            if key in self._live or key in self._external:
                continue
            self._live[key] = True
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._drop, self._live, key, st.nbytes())
        return out


def peak_bytes(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakMemory() as mem:
        fn()
    return mem.peak


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = time.perf_counter


def best_times(fns, repeats, device, min_time=0.2, max_repeats=50, slow=3.0) -> list[float]:
    """Best of ``repeats`` timed calls of each of ``fns`` (more while under ``min_time``) after a
    warm-up call, the calls interleaved (one of each in turn), so that a ratio of two of them is
    taken under the same conditions; a function whose warm-up takes over ``slow`` seconds gets
    the best of it and one more call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        t0 = CLOCK()
        fn()
        sync()
        return CLOCK() - t0

    first = [timed(fn) for fn in fns]  # warm-up
    times = [[t] if t > slow else [] for t in first]  # a slow warm-up counts as a sample
    wanted = [2 if t > slow else repeats for t in first]
    start = time.perf_counter()
    while True:
        active = [i for i in range(len(fns))
                  if len(times[i]) < wanted[i]
                  or (first[i] <= slow and time.perf_counter() - start < min_time and len(times[i]) < max_repeats)]
        if not active:
            return [min(t) for t in times]
        for i in active:
            times[i].append(timed(fns[i]))


def best_time(fn, repeats, device, min_time=0.2, max_repeats=50, slow=3.0) -> float:
    """:func:`best_times` of one function."""
    return best_times([fn], repeats, device, min_time, max_repeats, slow)[0]


def fwd_bwd(module_fn, params, x, grad_out):
    """A closure running one forward + backward, gradients reset as ``zero_grad(set_to_none=True)``."""

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        module_fn(x).backward(grad_out)

    return run


# ----------------------------------------------------------------- references
def support_mask(layer: SoftConv2d) -> np.ndarray:
    """Boolean ``(L, H W)``: the pixels each position's support reaches (the naive layer's mask)."""
    gh, gw = layer.gh, layer.gw
    oh = np.arange(gh.size)[None, :] - gh.anchors()[:, None] - gh.lo
    ow = np.arange(gw.size)[None, :] - gw.anchors()[:, None] - gw.lo
    vh = (oh >= 0) & (oh < gh.extent)
    vw = (ow >= 0) & (ow < gw.extent)
    return (vh[:, None, :, None] & vw[None, :, None, :]).reshape(layer.n_positions, -1)


class MaskedLinear(nn.Module):
    """The naive soft conv: a dense ``nn.Linear`` whose weight is masked to the supports in every forward."""

    def __init__(self, layer: SoftConv2d, device, dtype):
        super().__init__()
        C, Fo = layer.in_channels, layer.out_channels
        H, W = layer.input_shape
        self.out_shape = (Fo, *layer.output_shape)
        self.linear = nn.Linear(C * H * W, layer.n_positions * Fo, device=device, dtype=dtype)
        m = np.broadcast_to(support_mask(layer)[None, :, None, :], (Fo, layer.n_positions, C, H * W))
        self.register_buffer("mask", torch.as_tensor(m.reshape(Fo * layer.n_positions, -1).copy(),
                                                     device=device, dtype=dtype))

    def forward(self, x):
        out = F.linear(x.flatten(1), self.linear.weight * self.mask, self.linear.bias)
        return out.view(x.shape[0], *self.out_shape)


def gflops(macs: int, seconds: float) -> float:
    """Forward + backward GFLOP/s: 2 flops per multiply-add, the backward twice the forward."""
    return 2 * 3 * macs / seconds / 1e9


def soft_macs(layer: SoftConv2d, n: int) -> int:
    """Forward multiply-adds of a batch: existing offsets x channels x F at every position."""
    return n * int(layer.mask[:, :-1].sum()) * layer.out_channels


# ---------------------------------------------------------------------- runs
def make_layer(C, H, W, k, support, Fo, device, dtype, formulation="auto", tile_shape=None):
    layer = SoftConv2d(C, Fo, k, (H, W), padding="same", support=support, formulation=formulation,
                       device=device, dtype=dtype, generator=torch.Generator().manual_seed(0))
    if tile_shape is not None:
        layer._build_tiles("tiled", device, tile_shape)
    with torch.no_grad():
        layer.deviation.normal_(0.0, 0.01, generator=torch.Generator(device=device).manual_seed(1))
    return layer


def measure(runs, args, device):
    """Best times of ``runs`` (interleaved) and their peak memory."""
    return best_times(runs, args.repeats, device), [peak_bytes(run, device) for run in runs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="'cpu': process CPU time, robust on a shared machine with --threads 1 (CPU only)")
    parser.add_argument("--sweep", action="store_true",
                        help="time every tile shape of each geometry instead of the references")
    parser.add_argument("--images", nargs="+", default=None, metavar="CxHxW",
                        help="only these images, e.g. 1x28x28 (default: 1x8x8 1x28x28 3x32x32)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() > 1):
        parser.error("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    dtype, n = torch.float32, args.batch
    images = [tuple(int(v) for v in i.split("x")) for i in args.images] if args.images else IMAGES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {name}, {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"float32, batch {n}, best of >= {args.repeats}, {args.clock} clock")
    if args.sweep:
        return sweep(images, args, device, dtype)
    gen = torch.Generator(device=device).manual_seed(2)
    header = (f"{'image':>8} {'k':>2} {'support':>7} {'F':>3} {'tile':>7} {'MMAC':>6} | {'soft ms':>8} {'GF/s':>5} "
              f"| {'conv ms':>7} {'x conv':>6} | {'mm ms':>7} {'%mm':>4} | {'naive ms':>8} {'x naive':>7} "
              f"| peak MB: {'soft':>6} {'conv':>6} {'mm':>6} {'naive':>6}")
    print(header)
    print("-" * len(header))
    targets = []
    for C, H, W in images:
        x = torch.randn(n, C, H, W, device=device, dtype=dtype, generator=gen, requires_grad=True)
        x2 = x.detach().reshape(n, -1).requires_grad_()
        for Fo in CHANNELS:
            L = H * W
            mm_macs = n * C * H * W * L * Fo
            w_mm = torch.randn(C * H * W, L * Fo, device=device, dtype=dtype, generator=gen) / math.sqrt(C * H * W)
            w_mm.requires_grad_()
            g_mm = torch.randn(n, L * Fo, device=device, dtype=dtype, generator=gen)
            mm = fwd_bwd(w_mm.__rmatmul__, [w_mm], x2, g_mm)
            for k in KERNELS:
                conv = nn.Conv2d(C, Fo, k, padding="same", device=device, dtype=dtype)
                g_out = torch.randn(n, Fo, H, W, device=device, dtype=dtype, generator=gen)
                for support in supports(k):
                    layer = make_layer(C, H, W, k, support, Fo, device, dtype)
                    naive = MaskedLinear(layer, device, dtype)
                    # every row times its references again, interleaved with the layer: ratios of one run
                    (t_soft, t_mm, t_conv, t_naive), (m_soft, m_mm, m_conv, m_naive) = measure(
                        [fwd_bwd(layer, list(layer.parameters()), x, g_out), mm,
                         fwd_bwd(conv, list(conv.parameters()), x, g_out),
                         fwd_bwd(naive, list(naive.parameters()), x, g_out)], args, device)
                    macs = soft_macs(layer, n)
                    pct = gflops(macs, t_soft) / gflops(mm_macs, t_mm)
                    tile = "x".join(map(str, layer.tile_shape))
                    print(f"{C}x{H}x{W:<3} {k:>2} {support!s:>7} {Fo:>3} {tile:>7} {macs / 1e6:6.0f} | "
                          f"{t_soft * 1e3:8.2f} {gflops(macs, t_soft):5.1f} | {t_conv * 1e3:7.2f} {t_soft / t_conv:6.2f} | "
                          f"{t_mm * 1e3:7.2f} {100 * pct:3.0f}% | {t_naive * 1e3:8.2f} {t_soft / t_naive:7.2f} | "
                          f"{'':9}{m_soft / 2**20:6.1f} {m_conv / 2**20:6.1f} {m_mm / 2**20:6.1f} "
                          f"{m_naive / 2**20:6.1f}", flush=True)
                    if support == "full":
                        targets.append((f"'full' {C}x{H}x{W} k={k} F={Fo}: {100 * pct:.0f}% of the matmul's GFLOP/s",
                                        pct >= 0.7))
                    if (C, H, k, Fo) == (1, 28, 5, 8) and support != "full":
                        targets.append((f"support {support} 28x28 k=5 F=8: {t_soft / t_conv:.2f} x nn.Conv2d",
                                        t_soft / t_conv <= 3.0))
                    del layer, naive
            del w_mm, g_mm
    print("\ntargets: 'full' >= 70% of the dense matmul's throughput; 28x28 k=5 F=8 windowed <= 3x nn.Conv2d")
    for text, ok in targets:
        print(f"  {'met   ' if ok else 'MISSED'} {text}")


def sweep(images, args, device, dtype):
    """Every tile shape of every geometry: is the 'auto' tile (choose_tile) the fastest?"""
    gen = torch.Generator(device=device).manual_seed(2)
    n = args.batch
    worst = 1.0
    for C, H, W in images:
        x = torch.randn(n, C, H, W, device=device, dtype=dtype, generator=gen, requires_grad=True)
        for Fo in CHANNELS:
            g_out = torch.randn(n, Fo, H, W, device=device, dtype=dtype, generator=gen)
            for k in KERNELS:
                for support in supports(k):
                    base = make_layer(C, H, W, k, support, Fo, device, dtype)
                    gh, gw = base.gh, base.gw
                    auto = choose_tile(gh, gw, C, Fo)
                    shapes = [(a, b) for a in _divisors(gh.n_out) for b in _divisors(gw.n_out)]
                    least = min(tile_macs(gh, gw, C, Fo, s) for s in shapes)
                    # tiles doing > 3x the fewest multiply-adds are never close: not timed
                    shapes = [s for s in shapes if tile_macs(gh, gw, C, Fo, s) <= 3 * least or s == auto]
                    times = {}
                    for s in shapes:
                        layer = make_layer(C, H, W, k, support, Fo, device, dtype, tile_shape=s)
                        times[s] = best_time(fwd_bwd(layer, list(layer.parameters()), x, g_out), args.repeats, device)
                        del layer
                    fastest = min(times, key=times.get)
                    worst = max(worst, times[auto] / times[fastest])
                    ranked = "  ".join(f"{a}x{b}:{t * 1e3:.1f}" for (a, b), t in sorted(times.items(), key=lambda kv: kv[1]))
                    print(f"{C}x{H}x{W} k={k} support={support!s:<4} F={Fo:<2} auto {auto[0]}x{auto[1]} "
                          f"{times[auto] * 1e3:7.2f} ms, fastest {fastest[0]}x{fastest[1]} "
                          f"({times[auto] / times[fastest]:.2f}x)  | {ranked}", flush=True)
    print(f"worst auto / fastest: {worst:.2f}")


def _divisors(m):
    return [d for d in range(1, m + 1) if m % d == 0]


if __name__ == "__main__":
    main()
