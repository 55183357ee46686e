"""The registered Laplace classes: one per approximation, for all weights and the last layer.

Each class is a :class:`~kfoc_backpack.laplace.base.BlockLaplace` with laplace-torch's
``_key`` (so that importing ``kfoc_backpack`` makes ``Laplace(..., hessian_structure=...)``
find it) and the :mod:`kfoc_backpack.dataset` approximation it fits; its arguments are
laplace-torch's ``KronLaplace`` (``KronLLLaplace``) ones, the approximation's own and
``process_group``. Everything after ``fit`` — predictives, sampling, marginal
likelihood, prior optimisation, damping, state dicts — is laplace-torch's ``KronLaplace``
machinery on the typed blocks. A new approximation registers here with two short
classes.

Index conventions: ``N`` inputs of the data set, ``L_out``/``R_in`` a weight's factors.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from laplace.lllaplace import KronLLLaplace
from laplace.utils.feature_extractor import FeatureExtractor
from torch import Tensor
from torch.utils.data import DataLoader

from kfoc_backpack.dataset import EKFACFactors, EKFOCFactors, KFACFactors, KFOCFactors
from kfoc_backpack.laplace.backend import check_supported_layers
from kfoc_backpack.laplace.base import LAPLACE_ARGUMENTS, BlockLaplace, zero_kron

LAST_LAYER_ARGUMENTS = {
    **{k: LAPLACE_ARGUMENTS[k] for k in list(LAPLACE_ARGUMENTS)[:5]},
    "feature_reduction": None,
    **{k: LAPLACE_ARGUMENTS[k] for k in ("dict_key_x", "dict_key_y", "backend")},
    "last_layer_name": None,
    **{k: LAPLACE_ARGUMENTS[k] for k in ("damping", "backend_kwargs", "asdl_fisher_kwargs")},
}
"""laplace-torch's ``KronLLLaplace`` arguments after ``model`` and ``likelihood``, in order."""


class BlockLLLaplace(KronLLLaplace, BlockLaplace):
    """A :class:`BlockLaplace` of the last layer, a drop-in for ``KronLLLaplace``.

    Unlike ``KronLLLaplace`` (whose ``damping`` is silently dropped), ``damping=True`` is
    kept; a per-layer prior precision (weight, bias) works. The backbone may contain any
    layers; the last layer must be ``Linear``. With ``process_group`` and
    ``last_layer_name=None`` every rank's shard needs a batch to find the last layer.
    """

    _key = None
    laplace_base: ClassVar[type] = KronLLLaplace
    laplace_arguments: ClassVar[dict[str, object]] = LAST_LAYER_ARGUMENTS

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
        self.H = zero_kron(self._last_layer_params(), self._device, self._dtype)

    @property
    def prior_precision_diag(self) -> Tensor:
        """Diagonal prior precision from a scalar, per-layer or diagonal prior.

        ``KronLLLaplace`` accepts a per-layer prior (weight, bias) in its setter but
        fails on it here; the last-layer classes of this package support it.
        """
        prior = self.prior_precision
        if prior.numel() not in (1, self.n_params) and prior.numel() == self.n_layers:
            sizes = [p.numel() for p in self._last_layer_params()]
            return torch.cat(
                [value * torch.ones_like(prior[:1]).expand(n) for value, n in zip(prior, sizes)]
            )
        return super().prior_precision_diag


class KFOCLaplace(BlockLaplace):
    """K-FOC's Kronecker-factored Laplace: ``Laplace(model, likelihood, "all", "kfoc")``.

    A drop-in for ``KronLaplace``: the same arguments and features, plus K-FOC's
    aggregation over batches (:class:`~kfoc_backpack.dataset.KFOCFactors`:
    ``aggregation``, ``tol``, ``max_passes``, ``store_terms``, ``max_memory``) and
    ``process_group`` (the ``torch.distributed`` group whose ranks' shards ``fit``
    combines; default: the whole world when initialised, docs/conventions.md §8).
    ``backend`` is :class:`~kfoc_backpack.laplace.KFOCBackend` (default: GGN, or the
    Monte-Carlo Fisher with ``backend_kwargs={"stochastic": True}``) or
    :class:`~kfoc_backpack.laplace.KFOCEFBackend` (empirical Fisher); laplace-torch's
    GGN backends are replaced by the first, its empirical-Fisher backends by the second,
    with a warning. Trainable layers must be ``Linear``, ``Conv1d``, ``Conv2d`` or
    ``Conv3d`` (freeze the others, e.g. with ``kfoc_backpack.freeze_unsupported``).
    """

    _key = ("all", "kfoc")
    approximation_class = KFOCFactors


