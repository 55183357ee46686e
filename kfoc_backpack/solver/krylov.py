r"""Lanczos iteration for the optimal Kronecker product: fewer steps than the power method.

The left factor of the optimum is the top eigenvector of the left power map

.. math::
    S(L) = Σ_k X_k \Big(Σ_l X_lᵀ L X_l\Big) X_kᵀ
         = \mathrm{mat}(\mathcal R \mathcal Rᵀ \mathrm{vec} L),

a symmetric positive semi-definite operator on ``M × M`` matrices (Frobenius inner
product); the power method applies it once per step and converges at the rate
``(σ₂/σ₁)²``. The Lanczos iteration applies it once per step as well, but converges at
the rate of a Chebyshev polynomial: where the power method needs ``n`` steps (``n ≈ 50``
for Monte-Carlo Fisher blocks of wide convolutions, ``σ₂/σ₁ ≈ 0.9``) it needs about
``√n``–``n/3``. The basis is kept and re-orthogonalised in full (at most
:data:`RESTART` matrices; then a restart from the current Ritz vector).

Stopping test (``stop="factors"``): the relative Ritz residual
``‖S(u) − θu‖_F / θ < tol``. It is the change
``‖S(u)/‖S(u)‖ − u‖_F`` (to first order) that one more power step would make, i.e. the
stopping test of :func:`~kfoc_backpack.solver.power.factor_power_iteration` evaluated at
the Ritz vector. With ``stop="objective"`` the test is on the top Ritz value ``θ`` itself
(``σ²``: the error of the product is ``‖F‖² − θ``), which converges about twice as fast
in digits: ``λ₁ − θ ≤ residual² / gap``.

Scale: the operator is rescaled by powers of two (exact) so that its outputs are of
order one. Deep layers' blocks are tiny (``θ ≈ 1e-25`` for ResNet-18's 128-channel
layers at initialisation, entries of ``S(u)`` near ``1e-27``): a float32 norm of such a
vector squares its entries below the smallest normal number and returns zero or
garbage, which once ended the iteration at its start (a "zero residual") or fed it
wrong ``β`` (50 steps and a spurious Ritz value).

Index conventions: ``M`` output features (left factor ``[M, M]``), ``k`` Lanczos steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kfoc_backpack.enums import Stop
from kfoc_backpack.solver._common import frobenius_norm, unit

RESTART = 48
"""Basis size at which the iteration restarts from its current Ritz vector."""

HEADROOM = 2.0**24
"""Outputs whose largest entry is within this factor of the dtype's smallest normal
number (float32: ``2⁻¹⁰²``), or of the reciprocal at the top, are recomputed from an
input scaled towards order one, so that no product inside ``S`` leaves the normal range."""


def _power_of_two(value: float) -> float:
    """``2^round(log2 value)`` for a positive finite ``value`` (exact scaling factor)."""
    return math.ldexp(1.0, round(math.log2(value)))


def _safe_unit(vec: Tensor) -> Tensor:
    """``vec / ‖vec‖`` computed on ``vec / max|vec|`` (no underflow of the squares)."""
    top = vec.abs().max()
    if not bool(top > 0):
        return torch.zeros_like(vec)
    return unit(vec / top)


def _scaled(
    apply: Callable[[Tensor], Tensor], vec: Tensor, shape: torch.Size
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``c_out·S(c_in·u)`` with powers of two making its outputs of order one.

    Returns the scaled operator (same eigenvectors) and its value at ``vec``.
    """
    c_in = 1.0
    low = torch.finfo(vec.dtype).tiny * HEADROOM
    out = apply(vec.view(shape)).reshape(-1)
    top = float(out.abs().max())
    for _ in range(4):  # tiny (or huge) outputs: scale the input towards order one
        if top == 0 or not math.isfinite(top) or low <= top <= 1 / low:
            break
        c_in = c_in / _power_of_two(top)
        out = apply((vec * c_in).view(shape)).reshape(-1)
        top = float(out.abs().max())
    if top == 0 or not math.isfinite(top):
        return apply, out
    c_out = 1 / _power_of_two(top)
    if c_in == 1.0:
        return (lambda mat: apply(mat) * c_out), out * c_out
    return (lambda mat: apply(mat * c_in) * c_out), out * c_out


