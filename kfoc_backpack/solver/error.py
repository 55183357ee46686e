r"""Frobenius error of a Kronecker approximation, without forming the dense matrix.

For ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` (docs/conventions.md §1)

.. math::
    ‖F − L ⊗ R‖²_F = ‖F‖²_F − 2 Σ_k tr(X_kᵀ L X_k R) + ‖L‖²_F ‖R‖²_F,
    \qquad ‖F‖²_F = Σ_{j,k} ⟨X_j, X_k⟩²_F .

The expansion loses accuracy to cancellation when the error is tiny compared with
``‖F‖``; computing in ``float64`` resolves relative errors down to about ``1e-7``.

Index conventions of this module: ``K`` terms (samples), ``J`` columns per sample,
``M`` output features (left factor ``[M, M]``), ``N`` input features (right factor
``[N, N]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfoc_backpack.solver.outer import outer_gram_left


def kron_error_from(
    norm_sq: Tensor, cross: Tensor, left: Tensor, right: Tensor, relative: bool = True
) -> Tensor:
    """Frobenius error of ``left ⊗ right`` from ``‖F‖²_F`` and ``⟨F, L ⊗ R⟩``.

    For callers that hold ``‖F‖²`` already (errors of several factor pairs of one
    block): ``cross = Σ_k tr(X_kᵀ L X_k R)``, e.g. ``(terms.to_right(L) * R).sum()``.

    Args:
        norm_sq: Scalar ``‖F‖²_F``.
        cross: Scalar ``⟨F, L ⊗ R⟩``.
        left: ``[M, M]`` left factor.
        right: ``[N, N]`` right factor.
        relative: Divide by ``‖F‖_F`` (zero ``F`` gives the absolute error).

    Returns:
        Scalar error.
    """
    err_sq = norm_sq - 2 * cross + left.square().sum() * right.square().sum()
    err = err_sq.clamp_min(0).sqrt()
    if not relative:
        return err
    norm = norm_sq.clamp_min(0).sqrt()
    return torch.where(norm > 0, err / torch.where(norm > 0, norm, 1.0), err)


def kron_error_samples(
    samples: Tensor, left: Tensor, right: Tensor, relative: bool = True
) -> Tensor:
    """Frobenius error of ``left ⊗ right`` against ``F = Σ_k vec(X_k) vec(X_k)ᵀ``.

    Args:
        samples: ``[K, M, N]`` per-sample matrices ``X_k``.
        left: ``[M, M]`` left (row-side) factor.
        right: ``[N, N]`` right (column-side) factor.
        relative: Divide by ``‖F‖_F`` (zero ``F`` gives the absolute error).

    Returns:
        Scalar error.
    """
    flat = samples.reshape(samples.shape[0], -1)
    norm_sq = (flat @ flat.T).square().sum()
    cross = (torch.matmul(left, samples) * torch.matmul(samples, right)).sum()
    return kron_error_from(norm_sq, cross, left, right, relative)


def kron_error_outer(
    sqrt_out: Tensor, inputs: Tensor, left: Tensor, right: Tensor, relative: bool = True
) -> Tensor:
    """Frobenius error of ``left ⊗ right`` against ``F = Σ_k (S_kᵀS_k) ⊗ (a_k a_kᵀ)``.

    Args:
        sqrt_out: ``[K, J, M]`` (or ``[K, M]``) output-side vectors.
        inputs: ``[K, N]`` input-side vectors.
        left: ``[M, M]`` left factor.
        right: ``[N, N]`` right factor.
        relative: Divide by ``‖F‖_F``.

    Returns:
        Scalar error.
    """
    if sqrt_out.dim() == 2:
        sqrt_out = sqrt_out.unsqueeze(1)
    norm_sq = (outer_gram_left(sqrt_out) * (inputs @ inputs.T).square()).sum()
    quad_left = torch.einsum("kjp,pq,kjq->k", sqrt_out, left, sqrt_out)
    quad_right = torch.einsum("kp,pq,kq->k", inputs, right, inputs)
    return kron_error_from(norm_sq, (quad_left * quad_right).sum(), left, right, relative)


def kron_error_dense(dense: Tensor, left: Tensor, right: Tensor, relative: bool = True):
    """Frobenius error of ``left ⊗ right`` against a dense ``[MN, MN]`` matrix.

    Args:
        dense: Dense matrix ``F`` (row-major ``vec`` convention).
        left: ``[M, M]`` left factor.
        right: ``[N, N]`` right factor.
        relative: Divide by ``‖F‖_F``.

    Returns:
        Scalar error.
    """
    err = torch.linalg.matrix_norm(dense - torch.kron(left, right))
    if not relative:
        return err
    norm = torch.linalg.matrix_norm(dense)
    return torch.where(norm > 0, err / torch.where(norm > 0, norm, 1.0), err)
