"""Smooth penalties against values computed by hand on tiny weights."""

import numpy as np
import pytest
import torch
from plain_penalties import plain_l2_grid

from softcnn import SoftConvRegressor
from softcnn.layers import SoftConv2d
from softcnn.network import SoftConvNet
from softcnn.penalties import (
    LocalityL2,
    Penalty,
    Ridge,
    TyingL2Grid,
    TyingL2Mean,
    _REGISTRY,
    locality_profile,
    make_penalties,
    register,
)


class _Net:
    """The two views penalties read from a network."""

    def __init__(self, layers, linears=()):
        self.soft_layers, self.linear_layers = list(layers), list(linears)


def _value(pen, net) -> float:
    """A penalty's value on ``net`` as a number (detached: it may carry a graph)."""
    return float(pen.value(net).detach())


def tiny_layer():
    """3x3 image, k=2, 'valid', support 2: L = 4 positions, 1 channel, K = 4 weights + bias."""
    layer = SoftConv2d(1, 1, 2, (3, 3), padding="valid", support=2, dtype=torch.float64)
    with torch.no_grad():
        layer.shared.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5]]))
        d = torch.zeros(4, 1, 5, dtype=torch.float64)
        d[0, 0, 0] = 1.0  # position (0, 0), weight (0, 0)
        d[3, 0, 4] = -2.0  # position (1, 1), bias
        d[1, 0, 2] = 0.5  # position (0, 1), weight (1, 0)
        layer.deviation.copy_(d)
    return layer


def test_tying_l2_mean_is_sum_of_squared_deviations_over_positions():
    layer = tiny_layer()
    expected = (1.0**2 + 2.0**2 + 0.5**2) / 4
    assert _value(TyingL2Mean(), _Net([layer])) == pytest.approx(expected)


def test_tying_l2_mean_at_best_shared_kernel_equals_design_formula():
    """With m set to the mean kernel, Σ‖d_p‖² = Σ‖w_p − w̄‖² (the design's definition)."""
    layer = tiny_layer()
    with torch.no_grad():
        w = layer.kernels().clone()
        mean = w.mean(0)
        layer.shared.copy_(mean)
        layer.deviation.copy_(w - mean)
    design = float(((w - w.mean(0)) ** 2).sum()) / 4
    assert _value(TyingL2Mean(), _Net([layer])) == pytest.approx(design)


def test_tying_l2_grid_by_hand():
    layer = tiny_layer()
    # positions on a 2x2 grid: p0=(0,0) d=[1,0,0,0,0], p1=(0,1) d=[0,0,.5,0,0], p2=(1,0) 0, p3=(1,1) bias -2
    pairs = [(0, 2), (1, 3), (0, 1), (2, 3)]
    d = {0: np.array([1, 0, 0, 0, 0.0]), 1: np.array([0, 0, 0.5, 0, 0]), 2: np.zeros(5), 3: np.array([0, 0, 0, 0, -2.0])}
    expected = sum(((d[p] - d[q]) ** 2).sum() for p, q in pairs) / 4
    assert _value(TyingL2Grid(), _Net([layer])) == pytest.approx(expected)


def test_tying_grid_compares_only_offsets_existing_at_both_positions():
    layer = SoftConv2d(1, 1, 1, (1, 2), padding="valid", support="full", dtype=torch.float64)
    # 1x2 image, k=1: two positions; offsets -1..1 horizontally; offset +1 exists only at p0, -1 only at p1
    with torch.no_grad():
        layer.set_deviations(torch.tensor([[[0.0, 3.0, 5.0, 0.0]], [[7.0, 1.0, 0.0, 0.0]]], dtype=torch.float64))
    # offset 0 (index 1) exists at both; its difference is 2 -> 4 / L=2
    assert _value(TyingL2Grid(), _Net([layer])) == pytest.approx(4.0 / 2)
    assert _value(TyingL2Mean(), _Net([layer])) == pytest.approx((9 + 25 + 49 + 1) / 2)


