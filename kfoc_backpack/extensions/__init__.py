"""BackPACK extensions: K-FOC factors collected during ``backward``.

``KFOC`` (Monte-Carlo Fisher, savefield ``kfoc``) and ``KFOCExact`` (exact GGN,
savefield ``kfoc_exact``), with one module extension per supported layer type.
"""

from kfoc_backpack.extensions.base import LayerTerms
from kfoc_backpack.extensions.kfoc import KFOC, KFOCBase, KFOCExact, KFOCTerms, SolveRecord

__all__ = ["KFOC", "KFOCBase", "KFOCExact", "KFOCTerms", "LayerTerms", "SolveRecord"]
