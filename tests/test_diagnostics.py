"""Exact-structure diagnostics and the pruned, cropped hard export."""

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from softcnn import SoftConvClassifier, SoftConvRegressor
from softcnn.datasets import make_soft_conv_data
from softcnn.diagnostics import kernel_sizes, n_free_parameters, structure
from softcnn.layers import SoftConv2d
from softcnn.network import SoftConvNet


def test_counts_on_a_hand_built_network():
    net = SoftConvNet((1, 6, 6), (3,), 3, padding="same", support=7, activation="tanh", n_outputs=1,
                      generator=torch.Generator().manual_seed(0))
    layer = net.soft_layers[0]
    with torch.no_grad():
        layer.deviation.zero_()
        layer.shared.zero_()
        Sh, Sw = layer.support_shape
        kern = layer.shared[:, :-1].view(3, Sh, Sw)
        c = Sh // 2  # centre offset of the 3x3 window inside the 7x7 support
        kern[0, c, c] = 1.0  # channel 0: a 1x1 kernel
        kern[1, c - 1 : c + 2, c - 1 : c + 2] = 0.5  # channel 1: 3x3
        # channel 2: nothing -> pruned
        layer.deviation[5, 1, 0] = 0.0  # no deviation anywhere: every position tied
    st = structure(net)
    assert st["kernel_sizes"][0].tolist() == [1, 3, 0]
    assert st["n_active_channels"] == [2]
    assert st["n_tied_positions"] == [36]
    # Σ_j r c d s_j^2 for the conv + the read-out's inputs from the 2 kept channels
    assert st["flops"] == 36 * 1 * (1 + 9) + 2 * 36
    lin = net.linear_layers[0]
    assert st["n_params"] == n_free_parameters(layer) + int((lin.weight[:, :72] != 0).sum()) + 1
    assert n_free_parameters(layer) == 1 + 9  # one value per nonzero entry, tied across positions


def test_kernel_sizes_follow_the_farthest_nonzero_weight():
    layer = SoftConv2d(1, 1, 3, (9, 9), padding="same", support=7, dtype=torch.float64)
    with torch.no_grad():
        layer.shared.zero_()
        layer.shared[0, 3 * 7 + 5] = 1.0  # row centre, two columns right of the centre
    # windows grow by half-rings, bottom/right first: size 4 reaches +2 to the right
    assert kernel_sizes(layer).tolist() == [4]
    with torch.no_grad():
        layer.shared[0, 3 * 7 + 1] = 1.0  # two columns left: only the centred 5x5 window
    assert kernel_sizes(layer).tolist() == [5]


def test_hard_export_drops_pruned_channels_crops_and_predicts_like_the_soft_model():
    X, y, _ = make_soft_conv_data(80, (6, 6), teacher="cnn", task="classification", n_classes=3,
                                  random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = SoftConvClassifier(channels=4, tying=100.0, tying_penalty="l1", locality=0.05,
                                 locality_penalty="rings", channel_sparsity=0.02, max_iter=150,
                                 random_state=0).fit(X, y)
    assert clf.n_tied_positions_ == [36]
    hard = clf.to_torch(hard=True)
    conv = [m for m in hard if isinstance(m, torch.nn.Conv2d)][0]
    assert conv.out_channels == clf.n_active_channels_[0] < 4
    sizes = clf.kernel_sizes_[0]
    assert conv.kernel_size[0] == min(int(sizes.max()), 3)
    logits = hard(torch.as_tensor(X[:, None])).detach().numpy()
    np.testing.assert_allclose(logits, clf.decision_function(X), rtol=1e-9, atol=1e-9)
    assert clf.flops_ < 36 * 4 * 49 + 4 * 36 * 3
    assert clf.n_params_ > 0


def test_diagnostics_exist_after_a_smooth_fit():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(30, 5, 5))
    y = X[:, 1:4, 1:4].sum(axis=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = SoftConvRegressor(channels=2, max_iter=10, random_state=0).fit(X, y)
    assert reg.n_snapped_ == 0
    assert reg.n_active_channels_ == [2]
    assert reg.n_tied_positions_ == [0]
    assert reg.kernel_sizes_[0].tolist() == [7, 7]  # l2 fits: nothing exactly zero in the 7x7 support


def test_odd_kernel_sizes_round_up_to_centred_odd_windows():
    """Full rings count sizes in centred odd windows: a kernel on the centre and its right
    neighbour is 2x2 in half rings but 3x3 in full rings, and the hard export follows."""
    from softcnn.network import to_hard_cnn

    net = SoftConvNet((1, 6, 6), (1,), 3, padding="same", support=7, activation="tanh", n_outputs=1,
                      generator=torch.Generator().manual_seed(0)).double()
    layer = net.soft_layers[0]
    with torch.no_grad():
        layer.shared.zero_()
        layer.deviation.zero_()
        c = 3 * 7 + 3  # the centre of the 7x7 support
        layer.shared[0, c] = 1.0
        layer.shared[0, c + 1] = -0.5
    assert kernel_sizes(layer).tolist() == [2]
    assert kernel_sizes(layer, odd=True).tolist() == [3]
    assert structure(net, odd_kernel_sizes=True)["kernel_sizes"][0].tolist() == [3]
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for odd, size in ((False, 2), (True, 3)):
        hard = to_hard_cnn(net, odd_kernel_sizes=odd)
        conv = next(m for m in hard if isinstance(m, torch.nn.Conv2d))
        assert conv.kernel_size == (size, size)
        torch.testing.assert_close(hard(x), net(x))  # both windows hold every nonzero weight
