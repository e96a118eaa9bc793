"""The fast paths of the penalties and proxes give the results of the plain computations.

Warm-started TV (and its columns that stop on their own), the closed-form nested prox, the
small-step TL1 series, the masked (batched) pairwise prox and its NumPy sorts, ``out=`` writes
and workspaces, the written-out backward of the l2 grid penalty, and the per-layer caches of the
penalty objects (never shared between layers, dropped by copies and pickles).
"""

import copy
import gc
import pickle
import warnings

import numpy as np
import pytest
import torch
from backends import backend
from plain_penalties import plain_l2_grid
from sklearn.exceptions import ConvergenceWarning
from test_proximal import random_layer

import softcnn._kernels
import softcnn.prox
from softcnn import SoftConvRegressor
from softcnn.datasets import make_soft_conv_data
from softcnn.layers import SoftConv2d
from softcnn.penalties import (
    LocalityFullRings,
    LocalityL1,
    LocalityRings,
    SparsityTL1,
    TyingGroupGrid,
    TyingL1All,
    TyingL1Grid,
    TyingL2Grid,
    ring_groups,
)
from softcnn.prox import (
    _sort_rows,
    nested_group_prox,
    pairwise_l1_prox,
    soft_threshold,
    tl1_prox,
    tv_prox,
)


