"""Shared pieces of the nearest-Kronecker solvers: options, result type, conventions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_TOL = 1e-5
"""Stopping precision ``δ`` of the paper: stop once ``‖L⁽ⁿ⁾ − L⁽ⁿ⁻¹⁾‖_F < δ``."""

DEFAULT_MAX_ITER = 100
"""Maximal number of power steps ``n_max`` of the paper."""


@dataclass(frozen=True)
class SolverOptions:
    """Options shared by every nearest-Kronecker solver.

    Attributes:
        tol: Stopping precision: the power method stops once the change of the
            normalised left factor, ``‖L⁽ⁿ⁾ − L⁽ⁿ⁻¹⁾‖_F``, is below ``tol``.
            Paper default ``1e-5``.
        max_iter: Maximal number of power steps (paper default ``100``).
        generator: Random generator for the random initialisation. Only used when
            the deterministic start is orthogonal to the solution (possible only for
            indefinite terms) or when ``random_init`` is set.
        random_init: Start from a standard normal left factor (the paper's
            initialisation) instead of the deterministic start. For positive
            semi-definite terms the deterministic start (the sum of the left terms,
            i.e. K-FAC's left factor) is never orthogonal to the solution and
            converges to the positive semi-definite optimum.
    """

    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    generator: torch.Generator | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if not (self.tol > 0):
            raise ValueError(f"tol must be positive, got {self.tol!r}.")
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")


class KroneckerFactors(NamedTuple):
    """Result of a nearest-Kronecker-product solve.

    ``left ⊗ right`` (PyTorch's ``torch.kron``, row-major ``vec``) is the
    Frobenius-optimal single Kronecker product, up to the solver tolerance.

    Attributes:
        left: ``[M, M]`` left (output-side) factor, symmetric.
        right: ``[N, N]`` right (input-side) factor, symmetric.
        iterations: Number of power steps taken (``0`` for closed-form solves).
        converged: Whether the stopping criterion was met within ``max_iter`` steps
            (closed-form solves and all-zero inputs count as converged).
    """

    left: Tensor
    right: Tensor
    iterations: int
    converged: bool


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype the solvers compute in: half precisions are promoted.

    Args:
        dtype: Floating dtype of the input.

    Returns:
        ``dtype`` itself for ``float32``/``float64``, ``float32`` for half precisions.

    Raises:
        TypeError: If ``dtype`` is not a floating point type.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"Nearest-Kronecker solvers need floating point input, got {dtype}.")
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def symmetrize(mat: Tensor) -> Tensor:
    """Return ``(mat + matᵀ) / 2``."""
    return 0.5 * (mat + mat.transpose(-1, -2))


def finalize(
    left: Tensor, right: Tensor, out_dtype: torch.dtype, symmetric: bool = True
) -> tuple[Tensor, Tensor]:
    """Apply the conventions shared by all solvers to an optimal pair.

    The input pair may have any split of the scale between the factors. The result

    * is symmetrised (unless ``symmetric=False``, for non-symmetric problems),
    * has the sign fixed so that ``tr(left) ≥ 0`` (for positive semi-definite
      problems both factors are then positive semi-definite),
    * splits the scale evenly: ``‖left‖_F = ‖right‖_F = √‖left ⊗ right‖_F``,
    * is cast to ``out_dtype``.

    An all-zero pair stays all-zero (no division by zero). No host-device
    synchronisation happens here.

    Args:
        left: ``[M, M]`` left factor.
        right: ``[N, N]`` right factor.
        out_dtype: Dtype of the returned factors.
        symmetric: Whether the problem is symmetric, so that rounding asymmetry may
            be removed.

    Returns:
        The normalised pair ``(left, right)``.
    """
    if symmetric:
        left, right = symmetrize(left), symmetrize(right)
    trace_left = torch.diagonal(left).sum()
    trace_right = torch.diagonal(right).sum()
    flip = (trace_left < 0) | ((trace_left == 0) & (trace_right < 0))
    sign = torch.where(flip, -1.0, 1.0).to(left.dtype)
    norm_left = torch.linalg.matrix_norm(left)
    norm_right = torch.linalg.matrix_norm(right)
    nonzero = (norm_left != 0) & (norm_right != 0)  # NaN stays NaN and is caught later
    ratio = torch.where(nonzero, norm_right / torch.where(nonzero, norm_left, 1.0), 1.0)
    scale = ratio.sqrt()
    left = torch.where(nonzero, left * (sign * scale), torch.zeros_like(left))
    right = torch.where(nonzero, right * (sign / scale), torch.zeros_like(right))
    return left.to(out_dtype), right.to(out_dtype)
