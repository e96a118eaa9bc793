"""SoftConv2d against a brute-force loop, and against nn.Conv2d at the CNN limit."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from softcnn.layers import TILE_HALF_RATE_COLUMNS, SoftConv2d, axis_geometry, choose_tile, tile_macs

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


@pytest.mark.parametrize("formulation", ["unfold", "dense", "tiled", "auto"])
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


# ------------------------------------------------------------------ formulations
def reference_unfold(layer: SoftConv2d, x: torch.Tensor) -> torch.Tensor:
    """The original 'unfold' formulation: F.unfold patches, one bmm over positions, on ``kernels()``."""
    n = x.shape[0]
    gh, gw = layer.gh, layer.gw
    w = layer.kernels()
    weight, bias = w[..., :-1], w[..., -1]
    pads = []
    for g in (gw, gh):
        before = g.pad_before - g.lo
        pads += [before, (g.n_out - 1) * g.stride + g.extent - g.size - before]
    cols = nn.functional.unfold(nn.functional.pad(x, pads), layer.support_shape, stride=(gh.stride, gw.stride))
    out = torch.bmm(cols.permute(2, 0, 1), weight.transpose(1, 2)).permute(1, 0, 2) + bias
    return out.permute(0, 2, 1).reshape(n, layer.out_channels, *layer.output_shape)


def reference_dense(layer: SoftConv2d, x: torch.Tensor) -> torch.Tensor:
    """The original 'dense' formulation: ``kernels()`` gathered into a dense (L F, C H W) weight, one GEMM."""
    n, C = x.shape[:2]
    gh, gw = layer.gh, layer.gw
    L, Fo = layer.n_positions, layer.out_channels
    Sh, Sw = layer.support_shape
    oh = np.arange(gh.size)[None, :] - gh.anchors()[:, None] - gh.lo
    ow = np.arange(gw.size)[None, :] - gw.anchors()[:, None] - gw.lo
    vh, vw = (oh >= 0) & (oh < Sh), (ow >= 0) & (ow < Sw)
    valid = torch.as_tensor((vh[:, None, :, None] & vw[None, :, None, :]).reshape(L, -1))
    idx = torch.as_tensor(np.where(valid.numpy(), (oh[:, None, :, None] * Sw + ow[None, :, None, :]).reshape(L, -1), 0))
    w = layer.kernels()
    wk = w[..., :-1].reshape(L, Fo, C, Sh * Sw)
    dense = wk.gather(-1, idx[:, None, None].expand(L, Fo, C, -1)) * valid[:, None, None]
    out = (x.reshape(n, -1) @ dense.reshape(L * Fo, -1).T).reshape(n, L, Fo) + w[..., -1]
    return out.permute(0, 2, 1).reshape(n, Fo, *layer.output_shape)


def tile_shapes(layer):
    Lh, Lw = layer.output_shape
    return [(a, b) for a in range(1, Lh + 1) if Lh % a == 0 for b in range(1, Lw + 1) if Lw % b == 0]


def outputs_and_grads(layer, fn, x, g):
    out = fn(x)
    grads = torch.autograd.grad(out, [x, layer.shared, layer.deviation], g)
    return [out, *grads]


@pytest.mark.parametrize("geometry", GEOMETRIES + [(2, 3, 8, 8, 5, 1, "same", 9), (1, 2, 9, 6, 3, 3, "same", 5)])
def test_every_tile_shape_matches_the_original_formulations(geometry):
    """Outputs and gradients (input, m, d) of every tiling equal the original unfold and dense code."""
    C, F, H, W = geometry[:4]
    layer = random_layer(*geometry, "auto")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial preconditioner scales
        layer.shared_scale.uniform_(0.5, 2.0, generator=g)
        layer.deviation_scale.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(3, C, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    grad_out = torch.randn(3, F, *layer.output_shape, dtype=torch.float64, generator=g)
    expected = outputs_and_grads(layer, lambda x: reference_unfold(layer, x), x, grad_out)
    for got in outputs_and_grads(layer, lambda x: reference_dense(layer, x), x, grad_out), :
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for shape in tile_shapes(layer):
        layer._build_tiles("tiled", tile_shape=shape)
        got = outputs_and_grads(layer, layer, x, grad_out)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        # absent offsets get no gradient, as with kernels()
        layer.deviation.grad = got[3]
        grad = layer.deviation_gradient()
        assert torch.all(grad[~layer.mask.unsqueeze(1).expand_as(grad)] == 0)


def test_formulation_names_are_kept():
    """'unfold' and 'dense' are the extreme tilings; 'auto' names the one it picks when it is one."""
    unfold = SoftConv2d(1, 8, 5, (28, 28), padding="same", support=9, formulation="unfold")
    dense = SoftConv2d(1, 8, 5, (28, 28), padding="same", support=9, formulation="dense")
    auto = SoftConv2d(1, 8, 5, (28, 28), padding="same", support=9)
    full = SoftConv2d(1, 8, 5, (28, 28), padding="same", support="full")
    assert (unfold.formulation, unfold.tile_shape) == ("unfold", (1, 1))
    assert (dense.formulation, dense.tile_shape) == ("dense", (28, 28))
    assert auto.formulation == "tiled" and auto.tile_shape == (4, 4)
    assert (full.formulation, full.tile_shape) == ("dense", (28, 28))
    assert "tile_shape=(4, 4)" in repr(auto)
    with pytest.raises(ValueError, match="divide"):
        auto._build_tiles("tiled", tile_shape=(3, 4))


def test_auto_tile_rule():
    """The least MACs x (1 + 64 / Q), Q = th tw F the matmul's width (ties: fewer tiles)."""
    gh = axis_geometry(28, 5, 1, "same", 9)
    assert choose_tile(gh, gh, 1, 8) == (4, 4)
    assert choose_tile(gh, gh, 1, 8, "unfold") == (1, 1) and choose_tile(gh, gh, 1, 8, "dense") == (28, 28)
    full = axis_geometry(28, 5, 1, "same", "full")
    assert choose_tile(full, full, 1, 8) == (28, 28)
    small = axis_geometry(8, 5, 1, "same", 9)
    assert choose_tile(small, small, 1, 8) == (8, 8)
    for F in (1, 8, 32):
        shapes = [(a, b) for a in range(1, 29) if 28 % a == 0 for b in range(1, 29) if 28 % b == 0]
        cost = {s: tile_macs(gh, gh, 2, F, s) * (1 + TILE_HALF_RATE_COLUMNS / (s[0] * s[1] * F)) for s in shapes}
        assert cost[choose_tile(gh, gh, 2, F)] == pytest.approx(min(cost.values()))
    # full support with a one-tile patch: the image, C H W multiply-adds per position and channel
    assert tile_macs(full, full, 1, 8, (28, 28)) == 28 * 28 * 8 * 28 * 28