def scratch_buffers(workspace):
    """A workspace's scratch tensors (its other entries are cached values with their keys)."""
    return [b for b in workspace.values() if isinstance(b, torch.Tensor)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------ compact ('full') storage
@pytest.mark.parametrize("stride", [1, 2])
def test_locality_l1_compiled_pass_on_a_compact_storage_is_the_torch_prox(stride):
    """On a 'full' layer in float32, with per-entry scales, the one compiled pass of the locality
    l1 prox stores what the torch code's five passes store (to float32 rounding, the same
    thresholded entries), moves the shared kernels alike, and bumps the parameter's version
    (written through NumPy: autograd must see an in-place change)."""
    g = _gen(3)
    layer = SoftConv2d(2, 3, 3, (6, 5), padding="same", support="full", stride=stride, generator=g)
    K = layer.mask.shape[1]
    with torch.no_grad():
        layer.shared.normal_(generator=g)
        layer.deviation.normal_(0.0, 0.3, generator=g)
    layer.set_scales(torch.linspace(0.5, 1.5, K), torch.linspace(2.0, 0.25, K))
    twin = copy.deepcopy(layer)
    pen = LocalityL1.from_params(SoftConvRegressor().get_params())
    version, step = layer.deviation._version, 5.0 / stride**2  # (the prox step is step / positions)
    with backend("compiled"):
        pen.prox(layer, step)
    with backend("torch"):
        pen.prox(twin, step)
    assert layer.deviation._version > version
    w, w_twin = layer.kernels().detach(), twin.kernels().detach()
    exists = layer.mask.unsqueeze(1).expand_as(w)
    assert 0.2 < float((w[exists] == 0).float().mean()) < 0.8  # the threshold bites, not everywhere
    assert torch.equal(w == 0, w_twin == 0)
    torch.testing.assert_close(w, w_twin, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.shared_kernel(), twin.shared_kernel())


# ------------------------------------------------------------------ tv_prox
@pytest.mark.parametrize("kind", ["l1", "group"])
@pytest.mark.parametrize("masked", [False, True])
def test_tv_warm_start_gives_the_cold_result(kind, masked, kernel_backend):
    g = _gen(0)
    x = torch.randn(20, 3, dtype=torch.float64, generator=g)
    mask = torch.rand(20, 3, generator=g) < 0.8 if masked else None
    cold, dual = tv_prox(x, 0.3, (4, 5), kind=kind, mask=mask, return_dual=True)
    assert dual.shape == (4 * 4 + 3 * 5, 3)
    assert torch.equal(cold, tv_prox(x, 0.3, (4, 5), kind=kind, mask=mask))  # same iterates
    x2 = x + 0.05 * torch.randn(x.shape, dtype=x.dtype, generator=g)
    kept = dual.clone()
    for start in (dual, 10 * torch.randn(dual.shape, dtype=x.dtype, generator=g)):  # any start is valid
        warm = tv_prox(x2, 0.2, (4, 5), kind=kind, mask=mask, dual=start)
        torch.testing.assert_close(warm, tv_prox(x2, 0.2, (4, 5), kind=kind, mask=mask), atol=1e-8, rtol=0)
    assert torch.equal(dual, kept)  # the start is not modified
    # one iteration from its own solution stays there
    again = tv_prox(x, 0.3, (4, 5), kind=kind, mask=mask, dual=dual, n_iter=1)
    torch.testing.assert_close(again, cold, atol=1e-9, rtol=0)
    if mask is not None:
        assert torch.equal(again[~mask], x[~mask])


def test_tv_dual_checks_and_trivial_cases(kernel_backend):
    x = torch.randn(6, 2, dtype=torch.float64, generator=_gen(1))
    with pytest.raises(ValueError, match="dual"):
        tv_prox(x, 0.1, (2, 3), dual=torch.zeros(3, 2, dtype=torch.float64))
    u, dual = tv_prox(x, 0.0, (2, 3), return_dual=True)
    assert torch.equal(u, x) and torch.equal(dual, torch.zeros(2 * 2 + 1 * 3, 2, dtype=torch.float64))


def test_tv_float32_stops_at_round_off_and_matches_float64(kernel_backend):
    """The dual of a float32 solve cannot settle below round-off: it stops there, at the
    accuracy of a full run (previously every float32 call ran all n_iter iterations)."""
    g = _gen(2)
    x = 0.01 * torch.randn(28 * 28, 40, generator=g)
    for t in (1e-7, 1e-5):
        ref = tv_prox(x.double(), t, (28, 28), n_iter=3000, tol=0.0)
        full = tv_prox(x, t, (28, 28), tol=0.0)  # all 200 iterations
        fast = tv_prox(x, t, (28, 28))
        scale = float(x.abs().max()) * torch.finfo(torch.float32).eps
        err_full = float((full.double() - ref).abs().max())
        assert float((fast.double() - ref).abs().max()) <= max(2 * err_full, 4 * scale)


def test_tying_tv_prox_warm_starts_per_layer(kernel_backend):
    pen = TyingL1Grid()
    a, b = random_layer(0), random_layer(1, support=5, image=(5, 4), channels=(1, 3), k=3)
    for layer in (a, b, a):  # two geometries: each layer has its own dual
        ref = copy.deepcopy(layer)
        pen.prox(layer, 0.5)
        TyingL1Grid().prox(ref, 0.5)  # cold
        torch.testing.assert_close(layer.deviations(), ref.deviations(), atol=1e-8, rtol=0)
    assert len(pen._layer_state) == 2
    # copies and pickles start cold and still work
    for clone in (copy.deepcopy(pen), pickle.loads(pickle.dumps(pen))):
        assert "_layer_state" not in vars(clone)
        clone.prox(copy.deepcopy(a), 0.5)
    assert repr(pen) == "TyingL1Grid()"
    # the cache does not keep a layer alive
    del a, ref, layer
    gc.collect()
    assert len(pen._layer_state) == 1


@pytest.mark.parametrize("pen_cls", [TyingL1Grid, TyingGroupGrid])
def test_tying_tv_prox_in_the_parameter_matches_the_kernel_view(pen_cls, kernel_backend):
    """With one deviation scale c the TV prox runs on the raw parameter with the step t / c (TV is
    1-homogeneous); per-offset scales take the (L, F, K) view. Both are the prox of the view."""
    for uniform in (True, False):
        layer = random_layer(4)
        scales = layer.deviation_scale
        scales.copy_(torch.full_like(scales, 0.25) if uniform else torch.linspace(0.5, 2.0, len(scales)))
        absent = ~layer.mask.unsqueeze(1).expand_as(layer.deviation)
        stored = layer.deviation[absent].clone()
        d = layer.deviations().detach()
        t = 0.5 * float(scales.max()) ** 2 / layer.n_positions
        ref = tv_prox(d, t, layer.output_shape, kind=pen_cls.kind, mask=layer.mask.unsqueeze(1),
                      n_iter=5000, tol=0.0)
        version = layer.deviation._version
        pen_cls().prox(layer, 0.5)
        torch.testing.assert_close(layer.deviations().detach(), ref, atol=1e-9, rtol=0)
        assert torch.equal(layer.deviation[absent], stored)  # absent entries keep their values
        assert layer.deviation._version > version  # a write autograd sees, compiled or not


def test_tying_group_tv_cache_follows_dtype():
    pen = TyingGroupGrid()
    layer = random_layer(3)
    pen.prox(layer, 0.5)
    layer.float()
    pen.prox(layer, 0.5)  # the float64 dual is not reused for a float32 layer
    state = pen._layer_state[layer]
    assert state["tv_dual"][1].dtype == torch.float32
    assert "tv_input" not in state  # one scale: solved in the parameter itself
    scratch = scratch_buffers(state["tv_workspace"])
    assert scratch and all(b.dtype == torch.float32 for b in scratch)  # nor the scratch


# ---------------------------------------------------------- nested / rings
def composed_nested(x, t, groups, weights):
    """The definition: block soft thresholding of each group in turn, smallest first."""
    u = x.clone()
    for g, w in zip(groups, weights):
        norm = torch.linalg.vector_norm(u[..., g], dim=-1, keepdim=True)
        factor = torch.clamp(1 - t * w / norm, min=0)
        u[..., g] = torch.where(norm > t * w, u[..., g] * factor, torch.zeros_like(u[..., g]))
    return u


@pytest.mark.parametrize("t", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("weights", [[1.0, 0.5, 2.0], [1.0, 0.0, 2.0]])  # a free group too
def test_nested_closed_form_equals_the_composition(t, weights):
    g = _gen(4)
    groups = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    weights = torch.tensor(weights, dtype=torch.float64)
    x = torch.randn(7, 3, 6, dtype=torch.float64, generator=g)
    x[0, 0] = 0.0
    ref = composed_nested(x, t, groups, weights)
    u = nested_group_prox(x, t, groups, weights=weights)
    torch.testing.assert_close(u, ref, atol=1e-12, rtol=0)
    assert torch.equal(u == 0, ref == 0) and not torch.signbit(u[u == 0]).any()  # exact +0
    torch.testing.assert_close(nested_group_prox(x.transpose(0, 2), t, groups, dim=0, weights=weights),
                               ref.transpose(0, 2), atol=1e-12, rtol=0)
    y = x.clone()
    assert nested_group_prox(y, t, groups, weights=weights, out=y) is y  # in place
    torch.testing.assert_close(y, u, atol=0, rtol=0)
    with pytest.raises(ValueError, match="out"):
        nested_group_prox(x, t, groups, out=torch.empty(3))


@pytest.mark.parametrize("pen_cls", [LocalityRings, LocalityFullRings])
def test_rings_value_and_cached_groups(pen_cls):
    pen = pen_cls()
    a = random_layer(5, support=5, image=(4, 4), channels=(2, 2), k=3)
    b = random_layer(6, support=7, image=(5, 5), channels=(1, 2), k=3)
    for layer in (a, b, a):
        groups = ring_groups(layer, full=pen.full).repeat(1, layer.in_channels)
        w = layer.kernels()[..., :-1]
        ref = sum(torch.linalg.vector_norm(w[..., row], dim=-1).sum() for row in groups)
        torch.testing.assert_close(pen.layer_value(layer), ref)
        assert torch.equal(pen._groups(layer), groups)  # the cache holds this layer's groups
        n_groups, ring = pen._rings(layer)  # and each weight's first group (n_groups: none)
        first = [next((n for n in range(len(groups)) if groups[n, j]), len(groups)) for j in range(ring.numel())]
        assert n_groups == len(groups) and ring.tolist() == first
    # the value's gradient is finite at zero groups (like a norm's)
    z = random_layer(5, support=5, image=(4, 4), channels=(2, 2), k=3)
    with torch.no_grad():
        z.shared.zero_()
        z.deviation.zero_()
    pen.layer_value(z).backward()
    assert torch.isfinite(z.shared.grad).all()


# ------------------------------------------------------------------ tl1
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [0.2, 1.0, 4.0])
def test_tl1_small_step_series_matches_the_trigonometric_form(dtype, a):
    """For small t the prox uses a polynomial; it agrees with the closed form in float64."""
    x = 0.3 * torch.randn(5000, dtype=torch.float64, generator=_gen(7))
    for t in (1e-9, 1e-7, 1e-5, 1e-3):
        s = a + x.abs()
        phi = 2 * torch.asin(torch.sqrt(27 * t * a * (a + 1) / (4 * s**3)))
        ref = torch.sign(x) * ((2 / 3) * s * torch.cos(phi / 3) - 2 * a / 3 + x.abs() / 3)
        ref = torch.where(x.abs() > t * (a + 1) / a, ref, torch.zeros_like(x))
        u = tl1_prox(x.to(dtype), t, a)
        tol = 4 * torch.finfo(dtype).eps * (a + 0.3 * 5)
        torch.testing.assert_close(u.double(), ref, atol=tol, rtol=0)
        assert torch.equal(u == 0, ref == 0) and not torch.signbit(u[u == 0]).any()


def test_elementwise_out_writes_in_place():
    x = torch.randn(4, 5, dtype=torch.float64, generator=_gen(8))
    for fn in (lambda v, **kw: soft_threshold(v, 0.3, **kw), lambda v, **kw: tl1_prox(v, 0.3, 0.7, **kw),
               lambda v, **kw: tl1_prox(v, 1e-6, 0.7, **kw)):
        y = x.clone()
        view = y[:, 1:]
        assert fn(view, out=view).data_ptr() == view.data_ptr()
        torch.testing.assert_close(y[:, 1:], fn(x[:, 1:]), atol=0, rtol=0)
        assert torch.equal(y[:, 0], x[:, 0])


def test_sparsity_tl1_prox_is_the_elementwise_prox():
    layer = random_layer(9)
    w0 = (layer.shared_kernel().unsqueeze(0) + layer.deviations()).detach()
    m0 = layer.shared_kernel().detach().clone()
    SparsityTL1(0.5).prox(layer, 2.0)
    t = 2.0 / layer.n_positions
    ex = layer.mask.unsqueeze(1).expand_as(w0)
    w1 = layer.kernels().detach()
    ref = w0.clone()
    ref[..., :-1] = tl1_prox(w0[..., :-1], t, 0.5)
    torch.testing.assert_close(w1[ex], ref[ex], atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.shared_kernel()[:, :-1], tl1_prox(m0[:, :-1], t, 0.5), atol=0, rtol=0)


# ------------------------------------------------------------ pairwise / all
def test_masked_pairwise_equals_the_prox_of_the_existing_entries(kernel_backend):
    g = _gen(10)
    x = torch.randn(9, 4, 3, dtype=torch.float64, generator=g)
    x[:3, 0, 0] = x[5, 0, 0]  # ties
    mask = torch.rand(9, 4, 3, generator=g) < 0.7
    mask[:, 1, 1] = False
    mask[:, 2, 2] = False
    mask[4, 2, 2] = True  # a single entry
    for t in (0.0, 0.01, 0.2, 5.0):
        u = pairwise_l1_prox(x, t, dim=0, mask=mask)
        for i in range(4):
            for j in range(3):
                col, m = x[:, i, j], mask[:, i, j]
                if m.sum() > 1:
                    torch.testing.assert_close(u[m, i, j], pairwise_l1_prox(col[m], t), atol=1e-12, rtol=0)
                assert torch.equal(u[~m, i, j], col[~m]) if m.sum() > 1 else torch.equal(u[:, i, j], col)


def test_pairwise_no_violation_fast_path_is_exact(kernel_backend):
    x = torch.linspace(0, 1, 50, dtype=torch.float64)[:, None].repeat(1, 3)
    x[:, 1] = x[:, 1].flip(0)
    x[10:13, 2] = 0.2  # a tie: this column pools
    u = pairwise_l1_prox(x, 1e-4, dim=0)
    ramp = 2 * torch.arange(1, 51, dtype=torch.float64) - 51
    torch.testing.assert_close(u[:, 0], x[:, 0] - 1e-4 * ramp, atol=1e-15, rtol=0)
    assert len(set(u[10:13, 2].tolist())) == 1


def reference_l1_all(layer, t=None):
    """Tying l1/all the plain way: one entry (output channel, offset) at a time."""
    w = (layer.shared_kernel().unsqueeze(0) + layer.deviations()).detach()
    out, total = w.clone(), 0.0
    for f in range(w.shape[1]):
        for k in range(w.shape[2]):
            m = layer.mask[:, k]
            x = w[m, f, k]
            xs = x.sort().values
            n = xs.numel()
            total += float(((2 * torch.arange(1, n + 1, dtype=xs.dtype) - n - 1) * xs).sum())
            if t is not None and n > 1:
                out[m, f, k] = pairwise_l1_prox(x, t)
    return out, total / (layer.n_positions - 1)


def test_tying_l1_all_batched_equals_per_entry():
    layer = random_layer(11, support=5, image=(4, 5), channels=(2, 2), k=3)
    pen = TyingL1All()
    step = 3.0
    t = step / layer.n_positions / (layer.n_positions - 1)
    ref, value = reference_l1_all(layer, t)
    assert float(pen.layer_value(layer).detach()) == pytest.approx(value, rel=1e-12)
    pen.prox(layer, step)
    ex = layer.mask.unsqueeze(1).expand_as(ref)
    torch.testing.assert_close(layer.kernels().detach()[ex], ref[ex], atol=1e-12, rtol=0)


def test_writes_keep_absent_offsets_exactly():
    layer = random_layer(12)
    absent = ~layer.mask.unsqueeze(1).expand_as(layer.deviation)
    d0 = layer.deviation.detach().clone()
    for pen in (LocalityRings(), SparsityTL1(), TyingL1All(), TyingL1Grid()):
        pen.prox(layer, 0.7)
        assert torch.equal(layer.deviation.detach()[absent], d0[absent])


def test_penalty_state_is_per_penalty_and_per_layer():
    a, b = random_layer(13), random_layer(14)
    p, q = LocalityRings(), LocalityRings()
    p.prox(a, 0.5)
    q.prox(b, 0.5)
    assert list(p._layer_state.keys()) == [a] and list(q._layer_state.keys()) == [b]
    np.testing.assert_array_equal(p._groups(a).numpy(), q._groups(b).numpy())  # same geometry


def test_a_fitted_estimator_keeps_no_penalty_scratch_state():
    """The TV dual (twice the deviations) and the caches end with the fit, not with the estimator."""
    X, y, _ = make_soft_conv_data(60, (6, 6), random_state=0)
    est = SoftConvRegressor(channels=2, tying=0.1, tying_penalty="l1", tying_graph="grid", max_iter=5,
                            random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    tv = [pen for _, pen in est.penalties_ if isinstance(pen, TyingL1Grid)]
    assert tv and all("_layer_state" not in vars(pen) for _, pen in est.penalties_)


# ------------------------------------------------------------ NumPy sorts
def _torch_sort_rows(x, indices=True, workspace=None):
    """The ``torch.sort`` path of ``_sort_rows`` (what other devices use), stable."""
    values, order = torch.sort(x.detach(), dim=-1, stable=True)
    return values, order if indices else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_row_sort_equals_torch_sort(dtype):
    g = _gen(20)
    x = torch.randn(7, 300, generator=g).to(dtype)
    x[0, :50] = x[0, 60]  # ties
    x[1, ::3] = 0.0
    x[1, 1::3] = -0.0
    x[2, :10] = float("inf")
    x[2, 10:20] = -float("inf")
    x[3] = torch.finfo(dtype).max * torch.sign(x[3])  # the extremes of the key packing
    x[4, :5] = torch.finfo(dtype).tiny * torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0]).to(dtype)  # subnormals
    ref_values, ref_order = _torch_sort_rows(x)
    values, order = _sort_rows(x)
    assert values.dtype == dtype and order.dtype == torch.int64
    assert torch.equal(values, ref_values)  # -0.0 == +0.0
    assert torch.equal(x.gather(1, order).view(-1).view(torch.uint8),  # bit for bit, signed zeros too
                       values.contiguous().view(-1).view(torch.uint8))
    assert torch.equal(torch.sort(order, dim=1).values, torch.arange(300).expand(7, 300))  # permutations
    if dtype == torch.float32:  # the packed keys order ties by index, like a stable sort
        keep = ~torch.isinf(x).any(1) & (x != 0).all(1)  # rows without signed zeros
        assert torch.equal(order[keep], ref_order[keep])
    only, none = _sort_rows(x, indices=False)
    assert none is None and torch.equal(only, ref_values)
    # a non-contiguous input and a gradient-carrying input are sorted like their values
    y = x.T.contiguous().T.requires_grad_(True)
    assert torch.equal(_sort_rows(y)[0], ref_values) and not _sort_rows(y)[0].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_prox_numpy_sort_equals_torch_sort(dtype, monkeypatch):
    monkeypatch.setattr(softcnn._kernels, "ENABLED", False)  # the torch code's sorts
    g = _gen(21)
    x = torch.randn(40, 6, 5, generator=g).to(dtype)
    x[:8, 0, 0] = x[9, 0, 0]  # ties
    mask = torch.rand(40, 6, 5, generator=g) < 0.8
    mask[:, 1, 1] = False
    mask[7, 1, 1] = True  # a single entry
    ts = (1e-4, 0.01, 0.3, 10.0)  # no pooling to full pooling
    fast = [pairwise_l1_prox(x, t, dim=0, mask=mask) for t in ts]
    fast += [pairwise_l1_prox(x, t, dim=1) for t in ts]
    monkeypatch.setattr(softcnn.prox, "_sort_rows", _torch_sort_rows)
    ref = [pairwise_l1_prox(x, t, dim=0, mask=mask) for t in ts] + [pairwise_l1_prox(x, t, dim=1) for t in ts]
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fast[0], fast[-1])


