"""Tests of softcnn.plotting (Agg backend, fake path/CV results and one real fit)."""

import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402

from softcnn.plotting import plot_cv, plot_frontier, plot_kernels, plot_path  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _path(values=None, validation=True):
    values = np.logspace(1, -3, 6) if values is None else np.asarray(values, dtype=float)
    n = values.size
    return SimpleNamespace(
        param="tying",
        values=values,
        train_loss=np.linspace(1.0, 0.2, n),
        validation_score=np.linspace(0.7, 0.9, n) if validation else None,
        tying_deviation=np.linspace(0.0, 0.6, n),
        locality_ratio=np.linspace(0.0, 0.3, n),
        n_params=np.geomspace(100, 50_000, n).round(),
        flops=np.geomspace(1e4, 1e6, n).round(),
    )


def _cv(n_loc=1, n_tyings=7, n_folds=5, selection="1se", seed=0):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(
        tyings_=np.logspace(-3, 2, n_tyings),
        localities_=np.logspace(-2, 0, n_loc) if n_loc > 1 else np.array([0.0]),
        scores_path_=rng.uniform(0.7, 0.9, size=(n_loc, n_tyings, n_folds)),
        index_min_=(n_loc - 1, 2),
        index_1se_=(n_loc - 1, 5),
        tying_=None,
        locality_=None,
        selection=selection,
    )


# ----------------------------------------------------------------------- path
def test_plot_path_one_subplot_per_metric(tmp_path):
    path = _path()
    axes = plot_path(path)
    assert len(axes) == 3
    assert len({a.figure for a in axes}) == 1
    for a, name in zip(axes, ("validation_score", "tying_deviation", "locality_ratio")):
        assert len(a.lines) == 1
        np.testing.assert_allclose(a.lines[0].get_xdata(), path.values)
        np.testing.assert_allclose(a.lines[0].get_ydata(), getattr(path, name))
        assert a.get_ylabel()
        assert a.get_xscale() == "log"
    assert "tying" in axes[-1].get_xlabel()
    axes[0].figure.savefig(tmp_path / "path.png")
    assert (tmp_path / "path.png").stat().st_size > 0


def test_plot_path_symlog_with_zero_and_missing_metric():
    path = _path(values=[10.0, 1.0, 0.1, 0.0], validation=False)
    axes = plot_path(path)  # validation_score is None: skipped
    assert len(axes) == 2
    assert all(a.get_xscale() == "symlog" for a in axes)


def test_plot_path_on_given_axes():
    path = _path()
    fig, ax = plt.subplots()
    out = plot_path(path, metrics=("train_loss", "tying_deviation"), ax=ax)
    assert out is ax and len(ax.lines) == 2
    assert ax.get_legend() is not None and ax.get_xlabel() and ax.get_ylabel()
    fig, axs = plt.subplots(2, 1)
    out = plot_path(path, metrics=("train_loss", "n_params"), ax=axs)
    assert len(out) == 2 and all(len(a.lines) == 1 for a in axs)
    with pytest.raises(ValueError, match="None of the metrics"):
        plot_path(_path(validation=False), metrics=("validation_score",))


def test_plot_path_and_frontier_on_a_grid_path():
    tyings, localities = np.array([1.0, 0.1, 0.01]), np.array([0.5, 0.0])
    values = np.array([(lo, t) for lo in localities for t in tyings])
    n = len(values)
    path = SimpleNamespace(
        param=("locality", "tying"), values=values, grid_shape=(2, 3),
        validation_score=np.arange(n, dtype=float), tying_deviation=np.linspace(0, 1, n),
        locality_ratio=np.linspace(0, 1, n), n_params=np.arange(1, n + 1) * 10.0,
    )
    axes = plot_path(path)
    assert len(axes) == 3 and all(len(a.lines) == 2 for a in axes)
    np.testing.assert_allclose(axes[0].lines[1].get_xdata(), tyings)
    np.testing.assert_allclose(axes[0].lines[1].get_ydata(), [3, 4, 5])
    assert axes[0].lines[1].get_label() == "locality=0"
    assert axes[-1].get_xlabel() == "tying strength"
    ax = plot_frontier(path)
    assert len(ax.lines) == 2 and len(ax.texts) == n
    assert ax.get_legend() is not None


# ------------------------------------------------------------------------- CV
def _band_vertices(ax):
    polys = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(polys) == 1
    return polys[0].get_paths()[0].vertices


def test_plot_cv_band_and_lines(tmp_path):
    cv = _cv()
    ax = plot_cv(cv)
    scores = cv.scores_path_[0]
    mean = scores.mean(axis=1)
    se = scores.std(axis=1, ddof=1) / np.sqrt(scores.shape[1])
    # The mean line.
    curve = [ln for ln in ax.lines if len(ln.get_xdata()) == cv.tyings_.size]
    assert len(curve) == 1
    np.testing.assert_allclose(curve[0].get_ydata(), mean)
    # The band: its polygon's vertices at each tying are mean - SE and mean + SE.
    verts = _band_vertices(ax)
    for t, lo, hi in zip(cv.tyings_, mean - se, mean + se):
        ys = verts[np.isclose(verts[:, 0], t), 1]
        assert np.isclose(ys.min(), lo) and np.isclose(ys.max(), hi)
    # Vertical lines at the 'min' and '1se' choices, labelled.
    vlines = [ln for ln in ax.lines if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] == ln.get_xdata()[1]]
    assert len(vlines) == 2
    by_label = {ln.get_label().split(":")[0]: ln for ln in vlines}
    assert by_label["min"].get_xdata()[0] == cv.tyings_[2]
    assert by_label["1se"].get_xdata()[0] == cv.tyings_[5]
    assert by_label["1se"].get_linestyle() == "-"  # the selected rule
    assert by_label["min"].get_linestyle() == "--"
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel()
    ax.figure.savefig(tmp_path / "cv.png")
    assert (tmp_path / "cv.png").stat().st_size > 0


