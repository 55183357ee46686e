"""``KFOCLaplace`` and ``KFOCLLLaplace``: drop-ins for ``KronLaplace``/``KronLLLaplace``.

Registered with laplace-torch through their ``_key``, so that importing
``kfoc_backpack`` makes ``Laplace(..., hessian_structure="kfoc")`` work for
``subset_of_weights="all"`` and ``"last_layer"``. Everything after ``fit`` —
predictives, sampling, marginal likelihood, prior optimisation, damping, state
dicts — is laplace-torch's ``KronLaplace`` machinery on K-FOC's factors.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from laplace.baselaplace import KronLaplace
from laplace.curvature import CurvatureInterface, EFInterface
from laplace.lllaplace import KronLLLaplace
from laplace.utils import Kron, KronDecomposed
from laplace.utils.feature_extractor import FeatureExtractor
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from kfoc_backpack._compat import supported_kwargs
from kfoc_backpack.extensions.accumulate import DEFAULT_MAX_MEMORY
from kfoc_backpack.laplace.aggregate import Prior, check_aggregation, fit_factors
from kfoc_backpack.laplace.backend import (
    KFOCBackend,
    KFOCEFBackend,
    KFOCKronMixin,
    batch_inputs,
    check_supported_layers,
    zero_block,
)


def resolve_backend(backend: type[CurvatureInterface] | None) -> type[KFOCKronMixin]:
    """Return the backend class a K-FOC Laplace uses for ``backend``.

    ``None`` gives :class:`KFOCBackend`; subclasses of :class:`KFOCBackend` or
    :class:`KFOCEFBackend` are used as they are. Another GGN backend (e.g. ``AsdlGGN``,
    which ``marglik_training`` passes on) is replaced by ``KFOCBackend``, an
    empirical-Fisher backend (``CurvlinopsEF``, ``AsdlEF``, ``BackPackEF``) by
    ``KFOCEFBackend``, with a warning naming the replacement: K-FOC's factors come
    from its own collection of per-sample quantities.

    Raises:
        ValueError: For something that is not a laplace-torch curvature class.
    """
    if backend is None:
        return KFOCBackend
    if not isinstance(backend, type) or not issubclass(backend, CurvatureInterface):
        raise ValueError(f"backend must be a laplace-torch curvature class, got {backend!r}.")
    if issubclass(backend, KFOCKronMixin):
        return backend
    ours = KFOCEFBackend if issubclass(backend, EFInterface) else KFOCBackend
    warnings.warn(
        f"hessian_structure='kfoc' computes its curvature with {ours.__name__}; "
        f"backend={backend.__name__} is replaced by {ours.__name__}.",
        UserWarning,
        stacklevel=4,
    )
    return ours


def kfoc_zero_kron(params: list[Tensor], device: torch.device, dtype: torch.dtype) -> Kron:
    """Zero ``Kron`` for ``params`` (any weight dimension, e.g. ``Conv3d``)."""
    return Kron([[b.to(device, dtype) for b in zero_block(p)] for p in params])


class KFOCLaplace(KronLaplace):
    """Kronecker-factored Laplace with K-FOC's Frobenius-optimal factors.

    A drop-in for ``KronLaplace`` (``Laplace(model, likelihood, "all", "kfoc")``):
    the same arguments and features, plus the aggregation over batches.

    Args:
        model: Any ``nn.Module``; layers with trainable parameters must be
            ``Linear``, ``Conv1d``, ``Conv2d`` or ``Conv3d`` (freeze the others, e.g.
            BatchNorm, LayerNorm, attention projections).
        likelihood: ``"classification"`` or ``"regression"``.
        sigma_noise: Observation noise (regression).
        prior_precision: Scalar or per-layer prior precision.
        prior_mean: Prior mean.
        temperature: Likelihood temperature.
        enable_backprop: Keep the graph through the predictive.
        dict_key_x: Key of the model input in dict-like batches.
        dict_key_y: Key of the targets in dict-like batches.
        backend: :class:`KFOCBackend` (default, GGN or MC Fisher) or
            :class:`KFOCEFBackend` (empirical Fisher), or a subclass; laplace-torch's
            GGN backends are replaced by the first, its empirical-Fisher backends
            (``CurvlinopsEF``, ``AsdlEF``, ``BackPackEF``) by the second, with a
            warning.
        damping: Add ``√δ`` to each factor's eigenvalues (see ``KronLaplace``).
        backend_kwargs: Passed to the backend, e.g. ``{"stochastic": True}``.
        asdl_fisher_kwargs: Accepted for signature compatibility; unused.
        aggregation: How the per-batch curvature is aggregated over the data set:
            ``"running"`` (default, the paper's K-FOC_running: after each batch the
            optimal product of the estimate so far plus the batch), ``"approx"``
            (K-FOC_approx: factor-wise sums, what ``KronLaplace`` with
            ``KFOCBackend`` does) or ``"optimal"`` (the Frobenius-optimal factors of
            the whole data set: power iterations over the data, warm-started from
            ``"running"``).
        tol: Power-method tolerance of ``"optimal"``.
        max_passes: Cap on the power iterations (terms in memory) or passes over
            the data (streaming) of ``"optimal"``.
        store_terms: ``"optimal"`` keeps the per-sample terms in memory (``True``),
            streams over the data (``False``) or decides by ``max_memory`` (``None``).
        max_memory: Byte budget for the per-sample terms of ``"optimal"``.

    Raises:
        ValueError: For an unknown ``aggregation`` or an empirical-Fisher backend.
        NotImplementedError: For a trainable layer without K-FOC factors.
    """

    _key = ("all", "kfoc")

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        aggregation: str = "running",
        tol: float = 1e-6,
        max_passes: int = 50,
        store_terms: bool | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ):
        self._set_kfoc_options(aggregation, tol, max_passes, store_terms, max_memory)
        kwargs = {
            "sigma_noise": sigma_noise,
            "prior_precision": prior_precision,
            "prior_mean": prior_mean,
            "temperature": temperature,
            "enable_backprop": enable_backprop,
            "dict_key_x": dict_key_x,
            "dict_key_y": dict_key_y,
            "backend": resolve_backend(backend),
            "damping": damping,
            "backend_kwargs": backend_kwargs,
            "asdl_fisher_kwargs": asdl_fisher_kwargs,
        }
        super().__init__(model, likelihood, **supported_kwargs(KronLaplace.__init__, kwargs))
        self._check_supported()

    def _set_kfoc_options(
        self,
        aggregation: str,
        tol: float,
        max_passes: int,
        store_terms: bool | None,
        max_memory: int,
    ) -> None:
        self.aggregation = check_aggregation(aggregation)
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol!r}.")
        if int(max_passes) != max_passes or max_passes < 1:
            raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}.")
        self.tol, self.max_passes = tol, int(max_passes)
        self.store_terms, self.max_memory = store_terms, max_memory

    def _check_supported(self) -> None:
        """Reject trainable layers without K-FOC factors, before any work."""
        check_supported_layers(self.model, type(self).__name__)

    def _check_dtype(self) -> None:
        """Reject half precisions, which laplace-torch's eigendecomposition cannot take.

        laplace-torch's ``KronDecomposed`` calls ``torch.linalg.eigh``, which has no
        float16/bfloat16 kernels, and on failure ends the process; this raises first.
        """
        if self._dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"{type(self).__name__}: the model's parameters are {self._dtype}; "
                "laplace-torch's Kronecker eigendecomposition needs float32 or float64. "
                "Fit on a float32 copy (model.float()) and cast the inputs alike."
            )

    def _init_H(self) -> None:
        self.H = kfoc_zero_kron(self.params, self._device, self._dtype)

    def _check_batch(self, X: Tensor, y: Tensor) -> None:
        if self.likelihood == "regression" and y.ndim != self._out_ndim:
            raise ValueError(
                f"The model's output has {self._out_ndim} dims but the target has {y.ndim} dims."
            )

    def _raw_prior(self, names: list[str]) -> Prior:
        """Return the fitted factors without the likelihood factor (online update)."""
        factor = float(self.backend.factor)
        prior = {}
        for name, block in zip(names, self.H_facs.kfacs):
            scale = factor ** (1 / len(block))
            prior[name] = ([b / scale for b in block], self.n_data)
        return prior

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Fit the K-FOC Laplace approximation at the current parameters.

        Args:
            train_loader: Batches ``(X, y)`` or dict-like batches (the whole mapping
                is the model input, ``batch[dict_key_y]`` the targets);
                ``len(train_loader.dataset)`` (or, without a ``dataset``, the number
                of inputs seen) is ``N``.
            override: Start afresh (``True``) or add the data to the current fit
                (online learning): the earlier factors enter the aggregation as one
                more Kronecker term (``"running"``/``"optimal"``: optimally merged;
                ``"approx"``: factor-wise sums, as ``KronLaplace`` does).
            progress_bar: Show a tqdm progress bar.

        Raises:
            ValueError: For malformed batches or a one-output classifier (before any
                curvature is computed).
            TypeError: For a float16/bfloat16 model.
            NotImplementedError: For a trainable layer without K-FOC factors.
            FloatingPointError: For NaN/Inf in the input, the output or a layer.
        """
        self._check_supported()
        self._check_dtype()
        X0, _ = batch_inputs(
            next(iter(train_loader)), self.dict_key_x, self.dict_key_y, type(self).__name__
        )
        online = not override and self.H_facs is not None
        if not online:
            self.H_facs = None
            self._init_H()
            self.loss, self.n_data = 0, 0
        self.model.eval()
        self.mean = parameters_to_vector(self.params)
        if not self.enable_backprop:
            self.mean = self.mean.detach()
        with torch.no_grad():
            if not isinstance(X0, Tensor):
                out = self.model(X0)
            else:
                try:
                    out = self.model(X0[:1].to(self._device))
                except (TypeError, AttributeError):
                    out = self.model(X0.to(self._device))
        self.n_outputs = out.shape[-1]
        self._out_ndim = out.ndim
        self.model.output_size = self.n_outputs
        if self.likelihood == "classification" and self.n_outputs == 1:
            raise ValueError(
                f"{type(self).__name__}: likelihood='classification' with a single output "
                "unit: the softmax over one class is 1 for every input, so the likelihood "
                "has no curvature. Give the model one output per class (two for a binary "
                "problem) or use likelihood='regression'."
            )

        backend = self.backend
        prior = self._raw_prior(list(backend.named_trainable)) if online else None
        loss, blocks, num_samples = fit_factors(
            backend,
            train_loader,
            self.aggregation,
            prior=prior,
            check_batch=self._check_batch,
            progress_bar=progress_bar or getattr(self, "_progress_bar", False),
            tol=self.tol,
            max_passes=self.max_passes,
            store_terms=self.store_terms,
            max_memory=self.max_memory,
            owner=type(self).__name__,
        )
        self.loss = self.loss + backend.factor * loss
        dataset = getattr(train_loader, "dataset", None)
        self.n_data += len(dataset) if dataset is not None else num_samples
        self.H_facs = Kron([[b.to(self._dtype) for b in block] for block in blocks]) * float(
            backend.factor
        )
        self.H = self.H_facs.decompose(damping=self.damping)

    @property
    def posterior_precision(self) -> KronDecomposed:
        """Kronecker-factored posterior precision ``H · factor + P₀``, damping kept.

        laplace-torch's ``KronDecomposed`` arithmetic (``*``, ``+``) returns objects
        without ``damping``, so ``KronLaplace(damping=True)`` is undamped in practice;
        here the flag is carried over.
        """
        self._check_H_init()
        precision = self.H * self._H_factor + self.prior_precision
        precision.damping = self.damping
        return precision

    def state_dict(self) -> dict[str, Any]:
        """``KronLaplace``'s state dict plus the aggregation."""
        state = super().state_dict()
        state["aggregation"] = self.aggregation
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same class (warns on another aggregation)."""
        saved = state_dict.get("aggregation", self.aggregation)
        if saved != self.aggregation:
            warnings.warn(
                f"Loading factors aggregated with {saved!r} into a {type(self).__name__} "
                f"with aggregation={self.aggregation!r}; online fits continue with "
                f"{self.aggregation!r}.",
                UserWarning,
                stacklevel=2,
            )
        super().load_state_dict(state_dict)


class KFOCLLLaplace(KronLLLaplace, KFOCLaplace):
    """Last-layer Laplace with K-FOC factors, a drop-in for ``KronLLLaplace``.

    ``Laplace(model, likelihood, "last_layer", "kfoc")``. Unlike ``KronLLLaplace``
    (whose ``damping`` is silently dropped), ``damping=True`` is kept. The backbone
    may contain any layers; the last layer must be ``Linear``.

    Args:
        model: The model.
        likelihood: ``"classification"`` or ``"regression"``.
        sigma_noise: Observation noise (regression).
        prior_precision: Scalar or per-layer prior precision.
        prior_mean: Prior mean.
        temperature: Likelihood temperature.
        enable_backprop: Keep the graph through the predictive.
        feature_reduction: See ``KronLLLaplace``.
        dict_key_x: Key of the model input in dict-like batches.
        dict_key_y: Key of the targets in dict-like batches.
        backend: As for :class:`KFOCLaplace`.
        last_layer_name: Name of the last layer (default: found on the first fit).
        damping: Add ``√δ`` to each factor's eigenvalues.
        backend_kwargs: Passed to the backend, e.g. ``{"stochastic": True}``.
        asdl_fisher_kwargs: Must be ``None`` (as for ``KronLLLaplace``).
        aggregation: ``"running"`` (default), ``"approx"`` or ``"optimal"``, see
            :class:`KFOCLaplace`.
        tol: Power-method tolerance of ``"optimal"``.
        max_passes: Cap on iterations/passes of ``"optimal"``.
        store_terms: Keep per-sample terms of ``"optimal"`` in memory (``None``: if
            they fit into ``max_memory`` bytes).
        max_memory: Byte budget for the per-sample terms of ``"optimal"``.
    """

    _key = ("last_layer", "kfoc")

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        last_layer_name: str | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        aggregation: str = "running",
        tol: float = 1e-6,
        max_passes: int = 50,
        store_terms: bool | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ):
        self._set_kfoc_options(aggregation, tol, max_passes, store_terms, max_memory)
        options = (self.aggregation, self.tol, self.max_passes, self.store_terms, max_memory)
        kwargs = {
            "sigma_noise": sigma_noise,
            "prior_precision": prior_precision,
            "prior_mean": prior_mean,
            "temperature": temperature,
            "enable_backprop": enable_backprop,
            "feature_reduction": feature_reduction,
            "dict_key_x": dict_key_x,
            "dict_key_y": dict_key_y,
            "backend": backend,
            "last_layer_name": last_layer_name,
            "damping": damping,
            "backend_kwargs": backend_kwargs,
            "asdl_fisher_kwargs": asdl_fisher_kwargs,
        }
        super().__init__(model, likelihood, **supported_kwargs(KronLLLaplace.__init__, kwargs))
        # LLLaplace.__init__ re-runs KFOCLaplace.__init__ with its defaults: restore.
        self.damping = damping
        self._set_kfoc_options(*options)
        self._check_supported()

    def fit(
        self, train_loader: DataLoader, override: bool = True, progress_bar: bool = False
    ) -> None:
        """Fit as ``KronLLLaplace.fit`` does, keeping ``progress_bar``.

        laplace-torch 0.2.2.x's ``LLLaplace.fit`` drops ``progress_bar`` on its way to
        the parametric fit (see ``kfoc_backpack._compat``); it is carried here.
        """
        self._progress_bar = progress_bar
        try:
            super().fit(train_loader, override=override, progress_bar=progress_bar)
        finally:
            self._progress_bar = False

    def _check_supported(self) -> None:
        """Check the last layer once it is known (the backbone is not differentiated)."""
        model = self.model
        if isinstance(model, FeatureExtractor) and model.last_layer is not None:
            check_supported_layers(model.last_layer, type(self).__name__)

    def _last_layer_params(self) -> list[Tensor]:
        return [p for p in self.model.last_layer.parameters() if p.requires_grad]

    def _init_H(self) -> None:
        self.H = kfoc_zero_kron(self._last_layer_params(), self._device, self._dtype)

    @property
    def prior_precision_diag(self) -> Tensor:
        """Diagonal prior precision from a scalar, per-layer or diagonal prior.

        ``KronLLLaplace`` accepts a per-layer prior (weight, bias) in its setter but
        fails on it here; K-FOC's last-layer Laplace supports it.
        """
        prior = self.prior_precision
        if prior.numel() not in (1, self.n_params) and prior.numel() == self.n_layers:
            sizes = [p.numel() for p in self._last_layer_params()]
            return torch.cat(
                [value * torch.ones_like(prior[:1]).expand(n) for value, n in zip(prior, sizes)]
            )
        return super().prior_precision_diag
