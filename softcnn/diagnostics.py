"""How conv-like a fitted network is: tying deviation, locality ratio, kernels."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["tying_deviation", "locality_ratio", "layer_kernels", "layer_shared_kernels"]


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
        resid = (w - layer.mean_kernel()) * layer.mask.unsqueeze(1)
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
