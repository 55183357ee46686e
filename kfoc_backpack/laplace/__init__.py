"""laplace-torch integration: ``KFOCBackend``, ``KFOCLaplace`` and ``KFOCLLLaplace``.

Importing this package (``import kfoc_backpack`` does) registers
``hessian_structure="kfoc"`` (K-FOC), ``"ekfoc"`` (eigenvalue-corrected K-FOC) and
``"ekfac"`` (EK-FAC) with laplace-torch's ``Laplace`` for ``subset_of_weights="all"``
and ``"last_layer"``.
"""

from kfoc_backpack.laplace.aggregate import AGGREGATIONS, fit_factors
from kfoc_backpack.laplace.backend import KFOCBackend, KFOCEFBackend, check_supported_layers
from kfoc_backpack.laplace.errors import BatchKeyError, UnsupportedDtypeError
from kfoc_backpack.laplace.laplace import (
    EKFACLaplace,
    EKFACLLLaplace,
    EKFOCLaplace,
    EKFOCLLLaplace,
    KFOCLaplace,
    KFOCLLLaplace,
)

__all__ = [
    "AGGREGATIONS",
    "BatchKeyError",
    "EKFACLLLaplace",
    "EKFACLaplace",
    "EKFOCLLLaplace",
    "EKFOCLaplace",
    "KFOCBackend",
    "KFOCEFBackend",
    "KFOCLLLaplace",
    "KFOCLaplace",
    "UnsupportedDtypeError",
    "check_supported_layers",
    "fit_factors",
]
