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
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import numpy as np
import torch

from . import _kernels
from . import prox as _prox
from .layers import SoftConv2d, _stored_adjoint, _stored_kernels, _vmap_per_model

__all__ = [
    "Penalty",
    "TyingL2Mean",
    "TyingL2Grid",
    "TyingL1Mean",
    "TyingGroupMean",
    "TyingL1Grid",
    "TyingGroupGrid",
    "TyingL1All",
    "LocalityL2",
    "LocalityL1",
    "LocalityRings",
    "LocalityFullRings",
    "ChannelSparsity",
    "SparsityL1",
    "SparsityTL1",
    "Ridge",
    "ring_groups",
    "locality_profile",
    "make_penalties",
    "preconditioner",
    "has_nonsmooth",
    "register",
    "supported_penalties",
]

# strength parameter -> {option key -> penalty class}
_REGISTRY: dict[str, dict[tuple, type[Penalty]]] = {}
# strength parameter -> names of the parameters whose values form the key
_KEYS: dict[str, tuple[str, ...]] = {
    "tying": ("tying_penalty", "tying_graph"),
    "locality": ("locality_penalty",),
    "sparsity": ("sparsity_penalty",),
}
# option values assumed when a parameter dict predates an option
_KEY_DEFAULTS = {"sparsity_penalty": "l1"}


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
    #: whether its zeros make learned kernels centred windows of odd size: the kernel-size
    #: diagnostics and the hard export then count sizes in those windows
    odd_kernel_sizes: bool = False

    @classmethod
    def check_params(cls, params: Mapping) -> None:
        """Raise ``ValueError`` if the estimator's parameters do not suit this penalty.

        Called whenever the penalty is selected, even at strength 0, so a
        setting that cannot work fails at every strength of a grid, not only
        at the nonzero ones (default: nothing to check).
        """

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

    def finalize(self, layer: SoftConv2d) -> None:
        """Re-express a fitted layer without changing the model or increasing the penalty (default: nothing)."""

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

    # Per-layer scratch state (structures derived from a layer's mask, warm starts). It is
    # keyed weakly by the layer object, so it never reaches another layer nor keeps one alive,
    # and it is left out of pickles and copies (a copy starts cold).
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_layer_state"}

    def clear_state(self) -> None:
        """Drop the per-layer scratch state; a fit's last prox no longer needs its warm start."""
        self.__dict__.pop("_layer_state", None)

    def _state(self, layer: SoftConv2d) -> dict:
        """This penalty's scratch dict for ``layer`` (created empty)."""
        states = self.__dict__.setdefault("_layer_state", weakref.WeakKeyDictionary())
        return states.setdefault(layer, {})

    def _kernel_buffer(self, layer: SoftConv2d, name: str, *, stored: bool = False) -> torch.Tensor:
        """A scratch tensor of the kernel view's shape ``(L, F, K)`` (``stored``: of ``deviation``'s),
        kept per layer (fresh memory costs more than the arithmetic on CPU); its content is undefined."""
        m = layer.shared
        shape = tuple(layer.deviation.shape) if stored else (layer.n_positions, *m.shape)
        state = self._state(layer)
        buf = state.get(name)
        if buf is None or buf.shape != shape or buf.dtype != m.dtype or buf.device != m.device:
            buf = state[name] = m.new_empty(shape)
        return buf

    def _stored_work(self, layer: SoftConv2d) -> torch.Tensor:
        """Where a prox works on values in the layout of ``deviation``: the parameter itself where
        every stored entry exists (one full-size tensor stays in the cache, not two: 1.5x faster at
        28x28 'full'; the prox writes it back anyway), else a buffer kept per layer (absent
        entries of an ``(L, F, K)`` storage keep their values)."""
        return layer.deviation if layer.stored_exists() is None else self._kernel_buffer(layer, "work", stored=True)

    def _squared_norms(self, layer: SoftConv2d, t: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
        """``Σ t²`` over ``dim`` (keepdim) of a tensor of ``deviation``'s shape, squared in a kept buffer."""
        return torch.mul(t, t, out=self._kernel_buffer(layer, "squares", stored=True)).sum(dim, keepdim=True)

    def _cached(self, layer: SoftConv2d, name: str, build: Callable[[], object]):
        """``build()``, computed once per layer while its mask (object and content) and dtype stay.

        ``build`` must not hold the layer: the cache would keep it alive.
        """
        mask = layer.mask
        key = (mask._version, mask.device, layer.shared.dtype)
        hit = self._state(layer).get(name)
        if hit is not None and hit[0] is mask and hit[1] == key:
            return hit[2]
        value = build()
        self._state(layer)[name] = (mask, key, value)
        return value


# --------------------------------------------------------------------- tying
class _NeighbourSquares(torch.autograd.Function):
    """``Σ ‖d_q - d_p‖²`` over the 4-neighbour pairs ``pairs`` (:meth:`SoftConv2d.stored_neighbour_pairs`)
    of the deviations ``d = c x`` (raw ``x``, per-offset scales ``c``; ``geometry`` as in
    :func:`softcnn.layers._stored_kernels`), entries existing at both positions.

    Its backward, ``2 c D^T`` of the differences, is written out: autograd's, through the
    slices, fills a full-size zero tensor for each. It also returns the differences (not
    differentiable), which the backward keeps; a differentiable backward (``create_graph=True``)
    recomputes them from ``x``, so second derivatives are exact.
    """

    @staticmethod
    def forward(x, c, geometry, pairs):
        d = _stored_kernels(x, None, c, geometry, out=torch.empty_like(x))
        diffs = [p.difference(d) for p in pairs]
        return sum(torch.dot(v.view(-1), v.view(-1)) for v in diffs), *diffs

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, c, geometry, pairs = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, c, *output[1:])
        ctx.geometry, ctx.pairs = geometry, pairs

    @staticmethod
    def backward(ctx, grad, *_):
        x, c, *diffs = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()  # create_graph: differences with a graph
        if differentiable:
            diffs = [p.difference(_stored_kernels(x, None, c, ctx.geometry)) for p in ctx.pairs]
        g = torch.zeros_like(x)
        for p, v in zip(ctx.pairs, diffs):  # the masks are 0/1: D^T (m * m (d_q - d_p)) = D^T diff
            g = p.add_adjoint_(g, v)
        g = _stored_kernels(g, None, c, ctx.geometry, out=None if differentiable else g)
        return (g * (2 * grad) if differentiable else g.mul_(2 * grad)), None, None, None

    @staticmethod
    def vmap(info, in_dims, x, c, geometry, pairs):
        return _vmap_per_model(_NeighbourSquares.apply, info, in_dims, x, c, geometry, pairs)


