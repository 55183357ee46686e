r"""The routes that form the per-sample matrices: ``formed`` and ``operator``.

Both hold ``X`` ``[J·K, M, N]`` (formed once, ``J·K·T·M·N``; a grouped convolution's by
one grouped product, :func:`formed_samples`) and differ in how they apply the left power
map ``S(L) = Σ_{ab} X_a (X_bᵀ L X_b) X_aᵀ`` (:mod:`~kfoc_backpack.solver.shared.route`):

* ``formed`` (:class:`FormedRouteTerms`): two half-steps over ``X``, a step costs
  ``2·J·K·M·N·(M + N)``. On accelerators and for tiny layers its solve is
  ``SampleTerms.solve``'s (the power method of a few operations per step, or the
  squared ``M² × M²`` map), else Lanczos.
* ``operator`` (:class:`OperatorRouteTerms`): the blocks ``P_{ab} = X_a X_bᵀ`` formed
  once (``(J·K·M)²·N``), a step ``L ↦ Σ_{ab} P_{ab} L P_{ab}ᵀ`` costs ``2·(J·K)²·M³``
  and never touches ``N``.

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features (left factor ``[M, M]``), ``N`` input features (right ``[N, N]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.enums import Route
from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    launch_bound,
    left_start,
    working_tensors,
    zero_solution,
)
from kfoc_backpack.solver.power import output_major, samples_half_steps
from kfoc_backpack.solver.samples import nearest_kronecker_samples
from kfoc_backpack.solver.shared.gram import PositionGram
from kfoc_backpack.solver.shared.route import LayerSizes, RouteTerms, krylov_solve
from kfoc_backpack.solver.symmetric import SYM_MIN_COLUMNS, congruence_sum
from kfoc_backpack.solver.terms import SampleTerms

TINY_STEP_FLOPS = 3 * 10**8
"""On the CPU, layers whose formed step ``2·J·K·M·N·(M + N)`` is below this many
multiply-adds (a few milliseconds: LeNet-5's convolutions, ResNet's stem) are bound by
dispatched operations, not flops: formed, they run ``SampleTerms.solve``, the power
method of a few operations per step, instead of a Lanczos route with its dozens
(``integration/benchmark.py``'s operation counts)."""


def is_tiny(samples: int, m: int, n: int) -> bool:
    """Whether a step over ``samples = J·K`` ``[M, N]`` matrices is below the tiny limit."""
    return 2 * samples * m * n * (m + n) < TINY_STEP_FLOPS


SQUARING_MAX_PAIRS = 1 << 24
"""Largest ``(J·K·M)²`` of the formed route's squaring on accelerators."""

SQUARING_MAX_FLOPS = 10**10
"""Largest flop count of the formed route's squaring on accelerators."""


def squaring_fits(samples: int, m: int, n: int) -> bool:
    """Whether ``SampleTerms.solve`` squares the ``M² × M²`` left map on accelerators.

    Mirrors the solver's own test (``(J·K·M)² ≤ 2²⁴`` pair products and
    ``2·(J·K·M)²·(N + M²) ≤ 10¹⁰`` flops): there a fixed few dozen launches and an
    exact finish solve the layer, which no route here beats on a launch-bound device.
    """
    pairs = (samples * m) ** 2
    return pairs <= SQUARING_MAX_PAIRS and 2 * pairs * (n + m * m) <= SQUARING_MAX_FLOPS


def formed_samples(grads: Tensor, inputs: Tensor, groups: int = 1) -> Tensor:
    """Form the per-sample matrices ``X_{j,k} = G_{j,k}ᵀ A_k``, ``[J·K, M, N]``, output-major.

    Args:
        grads: ``[J, K, T, M]`` output-side vectors (any strides).
        inputs: ``[K, T, N·groups]`` inputs (any strides).
        groups: Blocks of the weight's rows that see disjoint blocks of the input
            features: a grouped convolution's ``[M, N]`` weight, one grouped product.
    """
    columns, num, _, out_features = grads.shape
    if groups > 1:
        per_group = torch.einsum(  # [g, M/g, J, K, N], output-major
            "mntgo,ntgi->gomni",
            grads.unflatten(3, (groups, -1)),
            inputs.unflatten(2, (groups, -1)),
        )
        return per_group.reshape(out_features, columns * num, -1).transpose(0, 1)
    if columns == 1:  # one column: a single batched product
        prods = torch.bmm(grads[0].mT, inputs).unsqueeze(0)  # [1, K, M, N]
        out_major = prods.permute(2, 0, 1, 3).contiguous()
    else:  # einsum contracts batched over K with J·M rows, no copy of the input
        out_major = torch.einsum("mnto,nti->omni", grads, inputs).contiguous()
    return out_major.flatten(start_dim=1, end_dim=2).transpose(0, 1)


def formed_flops(sizes: LayerSizes) -> tuple[int, int]:
    """``(J·K·T·M·N, J·K·M·N·(M + N))``: forming ``X``, and ``R`` formed from it once."""
    cols, num, pos, m, n = sizes[:5]
    jk = cols * num
    return jk * pos * m * n, jk * m * n * (m + n)


@dataclass(frozen=True)
class FormedRouteTerms(SampleTerms, RouteTerms):
    """:class:`~kfoc_backpack.solver.SampleTerms` solved by Lanczos (route ``formed``).

    Any grouping; on accelerators it takes precedence wherever :func:`squaring_fits`.

    Attributes:
        samples: ``[J·K, M, N]`` per-sample matrices.
    """

    route = Route.FORMED
    ops_per_step = 12

    @classmethod
    def supports(cls, sizes: LayerSizes) -> bool:
        """Every layer (a grouped convolution's matrices are formed by one product)."""
        return True

    @classmethod
    def flops(cls, sizes: LayerSizes, steps: int) -> int:
        """``J·K·T·M·N`` once, ``2·J·K·M·N·(M + N)`` a step, ``J·K·M·N·(M + N)`` at the end."""
        form, right_formed = formed_flops(sizes)
        return form + 2 * steps * right_formed + right_formed

    @classmethod
    def working_bytes(cls, sizes: LayerSizes, itemsize: int) -> float:
        """``X`` itself, ``J·K·M·N`` numbers."""
        cols, num, _, m, n = sizes[:5]
        return itemsize * cols * num * m * n

    @classmethod
    def takes_precedence(cls, sizes: LayerSizes, accelerator: bool) -> bool:
        """On accelerators wherever :func:`squaring_fits` (the solver's launch-bound route)."""
        cols, num, _, m, n = sizes[:5]
        return accelerator and squaring_fits(cols * num, m, n)

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int = 1) -> FormedRouteTerms:
        """``X`` formed (:func:`formed_samples`)."""
        return cls(formed_samples(grads, inputs, groups))

    def runs_lanczos(self) -> bool:
        """Not on accelerators nor for tiny layers (``SampleTerms.solve``'s power method)."""
        return not (launch_bound(self.samples.device) or is_tiny(*self.samples.shape))

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors; on accelerators and for tiny layers ``SampleTerms.solve``."""
        if launch_bound(self.samples.device):
            return super().solve(options, init, right_trace)
        if is_tiny(*self.samples.shape):
            return nearest_kronecker_samples(
                self.samples, options=options, init=init, right_trace=right_trace
            )
        opts, out_dtype, (samples,) = working_tensors(options, self.samples)
        num, m, n = samples.shape
        if num == 0:
            return zero_solution(m, n, samples, out_dtype)
        gemm_right, to_left = samples_half_steps(samples, output_major(samples))
        start = left_start(m, samples, opts, init, lambda: to_left(torch.eye(n).to(samples)))

        def to_right(left: Tensor) -> Tensor:  # Σ X_aᵀ L X_a, symmetric product (2/3 flops)
            if n < SYM_MIN_COLUMNS:  # one general product: fewer operations
                return gemm_right(left)
            return congruence_sum((left + left.T) / 2, samples)

        return krylov_solve(
            lambda mat: to_left(to_right(mat)),
            lambda left: congruence_sum((left + left.T) / 2, samples),
            start,
            opts,
            out_dtype,
            right_trace,
            "formed route",
            symmetric_right=True,
        )


@dataclass(frozen=True)
class OperatorRouteTerms(SampleTerms, RouteTerms):
    """Formed terms solved through ``P_{ab} = X_a X_bᵀ`` (route ``operator``).

    Wins where ``J·K·M`` is small against ``N`` and ``M`` small against ``T`` (early
    layers with few output channels on many positions, one column per sample): a step
    ``L ↦ Σ_{ab} P_{ab} L P_{ab}ᵀ`` costs ``2·(J·K)²·M³`` and never touches ``N``. Any
    grouping; on the CPU a tiny layer (:func:`is_tiny`) for which it wins defers to
    ``formed`` (the power method's few operations).

    Attributes:
        samples: ``[J·K, M, N]`` per-sample matrices.
    """

    route = Route.OPERATOR
    ops_per_step = 12

    @classmethod
    def supports(cls, sizes: LayerSizes) -> bool:
        """Every layer (a grouped convolution's matrices are formed by one product)."""
        return True

    @classmethod
    def flops(cls, sizes: LayerSizes, steps: int) -> int:
        """``X`` and ``P`` once, ``2·(J·K)²·M³`` a step, ``J·K·M·N·(M + N)`` at the end."""
        cols, num, _, m, n = sizes[:5]
        jk = cols * num
        form, right_formed = formed_flops(sizes)
        return form + (jk * m) ** 2 * n + 2 * steps * jk**2 * m**3 + right_formed

    @classmethod
    def working_bytes(cls, sizes: LayerSizes, itemsize: int) -> float:
        """``X`` and the symmetric ``[J·K·M, J·K·M]`` blocks with one temporary."""
        cols, num, _, m, n = sizes[:5]
        jk = cols * num
        return itemsize * (jk * m * n + 2 * (jk * m) ** 2)

    @classmethod
    def defers_to(cls, sizes: LayerSizes, accelerator: bool) -> Route | None:
        """``formed`` for a tiny layer on the CPU, where the power method's few operations win.

        (``factored`` and ``gram`` keep the few positions in the smaller stored form.)
        """
        cols, num, _, m, n = sizes[:5]
        if not accelerator and is_tiny(cols * num, m, n):
            return Route.FORMED
        return None

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int = 1) -> OperatorRouteTerms:
        """``X`` formed (:func:`formed_samples`); ``P`` is formed by the solve."""
        return cls(formed_samples(grads, inputs, groups))

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors: Lanczos through the ``P_{ab}`` blocks."""
        opts, out_dtype, (samples,) = working_tensors(options, self.samples)
        num, m, n = samples.shape
        if num == 0:
            return zero_solution(m, n, samples, out_dtype)
        gram = PositionGram(samples)  # "positions" are the M rows of each X_a

        def to_right(left: Tensor) -> Tensor:  # Σ_a X_aᵀ L X_a, formed once
            gram.release()
            return congruence_sum(left, samples)

        def apply(left: Tensor) -> Tensor:  # Σ_ab P_ab L P_abᵀ
            return gram.apply_summed(left)

        def default() -> Tensor:  # Σ_a X_a X_aᵀ: one half-step from R = I
            return torch.diagonal(gram.full.view(num, m, num, m), dim1=0, dim2=2).sum(-1)

        start = left_start(m, samples, opts, init, default)
        return krylov_solve(
            apply, to_right, start, opts, out_dtype, right_trace, "operator route", True
        )