def test_tying_l1_all_float32_value_gradient_and_cached_coefficients():
    layer = random_layer(22, support=5, image=(4, 5), channels=(2, 2), k=3).float()
    pen = TyingL1All()
    _, value = reference_l1_all(layer)
    assert float(pen.layer_value(layer).detach()) == pytest.approx(value, rel=1e-5)
    with torch.no_grad():  # the values-only sort
        assert float(pen.layer_value(layer)) == pytest.approx(value, rel=1e-5)
    # the gradient: Σ_i (2 i - n - 1) x_(i) differentiated by autograd through torch.sort
    pen.layer_value(layer).backward()
    grad = layer.deviation.grad.clone()
    layer.deviation.grad = None
    w = layer.kernels()
    exists = layer.mask.unsqueeze(1).expand_as(w)
    xs = torch.where(exists, w, float("inf")).sort(dim=0).values
    n = exists.sum(0, keepdim=True)
    rank = torch.arange(1, w.shape[0] + 1).view(-1, 1, 1)
    plain = (torch.where(rank <= n, 2 * rank - n - 1, 0) * torch.where(rank <= n, xs, 0.0)).sum()
    (plain / (layer.n_positions - 1)).backward()
    torch.testing.assert_close(grad, layer.deviation.grad, atol=0, rtol=0)
    # the rank coefficients are cached for the mask; a change of the mask rebuilds them
    coef = pen._rank_coefficients(layer)
    assert pen._rank_coefficients(layer) is coef
    with torch.no_grad():
        layer.mask[0, 0] = ~layer.mask[0, 0]
    assert not torch.equal(pen._rank_coefficients(layer), coef)
    assert float(pen.layer_value(layer).detach()) == pytest.approx(reference_l1_all(layer)[1], rel=1e-5)


