r"""A dense block: a bias's exact ``[B, B]`` block (and any parameter small enough).

``B = Σ_k b_k b_kᵀ`` over the per-sample gradients ``b_k`` of the parameter: exact, so
batches and ranks add it exactly. Its eigenform is ``Q diag(λ) Qᵀ``, as laplace-torch's
``Kron.decompose`` makes of a one-matrix entry.

Index conventions: ``B`` the parameter's number of entries, ``R`` rows multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.blocks.base import Block, BlockSum, Decomposed
from kfoc_backpack.enums import Aggregation
from kfoc_backpack.solver.eigen import symeig


@dataclass(frozen=True)
class DenseBlock(Block):
    """A parameter's block as one symmetric ``[B, B]`` matrix.

    Attributes:
        matrix: ``[B, B]``, symmetric positive semi-definite.
    """

    matrix: Tensor
    kind = "dense"

    @classmethod
    def zeros(cls, size: int, like: Tensor) -> DenseBlock:
        """Return an all-zero ``[size, size]`` block on ``like``'s device and dtype."""
        return cls(like.new_zeros(size, size))

    @property
    def size(self) -> int:
        """``B``."""
        return self.matrix.shape[-1]

    @property
    def kfacs(self) -> list[Tensor]:
        """``[B]``."""
        return [self.matrix]

    def tensors(self) -> dict[str, Tensor]:
        """``{"matrix": B}``."""
        return {"matrix": self.matrix}

    def scaled(self, factor: Tensor | float, even: bool = False) -> DenseBlock:
        """``factor · B`` (``even`` is moot: one matrix)."""
        return DenseBlock(self.matrix * factor)

    def decompose(self, what: str = "the block") -> DecomposedDense:
        """``Q diag(λ) Qᵀ`` as laplace-torch's ``symeig`` makes it (eigenvalues ``≥ 0``)."""
        values, vectors = symeig(self.matrix, what)
        return DecomposedDense(vectors, values)

    def new_sum(self, aggregation: Aggregation) -> DenseSum:
        """Return an exact sum (whatever the aggregation)."""
        return DenseSum(self)

    def dense(self) -> Tensor:
        """``B``."""
        return self.matrix

    def trace(self) -> Tensor:
        """``tr B``."""
        return self.matrix.diagonal().sum()


@dataclass(frozen=True)
class DecomposedDense(Decomposed):
    """``Q diag(λ) Qᵀ``.

    Attributes:
        vectors: ``[B, B]`` orthonormal ``Q``.
        values: ``[B]`` eigenvalues ``λ``.
    """

    vectors: Tensor
    values: Tensor

    @property
    def size(self) -> int:  # type: ignore[override]
        """``B``."""
        return self.values.shape[0]

    @property
    def eigenvectors(self) -> list[Tensor]:
        """``[Q]``."""
        return [self.vectors]

    @property
    def eigenvalues(self) -> list[Tensor]:
        """``[λ]``."""
        return [self.values]

    def spectrum(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``(λ + δ)^exponent`` (``damping`` adds ``δ`` as well: one factor)."""
        shifted = self.values + delta
        return shifted if exponent == 1 else torch.pow(shifted, exponent)

    def rotate(self, rows: Tensor) -> Tensor:
        """``W Q``."""
        return rows @ self.vectors

    def unrotate(self, rotated: Tensor) -> Tensor:
        """``V Qᵀ``."""
        return rotated @ self.vectors.T

    def basis(self) -> Tensor:
        """``Q``."""
        return self.vectors

    def scaled(self, factor: Tensor | float) -> DecomposedDense:
        """``factor · λ``."""
        return DecomposedDense(self.vectors, self.values * factor)

    def diag(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``(Q ⊙ Q) (λ + δ)^exponent``."""
        return self.vectors.square() @ self.spectrum(delta, exponent, damping)


class DenseSum(BlockSum):
    """``Σ_p s_p B_p``, exact; over ranks, one more sum."""

    def __init__(self, zero: DenseBlock):
        super().__init__(zero)
        self._total: Tensor | None = None

    def _add(self, block: Block, num_samples: int, scale: float) -> None:
        term = block.matrix * scale  # type: ignore[attr-defined]
        self._total = term if self._total is None else self._total + term

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self._total is None

    def result(self) -> DenseBlock:
        """Return the sum (the zero block while empty)."""
        return self.zero if self._total is None else DenseBlock(self._total)

    def summed(self) -> list[Tensor]:
        """``[Σ_p s_p B_p]``."""
        return [self.result().matrix]

    def combine(
        self, summed: list[Tensor], gathered: list[list[Tensor]], counts: Tensor
    ) -> DenseBlock:
        """Return the ranks' sum."""
        return DenseBlock(summed[0])
