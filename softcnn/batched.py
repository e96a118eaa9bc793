"""Many models as one: fits of the same architecture trained together with a leading model dimension.

A regularization path over folds fits ``K`` models at every penalty value
(one per fold, or per value and fold). They share the architecture and the
kinds of penalties and differ in data, strengths and weights, so they can
be trained as one batched model: parameters stacked into a ``(K, P)``
tensor, one :func:`torch.func.vmap` evaluation of all objectives and
gradients, and :func:`softcnn.solvers.lbfgs_models`, which keeps a separate
L-BFGS history, step size and stopping decision per model. Models that
converge drop out of the evaluations.

On a GPU this turns ``K`` small launches per step into one. On a CPU the
arithmetic is the same and vmap's batching rules add copies (measured 35%
slower on digits), so there the models are evaluated one after the other
inside the same solver run: the solver state stays batched, the
evaluation does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .estimators import _atomic_fit, _blas_controller, _patience
from .limits import Frozen
from .solvers import NetProblem, Objective, lbfgs_models

__all__ = ["StackedProblem", "fit_together", "can_stack", "fit_memory"]

#: Share of the free memory a stacked fit may plan to use.
MEMORY_SHARE = 0.5


class _SmoothObjective(nn.Module):
    """``J``'s smooth part as a module, so ``functional_call`` swaps the weights its penalties read too."""

    def __init__(self, net: nn.Module, loss, penalties):
        super().__init__()
        self.net = net
        self._loss, self._penalties = loss, penalties

    def forward(self, X, y, sw, strengths):
        value = (sw * self._loss(self.net(X), y)).sum() / sw.sum()
        for j, pen in enumerate(self._penalties):
            value = value + strengths[j] * pen.value(self.net)
        return value


def _signature(objective: Objective) -> tuple:
    """What stacked models must share: architecture, loss, device and dtype.

    Penalties may differ: a model without one of the others' penalties
    carries it with strength 0 (``make_penalties`` leaves out zero strengths).
    """
    net = objective.net
    shapes = tuple((name, tuple(t.shape)) for name, t in net.state_dict().items())
    loss = getattr(objective.loss, "__func__", objective.loss)
    x = objective.X
    return shapes, repr(net), loss, x.device, x.dtype, tuple(x.shape[1:])


def can_stack(objectives: Sequence[Objective]) -> bool:
    """True when the objectives can be evaluated as one batched model (all penalties smooth)."""
    if any(o.nonsmooth_penalties for o in objectives):
        return False
    first = _signature(objectives[0])
    return all(_signature(o) == first for o in objectives[1:])


