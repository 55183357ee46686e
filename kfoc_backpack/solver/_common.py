"""Shared pieces of the nearest-Kronecker solvers: options, result type, device, starts.

The sign and scale split of the result lives in :mod:`kfoc_backpack.solver.scale`, the
coefficient-space solve and its thresholds in :mod:`kfoc_backpack.solver.coefficient`.

Index conventions of this module: ``K`` terms (samples), ``M`` output features (left
factor ``[M, M]``), ``N`` input features (right factor ``[N, N]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from kfoc_backpack.enums import Stop

DEFAULT_TOL = 1e-5
"""Stopping precision ``δ`` of the paper: stop once ``‖L⁽ⁿ⁾ − L⁽ⁿ⁻¹⁾‖_F < δ``."""

DEFAULT_MAX_ITER = 100
"""Maximal number of power steps ``n_max`` of the paper."""

DEFAULT_STOP = Stop.FACTORS
"""What ``tol`` bounds by default (:class:`~kfoc_backpack.enums.Stop`)."""

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
        stop: What ``tol`` bounds in the factor-space iterations (the power method and
            Lanczos): the change of the left factor (``"factors"``, the paper's rule)
            or the relative change of the captured squared norm ``σ²``
            (``"objective"``), see :class:`~kfoc_backpack.enums.Stop`. Coefficient
            problems (rank-one layers, sums of products) keep the factors' rule: they
            are finished exactly when slow.
        exact_max_terms: Coefficient problems with at most this many terms (the
            Gram route of ``Linear`` layers and of ``nearest_kronecker_sum``: ``K``
            terms; the operator route of convolutions on accelerators: ``C_out²``)
            are finished exactly when the power method has not reached ``tol`` at
            its first test (after 33 steps, or ``max_iter`` if fewer): the limit
            the power method would converge to is computed from two symmetric
            eigendecompositions of ``K × K`` matrices, in float64 on the host
            (their cost grows as ``K³``; ``python integration/convergence.py``
            measures it). Such solves count as converged and
            report the power steps taken before. ``0`` keeps the plain power
            method of the paper, whatever the number of steps it needs.
    """

    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    generator: torch.Generator | None = None
    random_init: bool = False
    exact_max_terms: int = DEFAULT_EXACT_MAX_TERMS
    stop: Stop | str = DEFAULT_STOP

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", Stop.parse(self.stop, "stop"))
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


def working_tensors(
    options: SolverOptions | None, *tensors: Tensor
) -> tuple[SolverOptions, torch.dtype, list[Tensor]]:
    """``(options, dtype of the result, tensors in the working dtype)`` of a solve.

    The result dtype is the first tensor's; every tensor is moved to its
    :func:`working_dtype`; ``None`` options are the defaults (:func:`resolve_options`).
    """
    out_dtype = tensors[0].dtype
    work = working_dtype(out_dtype)
    return resolve_options(options), out_dtype, [t.to(work) for t in tensors]


def frobenius_norm(matrix: Tensor) -> Tensor:
    """``‖matrix‖_F`` accumulated in float64 (a 0-dim tensor of ``matrix``'s dtype).

    torch's float32 norm kernel on the CPU can be off by far more than float32's
    rounding: ``5.7e-5`` relative on a ``1152 × 1152`` K-FOC factor (EfficientNet-B0's
    depthwise ``features.6.2.block.1.0`` at 32 px), against ``7e-10`` for the float64
    accumulation — and the factors' product scale is ``1/‖L‖²``, so the error doubles
    into the approximation's. Where float64 is not available (``mps``), the pairwise
    sum of the squares.
    """
    if matrix.dtype == torch.float64:
        return torch.linalg.vector_norm(matrix)
    if matrix.device.type == "mps":
        return matrix.square().sum().sqrt()
    return torch.linalg.vector_norm(matrix, dtype=torch.float64).to(matrix.dtype)


def unit(tensor: Tensor) -> Tensor:
    """Return ``tensor / ‖tensor‖`` (:func:`frobenius_norm`; zero stays zero).

    Solvers return a unit ``L`` with ``R = Σ X L Xᵀ``: the pair's product scale is
    ``‖L‖²``, so the norm must be accurate to the working dtype's rounding.
    """
    return tensor / frobenius_norm(tensor).clamp_min(torch.finfo(tensor.dtype).tiny)


def resolve_options(options: SolverOptions | None) -> SolverOptions:
    """Return ``options``, or the default :class:`SolverOptions` for ``None``."""
    return SolverOptions() if options is None else options


def random_coefficients(num: int, like: Tensor, options: SolverOptions) -> Tensor:
    """Draw a standard normal ``[num]`` start (``options.generator``, on the CPU)."""
    return torch.randn(num, generator=options.generator, dtype=like.dtype, device="cpu").to(
        like.device
    )


def random_matrix(dim: int, like: Tensor, options: SolverOptions) -> Tensor:
    """Draw a standard normal ``[dim, dim]`` start (``options.generator``, on the CPU)."""
    mat = torch.randn(dim, dim, generator=options.generator, dtype=like.dtype, device="cpu")
    return mat.to(like.device)


def left_start(
    m: int,
    like: Tensor,
    options: SolverOptions,
    init: Tensor | None,
    default: Callable[[], Tensor],
) -> Tensor:
    """Start ``[M, M]`` of the left factor: random (``random_init``), ``init``, or ``default()``.

    ``init`` is moved to ``like``'s dtype and device; the random start is
    :func:`random_matrix`.
    """
    if options.random_init:
        return random_matrix(m, like, options)
    if init is not None:
        return init.to(like)
    return default()


def zero_solution(m: int, n: int, like: Tensor, out_dtype: torch.dtype) -> KroneckerFactors:
    """``0 ⊗ 0`` (``[M, M]``, ``[N, N]``) of a problem without terms, counted as converged."""
    zeros = like.new_zeros(m, m, dtype=out_dtype), like.new_zeros(n, n, dtype=out_dtype)
    return KroneckerFactors(*zeros, 0, True)