def _neighbour_differences(layer: SoftConv2d) -> list[tuple]:
    """``(pairs, differences)`` of the deviations over each kind of 4-neighbour pairs
    (:class:`~softcnn.layers.NeighbourPairs`; entries existing at both positions)."""
    d = layer.stored_deviations()
    return [(p, p.difference(d)) for p in layer.stored_neighbour_pairs()]


class _StoredSquares(torch.autograd.Function):
    r"""``Σ_e (r_e a_e)²`` over a layer's stored entries ``e``, in the layout of ``deviation``:
    ``a = c x`` (``m`` None: the deviations) or ``a = m + c x`` (the kernels), for the raw
    ``deviation`` ``x``, its per-offset scales ``c`` and the shared kernels ``m`` read at each entry
    (:func:`softcnn.layers._stored_kernels`; ``geometry`` None for an ``(L, F, K)`` storage),
    with weights ``r`` (broadcastable; None: all 1).

    Its backward is written out, ``2 r² a`` times ``c`` for ``x`` and summed onto the kernel
    entries for ``m``, in two passes where autograd's revisits several full-size intermediates.
    It also returns ``r a`` (not differentiable), which the backward keeps and turns into the
    gradient in place (so it runs once: ``retain_graph`` is refused by the version check); a
    differentiable backward (``create_graph=True``) recomputes it, so second derivatives are exact.
    """

    @staticmethod
    def _weighted(x, m, c, r, geometry, in_place):
        """``r a``: in place in a new buffer, or differentiably (``in_place=False``)."""
        a = _stored_kernels(x, m, c, geometry, out=torch.empty_like(x) if in_place else None)
        return a if r is None else a.mul_(r) if in_place else a * r

    @staticmethod
    def forward(x, m, c, r, geometry):
        ra = _StoredSquares._weighted(x, m, c, r, geometry, in_place=True)
        return torch.dot(ra.view(-1), ra.view(-1)), ra

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, m, c, r, geometry = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, m, c, r, output[1])
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad, _):
        x, m, c, r, ra = ctx.saved_tensors
        factor = 2 * grad if r is None else 2 * grad * r
        if torch.is_grad_enabled():  # a differentiable backward (create_graph): recomputed with a graph
            g = _StoredSquares._weighted(x, m, c, r, ctx.geometry, in_place=False) * factor
        else:  # 2 r² a in place of the saved r a (a fresh full-size tensor costs more than the pass)
            g = ra.mul_(factor)
        grad_m = None if m is None or not ctx.needs_input_grad[1] else _stored_adjoint(g, ctx.geometry)
        grad_x = _stored_kernels(g, None, c, ctx.geometry, out=None if torch.is_grad_enabled() else g)
        return grad_x, grad_m, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, m, c, r, geometry):
        return _vmap_per_model(_StoredSquares.apply, info, in_dims, x, m, c, r, geometry)


def _stored_squares(layer: SoftConv2d, weights: torch.Tensor | None, *, kernels: bool) -> torch.Tensor:
    """``Σ weights · a²`` over the existing entries, ``a`` the kernels ``m + d`` or the deviations
    ``d``, ``weights`` in the layout of ``deviation`` (None: 1)."""
    exists = layer.stored_exists()
    r = None if weights is None else weights.sqrt()
    r = exists if r is None else r if exists is None else r * exists
    m = layer.shared_kernel() if kernels else None
    return _StoredSquares.apply(layer.deviation, m, layer.deviation_scale, r, layer.stored_geometry)[0]


@register("tying", "l2", "mean")
class TyingL2Mean(Penalty):
    r"""Ridge tying to a shared kernel: :math:`\sum_p \|w_p - m\|_2^2` with ``m`` free.

    Hierarchical shrinkage of every position's kernel (bias included) to a
    common kernel; at the optimum ``m`` is the mean kernel.
    """

    def layer_value(self, layer):
        return _stored_squares(layer, None, kernels=False)

    def curvature(self, layer):
        return 0.0, 2.0


