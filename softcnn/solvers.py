"""Solvers: full-batch L-BFGS and mini-batch Adam/SGD on an :class:`Objective`.

Every solver trains the parameters in place and returns a
:class:`SolverResult`. A step whose objective is not finite ends the fit and
restores the last finite weights (``diverged=True``); the estimator turns that
into a warning with advice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import torch
from tqdm.auto import tqdm

__all__ = ["Objective", "SolverResult", "lbfgs", "stochastic"]


class Objective:
    r"""Weighted mean loss plus penalties.

    ``J = Σ_i s_i ℓ(f(x_i), y_i) / Σ_i s_i + Σ_j λ_j Ω_j``; on a mini-batch
    ``B`` the data term is ``Σ_{i∈B} s_i ℓ_i / (|B| · mean(s))``, an unbiased
    estimate of the full one.

    Parameters
    ----------
    net : SoftConvNet
    loss : callable
        ``loss(outputs, targets) -> per-sample losses``.
    X, y, sample_weight : Tensor
    penalties : list of (float, Penalty)
    """

    def __init__(self, net, loss, X, y, sample_weight, penalties):
        self.net, self.loss, self.X, self.y, self.sw = net, loss, X, y, sample_weight
        self.penalties = penalties
        self.sw_mean = sample_weight.mean()
        # equal weights: a plain mean, one op fewer per batch in the hot loop
        self.uniform = bool((sample_weight == sample_weight[0]).all())

    @property
    def n_samples(self) -> int:
        return self.X.shape[0]

    def data_loss(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        losses = self.loss(self.net(X), y)
        if self.uniform:
            return losses.mean()
        sw = self.sw if idx is None else self.sw[idx]
        return (sw * losses).sum() / (sw.shape[0] * self.sw_mean)

    def penalty(self) -> torch.Tensor | float:
        return sum(strength * pen.value(self.net) for strength, pen in self.penalties)

    def __call__(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.data_loss(idx) + self.penalty()


@dataclass
class SolverResult:
    """What a solver reports.

    Attributes
    ----------
    n_iter : int
        Iterations (L-BFGS) or epochs (Adam/SGD) run.
    loss_curve : list of float
        Objective after each iteration / mean over each epoch.
    converged : bool
        The stopping rule (``tol``) was met before ``max_iter``.
    diverged : bool
        The objective stopped being finite; the last finite weights were kept.
    validation_scores : list of float
        Per-epoch validation scores when early stopping was used.
    message : str
    """

    n_iter: int = 0
    loss_curve: list = field(default_factory=list)
    converged: bool = False
    diverged: bool = False
    validation_scores: list = field(default_factory=list)
    message: str = ""
    optimizer_state: dict | None = None


def _flat(params: Sequence[torch.Tensor], grads: bool = False) -> np.ndarray:
    ts = [(p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p for p in params]
    return torch.cat([t.detach().reshape(-1) for t in ts]).cpu().numpy().astype(np.float64)


def _assign(params: Sequence[torch.Tensor], x: np.ndarray) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(x[offset : offset + n]).view_as(p))
            offset += n


def lbfgs(objective: Objective, params: Sequence[torch.Tensor], *, max_iter: int, tol: float,
          verbose: int = 0) -> SolverResult:
    """Full-batch L-BFGS (scipy's L-BFGS-B) on torch gradients.

    Stops when the projected gradient's largest entry is below ``tol`` or the
    relative decrease of the objective is below ``tol * 1e-6`` (scipy's
    ``ftol``), or after ``max_iter`` iterations.
    """
    params = list(params)
    result = SolverResult()
    last_finite = {"x": _flat(params)}
    bar = tqdm(total=max_iter, desc="L-BFGS", disable=verbose <= 0, leave=False)

    def fun(x):
        _assign(params, x)
        for p in params:
            p.grad = None
        loss = objective()
        if not torch.isfinite(loss):
            return math.inf, np.zeros_like(x)
        loss.backward()
        return loss.item(), _flat(params, grads=True)

    def callback(intermediate_result):
        f = float(intermediate_result.fun)
        result.loss_curve.append(f)
        bar.update(1)
        bar.set_postfix(loss=f"{f:.4g}")
        if math.isfinite(f):
            last_finite["x"] = intermediate_result.x.copy()

    res = scipy.optimize.minimize(
        fun, last_finite["x"], jac=True, method="L-BFGS-B", callback=callback,
        options={"maxiter": max_iter, "maxfun": max(15000, 3 * max_iter), "gtol": tol, "ftol": tol * 1e-6},
    )
    bar.close()
    x = res.x if math.isfinite(res.fun) else last_finite["x"]
    result.diverged = not math.isfinite(res.fun)
    _assign(params, x)
    result.n_iter = max(int(res.nit), 1)
    result.converged = res.status == 0 and not result.diverged
    result.message = str(res.message)
    return result


def stochastic(
    objective: Objective,
    params: Sequence[torch.Tensor],
    *,
    solver: str = "adam",
    learning_rate: float = 1e-3,
    batch_size: int = 200,
    max_iter: int = 200,
    tol: float = 1e-4,
    n_iter_no_change: int = 10,
    validation_score: Callable[[], float] | None = None,
    generator: torch.Generator | None = None,
    optimizer_state: dict | None = None,
    verbose: int = 0,
) -> SolverResult:
    """Mini-batch Adam or SGD (Nesterov momentum 0.9), epochs of shuffled batches.

    Stopping follows ``MLPClassifier``: the fit stops when for
    ``n_iter_no_change`` consecutive epochs the training objective does not
    improve by at least ``tol`` or, with ``validation_score``, the validation
    score does not improve by at least ``tol``; with a validation score the
    weights of the best epoch are restored.
    """
    params = list(params)
    if solver == "adam":
        opt = torch.optim.Adam(params, lr=learning_rate)
    else:
        opt = torch.optim.SGD(params, lr=learning_rate, momentum=0.9, nesterov=True)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    n = objective.n_samples
    device = objective.X.device
    result = SolverResult()
    best, best_state, no_improve = math.inf, None, 0
    epochs = tqdm(range(max_iter), desc=solver, disable=verbose <= 0, leave=False)
    for epoch in epochs:
        snapshot = [p.detach().clone() for p in params]
        perm = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = objective(idx)
            value = loss.item()
            if not math.isfinite(value):
                total = math.nan
                break
            loss.backward()
            opt.step()
            total += value * idx.shape[0]
        epoch_loss = total / n
        if not math.isfinite(epoch_loss) or not all(torch.isfinite(p).all() for p in params):
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.copy_(s)
            result.diverged = True
            result.message = f"objective not finite in epoch {epoch + 1}"
            break
        result.loss_curve.append(epoch_loss)
        result.n_iter = epoch + 1
        if validation_score is not None:
            score = validation_score()
            result.validation_scores.append(score)
            current = -score
        else:
            current = epoch_loss
        epochs.set_postfix(loss=f"{epoch_loss:.4g}")
        if current > best - tol:
            no_improve += 1
        else:
            no_improve = 0
        if current < best:
            best = current
            if validation_score is not None:
                best_state = [p.detach().clone() for p in params]
        if no_improve > n_iter_no_change:
            result.converged = True
            break
    epochs.close()
    if best_state is not None:
        with torch.no_grad():
            for p, s in zip(params, best_state):
                p.copy_(s)
    # after a divergence the moments are poisoned: a later partial_fit starts afresh
    result.optimizer_state = None if result.diverged else opt.state_dict()
    return result
