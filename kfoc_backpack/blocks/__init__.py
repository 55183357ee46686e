"""Typed curvature blocks: one class per structure a parameter's block can have.

* :class:`KroneckerBlock` — a weight's ``L ⊗ R`` (K-FOC's or K-FAC's factors);
* :class:`DenseBlock` — an exact ``[B, B]`` block (biases);
* :class:`EigenCorrected` — a Kronecker eigenbasis with the data's own eigenvalues;
* :class:`DiagonalKroneckerBlock` — a large table's ``diag(l) ⊗ R`` (a diagonal row
  side), and :class:`DiagonalCorrected`, its basis with the data's eigenvalues;
* :class:`GroupedKroneckerBlock` — a grouped convolution's ``blockdiag_g(L_g ⊗ R_g)``
  (one product per group), and :class:`GroupedCorrected`, its bases with the data's
  eigenvalues.

Each block adds and scales itself (:class:`BlockSum`: over batches, and over
``torch.distributed`` ranks through its summed and gathered parts), serialises into a
state dict (:meth:`Block.state`, :meth:`Block.from_state`), and decomposes into an
eigenform (:class:`Decomposed`) that answers the posterior's questions: log-determinant,
products with any power, diagonal, dense matrix, each with a prior precision added.
A new structure is one more class here.

Layer: pure tensor maths on top of :mod:`kfoc_backpack.solver`; knows nothing of
BackPACK or laplace-torch.
"""

from kfoc_backpack.blocks.base import Block, BlockSum, Decomposed, Jacobian, output_products
from kfoc_backpack.blocks.corrected import DiagonalSum, EigenCorrected
from kfoc_backpack.blocks.dense import DecomposedDense, DenseBlock, DenseSum
from kfoc_backpack.blocks.diagonal_kronecker import (
    DecomposedDiagonalKronecker,
    DiagonalCorrected,
    DiagonalKroneckerBlock,
    DiagonalKroneckerSum,
)
from kfoc_backpack.blocks.grouped import (
    GroupedCorrected,
    GroupedKroneckerBlock,
    GroupedKroneckerSum,
)
from kfoc_backpack.blocks.kronecker import DecomposedKronecker, KroneckerBlock, KroneckerSum

__all__ = [
    "Block",
    "BlockSum",
    "DecomposedDense",
    "DecomposedDiagonalKronecker",
    "DecomposedKronecker",
    "Decomposed",
    "DenseBlock",
    "DenseSum",
    "DiagonalCorrected",
    "DiagonalKroneckerBlock",
    "DiagonalKroneckerSum",
    "DiagonalSum",
    "EigenCorrected",
    "GroupedCorrected",
    "GroupedKroneckerBlock",
    "GroupedKroneckerSum",
    "Jacobian",
    "KroneckerBlock",
    "KroneckerSum",
    "output_products",
]