def _top_ritz(alphas: list[Tensor], betas: list[Tensor]) -> tuple[float, Tensor, float]:
    """Top Ritz pair of the tridiagonal ``T_k`` (host, float64): ``(θ, y, |y_k|)``."""
    diag = torch.stack(alphas).double().cpu()
    tri = torch.diag(diag)
    if len(betas):
        off = torch.stack(betas).double().cpu()
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tri)
    top = vectors[:, -1]
    return float(values[-1]), top, float(top[-1].abs())


def lanczos_top(
    apply: Callable[[Tensor], Tensor],
    start: Tensor,
    tol: float,
    max_iter: int,
    check_every: int = 1,
    stop: Stop = Stop.FACTORS,
) -> tuple[Tensor, int, bool]:
    """Top eigenvector of a symmetric PSD operator on ``[M, M]`` matrices.

    Args:
        apply: ``L ↦ S(L)``, symmetric positive semi-definite in the Frobenius product.
        start: ``[M, M]`` start (not orthogonal to the top eigenvector; K-FAC's left
            factor or the identity for PSD problems).
        tol: Stop once the relative Ritz residual is below ``tol`` (module docstring;
            ``stop="factors"``); with ``stop="objective"`` also once the top Ritz value
            ``θ`` (``σ²``, the squared norm the Ritz vector captures) changes by less
            than ``tol·θ`` between tests.
        max_iter: Maximal number of applications of ``S`` (power-step equivalents).
        check_every: Evaluate the stopping test every this many steps (each test is
            one host transfer of the tridiagonal coefficients).
        stop: Which of the two rules.

    Returns:
        ``(left, steps, converged)``: the unit-norm Ritz vector ``[M, M]``, the number
        of applications of ``S`` and whether the test was met. A zero operator or start
        gives a zero ``left`` (counted as converged).
    """
    shape = start.shape
    vec = _safe_unit(start.reshape(-1))
    if not bool(vec.abs().sum() > 0):
        return torch.zeros_like(start), 0, True
    apply, first = _scaled(apply, vec, shape)
    store = vec.new_empty(min(RESTART, max_iter) + 1, vec.numel())
    store[0] = vec
    size = 1  # basis vectors in store[:size]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    steps = 0
    objective = Stop.parse(stop, "stop") is Stop.OBJECTIVE
    previous = None  # θ at the last test (objective rule)
    while True:
        current = store[size - 1]
        if first is not None:
            out, first = first, None
        else:
            out = apply(current.view(shape)).reshape(-1)
        steps += 1
        alphas.append(out @ current)
        stacked = store[:size]
        out = out - stacked.T @ (stacked @ out)  # full re-orthogonalisation, twice
        out = out - stacked.T @ (stacked @ out)
        norm = frobenius_norm(out)
        done = steps >= max_iter or size >= RESTART
        if steps % check_every == 0 or done:
            theta, coef, last = _top_ritz(alphas, betas)
            if theta <= 0:  # zero operator on the start's Krylov space
                return torch.zeros_like(start), steps, True
            residual = float(norm) * last / theta
            settled = residual < tol  # θ is then settled too: λ₁ − θ ≤ residual² θ / gap
            if objective:
                settled = settled or (previous is not None and abs(theta - previous) <= tol * theta)
                previous = theta
            if settled or done or float(norm) <= 1e-12 * theta:
                ritz = unit(coef.to(stacked) @ stacked)
                converged = settled or float(norm) <= 1e-12 * theta
                if converged or steps >= max_iter:
                    return ritz.view(shape), steps, converged
                store[0], size, alphas, betas = ritz, 1, [], []  # restart from the Ritz vector
                continue
        betas.append(norm)
        store[size] = out / norm
        size += 1