# ------------------------------------------------------------ TV solver paths
@pytest.mark.parametrize("kind", ["l1", "group"])
def test_tv_workspace_and_out_give_the_plain_result(kind, kernel_backend):
    g = _gen(23)
    x = torch.randn(20, 3, 4, dtype=torch.float64, generator=g)
    mask = torch.rand(20, 1, 4, generator=g) < 0.8  # kept at its own size along rest
    ws, dual_ws, dual = {}, None, None
    for t in (0.2, 0.2, 0.1):  # successive calls, each warm-started from the last dual
        x = x + 0.05 * torch.randn(x.shape, dtype=x.dtype, generator=g)
        u, dual = tv_prox(x, t, (4, 5), kind=kind, mask=mask, dual=dual, return_dual=True)
        y = x.clone()
        v, dual_ws = tv_prox(y, t, (4, 5), kind=kind, mask=mask, dual=dual_ws, return_dual=True, out=y,
                             workspace=ws)
        assert v.data_ptr() == y.data_ptr()  # written to out, here x itself
        assert torch.equal(v, u) and torch.equal(dual_ws, dual)  # the same iterates
        assert any(dual_ws.data_ptr() == b.data_ptr() for b in scratch_buffers(ws))  # the dual is kept there
    assert not torch.equal(u[~mask.expand_as(u)], torch.zeros(()))
    assert torch.equal(u[~mask.expand_as(u)], x[~mask.expand_as(u)])  # absent entries unchanged
    # the workspace's own dual is taken as masked already, but not once changed in place
    dual_ws.add_(1.0)
    start = dual_ws.clone()
    v = tv_prox(x, 0.2, (4, 5), kind=kind, mask=mask, dual=dual_ws, workspace=ws)
    assert torch.equal(v, tv_prox(x, 0.2, (4, 5), kind=kind, mask=mask, dual=start))
    # a non-contiguous out, and a workspace of another dtype is replaced, not reused
    out = torch.empty(3, 4, 20, dtype=torch.float64).permute(2, 0, 1)
    assert tv_prox(x, 0.2, (4, 5), kind=kind, mask=mask, out=out) is out
    torch.testing.assert_close(out, tv_prox(x, 0.2, (4, 5), kind=kind, mask=mask), atol=0, rtol=0)
    tv_prox(x.float(), 0.2, (4, 5), kind=kind, mask=mask, workspace=ws)
    assert all(b.dtype == torch.float32 for b in scratch_buffers(ws))


