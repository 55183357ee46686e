"""Power method in factor space (paper Algorithms 1 and 2).

Both half-steps are expressed as a few large matrix products over all terms at
once (no Python loop over terms), so they run as well on a GPU as on the CPU.

Index conventions of this module: ``K`` terms (samples), ``J`` columns per sample,
``M`` output features (left factor ``[M, M]``), ``N`` input features (right factor
``[N, N]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kfoc_backpack.enums import Stop
from kfoc_backpack.solver._common import frobenius_norm, unit


def factor_power_iteration(
    to_right: Callable[[Tensor], Tensor],
    to_left: Callable[[Tensor], Tensor],
    init_left: Tensor,
    tol: float,
    max_iter: int,
    check_every: int = 1,
    stop: Stop = Stop.FACTORS,
) -> tuple[Tensor, Tensor, int, bool]:
    """Run the power method for the top singular pair of a rearranged matrix ``A``.

    Only the left factor is normalised (the right one then has norm at most ``σ₁``,
    the next left one at most ``σ₁²``), and the stopping test is computed only at the
    steps where it is tested: a step costs the two half-steps and three more
    operations.

    Args:
        to_right: ``L ↦ mat(Aᵀ vec L)``, an ``[M, M] → [N, N]`` map.
        to_left: ``R ↦ mat(A vec R)``, an ``[N, N] → [M, M]`` map.
        init_left: ``[M, M]`` start of the left factor.
        tol: Stop once ``‖L⁽ⁿ⁾ − L⁽ⁿ⁻¹⁾‖_F < tol`` (normalised left factors); with
            ``stop="objective"`` also once ``σ²⁽ⁿ⁾ = ‖mat(Aᵀ vec L⁽ⁿ⁾)‖²_F``, the squared
            norm the unit ``L⁽ⁿ⁾`` captures, changes by less than ``tol·σ²⁽ⁿ⁾`` between
            tests.
        max_iter: Maximal number of power steps.
        check_every: Evaluate the stopping criterion every this many steps (each
            evaluation synchronises a CUDA device with the host).
        stop: Which of the two rules.

    Returns:
        ``(left, right, iterations, converged)`` with ``‖left‖_F = 1`` and
        ``right = mat(Aᵀ vec left)`` (so ``‖right‖_F = σ₁``).
    """
    left = unit(init_left)
    converged = False
    iterations = 0
    captured = None
    objective = Stop.parse(stop, "stop") is Stop.OBJECTIVE
    for iterations in range(1, max_iter + 1):
        right = to_right(left)
        tested = iterations % check_every == 0 or iterations == max_iter
        if objective and tested:  # σ² at L: L and its right factor are the result
            value = float(frobenius_norm(right).square())
            if value == 0.0 or (captured is not None and abs(value - captured) <= tol * value):
                return left, right, iterations, True
            captured = value
        new_left = unit(to_left(right))
        if tested and torch.linalg.matrix_norm(new_left - left).item() < tol:
            converged = True  # (either rule: settled factors settle σ² too)
            left = new_left
            break
        left = new_left
    return left, to_right(left), iterations, converged


def output_major(samples: Tensor) -> Tensor:
    """``[K, M, N]`` samples as a contiguous ``[M, K·N]`` matrix (one copy at most).

    In this layout both half-steps are two plain matrix products with no copies: a
    caller that builds ``X`` as a transposed view of an ``[M, K, N]`` tensor (as the
    convolution extension does) pays no copy at all.
    """
    num, m, n = samples.shape
    return samples.transpose(0, 1).contiguous().reshape(m, num * n)


def samples_half_steps(samples: Tensor, wide: Tensor | None = None) -> tuple[Callable, Callable]:
    """Half-steps ``L ↦ Σ_k X_kᵀ L X_k`` and ``R ↦ Σ_k X_k R X_kᵀ`` for ``X`` ``[K, M, N]``.

    Both share one output-major copy of the samples (see :func:`output_major`; pass
    it as ``wide`` where it is already made) and cost two matrix products each,
    ``O(K M N (M + N))``.

    Returns:
        ``(to_right, to_left)``.
    """
    num, m, n = samples.shape
    if wide is None:
        wide = output_major(samples)
    tall = wide.reshape(m * num, n)
    tall_t, wide_t = tall.T, wide.T  # views, made once

    def to_right(left: Tensor) -> Tensor:
        return tall_t @ (left @ wide).reshape(m * num, n)

    def to_left(right: Tensor) -> Tensor:
        return (tall @ right).reshape(m, num * n) @ wide_t

    return to_right, to_left


def terms_to_right(left_terms: Tensor, right_terms: Tensor) -> Callable[[Tensor], Tensor]:
    """``L ↦ Σ_k ⟨L_k, L⟩ R_k`` for ``[K, M, M]`` and ``[K, N, N]`` terms."""
    num = left_terms.shape[0]
    left_flat = left_terms.reshape(num, -1)
    right_flat = right_terms.reshape(num, -1)
    n = right_terms.shape[-1]

    def apply(left: Tensor) -> Tensor:
        return (right_flat.T @ (left_flat @ left.reshape(-1))).reshape(n, n)

    return apply


def terms_to_left(left_terms: Tensor, right_terms: Tensor) -> Callable[[Tensor], Tensor]:
    """``R ↦ Σ_k ⟨R_k, R⟩ L_k`` for ``[K, M, M]`` and ``[K, N, N]`` terms."""
    return terms_to_right(right_terms, left_terms)


def outer_half_steps(sqrt_out: Tensor, inputs: Tensor) -> tuple[Callable, Callable]:
    """Half-steps for ``F = Σ_k (S_kᵀS_k) ⊗ (a_k a_kᵀ)`` without forming ``S_kᵀS_k``.

    ``L ↦ Σ_k ⟨S_kᵀS_k, L⟩ a_k a_kᵀ`` and ``R ↦ Σ_k (a_kᵀ R a_k) S_kᵀS_k``, each
    ``O(K (J M² + N²))``.

    Args:
        sqrt_out: ``[K, J, M]`` output-side vectors.
        inputs: ``[K, N]`` input-side vectors.

    Returns:
        ``(to_right, to_left)``.
    """
    num, cols, m = sqrt_out.shape
    flat = sqrt_out.reshape(num * cols, m)
    flat_t, inputs_t = flat.T, inputs.T  # views, made once

    def to_right(left: Tensor) -> Tensor:
        weights = ((flat @ left) * flat).sum(1)
        if cols > 1:
            weights = weights.reshape(num, cols).sum(1)
        return (inputs_t * weights) @ inputs

    def to_left(right: Tensor) -> Tensor:
        weights = ((inputs @ right) * inputs).sum(1)
        if cols > 1:  # the same weight for the J columns of each term
            return (flat_t.reshape(m, num, cols) * weights.unsqueeze(1)).reshape(m, -1) @ flat
        return (flat_t * weights) @ flat

    return to_right, to_left
