r"""Penalty objects.

Each penalty is a small class with a :meth:`Penalty.value` (the term
:math:`\Omega` of the objective, summed over the soft-conv layers and
averaged over each layer's positions, so a strength means the same on an
8x8 and a 28x28 image) and a class method :meth:`Penalty.from_params` that
reads its options from the estimator's parameters. Smooth penalties are
differentiated by autograd; non-smooth ones add a proximal operator.

A penalty is attached to an estimator parameter (its *strength*) through a
registry: adding a penalty means adding a class decorated with
:func:`register`, not editing the estimators.

The tying penalties use the layer's parameterization ``w_p = m + d_p``.
For the ``'mean'`` graph the shared kernel ``m`` is free, so penalising
``d_p`` is the same as penalising ``w_p - m`` at the best ``m``: for
``'l2'`` that best ``m`` is the mean kernel ``w̄``, which gives the design's
:math:`\sum_p \|w_p - \bar w\|^2` at the optimum.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import numpy as np
import torch

from .layers import SoftConv2d

__all__ = [
    "Penalty",
    "TyingL2Mean",
    "TyingL2Grid",
    "LocalityL2",
    "Ridge",
    "locality_profile",
    "make_penalties",
    "preconditioner",
    "register",
    "supported_penalties",
]

# strength parameter -> {option key -> penalty class}
_REGISTRY: dict[str, dict[tuple, type[Penalty]]] = {}
# strength parameter -> names of the parameters whose values form the key
_KEYS: dict[str, tuple[str, ...]] = {"tying": ("tying_penalty", "tying_graph"), "locality": ("locality_penalty",)}


def register(strength: str, *key: str) -> Callable[[type[Penalty]], type[Penalty]]:
    """Class decorator: use the class for ``strength`` when its option parameters equal ``key``."""

    def deco(cls):
        _REGISTRY.setdefault(strength, {})[tuple(key)] = cls
        cls.strength = strength
        return cls

    return deco


def supported_penalties(strength: str) -> list[tuple]:
    """Option keys registered for a strength parameter (e.g. ``('l2', 'mean')`` for ``'tying'``)."""
    return sorted(_REGISTRY.get(strength, {}))


class Penalty(ABC):
    """Base class of penalties.

    Subclasses implement :meth:`layer_value`, the penalty of one
    :class:`~softcnn.layers.SoftConv2d` *summed* over positions; the base
    class averages it over positions and sums over layers.
    """

    strength: str = ""
    #: whether autograd can handle it (else the solver needs a prox)
    smooth: bool = True

    @classmethod
    def from_params(cls, params: Mapping) -> Penalty:
        """Build the penalty from the estimator's parameters."""
        return cls()

    @abstractmethod
    def layer_value(self, layer: SoftConv2d) -> torch.Tensor:
        """Penalty of one soft-conv layer, summed over its positions."""

    def value(self, net) -> torch.Tensor:
        """Penalty of a network: per-layer values averaged over positions, summed over layers."""
        return sum(self.layer_value(layer) / layer.n_positions for layer in net.soft_layers)

    def curvature(self, layer: SoftConv2d) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Rough diagonal curvature ``(κ_m, κ_d)`` of :meth:`value` per unit strength.

        ``κ_m`` along an entry of ``m``; ``κ_d`` is ``L`` times the curvature
        along an entry of one ``d_p``. Only steers the solver's preconditioner
        (:func:`preconditioner`); 0 by default.
        """
        return 0.0, 0.0

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


# --------------------------------------------------------------------- tying
def _grid_differences(layer: SoftConv2d):
    """Deviation differences between 4-neighbour positions and the masks of offsets existing at both."""
    Lh, Lw = layer.output_shape
    d = layer.deviations().reshape(Lh, Lw, *layer.deviation.shape[1:])  # (Lh, Lw, F, K)
    m = layer.mask.reshape(Lh, Lw, 1, -1)
    return [
        (d[1:] - d[:-1], m[1:] & m[:-1]),
        (d[:, 1:] - d[:, :-1], m[:, 1:] & m[:, :-1]),
    ]


@register("tying", "l2", "mean")
class TyingL2Mean(Penalty):
    r"""Ridge tying to a shared kernel: :math:`\sum_p \|w_p - m\|_2^2` with ``m`` free.

    Hierarchical shrinkage of every position's kernel (bias included) to a
    common kernel; at the optimum ``m`` is the mean kernel.
    """

    def layer_value(self, layer):
        return layer.masked_deviation().pow(2).sum()

    def curvature(self, layer):
        return 0.0, 2.0


@register("tying", "l2", "grid")
class TyingL2Grid(Penalty):
    r"""Laplacian smoothing across the image: :math:`\sum_{p \sim q} \|w_p - w_q\|_2^2`.

    Pairs are 4-neighbours on the grid of output positions; only offsets that
    exist at both positions are compared.
    """

    def layer_value(self, layer):
        return sum((diff * m).pow(2).sum() for diff, m in _grid_differences(layer))

    def curvature(self, layer):
        return 0.0, 8.0  # largest eigenvalue of twice the grid Laplacian


# ------------------------------------------------------------------ locality
_PROFILES = ("window", "distance", "loco")


def locality_profile(
    layer: SoftConv2d,
    profile="window",
    *,
    power: float = 1.0,
    loco_gamma: float = 0.5,
    loco_eta: float = 2.0,
) -> torch.Tensor:
    r"""Per-offset locality weights ``g(δ)`` of a layer, shape ``support_shape``.

    Parameters
    ----------
    layer : SoftConv2d
    profile : {'window', 'distance', 'loco'} or array of shape (Sh, Sw)
        ``'window'``: 0 inside the nominal window, 1 outside.
        ``'distance'``: Euclidean distance from the window, to the power ``power``.
        ``'loco'``: the LOCO-REG weights of a 3x3 window (centre ``γ``, edge
        neighbours 1, corners ``η``, divided by ``Z = (γ + 4(1 + η)) / 9``);
        offsets outside the window get the largest of those weights.
    """
    gh, gw = layer.gh, layer.gw
    oh, ow = gh.offsets(), gw.offsets()
    k = layer.kernel_size
    dh = np.maximum(0, np.maximum(-oh, oh - (k - 1)))
    dw = np.maximum(0, np.maximum(-ow, ow - (k - 1)))
    dist = np.sqrt(dh[:, None] ** 2 + dw[None, :] ** 2)
    if isinstance(profile, str):
        if profile == "window":
            g = (dist > 0).astype(float)
        elif profile == "distance":
            g = dist**power
        elif profile == "loco":
            if k != 3:
                raise ValueError(
                    f"locality_profile='loco' is defined for a 3x3 window but kernel_size={k}; "
                    "use kernel_size=3 or another locality_profile."
                )
            Z = (loco_gamma + 4 * (1 + loco_eta)) / 9
            inner = np.array([[loco_eta, 1, loco_eta], [1, loco_gamma, 1], [loco_eta, 1, loco_eta]]) / Z
            g = np.full(dist.shape, inner.max())
            ih = np.flatnonzero((oh >= 0) & (oh < 3))
            iw = np.flatnonzero((ow >= 0) & (ow < 3))
            g[np.ix_(ih, iw)] = inner[np.ix_(oh[ih], ow[iw])]
        else:
            raise ValueError(f"locality_profile must be one of {_PROFILES} or an array; got {profile!r}.")
    else:
        g = np.asarray(profile, dtype=float)
        if g.shape != layer.support_shape:
            raise ValueError(
                f"locality_profile array has shape {g.shape} but the layer's support is "
                f"{layer.support_shape} offsets; pass an array of that shape (see support)."
            )
        if not np.all(np.isfinite(g)) or np.any(g < 0):
            raise ValueError("locality_profile array must be finite and non-negative.")
    return torch.as_tensor(g, dtype=layer.shared.dtype, device=layer.shared.device)


class _ProfiledPenalty(Penalty):
    """Common part of the penalties weighted by a locality profile."""

    def __init__(self, profile="window", power=1.0, loco_gamma=0.5, loco_eta=2.0):
        self.profile = profile
        self.power = power
        self.loco_gamma = loco_gamma
        self.loco_eta = loco_eta

    @classmethod
    def from_params(cls, params):
        return cls(
            params["locality_profile"], params["locality_power"], params["loco_gamma"], params["loco_eta"]
        )

    def weights(self, layer: SoftConv2d) -> torch.Tensor:
        """Profile spread over the kernel vector ``(K,)``; the bias is not penalised."""
        g = locality_profile(
            layer, self.profile, power=self.power, loco_gamma=self.loco_gamma, loco_eta=self.loco_eta
        )
        return layer.offset_map(g, 0.0)


@register("locality", "l2")
class LocalityL2(_ProfiledPenalty):
    r"""Weighted ridge on far weights: :math:`\sum_{p,f,c,\delta} g(\delta)\, w_{p,f,c,\delta}^2`."""

    def layer_value(self, layer):
        return (layer.kernels().pow(2) * self.weights(layer)).sum()

    def curvature(self, layer):
        g = 2.0 * self.weights(layer)
        return g, g


# --------------------------------------------------------------------- ridge
@register("alpha")
class Ridge(Penalty):
    r"""Weight decay: :math:`\sum_p \|w_p\|_2^2` per soft-conv layer (averaged over positions,
    biases excluded) plus :math:`\|W\|_F^2` of every dense and read-out layer."""

    def layer_value(self, layer):
        return layer.kernels()[..., :-1].pow(2).sum()

    def curvature(self, layer):
        return 2.0, 2.0

    def value(self, net):
        return super().value(net) + sum(lin.weight.pow(2).sum() for lin in net.linear_layers)


# --------------------------------------------------------------------- build
def preconditioner(layer: SoftConv2d, penalties) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry scales ``(c_m, c_d)`` of shape ``(K,)`` for :meth:`SoftConv2d.set_scales`.

    The loss is taken to curve each entry of ``m`` about 1 and of each
    ``d_p`` about ``1/L``; each penalty adds ``strength * κ_m`` and
    ``strength * κ_d / L`` (see :meth:`Penalty.curvature`).
    """
    L = layer.n_positions
    h_m = torch.ones_like(layer.shared_scale)
    h_d = torch.ones_like(layer.deviation_scale)
    for strength, pen in penalties:
        cm, cd = pen.curvature(layer)
        h_m = h_m + strength * cm
        h_d = h_d + strength * cd
    return h_m.rsqrt(), (L / h_d).sqrt()


def make_penalties(params: Mapping) -> list[tuple[float, Penalty]]:
    """The active penalties ``(strength, penalty)`` for a dict of estimator parameters.

    Raises
    ------
    ValueError
        If a strength is negative or not a number, or no penalty is
        registered for the requested options.
    """
    out = []
    for strength, table in _REGISTRY.items():
        value = params.get(strength, 0.0)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
            raise ValueError(f"{strength} must be a finite number >= 0, got {value!r}.")
        key = tuple(params[name] for name in _KEYS.get(strength, ()))
        if key not in table:
            names = _KEYS[strength]
            raise ValueError(
                f"No penalty for {dict(zip(names, key))}; supported combinations of {names}: "
                f"{supported_penalties(strength)}."
            )
        if value > 0:
            out.append((float(value), table[key].from_params(params)))
    return out
