"""Shared pieces of the nearest-Kronecker solvers: options, result type, conventions."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_TOL = 1e-5
"""Stopping precision ``δ`` of the paper: stop once ``‖L⁽ⁿ⁾ − L⁽ⁿ⁻¹⁾‖_F < δ``."""

DEFAULT_MAX_ITER = 100
"""Maximal number of power steps ``n_max`` of the paper."""

DEFAULT_EXACT_MAX_TERMS = 512
"""Largest coefficient problem that is finished by an exact eigendecomposition."""


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
        exact_max_terms: Coefficient problems with at most this many terms (the
            Gram route of ``Linear`` layers and of ``nearest_kronecker_sum``: ``K``
            terms; the operator route of convolutions on accelerators: ``C_out²``)
            are finished exactly when the power method has not reached ``tol`` at
            its first test (after 33 steps, or ``max_iter`` if fewer): the limit
            the power method would converge to is computed from two symmetric
            eigendecompositions of ``K × K`` matrices, in float64 on the host
            (one takes 0.13 ms at ``K = 32``, 4.6 ms at ``K = 256`` and 23 ms at
            ``K = 512`` on two CPU cores: ``integration/convergence.py``). Such
            solves count as converged and
            report the power steps taken before. ``0`` keeps the plain power
            method of the paper, whatever the number of steps it needs.
    """

    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    generator: torch.Generator | None = None
    random_init: bool = False
    exact_max_terms: int = DEFAULT_EXACT_MAX_TERMS

    def __post_init__(self) -> None:
        if not (self.tol > 0):
            raise ValueError(f"tol must be positive, got {self.tol!r}.")
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")
        if int(self.exact_max_terms) != self.exact_max_terms or self.exact_max_terms < 0:
            raise ValueError(
                f"exact_max_terms must be a non-negative integer, got {self.exact_max_terms!r}."
            )


class KroneckerFactors(NamedTuple):
    """Result of a nearest-Kronecker-product solve.

    ``left ⊗ right`` (PyTorch's ``torch.kron``, row-major ``vec``) is the
    Frobenius-optimal single Kronecker product, up to the solver tolerance.

    Attributes:
        left: ``[M, M]`` left (output-side) factor, symmetric.
        right: ``[N, N]`` right (input-side) factor, symmetric.
        iterations: Number of power steps taken (``0`` for closed-form solves; for
            solves finished by an eigendecomposition, the steps before it).
        converged: Whether the stopping criterion was met within ``max_iter`` steps
            (closed-form and eigendecomposition solves and all-zero inputs count as
            converged).
    """

    left: Tensor
    right: Tensor
    iterations: int
    converged: bool


_LAUNCH_BOUND_OVERRIDE: bool | None = None


def launch_bound(device: torch.device) -> bool:
    """Whether the solvers should take the routes made for accelerators on ``device``.

    On an accelerator every operation costs a kernel launch (microseconds, whatever
    its size) and every host read a synchronisation, so the solvers there prefer a
    few large operations and one host transfer per solve; on the CPU they prefer the
    fewest flops. :func:`accelerator_routes` overrides the choice, so that the
    accelerator routes are tested and their operation count measured on the CPU.

    Args:
        device: Device of the solver's tensors.

    Returns:
        ``True`` for non-CPU devices, unless overridden.
    """
    if _LAUNCH_BOUND_OVERRIDE is not None:
        return _LAUNCH_BOUND_OVERRIDE
    return device.type != "cpu"


@contextmanager
def accelerator_routes(enabled: bool = True) -> Iterator[None]:
    """Within this context, take (``True``) or avoid (``False``) the accelerator routes.

    For tests and benchmarks only: results agree with the default routes to the
    solver tolerance.
    """
    global _LAUNCH_BOUND_OVERRIDE
    previous, _LAUNCH_BOUND_OVERRIDE = _LAUNCH_BOUND_OVERRIDE, enabled
    try:
        yield
    finally:
        _LAUNCH_BOUND_OVERRIDE = previous


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


def unit(tensor: Tensor) -> Tensor:
    """Return ``tensor / ‖tensor‖`` (Euclidean/Frobenius norm; zero stays zero)."""
    return tensor / torch.linalg.vector_norm(tensor).clamp_min(torch.finfo(tensor.dtype).tiny)


def target_scalars(right_trace: Tensor | float | None, like: Tensor) -> list[Tensor]:
    """``[right_trace]`` as a 0-dim tensor like ``like``, to fetch with the split's scalars.

    Empty unless ``right_trace`` is a tensor; :func:`target_value` reads it back.
    """
    return [right_trace.to(like).reshape(())] if isinstance(right_trace, Tensor) else []


def target_value(values: list[float], right_trace: Tensor | float | None) -> float | None:
    """Host value of the target trace: fetched after the four split scalars, or given."""
    return values[4] if isinstance(right_trace, Tensor) else right_trace


