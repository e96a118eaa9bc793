r"""Where the regularization path starts: ``tying_max`` and ``locality_max``.

Like lasso's ``alpha_max``, the smallest strength at which a non-smooth
penalty zeroes everything it acts on follows from the gradient of the
smooth part of the objective at the constrained solution:

* ``tying_max``: fit the CNN limit (deviations frozen at 0), take
  :math:`G_p = \partial J / \partial d_p` there; with ``'l1'``/``'group'``
  tying every deviation is exactly zero for ``tying >= tying_max``.
* ``locality_max``: fit the local model (weights with a positive locality
  weight ``g(δ)`` frozen at 0), take :math:`G = \partial J / \partial w`
  there; with ``'l1'`` locality those weights are exactly zero for
  ``locality >= locality_max``.

Both return a finite positive float for every penalty, so a path can start a
geometric grid there; for smooth (``'l2'``) penalties, where no finite
strength gives exact zeros, the same dual norm is returned as a data-driven
scale (the strength at which the penalty's pull on a unit deviation is as
strong as the data's pull at the limit).

Only the penalty in question is treated exactly: the reference fit keeps the
smooth penalties and drops the other non-smooth ones (``channel_sparsity``,
``sparsity``, and a non-smooth locality for ``tying_max``), whose
subgradients the conditions below ignore. With ``early_stopping`` the whole
data set is used.

Each maximum is a reference fit followed by a condition evaluated on the
fitted reference network (``_tying_max_at`` for ``tying_max``), so the
condition can also be evaluated on a network fitted otherwise: ``fit`` sets
``tying_max_`` that way (:func:`_fitted_tying_max`), on its own solution when
that is already tied, else after a reference fit warm-started from it.
"""

from __future__ import annotations

import warnings

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from .penalties import locality_profile
from .solvers import Objective

__all__ = ["tying_max", "locality_max"]

_TINY = 1e-12  # returned when the gradient vanishes: the limit fits the data exactly


def _reference_params(estimator, overrides: dict, *, tight: bool = True) -> dict:
    """The parameters a reference fit changes: ``overrides``, the other non-smooth terms dropped.

    ``tight``: a cold reference solved tightly (the condition is only as good
    as its gradient); otherwise the estimator's own ``tol`` and ``max_iter``.
    """
    params = {"channel_sparsity": 0.0, "sparsity": 0.0, "warm_start": False, "early_stopping": False,
              "threshold": 0.0, **overrides}
    # a full-batch reference solution (L-BFGS: what is left of the objective is smooth)
    if estimator.solver in ("auto", "fista", "lbfgs"):
        params["solver"] = "auto"
        if tight:
            params.update(tol=min(float(estimator.tol), 1e-7), max_iter=max(int(estimator.max_iter), 1000))
    return params


def _reference_fit(estimator, X, y, sample_weight, overrides, constrain, *, warm_from=None, exact=True):
    """Fit a clone with ``overrides`` and gradient masks from ``constrain``; return it.

    ``exact``: the condition evaluated on it is exact (a non-smooth penalty),
    so the fit stops on its gradient (not on a stalled objective) and a cold
    one is solved tightly; for a ridge-type penalty's scale the estimator's
    own stopping rule is enough.

    With ``warm_from`` (a fitted estimator) the fit starts from its network
    (``_fit`` works on a copy, so ``warm_from`` is not modified) with its
    ``tol`` and ``max_iter``, and every warning is silenced: the fit of
    ``warm_from`` already reported on these data and parameters.
    """
    est = clone(estimator)
    params = _reference_params(estimator, overrides, tight=exact and warm_from is None)
    if exact:  # stopped by its gradient, not by a stall of the objective
        params["n_iter_no_change"] = params.get("max_iter", estimator.max_iter)
    if warm_from is not None:
        names = est.get_params(deep=False)
        est.__dict__.update({k: v for k, v in vars(warm_from).items() if k not in names})
        params["warm_start"] = True
    est.set_params(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning if warm_from is None else Warning)
        est._fit(X, y, sample_weight, incremental=False, _constrain=constrain)
    return est


