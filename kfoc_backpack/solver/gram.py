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
"""

from __future__ import annotations

import torch
from torch import Tensor


def _quad_norm(coef: Tensor, gram: Tensor) -> Tensor:
    """Return ``sqrt(max(coefᵀ gram coef, 0))``."""
    return (coef @ (gram @ coef)).clamp_min(0).sqrt()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """Return ``num / den``, and zeros where ``den == 0``."""
    return num / _nonzero(den)


def coefficient_power_iteration(
    gram_left: Tensor,
    gram_right: Tensor,
    init: Tensor,
    tol: float,
    max_iter: int,
    check_every: int = 1,
) -> tuple[Tensor, Tensor, int, bool]:
    """Power method for the top singular pair of ``A = U Vᵀ`` given its Grams.

    Args:
        gram_left: ``[K, K]`` Gram matrix ``UᵀU`` of the left terms.
        gram_right: ``[K, K]`` Gram matrix ``VᵀV`` of the right terms.
        init: ``[K]`` start coefficients of the left factor (not necessarily
            normalised); must not be orthogonal to the solution.
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


def coefficient_squaring_iteration(
    gram_left: Tensor,
    gram_right: Tensor,
    init: Tensor,
    tol: float,
    max_iter: int,
) -> tuple[Tensor, Tensor, int, bool]:
    """Run the power method of :func:`coefficient_power_iteration` by repeated squaring.

    For accelerators, where ``O(K²)`` matrix-vector steps are bound by kernel-launch
    latency and every stopping test synchronises with the host: ``M = G_R G_L`` is
    squared ``s = ⌊log₂ max_iter⌋`` times (normalised each time, no host sync), which
    applies ``2ˢ`` power steps in ``s`` matrix products of ``O(K³)`` flops. One
    ordinary step then measures the change of the normalised left factor; only if it
    is not below ``tol`` does the ordinary iteration continue, for the remaining
    ``max_iter − 2ˢ`` steps. Non-negative Grams keep the coefficients non-negative.

    Args:
        gram_left: ``[K, K]`` Gram matrix of the left terms.
        gram_right: ``[K, K]`` Gram matrix of the right terms.
        init: ``[K]`` start coefficients of the left factor.
        tol: Stopping precision, as for :func:`coefficient_power_iteration`.
        max_iter: Maximal number of power steps (counting each squaring's steps).

    Returns:
        ``(alpha, beta, iterations, converged)`` as for
        :func:`coefficient_power_iteration`.
    """
    squarings = max(int(max_iter).bit_length() - 1, 0)
    tiny = torch.finfo(gram_left.dtype).tiny
    power = (gram_right / torch.linalg.matrix_norm(gram_right).clamp_min(tiny)) @ (
        gram_left / torch.linalg.matrix_norm(gram_left).clamp_min(tiny)
    )
    for _ in range(squarings):  # no host sync: zero stays zero, scale stays bounded
        power = power / torch.linalg.matrix_norm(power).clamp_min(tiny)
        power = power @ power
    alpha = power @ init
    steps = 2**squarings
    alpha, beta, more, converged = coefficient_power_iteration(
        gram_left, gram_right, alpha, tol, max(max_iter - steps, 1), check_every=1
    )
    return alpha, beta, steps + more, converged


def _nonzero(norm: Tensor) -> Tensor:
    return torch.where(norm > 0, norm, torch.ones_like(norm))
