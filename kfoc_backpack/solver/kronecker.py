r"""Frobenius-optimal single Kronecker product of structured sums (the K-FOC solvers).

Every solver returns :class:`KroneckerFactors` ``(left, right, iterations,
converged)`` with ``left ⊗ right ≈ F`` optimal in the Frobenius norm, and follows the
same conventions (see :func:`~kfoc_backpack.solver._common.finalize`): symmetric
factors, sign fixed by ``tr(left) ≥ 0`` (both factors positive semi-definite when
``F`` is), scale split evenly (``‖left‖_F = ‖right‖_F``), the input's device and
dtype, all-zero input giving all-zero factors. Vectorisation is PyTorch's row-major
one, so ``torch.kron(left, right)`` is directly comparable with ``F``.

Three structures of ``F`` are supported:

* :func:`nearest_kronecker_sum` — ``F = Σ_k w_k L_k ⊗ R_k`` (paper Algorithm 1);
* :func:`nearest_kronecker_samples` — ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` for per-sample
  matrices ``X_k`` (paper Algorithm 2; convolutions);
* :func:`nearest_kronecker_outer` — ``F = Σ_k (S_kᵀ S_k) ⊗ (a_k a_kᵀ)``, i.e.
  per-sample matrices ``X_{k,j} = s_{k,j} a_kᵀ`` of rank one (``Linear`` layers),
  solved in ``K``-dimensional coefficient space without ever forming ``X``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    apply_scale_split,
    finalize,
    launch_bound,
    pair_scalars,
    scale_split,
    target_scalars,
    target_value,
    working_dtype,
)
from kfoc_backpack.solver.gram import (
    FIRST_TEST_STEPS,
    ScalarsFn,
    coefficient_power_iteration,
    coefficient_squaring_iteration,
    exact_coefficients,
    fetch_scalars,
    top_eigvec_2x2,
)
from kfoc_backpack.solver.power import (
    factor_power_iteration,
    outer_half_steps,
    output_major,
    samples_half_steps,
    terms_to_left,
    terms_to_right,
)

GRAM_MAX_TERMS = 4096
"""Largest number of terms for which the coefficient-space route is used by default."""

SQUARING_MAX_TERMS_CPU = 192
"""Up to this many terms the CPU runs the coefficient solve by repeated squaring."""

_EXPLICIT_GRAM_MAX_ELEMENTS = 1 << 24
"""Memory cap (elements) for materialising ``S_kᵀS_k`` in the outer-product Gram."""


def _options(options: SolverOptions | None) -> SolverOptions:
    return SolverOptions() if options is None else options


def _check_every(device: torch.device) -> int:
    """Evaluate stopping criteria less often on accelerators to avoid syncs."""
    return 4 if launch_bound(device) else 1


def _coefficient_solve(
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


def _random_coefficients(num: int, like: Tensor, options: SolverOptions) -> Tensor:
    return torch.randn(num, generator=options.generator, dtype=like.dtype, device="cpu").to(
        like.device
    )


def _random_matrix(dim: int, like: Tensor, options: SolverOptions) -> Tensor:
    mat = torch.randn(dim, dim, generator=options.generator, dtype=like.dtype, device="cpu")
    return mat.to(like.device)


def _validate_square_stack(terms: Tensor, name: str) -> None:
    if terms.dim() != 3 or terms.shape[-1] != terms.shape[-2]:
        raise ValueError(
            f"{name} must have shape [K, D, D] (a stack of square matrices), "
            f"got {tuple(terms.shape)}."
        )


# --------------------------------------------------------------------------------------
# Σ_k w_k L_k ⊗ R_k
# --------------------------------------------------------------------------------------


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
            :data:`GRAM_MAX_TERMS` terms and ``"power"`` beyond.
        right_trace: Split the scale so that ``tr(right)`` equals this (default:
            even split), see :func:`~kfoc_backpack.solver._common.scale_split`.

    Returns:
        The optimal factors, see the module docstring for the conventions.

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
    opts = _options(options)
    out_dtype = left_terms.dtype
    dtype = working_dtype(out_dtype)
    m, n = left_terms.shape[-1], right_terms.shape[-1]
    if num == 0:
        zeros = left_terms.new_zeros(m, m), right_terms.new_zeros(n, n)
        return KroneckerFactors(*zeros, 0, True)
    left_terms = left_terms.to(dtype)
    right_terms = right_terms.to(dtype)
    if weights is not None:
        if weights.shape != (num,):
            raise ValueError(f"weights must have shape [{num}], got {tuple(weights.shape)}.")
        left_terms = left_terms * weights.to(dtype).reshape(num, 1, 1)

    if method == "auto":
        method = "closed_form" if num <= 2 else "gram" if num <= GRAM_MAX_TERMS else "power"
    if method == "closed_form" and num > 2:
        raise ValueError(f"method='closed_form' needs at most 2 terms, got {num}.")

    left_flat = left_terms.reshape(num, -1)
    right_flat = right_terms.reshape(num, -1)
    if method in ("closed_form", "gram"):
        gram_left = left_flat @ left_flat.T
        gram_right = right_flat @ right_flat.T

        def solve(start: Tensor) -> tuple[Tensor, Tensor, int, bool]:
            if method == "closed_form":
                alpha = _closed_form_coefficients(gram_left, gram_right, num)
                return alpha, gram_left @ alpha, 0, True
            return _coefficient_solve(gram_left, gram_right, start, opts)[:4]

        if opts.random_init:
            start = _random_coefficients(num, left_terms, opts)
        elif init is not None:
            start = gram_right @ (left_flat @ init.to(dtype).reshape(-1))
        else:
            start = torch.ones(num, dtype=dtype, device=left_terms.device)
        alpha, beta, iters, converged = solve(start)
        if _needs_restart(beta, gram_right, gram_left):
            alpha, beta, iters, converged = solve(_random_coefficients(num, left_terms, opts))
        left = (alpha @ left_flat).reshape(m, m)
        right = (beta @ right_flat).reshape(n, n)
    else:
        to_right = terms_to_right(left_terms, right_terms)
        to_left = terms_to_left(left_terms, right_terms)
        if opts.random_init:
            start = _random_matrix(m, left_terms, opts)
        elif init is not None:
            start = init.to(dtype)
        else:
            start = left_terms.sum(0)
        check = _check_every(left_terms.device)
        left, right, iters, converged = factor_power_iteration(
            to_right, to_left, start, opts.tol, opts.max_iter, check
        )
        total = (left_flat @ left_flat.T * (right_flat @ right_flat.T)).sum()
        if bool((torch.linalg.matrix_norm(right) == 0) & (total > 0)):
            left, right, iters, converged = factor_power_iteration(
                to_right,
                to_left,
                _random_matrix(m, left_terms, opts),
                opts.tol,
                opts.max_iter,
                check,
            )
    symmetric = bool(
        (left_terms == left_terms.transpose(-1, -2)).all()
        & (right_terms == right_terms.transpose(-1, -2)).all()
    )
    left, right = finalize(left, right, out_dtype, symmetric, right_trace, "nearest_kronecker_sum")
    return KroneckerFactors(left, right, iters, converged)


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


# --------------------------------------------------------------------------------------
# Σ_k vec(X_k) vec(X_k)ᵀ
# --------------------------------------------------------------------------------------


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
        The optimal factors (conventions in the module docstring).

    Raises:
        ValueError: If ``samples`` is not three-dimensional.
    """
    if samples.dim() != 3:
        raise ValueError(f"samples must have shape [K, M, N], got {tuple(samples.shape)}.")
    opts = _options(options)
    out_dtype = samples.dtype
    samples = samples.to(working_dtype(out_dtype))
    num, m, n = samples.shape
    if num == 0:
        zeros = samples.new_zeros(m, m), samples.new_zeros(n, n)
        return KroneckerFactors(zeros[0].to(out_dtype), zeros[1].to(out_dtype), 0, True)
    if opts.random_init:
        start = _random_matrix(m, samples, opts)
    elif init is not None:
        start = init.to(samples.dtype)
    else:
        start = torch.eye(m, dtype=samples.dtype, device=samples.device)
    wide = output_major(samples)
    to_right, to_left = samples_half_steps(samples, wide)
    if _samples_operator_fits(num, m, n, samples.device):
        return _samples_operator_solve(wide, num, to_right, start, opts, right_trace, out_dtype)
    left, right, iters, converged = factor_power_iteration(
        to_right,
        to_left,
        start,
        opts.tol,
        opts.max_iter,
        _check_every(samples.device),
    )
    left, right = finalize(
        left, right, out_dtype, right_trace=right_trace, what="nearest_kronecker_samples"
    )
    return KroneckerFactors(left, right, iters, converged)


