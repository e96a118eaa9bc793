"""
============================================================
Digits: a tying path and cross-validation with the 1-SE rule
============================================================

The scikit-learn digits are 8×8 images. We fit a
:class:`~softcnn.SoftConvClassifier` along a warm-started regularization
path of tying strengths (:func:`~softcnn.soft_conv_path`, strong to weak,
like ``lasso_path``), then let :class:`~softcnn.SoftConvClassifierCV` choose
the strength by cross-validation, with glmnet's one-standard-error rule.
"""

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from softcnn import SoftConvClassifier, SoftConvClassifierCV, soft_conv_path
from softcnn.datasets import load_digits_images
from softcnn.plotting import plot_cv, plot_kernels, plot_path

warnings.simplefilter("ignore", ConvergenceWarning)  # few iterations, to keep the example fast

X, y = load_digits_images(return_X_y=True)  # (1797, 8, 8) in [0, 1]
X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=1000, stratify=y, random_state=0)

# %%
# The path
# --------
# Eight tying strengths from a nearly tied model (a CNN) down to an almost
# unshared one. ``values=None`` would start at the data-driven
# :func:`~softcnn.limits.tying_max` instead. A quarter of the training data
# is held out for ``validation_score``.
base = SoftConvClassifier(channels=4, kernel_size=3, max_iter=60, random_state=0)
path = soft_conv_path(base, X_train, y_train, param="tying", values=np.geomspace(1, 1e-5, 8),
                      validation_fraction=0.25)
for t, s, d, n in zip(path.values, path.validation_score, path.tying_deviation, path.n_iter):
    print(f"tying={t:8.1e}  validation accuracy={s:.3f}  tying_deviation={d:.3f}  iterations={n}")

# %%
# :func:`~softcnn.plotting.plot_path` draws the validation score and the
# diagnostics against the strength (strong tying on the right of a log
# axis). The tying deviation — the share of kernel energy off the shared
# kernel — goes from 0 (a CNN) towards 1 as tying weakens.
axes = plot_path(path, metrics=("validation_score", "train_score", "tying_deviation"))
axes[0].figure.set_size_inches(6, 6)
plt.show()

# %%
# Cross-validation and the one-standard-error rule
# ------------------------------------------------
# ``selection='1se'`` picks the *strongest* tying whose mean CV score is
# within one standard error of the best — the most conv-like model the data
# cannot tell apart from the best one.
cv = SoftConvClassifierCV(channels=4, kernel_size=3, max_iter=60, tyings=np.geomspace(1, 1e-5, 6),
                          cv=3, selection="1se", random_state=0)
cv.fit(X_train[:600], y_train[:600])
i_min, i_1se = cv.index_min_[1], cv.index_1se_[1]
print(f"'min' rule: tying={cv.tyings_[i_min]:.1e}   '1se' rule: tying={cv.tyings_[i_1se]:.1e}")
print(f"chosen tying_={cv.tying_:.1e}, CV accuracy={cv.best_score_:.3f}, "
      f"test accuracy={cv.score(X_test, y_test):.3f}")

# %%
# :func:`~softcnn.plotting.plot_cv` draws the mean CV score with a ±1 SE band
# and both choices (the selected rule solid).
plot_cv(cv)
plt.show()

# %%
# The refitted model's kernels, laid out by position (first channel):
plot_kernels(cv)
plt.show()