def scale_split(
    norm_left: float,
    norm_right: float,
    trace_left: float,
    trace_right: float,
    right_trace: float | None = None,
    what: str = "solver",
) -> tuple[float, float]:
    """Scalars ``(c_L, c_R)`` that fix sign and scale split of an optimal pair.

    ``(c_L · left) ⊗ (c_R · right) = left ⊗ right`` up to the sign, which is chosen so
    that ``tr(left) ≥ 0`` (both factors PSD for PSD problems). The split is

    * ``right_trace=None``: even, ``‖c_L left‖_F = ‖c_R right‖_F``;
    * ``right_trace=t > 0``: ``tr(c_R right) = t`` (e.g. K-FAC's input-factor trace,
      so the factors are drop-in for K-FAC's), falling back to the even split when
      ``tr(right)`` is not positive.

    A zero factor gives ``c_L = c_R = 0`` (all-zero output, never NaN). The inputs are
    host scalars: callers fetch them in one device-to-host transfer.

    Args:
        norm_left: ``‖left‖_F``.
        norm_right: ``‖right‖_F``.
        trace_left: ``tr(left)``.
        trace_right: ``tr(right)``.
        right_trace: Optional target trace of the right factor.
        what: Name of the calling solver, for the error message.

    Returns:
        ``(c_L, c_R)``.

    Raises:
        FloatingPointError: If a norm or trace is NaN or infinite (non-finite input).
    """
    values = (norm_left, norm_right, trace_left, trace_right)
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(
            f"{what}: the input contains NaN or infinite values; no factors returned."
        )
    if norm_left == 0 or norm_right == 0:
        return 0.0, 0.0
    sign = -1.0 if trace_left < 0 or (trace_left == 0 and trace_right < 0) else 1.0
    if right_trace is not None and right_trace > 0 and sign * trace_right > 0:
        ratio = right_trace / (sign * trace_right)
        return sign / ratio, sign * ratio
    even = math.sqrt(norm_right / norm_left)
    return sign * even, sign / even


def finalize(
    left: Tensor,
    right: Tensor,
    out_dtype: torch.dtype,
    symmetric: bool = True,
    right_trace: Tensor | float | None = None,
    what: str = "solver",
) -> tuple[Tensor, Tensor]:
    """Apply the conventions shared by all solvers to an optimal pair.

    The input pair may have any split of the scale between the factors. The result
    is symmetrised (unless ``symmetric=False``, for non-symmetric problems), has sign
    and scale split fixed by :func:`scale_split` and is cast to ``out_dtype``. One
    device-to-host transfer of four scalars; NaN or infinite input raises.

    Args:
        left: ``[M, M]`` left factor.
        right: ``[N, N]`` right factor.
        out_dtype: Dtype of the returned factors.
        symmetric: Whether the problem is symmetric, so that rounding asymmetry may
            be removed.
        right_trace: Optional target trace of the right factor (see
            :func:`scale_split`).
        what: Name of the calling solver, for error messages.

    Returns:
        The normalised pair ``(left, right)``.
    """
    left, right, half, scalars = pair_scalars(left, right, symmetric, right_trace)
    values = torch.stack(scalars).tolist()
    return apply_scale_split(left, right, half, values, right_trace, out_dtype, what)


def pair_scalars(
    left: Tensor,
    right: Tensor,
    symmetric: bool = True,
    right_trace: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, float, list[Tensor]]:
    """Prepare, on the device, what the scale split of :func:`finalize` needs.

    Returns:
        ``(left, right, half, scalars)``: the pair, symmetrised as ``X + Xᵀ`` (twice the
        symmetric part, ``half = 0.5``) when ``symmetric``; and the 0-dim tensors
        ``[‖left‖_F, ‖right‖_F, tr left, tr right]`` of that pair, plus ``right_trace``
        when it is a tensor, for one device-to-host transfer.
    """
    half = 1.0
    if symmetric:  # twice the symmetric parts; the 1/2 is folded into the scale
        left, right, half = left + left.mT, right + right.mT, 0.5
    scalars = [
        torch.linalg.matrix_norm(left),
        torch.linalg.matrix_norm(right),
        torch.trace(left),
        torch.trace(right),
    ]
    return left, right, half, scalars + target_scalars(right_trace, scalars[0])


def apply_scale_split(
    left: Tensor,
    right: Tensor,
    half: float,
    values: list[float],
    right_trace: Tensor | float | None,
    out_dtype: torch.dtype,
    what: str = "solver",
) -> tuple[Tensor, Tensor]:
    """Split the scale on the host, from the fetched :func:`pair_scalars`."""
    target = target_value(values, right_trace)
    c_left, c_right = scale_split(*(v * half for v in values[:4]), target, what)
    return (left * (c_left * half)).to(out_dtype), (right * (c_right * half)).to(out_dtype)