def _samples_operator_fits(num: int, m: int, n: int, device: torch.device) -> bool:
    """Whether the operator route of :func:`_samples_operator_solve` is taken.

    Only on launch-bound devices, where it replaces some ten operations per power step
    by a fixed few dozen in all, and while its ``(K·M)²`` pair products fit the memory
    cap and its flops stay below :data:`LAUNCH_BOUND_GRAM_FLOPS`.
    """
    if not launch_bound(device):
        return False
    pairs = (num * m) ** 2
    flops = 2 * pairs * (n + m * m)
    return pairs <= _EXPLICIT_GRAM_MAX_ELEMENTS and flops <= LAUNCH_BOUND_GRAM_FLOPS


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
    squaring (:func:`coefficient_squaring_iteration` with the identity metric), whose
    one host transfer per stopping test also carries the scale split.

    Args:
        wide: ``[M, K·N]`` output-major samples (see ``samples_half_steps``).
        num: Number of samples ``K``.
        to_right: The half-step ``L ↦ Σ_k X_kᵀ L X_k``.
        start: ``[M, M]`` start of the left factor.
        opts: Solver options.
        right_trace: Target trace of the right factor, or ``None``.
        out_dtype: Dtype of the result.

    Returns:
        The optimal factors (conventions in the module docstring).
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

    _, _, iters, converged, values = _coefficient_solve(
        None, operator, start.reshape(-1), opts, scalars
    )
    left, right, half = kept[0]
    left, right = apply_scale_split(
        left, right, half, values, right_trace, out_dtype, "nearest_kronecker_samples"
    )
    return KroneckerFactors(left, right, iters, converged)