@register("tying", "l2", "grid")
class TyingL2Grid(Penalty):
    r"""Laplacian smoothing across the image: :math:`\sum_{p \sim q} \|w_p - w_q\|_2^2`.

    Pairs are 4-neighbours on the grid of output positions; only offsets that
    exist at both positions are compared.
    """

    def layer_value(self, layer):
        pairs = layer.stored_neighbour_pairs()
        return _NeighbourSquares.apply(layer.deviation, layer.deviation_scale, layer.stored_geometry, pairs)[0]

    def curvature(self, layer):
        return 0.0, 8.0  # largest eigenvalue of twice the grid Laplacian


# ------------------------------------------------------------ proximal tools
# The solvers step on the raw parameters ``deviation = d / c_d``. A gradient step
# of size ``η`` there followed by the prox of ``η λ Ω(d) / L`` (the layer's term of
# the objective) is, in the units of ``d``, the prox of ``t Ω`` with
# ``t = η λ c_d² / L``. Proximal fits use one power-of-two ``c_d`` per layer
# (:func:`preconditioner` with ``uniform=True``), so ``t`` is a scalar and
# ``d / c_d * c_d`` is exact: a prox that sets ``d = -m`` gives ``w = 0`` exactly.
def _dev_step(layer: SoftConv2d, step: float) -> float:
    """Prox step in the units of ``d`` (and of ``w``) for a raw step ``step`` (η λ)."""
    c = float(layer.deviation_scale.max())
    return step * c * c / layer.n_positions


def _exists(layer: SoftConv2d, dtype: torch.dtype) -> torch.Tensor:
    """The existence mask as 0/1 numbers, ``(L, 1, K)``: multiplying is faster than selecting."""
    return layer.mask.unsqueeze(1).to(dtype)


def _write_tied(layer: SoftConv2d, w_new: torch.Tensor, m_new: torch.Tensor) -> None:
    """Store new kernels (in the layout of ``deviation``) with a new shared kernel: ``m = m_new``,
    ``d = w_new - m``.

    Penalties on the effective weights move ``m`` the way they move a
    position tied to it (``m_new`` is the prox's output at ``w_p = m``), so
    tied positions stay exactly tied and a strong tying penalty on ``d``
    does not undo their shrinkage. ``w_new`` is overwritten (see
    :meth:`SoftConv2d.set_stored_kernels`).
    """
    layer.shared.copy_(m_new / layer.shared_scale)
    layer.set_stored_kernels(w_new)


@torch.no_grad()
def _soft_threshold_stored(layer: SoftConv2d, thr: torch.Tensor, m_new: torch.Tensor) -> bool:
    """Store ``soft_threshold(w, thr)`` (``w = m + d``, ``thr`` ``(K,)`` per kernel entry) with the
    new shared kernels ``m_new``, in one compiled pass over a compact storage of CPU float tensors
    (:func:`softcnn._kernels.stored_soft_threshold`): what :func:`_write_tied` stores from the
    prox of ``stored_kernels()`` in five passes. False (nothing done) for other layers."""
    d, scale, shared, geometry = layer.deviation, layer.deviation_scale, layer.shared, layer.stored_geometry
    if geometry is None or not _kernels.runs_on(d):
        return False
    m = layer.shared_kernel()
    shared.copy_(m_new / layer.shared_scale)
    neg_m = -(layer.shared_kernel() / scale)  # set_stored_kernels' m / c, for the m now stored
    a = _kernels.array
    _kernels.stored_soft_threshold(a(d), a(m), a(neg_m), a(scale), a(thr), *geometry)
    torch.autograd.graph.increment_version(d)  # written through NumPy: autograd must see the change
    return True


def _masked(layer: SoftConv2d, t: torch.Tensor) -> torch.Tensor:
    """``t`` (in the layout of ``deviation``) with absent entries zeroed, in place."""
    exists = layer.stored_exists()
    return t if exists is None else t.mul_(exists)


def _existing(layer: SoftConv2d, t: torch.Tensor) -> torch.Tensor:
    """``t`` (in the layout of ``deviation``) with absent entries zeroed, differentiably."""
    exists = layer.stored_exists()
    return t if exists is None else t * exists


@torch.no_grad()
def _recentre(layer: SoftConv2d) -> None:
    """Set ``m`` to the (lower) median of ``w_p`` over existing positions and ``d_p = w_p - m``.

    For penalties on differences between positions (``'grid'``, ``'all'``)
    the split between ``m`` and ``d`` is free; the median makes every
    position tied to the majority value have ``d_p = 0`` exactly, so
    ``n_tied_positions_`` counts them.
    """
    w = layer.unmasked_kernels()
    mask = layer.mask.unsqueeze(1).expand_as(w)
    med = torch.where(mask, w, torch.full_like(w, float("nan"))).nanmedian(dim=0).values
    med = torch.nan_to_num(med, nan=0.0)
    layer.shared.copy_(med / layer.shared_scale)
    m = layer.shared_kernel()  # exactly what the layer will use
    d = torch.where(mask, w - m, torch.zeros_like(w))
    layer.set_deviations(d, consume=True)


