"""
====================================================
The 3×3 toy: from 36 free weights to colour families
====================================================

The motivating question of soft convolution, in the smallest possible
setting. A 3×3 image feeds four hidden units, arranged like the 2×2 output
positions of a 2×2 ``'valid'`` convolution. With ``support='full'`` each unit
is connected to **all 9 pixels**: 4 × 9 = 36 free weights, a fully connected
layer. A CNN would force each unit to use the *same* 2×2 kernel on its own
2×2 patch (4 free weights) and zero elsewhere.

Here the pairwise weight-sharing penalty (``tying_penalty='l1'``,
``tying_graph='all'``) charges :math:`\\sum_{p<q} |w_p - w_q|` for the weights
at the same offset of the four units. As ``tying`` grows, weights at the same
offset become *exactly* equal: the 36 numbers fall into a few "colour
families" of identical values.
"""

# %%
# Data from a small CNN teacher
# -----------------------------
# The target is a sum of ``tanh`` of one 2×2 kernel slid over the four
# positions of the image, plus noise.
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from softcnn import SoftConvRegressor

warnings.simplefilter("ignore", ConvergenceWarning)  # short demo fits

rng = np.random.RandomState(0)
X = rng.normal(size=(300, 3, 3))
teacher = np.array([[1.0, -0.5], [0.5, 1.0]])
units = [np.tanh((X[:, i:i + 2, j:j + 2] * teacher).sum(axis=(1, 2))) for i in range(2) for j in range(2)]
y = np.sum(units, axis=0) + 0.1 * rng.normal(size=len(X))


# %%
# Each unit's weights over the 9 pixels
# -------------------------------------
# ``kernels_`` stores weights by *offset* around each unit's anchor. For a
# picture in pixel coordinates we read the weights of the soft-conv layer
# directly: its response to each of the 9 basis images minus its response
# to the zero image.
def unit_weight_maps(est):
    """Weights of the 4 units over the 3x3 pixels: array (2, 2, 3, 3)."""
    layer = est.network_.soft_layers[0]
    dtype = next(layer.parameters()).dtype
    basis = torch.eye(9, dtype=dtype).reshape(9, 1, 3, 3)
    with torch.no_grad():
        out = layer(basis) - layer(torch.zeros(1, 1, 3, 3, dtype=dtype))
    return out.reshape(9, 2, 2).permute(1, 2, 0).reshape(2, 2, 3, 3).numpy()


tyings = [0.0, 0.01, 0.1, 1.0]
fits = []
for tying in tyings:
    est = SoftConvRegressor(channels=1, kernel_size=2, padding="valid", support="full",
                            tying=tying, tying_penalty="l1", tying_graph="all",
                            alpha=0.0, max_iter=300, random_state=0)
    fits.append(est.fit(X, y))
    W = unit_weight_maps(est)
    n_distinct = len(np.unique(np.round(W[np.abs(W) > 1e-8], 6)))
    print(f"tying={tying:<5}: R^2={est.score(X, y):.3f}  tying_deviation_={est.tying_deviation_:.3f}  "
          f"distinct non-zero weights={n_distinct:2d} / 36  n_params_={est.n_params_}")

# %%
# The four units' weight maps for growing tying
# ---------------------------------------------
# Rows: tying strength. Columns: the four hidden units (positions (0,0),
# (0,1), (1,0), (1,1)). One colour scale per row; equal colours are equal
# numbers. At ``tying=0`` every unit has its own 9 weights; as tying grows,
# weights at the same offset merge, and at the top every unit applies the
# same kernel (over offsets around its anchor) shifted to its position — which
# is what a convolution is. Add ``locality`` to zero the weights outside the
# boxes as well.
fig, axes = plt.subplots(len(tyings), 4, figsize=(8, 2.1 * len(tyings)), constrained_layout=True)
for row, (tying, est) in enumerate(zip(tyings, fits)):
    W = unit_weight_maps(est)
    vmax = np.abs(W).max()
    for u in range(4):
        i, j = divmod(u, 2)
        ax = axes[row, u]
        ax.imshow(W[i, j], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for (a, b), v in np.ndenumerate(W[i, j]):
            ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 2, 2, fill=False, lw=2, ec="k"))
        ax.set_xticks([])
        ax.set_yticks([])
        if row == 0:
            ax.set_title(f"unit ({i},{j})")
        if u == 0:
            ax.set_ylabel(f"tying={tying:g}")
fig.suptitle("Weights of the 4 hidden units over the 3×3 image (box: the unit's 2×2 window)")
plt.show()

# %%
# The same fits as kernel mosaics
# -------------------------------
# :func:`softcnn.plotting.plot_kernels` lays the kernels out by position, in
# offset coordinates (the 4×4 support of offsets around each anchor). With
# strong tying the four tiles are identical: the layer is a convolution.
from softcnn.plotting import plot_kernels

fig, axes = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
plot_kernels(fits[0], ax=axes[0])
axes[0].set_title("tying = 0: 4 unrelated kernels")
plot_kernels(fits[-1], ax=axes[1])
axes[1].set_title(f"tying = {tyings[-1]:g}: one shared kernel")
plt.show()
