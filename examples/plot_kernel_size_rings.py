"""
==================================================
Kernel-size selection with nested rings
==================================================

``locality_penalty='rings'`` is a group lasso over nested rings of the
support: the outermost half-ring belongs to every group, the next one to all
but one, and so on. Outer rings therefore vanish first, and as ``locality``
grows each channel's kernel shrinks ring by ring, :math:`5\\times 5 \\to
4\\times 4 \\to 3\\times 3 \\to \\dots`, stopping at the size the data support.
``kernel_sizes_`` reads off the chosen size of every output channel.

We start from a 1×1 nominal kernel with a 5×5 support, so every size from 1
to 5 is a candidate, and keep the kernels tied (``tying=1``) so the sizes
are those of a CNN.
"""

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from softcnn import SoftConvClassifier
from softcnn.datasets import load_digits_images

warnings.simplefilter("ignore", ConvergenceWarning)

X, y = load_digits_images(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=800, stratify=y, random_state=0)

localities = [0.0, 0.1, 0.2, 0.4, 1.0]
fits = []
for loc in localities:
    clf = SoftConvClassifier(channels=4, kernel_size=1, support=5, tying=1.0, locality=loc,
                             locality_penalty="rings", max_iter=60, random_state=0)
    fits.append(clf.fit(X_train, y_train))
    print(f"locality={loc:<4}: kernel sizes per channel={clf.kernel_sizes_[0].tolist()}  "
          f"test accuracy={clf.score(X_test, y_test):.3f}  n_params_={clf.n_params_}")

# %%
# The shared kernels (one row per locality, one column per channel): the
# zero rings are white.
fig, axes = plt.subplots(len(localities), 4, figsize=(6, 1.6 * len(localities)), constrained_layout=True)
for row, (loc, clf) in enumerate(zip(localities, fits)):
    K = clf.shared_kernels_[0][:, 0]  # (F, 5, 5)
    vmax = np.abs(K).max() or 1.0
    for f in range(4):
        ax = axes[row, f]
        ax.imshow(np.ma.masked_equal(K[f], 0.0), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"size {clf.kernel_sizes_[0][f]}", fontsize=8)
        if f == 0:
            ax.set_ylabel(f"locality={loc:g}", fontsize=8)
plt.show()