def _validated(est, X, y, sample_weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, sample_weight)`` as a fitted ``est`` sees them: images, encoded targets, weights."""
    Xi, _ = est._validate_X(X, reset=False)
    yi, _, _ = est._encode_targets(y, reset=False)
    return Xi, yi, est._validate_sample_weight(sample_weight, Xi)


def _gradients(est, data) -> list[torch.Tensor]:
    """``∂J/∂d_p`` of the smooth part of ``J`` for each soft-conv layer, ``(L, F, K)``, masked.

    ``data`` is :func:`_validated`'s output: all samples with their weights
    (the weighted mean equals the fit's, which merges duplicates).
    """
    net = est.network_
    Xi, yi, sw = data
    param = next(net.parameters())
    dt, dev = param.dtype, param.device
    obj = Objective(
        net, est._loss, torch.as_tensor(Xi, dtype=dt, device=dev), est._target_tensor(yi, dt, dev),
        torch.as_tensor(sw, dtype=dt, device=dev), [(s, p) for s, p in est.penalties_ if p.smooth],
    )
    for p in net.parameters():
        p.grad = None
    obj().backward()
    out = []
    for layer in net.soft_layers:
        out.append((layer.deviation_gradient() * layer.mask.unsqueeze(1)).detach())
    for p in net.parameters():
        p.grad = None
    return out


def _grid_flows(layer, G: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Least-norm edge flows ``u`` with ``D^T u = G`` on the position grid, per existence pattern.

    Returns per direction (down, right) a tensor of flows ``(edges, F, K)``
    (zero where the entry does not exist at both ends). For an entry, the
    positions where it exists form a rectangle of the grid (connected), so
    ``u = D L^+ G`` with ``L = D^T D`` the Laplacian of that rectangle.
    """
    Lh, Lw = layer.output_shape
    L, Fo, K = G.shape
    Gd = G.double().cpu()
    mask = layer.mask.cpu()
    phi = torch.zeros(L, Fo, K, dtype=torch.float64)
    patterns, inverse = torch.unique(mask.T, dim=0, return_inverse=True)
    ii, jj = np.divmod(np.arange(L), Lw)
    for j in range(patterns.shape[0]):
        pos = patterns[j].nonzero().squeeze(1).numpy()
        cols = (inverse == j).nonzero().squeeze(1)
        n = pos.size
        if n < 2:
            continue
        index = {p: i for i, p in enumerate(pos)}
        lap = np.zeros((n, n))
        for p in pos:
            for q in (p + Lw if ii[p] + 1 < Lh else -1, p + 1 if jj[p] + 1 < Lw else -1):
                if q >= 0 and q in index:
                    a, b = index[p], index[q]
                    lap[a, a] += 1
                    lap[b, b] += 1
                    lap[a, b] -= 1
                    lap[b, a] -= 1
        rhs = Gd[pos][:, :, cols].reshape(n, -1).numpy()
        rhs = rhs - rhs.mean(0)  # remove round-off from the optimality of m (Σ_p G_p = 0)
        sol = np.linalg.pinv(lap, hermitian=True) @ rhs
        phi[torch.as_tensor(pos)[:, None], :, cols[None, :]] = torch.as_tensor(
            sol.reshape(n, Fo, -1)
        ).permute(0, 2, 1)
    P = phi.reshape(Lh, Lw, Fo, K)
    M = mask.reshape(Lh, Lw, 1, K)
    return [
        ((P[1:] - P[:-1]) * (M[1:] & M[:-1]), None),
        ((P[:, 1:] - P[:, :-1]) * (M[:, 1:] & M[:, :-1]), None),
    ]


def _all_pairs_max(layer, G: torch.Tensor) -> float:
    r"""Exact condition for the pairwise penalty: max over entries and ``k`` of
    :math:`L(L-1) |S_k| / (k(n-k))`, ``S_k`` the sum of the ``k`` largest gradients."""
    L = layer.n_positions
    best = 0.0
    for pos_mask, cols in _patterns(layer):
        pos = pos_mask
        n = pos.shape[0]
        if n < 2:
            continue
        g = G[pos][:, :, cols].double().reshape(n, -1)
        g = g - g.mean(0)
        k = torch.arange(1, n, dtype=torch.float64, device=g.device)[:, None]
        for s in (g.sort(0, descending=True).values, g.sort(0).values):
            S = s.cumsum(0)[:-1].abs()
            best = max(best, float((S / (k * (n - k))).max()))
    return L * (L - 1) * best


def _patterns(layer):
    patterns, inverse = torch.unique(layer.mask.T, dim=0, return_inverse=True)
    for j in range(patterns.shape[0]):
        yield patterns[j].nonzero().squeeze(1), (inverse == j).nonzero().squeeze(1)


class Frozen:
    """A parameter taken out of the fit (``requires_grad=False``); ``remove()`` puts it back, like a hook's handle.

    Unlike a gradient mask, a frozen parameter is not part of the solver's
    vector at all: no gradient is computed for it, and fits frozen alike can
    still be stacked (:func:`softcnn.batched.fit_together`).
    """

    def __init__(self, param: torch.nn.Parameter):
        self.param = param.requires_grad_(False)

    def remove(self) -> None:
        self.param.requires_grad_(True)


def _freeze_deviations(net) -> list[Frozen]:
    """The CNN limit: every deviation fixed at zero, out of the fit."""
    frozen = []
    for layer in net.soft_layers:
        with torch.no_grad():
            layer.deviation.zero_()
        frozen.append(Frozen(layer.deviation))
    return frozen


def tying_max(estimator, X, y, sample_weight=None) -> float:
    r"""Smallest tying strength at which every deviation is exactly zero (``'l1'``/``'group'``).

    Parameters
    ----------
    estimator : SoftConvClassifier or SoftConvRegressor
        Unfitted or fitted; only its parameters are used (it is cloned).
    X, y, sample_weight
        As in ``fit``.

    Returns
    -------
    float
        Finite and positive.

    Notes
    -----
    The CNN limit is fitted first (deviations frozen at 0, ``m`` free);
    ``G_p = ∂J/∂d_p`` is the gradient of the smooth part of the objective
    there, and ``L`` the number of positions of the layer (the penalty is
    averaged over positions). ``d = 0`` is optimal iff ``0`` lies in
    ``G + (λ/L) ∂Ω(0)``, which gives, maximised over layers:

    * ``'mean'``, ``'l1'``: :math:`L \max_{p,f,k} |G_{p,f,k}|` (exact);
    * ``'mean'``, ``'group'`` (a group per position):
      :math:`L \max_p \|G_p\|_2` (exact);
    * ``'all'``: :math:`L (L-1) \max_{f,k} \max_j |S_j| / (j (n-j))`, with
      :math:`S_j` the sum of the ``j`` largest :math:`G_{p,f,k}` over the
      ``n`` positions where the entry exists (exact: the complete graph's
      cut condition);
    * ``'grid'``: :math:`L \|u\|` for the least-norm edge flow
      :math:`u = D\,\mathcal L^{+} G` (``D`` the grid differences,
      :math:`\mathcal L = D^\top D`), with the ∞-norm (``'l1'``) or the
      largest per-edge 2-norm (``'group'``). Any flow with
      :math:`D^\top u = G` certifies ``d = 0``, so this is an **upper bound**
      (exact on a single row or column of positions; generally within a
      small factor).
    * ``'l2'`` penalties (no finite limit): linearising the optimality
      condition, ``d ≈ -L G / (2 λ)``; the value returned is the strength at
      which the largest such deviation is ``L2_RELATIVE_DEVIATION`` (1%) of
      the largest weight of the reference fit, so a path starting there
      starts at (nearly) the CNN. Being a scale, not an exact condition, it
      is computed on a reference fit with the estimator's ``tol`` and
      ``max_iter`` (the exact conditions use ``tol <= 1e-7``).

    The conditions hold at the reference solution; a fit at ``tying``
    slightly above the value reaches exact zeros when it converges to the
    same ``m``, as it does warm-started from the CNN limit. The reference
    problem is not convex even with one soft-conv layer and the identity
    activation (the kernel multiplies the read-out), so a cold fit may reach
    another stationary point, with its own value. After a fit, the fitted
    attribute ``tying_max_`` is this quantity computed from the fit
    (:func:`_fitted_tying_max`).
    """
    est = _reference_fit(estimator, X, y, sample_weight, _tying_overrides(estimator), _freeze_deviations,
                         exact=estimator.tying_penalty != "l2")
    return _tying_max_at(est, _validated(est, X, y, sample_weight))


def _tying_overrides(estimator) -> dict:
    return {"tying": 0.0, **_drop_nonsmooth_locality(estimator)}


def _tying_max_at(est, data) -> float:
    """The condition of :func:`tying_max` at the fitted network of ``est``, a reference solution.

    ``est`` is fitted with every deviation zero and everything else at a
    stationary point of the smooth part of the objective (the CNN limit);
    ``data`` is :func:`_validated`'s output.
    """
    grads = _gradients(est, data)
    penalty, graph = est.tying_penalty, est.tying_graph
    value = 0.0
    for layer, G in zip(est.network_.soft_layers, grads):
        L = layer.n_positions
        if graph == "mean":
            if penalty == "group":
                v = L * float(torch.linalg.vector_norm(G, dim=(1, 2)).max())
            else:
                v = L * float(G.abs().max())
        elif graph == "all":
            v = _all_pairs_max(layer, G)
        else:
            flows = [u for u, _ in _grid_flows(layer, G)]
            if penalty == "group":
                v = L * max((float(torch.linalg.vector_norm(u, dim=(2, 3)).max()) for u in flows if u.numel()),
                            default=0.0)
            else:
                v = L * max((float(u.abs().max()) for u in flows if u.numel()), default=0.0)
        if penalty == "l2":
            v = _l2_scale(v, layer)
        value = max(value, v)
    return _positive(value)


def _is_reference_solution(est) -> bool:
    """Whether a fitted estimator's network already solves :func:`tying_max`'s reference problem.

    It does when every deviation is exactly zero, the fit converged (stopped
    before ``max_iter``), saw all the data (no ``early_stopping``), snapped
    nothing, and no non-smooth term other than tying was active: the
    reference drops ``channel_sparsity``, ``sparsity`` and a non-smooth
    locality, so kernels shrunk or pruned by them solve another problem.
    """
    if est.n_iter_ >= est.max_iter or est.early_stopping or est.n_snapped_:
        return False
    if any(not pen.smooth for _, pen in est.penalties_ if pen.strength != "tying"):
        return False
    with torch.no_grad():
        return all(not layer.masked_deviation().any() for layer in est.network_.soft_layers)


def _fitted_tying_max(est, X, y, sample_weight=None, cache=None) -> tuple[float, tuple | None]:
    """``tying_max_`` of an estimator just fitted on ``(X, y, sample_weight)``, and its cache entry.

    The quantity of :func:`tying_max`, obtained more cheaply:

    * when the fit is itself a reference solution
      (:func:`_is_reference_solution`: tied, converged, same objective) the
      condition is evaluated on it directly, one gradient;
    * otherwise a reference fit starts from the fitted network with the
      deviations set and frozen at zero (the fitted shared kernels are
      close to the tied solution), with the estimator's ``tol`` and
      ``max_iter``, so it costs at most about one more fit;
    * with ``warm_start``, ``cache`` (the previous fit's entry) is reused when
      the data and the reference problem are the same: along a path over
      ``tying`` only the first fit computes it.

    The value is as accurate as the fit (its ``tol``), where
    :func:`tying_max` solves a cold reference with ``tol <= 1e-7``. The
    reference problem is not convex (the kernels multiply the read-out), so
    both are conditions at *a* stationary point of it; they agree when they
    reach the same one, e.g. along a warm-started path.
    """
    data = _validated(est, X, y, sample_weight)
    key = None
    if est.warm_start:
        params = {**est.get_params(deep=False), **_reference_params(est, _tying_overrides(est), tight=False)}
        for name in ("warm_start", "verbose"):  # they do not change the reference solution
            params.pop(name)
        key = joblib.hash((type(est).__name__, sorted(params.items()), data))
        if cache is not None and cache[0] == key:
            return cache[1], cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fit itself already reported on these data and parameters
        if _is_reference_solution(est):
            value = _tying_max_at(est, data)
        else:
            ref = _reference_fit(est, X, y, sample_weight, _tying_overrides(est), _freeze_deviations, warm_from=est)
            value = _tying_max_at(ref, data)
    return value, (key, value) if key is not None else None


#: For ridge-type penalties: the path starts where the linearised largest deviation
#: (or far weight) is this share of the largest weight.
L2_RELATIVE_DEVIATION = 1e-2


def _l2_scale(l1_value: float, layer) -> float:
    """From the ``'l1'`` bound ``L max|G|`` to the ``'l2'`` strength with ``|d| <= 1% max|w|``.

    With ``λ/L Σ d²`` the stationarity condition gives ``d ≈ -L G / (2λ)``.
    """
    with torch.no_grad():
        w_max = float(layer.kernels()[..., :-1].abs().max())
    return l1_value / (2.0 * L2_RELATIVE_DEVIATION * max(w_max, _TINY))


def _drop_nonsmooth_locality(estimator) -> dict:
    return {"locality": 0.0} if estimator.locality_penalty != "l2" else {}


def _positive(value: float) -> float:
    return float(value) if np.isfinite(value) and value > _TINY else _TINY


#: locality penalties over nested rings (the locality profile is not used)
_RINGS = ("rings", "full_rings")


def _locality_weights(estimator, layer) -> torch.Tensor:
    """Per kernel entry ``(K,)`` locality weights (the window profile for rings); bias 0."""
    profile = "window" if estimator.locality_penalty in _RINGS else estimator.locality_profile
    g = locality_profile(layer, profile, power=estimator.locality_power, loco_gamma=estimator.loco_gamma,
                         loco_eta=estimator.loco_eta)
    return layer.offset_map(g, 0.0)


def locality_max(estimator, X, y, sample_weight=None) -> float:
    r"""Smallest locality strength at which every weight with ``g(δ) > 0`` is exactly zero (``'l1'``).

    Parameters
    ----------
    estimator : SoftConvClassifier or SoftConvRegressor
    X, y, sample_weight
        As in ``fit``.

    Returns
    -------
    float
        Finite and positive.

    Notes
    -----
    The local model is fitted first (every weight with a positive profile
    weight ``g`` frozen at 0 in ``m`` and ``d``; the window profile makes it
    the ``k x k`` locally connected model), and ``G = ∂J/∂d_p`` taken there.

    * ``'l1'``: :math:`L \max_{p,f,c,\delta: g(\delta)>0} |G_{p,f,c,\delta}| / g(\delta)`
      (exact: the weighted soft-threshold condition);
    * ``'rings'``, ``'full_rings'``: :math:`L \max_{p,f} \|G_{p,f}(\text{outside the window})\|_2`,
      an upper bound for zeroing everything outside the nominal window (the
      group of all those offsets alone certifies it);
    * ``'l2'``: the ``'l1'`` value turned into the strength at which the
      linearised largest far weight is 1% of the largest weight (as for
      :func:`tying_max`).
    """
    weights = {}

    def constrain(net):
        hooks = []
        for layer in net.soft_layers:
            g = _locality_weights(estimator, layer)
            keep = (g == 0).to(layer.shared.dtype)
            keep_d = layer.as_deviation_storage(keep)
            weights[id(layer)] = g
            with torch.no_grad():
                layer.shared.mul_(keep)
                layer.deviation.mul_(keep_d)
            hooks.append(layer.shared.register_hook(lambda grad, k=keep: grad * k))
            hooks.append(layer.deviation.register_hook(lambda grad, k=keep_d: grad * k))
        return hooks

    est = _reference_fit(estimator, X, y, sample_weight, {"locality": 0.0}, constrain,
                         exact=estimator.locality_penalty != "l2")
    grads = _gradients(est, _validated(est, X, y, sample_weight))
    value = 0.0
    for layer, G in zip(est.network_.soft_layers, grads):
        L = layer.n_positions
        g = _locality_weights(estimator, layer)
        far = g > 0
        if not far.any():
            continue
        if estimator.locality_penalty in _RINGS:
            v = L * float(torch.linalg.vector_norm(G[..., far], dim=-1).max())
        else:
            v = L * float((G[..., far].abs() / g[far]).max())
        if estimator.locality_penalty == "l2":
            v = _l2_scale(v, layer)
        value = max(value, v)
    return _positive(value)
