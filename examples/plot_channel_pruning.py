"""
==========================================
Channel pruning: the data choose the width
==========================================

``channel_sparsity`` is a group lasso with one group per output channel (all
its weights and biases at every position). Growing it switches whole
channels off — exactly, by block soft-thresholding — so a layer fitted with
too many channels is pruned to the width the data support.
``n_active_channels_``, ``n_params_`` and ``flops_`` report what is left.
"""

# %%
import warnings

import matplotlib.pyplot as plt
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from softcnn import SoftConvClassifier, soft_conv_path
from softcnn.datasets import load_digits_images
from softcnn.plotting import plot_frontier

warnings.simplefilter("ignore", ConvergenceWarning)

X, y = load_digits_images(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=800, stratify=y, random_state=0)

# %%
# A path over ``channel_sparsity`` (strong to weak, warm-started), 8
# channels to start with and strong tying.
base = SoftConvClassifier(channels=8, kernel_size=3, tying=1.0, max_iter=60, random_state=0)
path = soft_conv_path(base, X_train, y_train, param="channel_sparsity", values=[8.0, 5.0, 3.0, 1.0, 0.0],
                      X_val=X_test, y_val=y_test)

for cs, acc, n in zip(path.values, path.validation_score, path.n_params):
    print(f"channel_sparsity={cs:<4}: test accuracy={acc:.3f}  effective parameters={n:.0f}")

# %%
# One model, for the per-channel view.
clf = SoftConvClassifier(channels=8, kernel_size=3, tying=1.0, channel_sparsity=5.0, max_iter=60,
                         random_state=0).fit(X_train, y_train)
print("active channels:", clf.n_active_channels_, " kernel sizes:", clf.kernel_sizes_[0].tolist())

# %%
# Accuracy against effective size along the path:
plot_frontier(path)
plt.show()