class KFOCLLLaplace(BlockLLLaplace):
    """Last-layer K-FOC: ``Laplace(model, likelihood, "last_layer", "kfoc")``.

    A drop-in for ``KronLLLaplace``; arguments as :class:`KFOCLaplace` with
    ``KronLLLaplace``'s (``feature_reduction``, ``last_layer_name``).
    """

    _key = ("last_layer", "kfoc")
    approximation_class = KFOCFactors


class KFACLaplace(BlockLaplace):
    """K-FAC's factors of the same per-sample pass: ``Laplace(model, likelihood, "all", "kfac")``.

    laplace-torch's ``kron`` with this package's fit (:class:`~kfoc_backpack.dataset.KFACFactors`:
    left factors summed, right factors averaged over the inputs, KFC for weights shared
    over positions): dict batches, reward modeling, ``torch.distributed`` fits and
    whatever model ``kfoc`` fits. Arguments as laplace-torch's ``KronLaplace`` and
    ``process_group``; K-FAC takes none of its own.
    """

    _key = ("all", "kfac")
    approximation_class = KFACFactors


class KFACLLLaplace(BlockLLLaplace):
    """Last-layer K-FAC: ``Laplace(model, likelihood, "last_layer", "kfac")``."""

    _key = ("last_layer", "kfac")
    approximation_class = KFACFactors


class EKFOCLaplace(BlockLaplace):
    r"""Eigenvalue-corrected K-FOC Laplace: ``Laplace(model, likelihood, "all", "ekfoc")``.

    Per weight the posterior precision is ``(U_L ⊗ U_R) diag(vec(S) + δ) (U_L ⊗ U_R)ᵀ``:
    the eigenbasis of K-FOC's data-set factors (aggregated as ``aggregation`` says) and
    ``S``, the exact diagonal of the data set's curvature block in that basis (one more
    pass over the data, under the same Monte-Carlo labels) — the Frobenius-nearest
    matrix with that eigenbasis, so never farther from the block than K-FOC's
    ``L ⊗ R``, and trace-exact. Biases are exact. ``la.H_facs`` shows K-FOC's factors.
    Arguments as :class:`KFOCLaplace`; ``damping=True`` is refused (no factor
    eigenvalues to damp).
    """

    _key = ("all", "ekfoc")
    approximation_class = EKFOCFactors


class EKFOCLLLaplace(BlockLLLaplace):
    """Last-layer eigenvalue-corrected K-FOC: ``Laplace(model, lik, "last_layer", "ekfoc")``."""

    _key = ("last_layer", "ekfoc")
    approximation_class = EKFOCFactors


class EKFACLaplace(BlockLaplace):
    """EK-FAC Laplace: ``Laplace(model, likelihood, "all", "ekfac")``.

    As :class:`EKFOCLaplace` in the eigenbasis of K-FAC's factors of the same
    per-sample quantities — the reference for the eigenvalue-corrected K-FOC.
    Arguments as :class:`KFACLaplace`.
    """

    _key = ("all", "ekfac")
    approximation_class = EKFACFactors


class EKFACLLLaplace(BlockLLLaplace):
    """Last-layer EK-FAC: ``Laplace(model, likelihood, "last_layer", "ekfac")``."""

    _key = ("last_layer", "ekfac")
    approximation_class = EKFACFactors


__all__ = [
    "EKFACLLLaplace",
    "EKFACLaplace",
    "EKFOCLLLaplace",
    "EKFOCLaplace",
    "KFACLLLaplace",
    "KFACLaplace",
    "KFOCLLLaplace",
    "KFOCLaplace",
]
