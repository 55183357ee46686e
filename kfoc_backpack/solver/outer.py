"""Optimal ``L ⊗ R`` for rank-one per-sample matrices (``Linear`` layers).

:func:`nearest_kronecker_outer` solves ``F = Σ_k (S_kᵀ S_k) ⊗ (a_k a_kᵀ)``, i.e.
per-sample matrices ``X_{k,j} = s_{k,j} a_kᵀ``, in ``K``-dimensional coefficient space
(:mod:`~kfoc_backpack.solver.gram`) without ever forming ``X``, or by the factor power
method where a flop estimate finds that cheaper
(:func:`~kfoc_backpack.solver.coefficient.outer_power_is_cheaper`).
:func:`outer_gram_left` is the left Gram matrix of these terms (also the ``‖F‖_F`` of
:mod:`~kfoc_backpack.solver.error`).

Index conventions of this module: ``K`` terms (samples), ``J`` columns per sample,
``M`` output features (left factor ``[M, M]``), ``N`` input features (right factor
``[N, N]``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    launch_bound,
    random_coefficients,
    random_matrix,
    working_dtype,
    working_tensors,
    zero_solution,
)

# _EXPLICIT_GRAM_MAX_ELEMENTS is read through this module's name (tests patch it here)
from kfoc_backpack.solver.coefficient import (
    _EXPLICIT_GRAM_MAX_ELEMENTS,
    check_every,
    coefficient_solve,
    outer_power_is_cheaper,
)
from kfoc_backpack.solver.power import factor_power_iteration, outer_half_steps
from kfoc_backpack.solver.rescale import (
    needed_exponents,
    outer_summary,
    scaled_back,
    scaled_trace,
)
from kfoc_backpack.solver.scale import fetched_split, finalize, target_scalars


def outer_gram_left(sqrt_out: Tensor) -> Tensor:
    """Gram matrix ``G[k, l] = ⟨S_kᵀS_k, S_lᵀS_l⟩_F = ‖S_k S_lᵀ‖²_F``.

    Args:
        sqrt_out: ``[K, J, M]`` stack of the ``J`` output-side vectors per term.

    Returns:
        ``[K, K]`` Gram matrix (see :func:`_outer_grams` for the routes).
    """
    return _outer_grams(sqrt_out)[0]


def _outer_grams(sqrt_out: Tensor) -> tuple[Tensor, Tensor]:
    """Left Gram matrix and the traces ``tr(S_kᵀS_k) = ‖S_k‖²_F`` of the left terms.

    Of two routes the cheaper is taken: materialising ``B_k = S_kᵀS_k``
    (``O(K J M² + K² M²)``, used when ``M`` is small) or the pairwise products
    ``(s_{k,i} · s_{l,j})²`` (``O(K² J² M / 2)``, never allocating anything of size
    ``K · M²``; with ``J = 1`` as one product of all pairs, whose diagonal gives the
    traces, and so on launch-bound devices too, in row blocks of at most
    :data:`~kfoc_backpack.solver.coefficient._EXPLICIT_GRAM_MAX_ELEMENTS` elements).

    Args:
        sqrt_out: ``[K, J, M]`` stack of the ``J`` output-side vectors per term.

    Returns:
        ``([K, K] Gram matrix, [K] traces)``.
    """
    num, cols, dim = sqrt_out.shape
    flat = sqrt_out.reshape(num * cols, dim)
    if cols == 1:
        inner = flat @ flat.T
        return inner.square(), inner.diagonal()
    if launch_bound(sqrt_out.device):
        # all pairs at once, in as few row blocks as the memory cap allows
        if (num * cols) ** 2 <= _EXPLICIT_GRAM_MAX_ELEMENTS:
            inner = flat @ flat.T
            traces = inner.diagonal().reshape(num, cols).sum(1)
            return inner.square().reshape(num, cols, num, cols).sum((1, 3)), traces
        block = max(_EXPLICIT_GRAM_MAX_ELEMENTS // (num * cols * cols), 1)  # terms per block
        flat_t = flat.T
        rows = [
            (flat[i * cols : (i + block) * cols] @ flat_t)
            .square()
            .reshape(-1, cols, num, cols)
            .sum((1, 3))
            for i in range(0, num, block)
        ]
        return torch.cat(rows), sqrt_out.square().sum((1, 2))
    traces = sqrt_out.square().sum((1, 2))
    explicit_cost = num * cols * dim * dim + num * num * dim * dim
    pairs_cost = num * num * cols * cols * dim // 2
    if explicit_cost < pairs_cost and num * dim * dim <= _EXPLICIT_GRAM_MAX_ELEMENTS:
        blocks = torch.einsum("kjp,kjq->kpq", sqrt_out, sqrt_out).reshape(num, -1)
        return blocks @ blocks.T, traces
    gram = sqrt_out.new_zeros(num, num)
    for i in range(cols):
        rest = sqrt_out[:, i:].transpose(0, 1).reshape(-1, dim)
        prods = (sqrt_out[:, i] @ rest.T).square().reshape(num, cols - i, num)
        off = prods[:, 1:].sum(1)
        gram += prods[:, 0] + off + off.T
    return gram, traces


def nearest_kronecker_outer(
    sqrt_out: Tensor,
    inputs: Tensor,
    *,
    options: SolverOptions | None = None,
    init: Tensor | None = None,
    right_trace: Tensor | float | None = None,
    method: str = "auto",
) -> KroneckerFactors:
    """Optimal ``L ⊗ R`` for ``F = Σ_k (S_kᵀ S_k) ⊗ (a_k a_kᵀ)`` in coefficient space.

    This is ``F = Σ_{k,j} vec(X_{kj}) vec(X_{kj})ᵀ`` with rank-one per-sample
    matrices ``X_{kj} = s_{kj} a_kᵀ``: a ``Linear`` layer's GGN with ``J`` columns of
    the loss-Hessian square root (``J`` Monte-Carlo samples or classes) per input.
    The optimum is ``L = Σ_k α_k S_kᵀ S_k`` and ``R = Σ_k β_k a_k a_kᵀ``; the power
    method runs on ``α, β ∈ ℝᴷ`` using the Gram matrices (docs/conventions.md §1), cost
    ``O(K² (J² M + N))`` once plus ``O(K²)`` per step, and the factors are formed once
    at the end in ``O(K J M² + K N²)`` — the cost of K-FAC's own factors. Nothing of
    size ``K · M · N`` is allocated. The start ``α = 1`` is K-FAC's left factor. A
    problem of at most ``options.exact_max_terms`` terms that the power method has not
    settled after 33 steps is finished exactly (see :class:`SolverOptions`).

    Args:
        sqrt_out: ``[K, J, M]`` output-side vectors ``s_{kj}``.
        inputs: ``[K, N]`` input-side vectors ``a_k``.
        options: Solver options.
        init: Optional ``[M, M]`` warm start of the left factor; it is mapped to
            coefficients by one half-step.
        right_trace: Split the scale so that ``tr(right)`` equals this (default:
            even split). Sign and split are applied to the coefficients, so each
            factor is formed exactly once.
        method: ``"gram"`` (coefficient space, above), ``"power"`` (factor space,
            ``O(K (J M² + N²))`` per step: cheaper for small layers seen through many
            terms) or ``"auto"``, which picks the cheaper by a flop estimate.

    Returns:
        The optimal factors (conventions in :mod:`kfoc_backpack.solver`).

    Raises:
        ValueError: For inconsistent shapes.
    """
    if sqrt_out.dim() == 2:
        sqrt_out = sqrt_out.unsqueeze(1)
    if sqrt_out.dim() != 3 or inputs.dim() != 2 or sqrt_out.shape[0] != inputs.shape[0]:
        raise ValueError(
            "nearest_kronecker_outer expects sqrt_out [K, J, M] (or [K, M]) and inputs "
            f"[K, N], got {tuple(sqrt_out.shape)} and {tuple(inputs.shape)}."
        )
    working_dtype(sqrt_out.dtype)  # floating input, or the TypeError that says so
    exponents = needed_exponents(
        lambda dtype: outer_summary(sqrt_out, inputs, dtype), sqrt_out, inputs
    )
    if exponents is not None:  # far from unit scale: solve scaled sides, exactly
        factors = nearest_kronecker_outer(
            sqrt_out * 2.0 ** exponents[0],
            inputs * 2.0 ** exponents[1],
            options=options,
            init=init,
            right_trace=scaled_trace(right_trace, exponents[1]),
            method=method,
        )
        return scaled_back(factors, *exponents, right_trace)
    opts, out_dtype, (sqrt_out, inputs) = working_tensors(options, sqrt_out, inputs)
    num, cols, m = sqrt_out.shape
    n = inputs.shape[1]
    if num == 0:
        return zero_solution(m, n, sqrt_out, out_dtype)
    if method not in ("auto", "gram", "power"):
        raise ValueError(f"Unknown method {method!r}; use 'auto', 'gram' or 'power'.")
    if method == "auto":
        cheaper = outer_power_is_cheaper(num, cols, m, n, launch_bound(inputs.device))
        method = "power" if cheaper else "gram"
    init = None if init is None else init.to(sqrt_out.dtype)
    solve = _outer_factors if method == "power" else _outer_coefficients
    return solve(sqrt_out, inputs, opts, init, right_trace, out_dtype)


def _outer_factors(
    sqrt_out: Tensor,
    inputs: Tensor,
    opts: SolverOptions,
    init: Tensor | None,
    right_trace: Tensor | float | None,
    out_dtype: torch.dtype,
) -> KroneckerFactors:
    """Factor-space power route, ``O(K (J M² + N²))`` per step."""
    m = sqrt_out.shape[-1]
    to_right, to_left = outer_half_steps(sqrt_out, inputs)
    if opts.random_init:
        start = random_matrix(m, inputs, opts)
        start = start @ start.T  # PSD
    elif init is not None:
        start = init
    else:
        flat_out = sqrt_out.reshape(-1, m)
        start = flat_out.T @ flat_out  # K-FAC's left factor
    left, right, iters, converged = factor_power_iteration(
        to_right, to_left, start, opts.tol, opts.max_iter, check_every(inputs.device), opts.stop
    )
    left, right = finalize(left, right, out_dtype, True, right_trace, "nearest_kronecker_outer")
    return KroneckerFactors(left, right, iters, converged)


def _outer_coefficients(
    sqrt_out: Tensor,
    inputs: Tensor,
    opts: SolverOptions,
    init: Tensor | None,
    right_trace: Tensor | float | None,
    out_dtype: torch.dtype,
) -> KroneckerFactors:
    """Gram route: sign and scale split applied to ``α, β``, each factor formed once."""
    num, cols, m = sqrt_out.shape
    flat_out = sqrt_out.reshape(num * cols, m)
    gram_left, trace_out = _outer_grams(sqrt_out)
    inner_in = inputs @ inputs.T
    gram_right, trace_in = inner_in.square(), inner_in.diagonal()
    if opts.random_init:
        start = random_coefficients(num, inputs, opts).abs()
    elif init is not None:
        halfstep = ((flat_out @ init) * flat_out).sum(1).reshape(num, cols).sum(1)
        start = gram_right @ halfstep
    else:
        start = None  # all ones: K-FAC's factors
    target = target_scalars(right_trace, inputs)

    def scalars(alpha: Tensor, beta: Tensor) -> list[Tensor]:
        # ‖L‖², ‖R‖², tr L, tr R of L = Σ α_k S_kᵀS_k, R = Σ β_k a_k a_kᵀ (β = G_L α)
        return [
            alpha @ beta,
            beta @ (gram_right @ beta),
            alpha @ trace_out,
            beta @ trace_in,
            *target,
        ]

    alpha, beta, iters, converged, values = coefficient_solve(
        gram_left, gram_right, start, opts, scalars
    )
    norms = [_sqrt(values[0]), _sqrt(values[1])]  # the split wants norms, not squares
    c_left, c_right = fetched_split(norms + values[2:], right_trace, "nearest_kronecker_outer")
    # L = Σ_k α_k S_kᵀS_k and R = Σ_k β_k a_k a_kᵀ, formed once (symmetric, PSD: α, β ≥ 0)
    alpha, beta = alpha * c_left, beta * c_right
    if cols > 1:
        alpha = alpha.repeat_interleave(cols)
    left = (flat_out.T * alpha) @ flat_out
    right = (inputs.T * beta) @ inputs
    return KroneckerFactors(left.to(out_dtype), right.to(out_dtype), iters, converged)


def _sqrt(value: float) -> float:
    """``√value`` for ``value > 0``, ``0`` for ``value ≤ 0``; NaN stays NaN."""
    if value > 0:
        return math.sqrt(value)
    return value if math.isnan(value) else 0.0