def test_forward_and_backward_do_not_build_the_kernels_tensor():
    """Support 'full' (K about 4 C H W): nothing larger than the dense weight (bias row included) in the
    forward and backward, gradients included; no (L, F, K) tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and func is not torch.ops.aten.detach.default:
                    Sizes.largest = max(Sizes.largest, t.numel())
            return out

    layer = SoftConv2d(1, 4, 3, (12, 12), padding="same", support="full", dtype=torch.float64)
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    with Sizes():
        layer(x).sum().backward()
    L, F, K = layer.n_positions, layer.out_channels, layer.mask.shape[1]
    assert layer.deviation.grad is not None and layer.shared.grad is not None and x.grad is not None
    assert Sizes.largest == L * F * (12 * 12 + 1) < L * F * K


@pytest.mark.parametrize("support", [5, "full"])
@pytest.mark.parametrize("formulation", ["unfold", "tiled", "dense"])
def test_forward_under_vmap_over_stacked_parameters(formulation, support):
    """torch.func.vmap over models (softcnn.batched stacks them this way) gives each model's output."""
    from torch.func import functional_call, vmap

    layer = random_layer(2, 3, 8, 8, 3, 1, "same", support, formulation)
    g = torch.Generator().manual_seed(4)
    shared = torch.randn(2, *layer.shared.shape, dtype=torch.float64, generator=g)
    deviation = torch.randn(2, *layer.deviation.shape, dtype=torch.float64, generator=g)
    x = torch.randn(2, 3, 2, 8, 8, dtype=torch.float64, generator=g)
    out = vmap(lambda s, d, xb: functional_call(layer, {"shared": s, "deviation": d}, (xb,)))(shared, deviation, x)
    for i in range(2):
        expected = functional_call(layer, {"shared": shared[i], "deviation": deviation[i]}, (x[i],))
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_full_support_gradients_under_vmap_over_stacked_models(frozen, chunked, monkeypatch):
    """vmap(grad_and_value) over stacked models (softcnn.batched on a GPU) gives each model's own J and
    gradient with the compact 'full' storage, also with frozen deviations (the CNN limit) and with the
    weight block rebuilt by chunks in the backward."""
    from torch.func import functional_call, grad_and_value, vmap

    from softcnn import layers

    if chunked:  # chunks of 2 of the 3 channels
        monkeypatch.setattr(layers, "_SAVED_BLOCK_BYTES", 0)
        monkeypatch.setattr(layers, "_CHUNK_BYTES", 2 * 2 * 6 * 5 * 30 * 8)
    layer = random_layer(2, 3, 6, 5, 3, 1, "same", "full", "auto")
    assert layer.formulation == "dense"
    g = torch.Generator().manual_seed(5)
    params = {"shared": torch.randn(2, *layer.shared.shape, dtype=torch.float64, generator=g)}
    deviation = torch.randn(2, *layer.deviation.shape, dtype=torch.float64, generator=g)
    scales = torch.rand(2, *layer.deviation_scale.shape, dtype=torch.float64, generator=g) + 0.5
    x = torch.randn(2, 4, 2, 6, 5, dtype=torch.float64, generator=g)

    class Objective(nn.Module):  # a loss and a penalty on the (L, F, K) view, as a fit's objective
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, xb):
            return self.layer(xb).sin().sum() + self.layer.masked_deviation().pow(3).sum()

    objective = Objective()

    def loss(params, scale, xb, dev):
        state = {**params, "deviation_scale": scale, "deviation": dev}
        return functional_call(objective, {"layer." + k: v for k, v in state.items()}, (xb,))

    x.requires_grad_(chunked)  # the input's gradient is what rebuilds the block
    if chunked:
        params["x"] = x
        loss_ = loss
        loss = lambda p, scale, xb, dev: loss_({k: v for k, v in p.items() if k != "x"}, scale, p["x"], dev)  # noqa: E731

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. vmap's slow fallback for an op without a batching rule
        if frozen:  # the deviation is not a stacked parameter: one tensor for every model
            got_grad, got_value = vmap(grad_and_value(loss), in_dims=(0, 0, 0, None))(
                params, scales, x, deviation[0])
            deviation = deviation[:1].expand(2, *deviation.shape[1:])
        else:
            params["deviation"] = deviation
            got_grad, got_value = vmap(grad_and_value(lambda p, s, xb: loss(p, s, xb, p["deviation"])))(
                params, scales, x)
    for i in range(2):
        p = {k: v[i].clone().requires_grad_() for k, v in params.items()}
        value = loss(p, scales[i], x[i], p.get("deviation", deviation[i]))
        grads = torch.autograd.grad(value, list(p.values()))
        torch.testing.assert_close(got_value[i], value, rtol=0, atol=1e-10)
        for name, grad in zip(p, grads):
            torch.testing.assert_close(got_grad[name][i], grad, rtol=0, atol=1e-10)


