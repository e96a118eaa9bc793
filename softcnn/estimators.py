"""scikit-learn estimators: :class:`SoftConvClassifier` and :class:`SoftConvRegressor`."""

from __future__ import annotations

import copy
import numbers
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_array, check_random_state, column_or_1d
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, check_scalar, validate_data

from . import diagnostics, limits
from ._validation import (
    check_positive_ints,
    flatten_images,
    resolve_device,
    resolve_image_shape,
    warn_device_fallback,
)
from .exceptions import DivergenceWarning
from .network import ACTIVATIONS, POOLINGS, SoftConvNet, to_hard_cnn
from .penalties import has_nonsmooth, make_penalties, preconditioner
from .solvers import Objective, SolverResult, fista, lbfgs, stochastic

__all__ = ["SoftConvClassifier", "SoftConvRegressor"]

_SOLVERS = ("auto", "lbfgs", "fista", "adam", "sgd")
#: solvers that see the whole (merged) data set at every step
_FULL_BATCH = ("lbfgs", "fista")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_MIXED_PRECISIONS = {"bfloat16": torch.bfloat16}
#: 'auto' solver: full-batch L-BFGS in float64 up to this many samples, Adam above.
LBFGS_MAX_SAMPLES = 5000
_PREDICT_BATCH = 4096


_BLAS_CONTROLLER = None


def _blas_controller() -> ThreadpoolController:
    """One controller per process: finding the BLAS libraries costs milliseconds, limiting them does not."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER


def _patience(n_iter_no_change: int, cap: int | None) -> int:
    """L-BFGS's ``n_iter_no_change``, at most ``cap`` (None: no cap)."""
    return n_iter_no_change if cap is None else min(n_iter_no_change, cap)


def _atomic_fit(method):
    """Run a fitting method so that a failure leaves the estimator exactly as it was."""

    def wrapper(self, *args, **kwargs):
        saved = self.__dict__.copy()
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = method.__name__, method.__doc__, method
    return wrapper


def _merge_duplicates(X: np.ndarray, y: np.ndarray, sw: np.ndarray):
    """Merge identical (x, y) samples, summing their weights; drop zero weights; sort canonically.

    The full-batch objective depends on the data only through this weighted
    empirical distribution, so the fit is unchanged, but it no longer depends
    on sample order, and weight 2 is bitwise the same as a repeated sample.
    """
    n = X.shape[0]
    joint = np.column_stack([X.reshape(n, -1), y.reshape(n, -1).astype(np.float64)])
    rows, inverse = np.unique(joint, axis=0, return_inverse=True)
    weights = np.bincount(inverse.ravel(), weights=sw, minlength=rows.shape[0])
    keep = weights > 0
    rows, weights = rows[keep], weights[keep]
    d = X[0].size
    y_new = rows[:, d:].astype(y.dtype).reshape(-1, *y.shape[1:])
    return rows[:, :d].reshape(-1, *X.shape[1:]), y_new, weights


@dataclass
class _FitProblem:
    """Everything a fit has prepared before its solver runs (see ``BaseSoftConv._prepare_fit``)."""

    objective: Objective
    solver: str
    incremental: bool
    reuse: bool
    hooks: list
    generator: torch.Generator
    validation_score: Callable[[], float] | None
    penalties: list
    arch: tuple
    image_shape: tuple
    n_outputs: int
    target_attrs: dict
    device: torch.device
    dtype: torch.dtype


