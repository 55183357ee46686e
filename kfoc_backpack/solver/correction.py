r"""Eigenvalue correction of Kronecker factors: the block's own diagonal in their basis.

For factors ``L = U_L Λ_L U_Lᵀ`` (``[M, M]``) and ``R = U_R Λ_R U_Rᵀ`` (``[N, N]``) of a
weight block ``F = Σ_k vec(X_k) vec(X_k)ᵀ``, the correction keeps the basis
``U_L ⊗ U_R`` and replaces ``Λ_L ⊗ Λ_R`` by the diagonal of ``F`` in that basis,

.. math::
    S[i, j] = Σ_k \big((U_Lᵀ X_k U_R)[i, j]\big)^2 ,
    \qquad
    F ≈ (U_L ⊗ U_R)\, \mathrm{diag}(\mathrm{vec}\, S)\, (U_L ⊗ U_R)ᵀ .

The corrected block (:class:`~kfoc_backpack.blocks.EigenCorrected`) is the Frobenius
projection of ``F`` onto the matrices with that eigenbasis, so it is never farther from
``F`` than ``L ⊗ R`` (one of those matrices), and it is trace-exact: ``Σ S = tr F``.
In K-FAC's basis this is EK-FAC (George et al., 2018); in K-FOC's basis, the
eigenvalue-corrected K-FOC.

``S`` comes from the terms rotated into the basis (``terms.rotated(U_L, U_R).diagonal()``):
for rank-one terms ``(S_k U_L)`` and ``(U_Rᵀ a_k)``, for weights shared over positions
``(G U_L)ᵀ (A U_R)`` — ``X`` itself is formed only by the terms that store it, or a block
of samples at a time (:meth:`~kfoc_backpack.solver.factored.FactoredTerms.diagonal`).

Vectorisation is row-major, as everywhere in :mod:`kfoc_backpack.solver`:
``vec(U_Lᵀ X U_R) = (U_L ⊗ U_R)ᵀ vec(X)``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from kfoc_backpack.solver.eigen import stable_eigh, stacked_eigh


class RotatableTerms(Protocol):
    """Per-sample terms that can be rotated into a basis and give their diagonal."""

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> RotatableTerms:
        """Return the terms of ``U_Lᵀ X_k U_R``."""
        ...

    def diagonal(self) -> Tensor:
        """Return ``Σ_k X_k ⊙ X_k``, ``[M, N]``."""
        ...


def eigenbases(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors ``(U_L, U_R)`` of the symmetric parts of two factors.

    Args:
        left: ``[M, M]`` factor, or ``[G, M, M]``: one per group of a grouped weight.
        right: ``[N, N]`` factor, or ``[G, N, N]``.

    Returns:
        ``U_L`` and ``U_R`` of the factors' shapes, in their dtype.

    Raises:
        FloatingPointError: If a factor is not finite or has no eigendecomposition.
    """
    bases = []
    for name, factor in (("left", left), ("right", right)):
        if not torch.isfinite(factor).all():
            raise FloatingPointError(f"the {name} factor is not finite; it has no eigenbasis.")
        decompose = stable_eigh if factor.dim() == 2 else stacked_eigh
        bases.append(decompose((factor + factor.mT) / 2, f"the {name} factor")[1])
    return bases[0], bases[1]


def basis_diagonal(terms: RotatableTerms, left_basis: Tensor, right_basis: Tensor) -> Tensor:
    """``S[i, j] = Σ_k ((U_Lᵀ X_k U_R)[i, j])²``: the block's diagonal in ``U_L ⊗ U_R``.

    Args:
        terms: The block's per-sample terms (:class:`~kfoc_backpack.solver.OuterTerms`,
            :class:`~kfoc_backpack.solver.SampleTerms`,
            :class:`~kfoc_backpack.solver.FactoredTerms` and their route subclasses).
        left_basis: ``[M, M]`` ``U_L``.
        right_basis: ``[N, N]`` ``U_R``.

    Returns:
        ``[M, N]`` ``S``, in the terms' dtype.
    """
    return terms.rotated(left_basis, right_basis).diagonal()