FULL_GEOMETRIES = [g for g in GEOMETRIES if g[-1] == "full"] + [
    (1, 3, 7, 5, 3, 2, "same", "full"),  # stride 2, non-square
    (3, 2, 5, 6, 2, 1, "valid", "full"),  # even kernel, three channels
]


@pytest.mark.parametrize("chunks", [None, 1, 2])
@pytest.mark.parametrize("geometry", FULL_GEOMETRIES)
def test_full_support_one_gemm_matches_the_kernel_view(geometry, chunks, monkeypatch, kernel_backend):
    """The compact 'full' storage run as one GEMM (weight block kept, or rebuilt by chunks of output
    channels in the backward) gives the outputs and gradients of the (L, F, K) kernels() reference,
    built by the compiled CPU kernels and by the torch code."""
    from softcnn import layers

    if chunks is not None:  # blocks of `chunks` channels (the last one shorter), rebuilt in the backward
        C, F, H, W = geometry[:4]
        monkeypatch.setattr(layers, "_SAVED_BLOCK_BYTES", 0)
        monkeypatch.setattr(layers, "_CHUNK_BYTES", chunks * C * H * W * 8 * int(np.prod(
            SoftConv2d(C, F, geometry[4], (H, W), stride=geometry[5], padding=geometry[6]).output_shape)))
    C, F, H, W = geometry[:4]
    layer = random_layer(*geometry, "auto")
    assert layer.formulation == "dense" and layer.deviation.shape == (C * H * W + 1, F, layer.n_positions)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        layer.shared_scale.uniform_(0.5, 2.0, generator=g)
        layer.deviation_scale.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(3, C, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    grad_out = torch.randn(3, F, *layer.output_shape, dtype=torch.float64, generator=g)
    expected = outputs_and_grads(layer, lambda x: reference_unfold(layer, x), x, grad_out)
    got = outputs_and_grads(layer, layer, x, grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert got[0].is_contiguous()


@pytest.mark.parametrize("frozen", ["x", "shared", "deviation"])
@pytest.mark.parametrize("geometry", FULL_GEOMETRIES[-2:])
def test_full_support_one_gemm_partial_and_batched_gradients(geometry, frozen, kernel_backend):
    """With one of input, shared kernels and deviations not requiring grad, the others' gradients
    are the reference's. With the shared kernels frozen, a batched backward (``is_grads_batched``:
    cotangents the compiled kernels cannot read) gives each cotangent's gradients (the shared
    kernels' gradient, window sums over views, has no batching rule there)."""
    C, F, H, W = geometry[:4]
    layer = random_layer(*geometry, "auto")
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        layer.deviation_scale.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(3, C, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    cots = torch.randn(2, 3, F, *layer.output_shape, dtype=torch.float64, generator=g)
    inputs = {"x": x, "shared": layer.shared, "deviation": layer.deviation}
    expected = [outputs_and_grads(layer, lambda x: reference_unfold(layer, x), x, c)[1:] for c in cots]
    inputs[frozen].requires_grad_(False)
    wanted = [k for k in inputs if k != frozen]
    out = layer(x)
    single = torch.autograd.grad(out, [inputs[k] for k in wanted], cots[0], retain_graph=True)
    for got, name in zip(single, wanted):
        torch.testing.assert_close(got, expected[0][list(inputs).index(name)], rtol=0, atol=1e-10)
    if frozen == "shared":
        batched = torch.autograd.grad(out, [inputs[k] for k in wanted], cots, is_grads_batched=True)
        for got, name in zip(batched, wanted):
            for b in range(2):
                torch.testing.assert_close(got[b], expected[b][list(inputs).index(name)], rtol=0, atol=1e-10)


@pytest.mark.parametrize("geometry", FULL_GEOMETRIES + [(1, 2, 8, 8, 3, 1, "same", "full")])
def test_window_view_and_its_adjoint(geometry):
    """_window_view gives the flipped kernel's windows (the unfold view it copies through), and
    _window_adjoint is its adjoint (autograd's vector-Jacobian product through unfold), also
    batched by vmap (the backward runs under it in stacked fits), at stride 2 and with 3 channels."""
    from torch.func import vmap

    from softcnn.layers import _window_adjoint, _window_view

    layer = random_layer(*geometry, "auto")
    C, H, W, Lh, Lw, sh, sw = layer._geometry
    (Sh, Sw), B = layer.support_shape, 4
    g = torch.Generator().manual_seed(8)
    v = torch.randn(B, C * Sh * Sw, dtype=torch.float64, generator=g, requires_grad=True)
    unfolded = v.reshape(B, C, Sh, Sw).flip(2, 3).unfold(2, H, sh).unfold(3, W, sw).permute(1, 4, 5, 0, 2, 3)
    assert torch.equal(_window_view(v, layer._geometry), unfolded)
    cot = torch.randn(C * H * W, B, Lh * Lw, dtype=torch.float64, generator=g)
    (expected,) = torch.autograd.grad(unfolded, v, cot.view(unfolded.shape))
    torch.testing.assert_close(_window_adjoint(cot, layer._geometry), expected, rtol=0, atol=1e-12)
    stacked = torch.stack([cot, 2 * cot])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap's slow fallback for an op without a batching rule
        batched = vmap(lambda c: _window_adjoint(c, layer._geometry))(stacked)
    torch.testing.assert_close(batched, torch.stack([expected, 2 * expected]), rtol=0, atol=1e-12)


def test_stored_scale_is_kept_while_deviation_scale_is_unchanged():
    """The scales at the stored deviations are built once per state of deviation_scale: rebuilt after
    set_scales, an in-place write, load_state_dict or a dtype change; not kept from inside torch.func
    transforms (swapped buffers); not pickled or deep-copied; outputs follow the scales."""
    import copy
    import pickle

    from torch.func import functional_call, vmap

    layer = random_layer(1, 2, 5, 4, 3, 1, "same", "full", "auto")
    K = layer.mask.shape[1]
    x = torch.randn(3, 1, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def expected():
        return layer.as_deviation_storage(layer.deviation_scale)

    first = layer._stored_scale()
    assert layer._stored_scale() is first and torch.equal(first, expected())
    out = layer(x).detach()
    layer.set_scales(torch.full((K,), 0.5, dtype=torch.float64), torch.full((K,), 4.0, dtype=torch.float64))
    assert torch.equal(layer._stored_scale(), expected()) and not torch.equal(layer._stored_scale(), first)
    torch.testing.assert_close(layer(x), out, rtol=0, atol=1e-12)  # set_scales keeps the model
    with torch.no_grad():
        layer.deviation_scale[:3] = 2.0
    assert torch.equal(layer._stored_scale(), expected())
    other = random_layer(1, 2, 5, 4, 3, 1, "same", "full", "auto", seed=1)
    with torch.no_grad():
        other.deviation_scale.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(4))
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer._stored_scale(), expected())
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    kept = layer._stored_scale()
    swapped = torch.stack([layer.deviation_scale, 2 * layer.deviation_scale])
    inside = vmap(lambda s: functional_call(layer, {"deviation_scale": s}, (x,)))(swapped)
    torch.testing.assert_close(inside[0], layer(x), rtol=0, atol=1e-12)
    assert layer._stored_scale() is kept  # the swapped buffers' scales were not kept
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert "_stored_scale_cache" not in clone.__dict__
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    layer.float()
    assert layer._stored_scale().dtype == torch.float32 and torch.equal(layer._stored_scale(), expected())


@pytest.mark.parametrize("geometry", FULL_GEOMETRIES + [GEOMETRIES[1]])
def test_deviation_accessors_round_trip_whatever_the_storage(geometry):
    """set_deviations / deviations / as_deviation_storage / deviation_gradient speak (L, F, K) for
    both storages; the compact one holds exactly the existing offsets."""
    layer = random_layer(*geometry, "auto")
    L, F, K = layer.n_positions, layer.out_channels, layer.mask.shape[1]
    exists = layer.mask.unsqueeze(1).expand(L, F, K)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.deviation_scale.copy_(2.0 ** torch.randint(-2, 3, (K,), generator=g))  # exact conversions
    d = torch.randn(L, F, K, dtype=torch.float64, generator=g)
    before = layer.deviations().detach().clone()
    layer.set_deviations(d)
    got = layer.deviations().detach()
    assert torch.equal(got[exists], d[exists])
    if layer._compact:  # only existing offsets are stored: absent ones read 0
        assert layer.deviation.numel() == int(layer.mask.sum()) * F and torch.all(got[~exists] == 0)
    else:  # absent offsets keep their values
        assert torch.equal(got[~exists], before[~exists])
    # the storage layout of (L, F, K) values: the raw parameter, and each stored entry's scale
    raw = layer.as_deviation_storage(d / layer.deviation_scale)
    if layer._compact:
        assert torch.equal(layer.deviation.detach(), raw)
        scale = layer.as_deviation_storage(layer.deviation_scale)
        assert scale.shape == (layer.deviation.shape[0], 1, L)
        assert torch.equal(scale.squeeze(1), layer.deviation_scale[layer._compact_index])
        assert torch.equal(layer._stored_scale(), scale)
    else:
        assert torch.equal(layer.deviation.detach()[exists], raw[exists])
    # set_scales keeps the model
    w0 = layer.kernels().detach().clone()
    layer.set_scales(torch.full((K,), 0.5, dtype=torch.float64), torch.full((K,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(layer.kernels().detach(), w0, rtol=0, atol=0)
    # deviation_gradient is dJ/dd_p of the kernel view, zero where absent
    x = torch.randn(2, geometry[0], *geometry[2:4], dtype=torch.float64, generator=g)
    grad_out = torch.randn(2, F, *layer.output_shape, dtype=torch.float64, generator=g)
    layer(x).backward(grad_out)
    dv = layer.deviations().detach().requires_grad_()
    w = (layer.shared_kernel().detach() + dv) * layer.mask.unsqueeze(1)
    ref = torch.autograd.grad(reference_unfold_from(layer, w, x), dv, grad_out)[0] * exists
    torch.testing.assert_close(layer.deviation_gradient(), ref, rtol=0, atol=1e-10)


def reference_unfold_from(layer: SoftConv2d, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """reference_unfold with the kernel vectors ``w`` (L, F, K) given."""
    kernels = layer.kernels
    layer.kernels = lambda: w
    try:
        return reference_unfold(layer, x)
    finally:
        layer.kernels = kernels


def test_full_layer_loads_old_layout_state_dicts_and_round_trips():
    """A state dict saved with the (L, F, K) 'full' layout loads into the compact storage; the new
    layout round-trips through state_dict, pickle and deepcopy; the parameter freezes as before."""
    import copy
    import pickle

    layer = random_layer(2, 3, 6, 5, 3, 1, "same", "full", "auto")
    L, F, K = layer.n_positions, layer.out_channels, layer.mask.shape[1]
    g = torch.Generator().manual_seed(9)
    old = {"shared": torch.randn(F, K, dtype=torch.float64, generator=g),
           "deviation": torch.randn(L, F, K, dtype=torch.float64, generator=g),
           "shared_scale": torch.rand(K, dtype=torch.float64, generator=g) + 0.5,
           "deviation_scale": 2.0 ** torch.randint(-2, 3, (K,), generator=g).double()}
    layer.load_state_dict(old)
    exists = layer.mask.unsqueeze(1).expand(L, F, K)
    expected = old["deviation"] * old["deviation_scale"]
    assert layer.deviation.shape == (2 * 6 * 5 + 1, F, L)
    assert torch.equal(layer.deviations().detach()[exists], expected[exists])
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, generator=g)
    w = (old["shared"] * old["shared_scale"] + expected) * layer.mask.unsqueeze(1)
    torch.testing.assert_close(layer(x), reference_unfold_from(layer, w, x), rtol=0, atol=1e-10)
    fresh = random_layer(2, 3, 6, 5, 3, 1, "same", "full", "auto", seed=1)
    fresh.load_state_dict(layer.state_dict())
    for other in (fresh, pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    layer.deviation.requires_grad_(False)  # the CNN limit's freezing
    layer(x).sum().backward()
    assert layer.deviation.grad is None and layer.shared.grad is not None


def test_covering_layer_refuses_a_double_backward(kernel_backend):
    """Its hand-written backward reads a saved block without a graph: second derivatives raise,
    and the first ones, taken with ``create_graph``, are those of a plain backward."""
    layer = SoftConv2d(1, 2, 3, (5, 5), padding="same", support="full", dtype=torch.float64)
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(layer(x).pow(2).sum(), x)
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(g, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="twice"):
        g.pow(2).sum().backward()


def test_layers_pickled_before_the_compact_storage_load_and_predict():
    """Pickles made by commit 161e43c (before covering supports stored compact deviations) load.

    ``tests/data/softconv2d_pickles_161e43c.pt`` holds, for a 'full' ('same') and a windowed
    (support 5, 'valid', stride 2) float64 layer ``SoftConv2d(1, 2, 3, (4, 5))`` with random
    ``shared`` and ``deviation`` (seed 0): ``pickle.dumps(layer)``, an input and the output that
    code computed.
    """
    import pathlib
    import pickle

    saved = torch.load(pathlib.Path(__file__).parent / "data" / "softconv2d_pickles_161e43c.pt", weights_only=False)
    for name, (blob, x, expected) in saved.items():
        layer = pickle.loads(blob)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
        assert layer.deviation.shape == ((21, 2, 20) if name == "full" else (2, 2, 21))  # compact for 'full'
        assert layer.deviation.requires_grad