@pytest.mark.parametrize("kind", ["l1", "group"])
def test_tv_workspace_cache_follows_the_mask_and_dtype(kind, kernel_backend):
    """The edge mask and bounds kept in a workspace are rebuilt when the mask changes in place,
    or another mask, step or dtype comes: the result is always that of a call without one."""
    g = _gen(27)
    x = torch.randn(20, 3, 4, dtype=torch.float64, generator=g)
    mask = torch.rand(20, 1, 4, generator=g) < 0.8
    ws = {}
    for step in range(4):
        if step == 1:
            mask[3, 0, 1] = ~mask[3, 0, 1]  # in place: a new version
        if step == 2:
            mask = torch.rand(20, 1, 4, generator=g) < 0.5
        t = 0.2 if step < 3 else 0.05
        for xx in (x, x.float()):
            plain = tv_prox(xx, t, (4, 5), kind=kind, mask=mask)
            torch.testing.assert_close(tv_prox(xx, t, (4, 5), kind=kind, mask=mask, workspace=ws), plain,
                                       atol=0, rtol=0)


def test_tv_l1_columns_stop_on_their_own(monkeypatch):
    """Anisotropic TV iterates only the columns that have not met the stopping test; the result
    is that of solving each column alone (and of iterating them all), to the solver's accuracy."""
    monkeypatch.setattr(softcnn._kernels, "ENABLED", False)  # the torch code's column dropping
    g = _gen(24)
    x = torch.randn(30, 8, 20, dtype=torch.float64, generator=g)  # 160 columns on a 5x6 grid
    mask = torch.rand(30, 1, 20, generator=g) < 0.85
    _, dual = tv_prox(x, 0.1, (5, 6), mask=mask, return_dual=True)
    x2 = x.clone()
    x2[:, 0, :10] += 0.2 * torch.randn(30, 10, dtype=x.dtype, generator=g)  # 10 columns move
    ref = tv_prox(x2, 0.1, (5, 6), mask=mask, tol=0.0, n_iter=5000)
    warm = tv_prox(x2, 0.1, (5, 6), mask=mask, dual=dual)
    cold = tv_prox(x2, 0.1, (5, 6), mask=mask)
    alone = torch.stack([tv_prox(x2[:, f, k], 0.1, (5, 6), mask=mask[:, 0, k])
                         for f in range(8) for k in range(20)], -1).view_as(x2)
    monkeypatch.setattr(softcnn.prox, "_MIN_DROP", 10**9)  # never drop columns
    together = tv_prox(x2, 0.1, (5, 6), mask=mask, dual=dual)
    for u in (warm, cold, alone, together):
        torch.testing.assert_close(u, ref, atol=1e-8, rtol=0)
    assert not torch.equal(warm, together)  # the columns were dropped: other iterates