# --------------------------------------------------------------------------------------
# Σ_k (S_kᵀ S_k) ⊗ (a_k a_kᵀ)
# --------------------------------------------------------------------------------------


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
    :data:`_EXPLICIT_GRAM_MAX_ELEMENTS` elements).

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


LAUNCH_BOUND_GRAM_FLOPS = 10**10
"""On launch-bound devices the Gram route is taken up to this flop count (about a
millisecond of a current GPU), whatever the factor route would cost: it launches a few
dozen kernels in all, the factor route about fifteen per step."""


def _outer_power_is_cheaper(
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
        The optimal factors (conventions in the module docstring).

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
    opts = _options(options)
    out_dtype = sqrt_out.dtype
    dtype = working_dtype(out_dtype)
    sqrt_out, inputs = sqrt_out.to(dtype), inputs.to(dtype)
    num, cols, m = sqrt_out.shape
    n = inputs.shape[1]
    flat_out = sqrt_out.reshape(num * cols, m)
    if num == 0:
        zeros = flat_out.new_zeros(m, m).to(out_dtype), inputs.new_zeros(n, n).to(out_dtype)
        return KroneckerFactors(*zeros, 0, True)
    if method not in ("auto", "gram", "power"):
        raise ValueError(f"Unknown method {method!r}; use 'auto', 'gram' or 'power'.")
    if method == "auto":
        cheaper = _outer_power_is_cheaper(num, cols, m, n, launch_bound(inputs.device))
        method = "power" if cheaper else "gram"
    if method == "power":
        to_right, to_left = outer_half_steps(sqrt_out, inputs)
        if opts.random_init:
            start = _random_matrix(m, inputs, opts)
            start = start @ start.T  # PSD
        elif init is not None:
            start = init.to(dtype)
        else:
            start = flat_out.T @ flat_out  # K-FAC's left factor
        left, right, iters, converged = factor_power_iteration(
            to_right, to_left, start, opts.tol, opts.max_iter, _check_every(inputs.device)
        )
        left, right = finalize(left, right, out_dtype, True, right_trace, "nearest_kronecker_outer")
        return KroneckerFactors(left, right, iters, converged)
    gram_left, trace_out = _outer_grams(sqrt_out)
    inner_in = inputs @ inputs.T
    gram_right, trace_in = inner_in.square(), inner_in.diagonal()
    if opts.random_init:
        start = _random_coefficients(num, inputs, opts).abs()
    elif init is not None:
        halfstep = ((flat_out @ init.to(dtype)) * flat_out).sum(1).reshape(num, cols).sum(1)
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

    alpha, beta, iters, converged, values = _coefficient_solve(
        gram_left, gram_right, start, opts, scalars
    )
    c_left, c_right = scale_split(
        _sqrt(values[0]),
        _sqrt(values[1]),
        values[2],
        values[3],
        target_value(values, right_trace),
        "nearest_kronecker_outer",
    )
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