class StackedProblem:
    """``K`` compatible :class:`~softcnn.solvers.Objective` s as the ``(K, P)`` problem of
    :func:`~softcnn.solvers.lbfgs_models`.

    Every model's data are padded to the largest data set with zero-weight
    samples, so one :func:`torch.func.vmap` call evaluates every model on its
    own data. ``J`` uses the weighted mean ``Σ s_i ℓ_i / Σ s_i`` and each
    model's own penalty strengths and preconditioner scales.

    Parameters
    ----------
    objectives : sequence of Objective
        Compatible (:func:`can_stack`); their networks receive the result.
    vectorize : bool or None, default=None
        Evaluate all models in one ``vmap`` call; None: on every device but the CPU.
    """

    def __init__(self, objectives: Sequence[Objective], vectorize: bool | None = None):
        if not can_stack(objectives):
            raise ValueError("These objectives cannot be stacked (architecture or penalties differ).")
        self.objectives = list(objectives)
        device = objectives[0].X.device
        self.vectorize = device.type != "cpu" if vectorize is None else bool(vectorize)
        self._rows = [NetProblem(o, [p for p in o.net.parameters() if p.requires_grad]) for o in objectives]
        if self.vectorize:  # one model after the other needs none of the stacked copies
            self._stack(objectives)

    def _stack(self, objectives: Sequence[Objective]) -> None:
        template = objectives[0].net
        self._names = [n for n, p in template.named_parameters() if p.requires_grad]
        self._shapes = [p.shape for n, p in template.named_parameters() if p.requires_grad]
        # buffers that differ between models (the preconditioner scales) are stacked
        buffers = [dict(o.net.named_buffers()) for o in objectives]
        names = [n for n, b in buffers[0].items() if any(not torch.equal(b, other[n]) for other in buffers[1:])]
        self._buffers = {n: torch.stack([b[n] for b in buffers]) for n in names}
        n_max = max(o.n_samples for o in objectives)
        self.X = torch.stack([_pad(o.X, n_max) for o in objectives])
        self.y = torch.stack([_pad(o.y, n_max) for o in objectives])
        self.sw = torch.stack([_pad(o.sw, n_max) for o in objectives])  # zero weight on the padding
        kinds = {}  # one penalty object per kind, over all models
        for o in objectives:
            for _, pen in o.smooth_penalties:
                kinds.setdefault(type(pen), pen)
        strengths = [[dict((type(p), s) for s, p in o.smooth_penalties).get(k, 0.0) for k in kinds] + [0.0]
                     for o in objectives]  # the extra 0 keeps the tensor 2-D without penalties
        self.strengths = torch.tensor(strengths, dtype=self.X.dtype, device=self.X.device)
        self._module = _SmoothObjective(template, objectives[0].loss, list(kinds.values()))
        self._value_and_grad = vmap(grad_and_value(self._member))

    @property
    def n_models(self) -> int:
        return len(self.objectives)

    def _member(self, flat, buffers, X, y, sw, strengths):
        tensors, offset = {}, 0
        for name, shape in zip(self._names, self._shapes):
            n = shape.numel()
            tensors["net." + name] = flat[offset : offset + n].view(shape)
            offset += n
        tensors.update({"net." + n: b for n, b in buffers.items()})
        return functional_call(self._module, tensors, (X, y, sw, strengths))

    def read(self) -> torch.Tensor:
        return torch.cat([row.read() for row in self._rows])

    def write(self, x: torch.Tensor) -> None:
        for k, row in enumerate(self._rows):
            row.write(x[k : k + 1])

    def value_and_grad(self, x: torch.Tensor, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.vectorize:
            pairs = [self._rows[k].value_and_grad(x[j : j + 1], models[j : j + 1])
                     for j, k in enumerate(models.tolist())]
            return torch.cat([f for f, _ in pairs]), torch.cat([g for _, g in pairs])
        if models.numel() == self.n_models:
            data = (self._buffers, self.X, self.y, self.sw, self.strengths)
        else:
            data = ({n: b[models] for n, b in self._buffers.items()}, self.X[models], self.y[models],
                    self.sw[models], self.strengths[models])
        grad, value = self._value_and_grad(x, *data)
        return value.detach(), grad.detach()


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    return torch.cat([t, t.new_zeros((n - t.shape[0], *t.shape[1:]))])


def fit_memory(objective: Objective) -> int:
    """Bytes one model needs during a full-batch evaluation (a generous estimate).

    Activations of every layer and their gradients (about 4 copies of each
    layer's output), the input, and the weights with their L-BFGS history
    (about 25 copies).
    """
    net, X = objective.net, objective.X
    item = X.element_size()
    with torch.no_grad():
        sizes, h = [], X[:1]
        for module in net:
            h = module(h)
            sizes.append(h.numel())
    n_params = sum(p.numel() for p in net.parameters())
    dense = sum(layer.n_positions * layer.out_channels * X[0].numel()
                for layer in net.soft_layers if layer.formulation == "dense")
    return item * (X.shape[0] * (4 * sum(sizes) + X[0].numel()) + 25 * n_params + 3 * dense)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: stack what a 4 GiB machine could
        return 4 << 30


def _groups(problems, batch) -> list[list[int]]:
    """Indices of the fits solved together: stackable L-BFGS fits with the same settings, in memory."""
    if not batch:
        return [[i] for i in range(len(problems))]
    groups: dict = {}
    for i, (est, prob) in enumerate(problems):
        trained = tuple(p.requires_grad for p in prob.objective.net.parameters())
        key = (prob.solver, est.max_iter, est.tol, est.n_iter_no_change, trained, _signature(prob.objective))
        masked = any(not isinstance(h, Frozen) for h in prob.hooks)  # gradient hooks act per model
        stackable = prob.solver == "lbfgs" and not masked and not prob.objective.nonsmooth_penalties
        groups.setdefault(key if stackable else ("alone", i), []).append(i)
    out = []
    for members in groups.values():
        objective = problems[members[0]][1].objective
        budget = MEMORY_SHARE * _free_memory(objective.X.device)
        per_model = max(fit_memory(objective), 1)
        size = len(members) if batch is True else max(1, int(budget // per_model))
        out += [members[j : j + size] for j in range(0, len(members), size)]
    return out


def fit_together(estimators: Sequence, Xs: Sequence, ys: Sequence, sample_weights: Sequence | None = None,
                 *, batch: bool | str = "auto", constrain: Callable | None = None,
                 lbfgs_patience: int | None = None) -> list:
    """Fit each estimator on its own data, solving compatible fits as one batched model.

    Equivalent to ``[est.fit(X, y, sample_weight=sw) for ...]`` (to round-off,
    see Notes), with every estimator's parameters, warm start, ``n_init``
    (each initialisation is one more fit to stack; the lowest training
    objective is kept) and warnings.

    Parameters
    ----------
    estimators : sequence of SoftConvClassifier or SoftConvRegressor
        Fitted in place (each one atomically).
    Xs, ys : sequences of array-like
        Each estimator's training data.
    sample_weights : sequence of array-like or None, default=None
    batch : {'auto', True, False}, default='auto'
        ``'auto'``: stack the fits that L-BFGS solves (smooth penalties, same
        architecture and stopping parameters), as many at once as fit in
        half the free memory of their device (:func:`fit_memory`); ``True``:
        stack all stackable fits regardless of memory; ``False``: one at a time.
    constrain : callable, optional
        ``constrain(network)`` freezes entries of each fit's network, as
        :mod:`softcnn.limits` does, and returns handles removed after the fit:
        whole parameters taken out of the fit (:class:`softcnn.limits.Frozen`,
        still stacked with fits frozen alike) or gradient hooks masking
        entries (such fits are not stacked).
    lbfgs_patience : int, optional
        Cap on ``n_iter_no_change`` for the fits L-BFGS solves (the path
        helpers' warm-started points, see :func:`softcnn.soft_conv_path`).

    Returns
    -------
    list
        The estimators.

    Notes
    -----
    Each stacked model keeps its own L-BFGS history, step sizes and stopping
    decision, and is evaluated on its own data (padded with zero-weight
    samples), so it follows the same iterates as its own fit up to
    floating-point summation order. Fits that cannot be stacked (FISTA,
    Adam/SGD, gradient-masked entries) run one at a time.
    """
    if sample_weights is None:
        sample_weights = [None] * len(estimators)
    if not len(estimators) == len(Xs) == len(ys) == len(sample_weights):
        raise ValueError("estimators, Xs, ys and sample_weights must have the same length.")
    problems, owner = [], []  # a fit per initialisation (n_init); owner: its estimator's index
    for i, (est, X, y, sw) in enumerate(zip(estimators, Xs, ys, sample_weights)):
        for init, rs in enumerate(est._init_random_states()):
            problems.append((est, est._prepare_fit(X, y, sw, incremental=False, init=init, random_state=rs,
                                                  _constrain=constrain)))
            owner.append(i)
    results = [None] * len(problems)
    for group in _groups(problems, batch):
        if len(group) == 1:
            est, prob = problems[group[0]]
            results[group[0]] = est._solve(prob, lbfgs_patience)
            continue
        first = problems[group[0]][0]
        stacked = StackedProblem([problems[i][1].objective for i in group])
        with _blas_controller().limit(limits=1, user_api="blas"):
            solved = lbfgs_models(stacked, max_iter=first.max_iter, tol=first.tol,
                                  n_iter_no_change=_patience(first.n_iter_no_change, lbfgs_patience),
                                  verbose=first.verbose)
        for i, res in zip(group, solved):
            results[i] = res
    for i, est in enumerate(estimators):
        mine = [j for j, o in enumerate(owner) if o == i]
        # one initialisation: nothing to compare, so no extra pass over the data
        best = mine[0] if len(mine) == 1 else min(mine, key=lambda j: _final_objective(problems[j][1], results[j]))
        _atomic_fit(type(est)._finish_fit)(est, problems[best][1], results[best])
    return list(estimators)


def _final_objective(problem, result) -> float:
    """Training objective a solved fit ended at (``inf`` if it diverged): how ``n_init`` picks."""
    if result.diverged:
        return float("inf")
    value = problem.objective.total()
    return value if value == value else float("inf")  # NaN never wins
