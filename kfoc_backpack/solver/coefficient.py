"""The coefficient-space solve, and where each solver takes it instead of the factor space.

Every solver reaches the same optimum by more than one computation; the choice depends
on the sizes and on whether the device is launch-bound (see
:func:`~kfoc_backpack.solver._common.launch_bound`: accelerators, where each
operation costs a kernel launch and each host read a synchronisation, against the
CPU, where flops count). This module holds :func:`coefficient_solve`, the power method
in the ``K``-dimensional coefficient space of the Gram matrices (rank-one terms, the
sum of Kronecker products, formed samples on accelerators), which picks between
stepping, repeated squaring and the exact finish, and the thresholds and predicates
that send a solver there (:func:`outer_power_is_cheaper`,
:func:`samples_operator_fits`, :func:`check_every`). The routes of weights shared over
positions are chosen elsewhere (:mod:`kfoc_backpack.solver.shared`).

Index conventions of this module: ``K`` terms (samples), ``J`` columns per sample,
``M`` output features (left factor ``[M, M]``), ``N`` input features (right factor
``[N, N]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfoc_backpack.solver._common import SolverOptions, launch_bound
from kfoc_backpack.solver.gram import (
    FIRST_TEST_STEPS,
    ScalarsFn,
    coefficient_power_iteration,
    coefficient_squaring_iteration,
    exact_coefficients,
    fetch_scalars,
)

GRAM_MAX_TERMS = 4096
"""Largest number of terms for which the coefficient-space route is used by default."""

SQUARING_MAX_TERMS_CPU = 192
"""Up to this many terms the CPU runs the coefficient solve by repeated squaring."""

_EXPLICIT_GRAM_MAX_ELEMENTS = 1 << 24
"""Memory cap (elements) for materialising ``S_kᵀS_k`` in the outer-product Gram."""

LAUNCH_BOUND_GRAM_FLOPS = 10**10
"""On launch-bound devices the Gram route is taken up to this flop count (about a
millisecond of a current GPU), whatever the factor route would cost: it launches a few
dozen kernels in all, the factor route about fifteen per step."""


def check_every(device: torch.device) -> int:
    """Evaluate stopping criteria less often on accelerators to avoid syncs."""
    return 4 if launch_bound(device) else 1


def outer_power_is_cheaper(
    num: int, cols: int, m: int, n: int, few_launches: bool = False, steps: int = 10
) -> bool:
    """Flop estimate: factor-space power method against the coefficient-space route.

    The Gram route costs ``K²(J² M + N)`` once plus ``O(K²)`` per step; the factor
    route ``O(K (J M² + N²))`` per step (``steps`` assumed), both then form the factors.
    With ``few_launches`` (launch-bound devices) the Gram route is kept up to
    :data:`LAUNCH_BOUND_GRAM_FLOPS`.
    """
    gram = num * num * (cols * cols * m + n) + steps * 4 * num * num
    power = steps * 2 * num * (cols * m * m + n * n)
    if few_launches and 2 * gram <= LAUNCH_BOUND_GRAM_FLOPS:
        return False
    return power < gram


def samples_operator_fits(num: int, m: int, n: int, device: torch.device) -> bool:
    """Whether the operator route of ``nearest_kronecker_samples`` is taken.

    Only on launch-bound devices, where it replaces some ten operations per power step
    by a fixed few dozen in all, and while its ``(K·M)²`` pair products fit the memory
    cap :data:`_EXPLICIT_GRAM_MAX_ELEMENTS` and its flops stay below
    :data:`LAUNCH_BOUND_GRAM_FLOPS`.
    """
    if not launch_bound(device):
        return False
    pairs = (num * m) ** 2
    flops = 2 * pairs * (n + m * m)
    return pairs <= _EXPLICIT_GRAM_MAX_ELEMENTS and flops <= LAUNCH_BOUND_GRAM_FLOPS


def coefficient_solve(
    gram_left: Tensor | None,
    gram_right: Tensor,
    start: Tensor | None,
    opts: SolverOptions,
    scalars: ScalarsFn | None = None,
) -> tuple[Tensor, Tensor, int, bool, list[float]]:
    """Coefficient-space power method, by repeated squaring where that is cheaper.

    Squaring costs a few ``O(K³)`` products and one host transfer per stopping test;
    stepping costs ``O(K²)`` flops but a handful of operations and a host transfer per
    step. On launch-bound devices (accelerators) and for small ``K`` on the CPU
    (dispatch-bound) squaring wins; for large ``K`` on the CPU, stepping does.

    Problems of at most ``opts.exact_max_terms`` terms that the first test (33 steps)
    finds unconverged, or that stepping leaves unconverged at ``max_iter``, are
    finished by :func:`exact_coefficients`: slowly converging problems (a top
    singular value ratio near one) then cost two small eigendecompositions instead
    of hundreds of steps, and still give the optimum.

    Args:
        gram_left: ``[K, K]`` left Gram, or ``None`` for the identity (squaring
            only: the launch-bound operator route).
        gram_right: ``[K, K]`` right Gram (or the operator).
        start: ``[K]`` start coefficients, ``None`` for all ones.
        opts: Solver options.
        scalars: Optional ``(alpha, beta) ↦ [0-dim tensors]`` fetched with the result.

    Returns:
        ``(alpha, beta, iterations, converged, values)``, ``values`` the host values
        of ``scalars(alpha, beta)`` (see :func:`coefficient_squaring_iteration`).
    """
    num = gram_right.shape[0]
    exact = num <= opts.exact_max_terms
    stepping = (
        gram_left is not None
        and not launch_bound(gram_right.device)
        and num > SQUARING_MAX_TERMS_CPU
    )
    values: list[float] | None = None
    if stepping:
        alpha, beta, iters, converged = coefficient_power_iteration(
            gram_left, gram_right, start, opts.tol, opts.max_iter
        )
    else:
        budget = min(opts.max_iter, FIRST_TEST_STEPS) if exact else opts.max_iter
        alpha, beta, iters, converged, values = coefficient_squaring_iteration(
            gram_left, gram_right, start, opts.tol, budget, scalars
        )
    if not converged and exact:
        solution = exact_coefficients(gram_left, gram_right, start)
        if solution is not None:
            (alpha, beta), converged, values = solution, True, None
    if values is None:
        values = fetch_scalars(None, alpha, beta, scalars)[1]
    return alpha, beta, iters, converged, values