def test_locality_window_penalises_only_outside_the_window():
    layer = SoftConv2d(1, 1, 1, (3, 3), padding="valid", support=3, dtype=torch.float64)
    with torch.no_grad():
        layer.shared.fill_(2.0)
    # centre position sees all 9 offsets; the 8 outside the 1x1 window cost 4 each
    w = layer.kernels()[..., :-1].detach()
    outside = (~layer.window).double()
    expected = float((w.pow(2) * outside).sum()) / layer.n_positions
    pen = LocalityL2("window")
    assert _value(pen, _Net([layer])) == pytest.approx(expected)
    assert float(pen.layer_value(layer).detach()) > 0
    # existing-offset count by hand: corners see 4 pixels (3 outside), edges 6 (5), centre 9 (8)
    assert expected == pytest.approx(4.0 * (4 * 3 + 4 * 5 + 8) / 9)


def test_locality_profiles_by_hand():
    layer = SoftConv2d(1, 1, 3, (9, 9), padding="same", support=7)
    window = locality_profile(layer, "window").numpy()
    dist = locality_profile(layer, "distance", power=2.0).numpy()
    assert window.shape == (7, 7) and window[2:5, 2:5].sum() == 0 and window.sum() == 49 - 9
    assert dist[3, 3] == 0 and dist[0, 0] == pytest.approx(2**2 + 2**2) and dist[1, 3] == pytest.approx(1)
    g, e = 0.5, 2.0
    loco = locality_profile(layer, "loco", loco_gamma=g, loco_eta=e).numpy()
    Z = (g + 4 * (1 + e)) / 9
    assert loco[3, 3] == pytest.approx(g / Z) and loco[2, 3] == pytest.approx(1 / Z)
    assert loco[2, 2] == pytest.approx(e / Z) and loco[0, 0] == pytest.approx(max(g, 1, e) / Z)
    assert loco[2:5, 2:5].mean() == pytest.approx(1.0)  # Z normalises the window to mean 1
    arr = np.arange(49.0).reshape(7, 7)
    assert np.array_equal(locality_profile(layer, arr).numpy(), arr)


def test_locality_profile_errors():
    layer = SoftConv2d(1, 1, 5, (9, 9), padding="same", support=7)
    with pytest.raises(ValueError, match="shape"):
        locality_profile(layer, np.ones((5, 5)))
    with pytest.raises(ValueError, match="3x3"):
        locality_profile(layer, "loco")
    with pytest.raises(ValueError, match="non-negative"):
        locality_profile(layer, -np.ones((7, 7)))


def test_ridge_includes_dense_layers_and_skips_biases():
    net = SoftConvNet((1, 3, 3), (1,), 2, padding="valid", support=2, n_outputs=2,
                      generator=torch.Generator().manual_seed(0))
    layer, lin = net.soft_layers[0], net.linear_layers[0]
    expected = float(layer.kernels()[..., :-1].detach().pow(2).sum()) / 4 + float(lin.weight.detach().pow(2).sum())
    assert _value(Ridge(), net) == pytest.approx(expected)


def test_penalties_average_over_positions():
    """The same per-position kernels on a larger image give the same penalty."""
    values = []
    for size in (4, 8):
        layer = SoftConv2d(1, 1, 3, (size, size), padding="same", support=3, dtype=torch.float64)
        with torch.no_grad():
            layer.deviation[..., 4] = 1.5  # the centre weight, which exists everywhere
        values.append(_value(TyingL2Mean(), _Net([layer])))
    assert values[0] == pytest.approx(values[1]) == pytest.approx(1.5**2)


def test_make_penalties_reads_strengths_and_rejects_bad_values():
    params = SoftConvRegressor(tying=2.0, locality=0.5, alpha=0.0).get_params()
    pens = make_penalties(params)
    assert [(s, type(p)) for s, p in pens] == [(2.0, TyingL2Mean), (0.5, LocalityL2)]
    with pytest.raises(ValueError, match="tying must be a finite number >= 0"):
        make_penalties({**params, "tying": -1.0})
    with pytest.raises(ValueError, match="supported combinations"):
        make_penalties({**params, "tying_graph": "diagonal"})