class _NonSmooth(Penalty):
    """A penalty the solvers apply through its proximal operator, not autograd."""

    smooth = False

    @abstractmethod
    def prox(self, layer: SoftConv2d, step: float) -> None:
        r"""Apply the proximal operator of ``step * value`` to one layer, in place.

        ``step`` is the solver's step size on the raw parameters times the
        strength. Only non-smooth penalties implement it; smooth ones are
        differentiated by autograd.
        """

    def prox_net(self, net, step: float) -> None:
        """Apply :meth:`prox` to every soft-conv layer of ``net`` (override for other layers)."""
        for layer in net.soft_layers:
            self.prox(layer, step)


@register("tying", "l1", "mean")
class TyingL1Mean(_NonSmooth):
    r"""Lasso tying to a free shared kernel: :math:`\sum_p \|w_p - m\|_1 = \sum_p \|d_p\|_1`.

    Sparse deviations: most positions tie exactly to ``m``, a few deviate.
    Prox: soft thresholding of ``d`` at existing offsets.
    """

    def layer_value(self, layer):
        return _existing(layer, layer.stored_deviations()).abs().sum()

    @torch.no_grad()
    def prox(self, layer, step):
        d = layer.stored_deviations(out=self._stored_work(layer))
        layer.set_stored_deviations(_prox.soft_threshold(d, _dev_step(layer, step), out=d), consume=True)


@register("tying", "group", "mean")
class TyingGroupMean(_NonSmooth):
    r"""Group-lasso tying: :math:`\sum_p \|w_p - m\|_2`, one group per position.

    A group is the whole position: every output channel's kernel vector
    (weights and bias, existing offsets), so whole positions tie or deviate.
    Prox: block soft thresholding of ``d_p``.
    """

    def layer_value(self, layer):
        return torch.linalg.vector_norm(_existing(layer, layer.stored_deviations()), dim=_entry_dims(layer)).sum()

    @torch.no_grad()
    def prox(self, layer, step):
        # group_soft_threshold in place, with the norms summed from squares in a kept buffer
        # (torch's norms over leading dimensions of a 'full' storage are slower than the prox)
        d = _masked(layer, layer.stored_deviations(out=self._stored_work(layer)))
        norms = self._squared_norms(layer, d, _entry_dims(layer)).sqrt_()
        layer.set_stored_deviations(_prox._block_shrink(d, norms, _dev_step(layer, step), out=d), consume=True)


def _entry_dims(layer: SoftConv2d) -> tuple[int, int]:
    """The dimensions of ``deviation`` other than positions': one position's entries."""
    return tuple(i for i in range(3) if i != layer.stored_position_dim)


class _TyingTV(_NonSmooth):
    kind = "l1"

    def layer_value(self, layer):
        diffs = _neighbour_differences(layer)
        if self.kind == "l1":
            return sum(diff.abs().sum() for _, diff in diffs)
        # a group is a pair's whole kernel, whose parts a storage may hold in several tensors
        groups = [[], []]  # per axis: (pairs..., entries) blocks
        for p, diff in diffs:
            groups[p.axis].append(diff.movedim(p.position_dims, (0, 1)).flatten(2))
        return sum(torch.linalg.vector_norm(torch.cat(g, dim=2), dim=2).sum() for g in groups)

    @torch.no_grad()
    def prox(self, layer, step):
        t, scale = _dev_step(layer, step), layer.deviation_scale
        # TV is 1-homogeneous: with one scale c (as in proximal fits) and positions first in the
        # storage, d = c x is solved as x itself with the step t / c (absent entries stay)
        raw = layer.stored_position_dim == 0 and bool((scale == scale[0]).all())
        if raw:
            d, t = layer.deviation, t / float(scale[0])
        else:
            d = layer.deviations(out=self._kernel_buffer(layer, "tv_input")).mul_(_exists(layer, scale.dtype))
        # warm start from this layer's previous dual (a step moves the solution little), and
        # the solver's scratch buffers kept with it
        state, key = self._state(layer), (raw, d.shape, d.dtype, d.device)
        last_key, dual = state.get("tv_dual", (None, None))
        _, dual = _prox.tv_prox(
            d, t, layer.output_shape, kind=self.kind, mask=layer.mask.unsqueeze(1),
            dual=dual if last_key == key else None, return_dual=True, out=d,
            workspace=state.setdefault("tv_workspace", {}),
        )
        state["tv_dual"] = (key, dual)
        if not raw:
            layer.set_deviations(d, consume=True)

    def finalize(self, layer):
        _recentre(layer)


@register("tying", "l1", "grid")
class TyingL1Grid(_TyingTV):
    r"""Fused lasso / total variation across the image: :math:`\sum_{p\sim q} \|w_p - w_q\|_1`.

    Region-wise constant kernels. Prox: :func:`softcnn.prox.tv_prox` (an
    iterative dual solver: ties are exact up to its tolerance, ~1e-10
    relative) on ``d``, offsets compared only where they exist at both
    positions.
    """

    kind = "l1"


@register("tying", "group", "grid")
class TyingGroupGrid(_TyingTV):
    r"""Group fused lasso: :math:`\sum_{p\sim q} \|w_p - w_q\|_2`, whole kernels (all channels)."""

    kind = "group"


