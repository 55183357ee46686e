r"""One parameter's aggregate over batches, and one earlier product as a term.

A weight block arrives per batch as K-FOC factors ``[L_p, R_p]`` (``F_p ≈ L_p ⊗ R_p``,
K-FAC's scale split over the ``n_p`` inputs of the batch), a bias block as ``[B_p]``
(exact). See :mod:`kfoc_backpack.dataset.options` for the index conventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.dataset.options import BATCH_AGGREGATIONS, check_choice
from kfoc_backpack.solver import KroneckerAccumulator


def factor_shapes(param: Tensor) -> tuple[int, ...]:
    """``(M, N_in)`` of a weight (``param.dim() ≥ 2``), ``(M,)`` of a bias."""
    if param.dim() >= 2:
        return (param.shape[0], param[0].numel())
    return (param.numel(),)


def zero_block(param: Tensor) -> list[Tensor]:
    """All-zero ``[L, R]`` (weights) or ``[B]`` (biases) of a parameter, on its device and dtype."""
    return [param.new_zeros(size, size) for size in factor_shapes(param)]


class BlockAccumulator:
    """Aggregate of one parameter's per-batch blocks, ``Σ_p s_p F_p``.

    Weight blocks are combined by :class:`~kfoc_backpack.solver.KroneckerAccumulator`
    with sample-count weights, so the input-side factor keeps K-FAC's split over all
    inputs seen; bias blocks are summed.

    Args:
        aggregation: ``"approx"`` or ``"running"``.
    """

    def __init__(self, aggregation: str = "running"):
        self.aggregation = check_choice(
            aggregation,
            "aggregation",
            BATCH_AGGREGATIONS,
            " The data-set optimum needs the per-sample terms: use optimal_factors().",
        )
        self._kron: KroneckerAccumulator | None = None
        self._sum: Tensor | None = None
        self.num_samples = 0

    def update(self, block: Sequence[Tensor], num_samples: int, scale: float = 1.0) -> None:
        """Add ``scale · F_p`` for one batch.

        Args:
            block: ``[L_p, R_p]`` (``[M, M]``, ``[N_in, N_in]``) or ``[B_p]`` (``[M, M]``).
            num_samples: Number of inputs ``n_p ≥ 1`` of the batch.
            scale: Weight ``s_p`` of the batch's block in the target.

        Raises:
            ValueError: For a block that is neither one nor two matrices, a change
                between the two kinds, or ``num_samples < 1``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        self.num_samples += int(num_samples)
        if len(block) == 2:
            if self._sum is not None:
                raise ValueError("A parameter's blocks changed from [B] to [L, R].")
            if self._kron is None:
                self._kron = KroneckerAccumulator(self.aggregation)
            left, right = block
            self._kron.update(left, right, weight=num_samples, scale=scale)
        elif len(block) == 1:
            if self._kron is not None:
                raise ValueError("A parameter's blocks changed from [L, R] to [B].")
            term = block[0] * scale
            self._sum = term if self._sum is None else self._sum + term
        else:
            raise ValueError(f"Expected a block [L, R] or [B], got {len(block)} matrices.")

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self._kron is None and self._sum is None

    def factors(self) -> list[Tensor]:
        """``[L, R]`` (K-FAC split over all inputs seen) or ``[B]``.

        Raises:
            RuntimeError: If nothing was added yet.
        """
        if self._kron is not None:
            return list(self._kron.factors(normalize=False))
        if self._sum is not None:
            return [self._sum]
        raise RuntimeError("BlockAccumulator.factors() called before any update().")


@dataclass(frozen=True)
class KroneckerTerm:
    """A single product ``L ⊗ R`` with the half-steps of the power method.

    Adds an earlier approximation (of previous data in an online fit) to the target
    of the data-set optimum.

    Attributes:
        left: ``[M, M]``.
        right: ``[N_in, N_in]``.
    """

    left: Tensor
    right: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N_in)``: sizes of the left and right factors."""
        return self.left.shape[-1], self.right.shape[-1]

    @property
    def like(self) -> Tensor:
        """A stored tensor, whose device and dtype the term has."""
        return self.left

    def to_right(self, left: Tensor) -> Tensor:
        """``⟨L₀, L⟩ R₀``."""
        return (self.left * left).sum() * self.right

    def to_left(self, right: Tensor) -> Tensor:
        """``⟨R₀, R⟩ L₀``."""
        return (self.right * right).sum() * self.left


def normalized(mat: Tensor) -> tuple[Tensor, Tensor]:
    """``(mat / ‖mat‖_F, ‖mat‖_F)``; a zero matrix stays zero."""
    norm = torch.linalg.matrix_norm(mat)
    return mat / torch.where(norm > 0, norm, torch.ones_like(norm)), norm
