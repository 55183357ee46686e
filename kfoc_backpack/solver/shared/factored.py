r"""The route through the output-side vectors and inputs, ``X`` never formed: ``factored``.

:class:`FactoredRouteTerms` keeps ``G`` ``[J, K, T, M]`` and ``A`` ``[K, T, N]`` and
applies the left power map by the half-steps of
:class:`~kfoc_backpack.solver.FactoredTerms`: a step costs
``2·(J·K·T·M·(M + T) + K·T·N·(N + T))``. Its working memory is small (``J·K·T²``
coefficients): where no route fits the memory cap, the chooser's smallest is mostly
this one.

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features (left factor ``[M, M]``), ``N`` input features (right ``[N, N]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kfoc_backpack.enums import Route
from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    left_start,
    working_tensors,
    zero_solution,
)
from kfoc_backpack.solver.factored import FactoredTerms
from kfoc_backpack.solver.shared.route import LayerSizes, RouteTerms, krylov_solve


def kfac_left(grads: Tensor) -> Tensor:
    """K-FAC's left factor ``Σ_{j,k,t} g gᵀ`` (``[M, M]``) of ``grads`` ``[J, K, T, M]``."""
    flat = grads.reshape(-1, grads.shape[-1])
    return flat.T @ flat


def factored_flops(sizes: LayerSizes) -> tuple[int, int]:
    """``(J·K·T·M·(M + T), K·T·N·(N + T))``: the output-side and input-side half-steps."""
    cols, num, pos, m, n = sizes[:5]
    return cols * num * pos * m * (m + pos), num * pos * n * (n + pos)


@dataclass(frozen=True)
class FactoredRouteTerms(FactoredTerms, RouteTerms):
    """:class:`~kfoc_backpack.solver.FactoredTerms` solved by Lanczos (route ``factored``).

    Attributes:
        grads: ``[J, K, T, M]`` output-side vectors.
        inputs: ``[K, T, N]`` input-side vectors.
    """

    route = Route.FACTORED
    ops_per_step = 14

    @classmethod
    def flops(cls, sizes: LayerSizes, steps: int) -> int:
        """``2·(J·K·T·M·(M + T) + K·T·N·(N + T))`` a step, ``K·T·N·(N + T)`` at the end."""
        left_factored, right_factored = factored_flops(sizes)
        return 2 * steps * (left_factored + right_factored) + right_factored

    @classmethod
    def working_bytes(cls, sizes: LayerSizes, itemsize: int) -> float:
        """Count the ``J·K·T²`` coefficients and one ``K·T·max(M, N)`` product."""
        cols, num, pos, m, n = sizes[:5]
        return itemsize * (cols * num * pos * pos + num * pos * max(m, n))

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int = 1) -> FactoredRouteTerms:
        """``G`` and ``A`` as they are (ungrouped layers only)."""
        return cls(grads, inputs)

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors by Lanczos on the factored half-steps."""
        opts, out_dtype, tensors = working_tensors(options, self.grads, self.inputs)
        # contiguous once (a convolution's vectors arrive as a transposed view): every
        # half-step's products then run over all rows without a copy
        terms = FactoredTerms(*(t.contiguous() for t in tensors))
        m, n = terms.shape
        if terms.num_terms == 0 or terms.grads.shape[2] == 0:
            return zero_solution(m, n, terms.grads, out_dtype)
        start = left_start(m, terms.grads, opts, init, lambda: kfac_left(terms.grads))
        return krylov_solve(
            lambda mat: terms.to_left(terms.to_right(mat)),
            terms.to_right,
            start,
            opts,
            out_dtype,
            right_trace,
            "factored route",
        )