def test_a_new_penalty_is_one_class_and_reaches_the_estimator():
    """Registering a class is all it takes for the estimators to use it."""

    @register("tying", "l2", "first-row")
    class TyingFirstRow(Penalty):
        def layer_value(self, layer):
            return layer.masked_deviation()[: layer.output_shape[1]].pow(2).sum()

    try:
        rng = np.random.RandomState(0)
        X = rng.normal(size=(40, 4, 4))
        y = X[:, 1:3, 1:3].sum(axis=(1, 2))
        reg = SoftConvRegressor(channels=2, tying=1e3, tying_graph="first-row", max_iter=300, random_state=0)
        reg.fit(X, y)
        assert isinstance(reg.penalties_[0][1], TyingFirstRow)
        layer = reg.network_.soft_layers[0]
        d = layer.masked_deviation().detach().abs()
        first_row = layer.output_shape[1]
        # the first row of positions is tied to the shared kernel, the others are free
        assert d[:first_row].max() < 1e-3 * d[first_row:].max()
    finally:
        del _REGISTRY["tying"][("l2", "first-row")]


def _kernel_view_twin(layer):
    """A copy of a 'full' layer that stores its deviations as (L, F, K), the layout before the compact one."""
    import copy

    twin = copy.deepcopy(layer)
    raw = layer.deviations().detach() / layer.deviation_scale
    twin._compact, twin._compact_index = False, None
    twin.deviation = torch.nn.Parameter(raw)
    twin._build_tiles("auto")
    return twin


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("key", [(s, k) for s, table in _REGISTRY.items() for k in table])
def test_penalties_see_a_full_layer_the_same_whatever_its_storage(key, stride, kernel_backend):
    """Values, proxes and finalize on the compact 'full' storage equal those on (L, F, K) storage:
    to float64 rounding (the penalties sum in each storage's order), with the same exact zeros;
    on the compact storage's compiled passes (locality l1) and on the torch code alike."""
    strength, option = key
    pen = _REGISTRY[strength][option].from_params(SoftConvRegressor().get_params())
    g = torch.Generator().manual_seed(8)
    layer = SoftConv2d(2, 3, 3, (5, 4), padding="same", support="full", stride=stride, dtype=torch.float64,
                       generator=g)
    L, F, K = layer.n_positions, layer.out_channels, layer.mask.shape[1]
    with torch.no_grad():
        layer.shared.normal_(generator=g)
        d = torch.randn(L, F, K, dtype=torch.float64, generator=g)
        d[torch.rand(L, F, K, generator=g) < 0.3] = 0.0  # exact ties, as after a prox
        layer.set_deviations(d)
    # power-of-two scales, as proximal fits use: raw <-> effective values convert exactly
    layer.set_scales(torch.full((K,), 0.5, dtype=torch.float64), torch.full((K,), 2.0, dtype=torch.float64))
    twin = _kernel_view_twin(layer)
    assert layer.deviation.shape == (2 * 5 * 4 + 1, F, L) and twin.deviation.shape == (L, F, K)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=1e-12)

    def same():
        for view in ("kernels", "masked_deviation", "shared_kernel"):
            a, b = getattr(layer, view)(), getattr(twin, view)()
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
            assert torch.equal(a == 0, b == 0)

    same()
    torch.testing.assert_close(pen.layer_value(layer), pen.layer_value(twin), rtol=1e-13, atol=0)
    if not pen.smooth:
        before = layer.kernels().detach().clone()
        pen.prox(layer, 0.3)
        pen.prox(twin, 0.3)
        assert not torch.equal(layer.kernels(), before)  # the prox did something
        same()
    pen.finalize(layer)
    pen.finalize(twin)
    same()


def test_l2_grid_tying_second_derivatives_match_autograd():
    """The hand-written backward is differentiable: a Hessian-vector product equals autograd's on
    the plain slices."""
    layer = SoftConv2d(1, 2, 3, (5, 5), padding="same", support=5, dtype=torch.float64)
    with torch.no_grad():
        layer.deviation.normal_()

    v = torch.randn_like(layer.deviation)
    hvps = []
    for value in (TyingL2Grid().layer_value, plain_l2_grid):
        (g,) = torch.autograd.grad(value(layer), layer.deviation, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), layer.deviation)[0])
    assert hvps[1].abs().max() > 0
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-12)
