r"""Power-of-two rescaling of a layer's terms, so that no solve under- or overflows.

Every solver iterates quantities up to quadratic in the block ``F`` (``S(L)``, Lanczos
coefficients, the squared entries inside a Frobenius norm): in float32 a block whose
entries are near ``2⁻⁶⁰`` (the squeeze-excitation convolutions of a MobileNet, deep
layers of a ResNet) or ``2³⁰`` leaves the representable range inside the iteration and
returns NaN or a wrong answer. Here the terms are brought to ``tr(F) ≈ 1`` first:

* one pass over the stored tensors gives a bound ``τ ≥ tr(F)`` within a factor of the
  positions ``T`` (exact for formed and rank-one terms), and the mean squares of the
  output- and input-side tensors — three numbers, one device-to-host transfer, norms
  accumulated in float64 so that the bound itself cannot overflow;
* inside the window ``2^{LOW} ≤ τ ≤ 2^{HIGH}``, with both sides' mean squares within
  ``2^{±SIDE}``, the terms are solved as they are (no copy: the layers of the
  benchmark models lie there);
* outside it the output-side tensor is multiplied by ``2^{e_out}`` and the input-side
  one by ``2^{e_in}`` (``e_out + e_in = e`` with ``τ·2^{2e} ≈ 1``, split so that both
  tensors have entries of one size) — exact in binary floating point — the scaled
  terms are solved, and the factors are multiplied back by ``2^{−2e_out}`` and
  ``2^{−2e_in}``: the same factors, in the same split, as an exact-arithmetic solve.

The layers' solves (:func:`solve_rescaled`) and the pure solvers
(``nearest_kronecker_samples``/``_outer``/``_factored``, for callers who pass tensors
of any scale) take this one test (:func:`needed_exponents`): the terms a layer tested
are neither tested nor copied again by the solver it calls.

Index conventions: ``M``/``N`` left/right factor sizes, ``T`` positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol

import torch
from torch import Tensor

from kfoc_backpack.solver._common import KroneckerFactors, SolverOptions

LOW = -16
"""``log₂ τ`` below which the terms are rescaled before the solve."""

HIGH = 24
"""``log₂ τ`` above which the terms are rescaled before the solve."""

SIDE = 48
"""``|log₂|`` of a side's mean square beyond which the terms are rescaled (entries off
``2^{±24}``: the rank-one route squares Gram matrices of each side on its own)."""


class ScalableTerms(Protocol):
    """Terms that report their scale and can be multiplied by powers of two."""

    def scale_summary(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[τ, mean square of the output side, mean square of the input side]`` (float64).

        Norms are taken in ``dtype`` (default: the terms' own, which reads the tensors
        once without a copy); ``torch.float64`` is the fallback where those under- or
        overflow.
        """
        ...

    def scaled(self, out_exponent: int, in_exponent: int) -> ScalableTerms:
        """Return the terms with output side ``·2^out_exponent``, input side ``·2^in_exponent``."""
        ...

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Return the optimal factors."""
        ...


def mean_squares_summary(
    bound: Tensor, out_norms: Tensor, in_norms: Tensor, out: Tensor, inp: Tensor
) -> Tensor:
    """``[bound, ‖out‖²/|out|, ‖inp‖²/|inp|]`` from per-sample norms (float64 0-d values).

    Args:
        bound: ``τ``, the bound of ``tr F``.
        out_norms: Per-sample norms of the output-side tensor ``out``.
        in_norms: Per-sample norms of the input-side tensor ``inp``.
        out: The output-side tensor (for its size).
        inp: The input-side tensor (for its size).
    """
    return torch.stack(
        [
            bound,
            out_norms.square().sum() / max(out.numel(), 1),
            in_norms.square().sum() / max(inp.numel(), 1),
        ]
    )


def rescale_exponents(summary: list[float]) -> tuple[int, int] | None:
    """``(e_out, e_in)`` for the host values of ``scale_summary``, ``None`` inside the window.

    Raises:
        FloatingPointError: If the summary is NaN or infinite (non-finite terms).
    """
    bound, out_square, in_square = summary
    if not all(math.isfinite(v) for v in summary):
        raise FloatingPointError("the per-sample quantities contain NaN or infinite values")
    if bound == 0:
        return None
    sides = [abs(math.log2(v)) <= SIDE for v in (out_square, in_square) if v > 0]
    if LOW <= math.log2(bound) <= HIGH and all(sides):
        return None
    total = -round(math.log2(bound) / 2)  # X·2^total: τ·2^(2·total) ≈ 1
    if out_square > 0 and in_square > 0:  # equal entry sizes after scaling
        out_exponent = round((total + (math.log2(in_square) - math.log2(out_square)) / 2) / 2)
    else:
        out_exponent = total // 2
    return out_exponent, total - out_exponent


def outer_summary(sqrt_out: Tensor, inputs: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``[tr F, mean s², mean a²]`` of rank-one terms ``s_{kj} a_kᵀ`` (``[K, J, M]``, ``[K, N]``).

    ``tr F = Σ_k ‖S_k‖² ‖a_k‖²`` exactly; norms taken in ``dtype`` (default: the terms').
    """
    out = torch.linalg.vector_norm(sqrt_out, dim=(1, 2), dtype=dtype).double()
    inp = torch.linalg.vector_norm(inputs, dim=1, dtype=dtype).double()
    return mean_squares_summary(out.square() @ inp.square(), out, inp, sqrt_out, inputs)


