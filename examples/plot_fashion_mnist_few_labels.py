"""
==========================================
Fashion-MNIST with few labels
==========================================

With few labelled images the prior matters most. We compare, on 300
Fashion-MNIST training images (28×28), an almost unshared model, a CNN-like
model, and the tying chosen by cross-validation, on 1000 test images.

The data are read from the local data folder
(:func:`softcnn.datasets.get_data_home`: ``SOFTCNN_DATA`` or
``../shared/data``); softcnn never downloads. Without the files this example
prints a message and stops.
"""

# %%
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from softcnn import SoftConvClassifier, SoftConvClassifierCV
from softcnn.datasets import get_data_home, load_mnist

warnings.simplefilter("ignore", ConvergenceWarning)

try:
    get_data_home()
    X_train, y_train = load_mnist("fashion_mnist", subset="train", n_samples=300, random_state=0)
    X_test, y_test = load_mnist("fashion_mnist", subset="test", n_samples=1000, random_state=0)
    have_data = True
except (FileNotFoundError, OSError) as exc:
    print(f"Fashion-MNIST is not available here, skipping the fits: {exc}")
    have_data = False

# %%
# Two limits and the cross-validated choice. A stride of 2 and a 5×5 support
# (instead of the default ``support='auto'``, ``kernel_size + 4``) keep the
# 28×28 fits quick.
if have_data:
    common = dict(channels=4, kernel_size=3, stride=2, support=5, max_iter=40, random_state=0)
    for name, tying in [("nearly unshared", 1e-5), ("CNN-like", 10.0)]:
        clf = SoftConvClassifier(tying=tying, **common).fit(X_train, y_train)
        print(f"{name:16s} tying={tying:g}: test accuracy={clf.score(X_test, y_test):.3f}  "
              f"tying_deviation_={clf.tying_deviation_:.3f}")
    cv = SoftConvClassifierCV(tyings=np.geomspace(10, 1e-5, 4), cv=3, selection="1se", **common)
    cv.fit(X_train, y_train)
    print(f"CV (1se)         tying={cv.tying_:.1e}: test accuracy={cv.score(X_test, y_test):.3f}  "
          f"tying_deviation_={cv.tying_deviation_:.3f}")
