"""
============================================================
Course walkthrough: from ridge on pixels to soft convolution
============================================================

The code of the :ref:`course` page. Step 1 is the familiar one: ridge
regression on the 64 pixels of the digits, with its regularization path and
cross-validation. Step 2 replaces the linear model by a soft-convolution
layer and the ridge penalty by the tying penalty — and draws the same two
plots.
"""

# %%
# Step 1 — ridge regression on pixels
# -----------------------------------
# :class:`~sklearn.linear_model.RidgeClassifier` is ridge regression on the
# one-hot coded classes: :math:`\min_B \|Y - XB\|^2 + \alpha \|B\|^2`.
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.model_selection import cross_val_score, train_test_split
from sklearn.preprocessing import LabelBinarizer

from softcnn import SoftConvClassifier, SoftConvClassifierCV, soft_conv_path
from softcnn.datasets import load_digits_images
from softcnn.plotting import plot_cv, plot_path

warnings.simplefilter("ignore", ConvergenceWarning)

images, y = load_digits_images(return_X_y=True)  # (1797, 8, 8)
X = images.reshape(len(images), -1)               # 64 pixels
X_train, X_test, y_train, y_test, img_train, img_test = train_test_split(
    X, y, images, train_size=600, stratify=y, random_state=0)

alphas = np.geomspace(1e3, 1e-3, 13)
Y = LabelBinarizer().fit_transform(y_train) * 2 - 1
coefs = np.array([Ridge(alpha=a).fit(X_train, Y).coef_[0] for a in alphas])  # class "0" vs rest
scores = np.array([cross_val_score(RidgeClassifier(alpha=a), X_train, y_train, cv=5) for a in alphas])

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
axes[0].plot(alphas, coefs, lw=0.8)
axes[0].set_xscale("log")
axes[0].invert_xaxis()
axes[0].set(xlabel="alpha (strong → weak)", ylabel="coefficient", title="ridge path: 64 pixel weights, class 0")
mean, se = scores.mean(1), scores.std(1, ddof=1) / np.sqrt(scores.shape[1])
axes[1].plot(alphas, mean, "o-")
axes[1].fill_between(alphas, mean - se, mean + se, alpha=0.3)
axes[1].set_xscale("log")
axes[1].invert_xaxis()
axes[1].set(xlabel="alpha", ylabel="CV accuracy", title="ridge: 5-fold CV ± 1 SE")
plt.show()
best = alphas[mean.argmax()]
ridge = RidgeClassifier(alpha=best).fit(X_train, y_train)
print(f"ridge on pixels: alpha={best:.2g}, test accuracy={ridge.score(X_test, y_test):.3f}")

# %%
# Step 2 — soft convolution
# -------------------------
# Now a hidden layer of 4 channels with one 7×7 kernel per *position*
# (``support=7`` around a nominal 3×3 window). Ridge shrinks each weight to
# 0; the tying penalty shrinks each position's kernel to the shared kernel.
# Strong tying is a CNN, weak tying an unshared network. The path is the
# analogue of the ridge path, read with the tying deviation instead of the
# coefficients.
base = SoftConvClassifier(channels=4, kernel_size=3, max_iter=50, random_state=0)
path = soft_conv_path(base, img_train, y_train, param="tying", values=np.geomspace(1, 1e-5, 6),
                      validation_fraction=0.25)
plot_path(path, metrics=("validation_score", "tying_deviation"))
plt.show()

# %%
# And the analogue of the CV curve, with the one-standard-error rule: the
# strongest tying within one SE of the best.
cv = SoftConvClassifierCV(channels=4, kernel_size=3, max_iter=50, tyings=np.geomspace(1, 1e-5, 5), cv=3,
                          selection="1se", random_state=0).fit(img_train, y_train)
plot_cv(cv)
plt.show()
print(f"soft convolution: tying_={cv.tying_:.1e}, tying_deviation_={cv.tying_deviation_:.3f}, "
      f"test accuracy={cv.score(img_test, y_test):.3f}")
