"""softcnn: soft convolution — weight tying and locality as penalties, with a scikit-learn API."""

from .estimators import SoftConvClassifier, SoftConvRegressor
from .exceptions import DivergenceWarning
from .layers import SoftConv2d

__version__ = "0.1.0.dev0"

__all__ = ["SoftConvClassifier", "SoftConvRegressor", "SoftConv2d", "DivergenceWarning", "__version__"]
