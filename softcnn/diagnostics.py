"""How conv-like a fitted network is: tying deviation, locality ratio, kernels."""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "tying_deviation",
    "locality_ratio",
    "layer_kernels",
    "layer_shared_kernels",
    "n_tied_positions",
    "active_channels",
    "kernel_sizes",
    "n_free_parameters",
    "structure",
]


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


@torch.no_grad()
def tying_deviation(net) -> float:
    r"""Share of kernel energy not explained by the shared kernel.

    :math:`\sum_{l,p} \|w_p - \bar w\|^2 / \sum_{l,p} \|w_p\|^2` over every
    soft-conv layer ``l``, with ``w_p`` the kernel vector of a unit (weights
    and bias, existing offsets only) and ``w̄`` the mean kernel. 0 is a CNN.
    """
    num = den = 0.0
    for layer in net.soft_layers:
        w = layer.kernels()
        # w_p - w̄ = d_p - mean(d): from the deviations, so that a CNN reads exactly 0
        d = layer.masked_deviation()
        count = layer.mask.sum(0).clamp(min=1).to(d.dtype)
        resid = (d - d.sum(0) / count) * layer.mask.unsqueeze(1)
        num += float(resid.pow(2).sum())
        den += float(w.pow(2).sum())
    return _ratio(num, den)


@torch.no_grad()
def locality_ratio(net) -> float:
    """Share of weight energy (biases excluded) outside the nominal ``k x k`` windows."""
    num = den = 0.0
    for layer in net.soft_layers:
        w2 = layer.kernels()[..., :-1].pow(2)
        outside = ~layer.window.repeat(layer.in_channels)
        num += float(w2[..., outside].sum())
        den += float(w2.sum())
    return _ratio(num, den)


@torch.no_grad()
def layer_kernels(layer) -> np.ndarray:
    """Per-position kernels ``(Lh, Lw, F, C, Sh, Sw)``; offsets absent at a position are 0."""
    w = layer.kernels()[..., :-1].cpu().numpy()
    return w.reshape(*layer.output_shape, layer.out_channels, layer.in_channels, *layer.support_shape)


@torch.no_grad()
def layer_shared_kernels(layer) -> np.ndarray:
    """Mean kernel over positions ``(F, C, Sh, Sw)`` (each offset averaged where it exists)."""
    m = layer.mean_kernel()[:, :-1].cpu().numpy()
    return m.reshape(layer.out_channels, layer.in_channels, *layer.support_shape)


# ----------------------------------------------------------- exact structure
def _activation_keeps_zero(net, layer) -> bool:
    """Whether the activation after ``layer`` maps 0 to 0 (then a zero channel outputs zeros)."""
    modules = list(net)
    i = next(j for j, m in enumerate(modules) if m is layer)
    act = modules[i + 1] if i + 1 < len(modules) else None
    if act is None:
        return True
    with torch.no_grad():
        return float(act(torch.zeros(1, dtype=torch.float64))) == 0.0


@torch.no_grad()
def n_tied_positions(layer) -> int:
    """Positions whose kernels (every channel, weights and bias, existing offsets) equal ``m`` exactly."""
    d = layer.masked_deviation()
    return int((d == 0).flatten(1).all(1).sum())


@torch.no_grad()
def active_channels(layer) -> np.ndarray:
    """Boolean ``(F,)``: the channel has a nonzero weight or bias at some position."""
    return (layer.kernels() != 0).any(2).any(0).cpu().numpy()


