r"""An eigenvalue-corrected weight block: a Kronecker eigenbasis with the data's own eigenvalues.

For factors ``L = U_L Λ_L U_Lᵀ`` and ``R = U_R Λ_R U_Rᵀ`` of a weight's block ``F``, the
corrected block keeps ``U_L ⊗ U_R`` and replaces ``Λ_L ⊗ Λ_R`` by ``F``'s diagonal in it,
``S[i, j] = Σ_k ((U_Lᵀ X_k U_R)[i, j])²`` (docs/conventions.md §9): the Frobenius
projection of ``F`` onto the matrices with that eigenbasis, never farther from ``F`` than
``L ⊗ R``, and trace-exact. Over batches and ranks ``S`` adds exactly
(:class:`DiagonalSum`); the block is its own eigenform, with ``S + δ`` as its spectrum.

Index conventions: ``M``/``N`` the sizes of the left/right bases, ``R`` rows multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from kfoc_backpack.blocks.base import Block, BlockSum
from kfoc_backpack.blocks.kronecker import KroneckerBlock, TwoSided
from kfoc_backpack.enums import Aggregation
from kfoc_backpack.solver.correction import RotatableTerms, basis_diagonal, eigenbases

C = TypeVar("C", bound="CorrectedSpectrum")


class CorrectedSpectrum:
    """What every eigenvalue-corrected block shares: ``S`` is its spectrum, in its basis.

    For frozen dataclass blocks with the fields ``diagonal`` (``S``) and ``factors``
    (the factors whose basis it is, or ``None``): the block is its own eigenform, adds
    exactly (:class:`DiagonalSum`), scales ``S``, and refuses laplace-torch's
    ``damping`` (it has no factor eigenvalues).
    """

    diagonal: Tensor
    factors: Block | None

    def with_diagonal(self: C, diagonal: Tensor) -> C:
        """Return the same basis (and factors) with eigenvalues ``diagonal``."""
        return replace(self, diagonal=diagonal)  # type: ignore[type-var]

    @property
    def kfacs(self) -> list[Tensor]:
        """The factors' ``kfacs`` (laplace-torch's ``Kron`` view of the fit)."""
        if self.factors is None:
            raise ValueError("This eigenvalue-corrected block does not keep its factors.")
        return self.factors.kfacs

    def from_kfacs(self, kfacs: object, what: str = "the block") -> Block:
        """Refused: a list of matrices does not say the eigenvalues.

        Raises:
            TypeError: Always.
        """
        raise TypeError(f"{what}: an eigenvalue-corrected block is not made from factors.")

    def scaled(self: C, factor: Tensor | float, even: bool = False) -> C:
        """``factor · S`` (the factors scaled alike)."""
        factors = None if self.factors is None else self.factors.scaled(factor, even)
        return replace(self, diagonal=self.diagonal * factor, factors=factors)  # type: ignore[type-var]

    def corrected_basis(self: C, what: str = "the block") -> C:
        """Return this basis (and factors) with ``S = 0``, to be corrected again."""
        return self.with_diagonal(torch.zeros_like(self.diagonal))

    def decompose(self: C, what: str = "the block") -> C:
        """Return the block itself: it is its own eigenform."""
        return self

    def uncorrected(self) -> Block:
        """Return the factors the correction started from.

        Raises:
            ValueError: If the block does not keep them.
        """
        if self.factors is None:
            raise ValueError("This eigenvalue-corrected block does not keep its factors.")
        return self.factors

    def new_sum(self, aggregation: Aggregation) -> DiagonalSum:
        """Return an empty exact sum of ``S`` in this basis (whatever the aggregation)."""
        return DiagonalSum(self)

    def trace(self) -> Tensor:
        """``tr = Σ S``."""
        return self.diagonal.sum()

    @property
    def eigenvalues(self) -> list[Tensor]:
        """``[S]``."""
        return [self.diagonal]

    def check_damping(self, damping: bool) -> None:
        """Refuse ``damping=True``: the corrected block has no factor eigenvalues.

        Raises:
            ValueError: For ``damping=True``.
        """
        if damping:
            raise ValueError(
                "damping=True adds √δ to each Kronecker factor's eigenvalues, which "
                "eigenvalue-corrected blocks do not have; use damping=False (the prior "
                "precision is added to every eigenvalue)."
            )

    def spectrum(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``(S + δ)^exponent``.

        Raises:
            ValueError: For ``damping=True``.
        """
        self.check_damping(damping)
        values = self.diagonal + delta
        return values if exponent == 1 else values.pow(exponent)


