r"""A grouped weight's per-sample matrices, group by group.

A grouped convolution's weight ``W`` (``G·M × N``) has ``G`` blocks of ``M`` rows that
see disjoint blocks of ``N`` input features, so its per-sample matrices are
block-rows: group ``g``'s ``X_{k,g}`` (``M × N``) is formed from its own rows' vectors
and its own inputs (``J·K·T·G·M·N`` multiply-adds, the same matrices the coupled routes
``formed`` and ``operator`` hold). :class:`GroupedTerms` keeps them ``[J·K, G, M, N]``:
each group's terms, all rows' (coupled), each group's exact block, and the eigenvalue
correction's diagonal in per-group bases or in one basis over all rows.

Index conventions: ``J`` columns per input, ``K`` inputs, ``G`` groups, ``M``/``N``
rows/input features per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.solver.shared.formed import formed_samples
from kfoc_backpack.solver.terms import FormedSamples, SampleTerms


@dataclass(frozen=True)
class GroupedTerms(FormedSamples):
    """A grouped weight's block ``F = Σ_k vec(X_k) vec(X_k)ᵀ``, its samples split by group.

    Attributes:
        samples: ``[J·K, G, M, N]`` per-sample matrices, group ``g``'s rows at ``[:, g]``.
    """

    samples: Tensor
    route = "per-group"

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int) -> GroupedTerms:
        """Form the matrices of ``[J, K, T, G·M]`` vectors and ``[K, T, G·N]`` inputs."""
        return cls(formed_samples(grads, inputs, groups).unflatten(1, (groups, -1)))

    @property
    def groups(self) -> int:
        """``G``."""
        return self.samples.shape[1]

    def coupled(self) -> Tensor:
        """``[J·K, G·M, N]``: the matrices over all rows (a view)."""
        return self.samples.flatten(1, 2)

    def group(self, index: int) -> SampleTerms:
        """Group ``index``'s terms, ``[J·K, M, N]``."""
        return SampleTerms(self.samples[:, index])

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> GroupedTerms | SampleTerms:
        """Return the terms of ``U_Lᵀ X U_R``: per group, or over all rows.

        Args:
            left_basis: ``[G, M, M]`` a basis per group, or ``[G·M, G·M]`` one over all
                rows (a coupled block's, e.g. K-FAC's).
            right_basis: ``[G, N, N]``, or ``[N, N]``.

        Returns:
            Per group :class:`GroupedTerms` (``J·K·G·M·N·(M + N)``); over all rows
            :class:`~kfoc_backpack.solver.SampleTerms` of ``[J·K, G·M, N]``.
        """
        if left_basis.dim() == 2:
            return SampleTerms(self.coupled()).rotated(left_basis, right_basis)
        like = self.samples
        return GroupedTerms(left_basis.to(like).mT @ like @ right_basis.to(like))

    def diagonal(self) -> Tensor:
        """``[G, M, N]``: ``Σ_k X_{k,g} ⊙ X_{k,g}``, each group's block's diagonal."""
        return self.samples.square().sum(0)

    def blocks(self) -> Tensor:
        """``[G, M·N, M·N]``: each group's own block ``F_gg``."""
        flat = self.samples.flatten(2)
        return torch.einsum("kgp,kgq->gpq", flat, flat)
