"""Full-ring locality (``locality_penalty='full_rings'``): groups, prox, odd learned kernel sizes."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

# helpers of the operator and wiring tests (pytest puts tests/ on sys.path)
from test_prox import nested_penalty
from test_proximal import random_layer

from softcnn import SoftConvRegressor
from softcnn.datasets import make_soft_conv_data
from softcnn.layers import SoftConv2d
from softcnn.penalties import LocalityFullRings, LocalityRings, make_penalties, ring_groups


def centred_square(size, extent=7):
    """Boolean (extent, extent) mask of the centred ``size x size`` window."""
    out = np.zeros((extent, extent), bool)
    lo = (extent - size) // 2
    out[lo : lo + size, lo : lo + size] = True
    return out


def test_full_ring_groups_are_nested_whole_rings():
    layer = SoftConv2d(1, 1, 3, (9, 9), padding="same", support=7)
    G = ring_groups(layer, full=True)
    assert not (G[:-1] & ~G[1:]).any()  # nested, smallest first
    # each group is everything outside a centred odd window (5, 3, 1, then none): each adds a whole ring
    for row, size in zip(G, (5, 3, 1, 0)):
        assert np.array_equal(~row.reshape(7, 7).numpy(), centred_square(size))
    assert G.shape[0] == 4
    # the full rings are the half-ring groups that end on an odd window
    half = ring_groups(layer)
    assert all(any(torch.equal(row, h) for h in half) for row in G)


def test_full_rings_on_a_lopsided_support_start_with_the_extra_half_ring():
    layer = SoftConv2d(1, 1, 3, (9, 9), padding="same", support=6)  # one more offset bottom/right
    G = ring_groups(layer, full=True)
    levels = torch.as_tensor(layer.kernel_levels().ravel())
    assert torch.equal(G[0], levels == 6)  # beyond the centred 5x5 window
    assert torch.equal(~G[1], levels <= 3)  # then whole rings: outside 3x3, 1x1, everything
    assert G.shape[0] == 4 and G[-1].all()


def test_full_rings_need_an_odd_kernel_size_at_every_strength():
    with pytest.raises(ValueError, match="odd kernel_size"):
        ring_groups(SoftConv2d(1, 1, 2, (6, 6), padding="same", support=6), full=True)
    X, y, _ = make_soft_conv_data(20, (5, 5), teacher="cnn", task="regression", random_state=0)
    for locality in (0.0, 0.1):  # a misconfiguration fails even where the penalty is inactive
        with pytest.raises(ValueError, match=r"odd kernel_size.*locality_penalty='rings'"):
            SoftConvRegressor(kernel_size=2, locality=locality, locality_penalty="full_rings").fit(X, y)


def test_full_rings_are_registered_as_their_own_penalty():
    params = SoftConvRegressor(locality=1.0, locality_penalty="full_rings", alpha=0.0).get_params()
    ((_, pen),) = make_penalties(params)
    assert type(pen) is LocalityFullRings and not pen.smooth and pen.odd_kernel_sizes
    assert not LocalityRings.odd_kernel_sizes


@pytest.mark.parametrize("step", [0.5, 5.0, 20.0])
def test_full_rings_prox_is_the_nested_group_prox_of_each_unit(step):
    """Each unit's new kernel minimises ½‖u − w‖² + t Σ_n ‖u(G_n)‖ (brute force by the dual),
    and what it keeps is a centred odd window: whole rings vanish."""
    layer = random_layer(7, support=5, image=(4, 4), channels=(1, 1), k=3)
    levels = torch.as_tensor(layer.kernel_levels().ravel(), dtype=torch.float64)
    with torch.no_grad():  # weights decaying outwards, so that outer rings vanish before whole kernels
        decay = layer.offset_map(levels**-2.0, 1.0)
        layer.shared.mul_(decay)
        layer.deviation.mul_(decay)
    w0 = layer.kernels().detach().clone()  # absent offsets are 0, as the prox sees them
    LocalityFullRings().prox(layer, step)
    w1 = layer.kernels().detach()
    t = step / layer.n_positions  # unit scales: t = step * c_d^2 / L
    pen = nested_penalty(ring_groups(layer, full=True).numpy(), np.ones(3))
    for x, u in zip(w0[:, 0, :-1].numpy(), w1[:, 0, :-1].numpy()):
        ref = pen.solve(x, t)
        assert pen.objective(u, x, t) <= pen.objective(ref, x, t) + 1e-10
        np.testing.assert_allclose(u, ref, atol=1e-4)
    torch.testing.assert_close(w1[..., -1], w0[..., -1])  # biases untouched
    exists = layer.mask[:, :-1]
    kept = w1[:, 0, :-1] != 0
    for nz, ex in zip(kept, exists):
        size = int(levels[nz].max()) if nz.any() else 0
        size += size > 0 and size % 2 == 0  # near the border part of the odd window may not exist
        assert torch.equal(nz, ex & (levels <= size))
    if step >= 5.0:
        assert ((kept.sum(1) > 0) & (kept.sum(1) < exists.sum(1))).any()  # some units lost outer rings only


def test_strong_full_ring_locality_learns_odd_centred_kernels():
    X, y, _ = make_soft_conv_data(60, (6, 6), teacher="cnn", task="regression", random_state=0)
    sizes = []
    for locality in (0.01, 0.1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reg = SoftConvRegressor(channels=3, tying=100.0, tying_penalty="l1", locality=locality,
                                    locality_penalty="full_rings", max_iter=60, random_state=0).fit(X, y)
        assert reg.n_tied_positions_ == [36]
        sizes.append(reg.kernel_sizes_[0])
    every = np.concatenate(sizes)
    assert np.all((every == 0) | (every % 2 == 1))
    assert np.any((every > 0) & (every < 7))  # some kernels shrank below the 7x7 support
    # the strong end: every kernel inside the nominal 3x3 window, so the hard CNN is exact
    assert sizes[-1].max() <= 3
    hard = reg.to_torch(hard=True)
    conv = next(m for m in hard if isinstance(m, torch.nn.Conv2d))
    assert conv.kernel_size[0] % 2 == 1
    out = hard(torch.as_tensor(X[:, None])).detach().numpy()[:, 0]
    np.testing.assert_allclose(out, reg.predict(X), rtol=1e-9, atol=1e-9)