@register("tying", "l1", "all")
class TyingL1All(_NonSmooth):
    r"""Pairwise weight sharing: :math:`\sum_{p<q} |w_{p,f,k} - w_{q,f,k}| / (L - 1)` per entry.

    Every pair of positions where the entry exists is compared, so weights
    cluster into families with exact ties. Prox:
    :func:`softcnn.prox.pairwise_l1_prox` over positions, applied to the
    effective weights ``w = m + d`` with ``m`` kept and written back as
    ``d = w - m`` (the penalty depends on ``w`` only, so the prox with
    respect to ``d`` is exact); after the fit ``m`` is moved to the median
    family (:meth:`finalize`).
    """

    def _rank_coefficients(self, layer):
        """``(K, L)`` coefficient of the ``i``-th smallest (1-based) of the ``n`` existing values of
        an entry, ``2 i - n - 1``, and 0 past them (absent entries sort last); cached per layer."""
        mask = layer.mask.T  # (K, L)
        dtype = layer.shared.dtype

        def build():
            n = mask.sum(1, keepdim=True)
            rank = torch.arange(1, mask.shape[1] + 1, device=mask.device)
            return torch.where(rank <= n, 2 * rank - n - 1, 0).to(dtype)

        return self._cached(layer, "rank_coefficients", build)

    def layer_value(self, layer):
        # for the n existing values of an entry, Σ_{p<q} |x_p - x_q| = Σ_i (2i - n - 1) x_(i)
        w = (layer.shared_kernel() + layer.deviations()).movedim(0, -1)  # (F, K, L)
        # absent entries sort last; the largest float (not inf) makes their 0 coefficient give 0
        w = torch.where(layer.mask.T, w, torch.finfo(w.dtype).max)
        xs, order = _prox._sort_rows(w.reshape(-1, w.shape[-1]), indices=w.requires_grad)
        if order is not None:  # the same values, gathered so autograd sees them
            xs = w.reshape(-1, w.shape[-1]).gather(1, order)
        total = (xs.view(w.shape) * self._rank_coefficients(layer)).sum()
        return total / max(layer.n_positions - 1, 1)

    @torch.no_grad()
    def prox(self, layer, step):
        L = layer.n_positions
        if L < 2:
            return
        t = _dev_step(layer, step) / (L - 1)
        w = layer.unmasked_kernels(out=self._kernel_buffer(layer, "kernels"))
        _prox.pairwise_l1_prox(w, t, dim=0, mask=layer.mask.unsqueeze(1), out=w,
                               workspace=self._state(layer).setdefault("workspace", {}))
        layer.set_stored_kernels(layer.as_deviation_storage(w))

    def finalize(self, layer):
        _recentre(layer)


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

    def stored_weights(self, layer: SoftConv2d) -> torch.Tensor:
        """:meth:`weights` at each stored entry, broadcastable to ``deviation``; cached per layer."""
        return self._cached(layer, "stored_weights", lambda: layer.as_deviation_storage(self.weights(layer)))


@register("locality", "l2")
class LocalityL2(_ProfiledPenalty):
    r"""Weighted ridge on far weights: :math:`\sum_{p,f,c,\delta} g(\delta)\, w_{p,f,c,\delta}^2`."""

    def layer_value(self, layer):
        return _stored_squares(layer, self.stored_weights(layer), kernels=True)

    def curvature(self, layer):
        g = 2.0 * self.weights(layer)
        return g, g


@register("locality", "l1")
class LocalityL1(_NonSmooth, _ProfiledPenalty):
    r"""Weighted lasso on far weights: :math:`\sum_{p,f,c,\delta} g(\delta)\, |w_{p,f,c,\delta}|`.

    Prox: weighted soft thresholding of the effective weights ``w = m + d``
    (thresholds ``t g(δ)``, biases untouched); ``m`` is thresholded the same
    way (as a tied position) and ``d = w - m`` written back: exact zeros in
    ``w``, and tied positions stay tied.
    """

    def layer_value(self, layer):
        return (_existing(layer, layer.stored_kernels()).abs() * self.stored_weights(layer)).sum()

    @torch.no_grad()
    def prox(self, layer, step):
        t, g = _dev_step(layer, step), self.weights(layer)
        m_new = _prox.soft_threshold(layer.shared_kernel(), t, g)
        if _soft_threshold_stored(layer, t * g, m_new):
            return
        w = layer.stored_kernels(out=self._stored_work(layer))
        _write_tied(layer, _prox.soft_threshold(w, t, self.stored_weights(layer), out=w,
                                                workspace=self._state(layer).setdefault("workspace", {})), m_new)


