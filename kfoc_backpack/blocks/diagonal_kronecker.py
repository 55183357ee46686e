r"""A table's block ``diag(l) ⊗ R``: a Kronecker product whose row side is diagonal.

The block of an embedding table of ``V`` rows and width ``D`` (row-major ``vec``) where a
dense ``V × V`` factor does not fit (:mod:`kfoc_backpack.solver.vocabulary`): ``l``
(``[V]``) on the row side, ``R`` (``[D, D]``) on the width side. Its eigenbasis is
``I ⊗ Q_R`` — the identity is never stored — with the spectrum ``l λ_Rᵀ`` (``[V, D]``).
The eigenvalue-corrected block (:class:`DiagonalCorrected`) keeps that basis and takes
the data's own diagonal in it, ``S[v, j] = Σ_k ((X_k Q_R)[v, j])²``. Over batches the
factors aggregate as ``approx`` or ``running`` says (:class:`DiagonalKroneckerSum`), the
corrected diagonal exactly.

Index conventions: ``V`` the table's rows, ``D`` its width, ``R`` rows multiplied,
``C`` outputs, ``N`` inputs, ``W`` ranks.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from kfoc_backpack.blocks.base import Block, Decomposed
from kfoc_backpack.blocks.corrected import CorrectedSpectrum
from kfoc_backpack.blocks.kronecker import FactorPair, FactorPairSum, ProductSpectrum
from kfoc_backpack.enums import Aggregation
from kfoc_backpack.solver.eigen import stable_eigh, symeig
from kfoc_backpack.solver.vocabulary import VocabularyTerms, nearest_diagonal_sum


class RowsJacobian(Protocol):
    """A table's output Jacobian that weighs its own rows.

    :class:`~kfoc_backpack.collect.jacobians.VocabularyJacobian` is one.
    """

    def weighted_products(self, right_basis: Tensor, weights: Tensor, joint: bool) -> Tensor:
        """``Σ_{v,j} Ĵ_a[v, j] Ĵ_b[v, j] weights[v, j]`` with ``Ĵ = J Q_R``."""
        ...


@dataclass(frozen=True)
class RowSided(Decomposed):
    """An eigenform in the basis ``I_V ⊗ Q_R`` with a ``[V, D]`` spectrum.

    Attributes:
        right_basis: ``[D, D]`` orthonormal ``Q_R``.
    """

    right_basis: Tensor

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """``V``."""

    @property
    def size(self) -> int:  # type: ignore[override]
        """``V·D``."""
        return self.num_rows * self.right_basis.shape[-1]

    @property
    def eigenvectors(self) -> list[Tensor]:
        """``[Q_R]`` (the row side's basis is the identity, not stored)."""
        return [self.right_basis]

    def rotate(self, rows: Tensor) -> Tensor:
        """``W Q_R`` per row ``W`` (``[R, V, D]``)."""
        return rows.reshape(-1, self.num_rows, self.right_basis.shape[-1]) @ self.right_basis

    def unrotate(self, rotated: Tensor) -> Tensor:
        """``V Q_Rᵀ`` per row, flattened to ``[R, V·D]``."""
        return (rotated @ self.right_basis.T).reshape(-1, self.size)

    def basis(self) -> Tensor:
        """``I ⊗ Q_R`` (small tables and tests)."""
        eye = torch.eye(self.num_rows, dtype=self.right_basis.dtype, device=self.right_basis.device)
        return torch.kron(eye, self.right_basis.contiguous())

    def output_covariance(
        self, jacobian: RowsJacobian, delta: Tensor, damping: bool = False, joint: bool = False
    ) -> Tensor:
        """``Σ_{v,j} Ĵ_a[v, j] Ĵ_b[v, j] / (E[v, j] + δ)``, ``Ĵ = J Q_R``, over the rows held.

        Shapes as :meth:`~kfoc_backpack.blocks.Decomposed.output_covariance`.
        """
        weights = self.spectrum(delta, -1, damping)
        return jacobian.weighted_products(self.right_basis, weights, joint)

    def diag(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``E (Q_R ⊙ Q_R)ᵀ`` flattened, ``E`` the spectrum."""
        spectrum = self.spectrum(delta, exponent, damping)
        return (spectrum @ self.right_basis.square().T).flatten()


@dataclass(frozen=True)
class DiagonalKroneckerBlock(FactorPair, Block):
    """``diag(l) ⊗ R`` of a table (``kfacs`` ``[l, R]``: the row side as its diagonal).

    Attributes:
        left: ``[V]`` the row-side factor's diagonal, non-negative.
        right: ``[D, D]`` the width-side factor, symmetric.
    """

    left: Tensor
    right: Tensor
    kind = "diagonal_kronecker"

    @classmethod
    def zeros(cls, num_rows: int, width: int, like: Tensor) -> DiagonalKroneckerBlock:
        """``diag(0) ⊗ 0`` on ``like``'s device and dtype."""
        return cls(like.new_zeros(num_rows), like.new_zeros(width, width))

    def decompose(self, what: str = "the block") -> DecomposedDiagonalKronecker:
        """``R``'s ``symeig``; the row side is its own eigenform."""
        values, basis = symeig(self.right, f"the width-side factor of {what}")
        return DecomposedDiagonalKronecker(basis, self.left.clamp(min=0), values)

    def corrected_basis(self, what: str = "the block") -> DiagonalCorrected:
        """Return the basis ``I ⊗ Q_R`` with ``S = 0`` (and the factors, for online fits)."""
        return DiagonalCorrected.basis_of(self, what)

    def new_sum(self, aggregation: Aggregation) -> DiagonalKroneckerSum:
        """Return a sum of products aggregated as ``aggregation`` (``approx`` or ``running``)."""
        return DiagonalKroneckerSum(self, aggregation)

    def dense(self) -> Tensor:
        """``torch.kron(diag(l), R)`` (small tables and tests)."""
        return torch.kron(torch.diag(self.left), self.right)

    def trace(self) -> Tensor:
        """``Σ l · tr R``."""
        return self.left.sum() * self.right.diagonal().sum()


@dataclass(frozen=True)
class DecomposedDiagonalKronecker(ProductSpectrum, RowSided):
    """``(I ⊗ Q_R) diag(l ⊗ λ_R) (I ⊗ Q_R)ᵀ`` (the row side's eigenvalues are ``l``).

    Attributes:
        left_values: ``[V]`` ``l``.
        right_values: ``[D]`` eigenvalues ``λ_R`` of ``R``.
    """

    left_values: Tensor
    right_values: Tensor

    @property
    def num_rows(self) -> int:
        """``V``."""
        return self.left_values.shape[-1]


@dataclass(frozen=True)
class DiagonalCorrected(CorrectedSpectrum, RowSided, Block):
    """A table's eigenvalue-corrected block ``(I ⊗ U_R) diag(vec S) (I ⊗ U_R)ᵀ``.

    Attributes:
        right_basis: ``[D, D]`` ``U_R``.
        diagonal: ``[V, D]`` ``S``, the block's eigenvalues.
        factors: The factors whose basis this is, where known (online fits).
    """

    diagonal: Tensor
    factors: DiagonalKroneckerBlock | None = None
    kind = "diagonal_corrected"

    @classmethod
    def basis_of(
        cls, factors: DiagonalKroneckerBlock, what: str = "the block"
    ) -> DiagonalCorrected:
        """Return ``R``'s eigenbasis with ``S = 0``, keeping the factors.

        Raises:
            FloatingPointError: If a factor is not finite or has no eigendecomposition.
        """
        for name, factor in (("left", factors.left), ("right", factors.right)):
            if not torch.isfinite(factor).all():
                raise FloatingPointError(f"{what}: the {name} factor is not finite.")
        symmetric = (factors.right + factors.right.mT) / 2
        right_basis = stable_eigh(symmetric, f"the right factor of {what}")[1]
        zeros = factors.right.new_zeros(len(factors.left), len(right_basis))
        return cls(right_basis, zeros, factors)

    @property
    def num_rows(self) -> int:
        """``V``."""
        return self.diagonal.shape[0]

    def diagonal_of(self, terms: VocabularyTerms) -> Tensor:
        """``[V, D]`` diagonal of ``terms``' block in this basis."""
        return terms.rotated(self.right_basis).diagonal().to(self.diagonal.dtype)

    def projected(self, other: DiagonalCorrected) -> Tensor:
        """Return this block's diagonal in ``other``'s basis: ``S Cᵀ``, ``C = (U'ᵀ U)^{∘2}``."""
        target = other.right_basis
        right = (target.mT @ self.right_basis.to(target)).square()
        return self.diagonal.to(target) @ right.mT

    def tensors(self) -> dict[str, Tensor]:
        """Basis and ``S``, and the factors where kept."""
        tensors = {"right_basis": self.right_basis, "diagonal": self.diagonal}
        if self.factors is not None:
            tensors.update(factor_left=self.factors.left, factor_right=self.factors.right)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> DiagonalCorrected:
        """Return the block from :meth:`tensors`' output."""
        factors = None
        if "factor_left" in tensors:
            factors = DiagonalKroneckerBlock(tensors["factor_left"], tensors["factor_right"])
        return cls(tensors["right_basis"], tensors["diagonal"], factors)

    def dense(self) -> Tensor:
        """``(I ⊗ U_R) diag(vec S) (I ⊗ U_R)ᵀ`` (small tables and tests)."""
        basis = self.basis()
        return (basis * self.diagonal.reshape(1, -1)) @ basis.T


class DiagonalKroneckerSum(FactorPairSum):
    """``Σ_p s_p diag(l_p) ⊗ R_p`` aggregated as ``approx`` or ``running``.

    As :class:`~kfoc_backpack.blocks.kronecker.KroneckerSum`: ``approx`` sums ``s l`` and
    averages ``R`` by sample count; ``running`` keeps the nearest ``diag(l) ⊗ R`` to the
    sum so far and the batch's product
    (:func:`~kfoc_backpack.solver.vocabulary.nearest_diagonal_sum`), ``tr R`` the
    sample-weighted mean of the batches'. Over ranks likewise.
    """

    def __init__(self, zero: DiagonalKroneckerBlock, aggregation: Aggregation):
        super().__init__(
            zero,
            aggregation,
            " The data-set optimum of a table with a diagonal row side is not supported: "
            "use 'running' or 'approx'.",
        )
        self._left: Tensor | None = None
        self._right: Tensor | None = None
        self._trace: Tensor | None = None

    @staticmethod
    def _merge(lefts: Tensor, rights: Tensor, trace: Tensor | None) -> tuple[Tensor, Tensor]:
        return nearest_diagonal_sum(lefts, rights, trace)

    def _add(self, block: Block, num_samples: int, scale: float) -> None:
        left, right = block.left * scale, block.right  # type: ignore[attr-defined]
        trace = right.diagonal().sum() * num_samples
        if self._left is None:
            first = right * num_samples if self.aggregation is Aggregation.APPROX else right
            self._left, self._right, self._trace = left, first, trace
            return
        self._trace = self._trace + trace
        if self.aggregation is Aggregation.APPROX:
            self._left = self._left + left
            self._right = self._right + right * num_samples
            return
        self._left, self._right = self._merge(
            torch.stack([self._left, left]), torch.stack([self._right, right]), None
        )

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self._left is None

    def result(self) -> DiagonalKroneckerBlock:
        """Return the aggregate, ``tr R`` the mean over the inputs added (zero while empty)."""
        if self._left is None:
            return self.zero  # type: ignore[return-value]
        total = float(self.num_samples)
        if self.aggregation is Aggregation.APPROX:
            return DiagonalKroneckerBlock(self._left, self._right / total)
        trace = self._trace / total
        return DiagonalKroneckerBlock(*self._merge(self._left[None], self._right[None], trace))
