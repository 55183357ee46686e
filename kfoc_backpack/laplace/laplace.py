"""``KFOCLaplace`` and ``KFOCLLLaplace``: drop-ins for ``KronLaplace``/``KronLLLaplace``.

Registered with laplace-torch through their ``_key``, so that importing
``kfoc_backpack`` makes ``Laplace(..., hessian_structure="kfoc")`` work for
``subset_of_weights="all"`` and ``"last_layer"``. Everything after ``fit`` —
predictives, sampling, marginal likelihood, prior optimisation, damping, state
dicts — is laplace-torch's ``KronLaplace`` machinery on K-FOC's factors; what K-FOC
overrides is in :class:`~kfoc_backpack.laplace.fit.KFOCKronFit`.

Index conventions: ``N`` inputs of the data set, ``L_out``/``R_in`` a weight's factors.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from laplace.baselaplace import KronLaplace
from laplace.curvature import CurvatureInterface, EFInterface
from laplace.lllaplace import KronLLLaplace
from laplace.utils.feature_extractor import FeatureExtractor
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kfoc_backpack._compat import supported_kwargs
from kfoc_backpack.dataset.options import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PASSES,
    DEFAULT_OPTIMAL_TOL,
    OptimalOptions,
)
from kfoc_backpack.laplace.approximation import (
    Approximation,
    EigenCorrection,
    KFACFactors,
    KFOCFactors,
)
from kfoc_backpack.laplace.backend import (
    KFOCBackend,
    KFOCEFBackend,
    KFOCKronMixin,
    check_supported_layers,
)
from kfoc_backpack.laplace.fit import KFOCKronFit, kfoc_zero_kron


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


class KFOCLaplace(KFOCKronFit):
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
        process_group: The ``torch.distributed`` group whose ranks' shards ``fit``
            combines (default: the whole world when ``torch.distributed`` is
            initialised; without it the fit is local), see docs/conventions.md §8.

    Raises:
        ValueError: For an unknown ``aggregation`` or invalid options.
        NotImplementedError: For a trainable layer without K-FOC factors.
    """

    _key = ("all", "kfoc")

    _approximation = staticmethod(KFOCFactors)
    """The class's :class:`~kfoc_backpack.laplace.approximation.Approximation` from the
    aggregation arguments (each sibling class has its own)."""

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
        tol: float = DEFAULT_OPTIMAL_TOL,
        max_passes: int = DEFAULT_MAX_PASSES,
        store_terms: bool | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
        process_group: object | None = None,
    ):
        options = OptimalOptions(tol, max_passes, store_terms, max_memory)
        self._set_approximation(self._approximation(aggregation, options), damping, process_group)
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


class KFOCLLLaplace(KronLLLaplace, KFOCKronFit):
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
        process_group: As for :class:`KFOCLaplace`; with ``last_layer_name=None``
            every rank's shard needs a batch to find the last layer.
    """

    _key = ("last_layer", "kfoc")
    _approximation = staticmethod(KFOCFactors)

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
        tol: float = DEFAULT_OPTIMAL_TOL,
        max_passes: int = DEFAULT_MAX_PASSES,
        store_terms: bool | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
        process_group: object | None = None,
    ):
        options = OptimalOptions(tol, max_passes, store_terms, max_memory)
        self._set_approximation(self._approximation(aggregation, options), damping, process_group)
        kwargs = {
            "sigma_noise": sigma_noise,
            "prior_precision": prior_precision,
            "prior_mean": prior_mean,
            "temperature": temperature,
            "enable_backprop": enable_backprop,
            "feature_reduction": feature_reduction,
            "dict_key_x": dict_key_x,
            "dict_key_y": dict_key_y,
            "backend": resolve_backend(backend),
            "last_layer_name": last_layer_name,
            "damping": damping,
            "backend_kwargs": backend_kwargs,
            "asdl_fisher_kwargs": asdl_fisher_kwargs,
        }
        super().__init__(model, likelihood, **supported_kwargs(KronLLLaplace.__init__, kwargs))
        self.damping = damping  # KronLLLaplace does not pass damping on to KronLaplace
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


# --------------------------------------------------------------------------------------
# Eigenvalue-corrected siblings: the same classes with another approximation
# --------------------------------------------------------------------------------------

AGGREGATION_ARGUMENTS = ("aggregation", "tol", "max_passes", "store_terms", "max_memory")
"""Arguments of K-FOC's aggregation, which K-FAC's factors (sums over batches) do not take."""


def _without_aggregation(owner: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse K-FOC's aggregation arguments for a K-FAC basis, naming them."""
    given = [name for name in AGGREGATION_ARGUMENTS if name in kwargs]
    if given:
        raise TypeError(
            f"{owner}: {', '.join(given)} set K-FOC's aggregation over batches; K-FAC's "
            "factors are sums over the batches and take none. Use "
            "hessian_structure='ekfoc' for the eigenvalue-corrected K-FOC."
        )
    return kwargs