class BaseSoftConv(BaseEstimator, metaclass=ABCMeta):
    """Shared machinery of the soft-convolution estimators (not for direct use)."""

    def __init__(
        self,
        channels=8,
        kernel_size=3,
        stride=1,
        padding="same",
        support="auto",
        pooling=None,
        activation="tanh",
        dense=(),
        tying=0.0,
        tying_penalty="l2",
        tying_graph="mean",
        locality=0.0,
        locality_penalty="l2",
        locality_profile="window",
        locality_power=1.0,
        loco_gamma=0.5,
        loco_eta=2.0,
        alpha=1e-4,
        channel_sparsity=0.0,
        sparsity=0.0,
        sparsity_penalty="l1",
        tl1_a=1.0,
        threshold=0.0,
        solver="auto",
        learning_rate=1e-3,
        batch_size="auto",
        max_iter=200,
        tol=1e-4,
        n_iter_no_change=10,
        early_stopping=False,
        validation_fraction=0.1,
        image_shape="auto",
        device="auto",
        dtype="auto",
        mixed_precision=None,
        random_state=None,
        n_init=1,
        verbose=0,
        warm_start=False,
    ):
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.support = support
        self.pooling = pooling
        self.activation = activation
        self.dense = dense
        self.tying = tying
        self.tying_penalty = tying_penalty
        self.tying_graph = tying_graph
        self.locality = locality
        self.locality_penalty = locality_penalty
        self.locality_profile = locality_profile
        self.locality_power = locality_power
        self.loco_gamma = loco_gamma
        self.loco_eta = loco_eta
        self.alpha = alpha
        self.channel_sparsity = channel_sparsity
        self.sparsity = sparsity
        self.sparsity_penalty = sparsity_penalty
        self.tl1_a = tl1_a
        self.threshold = threshold
        self.solver = solver
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.image_shape = image_shape
        self.device = device
        self.dtype = dtype
        self.mixed_precision = mixed_precision
        self.random_state = random_state
        self.n_init = n_init
        self.verbose = verbose
        self.warm_start = warm_start

    # ---------------------------------------------------------- task hooks
    @abstractmethod
    def _encode_targets(self, y, *, reset: bool, classes=None):
        """Validate y for the task; return (encoded y as ndarray, n_outputs, fitted attrs)."""

    @abstractmethod
    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
        """Per-sample loss (``reduction='none'``) or its mean (``'mean'``, one fused op)."""

    @abstractmethod
    def _target_tensor(self, y: np.ndarray, dtype, device) -> torch.Tensor:
        """Targets as the tensor the loss expects."""

    # ------------------------------------------------------- validation
    def _validate_hyperparameters(self) -> dict:
        """Check every parameter; return the resolved values the fit uses."""
        p = {}
        p["channels"] = check_positive_ints(self.channels, "channels")
        p["dense"] = check_positive_ints(self.dense, "dense", allow_empty=True)
        for name in ("kernel_size", "stride", "max_iter", "n_iter_no_change", "n_init"):
            check_scalar(getattr(self, name), name, numbers.Integral, min_val=1)
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same'; got {self.padding!r}.")
        if self.stride > 1 and self.padding == "same" and self.stride > self.kernel_size:
            raise ValueError("stride larger than kernel_size skips pixels; use stride <= kernel_size.")
        support = self.support
        if isinstance(support, str):
            if support not in ("auto", "full"):
                raise ValueError(f"support must be 'auto', 'full' or an int >= kernel_size; got {support!r}.")
            if support == "auto":
                support = self.kernel_size + 4
        else:
            check_scalar(support, "support", numbers.Integral, min_val=self.kernel_size)
        p["support"] = support
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be None, 'max' or 'avg'; got {self.pooling!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {self.activation!r}.")
        for name in ("locality_power", "loco_gamma", "loco_eta", "threshold"):
            check_scalar(getattr(self, name), name, numbers.Real, min_val=0)
        check_scalar(self.tl1_a, "tl1_a", numbers.Real, min_val=0, include_boundaries="neither")
        p["penalties"] = make_penalties(self.get_params())
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}; got {self.solver!r}.")
        if self.solver == "lbfgs" and has_nonsmooth(p["penalties"]):
            names = [type(pen).__name__ for _, pen in p["penalties"] if not pen.smooth]
            raise ValueError(
                f"solver='lbfgs' cannot fit the non-smooth penalties {names}; use solver='auto', "
                "'fista' (full batch) or 'adam'/'sgd' (proximal mini-batch steps)."
            )
        check_scalar(self.learning_rate, "learning_rate", numbers.Real, min_val=0, include_boundaries="neither")
        check_scalar(self.tol, "tol", numbers.Real, min_val=0)
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            check_scalar(self.batch_size, "batch_size", numbers.Integral, min_val=1)
        check_scalar(
            self.validation_fraction, "validation_fraction", numbers.Real, min_val=0, max_val=1,
            include_boundaries="neither",
        )
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'float64'; got {self.dtype!r}.")
        check_scalar(self.verbose, "verbose", numbers.Integral, min_val=0)
        p["device"] = resolve_device(self.device)
        p["autocast"] = self._check_mixed_precision(p["device"])
        return p

    def _check_mixed_precision(self, device: torch.device) -> torch.dtype | None:
        """The dtype the training forward is autocast to (None: none), checked against the other parameters."""
        if self.mixed_precision is None:
            return None
        if not (isinstance(self.mixed_precision, str) and self.mixed_precision in _MIXED_PRECISIONS):
            raise ValueError(f"mixed_precision must be None or 'bfloat16'; got {self.mixed_precision!r}.")
        if self.solver in _FULL_BATCH:
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} needs a mini-batch solver, but solver={self.solver!r}: "
                "its line search or backtracking compares exact objective values. Use solver='adam', 'sgd' "
                "or 'auto' (Adam with mixed precision), or mixed_precision=None."
            )
        if self.dtype == "float64":
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} keeps float32 parameters; dtype='float64' contradicts "
                "it. Use dtype='auto' or 'float32', or mixed_precision=None."
            )
        supported = torch.amp.is_autocast_available(device.type) and (
            device.type != "cuda" or torch.cuda.is_bf16_supported())
        if not supported:
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} is not supported on device {str(device)!r} (no "
                "bfloat16 autocast); use mixed_precision=None or another device."
            )
        return _MIXED_PRECISIONS[self.mixed_precision]

    def _resolve_solver(self, n_samples: int, *, incremental: bool, nonsmooth: bool = False) -> str:
        if incremental:
            if self.solver in _FULL_BATCH:
                raise ValueError(
                    f"partial_fit needs a stochastic solver but solver={self.solver!r}; use solver='adam' "
                    "or 'sgd'."
                )
            return "adam" if self.solver == "auto" else self.solver
        if self.solver != "auto":
            return self.solver
        if n_samples > LBFGS_MAX_SAMPLES or self.mixed_precision is not None:
            return "adam"
        return "fista" if nonsmooth else "lbfgs"

    def _resolve_dtype(self, solver: str, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            wants64 = solver in _FULL_BATCH and device.type != "mps"
            return torch.float64 if wants64 else torch.float32
        if self.dtype == "float64" and device.type == "mps":
            raise ValueError("MPS devices have no float64; use dtype='float32' or device='cpu'.")
        return _DTYPES[self.dtype]

    def _validate_X(self, X, *, reset: bool):
        """Validate X; return it as images ``(n, C, H, W)`` (NumPy float64)."""
        X2, implied = flatten_images(X)
        X2 = validate_data(self, X2, reset=reset, dtype=np.float64, ensure_min_features=1)
        if reset:
            shape = resolve_image_shape(self.image_shape, X2.shape[1], implied)
        else:
            shape = self.image_shape_
            if implied is not None and implied != shape:
                raise ValueError(
                    f"X has images of shape {implied} but this estimator was fitted on {shape}."
                )
        return X2.reshape(X2.shape[0], *shape), shape

    def _validate_sample_weight(self, sample_weight, X):
        sw = _check_sample_weight(sample_weight, X, dtype=np.float64)
        if np.any(sw < 0):
            raise ValueError(
                "sample_weight has negative values; weights must be >= 0 (drop the samples or "
                "set their weight to 0)."
            )
        if not np.any(sw > 0):
            raise ValueError("sample_weight is zero for every sample; at least one must be positive.")
        return sw

    # ------------------------------------------------------------ fitting
    def _architecture(self, p, image_shape, n_outputs):
        return (
            image_shape, p["channels"], self.kernel_size, self.stride, self.padding, p["support"],
            self.pooling, self.activation, p["dense"], n_outputs,
        )

    def _make_network(self, arch, generator) -> SoftConvNet:
        image_shape, channels, k, stride, padding, support, pooling, activation, dense, n_out = arch
        return SoftConvNet(
            image_shape, channels, k, stride=stride, padding=padding, support=support,
            pooling=pooling, activation=activation, dense=dense, n_outputs=n_out, generator=generator,
        )

    def _fit(self, X, y, sample_weight, *, incremental: bool, classes=None, _constrain=None):
        problem = self._prepare_fit(X, y, sample_weight, incremental=incremental, classes=classes,
                                    _constrain=_constrain)
        return self._finish_fit(problem, self._solve(problem))

    def _init_random_states(self, incremental: bool = False) -> list:
        """One ``random_state`` per initialisation a fit starts from (``n_init``; one for warm starts).

        Every initialisation sees the same random stream (the same validation
        split); ``_prepare_fit`` derives a different weight seed from ``init``.
        The first one is the caller's own state, so ``n_init=1`` is untouched.
        """
        check_scalar(self.n_init, "n_init", numbers.Integral, min_val=1)  # before it sizes anything
        n = 1 if incremental or (self.warm_start and hasattr(self, "network_")) else self.n_init
        if isinstance(self.random_state, np.random.RandomState):
            copies = [copy.deepcopy(self.random_state) for _ in range(n - 1)]
            return [self.random_state, *copies]
        return [self.random_state] * n

    def _prepare_fit(self, X, y, sample_weight, *, incremental: bool, classes=None, _constrain=None,
                     init: int = 0, random_state=None) -> _FitProblem:
        """Validate, build (or copy) the network and the objective; the estimator is not modified.

        ``init`` > 0 draws other initial weights (``n_init``) from ``random_state``
        (default: the estimator's).
        """
        p = self._validate_hyperparameters()
        fitted = hasattr(self, "network_")
        reuse = fitted and (incremental or self.warm_start)
        X, image_shape = self._validate_X(X, reset=not reuse)
        y, n_outputs, target_attrs = self._encode_targets(y, reset=not reuse, classes=classes)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}; they must match.")
        sw = self._validate_sample_weight(sample_weight, X)
        device = p["device"]
        proximal = has_nonsmooth(p["penalties"])
        solver = self._resolve_solver(X.shape[0], incremental=incremental, nonsmooth=proximal)
        dtype = self._resolve_dtype(solver, device)
        rng = check_random_state(self.random_state if random_state is None else random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        if init:
            seed = int(np.random.SeedSequence([seed, init]).generate_state(1)[0] % np.iinfo(np.int32).max)
        generator = torch.Generator().manual_seed(seed)

        arch = self._architecture(p, image_shape, n_outputs)
        if reuse:
            if arch != self._architecture_:
                raise ValueError(
                    "The architecture or data shape changed since the last fit, so the weights "
                    "cannot be reused; set warm_start=False (or refit from scratch)."
                )
            net = copy.deepcopy(self.network_)
        else:
            net = self._make_network(arch, generator)
        net = net.to(device=device, dtype=dtype)
        for layer in net.soft_layers:
            layer.set_scales(*preconditioner(layer, p["penalties"], uniform=proximal or solver == "fista"))
        # softcnn.limits freezes some entries at zero (gradient masks), removed after the fit
        hooks = _constrain(net) if _constrain is not None else []

        validation_score = None
        if self.early_stopping and not incremental:
            stratify = y if isinstance(self, ClassifierMixin) else None
            idx_train, idx_val = train_test_split(
                np.arange(X.shape[0]), test_size=self.validation_fraction, random_state=rng, stratify=stratify
            )
            X_val = torch.as_tensor(X[idx_val], dtype=dtype, device=device)
            y_val_t = self._target_tensor(y[idx_val], dtype, device)
            sw_val = torch.as_tensor(sw[idx_val], dtype=dtype, device=device)

            def validation_score():
                with torch.no_grad():
                    return -float((sw_val * self._loss(net(X_val), y_val_t)).sum() / sw_val.sum())

            X, y, sw = X[idx_train], y[idx_train], sw[idx_train]

        if solver in _FULL_BATCH:
            X, y, sw = _merge_duplicates(X, y, sw)

        objective = Objective(
            net,
            self._loss,
            torch.as_tensor(X, dtype=dtype, device=device),
            self._target_tensor(y, dtype, device),
            torch.as_tensor(sw, dtype=dtype, device=device),
            p["penalties"],
            autocast=p["autocast"],
        )
        return _FitProblem(
            objective=objective, solver=solver, incremental=incremental, reuse=reuse, hooks=hooks,
            generator=generator, validation_score=validation_score, penalties=p["penalties"], arch=arch,
            image_shape=image_shape, n_outputs=n_outputs, target_attrs=target_attrs, device=device, dtype=dtype,
        )

    def _solve(self, problem: _FitProblem, lbfgs_patience: int | None = None) -> SolverResult:
        """Run the problem's solver; ``lbfgs_patience`` caps L-BFGS's ``n_iter_no_change`` (path points)."""
        objective, solver = problem.objective, problem.solver
        params = [q for q in objective.net.parameters() if q.requires_grad]
        # numpy/scipy BLAS threads spin between the solver's small vector steps and starve
        # torch's own threads (6x slower fits on 2 cores); torch keeps its thread pool.
        with _blas_controller().limit(limits=1, user_api="blas"):
            if solver == "lbfgs":
                return lbfgs(objective, params, max_iter=self.max_iter, tol=self.tol,
                             n_iter_no_change=_patience(self.n_iter_no_change, lbfgs_patience), verbose=self.verbose)
            if solver == "fista":
                return fista(objective, params, max_iter=self.max_iter, tol=self.tol, verbose=self.verbose)
            n = objective.n_samples
            batch_size = min(200, n) if self.batch_size == "auto" else min(self.batch_size, n)
            return stochastic(
                objective, params, solver=solver, learning_rate=self.learning_rate, batch_size=batch_size,
                max_iter=1 if problem.incremental else self.max_iter, tol=self.tol,
                n_iter_no_change=self.n_iter_no_change, validation_score=problem.validation_score,
                generator=problem.generator,
                optimizer_state=(getattr(self, "_optimizer_state", None)
                                 if problem.reuse and problem.incremental else None),
                verbose=self.verbose,
            )

    def _finish_fit(self, problem: _FitProblem, result: SolverResult):
        """Make the solved network exact (finalize, snap) and set every fitted attribute at once."""
        net, objective, solver = problem.objective.net, problem.objective, problem.solver
        reuse, incremental = problem.reuse, problem.incremental
        for h in problem.hooks:
            h.remove()
        # exact structure: re-express the layers (model unchanged), then snap below threshold
        for layer in net.soft_layers:
            for _, pen in problem.penalties:
                pen.finalize(layer)
        n_snapped = sum(layer.snap(float(self.threshold)) for layer in net.soft_layers)
        # No extra pass over the data: L-BFGS's last value is J at the final weights (all of J
        # is smooth there); Adam/SGD report the last epoch's mean, as MLPClassifier does.
        known = solver in ("lbfgs", "adam", "sgd") and result.loss_curve and not n_snapped and not result.diverged
        final_loss = result.loss_curve[-1] if known else objective.total()
        for _, pen in problem.penalties:
            pen.clear_state()  # warm starts and caches (a TV dual: twice the deviations) end with the fit

        # Everything below only assigns: the estimator changes all at once.
        for name, value in problem.target_attrs.items():
            setattr(self, name, value)
        prev_curve = list(self.loss_curve_) if reuse and incremental else []
        self.network_ = net
        self._architecture_ = problem.arch
        self.image_shape_ = problem.image_shape
        self.n_outputs_ = problem.n_outputs
        self.device_ = str(problem.device)
        self.dtype_ = str(problem.dtype).replace("torch.", "")
        self.solver_ = solver
        self.penalties_ = problem.penalties
        self.n_snapped_ = n_snapped
        self.loss_curve_ = prev_curve + result.loss_curve
        self.loss_ = final_loss
        self.n_iter_ = (getattr(self, "n_iter_", 0) if reuse and incremental else 0) + result.n_iter
        self.validation_scores_ = result.validation_scores or None
        self.best_validation_score_ = max(result.validation_scores) if result.validation_scores else None
        self._optimizer_state = result.optimizer_state
        self._set_diagnostics()
        self.__dict__.pop("tying_max_", None)  # describes a previous fit; fit() sets it anew
        if result.diverged:
            warnings.warn(
                f"The training objective stopped being finite ({result.message}); the fit stopped "
                "and kept the last finite weights. Lower learning_rate, scale X (e.g. StandardScaler "
                "or pixels/255), or increase alpha.",
                DivergenceWarning,
                stacklevel=4,
            )
        elif not result.converged and not incremental:
            warnings.warn(
                f"{solver} did not converge in max_iter={self.max_iter} iterations "
                f"({result.message or 'stopping rule not met'}); increase max_iter or tol.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return self

    def _set_diagnostics(self) -> None:
        net = self.network_
        self.tying_deviation_ = diagnostics.tying_deviation(net)
        self.locality_ratio_ = diagnostics.locality_ratio(net)
        self.kernels_ = [diagnostics.layer_kernels(layer) for layer in net.soft_layers]
        self.shared_kernels_ = [diagnostics.layer_shared_kernels(layer) for layer in net.soft_layers]
        self.support_shapes_ = [layer.support_shape for layer in net.soft_layers]
        st = diagnostics.structure(net, odd_kernel_sizes=any(pen.odd_kernel_sizes for _, pen in self.penalties_))
        self.n_tied_positions_ = st["n_tied_positions"]
        self.kernel_sizes_ = st["kernel_sizes"]
        self.n_active_channels_ = st["n_active_channels"]
        self.n_params_ = st["n_params"]
        self.flops_ = st["flops"]

    @_atomic_fit
    def fit(self, X, y, sample_weight=None):
        """Fit the model to images X and targets y.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), (n_samples, H, W) or (n_samples, C, H, W)
            Images; 2-D X is reshaped with ``image_shape``.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights; the loss is their weighted mean.

        Returns
        -------
        self : object
        """
        if len(self._init_random_states()) > 1:
            from .batched import fit_together

            fit_together([self], [X], [y], [sample_weight])
        else:
            self._fit(X, y, sample_weight, incremental=False)
        if self.tying_penalty in ("l1", "group"):
            # after _fit: it needs the fitted network and all the caller's data (early_stopping splits them)
            self.tying_max_, self._tying_max_cache = limits._fitted_tying_max(
                self, X, y, sample_weight, cache=getattr(self, "_tying_max_cache", None)
            )
        return self

    # ---------------------------------------------------------- predicting
    def _forward(self, X) -> np.ndarray:
        """Network outputs ``(n, n_outputs)`` as float64 NumPy."""
        check_is_fitted(self)
        X, _ = self._validate_X(X, reset=False)
        net = self.network_
        param = next(net.parameters())
        outs = []
        net.eval()
        with torch.no_grad():
            for start in range(0, X.shape[0], _PREDICT_BATCH):
                xb = torch.as_tensor(X[start : start + _PREDICT_BATCH], dtype=param.dtype, device=param.device)
                outs.append(net(xb).cpu().to(torch.float64).numpy())
        return np.concatenate(outs) if outs else np.empty((0, self.n_outputs_))

    # -------------------------------------------------------------- export
    def to_torch(self, hard: bool = False) -> torch.nn.Sequential:
        """The fitted network as a torch module taking images ``(n, C, H, W)``.

        Parameters
        ----------
        hard : bool, default=False
            ``False``: a copy of the soft network. ``True``: the equivalent CNN,
            each soft-conv layer replaced by ``nn.ZeroPad2d`` + ``nn.Conv2d``
            with the mean kernel cropped to the nominal window; exact when
            the fit is at the CNN limit (strong tying and locality).

        Returns
        -------
        torch.nn.Sequential
            Outputs are scores: logits for a classifier (no softmax).
        """
        check_is_fitted(self)
        if hard:  # full rings: kernels are centred odd windows, so is each conv
            return to_hard_cnn(self.network_, odd_kernel_sizes=any(p.odd_kernel_sizes for _, p in self.penalties_))
        return copy.deepcopy(self.network_)

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        state = super().__getstate__()
        net = state.get("network_")
        if net is not None and next(net.parameters()).device.type != "cpu":
            state = dict(state)
            state["network_"] = copy.deepcopy(net).cpu()
            state["_optimizer_state"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "network_" in state:
            try:
                device = resolve_device(self.device_)
            except ValueError:
                warn_device_fallback(self.device_)
                device = torch.device("cpu")
                self.device_ = "cpu"
            self.network_ = self.network_.to(device)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


_PARAMS_DOC = r"""
    Parameters
    ----------
    channels : int or tuple of int, default=8
        Output channels of each soft-conv layer; a tuple stacks layers.
    kernel_size : int, default=3
        Nominal window ``k`` (the kernel of the CNN limit).
    stride : int, default=1
    padding : {'same', 'valid'}, default='same'
        Output positions as ``nn.Conv2d`` with this padding.
    support : 'auto', 'full' or int, default='auto'
        Offsets each unit sees: an ``S x S`` window centred on the nominal
        window, or the whole image. ``'auto'`` is ``kernel_size + 4`` (capped
        at the image), so locality has a ring of two pixels to act on and a
        28x28 fit costs about ``(k+4)^2/k^2`` times a CNN.
    pooling : {None, 'max', 'avg'}, default=None
        2x2 pooling after each soft-conv layer.
    activation : {'tanh', 'relu', 'logistic', 'identity'}, default='tanh'
        The smooth default keeps the objective differentiable, so L-BFGS
        converges reliably (ReLU kinks make full-batch fits land on
        different points from round-off-level differences).
    dense : tuple of int, default=()
        Hidden sizes of fully connected layers before the read-out.
    tying : float, default=0.0
        Tying strength; 0 is an unshared locally connected network, large
        values give a CNN.
    tying_penalty : {'l2', 'l1', 'group'}, default='l2'
        How a kernel difference is charged (see :mod:`softcnn.penalties`):
        ridge, lasso (exact ties per entry) or group lasso (whole positions
        tie). ``'l1'``/``'group'`` are non-smooth: proximal solvers, exact
        ties; :func:`softcnn.limits.tying_max` gives the strength where every
        deviation is zero.
    tying_graph : {'mean', 'grid', 'all'}, default='mean'
        Which kernels are compared: each with the shared kernel, 4-neighbours,
        or every pair (``'all'``, with ``tying_penalty='l1'`` only).
    locality : float, default=0.0
        Locality strength; with the ``'window'`` profile large values zero
        the weights outside the nominal window.
    locality_penalty : {'l2', 'l1', 'rings', 'full_rings'}, default='l2'
        ``'l1'``: profile-weighted lasso (exact zeros); ``'rings'``: group
        lasso over nested half-rings of the support (outer rings vanish
        first, each kernel picks its size; the profile is not used);
        ``'full_rings'``: the same over whole rings, so learned kernels are
        centred windows of odd size (odd ``kernel_size`` only).
    locality_profile : {'window', 'distance', 'loco'} or ndarray, default='window'
        Per-offset weights ``g(δ)``; an array must have the support's shape
        (``support_shapes_`` after a fit).
    locality_power : float, default=1.0
        Exponent of the ``'distance'`` profile.
    loco_gamma, loco_eta : float, default=0.5, 2.0
        Centre and corner weights of the ``'loco'`` profile.
    alpha : float, default=1e-4
        Ridge (weight decay) on all weights.
    channel_sparsity : float, default=0.0
        Group lasso per output channel of each soft-conv layer (all its
        weights and biases at every position): prunes whole channels.
    sparsity : float, default=0.0
        Penalty on every weight (soft-conv, dense and read-out layers;
        biases excluded), of kind ``sparsity_penalty``.
    sparsity_penalty : {'l1', 'tl1'}, default='l1'
        ``'l1'``: lasso; ``'tl1'``: transformed L1
        :math:`\rho_a(w) = (a+1)|w|/(a+|w|)` (nonconvex, closer to l0).
    tl1_a : float, default=1.0
        The ``a > 0`` of the transformed L1 (small: near l0, large: near l1).
    threshold : float, default=0.0
        After the fit, deviations and weights with magnitude below it are set
        to exactly 0 (exact ties, exact zeros); ``n_snapped_`` counts them.
        0 snaps nothing (proximal fits already give exact zeros and ties).
    solver : {'auto', 'lbfgs', 'fista', 'adam', 'sgd'}, default='auto'
        ``'auto'``: up to 5000 samples, L-BFGS in float64 (reliable at strong
        tying) or, when a non-smooth penalty is active, ``'fista'``
        (full-batch proximal gradient with backtracking and momentum,
        float64); above, Adam. Adam and SGD apply the non-smooth penalties'
        prox after every step (proximal Adam/SGD). ``'lbfgs'`` refuses
        non-smooth penalties.
    learning_rate : float, default=1e-3
        Step size of Adam and SGD.
    batch_size : int or 'auto', default='auto'
        ``min(200, n_samples)`` for 'auto'.
    max_iter : int, default=200
        Iterations (L-BFGS) or epochs (Adam, SGD).
    tol : float, default=1e-4
        Stopping tolerance. The fit stops when the training objective has not
        improved by at least ``tol`` for more than ``n_iter_no_change``
        consecutive iterations or epochs (``MLPClassifier``'s rule; for L-BFGS
        the improvement is measured relative to ``max(objective, 1)``), and
        also, for L-BFGS, once the gradient is small (below ``10 tol``) and
        the last step gained little; FISTA stops on its gradient mapping.
    n_iter_no_change : int, default=10
        Iterations (L-BFGS) or epochs (Adam, SGD) without ``tol`` improvement
        before stopping.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` and stop when its loss stops improving.
    validation_fraction : float, default=0.1
    image_shape : 'auto' or tuple, default='auto'
        ``(H, W)`` or ``(C, H, W)`` for 2-D X; ``'auto'`` is square
        grayscale when the feature count is a perfect square, otherwise one row.
    device : str, default='auto'
        ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'`` or ``'mps'``.
    dtype : {'auto', 'float32', 'float64'}, default='auto'
        ``'auto'``: float64 with L-BFGS, float32 with Adam/SGD.
    mixed_precision : {None, 'bfloat16'}, default=None
        ``'bfloat16'``: the training forward runs under :func:`torch.autocast`
        in bfloat16 (its matrix products, and so their gradients, in
        bfloat16; the loss, the penalties, their proxes, the optimizer and
        the float32 parameters as without it). Mini-batch solvers only: ``solver='auto'``
        then means Adam. Validation losses and predictions are computed in
        float32. Opt-in: on a CPU with bfloat16 instructions it measured
        ~20% faster fits with windowed supports at equal test accuracy, no
        reliable gain with ``support='full'`` (``benchmarks/bench_precision.py``);
        elsewhere it can be slower. float16 is not offered: on CPU it
        measured 3x slower, and it needs loss scaling.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial weights, batches and validation split; a fixed
        value makes CPU fits repeatable bit for bit.
    n_init : int, default=1
        Number of initial weights a cold fit starts from; the fit with the
        lowest training objective is kept (as ``GaussianMixture``). The first
        is the one ``n_init=1`` uses, so more never ends higher. With L-BFGS
        they are solved as one stacked model. Ignored by warm-started fits
        and ``partial_fit``: along a path only the first, cold, point uses it.
    verbose : int, default=0
        Progress bars (tqdm) when > 0.
    warm_start : bool, default=False
        Start from the previous fit's weights (the architecture must match).
"""

_ATTRS_DOC = r"""
    n_features_in_ : int
        Flattened number of features (``C * H * W``).
    feature_names_in_ : ndarray of str
        Names of features seen during fit (DataFrame input only).
    image_shape_ : tuple (C, H, W)
    network_ : SoftConvNet
        The fitted torch module.
    device_, dtype_, solver_ : str
        What the fit resolved ``device``, ``dtype`` and ``solver`` to.
    penalties_ : list of (float, Penalty)
        The active penalties and their strengths.
    loss_ : float
        Final training objective.
    loss_curve_ : list of float
        Objective per iteration (L-BFGS) or epoch.
    n_iter_ : int
    validation_scores_, best_validation_score_ : list of float, float or None
        Negative validation loss per epoch, with ``early_stopping``.
    n_snapped_ : int
        Entries set to 0 by ``threshold``.
    n_tied_positions_ : list of int
        Per soft-conv layer: positions whose kernels equal the shared kernel exactly.
    kernel_sizes_ : list of ndarray of int, shape (F,)
        Per layer and channel: size of the smallest centred window holding
        every nonzero weight (0: no weight).
    n_active_channels_ : list of int
        Per layer: channels with a nonzero weight or bias.
    n_params_ : int
        Free parameters after exact ties and zeros.
    flops_ : int
        Multiply-adds per sample of the equivalent network
        (:func:`softcnn.diagnostics.structure`).
    tying_deviation_ : float
        Share of kernel energy not explained by the shared kernel (0 = CNN).
    locality_ratio_ : float
        Share of weight energy outside the nominal windows.
    tying_max_ : float
        Smallest ``tying`` at which every deviation is exactly zero, the
        quantity of :func:`softcnn.limits.tying_max` computed from this fit:
        on the fitted network itself when it is already the tied (CNN)
        solution (every deviation zero, converged, all the data, no other
        non-smooth penalty), otherwise after a reference fit warm-started
        from it (at most about one more fit). As accurate as the fit (its
        ``tol``). Only defined when ``tying_penalty`` is 'l1' or 'group'.
    kernels_ : list of ndarray of shape (Lh, Lw, F, C, Sh, Sw)
        Per-position kernels of each soft-conv layer.
    shared_kernels_ : list of ndarray of shape (F, C, Sh, Sw)
        Mean kernel of each layer.
    support_shapes_ : list of tuple
        ``(Sh, Sw)`` support of each layer.
"""

_NOTES_DOC = r"""
    Notes
    -----
    Unit ``(p, f)`` of a soft-conv layer has its own weights
    ``w_p = m + d_p`` and bias. The objective is

    .. math::

        J = \frac{\sum_i s_i \ell(f(x_i), y_i)}{\sum_i s_i}
            + \text{tying}\,\Omega_{tie} + \text{locality}\,\Omega_{loc}
            + \text{channel\_sparsity}\,\Omega_{ch}
            + \text{sparsity}\,\Omega_{sp} + \alpha\,\Omega_{ridge},

    each :math:`\Omega` averaged over positions. The tying penalty charges
    ``w_p - m`` (``'mean'`` graph, ``m`` free), ``w_p - w_q`` for 4-neighbours
    (``'grid'``) or every pair (``'all'``), with a squared, absolute or
    Euclidean norm (``'l2'``, ``'l1'``, ``'group'``). The locality penalty is
    :math:`\sum g(\delta)\,\phi(w)` over offsets (``'l2'``, ``'l1'``) or a group
    lasso over nested rings (``'rings'``); :math:`\Omega_{ch}` is a group lasso
    per output channel and :math:`\Omega_{sp}` an l1 or transformed-l1 penalty
    on every weight. Smooth penalties train with L-BFGS or Adam, the others by
    proximal steps, so their zeros and ties are exact. ``tying = locality = 0``
    is a locally connected network; as both grow the model becomes a CNN,
    which :meth:`to_torch` with ``hard=True`` exports.
"""


class SoftConvClassifier(ClassifierMixin, BaseSoftConv):
    __doc__ = (
        """Soft-convolution classifier: a locally connected network softly tied into a CNN.

    Weight sharing and locality are penalties whose strengths (``tying``,
    ``locality``) are hyperparameters, like ridge's ``alpha``. Softmax
    (logistic for two classes) read-out, cross-entropy loss.
"""
        + _PARAMS_DOC
        + """
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
"""
        + _ATTRS_DOC
        + """
    See Also
    --------
    SoftConvRegressor : The same model with a linear read-out and squared error.
    sklearn.neural_network.MLPClassifier : A fully connected network.
"""
        + _NOTES_DOC
        + """
    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from softcnn import SoftConvClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = SoftConvClassifier(channels=4, tying=1.0, max_iter=50, random_state=0)
    >>> clf.fit(X[:300] / 16, y[:300]).score(X[300:400] / 16, y[300:400]) > 0.8
    True
    """
    )

    def _encode_targets(self, y, *, reset, classes=None):
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None."
            )
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if reset:
            encoder = LabelEncoder()
            if classes is not None:
                encoder.fit(classes)
                if not np.all(np.isin(y, encoder.classes_)):
                    raise ValueError(f"y contains labels not in classes={list(classes)}.")
            else:
                encoder.fit(y)
            n_classes = len(encoder.classes_)
            if n_classes < 2:
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes in the data, but the "
                    f"data contain only one class: {encoder.classes_[0]!r}. Check y (or the split)."
                )
            return encoder.transform(y), (1 if n_classes == 2 else n_classes), {"classes_": encoder.classes_}
        unseen = np.setdiff1d(y, self.classes_)
        if unseen.size:
            raise ValueError(f"y contains labels {unseen.tolist()} not seen in the first fit: {self.classes_}.")
        return np.searchsorted(self.classes_, y), self.n_outputs_, {}

    def _target_tensor(self, y, dtype, device):
        return torch.as_tensor(y, device=device)

    def _loss(self, outputs, targets, reduction="none"):
        if outputs.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(outputs[:, 0], targets.to(outputs.dtype), reduction=reduction)
        return F.cross_entropy(outputs, targets, reduction=reduction)

    @_atomic_fit
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch of the stochastic solver on (X, y), continuing a previous fit.

        Parameters
        ----------
        X, y, sample_weight
            As in :meth:`fit`.
        classes : array-like of shape (n_classes,), default=None
            All classes; required on the first call.

        Returns
        -------
        self : object
        """
        if not hasattr(self, "network_") and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        return self._fit(X, y, sample_weight, incremental=True, classes=classes)

    def decision_function(self, X):
        """Scores: logits ``(n_samples, n_classes)``, or ``(n_samples,)`` for two classes."""
        scores = self._forward(X)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X):
        """Class probabilities ``(n_samples, n_classes)``."""
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X):
        """Log class probabilities ``(n_samples, n_classes)``."""
        scores = torch.from_numpy(self._forward(X))
        if scores.shape[1] == 1:
            s = scores[:, 0]
            return torch.stack([F.logsigmoid(-s), F.logsigmoid(s)], dim=1).numpy()
        return torch.log_softmax(scores, dim=1).numpy()

    def predict(self, X):
        """Most probable class of each sample."""
        scores = self._forward(X)
        idx = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(1)
        return self.classes_[idx]


class SoftConvRegressor(RegressorMixin, BaseSoftConv):
    __doc__ = (
        """Soft-convolution regressor: a locally connected network softly tied into a CNN.

    Linear read-out (several outputs allowed), loss ``½‖y − f(x)‖²``.
"""
        + _PARAMS_DOC
        + """
    Attributes
    ----------"""
        + _ATTRS_DOC
        + """
    See Also
    --------
    SoftConvClassifier : The same model for classification.
    sklearn.linear_model.Ridge : Ridge regression on pixels, the ``channels``-free analogue.
"""
        + _NOTES_DOC
        + """
    Examples
    --------
    >>> import numpy as np
    >>> from softcnn import SoftConvRegressor
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(200, 6, 6))
    >>> y = X[:, 2:4, 2:4].sum(axis=(1, 2))
    >>> reg = SoftConvRegressor(channels=2, tying=1.0, random_state=0).fit(X, y)
    >>> reg.score(X, y) > 0.9
    True
    """
    )

    def _encode_targets(self, y, *, reset, classes=None):
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None."
            )
        y = check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
        if y.ndim > 2:
            raise ValueError(f"y must be 1-D or 2-D; got {y.ndim} dimensions.")
        y2 = y.reshape(-1, 1) if y.ndim == 1 else y
        if not reset and y2.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {y2.shape[1]} outputs but the first fit had {self.n_outputs_}.")
        return y2, y2.shape[1], {"_y_ndim": y.ndim} if reset else {}

    def _target_tensor(self, y, dtype, device):
        return torch.as_tensor(y, dtype=dtype, device=device)

    def _loss(self, outputs, targets, reduction="none"):
        per_sample = 0.5 * (outputs - targets).pow(2).sum(1)
        return per_sample.mean() if reduction == "mean" else per_sample

    @_atomic_fit
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch of the stochastic solver on (X, y), continuing a previous fit.

        Returns
        -------
        self : object
        """
        return self._fit(X, y, sample_weight, incremental=True)

    def predict(self, X):
        """Predicted targets ``(n_samples,)`` or ``(n_samples, n_outputs)``."""
        out = self._forward(X)
        return out[:, 0] if self._y_ndim == 1 else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

