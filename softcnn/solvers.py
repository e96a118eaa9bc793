"""Solvers: full-batch L-BFGS and FISTA, and mini-batch (proximal) Adam/SGD on an :class:`Objective`.

Every solver trains the parameters in place and returns a
:class:`SolverResult`. A step whose objective is not finite ends the fit and
restores the last finite weights (``diverged=True``); the estimator turns that
into a warning with advice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = ["Objective", "SolverResult", "NetProblem", "lbfgs", "lbfgs_models", "fista", "stochastic"]
#: L-BFGS stops when the 2-norm of the preconditioned gradient is below this times ``tol``.
#: Measured on digits paths: 10 keeps warm-started path points within a few percent of
#: fully converged ones at a third of the cost; 30 and above stall along the path.
LBFGS_GNORM_FACTOR = 10.0
#: ... and the last iteration lowered the objective by less than this times ``tol`` (relative).
LBFGS_RTOL = 1e-2
#: Curvature pairs kept by L-BFGS (scipy's default ``maxcor``).
LBFGS_HISTORY = 10
#: Step-size halvings (at most) before L-BFGS gives up on a model.
LBFGS_MAX_BACKTRACK = 30


class Objective:
    r"""Weighted mean loss plus penalties.

    ``J = Σ_i s_i ℓ(f(x_i), y_i) / Σ_i s_i + Σ_j λ_j Ω_j``; on a mini-batch
    ``B`` the data term is ``Σ_{i∈B} s_i ℓ_i / (|B| · mean(s))``, an unbiased
    estimate of the full one.

    Parameters
    ----------
    net : SoftConvNet
    loss : callable
        ``loss(outputs, targets, reduction='none'|'mean')``: per-sample losses or their mean.
    X, y, sample_weight : Tensor
    penalties : list of (float, Penalty)
    autocast : torch.dtype, optional
        Run the network's forward under :func:`torch.autocast` to this dtype (mixed precision);
        the loss is computed in the dtype of ``X``.
    """

    def __init__(self, net, loss, X, y, sample_weight, penalties, autocast=None):
        self.net, self.loss, self.X, self.y, self.sw = net, loss, X, y, sample_weight
        self.autocast = autocast
        self.penalties = penalties
        # autograd handles the smooth penalties; the others enter through their prox
        self.smooth_penalties = [(s, pen) for s, pen in penalties if pen.smooth]
        # tying (on d) last: the operators on w = m + d may untie border positions, where
        # absent offsets make w_p differ from m, and the tying prox then re-ties them
        self.nonsmooth_penalties = sorted(
            [(s, pen) for s, pen in penalties if not pen.smooth], key=lambda sp: sp[1].strength == "tying"
        )
        self.sw_mean = sample_weight.mean()
        # equal weights: a plain mean, one op fewer per batch in the hot loop
        self.uniform = bool((sample_weight == sample_weight[0]).all())

    @property
    def n_samples(self) -> int:
        return self.X.shape[0]

    def outputs(self, X: torch.Tensor) -> torch.Tensor:
        """The network's outputs on ``X``, in the dtype of ``X`` (computed under autocast if set)."""
        if self.autocast is None:
            return self.net(X)
        with torch.autocast(X.device.type, dtype=self.autocast):
            return self.net(X).to(X.dtype)

    def data_loss(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        if self.uniform:
            return self.loss(self.outputs(X), y, reduction="mean")
        losses = self.loss(self.outputs(X), y)
        sw = self.sw if idx is None else self.sw[idx]
        return (sw * losses).sum() / (sw.shape[0] * self.sw_mean)

    def penalty(self) -> torch.Tensor | float:
        """The smooth penalties (what autograd differentiates)."""
        return sum(strength * pen.value(self.net) for strength, pen in self.smooth_penalties)

    def nonsmooth_value(self) -> float:
        """The non-smooth penalties' value (no gradient)."""
        with torch.no_grad():
            return float(sum(strength * pen.value(self.net) for strength, pen in self.nonsmooth_penalties))

    def prox(self, step: float) -> None:
        """Apply every non-smooth penalty's prox for a raw step ``step`` (in order).

        With several non-smooth penalties this composes their operators, the
        usual approximation of the prox of their sum.
        """
        with torch.no_grad():
            for strength, pen in self.nonsmooth_penalties:
                pen.prox_net(self.net, step * strength)

    def __call__(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Data loss plus the smooth penalties."""
        loss = self.data_loss(idx)
        # no "+ 0" node in the hot loop when no smooth penalty is active
        return loss + self.penalty() if self.smooth_penalties else loss

    def total(self) -> float:
        """The full objective ``J`` (smooth and non-smooth parts) on all the data."""
        with torch.no_grad():
            return float(self()) + self.nonsmooth_value()


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


class NetProblem:
    """One model as the (1, P) problem of :func:`lbfgs_models`: J and its gradient on ``params`` in place.

    Gradient hooks registered on the parameters apply (``softcnn.limits``
    freezes entries that way).
    """

    n_models = 1

    def __init__(self, objective: Objective, params: Sequence[torch.Tensor]):
        self.objective, self.params = objective, list(params)

    def read(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).unsqueeze(0)

    def write(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_(x[0, offset : offset + n].view_as(p))
                offset += n

    def value_and_grad(self, x: torch.Tensor, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.write(x)
        for p in self.params:
            p.grad = None
        loss = self.objective()
        if not torch.isfinite(loss):
            return loss.detach().reshape(1), torch.zeros_like(x)
        loss.backward()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        for p in self.params:
            p.grad = None
        return loss.detach().reshape(1), grad.unsqueeze(0)


def lbfgs(objective: Objective, params: Sequence[torch.Tensor], *, max_iter: int, tol: float,
          n_iter_no_change: int = 10, verbose: int = 0) -> SolverResult:
    """Full-batch L-BFGS on one model: :func:`lbfgs_models` on a :class:`NetProblem`."""
    return lbfgs_models(NetProblem(objective, params), max_iter=max_iter, tol=tol,
                        n_iter_no_change=n_iter_no_change, verbose=verbose)[0]


def lbfgs_models(problem, *, max_iter: int, tol: float, n_iter_no_change: int = 10,
                 history: int = LBFGS_HISTORY, verbose: int = 0) -> list[SolverResult]:
    r"""L-BFGS on ``K`` independent models at once, each with its own history, step and stopping.

    ``problem`` holds the models' parameters as rows of a ``(K, P)`` tensor:
    ``read()``, ``write(x)``, and ``value_and_grad(x_rows, models)`` giving
    ``J`` and ``∇J`` of the listed models at the given rows
    (:class:`NetProblem` for one network, :class:`softcnn.batched.StackedProblem`
    for many). Only models still running are evaluated.

    Notes
    -----
    The direction comes from the two-loop recursion over the pairs
    :math:`(s, y)` of the last ``history`` iterations (pairs with
    :math:`s^\top y \le 0` are left out, keeping the inverse-Hessian
    estimate positive definite; the ring of pairs is never copied), scaled
    by :math:`s^\top y / y^\top y` (Nocedal & Wright, Alg. 7.4). The step
    starts at 1 (``1/‖g‖`` without history) and backtracks by safeguarded
    quadratic interpolation until the Armijo condition
    :math:`J(x + t d) \le J(x) + 10^{-4} t\, g^\top d` holds with a finite
    value, so no accepted point is ever non-finite.

    A model stops when ``J`` has not decreased by at least
    ``tol * max(|J|, 1)`` in each of more than ``n_iter_no_change``
    consecutive iterations (``MLPClassifier``'s rule, with ``tol`` relative
    once ``|J| > 1``), when the Euclidean norm of its gradient is below
    ``LBFGS_GNORM_FACTOR * tol`` while its last iteration lowered ``J`` by
    less than ``LBFGS_RTOL * tol`` (relative), when the relative decrease
    is below ``tol * 1e-6``, when no step decreases ``J``, or after
    ``max_iter`` iterations. The gradient test uses the 2-norm, not the
    largest entry: the per-position deviations each pull little, but
    together they can pull a lot, as after a warm start.
    """
    x = problem.read().clone()
    K = x.shape[0]
    results = [SolverResult() for _ in range(K)]
    everyone = torch.arange(K, device=x.device)
    f, g = problem.value_and_grad(x, everyone)
    active = torch.isfinite(f) & torch.isfinite(g).all(1)
    for k in (~active).nonzero().flatten().tolist():
        results[k].diverged, results[k].message = True, "objective not finite at the start"
    # A ring of the last `history` iterations' pairs, shared by the models (no copy per iteration):
    # slot (head - age) % history holds the pair of `age` iterations ago, rho = 0 where a model has none.
    S = x.new_zeros(K, history, x.shape[1])
    Y = torch.zeros_like(S)
    rho = x.new_zeros(K, history)
    head = history - 1
    gamma = x.new_ones(K)
    n_pairs = torch.zeros(K, dtype=torch.long, device=x.device)
    stalled = torch.zeros(K, dtype=torch.long, device=x.device)  # consecutive iterations below tol
    bar = tqdm(total=max_iter, desc="L-BFGS", disable=verbose <= 0, leave=False)
    for it in range(max_iter):
        if not active.any():
            break
        # two-loop recursion, on every row (cheap next to an evaluation)
        q = g.clone()
        alpha = x.new_zeros(K, history)
        newest_first = [(head - age) % history for age in range(min(it, history))]  # the filled slots
        for i in newest_first:
            alpha[:, i] = rho[:, i] * (S[:, i] * q).sum(1)
            q -= alpha[:, i, None] * Y[:, i]
        r = gamma[:, None] * q
        for i in reversed(newest_first):
            beta = rho[:, i] * (Y[:, i] * r).sum(1)
            r += (alpha[:, i] - beta)[:, None] * S[:, i]
        d = -r
        gd = (g * d).sum(1)
        lost = gd >= 0  # round-off broke the descent property: restart from steepest descent
        if lost.any():
            d[lost], rho[lost], n_pairs[lost], gamma[lost] = -g[lost], 0.0, 0, 1.0
            gd = (g * d).sum(1)
        gnorm = torch.linalg.vector_norm(g, dim=1)
        t = torch.where(n_pairs > 0, torch.ones_like(gnorm), torch.clamp(1.0 / gnorm, max=1.0))
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        pending, accepted = active.clone(), torch.zeros_like(active)
        for _ in range(LBFGS_MAX_BACKTRACK):
            idx = pending.nonzero().flatten()
            if idx.numel() == 0:
                break
            xt = x[idx] + t[idx, None] * d[idx]
            ft, gt = problem.value_and_grad(xt, idx)
            finite = torch.isfinite(ft) & torch.isfinite(gt).all(1)
            ok = finite & (ft <= f[idx] + 1e-4 * t[idx] * gd[idx])
            good = idx[ok]
            x_new[good], f_new[good], g_new[good] = xt[ok], ft[ok], gt[ok]
            accepted[good], pending[good] = True, False
            bad = idx[~ok]
            if bad.numel():
                tb, gdb = t[bad], gd[bad]
                excess = ft[~ok] - f[bad] - gdb * tb  # > 0: the quadratic through J(0), J'(0), J(t)
                guess = torch.where(finite[~ok] & (excess > 0), -gdb * tb * tb / (2 * excess), 0.5 * tb)
                t[bad] = torch.minimum(torch.maximum(guess, 0.1 * tb), 0.5 * tb)
        stuck = active & ~accepted
        for k in stuck.nonzero().flatten().tolist():
            results[k].message = "the line search found no decrease"
        active &= accepted
        # curvature pairs
        s, yv = x_new - x, g_new - g
        sy, yy = (s * yv).sum(1), (yv * yv).sum(1)
        keep = accepted & (sy > 1e-10 * yy)
        # every iteration takes the oldest slot, so a model's history does not depend on the others'
        head = (head + 1) % history
        rho[:, head] = 0.0
        if keep.any():
            S[keep, head], Y[keep, head], rho[keep, head] = s[keep], yv[keep], 1.0 / sy[keep]
            gamma[keep] = sy[keep] / yy[keep]
            n_pairs[keep] = torch.clamp(n_pairs[keep] + 1, max=history)
        decrease = f - f_new
        scale = torch.maximum(torch.maximum(f.abs(), f_new.abs()), torch.ones_like(f))
        small_step = decrease <= tol * 1e-6 * scale
        stalled = torch.where(decrease < tol * scale, stalled + 1, 0)
        no_change = stalled > n_iter_no_change
        # A small gradient alone is not enough: after a warm start the loss may pull
        # weakly along a direction where the optimum is far away (weak tying).
        flat = (torch.linalg.vector_norm(g_new, dim=1) <= tol * LBFGS_GNORM_FACTOR) & (
            decrease <= LBFGS_RTOL * tol * f_new.abs())
        x, f, g = x_new, f_new, g_new
        done = accepted & (small_step | flat | no_change)
        for k in accepted.nonzero().flatten().tolist():
            results[k].loss_curve.append(float(f[k]))
            results[k].n_iter = it + 1
        for k in done.nonzero().flatten().tolist():
            results[k].converged = True
            results[k].message = ("gradient below tol" if bool(flat[k]) else
                                  "relative decrease below tol * 1e-6" if bool(small_step[k]) else
                                  f"decrease below tol for {n_iter_no_change} iterations")
        active &= ~done
        bar.update(1)
        if K == 1:
            bar.set_postfix(loss=f"{float(f[0]):.4g}")
    bar.close()
    problem.write(x)
    for res in results:
        res.n_iter = max(res.n_iter, 1)
        if not res.message:
            res.message = "max_iter reached"
    return results


def fista(objective: Objective, params: Sequence[torch.Tensor], *, max_iter: int, tol: float,
          verbose: int = 0) -> SolverResult:
    r"""Full-batch proximal gradient with backtracking and FISTA momentum.

    Minimises :math:`J = f + g`, ``f`` = data loss + smooth penalties
    (autograd), ``g`` = the non-smooth penalties (their prox,
    :meth:`Objective.prox`).

    Notes
    -----
    From the extrapolated point ``y`` a step
    :math:`x^+ = \operatorname{prox}_{t g}(y - t \nabla f(y))` is accepted when
    the quadratic upper bound holds,
    :math:`f(x^+) \le f(y) + \langle \nabla f(y), x^+ - y \rangle + \|x^+ - y\|^2 / (2t)`,
    otherwise ``t`` is halved (Beck & Teboulle 2009); after an accepted step
    ``t`` may grow by 25% (the net is nonconvex: curvature changes along the
    path). Momentum :math:`y = x^+ + \frac{\theta_k - 1}{\theta_{k+1}}(x^+ - x)`
    is restarted whenever ``J`` would increase, and a step that increases
    ``J`` from a non-extrapolated point is rejected with a smaller ``t``, so
    the recorded ``J`` never increases (monotone FISTA). Stops when the
    largest entry of the gradient mapping :math:`(y - x^+)/t` is below
    ``tol``, when ``J`` stops decreasing (relative change below
    ``tol * 1e-6`` with no momentum), or after ``max_iter`` iterations.
    """
    params = list(params)
    result = SolverResult()
    bar = tqdm(total=max_iter, desc="FISTA", disable=verbose <= 0, leave=False)

    def set_params(values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)

    def snapshot():
        return [p.detach().clone() for p in params]

    def smooth_value():
        with torch.no_grad():
            return float(objective())

    def smooth_grad():
        for p in params:
            p.grad = None
        loss = objective()
        if not torch.isfinite(loss):
            return math.inf, None
        loss.backward()
        return loss.item(), [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    x = snapshot()
    F_x = objective.total()
    if not math.isfinite(F_x):
        result.diverged, result.message = True, "objective not finite at the start"
        bar.close()
        return result
    y, theta, step = x, 1.0, 1.0
    momentum = False
    for it in range(max_iter):
        set_params(y)
        f_y, grad = smooth_grad()
        if grad is None:  # an extrapolated point may leave the finite region: restart from x
            if momentum:
                y, theta, momentum = x, 1.0, False
                continue
            result.diverged, result.message = True, f"objective not finite at iteration {it + 1}"
            break
        accepted = False
        for _ in range(60):
            with torch.no_grad():
                set_params([v - step * g for v, g in zip(y, grad)])
                objective.prox(step)
            x_new = snapshot()
            f_new = smooth_value()
            diff = [a - b for a, b in zip(x_new, y)]
            inner = float(sum((g * dv).sum() for g, dv in zip(grad, diff)))
            sq = float(sum(dv.pow(2).sum() for dv in diff))
            if math.isfinite(f_new) and f_new <= f_y + inner + sq / (2 * step) + 1e-12 * abs(f_y):
                accepted = True
                break
            step *= 0.5
        if not accepted:
            result.diverged = not math.isfinite(f_new)
            result.message = "no step size decreased the objective"
            break
        F_new = f_new + objective.nonsmooth_value()
        if not F_new <= F_x:
            if momentum:  # restart: redo the step from x without extrapolation
                y, theta, momentum = x, 1.0, False
                continue
            step *= 0.5  # the composed prox overshot: retry with a smaller step
            if step < 1e-20:
                result.message = "step size underflow"
                break
            continue
        gmap = max(float(dv.abs().max()) for dv in diff if dv.numel()) / step
        decrease = F_x - F_new
        theta_new = (1 + math.sqrt(1 + 4 * theta * theta)) / 2
        beta = (theta - 1) / theta_new
        y = [a + beta * (a - b) for a, b in zip(x_new, x)] if beta > 0 else x_new
        momentum = beta > 0
        x, F_x, theta = x_new, F_new, theta_new
        result.loss_curve.append(F_x)
        result.n_iter = it + 1
        bar.update(1)
        bar.set_postfix(loss=f"{F_x:.4g}")
        step *= 1.25
        if gmap <= tol:
            result.converged, result.message = True, "gradient mapping below tol"
            break
        if decrease <= tol * 1e-6 * max(abs(F_x), 1.0) and not momentum:
            result.converged, result.message = True, "relative decrease below tol * 1e-6"
            break
    bar.close()
    set_params(x)  # the last accepted (finite) iterate
    for p in params:
        p.grad = None
    result.n_iter = max(result.n_iter, 1)
    if not result.message:
        result.message = "max_iter reached"
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

    With non-smooth penalties each optimizer step (on the data loss and the
    smooth penalties) is followed by their prox with the step size
    ``learning_rate`` (proximal Adam / SGD). Adam's per-entry scaling is
    not folded into the prox, so the thresholds are ``learning_rate x
    strength`` whatever the gradient's size (the usual simplification).

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
    prox = bool(getattr(objective, "nonsmooth_penalties", ()))
    result = SolverResult()
    best, best_state, no_improve = math.inf, None, 0
    epochs = tqdm(range(max_iter), desc=solver, disable=verbose <= 0, leave=False)
    for epoch in epochs:
        snapshot = [p.detach().clone() for p in params]
        perm = torch.randperm(n, generator=generator).to(device)
        batch_losses = []
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = objective(idx)
            loss.backward()
            opt.step()
            if prox:
                objective.prox(learning_rate)
            # no .item() per step: finiteness is checked once per epoch, whose start is the rollback point
            batch_losses.append(loss.detach() * idx.shape[0])
        epoch_loss = float(torch.stack(batch_losses).sum()) / n
        if not math.isfinite(epoch_loss) or not all(torch.isfinite(p).all() for p in params):
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.copy_(s)
            result.diverged = True
            result.message = f"objective not finite in epoch {epoch + 1}"
            break
        if prox:  # the mean batch loss covers the smooth part only
            epoch_loss += objective.nonsmooth_value()
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
