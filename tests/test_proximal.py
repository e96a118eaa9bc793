"""Non-smooth penalties: prox wiring at the layer level, proximal solvers, exact structure."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from softcnn import SoftConvClassifier, SoftConvRegressor
from softcnn.datasets import make_soft_conv_data
from softcnn.layers import SoftConv2d
from softcnn.penalties import (
    ChannelSparsity,
    LocalityL1,
    LocalityRings,
    SparsityTL1,
    TyingGroupMean,
    TyingL1All,
    TyingL1Mean,
    make_penalties,
    ring_groups,
)
from softcnn.prox import group_soft_threshold, pairwise_l1_prox, soft_threshold, tl1_prox


def random_layer(seed=0, support=4, image=(4, 4), channels=(2, 2), k=2):
    """A 'same' layer whose support reaches outside the image: some offsets do not exist."""
    gen = torch.Generator().manual_seed(seed)
    layer = SoftConv2d(channels[0], channels[1], k, image, padding="same", support=support, dtype=torch.float64)
    with torch.no_grad():
        layer.shared.copy_(torch.randn(layer.shared.shape, generator=gen, dtype=torch.float64))
        layer.deviation.copy_(torch.randn(layer.deviation.shape, generator=gen, dtype=torch.float64))
    assert not layer.mask.all()  # the tests below need absent offsets
    return layer


def quiet_fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


# ------------------------------------------------------------ prox wiring
def test_tying_l1_mean_prox_soft_thresholds_existing_deviations_only():
    layer = random_layer()
    d0 = layer.deviations().detach().clone()
    m0 = layer.shared_kernel().detach().clone()
    step = 0.3
    TyingL1Mean().prox(layer, step)
    t = step / layer.n_positions  # unit scales: t = step * c_d^2 / L
    ex = layer.mask.unsqueeze(1).expand_as(d0)
    d1 = layer.deviations().detach()
    torch.testing.assert_close(d1[ex], soft_threshold(d0, t)[ex])
    assert torch.equal(d1[~ex], d0[~ex])  # absent offsets untouched
    assert torch.equal(layer.shared_kernel(), m0)
    assert (d1[ex] == 0).any()  # exact zeros


def test_prox_uses_the_deviation_scale():
    layer = random_layer()
    layer.set_scales(torch.full_like(layer.shared_scale, 0.5), torch.full_like(layer.deviation_scale, 2.0))
    d0 = layer.deviations().detach().clone()
    TyingL1Mean().prox(layer, 0.1)
    ex = layer.mask.unsqueeze(1).expand_as(d0)
    t = 0.1 * 4.0 / layer.n_positions
    torch.testing.assert_close(layer.deviations().detach()[ex], soft_threshold(d0, t)[ex])


def test_group_mean_prox_is_block_threshold_per_position():
    layer = random_layer(1)
    d0 = layer.masked_deviation().detach().clone()
    TyingGroupMean().prox(layer, 2.0)
    expected = group_soft_threshold(d0, 2.0 / layer.n_positions, dim=(1, 2))
    ex = layer.mask.unsqueeze(1).expand_as(d0)
    torch.testing.assert_close(layer.deviations().detach()[ex], expected[ex])
    zero = (layer.masked_deviation() == 0).flatten(1).all(1)
    norms = torch.linalg.vector_norm(d0, dim=(1, 2))
    assert torch.equal(zero, norms <= 2.0 / layer.n_positions)


def test_pairwise_prox_acts_on_effective_weights_over_existing_positions():
    layer = random_layer(2)
    w0 = (layer.shared_kernel().unsqueeze(0) + layer.deviations()).detach().clone()
    m0 = layer.shared_kernel().detach().clone()
    step = 5.0
    TyingL1All().prox(layer, step)
    L = layer.n_positions
    t = step / L / (L - 1)
    w1 = layer.kernels().detach()
    k = 0  # the first weight: absent at some positions
    pos = layer.mask[:, k].nonzero().squeeze(1)
    assert 1 < pos.numel() < L
    expected = pairwise_l1_prox(w0[pos][:, :, k], t, dim=0)
    torch.testing.assert_close(w1[pos][:, :, k], expected)
    assert torch.equal(layer.shared_kernel(), m0)  # written back through d = w - m
    absent = ~layer.mask[:, k]
    d0 = w0 - m0
    torch.testing.assert_close(layer.deviations()[absent][:, :, k], d0[absent][:, :, k], rtol=0, atol=1e-15)


def test_locality_l1_prox_is_weighted_threshold_of_effective_weights():
    layer = random_layer(3)
    pen = LocalityL1("window")
    g = pen.weights(layer)
    w0 = (layer.shared_kernel().unsqueeze(0) + layer.deviations()).detach().clone()
    pen.prox(layer, 1.0)
    t = 1.0 / layer.n_positions
    ex = layer.mask.unsqueeze(1).expand_as(w0)
    w1 = layer.kernels().detach()
    torch.testing.assert_close(w1[ex], soft_threshold(w0, t, g)[ex])
    inside = g == 0
    assert torch.equal(w1[..., inside], (w0 * layer.mask.unsqueeze(1))[..., inside])


def test_ring_groups_are_nested_outermost_half_ring_first():
    layer = SoftConv2d(1, 1, 3, (9, 9), padding="same", support=7)
    G = ring_groups(layer)
    assert G.shape == (7, 49)
    assert not (G[:-1] & ~G[1:]).any()  # nested
    assert G[-1].all()
    first = G[0].reshape(7, 7)
    # the outermost half-ring: top row and left column of the 7x7 support
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[0, :] = True
    expected[:, 0] = True
    assert torch.equal(first, expected)
    assert int(G[1].sum()) == 49 - 25  # two half-rings = the full outer ring


def test_rings_prox_zeroes_outer_rings_first():
    layer = random_layer(4, support=6, image=(8, 8), k=2)
    LocalityRings().prox(layer, 0.5 * layer.n_positions)
    levels = torch.as_tensor(layer.kernel_levels().ravel())
    w = layer.kernels()[..., :-1].detach().reshape(layer.n_positions, layer.out_channels, layer.in_channels, -1)
    nz = (w != 0).any(2)  # (L, F, offsets)
    # on each unit the nonzero offsets form a centred window: no zero at a lower level than a nonzero
    for unit in nz.reshape(-1, nz.shape[-1]):
        if unit.any():
            size = int(levels[unit].max())
            inside = levels <= size
            assert not (unit & ~inside).any()
    assert (~nz).any()


def test_channel_sparsity_prox_prunes_whole_channels():
    layer = random_layer(5)
    with torch.no_grad():
        layer.shared[1] *= 1e-3
        layer.deviation[:, 1] *= 1e-3
    ChannelSparsity().prox(layer, 1.0)
    w = layer.kernels().detach()
    assert (w[:, 1] == 0).all() and (w[:, 0] != 0).any()


def test_tl1_prox_wiring_matches_operator():
    layer = random_layer(6)
    w0 = (layer.shared_kernel().unsqueeze(0) + layer.deviations()).detach().clone()
    SparsityTL1(a=0.5).prox(layer, 2.0)
    ex = layer.mask.unsqueeze(1).expand_as(w0).clone()
    ex[..., -1] = False  # biases are not penalised
    expected = tl1_prox(w0, 2.0 / layer.n_positions, 0.5)
    torch.testing.assert_close(layer.kernels().detach()[ex], expected[ex])


def test_new_options_are_registered_as_nonsmooth():
    base = dict(tying=1.0, tying_penalty="l1", tying_graph="all", locality=1.0, locality_penalty="rings",
                locality_profile="window", locality_power=1.0, loco_gamma=0.5, loco_eta=2.0, alpha=0.0,
                channel_sparsity=1.0, sparsity=1.0, sparsity_penalty="tl1", tl1_a=2.0)
    pens = make_penalties(base)
    assert {type(p).__name__ for _, p in pens} == {"TyingL1All", "LocalityRings", "ChannelSparsity", "SparsityTL1"}
    assert all(not p.smooth for _, p in pens)
    with pytest.raises(ValueError, match="sparsity_penalty"):
        make_penalties({**base, "sparsity_penalty": "l0"})


# ------------------------------------------------------------- solvers
@pytest.fixture(scope="module")
def data():
    X, y, _ = make_soft_conv_data(60, (6, 6), teacher="regions", task="regression", random_state=0)
    return X, y


def test_fista_decreases_a_composed_objective_monotonically(data):
    X, y = data
    reg = quiet_fit(SoftConvRegressor(channels=2, tying=0.05, tying_penalty="l1", locality=0.05,
                                      locality_penalty="l1", channel_sparsity=0.01, sparsity=1e-3,
                                      max_iter=60, random_state=0), X, y)
    assert reg.solver_ == "fista"
    curve = np.array(reg.loss_curve_)
    assert len(curve) > 10
    assert np.all(np.diff(curve) <= 0)
    assert curve[-1] < curve[0]
    assert reg.loss_ == pytest.approx(curve[-1], rel=1e-9)


def test_auto_solver_and_lbfgs_refusal(data):
    X, y = data
    smooth = quiet_fit(SoftConvRegressor(channels=1, max_iter=5, random_state=0), X, y)
    assert smooth.solver_ == "lbfgs"
    with pytest.raises(ValueError, match="non-smooth"):
        SoftConvRegressor(channels=1, sparsity=0.1, solver="lbfgs").fit(X, y)
    with pytest.raises(ValueError, match="tl1_a"):
        SoftConvRegressor(channels=1, sparsity=0.1, tl1_a=0.0).fit(X, y)


def test_strong_l1_locality_gives_exact_zeros_outside_the_window(data):
    X, y = data
    reg = quiet_fit(SoftConvRegressor(channels=2, locality=1.0, locality_penalty="l1", max_iter=100,
                                      random_state=0), X, y)
    assert reg.locality_ratio_ == 0.0
    assert all((s <= 3).all() for s in reg.kernel_sizes_)


def test_strong_l1_tying_ties_positions_exactly(data):
    X, y = data
    reg = quiet_fit(SoftConvRegressor(channels=2, tying=1.0, tying_penalty="l1", max_iter=100,
                                      random_state=0), X, y)
    L = reg.network_.soft_layers[0].n_positions
    assert reg.n_tied_positions_ == [L]
    d = reg.network_.soft_layers[0].masked_deviation()
    assert (d == 0).all()
    assert reg.tying_deviation_ < 1e-25  # the mean kernel is computed with round-off


def test_proximal_adam_gives_exact_ties(data):
    X, y = data
    # proximal Adam: thresholds learning_rate x strength per step against Adam's ~learning_rate moves
    reg = quiet_fit(SoftConvRegressor(channels=2, tying=5.0, tying_penalty="l1", solver="adam",
                                      learning_rate=1e-2, max_iter=30, random_state=0), X, y)
    assert reg.solver_ == "adam"
    assert reg.n_tied_positions_[0] > 0


def test_threshold_snaps_small_entries_and_counts_them(data):
    X, y = data
    params = dict(channels=2, sparsity=1e-4, max_iter=40, random_state=0)
    loose = quiet_fit(SoftConvRegressor(**params), X, y)
    snapped = quiet_fit(SoftConvRegressor(**params, threshold=1e-2), X, y)
    assert loose.n_snapped_ == 0
    assert snapped.n_snapped_ > 0
    w = snapped.network_.soft_layers[0].kernels()[..., :-1].detach()
    assert not ((w != 0) & (w.abs() < 1e-2)).any()
    d = snapped.network_.soft_layers[0].masked_deviation().detach()
    w_all = snapped.network_.soft_layers[0].kernels().detach()
    # a small deviation survives only where it was used to zero the weight (d = -m)
    assert not ((d != 0) & (d.abs() < 1e-2) & (w_all != 0)).any()


def test_channel_sparsity_prunes_channels_of_a_classifier():
    X, y, _ = make_soft_conv_data(80, (6, 6), teacher="cnn", task="classification", n_classes=2,
                                  random_state=0)
    clf = quiet_fit(SoftConvClassifier(channels=4, channel_sparsity=0.05, max_iter=150, random_state=0), X, y)
    assert clf.n_active_channels_[0] < 4
    assert clf.score(X, y) > 0.7
