"""Symmetric eigendecompositions that do not fail where LAPACK's ``eigh`` does.

LAPACK's divide-and-conquer ``eigh`` can fail on large rank-deficient factors
(thousands of tied zero eigenvalues, e.g. ResNet-18's 4608-wide input factors from a
few batches): in float32 it raises, or — silently — returns NaN eigenvectors (seen on
ResNet-18's 512-wide output factors, torch 2.14 on CPU). Every decomposition of the
package goes through :func:`eigh_attempts`, an attempt counting as failed where it
raises or returns anything non-finite: the matrix as it is; then with the diagonal
shifted by its mean magnitude — which leaves the eigenvectors unchanged and shifts
every eigenvalue by the same amount — in the matrix's own dtype (as fast as the first
attempt); then in float64, unshifted and shifted; otherwise a ``FloatingPointError``
names the matrix. laplace-torch's own ``symeig`` instead ends the process when its one
retry fails.

Index conventions: ``D`` the size of a symmetric ``[D, D]`` matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def eigh_attempts(symmetric: Tensor) -> Iterator[tuple[Tensor, float]]:
    """Yield ``(matrix, shift)``: the matrix, shifted, then float64 and float64 shifted.

    Each later attempt is only yielded if the caller asks for it (the previous one
    failed); ``shift`` is what was added to the diagonal (subtract it from the
    eigenvalues).
    """
    yield symmetric, 0.0
    magnitude = symmetric.diagonal().abs().mean()
    shift = float(magnitude) if magnitude > 0 and torch.isfinite(magnitude) else 1.0

    def shifted(matrix: Tensor) -> Tensor:
        eye = torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
        return matrix + shift * eye

    if symmetric.dtype != torch.float64:
        yield shifted(symmetric), shift
        wide = symmetric.to(torch.float64)
        yield wide, 0.0
    else:
        wide = symmetric
    yield shifted(wide), shift


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
        if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
            failure = "eigh returned non-finite values"
            continue
        dtype = symmetric.dtype
        return (values - shift).to(dtype), vectors.to(dtype)
    size = len(symmetric)
    raise FloatingPointError(
        f"{what} ({size} × {size}) has no eigendecomposition, also with a diagonal shift "
        f"and in float64: {failure}"
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


def stacked_eigh(stack: Tensor, what: str, uplo: str = "L") -> tuple[Tensor, Tensor]:
    """``(eigenvalues [G, D], eigenvectors [G, D, D])`` of ``G`` symmetric matrices.

    One batched ``eigh``; a matrix whose result is not finite (or the whole stack,
    where the batched call raises) is decomposed again by :func:`stable_eigh`'s
    attempts, its error naming ``what`` and the matrix's index.

    Args:
        stack: ``[G, D, D]`` symmetric matrices (only the triangle ``uplo`` is read).
        what: The matrices, for the error (e.g. ``"the left factors"``).
        uplo: The triangle ``torch.linalg.eigh`` reads.
    """
    try:
        values, vectors = torch.linalg.eigh(stack, UPLO=uplo)
        finite = torch.isfinite(values).all(-1) & torch.isfinite(vectors).flatten(1).all(-1)
        redo = (~finite).nonzero().flatten().tolist()
    except torch.linalg.LinAlgError:
        values, vectors = stack.new_empty(stack.shape[:-1]), torch.empty_like(stack)
        redo = list(range(len(stack)))
    for index in redo:
        values[index], vectors[index] = stable_eigh(stack[index], f"{what} [{index}]", uplo)
    return values, vectors


def stacked_symeig(stack: Tensor, what: str = "the factors") -> tuple[Tensor, Tensor]:
    """:func:`symeig` of each of ``G`` matrices ``[G, D, D]`` (:func:`stacked_eigh`)."""
    values, vectors = stacked_eigh(stack, what, uplo="U")
    return torch.nan_to_num(values.clamp(min=0.0)), torch.nan_to_num(vectors)
