r"""The route of a weight on a single position: ``rank-one``.

With ``T = 1`` every per-sample matrix ``X_{j,k} = g_{j,k} a_kᵀ`` has rank one, and the
layer is one of :class:`~kfoc_backpack.solver.OuterTerms` (a ``Linear`` on 2-d inputs, a
1×1 convolution on a 1×1 map, a convolution with one output position), solved in the
``K``-dimensional coefficient space of its Gram matrices
(:func:`~kfoc_backpack.solver.nearest_kronecker_outer`). :class:`RankOneRouteTerms`
takes precedence wherever it is supported: no route over positions beats it.

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features (left factor ``[M, M]``), ``N`` input features (right ``[N, N]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kfoc_backpack.enums import Route
from kfoc_backpack.solver.shared.route import LayerSizes, RouteTerms, kfac_cost
from kfoc_backpack.solver.terms import OuterTerms


@dataclass(frozen=True)
class RankOneRouteTerms(OuterTerms, RouteTerms):
    """:class:`~kfoc_backpack.solver.OuterTerms` of a weight on one position (``rank-one``).

    Attributes:
        sqrt_out: ``[K, J, M]`` output-side vectors ``s_{k,j}``.
        inputs: ``[K, N]`` input-side vectors ``a_k``.
    """

    route = Route.RANK_ONE
    ops_per_step = 12
    """Coefficient-space steps (two ``[K, K]`` products and their norms): counted by no
    choice, since the route takes precedence wherever it is supported."""

    @classmethod
    def supports(cls, sizes: LayerSizes) -> bool:
        """One position of an ungrouped weight."""
        return sizes.positions == 1 and sizes.groups == 1

    @classmethod
    def flops(cls, sizes: LayerSizes, steps: int) -> int:
        """Count the two Gram matrices ``K²·(J²·M + N)`` and the factors, formed once.

        Steps of ``K²`` each are negligible (``steps`` is not counted); the factors are
        formed at the end as K-FAC forms its own (``J·K·M² + K·N²``) — see
        :mod:`~kfoc_backpack.solver.outer`.
        """
        cols, num, _, m, n = sizes[:5]
        return num * num * (cols * cols * m + n) + kfac_cost(sizes._replace(positions=1))

    @classmethod
    def working_bytes(cls, sizes: LayerSizes, itemsize: int) -> float:
        """Count the two ``[K, K]`` Gram matrices."""
        return itemsize * 2 * sizes.samples**2

    @classmethod
    def takes_precedence(cls, sizes: LayerSizes, accelerator: bool) -> bool:
        """Return ``True``: wherever supported (one position, ungrouped) the route wins."""
        return True

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int = 1) -> RankOneRouteTerms:
        """``s_{k,j} = g_{j,k,0}`` and ``a_k = a_{k,0}`` (ungrouped, one position)."""
        return cls(grads[:, :, 0].transpose(0, 1), inputs[:, 0])

    def runs_lanczos(self) -> bool:
        """No: the coefficient-space power method or squaring."""
        return False