def ring_groups(layer: SoftConv2d, full: bool = False) -> torch.Tensor:
    """Nested ring groups of a layer's support, smallest first, as a boolean ``(N, Sh * Sw)``.

    Parameters
    ----------
    layer : SoftConv2d
    full : bool, default=False
        ``False``: half rings. Group ``n`` holds the offsets outside the
        centred window of size ``s_max - n`` (see
        :meth:`SoftConv2d.kernel_levels`): ``G_1`` is the outermost
        half-ring, each next group adds the next half-ring inwards (two
        half-rings make a full ring, so the windows of odd and even sizes
        both occur), and the last group is the whole support.
        ``True`` (odd ``kernel_size`` only): whole rings. The groups are the
        offsets outside the centred windows of odd sizes ``…, 5, 3, 1`` and
        the whole support, so each group adds a whole ring and only odd
        windows are left. Offsets beyond the largest odd window (a support
        with more offsets on one side, e.g. ``support - kernel_size`` odd)
        form the first group.

    Raises
    ------
    ValueError
        With ``full=True`` and an even ``kernel_size``: its odd windows are
        not centred on the nominal window.
    """
    levels = torch.as_tensor(layer.kernel_levels().ravel(), device=layer.mask.device)
    if full:
        if layer.kernel_size % 2 == 0:
            raise ValueError(
                f"Full rings need an odd kernel_size (odd windows centred on the nominal one), got "
                f"kernel_size={layer.kernel_size}; use an odd kernel_size or half rings "
                "(locality_penalty='rings')."
            )
        top = int(levels.max())
        windows = [w for w in range(top - 1, -1, -1) if w % 2 == 1 or w == 0]
    else:
        windows = [s - 1 for s in sorted(set(levels.tolist()), reverse=True)]  # every level present
    rows = []
    for w in windows:  # outside the window of size w; skip repeats (sizes absent from the support)
        row = levels > w
        if row.any() and not (rows and torch.equal(row, rows[-1])):
            rows.append(row)
    return torch.stack(rows) if rows else torch.zeros((0, levels.numel()), dtype=torch.bool)


@register("locality", "rings")
class LocalityRings(_NonSmooth, _ProfiledPenalty):
    r"""Nested-ring group lasso: :math:`\sum_{p,f} \sum_n \|w_{p,f}(G_n)\|_2`.

    Groups (:func:`ring_groups`) span all input channels of a unit's kernel
    and are nested, ``G_1 ⊂ … ⊂ G_N``, with ``G_1`` the outermost half-ring,
    so outer rings vanish first and each kernel picks its own size. The
    locality profile is not used. Prox: :func:`softcnn.prox.nested_group_prox`
    (from the smallest group to the largest) on ``w = m + d``, written back
    as ``d = w - m``.
    """

    #: whole rings (:class:`LocalityFullRings`) or half rings
    full = False

    def _groups(self, layer):
        """``(N, C * Sh * Sw)`` groups, channel-major like the kernel; cached per layer."""
        full, channels = self.full, layer.in_channels

        def build():
            return ring_groups(layer, full=full).repeat(1, channels)

        return self._cached(layer, "ring_groups", build)

    def _rings(self, layer):
        """The number of groups and the ring of each weight (:func:`softcnn.prox.nested_group_prox`'s
        first group holding it); cached per layer."""
        groups = self._groups(layer)
        return self._cached(layer, "rings", lambda: (groups.shape[0], _prox._feature_rings(groups)))

    def layer_value(self, layer):
        if layer.stored_geometry is not None:  # rings' squares scattered, summed into the nested groups
            n_groups = self._rings(layer)[0]
            w = layer.stored_weights(layer.stored_kernels())
            every = self._stored_rings(layer)[2].expand_as(w)
            sq = w.new_zeros(n_groups + 1, *w.shape[1:]).scatter_add(0, every, w * w)[:n_groups].cumsum(0)
        else:  # squared norms of all groups at once: a product with the membership matrix
            w = layer.kernels()[..., :-1]
            sq = w.pow(2) @ self._groups(layer).T.to(w.dtype)
        pos = sq > 0
        # sqrt with a zero gradient at 0 (like a norm's), not an infinite one
        return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq)).sum()

    def _stored_rings(self, layer):
        """For a compact storage, the ring of each stored weight: ``min(ring_h, ring_w)`` with ``ring_h``
        ``(H, Lh)`` the first group excluding its offset's row (a group is the outside of a window),
        per stored row and position, ``ring_w`` ``(W, Lw)`` likewise for columns, and that minimum
        at every weight, ``(C H W, 1, L)``; cached per layer."""
        n_groups, ring = self._rings(layer)
        C, H, W, Lh, Lw, sh, sw = layer.stored_geometry
        Sh, Sw = layer.support_shape

        def build():
            # stored row h at position i reads flipped-support row i sh + h (see _window_view)
            rings = ring[: Sh * Sw].view(Sh, Sw).flip(0, 1)
            # the centre row/column is in every window but the last group's: its rings are the others'
            per_row, per_col = rings.max(1).values, rings.max(0).values
            if not torch.equal(rings, torch.minimum(per_row[:, None], per_col[None, :])):
                raise AssertionError("ring groups must be the outsides of windows")  # by construction
            dev = ring.device
            ring_h = per_row[torch.arange(H, device=dev)[:, None] + sh * torch.arange(Lh, device=dev)[None, :]]
            ring_w = per_col[torch.arange(W, device=dev)[:, None] + sw * torch.arange(Lw, device=dev)[None, :]]
            every = torch.minimum(ring_h[:, None, :, None], ring_w[None, :, None, :])  # (H, W, Lh, Lw)
            every = every.expand(C, H, W, Lh, Lw).reshape(C * H * W, 1, Lh * Lw)
            return ring_h, ring_w, every

        return self._cached(layer, "stored_rings", build)

    @torch.no_grad()
    def prox(self, layer, step):
        n_groups, ring = self._rings(layer)
        thr = [_dev_step(layer, step)] * n_groups
        if layer.stored_geometry is not None:
            self._prox_stored(layer, thr)
            return
        m = layer.shared_kernel()
        # the kernels, absent offsets zeroed (they carry no weight), and the shared kernel as one
        # more position: one prox call for both
        L = layer.n_positions
        w = m.new_empty((L + 1, *m.shape))
        layer.unmasked_kernels(out=w[:L]).mul_(_exists(layer, m.dtype))
        w[L] = m
        # nested_group_prox from the cached rings (nested by construction: no checks)
        _prox._nested_prox_by_ring(w[..., :-1], thr, ring, -1, w[..., :-1])
        _write_tied(layer, layer.as_deviation_storage(w[:L]), w[L])

    def _prox_stored(self, layer, thr):
        """The prox on a compact storage: ring norms by one scatter of the squares, and each
        weight's scale as the smaller of its row's and its column's ring scales (a scale grows
        with the ring, and a weight's ring is the smaller of theirs), without an (L, F, K) view."""
        n_groups, ring = self._rings(layer)
        ring_h, ring_w, every = self._stored_rings(layer)
        C, H, W, Lh, Lw, _, _ = layer.stored_geometry
        m, chw, Fo = layer.shared_kernel(), C * H * W, layer.out_channels
        w = layer.stored_kernels(out=self._stored_work(layer))
        weights = w[:chw]
        squares = torch.mul(weights, weights, out=self._kernel_buffer(layer, "squares", stored=True)[:chw])
        ring_sq = w.new_zeros(n_groups + 1, Fo, Lh * Lw).scatter_add_(0, every.expand_as(squares), squares)
        scales = _prox._nested_ring_scales(ring_sq, thr).flip(0).view(n_groups + 1, Fo, Lh, Lw)  # row j: ring j
        # each weight's scale: the smaller of its row's and its column's (in the squares' buffer)
        by_position = scales.permute(0, 2, 3, 1)  # (N, Lh, Lw, F)
        i, j = (torch.arange(n, device=w.device) for n in (Lh, Lw))
        i, j = i[None, :, None], j[None, None, :]
        by_row = by_position[ring_h[:, :, None], i, j].permute(0, 3, 1, 2)  # (H, F, Lh, Lw)
        by_col = by_position[ring_w[:, None, :], i, j].permute(0, 3, 1, 2)  # (W, F, Lh, Lw)
        scale = torch.minimum(by_row[:, None], by_col[None], out=squares.view(C, H, W, Fo, Lh, Lw)[0])
        weights6 = weights.view(C, H, W, Fo, Lh, Lw)
        torch.addcmul(w.new_zeros(()), weights6, scale, out=weights6)  # 0 + x * scale: zeros are +0
        _prox._nested_prox_by_ring(m[None, :, :-1], thr, ring, -1, m[None, :, :-1])
        _write_tied(layer, w, m)


