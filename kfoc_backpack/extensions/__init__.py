"""BackPACK extensions: K-FOC factors collected during ``backward``.

``KFOC`` (Monte-Carlo Fisher, savefield ``kfoc``) and ``KFOCExact`` (exact GGN,
savefield ``kfoc_exact``), with one module extension per supported layer type; their
eigenvalue-corrected siblings ``EKFOC`` (``ekfoc``) and ``EKFOCExact`` (``ekfoc_exact``),
whose weights hold the eigenbasis and the corrected eigenvalues. The
data-set functions built on them (``KFOCAccumulator``, ``optimal_factors``) are in
:mod:`kfoc_backpack.dataset`.
"""

from kfoc_backpack.extensions.collector import BackPACKCollector
from kfoc_backpack.extensions.corrected import EKFOC, EKFOCExact
from kfoc_backpack.extensions.kfoc import KFOC, KFOCBase, KFOCExact, SolveRecord
from kfoc_backpack.extensions.lifetime import extended, preserved_grads
from kfoc_backpack.extensions.terms import KFOCTerms

__all__ = [
    "EKFOC",
    "BackPACKCollector",
    "KFOC",
    "EKFOCExact",
    "KFOCBase",
    "KFOCExact",
    "KFOCTerms",
    "SolveRecord",
    "extended",
    "preserved_grads",
]