@dataclass(frozen=True)
class EigenCorrected(CorrectedSpectrum, TwoSided, Block):
    """A weight block ``(U_L ⊗ U_R) diag(vec S) (U_L ⊗ U_R)ᵀ``.

    Attributes:
        left_basis: ``[M, M]`` ``U_L``, orthonormal columns.
        right_basis: ``[N, N]`` ``U_R``, orthonormal columns.
        diagonal: ``[M, N]`` ``S``, the block's eigenvalues (``S[i, j]`` belongs to the
            eigenvector ``U_L[:, i] ⊗ U_R[:, j]``).
        factors: The Kronecker factors whose eigenbasis this is, where known (a fit
            keeps them: an online update aggregates them with the new data's).
    """

    diagonal: Tensor
    factors: KroneckerBlock | None = None
    kind = "corrected"
    factors_class: ClassVar[type[Block]] = KroneckerBlock
    """The structure of :attr:`factors` (in a state)."""

    @classmethod
    def basis_of(cls, factors: KroneckerBlock, what: str = "the block") -> EigenCorrected:
        """Return the eigenbasis of ``factors`` with ``S = 0``, keeping the factors.

        Raises:
            FloatingPointError: If a factor is not finite or has no eigendecomposition.
        """
        try:
            left_basis, right_basis = eigenbases(factors.left, factors.right)
        except FloatingPointError as error:
            raise FloatingPointError(f"{what}: {error}") from error
        grid = (*left_basis.shape[:-1], right_basis.shape[-1])  # [M, N] (or [G, M, N])
        return cls(left_basis, right_basis, factors.left.new_zeros(grid), factors)

    @classmethod
    def of_terms(cls, terms: RotatableTerms, left: Tensor, right: Tensor) -> EigenCorrected:
        """Correct ``left ⊗ right`` by ``terms``' block: its eigenbasis and the block's diagonal.

        Args:
            terms: The block's per-sample terms.
            left: ``[M, M]`` left factor (K-FOC's, K-FAC's, any symmetric one).
            right: ``[N, N]`` right factor.
        """
        basis = cls.basis_of(KroneckerBlock(left, right))
        return basis.with_diagonal(basis.diagonal_of(terms))

    def diagonal_of(self, terms: RotatableTerms) -> Tensor:
        """``[M, N]`` diagonal of ``terms``' block in this basis."""
        return basis_diagonal(terms, self.left_basis, self.right_basis).to(self.diagonal.dtype)

    def projected(self, other: EigenCorrected) -> Tensor:
        r"""Return this block's diagonal in ``other``'s basis, ``S' = C_L S C_Rᵀ``.

        ``C = (U'ᵀ U)^{∘2}`` for each side: the Frobenius projection of this block onto
        the matrices with ``other``'s eigenbasis (trace kept: ``C`` is doubly stochastic).

        Returns:
            ``[M, N]`` ``S'`` in ``other``'s dtype.
        """
        target = other.left_basis
        left = (target.mT @ self.left_basis.to(target)).square()
        right = (other.right_basis.mT @ self.right_basis.to(target)).square()
        return left @ self.diagonal.to(target) @ right.mT

    # -- as a block ----------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """Bases and ``S``, and the factors where kept."""
        tensors = {
            "left_basis": self.left_basis,
            "right_basis": self.right_basis,
            "diagonal": self.diagonal,
        }
        if self.factors is not None:
            tensors.update(factor_left=self.factors.left, factor_right=self.factors.right)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> EigenCorrected:
        """Return the block from :meth:`tensors`' output."""
        factors = None
        if "factor_left" in tensors:
            factors = cls.factors_class(tensors["factor_left"], tensors["factor_right"])  # type: ignore[call-arg]
        return cls(tensors["left_basis"], tensors["right_basis"], tensors["diagonal"], factors)

    def dense(self) -> Tensor:
        """``(U_L ⊗ U_R) diag(vec S) (U_L ⊗ U_R)ᵀ``, ``[M·N, M·N]``."""
        basis = self.basis()
        return (basis * self.diagonal.reshape(1, -1)) @ basis.T


class DiagonalSum(BlockSum):
    """``Σ_p s_p S_p`` in one basis: exact over batches and ranks."""

    def __init__(self, zero: EigenCorrected):
        super().__init__(zero)
        self._total: Tensor | None = None

    def _add(self, block: Block, num_samples: int, scale: float) -> None:
        diagonal = block.diagonal  # type: ignore[attr-defined]
        if self._total is None:
            self._total = torch.zeros_like(self.zero.diagonal)  # type: ignore[attr-defined]
        self._total.add_(diagonal.to(self._total.dtype), alpha=scale)

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self._total is None

    def result(self) -> EigenCorrected:
        """Return the sum (``S = 0`` while empty)."""
        zero: EigenCorrected = self.zero  # type: ignore[assignment]
        return zero if self._total is None else zero.with_diagonal(self._total)

    def summed(self) -> list[Tensor]:
        """``[Σ_p s_p S_p]``."""
        return [self.result().diagonal]

    def combine(
        self, summed: list[Tensor], gathered: list[list[Tensor]], counts: Tensor
    ) -> EigenCorrected:
        """Return the ranks' sum."""
        zero: EigenCorrected = self.zero  # type: ignore[assignment]
        return zero.with_diagonal(summed[0])