@register("locality", "full_rings")
class LocalityFullRings(LocalityRings):
    r"""Nested full-ring group lasso (odd ``kernel_size``): :class:`LocalityRings` with whole rings.

    The groups (:func:`ring_groups` with ``full=True``) are the offsets
    outside the centred windows of odd sizes, so a kernel shrinks a whole
    ring at a time, ``k + 4 → k + 2 → k → … → 1``, and every learned kernel
    is a centred window of odd size, like an ``nn.Conv2d`` with
    ``padding=k // 2``. Same prox (nested group soft thresholding, smallest
    group first). An even ``kernel_size`` is refused: its odd windows are
    not centred.
    """

    full = True
    odd_kernel_sizes = True

    @classmethod
    def check_params(cls, params):
        k = params.get("kernel_size")
        if isinstance(k, numbers.Integral) and k % 2 == 0:
            raise ValueError(
                f"locality_penalty='full_rings' needs an odd kernel_size (its rings are centred on the "
                f"nominal window), got kernel_size={k}; use an odd kernel_size, or "
                "locality_penalty='rings' (half rings, any kernel size)."
            )


# ------------------------------------------------------------ sparsity
@register("channel_sparsity")
class ChannelSparsity(_NonSmooth):
    r"""Group lasso per output channel: :math:`\sum_f \|(w_{p,f})_{p}\|_2` over all positions.

    A group is every weight and the bias of channel ``f`` at every position
    (existing offsets), so a pruned channel outputs ``act(0)`` everywhere
    and can be dropped from the network. Prox: block soft thresholding on
    ``w = m + d``, written back as ``d = w - m``.
    """

    def layer_value(self, layer):  # the channels are dimension 1 of every storage
        return torch.linalg.vector_norm(_existing(layer, layer.stored_kernels()), dim=(0, 2)).sum()

    @torch.no_grad()
    def prox(self, layer, step):
        w = _masked(layer, layer.stored_kernels(out=self._stored_work(layer)))
        # block soft thresholding by its per-channel factor, applied in place to w and to m alike
        norms = self._squared_norms(layer, w, (0, 2)).sqrt_()  # (1, F, 1)
        t = _dev_step(layer, step)
        _write_tied(layer, _prox._block_shrink(w, norms, t, out=w),
                    _prox._block_shrink(layer.shared_kernel(), norms.view(-1, 1), t))


