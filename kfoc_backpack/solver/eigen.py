"""Symmetric eigendecompositions that do not fail where LAPACK's ``eigh`` does.

LAPACK's divide-and-conquer ``eigh`` can fail to converge in float32 on large
rank-deficient factors (thousands of tied zero eigenvalues, e.g. ResNet-18's 4608-wide
input factors from a few batches). Every decomposition of the package goes through
:func:`eigh_attempts`: the matrix as it is, then (only if that failed) in float64, then
in float64 with the diagonal shifted by its mean magnitude — which leaves the
eigenvectors unchanged and shifts every eigenvalue by the same amount — and otherwise a
``FloatingPointError`` naming the matrix. laplace-torch's own ``symeig`` instead ends
the process when its one retry fails.

Index conventions: ``D`` the size of a symmetric ``[D, D]`` matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def eigh_attempts(symmetric: Tensor) -> Iterator[tuple[Tensor, float]]:
    """Yield ``(matrix, shift)``: the matrix, then float64, then float64 shifted.

    Each later attempt is only yielded if the caller asks for it (the previous one
    failed); ``shift`` is what was added to the diagonal (subtract it from the
    eigenvalues).
    """
    yield symmetric, 0.0
    wide = symmetric.to(torch.float64)
    if symmetric.dtype != torch.float64:
        yield wide, 0.0
    shift = wide.diagonal().abs().mean()
    shift = float(shift) if shift > 0 else 1.0
    yield wide + shift * torch.eye(len(wide), dtype=wide.dtype, device=wide.device), shift


def stable_eigh(symmetric: Tensor, what: str, uplo: str = "L") -> tuple[Tensor, Tensor]:
    """``(eigenvalues [D], eigenvectors [D, D])`` of a symmetric matrix, in its dtype.

    Args:
        symmetric: ``[D, D]`` symmetric matrix (only the triangle ``uplo`` is read).
        what: The matrix, for the error (e.g. ``"the left factor"``).
        uplo: The triangle ``torch.linalg.eigh`` reads, ``"L"`` or ``"U"``.

    Raises:
        FloatingPointError: If no attempt of :func:`eigh_attempts` converged.
    """
    failure = None
    for attempt, shift in eigh_attempts(symmetric):
        try:
            values, vectors = torch.linalg.eigh(attempt, UPLO=uplo)
        except torch.linalg.LinAlgError as error:
            failure = error
            continue
        dtype = symmetric.dtype
        return (values - shift).to(dtype), vectors.to(dtype)
    size = len(symmetric)
    raise FloatingPointError(
        f"{what} ({size} × {size}) has no eigendecomposition, also in float64 with a "
        f"diagonal shift: {failure}"
    )


def symeig(symmetric: Tensor, what: str = "the factor") -> tuple[Tensor, Tensor]:
    """laplace-torch's ``symeig`` without its exit: eigenvalues clamped at zero.

    The decomposition laplace-torch's ``Kron.decompose`` takes of each factor of a
    positive semi-definite block (``eigh`` of the upper triangle, eigenvalues clamped at
    zero, non-finite entries zeroed), with :func:`stable_eigh`'s retries in place of its
    one jitter and ``exit()``.

    Returns:
        ``(eigenvalues [D], eigenvectors [D, D])``.
    """
    values, vectors = stable_eigh(symmetric, what, uplo="U")
    return torch.nan_to_num(values.clamp(min=0.0)), torch.nan_to_num(vectors)
