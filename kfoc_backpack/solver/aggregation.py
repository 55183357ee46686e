r"""Aggregation of per-batch Kronecker factors over a data set (docs/conventions.md §4).

The target is ``F = Σ_p w_p F_p`` with ``F_p ≈ L_p ⊗ R_p`` the batch blocks and
``w_p`` their weights. Weight by sample count, never by batch count: with a loss
reduced by ``mean`` each ``F_p`` is a batch mean and ``w_p = n_p / Σ_q n_q`` gives the
data-set mean; with ``sum`` reduction ``w_p = 1`` gives the data-set sum.

* ``"approx"`` (paper's K-FOC_approx): ``(Σ_p w_p L_p) ⊗ (Σ_p w_p R_p / Σ_p w_p)``,
  factor-wise sums as in K-FAC.
* ``"running"`` (paper's K-FOC_running): after each batch the optimal Kronecker
  product of ``Ŝ + w_p L_p ⊗ R_p`` (two terms, closed form), where ``Ŝ`` is the
  running estimate of ``Σ_{q<p} w_q F_q``.

Both keep K-FAC's scale split: the right factor has the weighted mean trace of the
batch right factors (see :func:`kfoc_backpack.solver.scale.scale_split`).
The data-set optimum (``"optimal"``) needs the per-sample terms, see
:func:`kfoc_backpack.solver.nearest_kronecker_terms`.

Index conventions of this module: ``p`` batches (blocks), ``M`` output features (left
factor ``[M, M]``), ``N`` input features (right factor ``[N, N]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfoc_backpack.enums import Aggregation
from kfoc_backpack.solver.scale import finalize
from kfoc_backpack.solver.sum import merge_kronecker


class KroneckerAccumulator:
    """Running aggregate of weighted Kronecker products ``Σ_p w_p L_p ⊗ R_p``.

    Example::

        acc = KroneckerAccumulator("running")
        for X, y in loader:
            ...  # backward with KFOC()
            acc.update(*layer.weight.kfoc, weight=len(X))
        L, R = acc.factors(normalize=True)   # weights divided by their sum

    Args:
        aggregation: ``"approx"`` or ``"running"``
            (:class:`~kfoc_backpack.enums.Aggregation`).

    Raises:
        ValueError: For another aggregation, listing these two.
    """

    def __init__(self, aggregation: Aggregation | str = Aggregation.RUNNING):
        self.aggregation = Aggregation.parse(
            aggregation,
            "aggregation",
            " The data-set optimum needs the per-sample terms.",
            members=Aggregation.of_factors(),
        )
        self.total_weight = 0.0
        self._left: Tensor | None = None
        self._right: Tensor | None = None
        self._right_trace: Tensor | None = None

    def update(
        self, left: Tensor, right: Tensor, weight: float = 1.0, scale: float | None = None
    ) -> None:
        """Add the batch product ``scale · left ⊗ right``.

        Args:
            left: ``[M, M]`` left factor of the batch.
            right: ``[N, N]`` right factor of the batch.
            weight: The batch's weight ``w_p ≥ 0`` in the averages of the right factor
                (its number of samples, so a short batch is not over-weighted).
            scale: Multiplier of the batch's product in the target (default
                ``weight``; pass ``1`` to sum blocks of a loss with ``sum`` reduction
                while still averaging the right factor by sample count).

        Raises:
            ValueError: For a negative weight or scale, or factors of changing shape.
        """
        scale = weight if scale is None else scale
        if weight < 0 or scale < 0:
            raise ValueError(f"weight and scale must be non-negative, got {weight}, {scale}.")
        # accumulate (scale/weight)·left with weight: Σ scale·L ⊗ (Σ weight·R / Σ weight)
        left = left * (scale / weight) if weight > 0 else left * 0
        trace = torch.diagonal(right).sum() * weight
        if self._left is None:
            first_right = right * weight if self.aggregation is Aggregation.APPROX else right
            self._left, self._right, self._right_trace = left * weight, first_right, trace
            self.total_weight = float(weight)
            return
        if left.shape != self._left.shape or right.shape != self._right.shape:
            raise ValueError(
                f"Factor shapes changed from {tuple(self._left.shape)}, "
                f"{tuple(self._right.shape)} to {tuple(left.shape)}, {tuple(right.shape)}."
            )
        self.total_weight += float(weight)
        self._right_trace = self._right_trace + trace
        if self.aggregation is Aggregation.APPROX:
            self._left = self._left + weight * left
            self._right = self._right + weight * right
        else:
            merged = merge_kronecker(self._left, self._right, left, right, 1.0, weight)
            self._left, self._right = merged.left, merged.right

    def factors(self, normalize: bool = False) -> tuple[Tensor, Tensor]:
        """Return the aggregate ``(L, R)`` in K-FAC's scale split.

        Args:
            normalize: Divide the weights by their sum (e.g. the data-set mean when
                the weights are sample counts).

        Returns:
            ``(L, R)`` with ``L ⊗ R ≈ Σ_p w_p F_p`` (or its normalised version).

        Raises:
            RuntimeError: If nothing was added yet.
        """
        if self._left is None:
            raise RuntimeError("KroneckerAccumulator.factors() called before any update().")
        total = self.total_weight
        if self.aggregation is Aggregation.APPROX:
            left = self._left
            right = self._right / total if total > 0 else self._right
        else:
            target = self._right_trace / total if total > 0 else self._right_trace
            left, right = finalize(self._left, self._right, self._left.dtype, False, target)
        if normalize and total > 0:
            left = left / total
        return left, right