@pytest.mark.parametrize("dim", [0, -1])
def test_pairwise_workspace_and_out_give_the_plain_result(dim, kernel_backend):
    g = _gen(25)
    ws = {}
    for _ in range(2):  # the second call reuses the buffers
        x = torch.randn(30, 4, 30, generator=g)
        mask = torch.rand(30, 1, 30, generator=g) < 0.8
        plain = pairwise_l1_prox(x, 0.01, dim=dim, mask=mask)
        kept = pairwise_l1_prox(x, 0.01, dim=dim, mask=mask, workspace=ws)
        assert torch.equal(kept, plain) and ws
        assert all(kept.data_ptr() != b.data_ptr() for b in scratch_buffers(ws))  # a new tensor, not a buffer
        y = x.clone()
        assert pairwise_l1_prox(y, 0.01, dim=dim, mask=mask, out=y, workspace=ws) is y
        assert torch.equal(y, plain)
    values, order = _sort_rows(x.view(-1, 30), workspace=ws)
    assert torch.equal(values, torch.sort(x.view(-1, 30), dim=-1).values)
    assert torch.equal(x.view(-1, 30).gather(1, order), values)


@pytest.mark.parametrize(("pen", "step"), [(LocalityRings(), 0.1), (LocalityFullRings(), 0.15),
                                          (SparsityTL1(), 0.05), (TyingL1All(), 25.0)],
                         ids=["rings", "full_rings", "tl1", "l1_all"])