@torch.no_grad()
def kernel_sizes(layer, odd: bool = False) -> np.ndarray:
    """Learned kernel size of each output channel, ``(F,)`` ints.

    The size ``s`` of the smallest centred window (see
    :meth:`~softcnn.layers.SoftConv2d.kernel_levels`) that contains every
    nonzero weight of the channel at every position and input channel; 0 for
    a channel without nonzero weights.

    With ``odd=True`` (an odd ``kernel_size``; ``locality_penalty='full_rings'``)
    only the windows of odd size count, the ones centred on the nominal
    window: an even size is rounded up to the next odd one (windows are
    nested, so it holds the same weights). Full rings zero whole rings, but
    other penalties or ``threshold`` may zero the half-ring that makes the
    size even.
    """
    Fo, C = layer.out_channels, layer.in_channels
    nz = (layer.kernels()[..., :-1] != 0).any(0).reshape(Fo, C, -1).any(1).cpu().numpy()  # (F, Sh*Sw)
    levels = layer.kernel_levels().ravel()
    sizes = np.where(nz, levels[None, :], 0).max(1).astype(int)
    if odd:
        sizes = np.where((sizes > 0) & (sizes % 2 == 0), sizes + 1, sizes)
    return sizes


@torch.no_grad()
def n_free_parameters(layer) -> int:
    r"""Free parameters of a soft-conv layer after exact ties and zeros.

    For every kernel entry ``(f, k)`` (bias included): the number of
    distinct nonzero values of :math:`w_{p,f,k}` over the positions where it
    exists (positions tied to each other share one parameter).
    """
    w = layer.kernels().flatten(1)  # (L, F*K); absent offsets are 0 and so not counted
    s = w.sort(0).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    return int((new & (s != 0)).sum())


@torch.no_grad()
def structure(net, *, odd_kernel_sizes: bool = False) -> dict:
    r"""Exact-structure diagnostics of a fitted network.

    Parameters
    ----------
    net : SoftConvNet
    odd_kernel_sizes : bool, default=False
        Count kernel sizes in centred odd windows (:func:`kernel_sizes` with
        ``odd=True``), as for ``locality_penalty='full_rings'``.

    Returns
    -------
    dict with keys
        ``n_tied_positions`` (list of int per soft-conv layer),
        ``kernel_sizes`` (list of ``(F,)`` int arrays), ``n_active_channels``
        (list of int), ``n_params`` (int) and ``flops`` (int).

    Notes
    -----
    ``n_params``: free soft-conv parameters (:func:`n_free_parameters`)
    plus the nonzero weights and the biases of the dense and read-out layers
    (columns fed by pruned channels excluded).

    ``flops``: multiply-adds per sample of the equivalent CNN,

    .. math:: \sum_i \sum_j r_i c_i\, d_{i-1}\, s_{ij}^2 ,

    with :math:`r_i c_i` the output positions of soft-conv layer ``i``,
    :math:`d_{i-1}` its active input channels and :math:`s_{ij}` the learned
    size of its channel ``j`` (0 when pruned), plus ``in x out`` of each
    dense and read-out layer (inputs from pruned channels excluded). A
    channel counts as pruned only when the activation maps 0 to 0.
    """
    out = {"n_tied_positions": [], "kernel_sizes": [], "n_active_channels": [], "n_params": 0, "flops": 0}
    d_prev = None
    active_prev, spatial = None, None
    for m in net:
        if type(m).__name__ == "SoftConv2d":
            sizes = kernel_sizes(m, odd=odd_kernel_sizes)
            active = active_channels(m)
            if not _activation_keeps_zero(net, m):
                active = np.ones_like(active)
            d_in = m.in_channels if d_prev is None else d_prev
            r, c = m.output_shape
            out["flops"] += int(r * c * d_in * (sizes[active] ** 2).sum())
            out["n_tied_positions"].append(n_tied_positions(m))
            out["kernel_sizes"].append(sizes)
            out["n_active_channels"].append(int(active.sum()))
            out["n_params"] += n_free_parameters(m)
            d_prev, active_prev, spatial = int(active.sum()), active, m.output_shape
        elif isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)) and spatial is not None:
            ks = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            spatial = (spatial[0] // ks[0], spatial[1] // ks[1])
        elif isinstance(m, torch.nn.Linear):
            W = m.weight
            if active_prev is not None:  # first linear after the convolutions
                per = spatial[0] * spatial[1]
                cols = torch.as_tensor(np.repeat(active_prev, per), device=W.device)
                W = W[:, cols]
                active_prev = None
            out["n_params"] += int((W != 0).sum()) + m.bias.numel()
            out["flops"] += int(W.shape[0] * W.shape[1])
    return out