def _corrected_kfoc(aggregation: str, options: OptimalOptions) -> Approximation:
    return EigenCorrection(KFOCFactors(aggregation, options))


def _corrected_kfac(aggregation: str, options: OptimalOptions) -> Approximation:
    return EigenCorrection(KFACFactors())


class EKFOCLaplace(KFOCLaplace):
    r"""Eigenvalue-corrected K-FOC Laplace: ``Laplace(model, likelihood, "all", "ekfoc")``.

    Per weight the posterior precision is
    ``(U_L ⊗ U_R) diag(vec(S) + δ) (U_L ⊗ U_R)ᵀ``: the eigenbasis of K-FOC's data-set
    factors (aggregated as ``aggregation`` says) and ``S``, the exact diagonal of the
    data set's curvature block in that basis (one more pass over the data, under the
    same Monte-Carlo labels) — the Frobenius-nearest matrix with that eigenbasis, so
    never farther from the block than K-FOC's ``L ⊗ R``, and trace-exact. Biases are
    exact. ``la.H`` is an
    :class:`~kfoc_backpack.laplace.eigen_corrected.EigenCorrectedDecomposed` (laplace-torch's
    ``KronDecomposed`` interface), ``la.H_facs`` K-FOC's factors. Arguments as
    :class:`KFOCLaplace`; ``damping=True`` is refused (no factor eigenvalues to damp).
    """

    _key = ("all", "ekfoc")
    _approximation = staticmethod(_corrected_kfoc)


class EKFACLaplace(KFOCLaplace):
    """EK-FAC Laplace: ``Laplace(model, likelihood, "all", "ekfac")``.

    As :class:`EKFOCLaplace` in the eigenbasis of K-FAC's factors (KFC for weights
    shared over positions) of the same per-sample quantities — the reference for the
    eigenvalue-corrected K-FOC. Arguments as :class:`KFOCLaplace` without the
    aggregation ones (``aggregation``, ``tol``, ``max_passes``, ``store_terms``,
    ``max_memory``), which raise a ``TypeError``.
    """

    _key = ("all", "ekfac")
    _approximation = staticmethod(_corrected_kfac)

    def __init__(self, model: nn.Module, likelihood: str, **kwargs: Any):
        super().__init__(model, likelihood, **_without_aggregation(type(self).__name__, kwargs))


class EKFOCLLLaplace(KFOCLLLaplace):
    """Last-layer eigenvalue-corrected K-FOC: ``Laplace(model, likelihood, "last_layer", "ekfoc")``.

    :class:`EKFOCLaplace` on the last layer; arguments as :class:`KFOCLLLaplace`.
    """

    _key = ("last_layer", "ekfoc")
    _approximation = staticmethod(_corrected_kfoc)


class EKFACLLLaplace(KFOCLLLaplace):
    """Last-layer EK-FAC: ``Laplace(model, likelihood, "last_layer", "ekfac")``.

    :class:`EKFACLaplace` on the last layer; arguments as :class:`KFOCLLLaplace`
    without the aggregation ones.
    """

    _key = ("last_layer", "ekfac")
    _approximation = staticmethod(_corrected_kfac)

    def __init__(self, model: nn.Module, likelihood: str, **kwargs: Any):
        super().__init__(model, likelihood, **_without_aggregation(type(self).__name__, kwargs))
