r"""A weight's Kronecker block ``L ⊗ R`` (K-FOC's or K-FAC's factors).

``L`` (``[M, M]``, output side) and ``R`` (``[N, N]``, input side) of a weight ``W``
(``M × N``, row-major ``vec``): ``torch.kron(L, R)`` approximates the weight's block. The
factors keep K-FAC's split (``tr R`` the data's mean squared input, docs/conventions.md
§3), so scaling the block scales ``L``; laplace-torch's ``Kron * factor`` spreads a factor
evenly (``even=True``). Over batches the factors are aggregated as ``approx`` or
``running`` says (:class:`KroneckerSum`); over ranks ``approx`` sums them, ``running``
merges the ranks' products (docs/conventions.md §8). The eigenform is
``(Q_L ⊗ Q_R) diag(λ_L ⊗ λ_R) (Q_L ⊗ Q_R)ᵀ``, as laplace-torch's ``KronDecomposed``.

Index conventions: ``M``/``N`` the sizes of the left/right factors, ``R`` rows
multiplied, ``W`` ranks.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

from kfoc_backpack.blocks.base import Block, BlockSum, Decomposed, Jacobian, output_products
from kfoc_backpack.enums import Aggregation
from kfoc_backpack.solver import KroneckerAccumulator, nearest_kronecker_sum
from kfoc_backpack.solver.eigen import symeig

P = TypeVar("P", bound="FactorPair")


class FactorPair:
    """The algebra of a block ``left ⊗ right``, whatever the structure of each factor.

    For frozen dataclass blocks with the fields ``left`` (output side) and ``right``
    (input side): laplace-torch's ``kfacs`` view, the state, and scaling — by default on
    ``left``, keeping K-FAC's split (``tr right`` the data's), or evenly.
    """

    left: Tensor
    right: Tensor

    def __iter__(self):
        """``L, R = block``: the two factors (BackPACK's ``[L_out, R_in]`` layout)."""
        return iter((self.left, self.right))

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N)``: the sizes of the output and input sides (a diagonal's length)."""
        return self.left.shape[-1], self.right.shape[-1]

    @property
    def size(self) -> int:
        """``M·N``: the parameter's entries."""
        return self.left.shape[-1] * self.right.shape[-1]

    @property
    def kfacs(self) -> list[Tensor]:
        """``[L, R]``."""
        return [self.left, self.right]

    def tensors(self) -> dict[str, Tensor]:
        """``{"left": L, "right": R}``."""
        return {"left": self.left, "right": self.right}

    def scaled(self: P, factor: Tensor | float, even: bool = False) -> P:
        """``factor · L ⊗ R``: on ``L`` (K-FAC's split kept), or ``√factor`` on each."""
        if even:
            root = pow(factor, 1 / 2)
            return replace(self, left=root * self.left, right=root * self.right)  # type: ignore[type-var]
        return replace(self, left=self.left * factor)  # type: ignore[type-var]

    def input_scaled(self: P, ratio: float) -> P:
        """``L ⊗ (ratio · R)``."""
        return replace(self, right=self.right * ratio)  # type: ignore[type-var]


@dataclass(frozen=True)
class KroneckerBlock(FactorPair, Block):
    """``L ⊗ R`` of a weight.

    Attributes:
        left: ``[M, M]`` output-side factor, symmetric.
        right: ``[N, N]`` input-side factor, symmetric.
    """

    left: Tensor
    right: Tensor
    kind = "kronecker"

    @classmethod
    def zeros(cls, out_features: int, in_features: int, like: Tensor) -> KroneckerBlock:
        """``0 ⊗ 0`` with factors ``[M, M]``, ``[N, N]`` on ``like``'s device and dtype."""
        zeros = like.new_zeros
        return cls(zeros(out_features, out_features), zeros(in_features, in_features))

    def decompose(self, what: str = "the block") -> DecomposedKronecker:
        """Each factor's ``symeig``, as laplace-torch's ``Kron.decompose``."""
        l_left, q_left = symeig(self.left, f"the left factor of {what}")
        l_right, q_right = symeig(self.right, f"the right factor of {what}")
        return DecomposedKronecker(q_left, q_right, l_left, l_right)

    def corrected_basis(self, what: str = "the block") -> Block:
        """Return the factors' eigenbasis with ``S = 0`` (and the factors, for online fits)."""
        from kfoc_backpack.blocks.corrected import EigenCorrected

        return EigenCorrected.basis_of(self, what)

    def new_sum(self, aggregation: Aggregation) -> KroneckerSum:
        """Return a sum of products aggregated as ``aggregation`` (``approx`` or ``running``)."""
        return KroneckerSum(self, aggregation)

    def dense(self) -> Tensor:
        """``torch.kron(L, R)``."""
        return torch.kron(self.left, self.right)

    def trace(self) -> Tensor:
        """``tr L · tr R``."""
        return self.left.diagonal().sum() * self.right.diagonal().sum()


@dataclass(frozen=True)
class TwoSided(Decomposed):
    """An eigenform in the basis ``Q_L ⊗ Q_R`` with an ``[M, N]`` spectrum.

    Or, for a grouped convolution's per-group block (:mod:`kfoc_backpack.blocks.grouped`),
    ``G`` such bases, one per group, and a ``[G, M, N]`` spectrum: the block-diagonal of
    ``Q_{L,g} ⊗ Q_{R,g}`` over the weight's ``G`` blocks of ``M`` rows (row-major
    ``vec``: each group's entries are contiguous). Every operation below is the same
    batched over the leading ``G``.

    Attributes:
        left_basis: ``[M, M]`` (or ``[G, M, M]``) orthonormal ``Q_L``.
        right_basis: ``[N, N]`` (or ``[G, N, N]``) orthonormal ``Q_R``.
    """

    left_basis: Tensor
    right_basis: Tensor

    @property
    def grid(self) -> tuple[int, ...]:
        """``(M, N)``, or ``(G, M, N)``: the spectrum's shape (a row in the basis)."""
        return (*self.left_basis.shape[:-1], self.right_basis.shape[-1])

    @property
    def size(self) -> int:  # type: ignore[override]
        """``M·N`` (``G·M·N``)."""
        return math.prod(self.grid)

    @property
    def eigenvectors(self) -> list[Tensor]:
        """``[Q_L, Q_R]``."""
        return [self.left_basis, self.right_basis]

    def rotate(self, rows: Tensor) -> Tensor:
        """``Q_Lᵀ W Q_R`` per row ``W`` (``[R, M, N]``, or ``[R, G, M, N]`` per group)."""
        return self.left_basis.mT @ rows.reshape(-1, *self.grid) @ self.right_basis

    def unrotate(self, rotated: Tensor) -> Tensor:
        """``Q_L V Q_Rᵀ`` per row (per group), flattened to ``[R, P]``."""
        return (self.left_basis @ rotated @ self.right_basis.mT).reshape(-1, self.size)

    def basis(self) -> Tensor:
        """``Q_L ⊗ Q_R`` (per group: their block-diagonal)."""
        if self.left_basis.dim() == 2:
            return torch.kron(self.left_basis, self.right_basis)
        pairs = zip(self.left_basis, self.right_basis)
        return torch.block_diag(*(torch.kron(left, right) for left, right in pairs))

    def output_covariance(
        self, jacobian: Jacobian, delta: Tensor, damping: bool = False, joint: bool = False
    ) -> Tensor:
        """``Σ_{ij} Ĵ_a[i, j] Ĵ_b[i, j] / (E[i, j] + δ)`` with ``Ĵ = Q_Lᵀ J Q_R``.

        The Jacobian comes rotated into the basis (a weight's factors rotated before
        ``J`` is formed; per group with per-group bases) and is weighted by the inverse
        spectrum: ``O·I`` numbers per row, never the ``P × P`` block. Shapes as
        :meth:`Decomposed.output_covariance`.
        """
        rotated = jacobian.rotated(self.left_basis, self.right_basis)
        weighted = rotated * self.spectrum(delta, -1, damping)
        return output_products(rotated.flatten(2), weighted.flatten(2), joint)

    def diag(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``((Q_L ⊙ Q_L) E (Q_R ⊙ Q_R)ᵀ)`` flattened (per group), ``E`` the spectrum."""
        spectrum = self.spectrum(delta, exponent, damping)
        return (self.left_basis.square() @ spectrum @ self.right_basis.square().mT).flatten()


S = TypeVar("S", bound="ProductSpectrum")


class ProductSpectrum:
    """The spectrum ``λ_L λ_Rᵀ`` of a product's eigenform, with a prior precision ``δ``.

    For frozen dataclass eigenforms with the fields ``left_values`` and ``right_values``
    (each factor's eigenvalues).
    """

    left_values: Tensor
    right_values: Tensor

    @property
    def eigenvalues(self) -> list[Tensor]:
        """``[λ_L, λ_R]``."""
        return [self.left_values, self.right_values]

    def spectrum(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``(λ_L λ_Rᵀ + δ)^exponent``; with ``damping``, ``((λ_L + √δ)(λ_R + √δ)ᵀ)^exponent``.

        Per group for ``[G, M]`` and ``[G, N]`` eigenvalues (a ``[G, M, N]`` spectrum).
        """
        left, right = self.left_values, self.right_values
        if damping:
            root = torch.sqrt(delta)
            values = (left + root)[..., :, None] * (right + root)[..., None, :]
        else:
            values = left[..., :, None] * right[..., None, :] + delta
        return values if exponent == 1 else torch.pow(values, exponent)

    def scaled(self: S, factor: Tensor | float) -> S:
        """``√factor`` on each factor's eigenvalues (laplace-torch's convention)."""
        root = pow(factor, 1 / 2)
        return replace(  # type: ignore[type-var]
            self, left_values=root * self.left_values, right_values=root * self.right_values
        )


@dataclass(frozen=True)
class DecomposedKronecker(ProductSpectrum, TwoSided):
    """``(Q_L ⊗ Q_R) diag(λ_L ⊗ λ_R) (Q_L ⊗ Q_R)ᵀ``.

    Attributes:
        left_values: ``[M]`` eigenvalues ``λ_L`` of ``L``.
        right_values: ``[N]`` eigenvalues ``λ_R`` of ``R``.
    """

    left_values: Tensor
    right_values: Tensor


class FactorPairSum(BlockSum):
    """Sums of ``left ⊗ right`` blocks over batches and ranks, ``approx`` or ``running``.

    What :class:`KroneckerSum` and the diagonal-row-side sum share: over ranks,
    ``approx`` sums ``Σ left`` and ``Σ n·right`` (one all-reduce), ``running`` gathers every
    rank's product and takes the nearest product of their sum (:meth:`_merge`), ``tr
    right`` the sample-weighted mean of the ranks'.
    """

    def __init__(self, zero: Block, aggregation: Aggregation, hint: str):
        super().__init__(zero)
        self.aggregation = Aggregation.parse(
            aggregation, "aggregation", hint, members=Aggregation.of_factors()
        )

    @staticmethod
    @abstractmethod
    def _merge(lefts: Tensor, rights: Tensor, trace: Tensor) -> tuple[Tensor, Tensor]:
        """Return the nearest product to ``Σ_k lefts[k] ⊗ rights[k]``, ``tr right = trace``."""

    def summed(self) -> list[Tensor]:
        """``approx``: ``[Σ s L, Σ n R]``; ``running``: nothing."""
        if self.aggregation is not Aggregation.APPROX:
            return []
        block = self.result()
        return [block.left, block.right * float(self.num_samples)]  # type: ignore[attr-defined]

    def gathered(self) -> list[Tensor]:
        """Return ``running``: ``[L, R]`` of this rank's aggregate; ``approx``: nothing."""
        if self.aggregation is Aggregation.APPROX:
            return []
        block = self.result()
        return [block.left, block.right]  # type: ignore[attr-defined]

    def combine(self, summed: list[Tensor], gathered: list[list[Tensor]], counts: Tensor) -> Block:
        """``approx``: ``Σ L ⊗ (Σ n R / Σ n)``; ``running``: the optimum of ``Σ_r L_r ⊗ R_r``."""
        make = type(self.zero)
        total = float(counts.sum())
        if self.aggregation is Aggregation.APPROX:
            left, right_sum = summed
            return make(left, right_sum / total if total > 0 else right_sum)
        ranks = [r for r in range(len(counts)) if counts[r] > 0]
        lefts = torch.stack([gathered[r][0] for r in ranks])
        rights = torch.stack([gathered[r][1] for r in ranks])
        if len(ranks) == 1:
            return make(lefts[0], rights[0])
        weights = counts[ranks].to(rights)
        traces = torch.diagonal(rights, dim1=-2, dim2=-1).sum(-1)  # [W] (or [W, G] per group)
        spread = weights.reshape(-1, *([1] * (traces.dim() - 1)))
        trace = (spread * traces).sum(0) / weights.sum()
        return make(*self._merge(lefts, rights, trace))


class KroneckerSum(FactorPairSum):
    """``Σ_p s_p L_p ⊗ R_p`` aggregated as ``approx`` or ``running`` (docs/conventions.md §4).

    :class:`~kfoc_backpack.solver.KroneckerAccumulator` with sample-count weights, so the
    input-side factor keeps K-FAC's split over all inputs seen; over ranks as
    :class:`FactorPairSum`.
    """

    def __init__(self, zero: KroneckerBlock, aggregation: Aggregation):
        super().__init__(
            zero,
            aggregation,
            " The data-set optimum needs the per-sample terms: use optimal_factors().",
        )
        self._accumulator: KroneckerAccumulator | None = None

    @staticmethod
    def _merge(lefts: Tensor, rights: Tensor, trace: Tensor) -> tuple[Tensor, Tensor]:
        merged = nearest_kronecker_sum(lefts, rights, right_trace=trace)
        return merged.left, merged.right

    def _add(self, block: Block, num_samples: int, scale: float) -> None:
        if self._accumulator is None:
            self._accumulator = KroneckerAccumulator(self.aggregation)
        self._accumulator.update(block.left, block.right, weight=num_samples, scale=scale)  # type: ignore[attr-defined]

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self._accumulator is None

    def result(self) -> KroneckerBlock:
        """Return the aggregate in K-FAC's split over all inputs added (zero while empty)."""
        if self._accumulator is None:
            return self.zero  # type: ignore[return-value]
        return KroneckerBlock(*self._accumulator.factors(normalize=False))
