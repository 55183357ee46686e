"""Sign and scale split of an optimal pair: the convention every solver's result follows.

``left ⊗ right`` fixes the pair only up to ``(c · left) ⊗ (right / c)``. Every solver
fixes ``c`` by one rule, :func:`scale_split` (sign by ``tr(left) ≥ 0``; even split
``‖left‖_F = ‖right‖_F``, or a given ``tr(right)``), computed on the host from four
scalars fetched in one device-to-host transfer:

* :func:`finalize` — the whole convention for a pair of factors (the usual route);
* :func:`pair_scalars` then :func:`apply_scale_split` — the same in two halves, for
  solvers that fetch the split's scalars together with their own stopping test;
* :func:`target_scalars` and :func:`fetched_split` — the fetch layout (four scalars,
  then a tensor target trace) and its reading, for solvers that compute the four
  scalars themselves (e.g. from coefficients, never forming the pair first).

Index conventions of this module: ``M`` output features (left factor ``[M, M]``),
``N`` input features (right factor ``[N, N]``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kfoc_backpack.solver._common import frobenius_norm


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


def target_scalars(right_trace: Tensor | float | None, like: Tensor) -> list[Tensor]:
    """``[right_trace]`` as a 0-dim tensor like ``like``, to fetch with the split's scalars.

    Empty unless ``right_trace`` is a tensor; :func:`fetched_split` reads it back.
    """
    return [right_trace.to(like).reshape(())] if isinstance(right_trace, Tensor) else []


def fetched_split(
    values: list[float],
    right_trace: Tensor | float | None,
    what: str = "solver",
    half: float = 1.0,
) -> tuple[float, float]:
    """:func:`scale_split` from the fetched host values.

    Args:
        values: ``[‖left‖_F, ‖right‖_F, tr left, tr right]``, then the value of
            :func:`target_scalars` when ``right_trace`` is a tensor.
        right_trace: The target trace the values were fetched for.
        what: Name of the calling solver, for the error message.
        half: Factor of the first four values (``0.5`` for the doubled symmetric
            parts of :func:`pair_scalars`).

    Returns:
        ``(c_L, c_R)``.
    """
    target = values[4] if isinstance(right_trace, Tensor) else right_trace
    return scale_split(*(v * half for v in values[:4]), target, what)


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
        frobenius_norm(left),
        frobenius_norm(right),
        torch.trace(left),
        torch.trace(right),
    ]
    return left, right, half, scalars + target_scalars(right_trace, scalars[0])


def wide_scalars(values: list[float], left: Tensor, right: Tensor) -> list[float]:
    """Return the fetched ``[‖left‖_F, ‖right‖_F, tr left, tr right, …]``, widened if needed.

    In float32 a factor with entries below about ``2⁻⁶³`` has a Frobenius norm that
    underflows to zero (its squares do), and one above ``2⁶⁴`` overflows: the split
    would return zeros or raise for a valid pair. Only then (a zero or non-finite norm)
    the four scalars are recomputed in float64 on the device; a genuinely zero or
    non-finite pair gives the same verdict again.
    """
    if values[0] > 0 and values[1] > 0 and all(math.isfinite(v) for v in values[:4]):
        return values
    if left.dtype == torch.float64 and right.dtype == torch.float64:
        return values
    wide = [
        torch.linalg.matrix_norm(left, dtype=torch.float64),
        torch.linalg.matrix_norm(right, dtype=torch.float64),
        left.double().trace(),
        right.double().trace(),
    ]
    return torch.stack(wide).tolist() + values[4:]


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
    values = wide_scalars(values, left, right)
    c_left, c_right = fetched_split(values, right_trace, what, half)
    return (left * (c_left * half)).to(out_dtype), (right * (c_right * half)).to(out_dtype)
