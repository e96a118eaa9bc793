"""softcnn: soft convolution — weight tying and locality as penalties, with a scikit-learn API."""

from .cv import SoftConvClassifierCV, SoftConvRegressorCV
from .estimators import SoftConvClassifier, SoftConvRegressor
from .exceptions import DivergenceWarning
from .layers import SoftConv2d
from .path import SoftConvPath, soft_conv_path

__version__ = "0.1.0.dev0"

__all__ = [
    "SoftConvClassifier",
    "SoftConvRegressor",
    "SoftConvClassifierCV",
    "SoftConvRegressorCV",
    "SoftConv2d",
    "SoftConvPath",
    "soft_conv_path",
    "DivergenceWarning",
    "__version__",
]
