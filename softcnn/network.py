"""The network of soft-conv layers behind the estimators, and its export."""

from __future__ import annotations

import copy
import math

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


def to_hard_cnn(net: SoftConvNet) -> nn.Sequential:
    """Replace every soft-conv layer by the ``nn.Conv2d`` of its mean kernel cropped to the window."""
    modules = []
    for m in net:
        if isinstance(m, SoftConv2d):
            modules.extend(m.to_conv2d())
        else:
            modules.append(copy.deepcopy(m))
    return nn.Sequential(*modules)