def test_plot_cv_locality_rows():
    cv = _cv(n_loc=3, selection="min")
    ax = plot_cv(cv)  # defaults to the selected locality (row 2)
    mean = cv.scores_path_[2].mean(axis=1)
    curve = [ln for ln in ax.lines if len(ln.get_xdata()) == cv.tyings_.size][0]
    np.testing.assert_allclose(curve.get_ydata(), mean)
    assert f"{cv.localities_[2]:.3g}" in ax.get_title()
    fig, ax2 = plt.subplots()
    out = plot_cv(cv, locality_index=0, ax=ax2)
    assert out is ax2
    curve = [ln for ln in ax2.lines if len(ln.get_xdata()) == cv.tyings_.size][0]
    np.testing.assert_allclose(curve.get_ydata(), cv.scores_path_[0].mean(axis=1))
    assert any("at locality" in ln.get_label() for ln in ax2.lines)


# -------------------------------------------------------------------- kernels
def test_plot_kernels_raw_array_mosaic():
    rng = np.random.default_rng(0)
    Lh, Lw, F, C, Sh, Sw = 3, 4, 2, 2, 5, 5
    k = rng.normal(size=(Lh, Lw, F, C, Sh, Sw))
    ax = plot_kernels(k, channel=1, in_channel=1, kernel_size=3)
    assert len(ax.images) == 1
    arr = ax.images[0].get_array()
    assert arr.shape == (Lh * (Sh + 1), Lw * (Sw + 1))
    for i in range(Lh):
        for j in range(Lw):
            tile = arr[i * (Sh + 1) : i * (Sh + 1) + Sh, j * (Sw + 1) : j * (Sw + 1) + Sw]
            np.testing.assert_array_equal(np.asarray(tile), k[i, j, 1, 1])
    assert np.ma.getmaskarray(arr)[Sh, :].all()  # the NaN gaps
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi and hi == np.abs(k[:, :, 1, 1]).max()
    assert len(ax.figure.axes) == 2  # image + colorbar
    windows = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(windows) == 1 and len(windows[0].get_segments()) == Lh * Lw
    assert ax.get_xlabel() and ax.get_ylabel()
    # No window outline without a kernel size for a raw array.
    ax = plot_kernels(k)
    assert not [c for c in ax.collections if isinstance(c, LineCollection)]
    with pytest.raises(ValueError, match="channel"):
        plot_kernels(k, channel=F)


def test_plot_kernels_estimator(fitted, tmp_path):
    k = fitted.kernels_[0]
    Lh, Lw, F, C, Sh, Sw = k.shape
    ax = plot_kernels(fitted, channel=1)
    arr = ax.images[0].get_array()
    assert arr.shape == (Lh * (Sh + 1), Lw * (Sw + 1))
    for i, j in [(0, 0), (3, 5), (Lh - 1, Lw - 1)]:
        tile = np.asarray(arr[i * (Sh + 1) : i * (Sh + 1) + Sh, j * (Sw + 1) : j * (Sw + 1) + Sw])
        np.testing.assert_allclose(tile, k[i, j, 1, 0])
    assert f"{fitted.tying_deviation_:.3g}" in ax.get_title()
    # The window outline of tile (0, 0) spans the layer's nominal window.
    layer = fitted.network_.soft_layers[0]
    seg = [c for c in ax.collections if isinstance(c, LineCollection)][0].get_segments()[0]
    r0, c0 = -layer.gh.lo, -layer.gw.lo
    assert seg[:, 0].min() == c0 - 0.5 and seg[:, 0].max() == c0 + layer.kernel_size - 0.5
    assert seg[:, 1].min() == r0 - 0.5 and seg[:, 1].max() == r0 + layer.kernel_size - 0.5
    ax.figure.savefig(tmp_path / "kernels.png")
    assert (tmp_path / "kernels.png").stat().st_size > 0


# ------------------------------------------------------------------- frontier
def test_plot_frontier(tmp_path):
    path = _path()
    ax = plot_frontier(path)
    assert len(ax.lines) == 1
    np.testing.assert_allclose(ax.lines[0].get_xdata(), path.n_params)  # path order
    np.testing.assert_allclose(ax.lines[0].get_ydata(), path.validation_score)
    assert len(ax.texts) == path.values.size
    assert [t.get_text() for t in ax.texts] == [f"{v:.2g}" for v in path.values]
    assert ax.get_xscale() == "log"  # sizes span > 2 decades
    assert ax.get_xlabel() == "effective parameters" and ax.get_ylabel() == "validation score"
    fig, ax2 = plt.subplots()
    out = plot_frontier(path, x="flops", y="train_loss", ax=ax2, xscale="linear")
    assert out is ax2 and ax2.get_xscale() == "linear" and "FLOPs" in ax2.get_xlabel()
    with pytest.raises(ValueError, match="validation_score"):
        plot_frontier(_path(validation=False))
    ax.figure.savefig(tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0
