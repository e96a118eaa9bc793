"""Tests of softcnn.stats: locality and tying statistics."""

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as sps

from softcnn.stats import LocalityStatistic, locality_statistic, tying_statistic


# ------------------------------------------------------------------- locality
def test_centre_heavy_kernels_are_significant():
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.1, size=(300, 3, 3))
    w[:, 1, 1] += 1.0
    edges = [(0, 1), (1, 0), (1, 2), (2, 1)]
    for r, c in edges:
        w[:, r, c] += 0.5 * np.sign(rng.normal(size=300))
    res = locality_statistic([w])
    assert isinstance(res, LocalityStatistic) and len(res) == 1
    r0 = res[0]
    assert r0.n_kernels == 300 and r0.n_excluded == 0
    assert r0.centre_edge.mean > 0 and r0.centre_edge.effect_size > 0
    assert r0.centre_edge.p_value < 0.01
    assert r0.edge_corner.p_value < 0.01
    assert r0.centre > r0.edge > r0.corner


def test_statistic_matches_hand_computation():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 4, 3, 3))  # arbitrary leading axes
    a = np.abs(w).reshape(-1, 3, 3)
    centre = a[:, 1, 1]
    edge = (a[:, 0, 1] + a[:, 1, 0] + a[:, 1, 2] + a[:, 2, 1]) / 4
    corner = (a[:, 0, 0] + a[:, 0, 2] + a[:, 2, 0] + a[:, 2, 2]) / 4
    r = locality_statistic(w)[0]  # a bare array is one layer
    for d, s in ((centre - edge, r.centre_edge), (edge - corner, r.edge_corner)):
        ref = sps.ttest_1samp(d, 0.0, alternative="greater")
        assert s.n == 20
        np.testing.assert_allclose(s.mean, d.mean())
        np.testing.assert_allclose(s.effect_size, d.mean() / d.std(ddof=1))
        np.testing.assert_allclose(s.t, ref.statistic)
        np.testing.assert_allclose(s.p_value, ref.pvalue)
    np.testing.assert_allclose(r.corner, corner.mean())


def test_iid_kernels_not_significant():
    rng = np.random.default_rng(42)
    res = locality_statistic([rng.normal(size=(400, 3, 3)), rng.normal(size=(8, 8, 2, 1, 3, 3))])
    assert len(res) == 2
    for r in res:
        assert r.centre_edge.p_value > 0.01
        assert r.edge_corner.p_value > 0.01
        assert abs(r.centre_edge.effect_size) < 0.3


def test_iid_kernels_test_is_calibrated():
    # Under H0 (iid kernels) the one-sided p-value is ~uniform: ~5% below 0.05.
    rng = np.random.default_rng(7)
    w = rng.normal(size=(300, 60, 3, 3))
    p = np.array([locality_statistic([wi])[0].centre_edge.p_value for wi in w])
    assert 0.015 < np.mean(p < 0.05) < 0.10
    assert 0.4 < np.median(p) < 0.6


def test_crop_central_window_of_larger_kernels():
    rng = np.random.default_rng(2)
    # 5x5 support with a 5x5 nominal window: the central 3x3 is rows/cols 1..3.
    w = rng.normal(scale=0.01, size=(50, 5, 5))
    w[:, 2, 2] = 3.0
    w[:, 0, :] = 100.0  # outside the central 3x3: must be ignored
    r = locality_statistic([w], kernel_size=5)[0]
    assert r.centre > 2.9 and r.edge < 0.1 and r.corner < 0.1
    # 7x7 support, 3x3 window at an explicit origin (row 1, col 3).
    w7 = np.zeros((10, 7, 7))
    w7[:, 2, 4] = 1.0
    r = locality_statistic([w7], kernel_size=3, layer_windows=[(1, 3)])[0]
    assert r.centre == 1.0 and r.edge == 0.0 and r.corner == 0.0
    assert np.isnan(r.centre_edge.t)  # constant differences: no test


def test_kernel_size_too_small():
    with pytest.raises(ValueError, match="at least 3"):
        locality_statistic([np.zeros((4, 5, 5))], kernel_size=2)


def test_table_format():
    rng = np.random.default_rng(3)
    res = locality_statistic([rng.normal(size=(30, 3, 3)), rng.normal(size=(30, 3, 3))])
    table = res.to_table()
    assert str(res) == table
    lines = table.splitlines()
    assert len(lines) == 2 + 4  # header, rule, 2 layers x 2 comparisons
    assert "centre - edge" in table and "edge - corner" in table and "effect size" in lines[0]


