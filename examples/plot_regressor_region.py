"""
================================================
A regressor on a continuous image target
================================================

:class:`~softcnn.SoftConvRegressor` has a linear read-out and the squared
error. Two continuous targets:

1. data from a known *region-wise* teacher
   (:func:`~softcnn.datasets.make_soft_conv_data` with ``teacher='regions'``:
   the left and right halves of the image use different kernels), where the
   fused-lasso tying graph ``'grid'`` fuses neighbouring positions into
   blocks of exactly equal kernels;
2. the digits, predicting the mean intensity of the upper-left quarter of
   the image from the image with that quarter blanked out.
"""

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from softcnn import SoftConvRegressor
from softcnn.datasets import load_digits_images, make_soft_conv_data
from softcnn.plotting import plot_kernels

warnings.simplefilter("ignore", ConvergenceWarning)

# %%
# A region-wise teacher
# ---------------------
X, y, info = make_soft_conv_data(600, (8, 8), teacher="regions", n_channels=1, kernel_size=3,
                                 noise=0.1, random_state=0)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)

models = {
    "CNN-like (strong l2 tying)": SoftConvRegressor(channels=1, tying=10.0),
    "untied (tying=0)": SoftConvRegressor(channels=1, tying=0.0),
    "fused lasso (l1, grid)": SoftConvRegressor(channels=1, tying=0.02, tying_penalty="l1",
                                                tying_graph="grid"),
}
for name, est in models.items():
    est.set_params(kernel_size=3, support=3, max_iter=100, random_state=0).fit(X_train, y_train)
    kernels = est.kernels_[0].reshape(64, -1)
    n_distinct = len(np.unique(np.round(kernels, 6), axis=0))
    print(f"{name:28s} test R^2={est.score(X_test, y_test):.3f}  "
          f"tying_deviation_={est.tying_deviation_:.3f}  distinct kernels={n_distinct:2d}  "
          f"n_params_={est.n_params_}")

# %%
# The kernels by position. The untied model has 64 unrelated kernels. Strong
# ``'l2'`` tying makes them numerically equal (``tying_deviation_`` 0), but
# ridge-type tying shrinks without tying *exactly*, so they still count as
# distinct. The ``'l1'`` fused lasso ties neighbouring positions exactly —
# fewer distinct kernels and effective parameters — and here predicts best.
fig, axes = plt.subplots(1, 3, figsize=(12, 4), constrained_layout=True)
for ax, (name, est) in zip(axes, models.items()):
    plot_kernels(est, ax=ax)
    ax.set_title(name)
plt.show()

# %%
# Digits: predict the brightness of a hidden region
# -------------------------------------------------
images, _ = load_digits_images(return_X_y=True)
target = images[:, :4, :4].mean(axis=(1, 2))   # mean intensity of the upper-left quarter
masked = images.copy()
masked[:, :4, :4] = 0.0                         # ... which the model does not see
Xd_train, Xd_test, yd_train, yd_test = train_test_split(masked, target, train_size=1000, random_state=0)

reg = SoftConvRegressor(channels=4, kernel_size=3, tying=1e-2, max_iter=80, random_state=0)
reg.fit(Xd_train, yd_train)
print(f"digits region target: test R^2={reg.score(Xd_test, yd_test):.3f}")

fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(yd_test, reg.predict(Xd_test), s=6, alpha=0.5)
lim = [0, max(yd_test.max(), 0.6)]
ax.plot(lim, lim, "k--", lw=1)
ax.set_xlabel("true mean intensity of the hidden quarter")
ax.set_ylabel("predicted")
plt.show()
