"""BackPACK extensions: K-FOC factors collected during ``backward``.

``KFOC`` (Monte-Carlo Fisher, savefield ``kfoc``) and ``KFOCExact`` (exact GGN,
savefield ``kfoc_exact``), with one module extension per supported layer type.
"""

from kfoc_backpack.extensions.accumulate import (
    BlockAccumulator,
    KFOCAccumulator,
    OptimalFactors,
    extended,
    optimal_factors,
    solve_optimal,
)
from kfoc_backpack.extensions.base import LayerTerms
from kfoc_backpack.extensions.kfoc import KFOC, KFOCBase, KFOCExact, KFOCTerms, SolveRecord

__all__ = [
    "KFOC",
    "BlockAccumulator",
    "KFOCAccumulator",
    "KFOCBase",
    "KFOCExact",
    "KFOCTerms",
    "LayerTerms",
    "OptimalFactors",
    "SolveRecord",
    "extended",
    "optimal_factors",
    "solve_optimal",
]
