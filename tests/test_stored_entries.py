"""Penalties on a layer's stored entries (the layout of ``deviation``) against the (L, F, K) view."""

import pytest
import torch
from plain_penalties import plain_l2_grid
from torch.func import grad_and_value, vmap

from softcnn.layers import SoftConv2d
from softcnn.penalties import LocalityL2, Ridge, TyingL2Grid, TyingL2Mean
from softcnn.prox import soft_threshold, tl1_prox

# a covering support (compact storage, strides 1 and 2) and a windowed one ((L, F, K) storage)
GEOMETRIES = [dict(support="full", stride=1), dict(support="full", stride=2), dict(support=5, stride=1)]


def _layer(support, stride, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = SoftConv2d(2, 3, 3, (6, 5), padding="same", support=support, stride=stride, dtype=torch.float64,
                       generator=g)
    K = layer.mask.shape[1]
    with torch.no_grad():
        layer.shared.normal_(generator=g)
        layer.deviation.normal_(generator=g)  # absent offsets of an (L, F, K) storage too: they must not count
        # per-offset scales that are not powers of two, as L-BFGS's preconditioner sets them
        layer.set_scales(torch.rand(K, dtype=torch.float64, generator=g) + 0.5,
                         torch.rand(K, dtype=torch.float64, generator=g) + 0.5)
    return layer


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_stored_views_match_the_kernel_view(geometry):
    layer = _layer(**geometry)
    assert layer._compact == (geometry["support"] == "full")
    ex = layer.mask.unsqueeze(1)
    as_view = layer._from_storage if layer._compact else (lambda t: t * ex)
    torch.testing.assert_close(as_view(layer.stored_kernels()), layer.kernels(), rtol=0, atol=1e-13)
    torch.testing.assert_close(as_view(layer.stored_deviations()), layer.masked_deviation(), rtol=0, atol=1e-13)
    with torch.no_grad():
        buf = torch.empty_like(layer.deviation)
        torch.testing.assert_close(layer.stored_kernels(out=buf), layer.stored_kernels(), rtol=0, atol=1e-13)
        # writing back what was read changes nothing (to rounding); absent offsets keep their values
        raw = layer.deviation.detach().clone()
        layer.set_stored_kernels(layer.stored_kernels())
        torch.testing.assert_close(layer.deviation.detach(), raw, rtol=1e-13, atol=1e-13)
        layer.set_stored_deviations(layer.stored_deviations())
        torch.testing.assert_close(layer.deviation.detach(), raw, rtol=1e-13, atol=1e-13)
        # a kernel written equal to m is exactly tied: d = 0
        layer.deviation.zero_()
        w = layer.stored_kernels()  # m at every entry
        layer.deviation.copy_(raw)
        layer.set_stored_kernels(w)
        assert not layer.masked_deviation().any()


def _plain(pen, layer):
    """The penalty's value through the (L, F, K) view with autograd (the code before stored entries)."""
    if isinstance(pen, TyingL2Mean):
        return layer.masked_deviation().pow(2).sum()
    if isinstance(pen, Ridge):
        return layer.kernels()[..., :-1].pow(2).sum()
    if isinstance(pen, TyingL2Grid):
        return plain_l2_grid(layer)
    return (layer.kernels().pow(2) * pen.weights(layer)).sum()


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("pen", [TyingL2Mean(), TyingL2Grid(), Ridge(), LocalityL2(profile="distance")], ids=repr)
def test_stored_squares_value_gradient_and_hessian_match_autograd(pen, geometry):
    """The written-out backward of the smooth squares: value, gradient and a Hessian-vector
    product (a differentiable backward) equal autograd's through the kernel view."""
    layer = _layer(**geometry)
    params = [layer.shared, layer.deviation]
    vs = [torch.randn_like(p) for p in params]
    results = []
    for value in (pen.layer_value, lambda lay: _plain(pen, lay)):
        v = value(layer)
        grads = torch.autograd.grad(v, params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, vs)), params, allow_unused=True)
        results.append((v, grads, [torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params)]))
    (v1, g1, h1), (v2, g2, h2) = results
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=0)
    for a, b in zip(g1 + h1, g2 + h2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[::2])
@pytest.mark.parametrize("pen", [Ridge(), TyingL2Grid()], ids=repr)
def test_stored_squares_under_vmap(pen, geometry):
    """Stacked fits (softcnn.batched) evaluate smooth penalties with vmap(grad_and_value(...)):
    each model's value and gradient are those of an eager backward on its own weights."""
    layer = _layer(**geometry)
    holder = _Holder(layer, pen)
    devs = torch.stack([layer.deviation.detach() * s for s in (1.0, -0.5, 2.0)])

    def value(dev):
        return torch.func.functional_call(holder, {"layer.deviation": dev}, ())

    grads, values = vmap(grad_and_value(value))(devs)
    for k, dev in enumerate(devs):
        d = dev.clone().requires_grad_(True)
        v = value(d)
        v.backward()
        assert float(values[k]) == pytest.approx(float(v.detach()), rel=1e-12)
        torch.testing.assert_close(grads[k], d.grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grads[0], grads[1])


class _Holder(torch.nn.Module):
    """A module whose forward is a penalty's value, so functional_call swaps the layer's weights."""

    def __init__(self, layer, pen):
        super().__init__()
        self.layer, self.pen = layer, pen

    def forward(self):
        return self.pen.layer_value(self.layer)


def test_proxes_with_workspaces_equal_fresh_ones():
    """Scratch buffers kept between calls change no number."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, 9, dtype=torch.float64, generator=g)
    weights = torch.rand(7, 1, 9, dtype=torch.float64, generator=g)
    ws = {}
    for t in (0.1, 0.7):
        torch.testing.assert_close(soft_threshold(x, t, weights, workspace=ws), soft_threshold(x, t, weights),
                                   rtol=0, atol=0)
    assert ws  # the buffers were kept
    u = x.clone()
    soft_threshold(u, 0.5, out=u)  # the fused scalar path, in place
    torch.testing.assert_close(u, x - x.clamp(-0.5, 0.5), rtol=0, atol=0)
    assert not torch.signbit(u[u == 0]).any()


def test_tl1_prox_by_chunks_equals_a_whole_pass():
    """A contiguous input larger than prox._CHUNK runs by chunks; a transposed view of it does not."""
    from softcnn import prox

    g = torch.Generator().manual_seed(5)
    x = torch.randn(prox._CHUNK // 100 + 7, 100, generator=g)  # float32, as fits run
    assert x.numel() > prox._CHUNK
    for t, a in ((1e-3, 0.5), (0.3, 0.2)):  # the series and the closed form
        ws = {}
        chunked = prox.tl1_prox(x, t, a, workspace=ws)
        whole = prox.tl1_prox(x.t(), t, a).t()
        assert torch.equal(chunked, whole) and (chunked == 0).any() and (chunked != 0).any()
        assert all(b.numel() == prox._CHUNK for b in ws.values())  # chunk-sized scratch
