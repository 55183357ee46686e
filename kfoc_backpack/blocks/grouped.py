r"""A grouped convolution's per-group block: one Kronecker product per group.

A convolution with ``groups = G`` has a weight ``W`` (``C_out × C_in/G·Πkernel``) whose
``G`` blocks of ``M = C_out/G`` rows each see only their own group's ``N =
C_in/G·Πkernel`` input features. In row-major ``vec`` each group's ``M·N`` entries are
contiguous, and the per-group block is the block-diagonal

.. math::
    B = \operatorname{blockdiag}_g (L_g ⊗ R_g), \qquad L_g ∈ ℝ^{M×M},\; R_g ∈ ℝ^{N×N},

each ``L_g ⊗ R_g`` the Frobenius-optimal product for the group's own block ``F_gg`` of
the weight's block ``F`` (the blocks between groups are dropped). Against the coupled
product ``L ⊗ R`` over all rows (a dense ``C_out × C_out`` factor, one ``R`` shared by
the groups) it is cheaper (``G`` solves of ``M × N`` problems) and farther from ``F``
on most measured library layers (docs/conventions.md §11): an option, not the default.
A depthwise layer (``M = 1``) gets each channel's exact ``Πkernel × Πkernel`` block.

Everything is the Kronecker block's algebra batched over the leading ``G``: the
eigenform is :class:`~kfoc_backpack.blocks.kronecker.DecomposedKronecker` with ``[G, …]``
tensors, the corrected form (:class:`GroupedCorrected`) keeps each group's basis with
the data's ``[G, M, N]`` diagonal. The factors keep K-FAC's split per group (``tr R_g``
the group's mean squared input).

Index conventions: ``G`` groups, ``M``/``N`` the sizes of each group's left/right
factors, ``W`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.blocks.base import Block
from kfoc_backpack.blocks.corrected import EigenCorrected
from kfoc_backpack.blocks.kronecker import (
    DecomposedKronecker,
    FactorPair,
    FactorPairSum,
    KroneckerBlock,
)
from kfoc_backpack.enums import Aggregation, Grouped
from kfoc_backpack.solver import KroneckerAccumulator, nearest_kronecker_sum
from kfoc_backpack.solver.eigen import stacked_symeig


@dataclass(frozen=True)
class GroupedKroneckerBlock(FactorPair, Block):
    """``blockdiag_g(L_g ⊗ R_g)`` of a grouped convolution's weight.

    Attributes:
        left: ``[G, M, M]`` output-side factors, symmetric.
        right: ``[G, N, N]`` input-side factors, symmetric.
    """

    left: Tensor
    right: Tensor
    kind = "grouped_kronecker"

    @classmethod
    def zeros(cls, groups: int, rows: int, columns: int, like: Tensor) -> GroupedKroneckerBlock:
        """``G`` products ``0 ⊗ 0`` of ``[M, M]`` and ``[N, N]`` factors, on ``like``'s device."""
        zeros = like.new_zeros
        return cls(zeros(groups, rows, rows), zeros(groups, columns, columns))

    @property
    def groups(self) -> int:
        """``G``."""
        return self.left.shape[0]

    @property
    def size(self) -> int:  # type: ignore[override]
        """``G·M·N``: the weight's entries."""
        return self.groups * self.left.shape[-1] * self.right.shape[-1]

    def coupled_zero(self) -> KroneckerBlock:
        """Return the zero ``L ⊗ R`` over all ``G·M`` rows (the coupled structure's)."""
        return KroneckerBlock.zeros(
            self.groups * self.left.shape[-1], self.right.shape[-1], self.left
        )

    def with_structure(self, grouped: Grouped) -> Block:
        """Return this block, or :meth:`coupled_zero` where ``grouped`` couples the groups."""
        if grouped is Grouped.PER_GROUP:
            return self
        return self.coupled_zero()

    def from_kfacs(self, kfacs: object, what: str = "the block") -> Block:
        """Return a block from ``[L_g…, R_g…]`` (``[G, M, M]``, ``[G, N, N]``), or coupled.

        laplace-torch's ``kron`` and BackPACK's savefields hold a grouped weight's
        factors coupled (``[G·M, G·M]``, ``[N, N]``): those give a
        :class:`~kfoc_backpack.blocks.KroneckerBlock`.

        Raises:
            ValueError: For matrices of neither layout's shapes.
        """
        coupled = self.coupled_zero()
        shapes = [tuple(t.shape) for t in coupled.kfacs]
        if (
            isinstance(kfacs, (list, tuple))
            and [tuple(getattr(t, "shape", ())) for t in kfacs] == shapes
        ):
            return coupled.from_kfacs(kfacs, what)
        return super().from_kfacs(kfacs, what)

    def decompose(self, what: str = "the block") -> DecomposedKronecker:
        """Each group's factors' ``symeig`` (laplace-torch's ``Kron.decompose``, batched)."""
        l_left, q_left = stacked_symeig(self.left, f"the left factors of {what}")
        l_right, q_right = stacked_symeig(self.right, f"the right factors of {what}")
        return DecomposedKronecker(q_left, q_right, l_left, l_right)

    def corrected_basis(self, what: str = "the block") -> GroupedCorrected:
        """Return each group's eigenbasis with ``S = 0`` (and the factors, for online fits)."""
        return GroupedCorrected.basis_of(self, what)

    def new_sum(self, aggregation: Aggregation) -> GroupedKroneckerSum:
        """Return a sum of per-group products aggregated as ``aggregation``."""
        return GroupedKroneckerSum(self, aggregation)

    def dense(self) -> Tensor:
        """``blockdiag_g(L_g ⊗ R_g)``, ``[G·M·N, G·M·N]`` (small layers and tests)."""
        return torch.block_diag(*(torch.kron(lf, rf) for lf, rf in zip(self.left, self.right)))

    def trace(self) -> Tensor:
        """``Σ_g tr L_g · tr R_g``."""
        left = self.left.diagonal(dim1=-2, dim2=-1).sum(-1)
        return (left * self.right.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()


@dataclass(frozen=True)
class GroupedCorrected(EigenCorrected):
    """The per-group block's eigenbases with the data's own eigenvalues.

    ``blockdiag_g((U_{L,g} ⊗ U_{R,g}) diag(vec S_g) (U_{L,g} ⊗ U_{R,g})ᵀ)``.

    Attributes:
        left_basis: ``[G, M, M]``.
        right_basis: ``[G, N, N]``.
        diagonal: ``[G, M, N]`` ``S``.
        factors: The per-group factors whose bases these are, where known.
    """

    factors: GroupedKroneckerBlock | None = None  # type: ignore[assignment]
    kind = "grouped_corrected"
    factors_class = GroupedKroneckerBlock


class GroupedKroneckerSum(FactorPairSum):
    """``Σ_p s_p blockdiag_g(L_{p,g} ⊗ R_{p,g})``, aggregated per group.

    As :class:`~kfoc_backpack.blocks.kronecker.KroneckerSum` for each group: ``approx``
    sums ``s L_g`` and averages ``R_g`` by sample count; ``running`` keeps each group's
    nearest product to its sum so far and the batch's. With one row per group
    (depthwise) a product ``l_g R_g`` is the group's whole block, and ``running`` sums
    the blocks exactly. Over ranks as :class:`FactorPairSum`, per group.
    """

    def __init__(self, zero: GroupedKroneckerBlock, aggregation: Aggregation):
        super().__init__(
            zero,
            aggregation,
            " The data-set optimum of a per-group block is not supported: use 'running' "
            "or 'approx', or grouped='coupled'.",
        )
        self._groups: list[KroneckerAccumulator] | None = None
        self._left: Tensor | None = None
        self._right: Tensor | None = None
        self._trace: Tensor | None = None

    @property
    def _exact(self) -> bool:
        """Whether products are the groups' whole blocks (one row per group), summed exactly."""
        return self.aggregation is Aggregation.RUNNING and self.zero.left.shape[-1] == 1  # type: ignore[attr-defined]

    @staticmethod
    def _merge(lefts: Tensor, rights: Tensor, trace: Tensor) -> tuple[Tensor, Tensor]:
        """Per group, the nearest product to ``Σ_w lefts[w, g] ⊗ rights[w, g]``."""
        if lefts.shape[-1] == 1:  # one row per group: the sum is a product
            return split_blocks((lefts * rights).sum(0), trace)
        pairs = []
        for group in range(lefts.shape[1]):
            merged = nearest_kronecker_sum(
                lefts[:, group], rights[:, group], right_trace=trace[group]
            )
            pairs.append((merged.left, merged.right))
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _add(self, block: Block, num_samples: int, scale: float) -> None:
        left, right = block.left * scale, block.right  # type: ignore[attr-defined]
        trace = right.diagonal(dim1=-2, dim2=-1).sum(-1) * num_samples
        if self.aggregation is Aggregation.APPROX or self._exact:
            first = self._left is None
            weighted = right * num_samples if self.aggregation is Aggregation.APPROX else None
            if self._exact:  # the groups' blocks l_g R_g, summed
                weighted = left * right
            self._left = left if first else self._left + left
            self._right = weighted if first else self._right + weighted
            self._trace = trace if first else self._trace + trace
            return
        if self._groups is None:
            self._groups = [KroneckerAccumulator(self.aggregation) for _ in range(len(left))]
        lefts = block.left  # type: ignore[attr-defined]
        for group, accumulator in enumerate(self._groups):
            accumulator.update(lefts[group], right[group], weight=num_samples, scale=scale)

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self._left is None and self._groups is None

    def result(self) -> GroupedKroneckerBlock:
        """Return the aggregate, ``tr R_g`` each group's mean over the inputs (zero while empty)."""
        if self.empty:
            return self.zero  # type: ignore[return-value]
        total = float(self.num_samples)
        if self._groups is not None:
            pairs = [acc.factors(normalize=False) for acc in self._groups]
            return GroupedKroneckerBlock(
                torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            )
        if self.aggregation is Aggregation.APPROX:
            return GroupedKroneckerBlock(self._left, self._right / total)  # type: ignore[operator]
        return GroupedKroneckerBlock(*split_blocks(self._right, self._trace / total))  # type: ignore[arg-type, operator]


def split_blocks(blocks: Tensor, right_trace: Tensor) -> tuple[Tensor, Tensor]:
    """``(l [G, 1, 1], R [G, N, N])`` with ``l_g R_g = blocks[g]`` and ``tr R_g = right_trace[g]``.

    One row per group: each group's block is itself a product, split as K-FAC's (a zero
    block, or a zero target trace, gives zero factors).

    Args:
        blocks: ``[G, N, N]`` the groups' blocks.
        right_trace: ``[G]`` the target traces.
    """
    traces = blocks.diagonal(dim1=-2, dim2=-1).sum(-1)
    positive = (traces > 0) & (right_trace > 0)
    ratio = torch.where(positive, right_trace / torch.where(positive, traces, 1), 0)
    left = torch.where(positive, traces / torch.where(positive, right_trace, 1), 0)
    return left[:, None, None], blocks * ratio[:, None, None]
