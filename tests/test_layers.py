"""SoftConv2d against a brute-force loop, and against nn.Conv2d at the CNN limit."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from softcnn.layers import SoftConv2d, axis_geometry

GEOMETRIES = [
    # (C, F, H, W, k, stride, padding, support)
    (1, 2, 5, 5, 3, 1, "valid", 3),
    (2, 3, 6, 5, 3, 1, "same", 5),
    (1, 2, 7, 6, 2, 2, "same", 4),
    (2, 2, 6, 6, 3, 2, "valid", "full"),
    (3, 2, 4, 5, 3, 1, "same", "full"),
    (1, 1, 1, 6, 3, 1, "same", 7),  # a one-row image: vertical offsets never exist
]


def brute_force(layer: SoftConv2d, x: torch.Tensor) -> torch.Tensor:
    """z[n,f,i,j] = b + sum_{c,dh,dw} w[p,f,c,dh,dw] * x[n,c,a_i+dh,a_j+dw] by explicit loops."""
    n, C, H, W = x.shape
    gh, gw = layer.gh, layer.gw
    Sh, Sw = layer.support_shape
    w = layer.kernels().detach()
    Lh, Lw = layer.output_shape
    out = torch.zeros(n, layer.out_channels, Lh, Lw, dtype=x.dtype)
    for i, j in itertools.product(range(Lh), range(Lw)):
        p = i * Lw + j
        ai, aj = gh.anchors()[i], gw.anchors()[j]
        for f in range(layer.out_channels):
            kern = w[p, f, :-1].reshape(C, Sh, Sw)
            acc = w[p, f, -1].expand(n).clone()
            for c, a, b in itertools.product(range(C), range(Sh), range(Sw)):
                r, s = ai + gh.lo + a, aj + gw.lo + b
                if 0 <= r < H and 0 <= s < W:
                    acc += kern[c, a, b] * x[:, c, r, s]
            out[:, f, i, j] = acc
    return out


def random_layer(C, F, H, W, k, stride, padding, support, formulation, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = SoftConv2d(C, F, k, (H, W), stride=stride, padding=padding, support=support,
                       formulation=formulation, dtype=torch.float64, generator=g)
    with torch.no_grad():
        layer.shared.copy_(torch.randn(layer.shared.shape, generator=g, dtype=torch.float64))
        layer.deviation.copy_(torch.randn(layer.deviation.shape, generator=g, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("formulation", ["unfold", "dense"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_forward_matches_brute_force(geometry, formulation):
    C, F, H, W, k, stride, padding, support = geometry
    layer = random_layer(*geometry, formulation)
    x = torch.randn(3, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), brute_force(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tied_local_weights_equal_conv2d(geometry):
    """Exactly tied kernels, zero outside the k x k window: the layer is nn.Conv2d (to 1e-5)."""
    C, F, H, W, k, stride, padding, support = geometry
    layer = random_layer(*geometry, "auto")
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(C, F, k, stride=stride, dtype=torch.float64)
    gh, gw = layer.gh, layer.gw
    with torch.no_grad():
        layer.deviation.zero_()
        kern = torch.zeros(F, C, *layer.support_shape, dtype=torch.float64)
        full = torch.randn(F, C, k, k, generator=g, dtype=torch.float64)
        # place the k x k kernel at offsets [0, k) of the support (where they lie in it)
        for a, b in itertools.product(range(k), range(k)):
            if 0 <= a - gh.lo < gh.extent and 0 <= b - gw.lo < gw.extent:
                kern[:, :, a - gh.lo, b - gw.lo] = full[:, :, a, b]
            else:  # offsets that never meet a pixel: irrelevant to both layers
                full[:, :, a, b] = 0.0
        bias = torch.randn(F, generator=g, dtype=torch.float64)
        layer.shared.copy_(torch.cat([kern.reshape(F, -1), bias[:, None]], 1))
        conv.weight.copy_(full)
        conv.bias.copy_(bias)
    pad = nn.ZeroPad2d((gw.pad_before, gw.pad_after, gh.pad_before, gh.pad_after))
    x = torch.randn(4, C, H, W, generator=g, dtype=torch.float64)
    expected = conv(pad(x))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_conv2d()(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("k,stride", [(3, 1), (2, 1), (3, 2), (5, 3)])
def test_output_positions_match_conv2d(k, stride, padding):
    for size in range(k, 12):
        g = axis_geometry(size, k, stride, padding, "full")
        ref = nn.Conv2d(1, 1, k, stride=stride)(
            nn.ZeroPad2d((0, 0, g.pad_before, g.pad_after))(torch.zeros(1, 1, size, 1).expand(1, 1, size, k))
        )
        assert g.n_out == ref.shape[2]
        if padding == "same":
            assert g.n_out == -(-size // stride)


def test_support_mask_marks_offsets_outside_the_image():
    layer = SoftConv2d(1, 1, 3, (4, 4), padding="same", support=5)
    Sh, Sw = layer.support_shape
    mask = layer.mask[:, :-1].reshape(4, 4, Sh, Sw)
    assert layer.gh.lo == -1  # a 5-wide support centred on the 3-wide window
    # position (0, 0) has anchor (-1, -1): offsets -1..3 reach pixels -2..2
    assert not mask[0, 0, :2, :].any() and not mask[0, 0, :, :2].any() and mask[0, 0, 2:, 2:].all()
    # position (1, 1) has anchor (0, 0): offsets -1..3 reach pixels -1..3
    assert not mask[1, 1, 0, :].any() and mask[1, 1, 1:, 1:].all()
    assert layer.mask[:, -1].all()  # the bias always exists


def test_full_support_covers_every_pixel_from_every_position():
    layer = SoftConv2d(1, 1, 3, (5, 6), padding="valid", support="full")
    per_position = layer.mask[:, :-1].sum(1)
    assert torch.all(per_position == 5 * 6)


def test_initial_layer_is_a_cnn_and_starts_local():
    layer = SoftConv2d(2, 3, 3, (6, 6), padding="same", support=7, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.deviation) == 0
    w = layer.shared[:, :-1].reshape(3, 2, *layer.support_shape)
    inside = layer.window.reshape(layer.support_shape)
    assert torch.count_nonzero(w[:, :, ~inside]) == 0 and torch.count_nonzero(w[:, :, inside]) > 0


def test_invalid_geometry_errors_name_the_fix():
    with pytest.raises(ValueError, match="padding='same'"):
        SoftConv2d(1, 1, 5, (3, 3), padding="valid")
    with pytest.raises(ValueError, match="formulation"):
        SoftConv2d(1, 1, 3, (5, 5), formulation="fft")


def test_gradients_flow_to_shared_and_deviation():
    layer = random_layer(2, 2, 5, 5, 3, 1, "same", 5, "unfold")
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    assert layer.shared.grad.abs().sum() > 0 and layer.deviation.grad.abs().sum() > 0
    # offsets that do not exist at a position get no gradient
    assert torch.all(layer.deviation.grad[~layer.mask.unsqueeze(1).expand_as(layer.deviation)] == 0)


def test_float32_formulations_agree():
    layer = random_layer(1, 4, 8, 8, 3, 1, "same", 5, "unfold").float()
    dense = random_layer(1, 4, 8, 8, 3, 1, "same", 5, "dense").float()
    dense.load_state_dict(layer.state_dict())
    x = torch.randn(5, 1, 8, 8)
    np.testing.assert_allclose(layer(x).detach().numpy(), dense(x).detach().numpy(), rtol=1e-4, atol=1e-5)
