r"""Optimal ``L ⊗ R`` for a sum of per-sample outer products (paper Algorithm 2).

:func:`nearest_kronecker_samples` solves ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` for general
per-sample matrices ``X_k`` (convolutions, ``Linear`` layers on inputs with extra
dimensions): by the factor power method, or on launch-bound devices, while it fits
(:func:`~kfoc_backpack.solver.coefficient.samples_operator_fits`), through the
``M² × M²`` matrix of the left power map (:func:`_samples_operator_solve`).
Where the block's trace lies outside the window of every solve (tiny blocks of deep
layers) ``X`` is first scaled by a power of two
(:func:`~kfoc_backpack.solver.rescale.needed_exponents`; exact).

Index conventions of this module: ``K`` terms (samples), ``M`` output features (left
factor ``[M, M]``), ``N`` input features (right factor ``[N, N]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    left_start,
    working_dtype,
    working_tensors,
    zero_solution,
)
from kfoc_backpack.solver.coefficient import check_every, coefficient_solve, samples_operator_fits
from kfoc_backpack.solver.power import factor_power_iteration, output_major, samples_half_steps
from kfoc_backpack.solver.rescale import needed_exponents, samples_summary, scaled_back
from kfoc_backpack.solver.scale import apply_scale_split, finalize, pair_scalars


def nearest_kronecker_samples(
    samples: Tensor,
    *,
    options: SolverOptions | None = None,
    init: Tensor | None = None,
    right_trace: Tensor | float | None = None,
) -> KroneckerFactors:
    """Optimal ``L ⊗ R`` for ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` (paper Algorithm 2).

    ``L`` acts on the row (output) side and ``R`` on the column (input) side of the
    ``X_k``. The half-steps ``R ← Σ_k X_kᵀ L X_k`` and ``L ← Σ_k X_k R X_kᵀ`` map
    positive semi-definite matrices to positive semi-definite ones, so the default
    start ``L⁽⁰⁾ = I`` (never orthogonal to the PSD optimum) keeps both factors PSD.

    Cost per step ``O(K M N (M + N))``, memory ``O(K M N)``.

    Args:
        samples: ``[K, M, N]`` per-sample matrices ``X_k``.
        options: Solver options.
        init: Optional ``[M, M]`` warm start of the left factor (positive
            semi-definite, e.g. K-FAC's left factor or the previous solution).
        right_trace: Split the scale so that ``tr(right)`` equals this (default:
            even split).

    Returns:
        The optimal factors (conventions in :mod:`kfoc_backpack.solver`).

    Raises:
        ValueError: If ``samples`` is not three-dimensional.
    """
    if samples.dim() != 3:
        raise ValueError(f"samples must have shape [K, M, N], got {tuple(samples.shape)}.")
    working_dtype(samples.dtype)  # floating input, or the TypeError that says so
    exponents = needed_exponents(lambda dtype: samples_summary(samples, dtype), samples)
    if exponents is not None:  # far from unit scale: solve 2^e X, exactly (solver.rescale)
        exponent = sum(exponents)
        factors = nearest_kronecker_samples(
            samples * 2.0**exponent, options=options, init=init, right_trace=right_trace
        )
        return scaled_back(factors, exponent, 0, right_trace)
    opts, out_dtype, (samples,) = working_tensors(options, samples)
    num, m, n = samples.shape
    if num == 0:
        return zero_solution(m, n, samples, out_dtype)
    start = left_start(
        m, samples, opts, init, lambda: torch.eye(m, dtype=samples.dtype, device=samples.device)
    )
    wide = output_major(samples)
    to_right, to_left = samples_half_steps(samples, wide)
    if samples_operator_fits(num, m, n, samples.device):
        return _samples_operator_solve(wide, num, to_right, start, opts, right_trace, out_dtype)
    left, right, iters, converged = factor_power_iteration(
        to_right,
        to_left,
        start,
        opts.tol,
        opts.max_iter,
        check_every(samples.device),
        opts.stop,
    )
    left, right = finalize(
        left, right, out_dtype, right_trace=right_trace, what="nearest_kronecker_samples"
    )
    return KroneckerFactors(left, right, iters, converged)


def _samples_operator_solve(
    wide: Tensor,
    num: int,
    to_right: Callable[[Tensor], Tensor],
    start: Tensor,
    opts: SolverOptions,
    right_trace: Tensor | float | None,
    out_dtype: torch.dtype,
) -> KroneckerFactors:
    """Algorithm 2 through the ``M² × M²`` matrix of the left power map, by squaring.

    The map ``L ↦ Σ_{a,b} P_ab L P_abᵀ`` with ``P_ab = X_a X_bᵀ`` (one half-step to the
    right and one back) has the symmetric positive semi-definite matrix
    ``T = Σ_{a,b} P_ab ⊗ P_ab``, formed from the ``(K·M)²`` products of all pairs of
    rows. Its top eigenvector is ``vec(L)`` of the optimum; it is found by repeated
    squaring (:func:`~kfoc_backpack.solver.gram.coefficient_squaring_iteration` with
    the identity metric), whose one host transfer per stopping test also carries the
    scale split.

    Args:
        wide: ``[M, K·N]`` output-major samples (see ``samples_half_steps``).
        num: Number of samples ``K``.
        to_right: The half-step ``L ↦ Σ_k X_kᵀ L X_k``.
        start: ``[M, M]`` start of the left factor.
        opts: Solver options.
        right_trace: Target trace of the right factor, or ``None``.
        out_dtype: Dtype of the result.

    Returns:
        The optimal factors (conventions in :mod:`kfoc_backpack.solver`).
    """
    m = wide.shape[0]
    tall = wide.reshape(m * num, -1)  # rows (i, k): row i of X_k
    pairs = (tall @ tall.T).view(m, num, m, num)  # [i, a, j, b] = (X_a X_bᵀ)[i, j]
    by_entry = pairs.permute(0, 2, 1, 3).reshape(m * m, num * num)  # [(i, j), (a, b)]
    # T[(i, k), (j, l)] = Σ_ab P_ab[i, j] P_ab[k, l]
    operator = (by_entry @ by_entry.T).view(m, m, m, m).transpose(1, 2).reshape(m * m, m * m)
    kept: list[tuple[Tensor, Tensor, float]] = []

    def scalars(alpha: Tensor, beta: Tensor) -> list[Tensor]:
        left = alpha.view(m, m)
        left, right, half, found = pair_scalars(left, to_right(left), True, right_trace)
        kept[:] = [(left, right, half)]
        return found

    _, _, iters, converged, values = coefficient_solve(
        None, operator, start.reshape(-1), opts, scalars
    )
    left, right, half = kept[0]
    left, right = apply_scale_split(
        left, right, half, values, right_trace, out_dtype, "nearest_kronecker_samples"
    )
    return KroneckerFactors(left, right, iters, converged)
