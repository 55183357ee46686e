"""BackPACK extensions: K-FOC factors collected during ``backward``.

``KFOC`` (Monte-Carlo Fisher, savefield ``kfoc``) and ``KFOCExact`` (exact GGN,
savefield ``kfoc_exact``), with one module extension per supported layer type. The
data-set functions built on them (``KFOCAccumulator``, ``optimal_factors``) are in
:mod:`kfoc_backpack.dataset`.
"""

from kfoc_backpack.extensions.base import LayerTerms
from kfoc_backpack.extensions.kfoc import KFOC, KFOCBase, KFOCExact, KFOCTerms, SolveRecord
from kfoc_backpack.extensions.lifetime import extended, preserved_grads

__all__ = [
    "KFOC",
    "KFOCBase",
    "KFOCExact",
    "KFOCTerms",
    "LayerTerms",
    "SolveRecord",
    "extended",
    "preserved_grads",
]
