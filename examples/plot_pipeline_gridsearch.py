"""
==========================================
Pipeline and GridSearchCV
==========================================

Soft-convolution estimators are ordinary scikit-learn estimators: they
``clone``, pickle, sit in a :class:`~sklearn.pipeline.Pipeline` and are tuned
by :class:`~sklearn.model_selection.GridSearchCV` like any other. Here a
scaler feeds a :class:`~softcnn.SoftConvClassifier` on flat 64-pixel digits
(``image_shape='auto'`` reshapes them to 8×8), and the grid searches the
*type* of tying penalty together with its strength.

For the strength alone, prefer :class:`~softcnn.SoftConvClassifierCV`: its
warm-started paths are much cheaper than independent cold fits.
"""

# %%
import pickle
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler

from softcnn import SoftConvClassifier

warnings.simplefilter("ignore", ConvergenceWarning)

X, y = load_digits(return_X_y=True)  # flat (1797, 64)
X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=500, test_size=500, stratify=y,
                                                    random_state=0)

pipe = make_pipeline(MinMaxScaler(), SoftConvClassifier(channels=4, max_iter=40, random_state=0))
grid = {
    "softconvclassifier__tying_penalty": ["l2", "l1"],
    "softconvclassifier__tying": [1e-3, 1e-1],
}
search = GridSearchCV(pipe, grid, cv=3, n_jobs=1).fit(X_train, y_train)

# %%
# The usual ``cv_results_``:
res = search.cv_results_
for params, mean, std, rank in zip(res["params"], res["mean_test_score"], res["std_test_score"],
                                   res["rank_test_score"]):
    print(f"rank {rank}: {params}  CV accuracy={mean:.3f} ± {std:.3f}")
print("best:", search.best_params_, f"test accuracy={search.score(X_test, y_test):.3f}")

# %%
# The fitted step exposes the diagnostics, and the whole pipeline pickles.
clf = search.best_estimator_[-1]
print(f"tying_deviation_={clf.tying_deviation_:.3f}  n_tied_positions_={clf.n_tied_positions_}  "
      f"n_params_={clf.n_params_}")
restored = pickle.loads(pickle.dumps(search.best_estimator_))
print("pickled predictions agree:", np.array_equal(restored.predict(X_test), search.predict(X_test)))
