"""Optimal ``L ⊗ R`` for a weighted sum of Kronecker products (paper Algorithm 1).

:func:`nearest_kronecker_sum` solves ``F = Σ_k w_k L_k ⊗ R_k`` in closed form
(``K ≤ 2``), in coefficient space (:mod:`~kfoc_backpack.solver.gram`) or by the factor
power method (:mod:`~kfoc_backpack.solver.power`); :func:`merge_kronecker` is its
two-term closed form, the merge of running aggregation. A start orthogonal to the
solution (possible only for indefinite terms) is detected and the solve restarted
once from a random start (:func:`_with_restart`).

Index conventions of this module: ``K`` terms, ``M`` size of the left factor
``[M, M]``, ``N`` size of the right factor ``[N, N]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    random_coefficients,
    random_matrix,
    working_tensors,
    zero_solution,
)
from kfoc_backpack.solver.coefficient import GRAM_MAX_TERMS, check_every, coefficient_solve
from kfoc_backpack.solver.gram import top_eigvec_2x2
from kfoc_backpack.solver.power import factor_power_iteration, terms_to_left, terms_to_right
from kfoc_backpack.solver.rescale import balanced_terms, unscaled
from kfoc_backpack.solver.scale import finalize

Solution = tuple[Tensor, Tensor, int, bool]
"""``(left, right, iterations, converged)``: factors or coefficients of a solve."""


def nearest_kronecker_sum(
    left_terms: Tensor,
    right_terms: Tensor,
    weights: Tensor | None = None,
    *,
    options: SolverOptions | None = None,
    init: Tensor | None = None,
    method: str = "auto",
    right_trace: Tensor | float | None = None,
) -> KroneckerFactors:
    """Optimal ``L ⊗ R`` for ``F = Σ_k w_k L_k ⊗ R_k`` (paper Algorithm 1).

    The terms may be any square matrices; the factors are symmetrised only when all
    terms are symmetric (then the optimum is symmetric), and positive semi-definite
    when all terms are.

    Args:
        left_terms: ``[K, M, M]`` left terms ``L_k``.
        right_terms: ``[K, N, N]`` right terms ``R_k``.
        weights: Optional ``[K]`` weights ``w_k`` (default all ones).
        options: Solver options (tolerance, iteration cap, random initialisation).
        init: Optional ``[M, M]`` warm start of the left factor (e.g. the previous
            solution). Default: ``Σ_k w_k L_k``.
        method: ``"auto"``, ``"closed_form"`` (only ``K ≤ 2``), ``"gram"``
            (coefficient space, ``O(K²(M² + N²))`` set-up, ``O(K²)`` per step, finished
            exactly when slow, see :class:`SolverOptions`) or
            ``"power"`` (factor space, ``O(K(M² + N²))`` per step). ``"auto"`` uses
            the closed form for ``K ≤ 2``, ``"gram"`` up to
            :data:`~kfoc_backpack.solver.coefficient.GRAM_MAX_TERMS` terms and ``"power"``
            beyond.
        right_trace: Split the scale so that ``tr(right)`` equals this (default:
            even split), see :func:`~kfoc_backpack.solver.scale.scale_split`.

    Returns:
        The optimal factors, see :mod:`kfoc_backpack.solver` for the conventions.

    Raises:
        ValueError: For inconsistent shapes or an unknown ``method``.
    """
    _validate_square_stack(left_terms, "left_terms")
    _validate_square_stack(right_terms, "right_terms")
    num = left_terms.shape[0]
    if right_terms.shape[0] != num:
        raise ValueError(
            f"left_terms and right_terms need the same number of terms, got {num} "
            f"and {right_terms.shape[0]}."
        )
    if method not in ("auto", "closed_form", "gram", "power"):
        raise ValueError(
            f"Unknown method {method!r}; use 'auto', 'closed_form', 'gram' or 'power'."
        )
    opts, out_dtype, (left_terms, right_terms) = working_tensors(options, left_terms, right_terms)
    dtype = left_terms.dtype
    m, n = left_terms.shape[-1], right_terms.shape[-1]
    if num == 0:
        return zero_solution(m, n, left_terms, out_dtype)
    if weights is not None:
        if weights.shape != (num,):
            raise ValueError(f"weights must have shape [{num}], got {tuple(weights.shape)}.")
        left_terms = left_terms * weights.to(dtype).reshape(num, 1, 1)

    balanced = balanced_terms(left_terms, right_terms)
    exponent = 0
    if balanced is not None:  # far from unit scale: solve the terms scaled by powers of two
        left_terms, right_terms, exponent = balanced
        right_trace = None if right_trace is None else right_trace * 2.0**-exponent

    if method == "auto":
        method = "closed_form" if num <= 2 else "gram" if num <= GRAM_MAX_TERMS else "power"
    if method == "closed_form" and num > 2:
        raise ValueError(f"method='closed_form' needs at most 2 terms, got {num}.")

    init = None if init is None else init.to(dtype)
    if method in ("closed_form", "gram"):
        left, right, iters, converged = _sum_coefficients(
            left_terms, right_terms, opts, init, method == "closed_form"
        )
    else:
        left, right, iters, converged = _sum_factors(left_terms, right_terms, opts, init)
    symmetric = bool(
        (left_terms == left_terms.transpose(-1, -2)).all()
        & (right_terms == right_terms.transpose(-1, -2)).all()
    )
    solved_dtype = out_dtype if balanced is None else dtype
    left, right = finalize(
        left, right, solved_dtype, symmetric, right_trace, "nearest_kronecker_sum"
    )
    factors = KroneckerFactors(left, right, iters, converged)
    return factors if balanced is None else unscaled(factors, exponent, out_dtype)


def _sum_coefficients(
    left_terms: Tensor,
    right_terms: Tensor,
    opts: SolverOptions,
    init: Tensor | None,
    closed_form: bool,
) -> Solution:
    """Closed-form (``K ≤ 2``) and Gram routes: ``L = Σ α_k L_k``, ``R = Σ β_k R_k``."""
    num, m, n = left_terms.shape[0], left_terms.shape[-1], right_terms.shape[-1]
    left_flat = left_terms.reshape(num, -1)
    right_flat = right_terms.reshape(num, -1)
    gram_left = left_flat @ left_flat.T
    gram_right = right_flat @ right_flat.T

    def solve(start: Tensor) -> Solution:
        if closed_form:
            alpha = _closed_form_coefficients(gram_left, gram_right, num)
            return alpha, gram_left @ alpha, 0, True
        return coefficient_solve(gram_left, gram_right, start, opts)[:4]

    if opts.random_init:
        start = random_coefficients(num, left_terms, opts)
    elif init is not None:
        start = gram_right @ (left_flat @ init.reshape(-1))
    else:
        start = torch.ones(num, dtype=left_terms.dtype, device=left_terms.device)
    alpha, beta, iters, converged = _with_restart(
        solve,
        start,
        lambda: random_coefficients(num, left_terms, opts),
        lambda solution: _needs_restart(solution[1], gram_right, gram_left),
    )
    left = (alpha @ left_flat).reshape(m, m)
    right = (beta @ right_flat).reshape(n, n)
    return left, right, iters, converged


def _sum_factors(
    left_terms: Tensor, right_terms: Tensor, opts: SolverOptions, init: Tensor | None
) -> Solution:
    """Factor-space power route, ``O(K(M² + N²))`` per step."""
    num, m = left_terms.shape[0], left_terms.shape[-1]
    to_right = terms_to_right(left_terms, right_terms)
    to_left = terms_to_left(left_terms, right_terms)
    check = check_every(left_terms.device)

    def solve(start: Tensor) -> Solution:
        return factor_power_iteration(
            to_right, to_left, start, opts.tol, opts.max_iter, check, opts.stop
        )

    if opts.random_init:
        start = random_matrix(m, left_terms, opts)
    elif init is not None:
        start = init
    else:
        start = left_terms.sum(0)
    left_flat = left_terms.reshape(num, -1)
    right_flat = right_terms.reshape(num, -1)
    total = (left_flat @ left_flat.T * (right_flat @ right_flat.T)).sum()  # ‖F‖²_F
    return _with_restart(
        solve,
        start,
        lambda: random_matrix(m, left_terms, opts),
        lambda solution: bool((torch.linalg.matrix_norm(solution[1]) == 0) & (total > 0)),
    )


def _with_restart(
    solve: Callable[[Tensor], Solution],
    start: Tensor,
    random_start: Callable[[], Tensor],
    missed: Callable[[Solution], bool],
) -> Solution:
    """``solve(start)``, solved once more from ``random_start()`` if it ``missed``.

    A start orthogonal to the solution of a non-zero problem (possible only for
    indefinite terms: the deterministic starts are never orthogonal to a positive
    semi-definite optimum) leaves the power method with a (numerically) zero right
    factor; ``missed(solution)`` is each route's test for it, and a random start,
    almost surely not orthogonal, replaces the start.
    """
    solution = solve(start)
    if missed(solution):
        solution = solve(random_start())
    return solution


def _closed_form_coefficients(gram_left: Tensor, gram_right: Tensor, num: int) -> Tensor:
    """Exact left coefficients for one or two terms."""
    if num == 1:
        alpha = torch.ones(1, dtype=gram_left.dtype, device=gram_left.device)
    else:
        alpha = top_eigvec_2x2(gram_right @ gram_left)
    norm = (alpha @ (gram_left @ alpha)).clamp_min(0).sqrt()
    return alpha / torch.where(norm > 0, norm, torch.ones_like(norm))


def _needs_restart(beta: Tensor, gram_right: Tensor, gram_left: Tensor) -> bool:
    """Whether the start was orthogonal to the solution of a non-zero problem."""
    sigma_sq = beta @ (gram_right @ beta)
    total = (gram_left * gram_right).sum()
    return bool((sigma_sq <= 1e-12 * total) & (total > 0))


def _validate_square_stack(terms: Tensor, name: str) -> None:
    if terms.dim() != 3 or terms.shape[-1] != terms.shape[-2]:
        raise ValueError(
            f"{name} must have shape [K, D, D] (a stack of square matrices), "
            f"got {tuple(terms.shape)}."
        )


def merge_kronecker(
    left_a: Tensor,
    right_a: Tensor,
    left_b: Tensor,
    right_b: Tensor,
    weight_a: float | Tensor = 1.0,
    weight_b: float | Tensor = 1.0,
) -> KroneckerFactors:
    """Optimal ``L ⊗ R`` for ``w_a L_a ⊗ R_a + w_b L_b ⊗ R_b``, in closed form.

    The two-term problem of running aggregation: exact through the ``2 × 2`` Gram
    matrices, no iteration.

    Args:
        left_a: ``[M, M]`` left factor of the first product.
        right_a: ``[N, N]`` right factor of the first product.
        left_b: ``[M, M]`` left factor of the second product.
        right_b: ``[N, N]`` right factor of the second product.
        weight_a: Weight of the first product.
        weight_b: Weight of the second product.

    Returns:
        The optimal factors (conventions as for every solver).
    """
    weights = torch.stack(
        [
            torch.as_tensor(weight_a, dtype=left_a.dtype, device=left_a.device),
            torch.as_tensor(weight_b, dtype=left_a.dtype, device=left_a.device),
        ]
    )
    return nearest_kronecker_sum(
        torch.stack([left_a, left_b]),
        torch.stack([right_a, right_b]),
        weights,
        method="closed_form",
    )
