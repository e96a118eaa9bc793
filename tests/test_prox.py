"""Tests of softcnn.prox: optimality conditions, brute-force solves, exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backends import BACKENDS, backend
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import softcnn._kernels
import softcnn.prox as P
from softcnn.prox import (
    group_soft_threshold,
    nested_group_prox,
    pairwise_l1_prox,
    soft_threshold,
    tl1_prox,
    tv_prox,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)
SLOW = settings(max_examples=15, deadline=None, derandomize=True, database=None)

seeds = st.integers(0, 2**31 - 1)
steps = st.sampled_from([0.0, 1e-3, 0.05, 0.3, 1.0, 3.0])


def _t(a, dtype=torch.float64):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


# ---------------------------------------------------------------------------
# generic penalty g(u) = sum_b c_b ||A_b u||_2 and a scipy dual brute force
# ---------------------------------------------------------------------------


class Penalty:
    """g(u) = sum_b c_b ||A_b u||_2 for the rows A of block b (u flattened)."""

    def __init__(self, rows, block, coef, size):
        self.A = np.zeros((0, size)) if not rows else np.array(rows, dtype=float)
        self.block = np.asarray(block, dtype=int)
        self.coef = np.asarray(coef, dtype=float)
        self.size = size

    def value(self, u):
        u = np.asarray(u, dtype=float).ravel()
        sq = np.bincount(self.block, (self.A @ u) ** 2, minlength=len(self.coef))
        return float(self.coef @ np.sqrt(sq))

    def objective(self, u, x, t):
        u = np.asarray(u, dtype=float).ravel()
        return 0.5 * float(np.sum((u - np.ravel(x)) ** 2)) + t * self.value(u)

    def solve(self, x, t):
        """Prox by its dual, min_z 1/2 ||x - A^T z||^2 s.t. ||z_b|| <= t c_b, with scipy."""
        x = np.asarray(x, dtype=float).ravel()
        k = self.A.shape[0]
        if k == 0 or t == 0:
            return x.copy()
        radius = t * self.coef

        def fun(z):
            r = x - self.A.T @ z
            return 0.5 * r @ r, -(self.A @ r)

        sizes = np.bincount(self.block, minlength=len(self.coef))
        if sizes.max() == 1:  # box constraints
            bounds = [(-radius[b], radius[b]) for b in self.block]
            res = minimize(
                fun, np.zeros(k), jac=True, method="L-BFGS-B", bounds=bounds,
                options=dict(maxiter=50000, maxfun=50000, ftol=1e-16, gtol=1e-13),
            )
        else:  # Euclidean balls
            onehot = (self.block[None, :] == np.arange(len(self.coef))[:, None]).astype(float)
            cons = {
                "type": "ineq",
                "fun": lambda z: radius**2 - onehot @ (z**2),
                "jac": lambda z: -2 * onehot * z[None, :],
            }
            res = minimize(
                fun, np.zeros(k), jac=True, method="SLSQP", constraints=[cons],
                options=dict(maxiter=3000, ftol=1e-15),
            )
        return x - self.A.T @ res.x


def pairwise_penalty(n):
    rows, block = [], []
    for p in range(n):
        for q in range(p + 1, n):
            r = np.zeros(n)
            r[p], r[q] = 1, -1
            rows.append(r)
            block.append(len(block))
    return Penalty(rows, block, np.ones(len(block)), n)


def grid_edges(lh, lw):
    for i in range(lh):
        for j in range(lw):
            p = i * lw + j
            if j + 1 < lw:
                yield p, p + 1
            if i + 1 < lh:
                yield p, p + lw


def tv_penalty(lh, lw, r, kind, mask=None):
    size = lh * lw * r
    mask = np.ones((lh * lw, r), bool) if mask is None else np.broadcast_to(mask, (lh * lw, r))
    rows, block, nb = [], [], 0
    for p, q in grid_edges(lh, lw):
        entries = [j for j in range(r) if mask[p, j] and mask[q, j]]
        for j in entries:
            row = np.zeros(size)
            row[p * r + j], row[q * r + j] = 1, -1
            rows.append(row)
            block.append(nb)
            if kind == "l1":
                nb += 1
        if kind == "group" and entries:
            nb += 1
    return Penalty(rows, block, np.ones(nb), size)


def nested_penalty(groups, weights):
    groups = np.asarray(groups, bool)
    m = groups.shape[1]
    rows, block = [], []
    for n, g in enumerate(groups):
        for i in np.flatnonzero(g):
            r = np.zeros(m)
            r[i] = 1
            rows.append(r)
            block.append(n)
    return Penalty(rows, block, weights, m)


def random_nested_groups(rng, m, n_groups):
    """Rows G_1 <= ... <= G_N over m features (each nonempty)."""
    sizes = np.sort(rng.integers(1, m + 1, n_groups))
    perm = rng.permutation(m)
    groups = np.zeros((n_groups, m), bool)
    for n, s in enumerate(sizes):
        groups[n, perm[:s]] = True
    return groups


# ---------------------------------------------------------------------------
# shared behaviour of all operators
# ---------------------------------------------------------------------------

GROUPS3 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)

OPERATORS = {
    "soft": lambda x, t: soft_threshold(x, t),
    "soft_w": lambda x, t: soft_threshold(x, t, weights=torch.tensor([1.0, 0.5, 2.0, 0.0])),
    "group": lambda x, t: group_soft_threshold(x, t, dim=1),
    "nested": lambda x, t: nested_group_prox(x, t, GROUPS3, dim=-1, weights=[1.0, 2.0, 0.5]),
    "pairwise": lambda x, t: pairwise_l1_prox(x, t, dim=0),
    "tv_l1": lambda x, t: tv_prox(x, t, (2, 3), kind="l1", n_iter=400),
    "tv_group": lambda x, t: tv_prox(x, t, (3, 2), kind="group", n_iter=400),
    "tl1": lambda x, t: tl1_prox(x, t, 0.7),
}


def test_all_exports():
    assert set(P.__all__) == {
        "soft_threshold", "group_soft_threshold", "nested_group_prox",
        "pairwise_l1_prox", "tv_prox", "tl1_prox",
    }
    for name in P.__all__:
        assert callable(getattr(P, name)) and getattr(P, name).__doc__


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_t_zero_is_identity_and_input_untouched(name):
    op = OPERATORS[name]
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_copy = x.clone()
    u0 = op(x, 0.0)
    assert torch.equal(u0, x) and u0 is not x
    u = op(x, 0.4)
    assert torch.equal(x, x_copy)
    assert u.shape == x.shape and u.dtype == x.dtype
    assert not torch.equal(u, x)  # t > 0 does something on this input
    # a 0-d tensor step is the same as a float step
    assert torch.allclose(op(x, torch.tensor(0.4, dtype=torch.float64)), u, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_float32_matches_float64(name):
    op = OPERATORS[name]
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u64 = op(x, 0.3)
    u32 = op(x.float(), 0.3)
    assert u32.dtype == torch.float32
    assert torch.allclose(u32.double(), u64, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_invalid_step_raises(name, bad):
    with pytest.raises(ValueError, match="t must"):
        OPERATORS[name](torch.randn(6, 4), bad)


def test_invalid_arguments_raise():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="0-d"):
        soft_threshold(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="floating-point"):
        soft_threshold(torch.arange(4), 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        soft_threshold(x, 0.1, weights=-torch.ones(4))
    with pytest.raises(ValueError, match="broadcast"):
        soft_threshold(x, 0.1, weights=torch.ones(5))
    with pytest.raises(ValueError, match="broadcast"):
        group_soft_threshold(x, 0.1, dim=1, weights=torch.ones(6, 4))
    with pytest.raises(ValueError, match="repeated"):
        group_soft_threshold(x, 0.1, dim=(1, -1))
    with pytest.raises(ValueError, match="out of range"):
        group_soft_threshold(x, 0.1, dim=2)
    with pytest.raises(ValueError, match="nested"):
        nested_group_prox(x, 0.1, GROUPS3.flip(0))
    with pytest.raises(ValueError, match="shape"):
        nested_group_prox(x, 0.1, GROUPS3[:, :3])
    with pytest.raises(ValueError, match="a must be > 0"):
        tl1_prox(x, 0.1, 0.0)
    with pytest.raises(ValueError, match="kind"):
        tv_prox(x, 0.1, (2, 3), kind="l2")
    with pytest.raises(ValueError, match="Lh \\* Lw"):
        tv_prox(x, 0.1, (2, 2))
    with pytest.raises(ValueError, match="broadcastable"):
        tv_prox(x, 0.1, (2, 3), mask=torch.ones(6, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------
# soft thresholding
# ---------------------------------------------------------------------------


@FAST
@given(seed=seeds, t=steps, weighted=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_soft_threshold_optimality(seed, t, weighted, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 7)) * rng.choice([0.1, 1, 10])
    x[rng.random(x.shape) < 0.1] = 0.0
    w = rng.choice([0.0, 0.5, 1.0, 3.0], size=(1, 7)) if weighted else np.ones((1, 7))
    u = soft_threshold(_t(x, dtype), t, weights=_t(w, dtype) if weighted else None)
    assert u.dtype == dtype
    u = u.double().numpy()
    x = _t(x, dtype).double().numpy()
    thr = t * np.broadcast_to(w, x.shape)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 * (1 + np.abs(x))
    nz = u != 0
    # (x - u) in t * w * d|u|
    assert np.all(np.abs((x - u - thr * np.sign(u))[nz]) <= np.broadcast_to(tol, x.shape)[nz])
    assert np.all(np.abs(x[~nz]) <= thr[~nz] + np.broadcast_to(tol, x.shape)[~nz])
    assert np.all(np.sign(u[nz]) == np.sign(x[nz]))


def test_soft_threshold_exact_positive_zeros():
    x = torch.tensor([-0.3, -0.1, 0.0, 0.1, 0.3, 2.0], dtype=torch.float64)
    u = soft_threshold(x, 0.3)
    assert torch.equal(u, torch.tensor([0, 0, 0, 0, 0, 1.7], dtype=torch.float64))
    assert not torch.signbit(u).any()  # no negative zeros
    assert torch.equal(soft_threshold(x, 0.1, weights=torch.zeros(6)), x)


# ---------------------------------------------------------------------------
# group soft thresholding
# ---------------------------------------------------------------------------


@FAST
@given(seed=seeds, t=steps, dims=st.sampled_from([1, (0, 2), -1, (1, 2)]), weighted=st.booleans())
def test_group_soft_threshold_optimality(seed, t, dims, weighted):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 5)) * rng.choice([0.2, 1, 5])
    red = tuple(d % 3 for d in ((dims,) if isinstance(dims, int) else dims))
    rshape = tuple(1 if i in red else s for i, s in enumerate(x.shape))
    x[np.broadcast_to(rng.random(rshape) < 0.2, x.shape)] = 0.0  # some all-zero groups
    w = rng.choice([0.0, 0.5, 1.0, 2.0], size=rshape) if weighted else np.ones(rshape)
    u = group_soft_threshold(_t(x), t, dims, weights=_t(w) if weighted else None).numpy()
    norm_u = np.sqrt((u**2).sum(axis=red, keepdims=True))
    norm_x = np.sqrt((x**2).sum(axis=red, keepdims=True))
    nz = np.broadcast_to(norm_u > 0, x.shape)
    safe = np.where(norm_u > 0, norm_u, 1)
    resid = x - u - t * w * u / safe
    assert np.abs(resid[nz]).max(initial=0) <= 1e-12
    zero = norm_u == 0
    assert np.all(norm_x[zero] <= (t * w)[zero] + 1e-12)
    assert np.all(u[np.broadcast_to(zero, x.shape)] == 0)


def test_group_soft_threshold_zero_groups_and_batching():
    x = torch.randn(4, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[1] = 0.0
    u = group_soft_threshold(x, 0.5, dim=(1, 2))
    assert torch.equal(u[1], torch.zeros(3, 6, dtype=torch.float64))
    for i in range(4):  # batched call == per-slice calls
        assert torch.allclose(u[i], group_soft_threshold(x[i], 0.5, dim=(0, 1)), atol=1e-15, rtol=0)
    big = group_soft_threshold(x, 1e3, dim=(1, 2))
    assert torch.equal(big, torch.zeros_like(x)) and not torch.signbit(big).any()


@SLOW
@given(seed=seeds, t=st.sampled_from([0.05, 0.4, 1.5]))
def test_group_soft_threshold_brute_force(seed, t):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 2))
    w = rng.choice([0.5, 1.0, 2.0], size=3)
    rows = [np.eye(6)[2 * g + k] for g in range(3) for k in range(2)]
    pen = Penalty(rows, [0, 0, 1, 1, 2, 2], w, 6)
    u = group_soft_threshold(_t(x), t, dim=1, weights=_t(w[:, None])).numpy()
    ref = pen.solve(x, t)
    assert pen.objective(u, x, t) <= pen.objective(ref, x, t) + 1e-10
    assert np.allclose(u.ravel(), ref, atol=1e-5)


# ---------------------------------------------------------------------------
# nested groups
# ---------------------------------------------------------------------------


@FAST
@given(seed=seeds, t=st.sampled_from([0.05, 0.3, 1.0, 2.5]), n_groups=st.integers(1, 4))
def test_nested_group_dual_certificate(seed, t, n_groups):
    """x - u = t sum_n w_n xi_n with xi_n in the subdifferential of ||u_{G_n}||."""
    rng = np.random.default_rng(seed)
    m = 6
    groups = random_nested_groups(rng, m, n_groups)
    w = rng.choice([0.3, 1.0, 2.0], size=n_groups)
    x = rng.standard_normal((3, m))
    xt, gt, wt = _t(x), torch.as_tensor(groups), _t(w)
    u = nested_group_prox(xt, t, gt, weights=wt).numpy()
    # candidate dual vectors from the prefix compositions
    prev = x
    total = np.zeros_like(x)
    for n in range(n_groups):
        cur = nested_group_prox(xt, t, gt[: n + 1], weights=wt[: n + 1]).numpy()
        xi = (prev - cur) / (t * w[n])
        total += t * w[n] * xi
        assert np.all(xi[:, ~groups[n]] == 0)  # supported on G_n
        assert np.all(np.linalg.norm(xi, axis=1) <= 1 + 1e-12)  # dual ball
        ug = np.where(groups[n], u, 0)
        norm = np.linalg.norm(ug, axis=1, keepdims=True)
        nz = norm[:, 0] > 0
        assert np.allclose(xi[nz], (ug / np.where(norm > 0, norm, 1))[nz], atol=1e-10)
        prev = cur
    assert np.allclose(total, x - u, atol=1e-12)


@SLOW
@given(seed=seeds, t=st.sampled_from([0.1, 0.5, 1.2]))
def test_nested_group_brute_force(seed, t):
    rng = np.random.default_rng(seed)
    groups = random_nested_groups(rng, 5, 3)
    w = rng.choice([0.5, 1.0, 1.5], size=3)
    x = rng.standard_normal(5) * 1.5
    pen = nested_penalty(groups, w)
    u = nested_group_prox(_t(x), t, torch.as_tensor(groups), weights=_t(w)).numpy()
    ref = pen.solve(x, t)
    assert pen.objective(u, x, t) <= pen.objective(ref, x, t) + 1e-10
    assert np.allclose(u, ref, atol=1e-4)


@FAST
@given(seed=seeds, n_groups=st.integers(1, 5))
def test_nested_group_zero_pattern(seed, n_groups):
    """The zero set is some G_k and grows with t: inner entries vanish first."""
    rng = np.random.default_rng(seed)
    m = 7
    groups = random_nested_groups(rng, m, n_groups)
    gt = torch.as_tensor(groups)
    x = _t(rng.standard_normal((4, m)))
    previous = np.zeros((4, m), bool)
    for t in np.linspace(0.0, 4.0, 25):
        zero = nested_group_prox(x, float(t), gt).numpy() == 0
        assert np.all(zero[previous])  # a larger t zeros a superset of entries
        for row in zero:
            assert not row.any() or any(np.array_equal(row, g) for g in groups)
        previous = zero
    big = nested_group_prox(x, 1e3, gt).numpy()
    assert np.all(big[:, groups[-1]] == 0)  # t large: the largest group is gone
    assert np.array_equal(big[:, ~groups[-1]], x.numpy()[:, ~groups[-1]])


def test_nested_group_special_cases():
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # one group = all features: plain group soft thresholding
    full = torch.ones(1, 4, dtype=torch.bool)
    assert torch.allclose(nested_group_prox(x, 0.7, full), group_soft_threshold(x, 0.7, dim=1))
    # singleton chain on one feature: acts only on that feature
    only = torch.tensor([[False, True, False, False]])
    u = nested_group_prox(x, 0.7, only)
    assert torch.equal(u[:, [0, 2, 3]], x[:, [0, 2, 3]])
    assert torch.allclose(u[:, 1], soft_threshold(x[:, 1], 0.7), atol=1e-15, rtol=0)
    # feature axis other than the last; batched == per slice
    xt = x.t().contiguous()
    assert torch.allclose(nested_group_prox(xt, 0.4, GROUPS3, dim=0), nested_group_prox(x, 0.4, GROUPS3).t())
    for i in range(5):
        assert torch.allclose(nested_group_prox(x, 0.4, GROUPS3)[i], nested_group_prox(x[i], 0.4, GROUPS3))
    # a zero slice stays exactly zero
    assert torch.equal(nested_group_prox(torch.zeros(2, 4), 0.1, GROUPS3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------
# pairwise l1
# ---------------------------------------------------------------------------


def reference_pairwise(x, t):
    """Sequential PAV in pure Python on x_(i) - t (2i - n - 1)."""
    n = len(x)
    order = np.argsort(x, kind="stable")
    v = x[order] - t * (2 * np.arange(1, n + 1) - n - 1)
    vals, cnts = [], []
    for a in v:
        vals.append(a)
        cnts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            c = cnts[-2] + cnts[-1]
            vals[-2] = (vals[-2] * cnts[-2] + vals[-1] * cnts[-1]) / c
            cnts[-2] = c
            vals.pop()
            cnts.pop()
    u = np.empty(n)
    u[order] = np.repeat(vals, cnts)
    return u


@SLOW
@given(seed=seeds, n=st.integers(2, 6), t=st.sampled_from([0.02, 0.1, 0.4, 2.0]), ties=st.booleans())
def test_pairwise_brute_force(seed, n, t, ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    if ties:
        x = np.round(x * 2) / 2
    pen = pairwise_penalty(n)
    u = pairwise_l1_prox(_t(x), t).numpy()
    ref = pen.solve(x, t)
    assert pen.objective(u, x, t) <= pen.objective(ref, x, t) + 1e-10
    assert np.allclose(u, ref, atol=1e-5)
    # no perturbation improves the objective
    f0 = pen.objective(u, x, t)
    for scale in (1e-2, 1e-4):
        for _ in range(20):
            assert f0 <= pen.objective(u + scale * rng.standard_normal(n), x, t) + 1e-13


@pytest.fixture(params=["compiled", "hybrid", "stack_only", "passes_only"])
def pav_strategy(request, monkeypatch):
    """The compiled CPU kernel, or the torch code with each of its PAV strategies."""
    monkeypatch.setattr(softcnn._kernels, "ENABLED", request.param == "compiled")
    if request.param == "stack_only":
        monkeypatch.setattr(P, "_STACK_STEP_OVERHEAD", -(10**9))
    elif request.param == "passes_only":
        monkeypatch.setattr(P, "_STACK_STEP_OVERHEAD", 10**12)
    return request.param


@pytest.mark.parametrize("seed", range(3))
def test_pairwise_matches_sequential_pav(pav_strategy, seed):
    rng = np.random.default_rng(seed)
    for n, cols in [(1, 3), (2, 4), (7, 5), (40, 6), (300, 3)]:
        x = rng.standard_normal((n, cols))
        x[:, 0] = np.round(x[:, 0], 1)  # ties
        x[:, 1] = np.linspace(0, 1, n) * 0.2  # equally spaced: long cascades
        for t in (1e-3, 0.05 / max(n, 1), 0.5 / max(n, 1), 3.0 / max(n, 1), 10.0):
            u = pairwise_l1_prox(_t(x), t).numpy()
            ref = np.stack([reference_pairwise(x[:, j], t) for j in range(cols)], axis=1)
            assert np.allclose(u, ref, atol=1e-11, rtol=0), (pav_strategy, n, t)


@FAST
@given(seed=seeds, n=st.integers(2, 30), t=st.floats(0.001, 2.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_pairwise_properties(seed, n, t, dtype):
    rng = np.random.default_rng(seed)
    x = _t(rng.standard_normal((n, 3)) * 2, dtype)
    u = pairwise_l1_prox(x, t, dim=0)
    xd, ud = x.double(), u.double()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    # the mean is preserved and the order of x is preserved (non-strictly)
    assert torch.allclose(ud.mean(0), xd.mean(0), atol=tol, rtol=0)
    i, j = torch.triu_indices(n, n, 1)
    ordered = (xd[i] - xd[j]) * (ud[i] - ud[j]) >= -tol
    assert ordered.all()
    # the ordering of u never overshoots: |u_p - u_q| <= |x_p - x_q|
    assert ((ud[i] - ud[j]).abs() <= (xd[i] - xd[j]).abs() + tol).all()
    # batched over the other dims == per-slice calls, and dim handling
    for c in range(3):
        assert torch.allclose(u[:, c], pairwise_l1_prox(x[:, c], t), atol=tol, rtol=0)
    assert torch.allclose(pairwise_l1_prox(x.t(), t, dim=1), u.t(), atol=tol, rtol=0)


def test_pairwise_large_t_is_the_mean(kernel_backend):
    rng = np.random.default_rng(5)
    for dtype in (torch.float32, torch.float64):
        x = _t(rng.standard_normal((50, 4, 3)) * 3, dtype)
        t = float(x.max() - x.min()) + 1.0  # sufficient for total fusion
        u = pairwise_l1_prox(x, t, dim=0)
        assert torch.all(u == u[:1])  # exactly equal entries
        mean = x.double().mean(0)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert torch.allclose(u[0].double(), mean, atol=tol, rtol=0)
        # just below full fusion there are at least two distinct values for some slice
        v = pairwise_l1_prox(x, 1e-3, dim=0)
        assert (v != v[:1]).any()


def test_pairwise_float32_accumulates_accurately(kernel_backend):
    """Offset float32 data: block sums must not lose the small differences."""
    g = torch.Generator().manual_seed(10)
    x = (1000 + torch.randn(2000, 3, generator=g)).float()
    for t in (1e-5, 1e-3):
        u32 = pairwise_l1_prox(x, t)
        u64 = pairwise_l1_prox(x.double(), t)
        assert u32.dtype == torch.float32
        assert torch.allclose(u32.double(), u64, atol=1e-4, rtol=0)


def test_pairwise_bigger_input_quick(kernel_backend):
    x = torch.randn(500, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for t in (1e-4, 1e-3, 1e-2):
        u = pairwise_l1_prox(x, t)
        ref = np.stack([reference_pairwise(x[:, j].numpy(), t) for j in range(0, 64, 16)], axis=1)
        assert np.allclose(u[:, ::16].numpy(), ref, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------
# total variation
# ---------------------------------------------------------------------------


@SLOW
@given(
    seed=seeds,
    shape=st.sampled_from([(2, 2), (2, 3), (3, 3), (1, 4)]),
    r=st.integers(1, 2),
    t=st.sampled_from([0.05, 0.3, 1.0]),
    masked=st.booleans(),
)
@pytest.mark.parametrize("impl", BACKENDS)
def test_tv_l1_brute_force(impl, seed, shape, r, t, masked):
    rng = np.random.default_rng(seed)
    lh, lw = shape
    x = rng.standard_normal((lh * lw, r))
    mask = rng.random((lh * lw, r)) < 0.75 if masked else None
    pen = tv_penalty(lh, lw, r, "l1", mask)
    with backend(impl):
        u = tv_prox(_t(x), t, shape, kind="l1", n_iter=3000, tol=0.0,
                    mask=None if mask is None else torch.as_tensor(mask)).numpy()
    ref = pen.solve(x, t)
    assert pen.objective(u, x, t) <= pen.objective(ref, x, t) + 1e-9
    assert np.allclose(u.ravel(), ref, atol=1e-5)
    if mask is not None:
        assert np.array_equal(u[~mask], x[~mask])  # entries that do not exist: unchanged
    f0 = pen.objective(u, x, t)
    for _ in range(20):
        assert f0 <= pen.objective(u.ravel() + 1e-3 * rng.standard_normal(u.size), x, t) + 1e-9


@SLOW
@given(
    seed=seeds,
    shape=st.sampled_from([(2, 2), (2, 3), (3, 2)]),
    r=st.integers(1, 3),
    t=st.sampled_from([0.05, 0.3, 1.0]),
    masked=st.booleans(),
)
@pytest.mark.parametrize("impl", BACKENDS)
def test_tv_group_brute_force(impl, seed, shape, r, t, masked):
    rng = np.random.default_rng(seed)
    lh, lw = shape
    x = rng.standard_normal((lh * lw, r))
    mask = rng.random((lh * lw, r)) < 0.8 if masked else None
    pen = tv_penalty(lh, lw, r, "group", mask)
    with backend(impl):
        u = tv_prox(_t(x), t, shape, kind="group", n_iter=3000, tol=0.0,
                    mask=None if mask is None else torch.as_tensor(mask)).numpy()
    ref = pen.solve(x, t)
    assert pen.objective(u, x, t) <= pen.objective(ref, x, t) + 1e-8
    assert np.allclose(u.ravel(), ref, atol=1e-4)
    if mask is not None:
        assert np.array_equal(u[~mask], x[~mask])
    f0 = pen.objective(u, x, t)
    for _ in range(20):
        assert f0 <= pen.objective(u.ravel() + 1e-3 * rng.standard_normal(u.size), x, t) + 1e-9


@pytest.mark.parametrize("kind", ["l1", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tv_large_t_is_constant(kind, dtype, kernel_backend):
    x = torch.randn(4 * 5, 2, 3, dtype=dtype, generator=torch.Generator().manual_seed(7))
    u = tv_prox(x, 1e4, (4, 5), kind=kind)
    assert u.shape == x.shape and u.dtype == dtype
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    assert torch.allclose(u, x.mean(0, keepdim=True).expand_as(x), atol=tol, rtol=0)


def test_tv_structure(kernel_backend):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 4, dtype=torch.float64, generator=g)
    # l1 TV is separable over the rest entries: batched == per-column
    u = tv_prox(x, 0.3, (3, 4), n_iter=2000)
    for j in range(4):
        assert torch.allclose(u[:, j], tv_prox(x[:, j], 0.3, (3, 4), n_iter=2000), atol=1e-8, rtol=0)
    # with one entry per position the group and l1 penalties coincide
    x1 = x[:, :1]
    assert torch.allclose(tv_prox(x1, 0.3, (3, 4), kind="group", n_iter=2000),
                          tv_prox(x1, 0.3, (3, 4), kind="l1", n_iter=2000), atol=1e-8, rtol=0)
    # TV preserves the mean over the connected grid
    assert torch.allclose(u.mean(0), x.mean(0), atol=1e-12, rtol=0)
    # a position whose entries are all absent is cut out of the graph
    mask = torch.ones(12, 4, dtype=torch.bool)
    mask[5] = False
    um = tv_prox(x, 0.3, (3, 4), mask=mask)
    assert torch.equal(um[5], x[5])
    # a mask over positions only broadcasts over the rest dims
    pm = torch.ones(12, 1, dtype=torch.bool)
    pm[5] = False
    assert torch.allclose(tv_prox(x, 0.3, (3, 4), mask=pm), um, atol=1e-12, rtol=0)
    # a one-row grid is a chain: constant input stays constant
    c = torch.full((6, 2), 1.5, dtype=torch.float64)
    assert torch.allclose(tv_prox(c, 0.5, (1, 6)), c, atol=1e-15, rtol=0)


def test_tv_l1_screening_solves_columns_without_iterating(kernel_backend):
    """Anisotropic TV: an edge whose difference in x exceeds 8 t has the dual t sign(D x) at the
    solution, exactly, and a column whose other edges share no position is solved in closed form,
    so both are exact after one iteration; a chain of near ties still needs the solver's
    iterations. Checked against the brute-force prox, in the narrow form (most columns have a
    near tie) and in the wide one (most columns have none: the others are a smaller problem)."""
    rng = np.random.default_rng(31)
    lh, lw, t = 4, 5, 0.01
    ramp = 0.1 * np.arange(lh * lw, dtype=float).reshape(lh, lw)  # steps of 0.1 and 0.5 >> 8 t
    ramp += 0.005 * rng.standard_normal(ramp.shape)
    isolated, chain = ramp.copy(), ramp.copy()
    isolated[1, 2] = isolated[1, 1] - 0.005  # two near ties that share no position (and tie)
    isolated[3, 4] = isolated[3, 3] - 0.004
    chain[2, 2], chain[2, 3] = chain[2, 1] + 0.002, chain[2, 1] - 0.001  # two that share (2, 2)
    pen = tv_penalty(lh, lw, 1, "l1")
    for columns, closed in (([ramp, isolated, chain], [0, 1]), ([ramp] * 10 + [isolated, chain], range(11))):
        x = np.stack([c.ravel() for c in columns], 1)
        ref = np.stack([pen.solve(x[:, j], t) for j in range(x.shape[1])], 1)
        one = tv_prox(_t(x), t, (lh, lw), n_iter=1).numpy()
        assert np.allclose(one[:, closed], ref[:, closed], atol=1e-7, rtol=0)
        assert np.abs(one[:, -1] - ref[:, -1]).max() > 1e-6  # the chain is not done in one iteration
        assert np.allclose(tv_prox(_t(x), t, (lh, lw)).numpy(), ref, atol=1e-7, rtol=0)
        tied = one[:, closed[-1]].reshape(lh, lw)
        assert abs(tied[1, 1] - tied[1, 2]) <= 1e-15 and abs(tied[3, 3] - tied[3, 4]) <= 1e-15
        # sure edges: the entries of the ramp move by t per edge, the sign of its differences
        dual_h = t * np.sign(np.diff(ramp, axis=1))
        dual_v = t * np.sign(np.diff(ramp, axis=0))
        moved = np.zeros_like(ramp)
        moved[:, 1:] -= dual_h
        moved[:, :-1] += dual_h
        moved[1:] -= dual_v
        moved[:-1] += dual_v
        assert np.allclose(one[:, 0], (ramp + moved).ravel(), atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------
# transformed l1
# ---------------------------------------------------------------------------


def tl1_objective(u, x, t, a):
    return 0.5 * (u - x) ** 2 + t * (a + 1) * np.abs(u) / (a + np.abs(u))


@FAST
@given(seed=seeds, t=st.floats(0.01, 3.0), a=st.floats(0.05, 5.0))
def test_tl1_is_global_minimiser(seed, t, a):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(-6, 6, 40), [0.0, 1e-3, -2.0]])
    u = tl1_prox(_t(x), t, a).numpy()
    # the minimiser lies between 0 and x; check against a fine grid including both ends
    grid = np.linspace(0, 1, 20001)[None, :] * x[:, None]
    fgrid = tl1_objective(grid, x[:, None], t, a).min(axis=1)
    fu = tl1_objective(u, x, t, a)
    assert np.all(fu <= fgrid + 1e-12 * (1 + x**2))
    # a nonzero output is a stationary point
    nz = u != 0
    du = (u - x) + t * a * (a + 1) * np.sign(u) / (a + np.abs(u)) ** 2
    assert np.all(np.abs(du[nz]) <= 1e-9 * (1 + np.abs(x[nz])))


@pytest.mark.parametrize("a", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("t", [0.01, 0.2, 2.0])
def test_tl1_threshold_and_shape(t, a):
    thr = t * (a + 1) / a if t <= a**2 / (2 * (a + 1)) else np.sqrt(2 * t * (a + 1)) - a / 2
    x = torch.tensor([thr * (1 - 1e-9), thr * (1 + 1e-6), -thr * (1 + 1e-6), 50.0, 1e6], dtype=torch.float64)
    u = tl1_prox(x, t, a)
    assert u[0] == 0 and u[1] > 0 and u[2] == -u[1]
    assert 0 < 50 - u[3] <= t * (a + 1) / a  # shrinks by less than the l1 bound
    assert abs(u[4] - (1e6 - t * a * (a + 1) / (a + 1e6) ** 2)) <= 1e-9
    # the prox of a function on R is monotone; odd symmetry
    xs = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    us = tl1_prox(xs, t, a)
    assert (us[1:] >= us[:-1]).all()
    assert torch.equal(tl1_prox(-xs, t, a), -us)
    assert torch.allclose(tl1_prox(xs.float(), t, a).double(), us, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    for name, op in OPERATORS.items():
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        u = op(x.cuda(), 0.3)
        assert u.device.type == "cuda", name
        assert torch.allclose(u.cpu(), op(x, 0.3), atol=1e-10), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_compiled_orders_values_its_short_keys_tie(dtype, monkeypatch):
    """The compiled prox sorts 32-bit keys that keep only the high bits of each value (the index
    takes the low ones), then orders the runs of equal keys itself: values equal in those bits,
    in runs short (insertion sort) and long (merge sort), of both signs, with -0.0/+0.0, in float64
    ones that round to one float32, with and without a mask, give the torch code's result."""
    g = torch.Generator().manual_seed(23)
    n = 300  # 9 index bits
    base = torch.tensor([0.5, -0.25, 0.0, 3.0], dtype=torch.float64)
    x = base[torch.randint(0, 4, (n, 6), generator=g)]
    x += torch.randint(-3, 4, (n, 6), generator=g).double() * 2.0**-24  # below a float32 key's resolution
    x[:50, 0] = 1.0 + torch.randn(50, generator=g).double() * 1e-12  # one long run (float64: one float32)
    x[:10, 1] = -0.0
    # a whole column within one key, in random order: the insertion sort gives way to a merge sort
    x[:, 2] = 0.5 + torch.randint(0, 2**9, (n,), generator=g).double() * 2.0**-24
    x = x.to(dtype)
    mask = torch.rand(n, 6, generator=g) < 0.7
    for t in (1e-9, 1e-7, 1e-4, 10.0):
        for kw in ({}, {"mask": mask}):
            monkeypatch.setattr(softcnn._kernels, "ENABLED", True)
            got = pairwise_l1_prox(x, t, dim=0, **kw)
            monkeypatch.setattr(softcnn._kernels, "ENABLED", False)
            expected = pairwise_l1_prox(x, t, dim=0, **kw)
            # the same block means, summed in another order: sums of up to n terms differ by n eps max|x|
            tol = n * torch.finfo(torch.float64).eps * float(x.abs().max())
            if dtype == torch.float32:  # then rounded to float32: one unit of its last place more
                tol += torch.finfo(dtype).eps * float(x.abs().max())
            torch.testing.assert_close(got, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_without_pooling_is_the_ramp(kernel_backend, dtype):
    """Below half the smallest gap between existing values nothing pools: the prox is the ramp
    ``x_p - t (2 rank_p - m - 1)`` per slice of ``m`` existing entries (the compiled path writes it
    without building blocks), and absent entries keep their values."""
    g = torch.Generator().manual_seed(31)
    n, cols = 200, 5
    x = torch.randn(n, cols, generator=g, dtype=torch.float64)
    mask = torch.rand(n, cols, generator=g) < 0.6
    mask[:, 0] = True
    x = x.to(dtype)
    xd = x.double()
    xs = xd.sort(0).values
    t = float((xs[1:] - xs[:-1]).min()) / 4  # (of the values as given: float32 rounds them)
    assert t > 0
    got = pairwise_l1_prox(x, t, dim=0, mask=mask).double()
    for j in range(cols):
        e = mask[:, j]
        m = int(e.sum())
        rank = torch.empty(m, dtype=torch.float64)
        rank[xd[e, j].argsort()] = torch.arange(1, m + 1, dtype=torch.float64)
        ramp = xd[e, j] - t * (2 * rank - m - 1)
        tol = 4 * torch.finfo(dtype).eps * float(xd.abs().max())
        torch.testing.assert_close(got[e, j], ramp, rtol=0, atol=tol)
        assert torch.equal(got[~e, j], xd[~e, j])