def test_locality_statistic_on_estimator(fitted):
    res = locality_statistic(fitted)
    assert len(res) == len(fitted.kernels_) == 1
    r = res[0]
    Lh, Lw, F, C = fitted.kernels_[0].shape[:4]
    # 'same' padding on 8x8: border positions lose part of the 3x3 window.
    assert r.n_kernels == (Lh - 2) * (Lw - 2) * F * C
    assert r.n_excluded == Lh * Lw * F * C - r.n_kernels
    for s in (r.centre_edge, r.edge_corner):
        assert all(np.isfinite([s.mean, s.sd, s.effect_size, s.t, s.p_value]))
        assert 0.0 <= s.p_value <= 1.0
    full = locality_statistic(fitted, exclude_border=False)[0]
    assert full.n_kernels == Lh * Lw * F * C
    # The crop uses the layer's window: compare with a manual crop.
    layer = fitted.network_.soft_layers[0]
    r0, c0 = -layer.gh.lo, -layer.gw.lo
    win = fitted.kernels_[0][..., r0 : r0 + 3, c0 : c0 + 3]
    np.testing.assert_allclose(locality_statistic([win])[0].centre, full.centre)


# ---------------------------------------------------------------------- tying
def _tied(rng, Lh=4, Lw=5, F=2, C=3, S=3):
    m = rng.normal(size=(F, C, S, S))
    return m, np.broadcast_to(m, (Lh, Lw, F, C, S, S)).copy()


def test_cnn_tied_kernels_have_zero_norms():
    rng = np.random.default_rng(0)
    m, k = _tied(rng)
    res = tying_statistic(SimpleNamespace(kernels_=[k], shared_kernels_=[m]))
    assert res.norms.shape == (4, 5) and res.relative.shape == (4, 5)
    np.testing.assert_array_equal(res.norms, 0.0)
    np.testing.assert_array_equal(res.relative, 0.0)
    assert res.mean == 0.0


def test_one_deviating_position():
    rng = np.random.default_rng(1)
    m, k = _tied(rng)
    dev = rng.normal(size=m.shape)
    k[2, 3] += dev
    res = tying_statistic(SimpleNamespace(kernels_=[np.zeros(1), k], shared_kernels_=[None, m]), layer=1)
    expected = np.zeros((4, 5))
    expected[2, 3] = np.sqrt((dev**2).sum())
    np.testing.assert_allclose(res.norms, expected)
    np.testing.assert_allclose(res.relative[2, 3], expected[2, 3] / np.linalg.norm(m))
    np.testing.assert_allclose(res.mean, expected.sum() / 20)


def test_tying_statistic_uses_existence_mask(fitted):
    res = tying_statistic(fitted)
    k, m = fitted.kernels_[0], fitted.shared_kernels_[0]
    Lh, Lw = k.shape[:2]
    assert res.norms.shape == (Lh, Lw)
    assert np.all(np.isfinite(res.norms)) and np.all(np.isfinite(res.relative))
    assert np.isfinite(res.mean) and res.mean > 0
    # Corner position (0, 0): offsets above/left of the image do not exist.
    ex = res.exists[0, 0]
    assert not ex.all() and res.exists[Lh // 2, Lw // 2].all()
    by_hand = np.sqrt((((k[0, 0] - m) * ex) ** 2).sum())
    np.testing.assert_allclose(res.norms[0, 0], by_hand)
    # Without the network the mask is unknown: all offsets count, norms only grow.
    plain = tying_statistic(SimpleNamespace(kernels_=fitted.kernels_, shared_kernels_=fitted.shared_kernels_))
    assert np.all(plain.norms >= res.norms - 1e-12)
    np.testing.assert_allclose(plain.norms[Lh // 2, Lw // 2], res.norms[Lh // 2, Lw // 2])


def test_tying_statistic_bad_input():
    with pytest.raises(TypeError, match="kernels_"):
        tying_statistic(object())
    with pytest.raises(ValueError, match="Expected"):
        tying_statistic(SimpleNamespace(kernels_=[np.zeros((2, 2, 3, 3))], shared_kernels_=[np.zeros((3, 3))]))
