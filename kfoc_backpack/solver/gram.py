r"""Power method in coefficient space, for problems with few terms.

Write the rearranged matrix (Van Loan–Pitsianis) of ``Σ_k L_k ⊗ R_k`` as
``A = U Vᵀ`` with the columns ``U[:, k] = vec(L_k)`` and ``V[:, k] = vec(R_k)``.
Every left singular vector of ``A`` lies in the span of the ``vec(L_k)``, so the
optimal factors are ``L = Σ_k α_k L_k`` and ``R = Σ_k β_k R_k`` and the whole power
method runs on the coefficient vectors, needing only the two ``K × K`` Gram matrices

.. math::
    G_L[k, l] = ⟨L_k, L_l⟩_F, \qquad G_R[k, l] = ⟨R_k, R_l⟩_F .

One power step is ``β ← G_L α`` (``R̄ = Aᵀ vec L``) and ``α ← G_R β`` (``L̄ = A vec R``),
``O(K²)`` flops, however large the factors are. Norms are Gram quadratic forms:
``‖L‖²_F = αᵀ G_L α``. For positive semi-definite terms both Gram matrices are
entry-wise non-negative, so a non-negative start keeps ``α, β ≥ 0`` and both factors
positive semi-definite, also when the top singular value is tied.

Index conventions of this module: ``K`` terms (samples): coefficient vectors ``α, β``
are ``[K]``, Gram matrices ``[K, K]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kfoc_backpack.solver._common import unit


def _quad_norm(coef: Tensor, gram: Tensor) -> Tensor:
    """Return ``sqrt(max(coefᵀ gram coef, 0))``."""
    return (coef @ (gram @ coef)).clamp_min(0).sqrt()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """Return ``num / den``, and zeros where ``den == 0``."""
    return num / _nonzero(den)


def coefficient_power_iteration(
    gram_left: Tensor,
    gram_right: Tensor,
    init: Tensor | None,
    tol: float,
    max_iter: int,
    check_every: int = 1,
) -> tuple[Tensor, Tensor, int, bool]:
    """Power method for the top singular pair of ``A = U Vᵀ`` given its Grams.

    Args:
        gram_left: ``[K, K]`` Gram matrix ``UᵀU`` of the left terms.
        gram_right: ``[K, K]`` Gram matrix ``VᵀV`` of the right terms.
        init: ``[K]`` start coefficients of the left factor (not necessarily
            normalised); must not be orthogonal to the solution. ``None`` for all
            ones (K-FAC's factors when the terms are the per-sample ones).
        tol: Stop once ``‖L⁽ⁿ⁾ − L⁽ⁿ⁻¹⁾‖_F < tol`` for the normalised left factor.
        max_iter: Maximal number of power steps.
        check_every: Evaluate the stopping criterion every this many steps (each
            evaluation synchronises a CUDA device with the host).

    Returns:
        ``(alpha, beta, iterations, converged)``: ``L = Σ α_k L_k`` has unit
        Frobenius norm and ``R = Σ β_k R_k`` carries the top singular value
        ``σ₁ = ‖R‖_F``, so that ``L ⊗ R`` is the optimal Kronecker product. All-zero
        Grams give all-zero coefficients.
    """
    if init is None:
        init = torch.ones_like(gram_left[0])
    alpha = _safe_div(init, _quad_norm(init, gram_left))
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        beta = gram_left @ alpha
        beta = _safe_div(beta, _quad_norm(beta, gram_right))
        new_alpha = gram_right @ beta
        new_alpha = _safe_div(new_alpha, _quad_norm(new_alpha, gram_left))
        delta = new_alpha - alpha
        alpha = new_alpha
        if iterations % check_every == 0 or iterations == max_iter:
            if _quad_norm(delta, gram_left).item() < tol:
                converged = True
                break
    beta = gram_left @ alpha
    return alpha, beta, iterations, converged


def top_eigvec_2x2(mat: Tensor) -> Tensor:
    """Top eigenvector of a ``2 × 2`` matrix with real eigenvalues, in closed form.

    Used for two-term problems such as the merge of running aggregation, where
    ``mat = G_R G_L`` is a product of two positive semi-definite Gram matrices (its
    eigenvalues are real and non-negative). For an entry-wise non-negative ``mat``
    the returned vector is non-negative. If ``mat`` is a multiple of the identity,
    every vector is a top eigenvector and ``(1, 1)`` is returned.

    Args:
        mat: ``[2, 2]`` matrix with real eigenvalues.

    Returns:
        ``[2]`` eigenvector of the largest eigenvalue (not normalised).
    """
    a, b, c, d = mat[0, 0], mat[0, 1], mat[1, 0], mat[1, 1]
    half_gap = 0.5 * (a - d)
    lam = 0.5 * (a + d) + (half_gap.square() + b * c).clamp_min(0).sqrt()
    v1 = torch.stack([b, lam - a])
    v2 = torch.stack([lam - d, c])
    v = torch.where(v1.norm() >= v2.norm(), v1, v2)
    return torch.where(v.norm() > 0, v, torch.ones_like(v))


FIRST_SQUARINGS = 5
"""Squarings before the first stopping test: ``2⁵ = 32`` power steps.

Power steps from K-FAC's start reach the paper's tolerance within a few tens of steps
on most layers of ``integration/benchmark.py``, and need far more where the top two
singular values are close (``python integration/convergence.py`` prints the rates and
steps); each test costs a host transfer and each squaring one matrix product, so the
first test comes after 33 steps. Problems unsettled there are finished by :func:`exact_coefficients`
when small enough (``SolverOptions.exact_max_terms``)."""

FIRST_TEST_STEPS = 2**FIRST_SQUARINGS + 1
"""Power steps at the first stopping test of :func:`coefficient_squaring_iteration`."""

RENORMALISE_EVERY = 3
"""Squarings between two trace normalisations of the power.

After a normalisation the eigenvalues ``μ`` sum to one and the top one is at least
``1/K``; three squarings scale it by at least ``K⁻⁸`` (``> 10⁻²⁸`` in float32 for every
``K`` the Gram route takes), far from under- and overflow."""

ScalarsFn = Callable[[Tensor, Tensor], list[Tensor]]


def coefficient_squaring_iteration(
    gram_left: Tensor | None,
    gram_right: Tensor,
    init: Tensor | None,
    tol: float,
    max_iter: int,
    scalars: ScalarsFn | None = None,
) -> tuple[Tensor, Tensor, int, bool, list[float]]:
    """Run the power method of :func:`coefficient_power_iteration` by repeated squaring.

    Made for launch-bound devices (accelerators, and the CPU for small ``K``), where a
    ``K × K`` product costs about what an ``O(K²)`` step costs and every stopping test
    synchronises with the host. ``M = G_R G_L`` (a product of two positive
    semi-definite matrices: real, non-negative eigenvalues, diagonalisable) is squared
    :data:`FIRST_SQUARINGS` times and normalised by its trace (an upper bound of the
    top eigenvalue, and ``K`` times a lower bound) at the start and every
    :data:`RENORMALISE_EVERY` squarings. The product ``G_R G_L`` is formed unscaled:
    it overflows only where ``‖F‖²_F`` itself does, and then the solve raises like
    for non-finite input.

    One ordinary step from ``M^(2ˢ) init`` then gives the change of the normalised left
    factor. Until it is below ``tol``, ``M^(2ˢ)`` is squared once more per test while
    the step count stays within ``max_iter``; the remaining steps up to ``max_iter`` are
    applied at once, by the binary digits of their number, and tested once more. So a
    solve usually transfers to the host once, and at most ``⌈log₂ max_iter⌉ − 4``
    times. Non-negative Grams keep the coefficients non-negative.

    Each test is one device-to-host transfer, which also carries ``scalars(alpha,
    beta)``: callers fetch what they need of the result (norms, traces) with it.

    Args:
        gram_left: ``[K, K]`` Gram matrix of the left terms; ``None`` for the identity
            (then ``gram_right`` is any symmetric positive semi-definite matrix and the
            method is the power method for its top eigenvector).
        gram_right: ``[K, K]`` Gram matrix of the right terms.
        init: ``[K]`` start coefficients of the left factor; ``None`` for all ones
            (K-FAC's factors when the terms are the per-sample ones).
        tol: Stopping precision, as for :func:`coefficient_power_iteration`.
        max_iter: Maximal number of power steps (counting each squaring's steps).
        scalars: Optional ``(alpha, beta) ↦ [0-dim tensors]`` fetched with the test.

    Returns:
        ``(alpha, beta, iterations, converged, values)``: the first four as for
        :func:`coefficient_power_iteration`, ``values`` the host values of
        ``scalars(alpha, beta)`` for the returned pair (empty without ``scalars``).
    """
    if max_iter < 2:
        if gram_left is None:
            gram_left = torch.eye(len(gram_right), dtype=gram_right.dtype, device=gram_right.device)
        alpha, beta, iters, converged = coefficient_power_iteration(
            gram_left, gram_right, init, tol, max_iter
        )
        return alpha, beta, iters, converged, fetch_scalars(None, alpha, beta, scalars)[1]
    power = _trace_normalised(gram_right if gram_left is None else gram_right @ gram_left)
    powers = [power]  # directions of M^(2^i), for the last stretch below
    squarings = min(FIRST_SQUARINGS, (max_iter - 1).bit_length() - 1)
    for i in range(squarings):  # no host sync: zero stays zero, scale stays bounded
        power = power @ power
        if i % RENORMALISE_EVERY == RENORMALISE_EVERY - 1:
            power = _trace_normalised(power)
        powers.append(power)
    steps = 2**squarings + 1
    tol_sq = tol * tol
    start = power.sum(1) if init is None else power @ init
    while True:
        alpha, beta, delta_sq = _checked_step(gram_left, gram_right, start)
        delta_sq_value, values = fetch_scalars(delta_sq, alpha, beta, scalars)
        if delta_sq_value < tol_sq or not math.isfinite(delta_sq_value) or steps == max_iter:
            return alpha, beta, steps, delta_sq_value < tol_sq, values
        if 2 * steps - 1 <= max_iter:  # square once more: 2^(s+1) + 1 steps from the start
            power = _trace_normalised(power @ power)
            powers.append(power)
            start = power.sum(1) if init is None else power @ init
            steps = 2 * steps - 1
            continue
        # the last stretch to exactly max_iter steps: M^(r-1) by the binary digits of
        # r - 1 (r < 2^s), then one checked step
        start = alpha
        remaining = max_iter - steps - 1
        for bit, mat in enumerate(powers):
            if remaining >> bit & 1:
                start = unit(mat @ start)
        steps = max_iter


TIE_RTOL = 1e-6
"""Relative gap below which eigenvalues of :func:`exact_coefficients` count as tied.

Within it the power method cannot separate the eigenvectors in any affordable number
of steps (``(1 − 10⁻⁶)ⁿ ≈ 1``), and the Frobenius objective differs by at most this
fraction of ``σ₁²`` across the cluster; float32 rounding of exactly tied problems
stays well inside it."""


def exact_coefficients(
    gram_left: Tensor | None, gram_right: Tensor, init: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """Return the limit of the coefficient power method, by eigendecomposition.

    The power method from ``init`` converges to the projection of its first step
    onto the top eigenspace of ``G_R G_L``. With ``G_R = W Wᵀ`` (``W = V √D`` from the
    eigendecomposition, rounding-negative eigenvalues clamped to zero) the steps
    ``α⁽ⁿ⁾ = W C^(n−1) y`` run on the symmetric ``C = Wᵀ G_L W`` with
    ``y = Wᵀ G_L init``, so the limit is ``α = W P y``, ``P`` the orthogonal projector
    onto the eigenvectors of ``C`` whose eigenvalue is within :data:`TIE_RTOL` of the
    top one. This is exact for a single top singular value and, for tied ones, the
    same point of the top subspace that the power method approaches (non-negative
    Grams and start still give non-negative coefficients: positive semi-definite
    factors). A start orthogonal to the top subspace gives the top eigenvector
    itself. Computed in float64 on the host: the matrices are ``K × K``, and a device
    runs no kernels for it (``torch.linalg.eigh`` reads the lower triangles only).

    Args:
        gram_left: ``[K, K]`` Gram matrix of the left terms; ``None`` for the
            identity (then ``gram_right`` is any symmetric positive semi-definite
            matrix and the result its top eigenvector).
        gram_right: ``[K, K]`` Gram matrix of the right terms.
        init: ``[K]`` start coefficients; ``None`` for all ones.

    Returns:
        ``(alpha, beta)`` normalised as by :func:`coefficient_power_iteration`
        (``αᵀ G_L α = 1``, ``β = G_L α``), on the device and in the dtype of
        ``gram_right``; all zeros when the Grams are. ``None`` when a Gram matrix
        is not finite (the caller's checks then raise).
    """
    grams = gram_right[None] if gram_left is None else torch.stack([gram_right, gram_left])
    grams = grams.to(device="cpu", dtype=torch.float64)  # one transfer
    if not bool(grams.isfinite().all()):
        return None
    g_right, g_left = grams[0], None if gram_left is None else grams[1]
    metric = g_right if g_left is None else g_left
    first = metric.sum(1) if init is None else metric @ init.to(metric)  # G_L init
    basis, op = None, g_right  # identity metric: C = G_R itself
    if g_left is not None:
        evals, evecs = torch.linalg.eigh(g_right)
        basis = evecs * evals.clamp_min(0).sqrt()  # G_R = W Wᵀ
        op, first = basis.T @ g_left @ basis, basis.T @ first
    evals, evecs = torch.linalg.eigh(op)
    top = evals[-1].item()
    if not top > 0:  # all-zero problem
        zeros = gram_right.new_zeros(gram_right.shape[0])
        return zeros, zeros
    coef = evecs @ ((evals >= top * (1 - TIE_RTOL)) * (evecs.T @ first))
    if not coef @ coef > 1e-16 * (first @ first):  # start orthogonal to the top subspace
        coef = evecs[:, -1]
    alpha = coef if basis is None else basis @ coef
    beta = alpha if g_left is None else g_left @ alpha
    pair = torch.stack([alpha, beta]) * (alpha @ beta).rsqrt()
    alpha, beta = pair.to(device=gram_right.device, dtype=gram_right.dtype).unbind()
    return alpha, beta


def _trace_normalised(mat: Tensor) -> Tensor:
    """``mat / tr(mat)`` for a matrix with non-negative eigenvalues (zero stays zero)."""
    return mat / torch.trace(mat).clamp_min(torch.finfo(mat.dtype).tiny)


def _rsqrt(value: Tensor) -> Tensor:
    """``1/√value``, finite at zero (a zero vector scaled by it stays zero)."""
    return value.clamp_min(torch.finfo(value.dtype).tiny).rsqrt()


def _checked_step(
    gram_left: Tensor | None, gram_right: Tensor, start: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One power step from ``start`` and the squared change of the normalised left factor.

    With ``b = G_L a`` the left factor's norm is ``√(a·b)`` and ``‖Σ_k d_k L_k‖² =
    d·G_L d``, so four matrix-vector products and a few element-wise operations give
    the step and its change; no host sync.

    Returns:
        ``(alpha, beta, delta_sq)``: ``alpha`` the normalised new left coefficients,
        ``beta = G_L alpha`` and ``delta_sq = ‖L_new − L_start‖²_F`` (normalised).
    """
    b_start = start if gram_left is None else gram_left @ start
    r_start = _rsqrt(start @ b_start)
    a_new = gram_right @ b_start
    b_new = a_new if gram_left is None else gram_left @ a_new
    r_new = _rsqrt(a_new @ b_new)
    alpha = a_new * r_new
    diff = alpha - start * r_start
    if gram_left is None:  # Euclidean metric: beta = alpha
        return alpha, alpha, diff @ diff
    beta = b_new * r_new
    return alpha, beta, diff @ (beta - b_start * r_start)


def fetch_scalars(
    delta_sq: Tensor | None, alpha: Tensor, beta: Tensor, scalars: ScalarsFn | None
) -> tuple[float, list[float]]:
    """Fetch ``delta_sq`` and ``scalars(alpha, beta)`` in one device-to-host transfer."""
    parts = [] if delta_sq is None else [delta_sq]
    if scalars is not None:
        parts += scalars(alpha, beta)
    if not parts:
        return math.nan, []
    values = torch.stack(parts).tolist()
    if delta_sq is None:
        return math.nan, values
    return values[0], values[1:]


def _nonzero(norm: Tensor) -> Tensor:
    return torch.where(norm > 0, norm, torch.ones_like(norm))