def samples_summary(samples: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``[tr F, 1, 1]`` of formed terms ``[K, M, N]`` (one tensor: no sides to balance)."""
    trace = torch.linalg.vector_norm(samples, dtype=dtype).double().square()
    return torch.stack([trace, torch.ones_like(trace), torch.ones_like(trace)])


_TESTED: ContextVar[frozenset[int]] = ContextVar("kfoc_scale_tested", default=frozenset())
"""``id``s of the tensors of the terms :func:`solve_rescaled` tested and is solving (alive
for the whole solve, so no other live tensor shares one)."""


def needed_exponents(
    summarise: Callable[[torch.dtype | None], Tensor], *tensors: Tensor
) -> tuple[int, int] | None:
    """``(e_out, e_in)`` that bring the terms into the window, or ``None`` where they are.

    ``summarise(dtype)`` is a ``scale_summary``: taken in the terms' dtype first (one
    pass, no copy), again in float64 where ``τ`` is zero or overflowed there. One
    device-to-host transfer in the common case. The one test of every solve's scale —
    the layers' (:func:`solve_rescaled`) and the pure solvers' own: a pure solver
    called (through ``terms.solve``) on the very ``tensors`` that
    :func:`solve_rescaled` has tested returns ``None`` without a second summary; on
    any other tensors (a group of them, a reshaped copy, a direct call) it tests.

    Raises:
        FloatingPointError: If the terms contain NaN or infinite values.
    """
    tested = _TESTED.get()
    if tensors and all(id(tensor) in tested for tensor in tensors):
        return None
    summary = summarise(None).tolist()
    if not (0 < summary[0] < math.inf):  # zero, or over/underflowed in the terms' dtype
        summary = summarise(torch.float64).tolist()
    return rescale_exponents(summary)


def solve_rescaled(
    terms: ScalableTerms,
    options: SolverOptions | None = None,
    right_trace: Tensor | float | None = None,
) -> KroneckerFactors:
    """``terms.solve(options, right_trace=right_trace)``, rescaled where ``τ`` requires.

    Args:
        terms: Terms with ``scale_summary``, ``scaled`` and ``solve``.
        options: Solver options.
        right_trace: Target trace of the right factor (default: even split).

    Returns:
        The factors of ``terms`` (not of the scaled terms), in the requested split.

    Raises:
        FloatingPointError: If the terms contain NaN or infinite values.
    """
    exponents = needed_exponents(terms.scale_summary)
    solved = terms if exponents is None else terms.scaled(*exponents)
    token = _TESTED.set(frozenset(_tensor_ids(solved)))
    try:
        if exponents is None:
            return solved.solve(options, right_trace=right_trace)
        factors = solved.solve(options, right_trace=scaled_trace(right_trace, exponents[1]))
    finally:
        _TESTED.reset(token)
    return scaled_back(factors, *exponents, right_trace)


def _tensor_ids(terms: object) -> set[int]:
    """``id``s of the tensors among ``terms``' dataclass fields, nested terms included.

    Wrapped terms (``TransposedTerms.inner``) hand their own tensors to the pure solver.
    """
    if not dataclasses.is_dataclass(terms) or isinstance(terms, type):
        return set()
    ids: set[int] = set()
    for field in dataclasses.fields(terms):
        value = getattr(terms, field.name)
        ids |= {id(value)} if isinstance(value, Tensor) else _tensor_ids(value)
    return ids


def check_representable(scaled: KroneckerFactors, left: Tensor, right: Tensor) -> None:
    """Raise where a factor, scaled back, left its dtype's normal range (one fetch).

    The product of the factors is representable whenever the block is, but the split
    asked for (K-FAC's trace of the input factor) can put nearly all of its scale on
    one factor: with output-side vectors near ``2⁻⁸⁰`` and inputs near ``2²⁰`` the left
    factor of a float32 solve would be ``2⁻¹⁶⁰``, which is zero. That is reported, not
    returned.

    Raises:
        FloatingPointError: If a factor that is nonzero in the scaled solve became zero,
            subnormal or infinite.
    """
    tiny, huge = torch.finfo(left.dtype).tiny, torch.finfo(left.dtype).max
    before = torch.stack([scaled.left.abs().amax(), scaled.right.abs().amax()])
    after = torch.stack([left.abs().amax(), right.abs().amax()])
    values = torch.cat([before, after]).double().tolist()
    for was, now in zip(values[:2], values[2:]):
        if was > 0 and not tiny <= now <= huge:
            raise FloatingPointError(
                f"the factors lie outside {left.dtype}'s normal range in the requested "
                f"split (largest entries {values[2]:.3g} and {values[3]:.3g}, the block "
                "itself is representable): solve this layer in float64"
            )


FACTOR_WINDOW = 20
"""``|log₂|`` of a Kronecker term's largest entries beyond which a sum is rescaled."""


def balanced_terms(left_terms: Tensor, right_terms: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """``Σ_k L_k ⊗ R_k`` rewritten with the largest term's factors near unit entries, or ``None``.

    Each term is first balanced, ``(L_k·2^{b_k}) ⊗ (R_k·2^{-b_k})`` with both factors'
    largest entries equal (the sum is unchanged), then every factor is divided by a
    common ``2^e`` (the sum by ``2^{2e}``) that brings the *largest* term's factors to
    entries near one: the sum's Gram and closed-form quantities are of the order of that
    term's, and a term smaller by more than float32's range is negligible in the sum
    (it may underflow; it cannot overflow the others). One fetch of the ``2K`` largest
    magnitudes; ``None`` when every factor's largest entry is within
    ``2^{±FACTOR_WINDOW}`` (or one is non-finite, which the solve reports). Applied once
    per solve: its result is solved as it is, even where small terms stay outside the
    window.

    Args:
        left_terms: ``[K, M, M]`` left factors (weights applied).
        right_terms: ``[K, N, N]`` right factors.

    Returns:
        ``(left_terms', right_terms', e)`` with ``Σ L'_k ⊗ R'_k = 2^{-2e} Σ L_k ⊗ R_k``.
    """
    peaks = torch.cat([left_terms.abs().amax((1, 2)), right_terms.abs().amax((1, 2))])
    values = peaks.double().tolist()
    num = left_terms.shape[0]
    if not all(math.isfinite(v) for v in values):
        return None
    logs = [math.log2(v) if v > 0 else 0.0 for v in values]
    if all(abs(v) <= FACTOR_WINDOW for v in logs):
        return None
    balance = [round((logs[num + k] - logs[k]) / 2) for k in range(num)]
    sizes = [
        (logs[k] + logs[num + k]) / 2 for k in range(num) if values[k] > 0 and values[num + k] > 0
    ]
    if not sizes:  # every term is zero
        return None
    common = round(max(sizes))
    shifts = torch.tensor(
        [[2.0 ** (b - common) for b in balance], [2.0 ** (-b - common) for b in balance]],
        dtype=left_terms.dtype,
    ).to(left_terms.device)
    return left_terms * shifts[0, :, None, None], right_terms * shifts[1, :, None, None], common


def unscaled(factors: KroneckerFactors, exponent: int, dtype: torch.dtype) -> KroneckerFactors:
    """Undo ``balanced_terms``' common ``2^e`` on a solve's factors (split kept).

    Both factors are multiplied by ``2^e``: the even split stays even, and a right
    factor solved for the trace ``t·2^{-e}`` gets the trace ``t``.

    Raises:
        FloatingPointError: If a factor leaves ``dtype``'s normal range.
    """
    left = (factors.left * 2.0**exponent).to(dtype)
    right = (factors.right * 2.0**exponent).to(dtype)
    check_representable(factors, left, right)
    return KroneckerFactors(left, right, factors.iterations, factors.converged)


def scaled_trace(right_trace: Tensor | float | None, in_exponent: int) -> Tensor | float | None:
    """Return the right factor's target trace for terms with the input side scaled by ``2^e``."""
    return None if right_trace is None else right_trace * 2.0 ** (2 * in_exponent)


def scaled_back(
    factors: KroneckerFactors,
    out_exponent: int,
    in_exponent: int,
    right_trace: Tensor | float | None,
) -> KroneckerFactors:
    """Return the factors of terms from those of the terms scaled by ``2^{out}``, ``2^{in}``.

    The output side (``X``'s rows, ``G``, ``S``) scaled by ``2^{out}``, the input side
    by ``2^{in}``, solved with :func:`scaled_trace`: exact in binary floating point, and
    the same split as the unscaled solve (even, or ``tr R`` fixed).
    """
    if right_trace is None:
        scale = 2.0 ** -(out_exponent + in_exponent)
        left, right = factors.left * scale, factors.right * scale
    else:
        left = factors.left * 2.0 ** (-2 * out_exponent)
        right = factors.right * 2.0 ** (-2 * in_exponent)
    check_representable(factors, left, right)
    return KroneckerFactors(left, right, factors.iterations, factors.converged)