class _Elementwise(_NonSmooth):
    """A separable penalty ``Σ ρ(w)`` on every weight: soft-conv weights (biases excluded,
    averaged over positions) and the weights of the dense and read-out layers."""

    @abstractmethod
    def rho(self, w: torch.Tensor) -> torch.Tensor:
        """The penalty of each weight."""

    @abstractmethod
    def elementwise_prox(
        self, w: torch.Tensor, t: float, out: torch.Tensor | None = None, workspace: dict | None = None
    ) -> torch.Tensor:
        """The prox of ``t * rho``, entrywise, written to ``out`` if given (it may be ``w``), with
        scratch buffers kept in ``workspace`` if given."""

    def layer_value(self, layer):  # rho(0) = 0: absent entries count for nothing
        return self.rho(layer.stored_weights(_existing(layer, layer.stored_kernels()))).sum()

    def value(self, net):
        return super().value(net) + sum(self.rho(lin.weight).sum() for lin in net.linear_layers)

    @torch.no_grad()
    def prox(self, layer, step):
        w = layer.stored_kernels(out=self._stored_work(layer))
        m, t = layer.shared_kernel(), _dev_step(layer, step)
        self.elementwise_prox(layer.stored_weights(w), t, out=layer.stored_weights(w),
                              workspace=self._state(layer).setdefault("workspace", {}))
        self.elementwise_prox(m[..., :-1], t, out=m[..., :-1])
        _write_tied(layer, w, m)

    @torch.no_grad()
    def prox_net(self, net, step):
        super().prox_net(net, step)
        for lin in net.linear_layers:  # not averaged over positions: the raw step
            self.elementwise_prox(lin.weight, step, out=lin.weight)


@register("sparsity", "l1")
class SparsityL1(_Elementwise):
    r"""Lasso on all weights, :math:`\sum |w|`; prox: soft thresholding."""

    def rho(self, w):
        return w.abs()

    def elementwise_prox(self, w, t, out=None, workspace=None):
        return _prox.soft_threshold(w, t, out=out)


@register("sparsity", "tl1")
class SparsityTL1(_Elementwise):
    r"""Transformed L1 on all weights, :math:`\sum \rho_a(w)`, :math:`\rho_a(w) = (a+1)|w|/(a+|w|)`.

    Nonconvex, between l0 (small ``a``) and l1 (large ``a``); prox in closed
    form (:func:`softcnn.prox.tl1_prox`). ``a`` is the estimator's ``tl1_a``.
    """

    def __init__(self, a: float = 1.0):
        self.a = a

    @classmethod
    def from_params(cls, params):
        return cls(params.get("tl1_a", 1.0))

    def rho(self, w):
        return (self.a + 1) * w.abs() / (self.a + w.abs())

    def elementwise_prox(self, w, t, out=None, workspace=None):
        return _prox.tl1_prox(w, t, self.a, out=out, workspace=workspace)


# --------------------------------------------------------------------- ridge
@register("alpha")
class Ridge(Penalty):
    r"""Weight decay: :math:`\sum_p \|w_p\|_2^2` per soft-conv layer (averaged over positions,
    biases excluded) plus :math:`\|W\|_F^2` of every dense and read-out layer."""

    def layer_value(self, layer):
        weights = self._cached(layer, "stored_weights", lambda: layer.as_deviation_storage(
            layer.offset_map(torch.ones(layer.support_shape, dtype=layer.shared.dtype, device=layer.mask.device))))
        return _stored_squares(layer, weights, kernels=True)

    def curvature(self, layer):
        return 2.0, 2.0

    def value(self, net):
        return super().value(net) + sum(lin.weight.pow(2).sum() for lin in net.linear_layers)


# --------------------------------------------------------------------- build
def preconditioner(
    layer: SoftConv2d, penalties, *, uniform: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry scales ``(c_m, c_d)`` of shape ``(K,)`` for :meth:`SoftConv2d.set_scales`.

    The loss is taken to curve each entry of ``m`` about 1 and of each
    ``d_p`` about ``1/L``; each penalty adds ``strength * κ_m`` and
    ``strength * κ_d / L`` (see :meth:`Penalty.curvature`).

    With ``uniform=True`` (proximal solvers) each scale is one number per
    layer, from the stiffest entry, rounded to a power of two: proximal
    operators then act in the units of ``m`` and ``d`` with a scalar step,
    and converting between raw and effective values is exact in floating
    point (so zeros and ties set by a prox stay exact).
    """
    L = layer.n_positions
    h_m = torch.ones_like(layer.shared_scale)
    h_d = torch.ones_like(layer.deviation_scale)
    for strength, pen in penalties:
        cm, cd = pen.curvature(layer)
        h_m = h_m + strength * cm
        h_d = h_d + strength * cd
    c_m, c_d = h_m.rsqrt(), (L / h_d).sqrt()
    if uniform:
        c_m = torch.full_like(c_m, 2.0 ** round(float(torch.log2(c_m.min()))))
        c_d = torch.full_like(c_d, 2.0 ** round(float(torch.log2(c_d.min()))))
    return c_m, c_d


def has_nonsmooth(penalties) -> bool:
    """Whether any active penalty needs a proximal solver."""
    return any(not pen.smooth for _, pen in penalties)


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
        key = tuple(params.get(name, _KEY_DEFAULTS.get(name)) for name in _KEYS.get(strength, ()))
        if key not in table:
            names = _KEYS[strength]
            raise ValueError(
                f"No penalty for {dict(zip(names, key))}; supported combinations of {names}: "
                f"{supported_penalties(strength)}."
            )
        table[key].check_params(params)
        if value > 0:
            out.append((float(value), table[key].from_params(params)))
    return out