@pytest.mark.parametrize("c_d", [4.0, 3.0])
def test_kernel_writes_keep_ties_and_zeros_exact(pen, step, c_d):
    """``d = w / c - m / c``: tied positions stay tied for any scale (tl1; the rings' norms come
    from a matrix product, whose rounding may differ between equal rows), and zeros (ties between
    positions for l1/all) are exact for the power-of-two scales of proximal fits."""
    layer = random_layer(26, support=5, image=(7, 7), channels=(2, 3), k=3)
    layer.set_scales(torch.full_like(layer.shared_scale, 0.5), torch.full_like(layer.deviation_scale, c_d))
    tied = layer.mask.all(1)  # positions tied to m (a kernel cut by the border is not m's)
    assert 0 < int(tied.sum()) < layer.n_positions
    with torch.no_grad():
        layer.deviation[tied] = 0.0
        layer.deviation.mul_(0.1)
    # steps where some groups and weights vanish, not all nor m's (c_d = 4), or where l1/all
    # pools all positions
    pen.prox(layer, step * layer.n_positions)
    ex = layer.mask.unsqueeze(1).expand_as(layer.deviation)
    if isinstance(pen, SparsityTL1):
        assert torch.equal(layer.deviation[tied], torch.zeros_like(layer.deviation[tied]))
    if c_d == 4.0 and isinstance(pen, TyingL1All):  # a strong step pools all positions: one value
        w = layer.kernels().detach()
        for f, k in np.ndindex(w.shape[1:]):
            assert len(set(w[layer.mask[:, k], f, k].tolist())) == 1
    elif c_d == 4.0:
        w = layer.kernels().detach()[ex]
        assert (w == 0).sum() > w.numel() // 10  # many exact zeros, not round-off
        assert (w != 0).sum() > w.numel() // 10 and (layer.shared_kernel()[:, :-1] != 0).any()


# ------------------------------------------------------------ l2 grid
@pytest.mark.parametrize("image", [(4, 4), (1, 6), (6, 1), (5, 3)])
def test_tying_l2_grid_written_out_backward_is_autograds(image):
    layer = random_layer(27, support=5, image=image, channels=(2, 2), k=3)
    value = TyingL2Grid().layer_value(layer)
    value.backward()
    grad = layer.deviation.grad.clone()
    layer.deviation.grad = None
    plain = plain_l2_grid(layer)
    plain.backward()
    value, plain = float(value.detach()), float(plain.detach())
    assert value == pytest.approx(plain, rel=1e-12) and plain > 0
    torch.testing.assert_close(grad, layer.deviation.grad, atol=1e-12, rtol=0)
    assert grad.abs().max() > 0
