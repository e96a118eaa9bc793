"""The network of soft-conv layers behind the estimators, and its export."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from .layers import SoftConv2d

__all__ = ["SoftConvNet", "ACTIVATIONS", "POOLINGS", "to_hard_cnn"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "logistic": nn.Sigmoid, "identity": nn.Identity}
POOLINGS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class SoftConvNet(nn.Sequential):
    """Stacked soft-conv layers, optional pooling and dense layers, then a linear read-out.

    Takes images ``(n, C, H, W)`` and returns ``(n, n_outputs)`` scores (logits
    for a classifier).

    Parameters
    ----------
    input_shape : tuple (C, H, W)
    channels : tuple of int
        Output channels of each soft-conv layer.
    kernel_size, stride, padding, support, formulation
        As :class:`~softcnn.layers.SoftConv2d`, the same for every layer.
    pooling : {None, 'max', 'avg'}
        2x2 pooling after each soft-conv layer (1 along an axis of length 1).
    activation : {'relu', 'tanh', 'logistic', 'identity'}
    dense : tuple of int
        Hidden sizes of fully connected layers before the read-out.
    n_outputs : int
    generator : torch.Generator
        The only source of randomness of the initial weights.
    """

    def __init__(
        self,
        input_shape,
        channels,
        kernel_size,
        *,
        stride=1,
        padding="same",
        support="full",
        formulation="auto",
        pooling=None,
        activation="relu",
        dense=(),
        n_outputs=1,
        generator=None,
    ):
        modules = []
        c, h, w = input_shape
        for f in channels:
            layer = SoftConv2d(
                c, f, kernel_size, (h, w), stride=stride, padding=padding, support=support,
                formulation=formulation, generator=generator, dtype=torch.float64,
            )
            modules += [layer, ACTIVATIONS[activation]()]
            c, (h, w) = f, layer.output_shape
            if pooling is not None:
                size = (min(2, h), min(2, w))
                modules.append(POOLINGS[pooling](size, stride=size))
                h, w = h // size[0], w // size[1]
        modules.append(nn.Flatten())
        width = c * h * w
        for units in dense:
            modules += [_linear(width, units, generator), ACTIVATIONS[activation]()]
            width = units
        modules.append(_linear(width, n_outputs, generator))
        super().__init__(*modules)

    @property
    def soft_layers(self) -> list[SoftConv2d]:
        return [m for m in self if isinstance(m, SoftConv2d)]

    @property
    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]


def _linear(n_in: int, n_out: int, generator) -> nn.Linear:
    """An ``nn.Linear`` initialised from ``generator`` (torch's default init uses the global RNG)."""
    lin = nn.Linear(n_in, n_out, dtype=torch.float64)
    bound = 1.0 / math.sqrt(n_in)
    with torch.no_grad():
        for p in (lin.weight, lin.bias):
            p.copy_((2 * torch.rand(p.shape, generator=generator, dtype=torch.float64) - 1) * bound)
    return lin


def to_hard_cnn(net: SoftConvNet, *, odd_kernel_sizes: bool = False) -> nn.Sequential:
    """Replace every soft-conv layer by the ``nn.Conv2d`` of its mean kernel, pruned and cropped.

    Channels without any nonzero weight or bias are dropped (when the
    activation maps 0 to 0, so they output zeros), with the matching input
    channels of the next soft-conv layer or columns of the next linear layer.
    Each conv's kernel is cropped to the largest learned kernel size of its
    kept channels (:func:`softcnn.diagnostics.kernel_sizes`), at most the
    nominal ``kernel_size``: weights outside the nominal window are dropped
    as before (exact when locality has zeroed them), and smaller learned
    kernels (e.g. from ``locality_penalty='rings'``) give smaller convs;
    ``odd_kernel_sizes=True`` (``locality_penalty='full_rings'``) keeps
    them centred windows of odd size (:func:`~softcnn.diagnostics.kernel_sizes`
    with ``odd=True``). Exact when, in addition, the kernels are tied
    (deviations zero).
    """
    from .diagnostics import _activation_keeps_zero, active_channels, kernel_sizes

    modules = []
    keep_in = None  # kept channels of the previous soft-conv layer
    spatial = None
    for m in net:
        if isinstance(m, SoftConv2d):
            keep = active_channels(m)
            if not _activation_keeps_zero(net, m) or not keep.any():
                keep = np.ones_like(keep)  # constant nonzero outputs (or nothing left): keep all
            sizes = kernel_sizes(m, odd=odd_kernel_sizes)[keep]
            size = int(min(max(int(sizes.max()), 1), m.kernel_size))
            modules.extend(m.to_conv2d(size=size, out_channels=keep, in_channels=keep_in))
            keep_in, spatial = keep, m.output_shape
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and spatial is not None:
            modules.append(copy.deepcopy(m))
            ks = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            spatial = (spatial[0] // ks[0], spatial[1] // ks[1])
        elif isinstance(m, nn.Linear) and keep_in is not None:
            lin = copy.deepcopy(m)
            # Flatten orders features (channel, row, column)
            cols = torch.as_tensor(np.repeat(keep_in, spatial[0] * spatial[1]), device=m.weight.device)
            new = nn.Linear(int(cols.sum()), m.out_features, dtype=m.weight.dtype, device=m.weight.device)
            with torch.no_grad():
                new.weight.copy_(lin.weight[:, cols])
                new.bias.copy_(lin.bias)
            modules.append(new)
            keep_in = None
        else:
            modules.append(copy.deepcopy(m))
    return nn.Sequential(*modules)
