r"""Structured per-sample terms of a layer's curvature block, as first-class objects.

A layer's GGN/Fisher block is ``F = Σ_k vec(X_k) vec(X_k)ᵀ``. Two representations
cover every supported layer:

* :class:`OuterTerms` — ``X_{k,j} = s_{k,j} a_kᵀ`` (``Linear`` on 2-d input), stored
  as ``sqrt_out [K, J, M]`` and ``inputs [K, N]``, never as ``[K, M, N]``;
* :class:`SampleTerms` — general per-sample matrices ``X_k`` ``[K, M, N]``
  (convolutions, ``Linear`` on inputs with extra dimensions).

Both offer the two half-steps of the power method (so a caller can run it over many
batches, e.g. the data set-level optimum of docs/conventions.md §4), the optimal solve, K-FAC's
factors of the same terms, and the Frobenius error of any ``L ⊗ R`` against ``F``.

Index conventions (those of the solver package): ``K`` terms (samples), ``J`` columns per
sample, ``M`` output features (left factor ``[M, M]``), ``N`` input features (right factor
``[N, N]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from kfoc_backpack.enums import Route
from kfoc_backpack.solver._common import KroneckerFactors, SolverOptions, resolve_options
from kfoc_backpack.solver.error import kron_error_outer, kron_error_samples
from kfoc_backpack.solver.outer import nearest_kronecker_outer, outer_gram_left
from kfoc_backpack.solver.power import (
    factor_power_iteration,
    outer_half_steps,
    samples_half_steps,
)
from kfoc_backpack.solver.rescale import outer_summary, samples_summary
from kfoc_backpack.solver.samples import nearest_kronecker_samples
from kfoc_backpack.solver.scale import finalize


@dataclass(frozen=True)
class OuterTerms:
    """``F = Σ_k (S_kᵀ S_k) ⊗ (a_k a_kᵀ)``: rank-one per-sample matrices.

    Attributes:
        sqrt_out: ``[K, J, M]`` output-side vectors ``s_{k,j}``.
        inputs: ``[K, N]`` input-side vectors ``a_k``.
        route: The route these terms are solved by, ``rank-one`` (class attribute).
    """

    sqrt_out: Tensor
    inputs: Tensor
    route = Route.RANK_ONE

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N)``: sizes of the left and right factors."""
        return self.sqrt_out.shape[-1], self.inputs.shape[-1]

    @property
    def like(self) -> Tensor:
        """A stored tensor, whose device and dtype the terms have."""
        return self.inputs

    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.sqrt_out, self.inputs))

    def detach(self) -> OuterTerms:
        """Return the same terms, detached from any autograd graph."""
        return dataclasses.replace(
            self, sqrt_out=self.sqrt_out.detach(), inputs=self.inputs.detach()
        )

    def scale_summary(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[tr F, mean s², mean a²]`` (see :mod:`~kfoc_backpack.solver.rescale`)."""
        return outer_summary(self.sqrt_out, self.inputs, dtype)

    def scaled(self, out_exponent: int, in_exponent: int) -> OuterTerms:
        """Return the terms with ``S·2^out_exponent`` and ``A·2^in_exponent`` (exact)."""
        return dataclasses.replace(
            self, sqrt_out=self.sqrt_out * 2.0**out_exponent, inputs=self.inputs * 2.0**in_exponent
        )

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> OuterTerms:
        """Return the terms of ``U_Lᵀ X_k U_R``: ``s ↦ U_Lᵀ s``, ``a ↦ U_Rᵀ a``.

        Args:
            left_basis: ``[M, P]`` ``U_L``.
            right_basis: ``[N, Q]`` ``U_R``.
        """
        return dataclasses.replace(
            self,
            sqrt_out=self.sqrt_out @ left_basis.to(self.sqrt_out),
            inputs=self.inputs @ right_basis.to(self.inputs),
        )

    def to_right(self, left: Tensor) -> Tensor:
        """``Σ_k ⟨S_kᵀS_k, L⟩ a_k a_kᵀ`` (``[N, N]``) for an ``[M, M]`` ``L``."""
        return outer_half_steps(self.sqrt_out, self.inputs)[0](left)

    def to_left(self, right: Tensor) -> Tensor:
        """``Σ_k (a_kᵀ R a_k) S_kᵀS_k`` (``[M, M]``) for an ``[N, N]`` ``R``."""
        return outer_half_steps(self.sqrt_out, self.inputs)[1](right)

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors, see :func:`~kfoc_backpack.solver.nearest_kronecker_outer`."""
        return nearest_kronecker_outer(
            self.sqrt_out, self.inputs, options=options, init=init, right_trace=right_trace
        )

    def norm_sq(self) -> Tensor:
        """``‖F‖²_F``."""
        return (outer_gram_left(self.sqrt_out) * (self.inputs @ self.inputs.T).square()).sum()

    def error(self, left: Tensor, right: Tensor, relative: bool = True) -> Tensor:
        """Frobenius error of ``left ⊗ right`` against ``F``."""
        return kron_error_outer(self.sqrt_out, self.inputs, left, right, relative)

    def diagonal(self) -> Tensor:
        """``diag(F)`` as an ``[M, N]`` matrix (row-major ``vec``)."""
        return torch.einsum("kjp,kq->pq", self.sqrt_out.square(), self.inputs.square())

    def dense(self) -> Tensor:
        """``F`` as a dense ``[M·N, M·N]`` matrix (for small layers and tests)."""
        grads = torch.einsum("kjp,kq->kjpq", self.sqrt_out, self.inputs).flatten(2)
        grads = grads.flatten(end_dim=1)
        return grads.T @ grads


T = TypeVar("T", bound="FormedSamples")


class FormedSamples:
    """What terms that hold formed per-sample matrices ``samples`` (``[…, M, N]``) share.

    For frozen dataclasses with the field ``samples``: the factors' sizes, the stored
    tensor, its bytes, and a detached copy.
    """

    samples: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N)``: sizes of the left and right factors (of one group, if grouped)."""
        return self.samples.shape[-2], self.samples.shape[-1]

    @property
    def like(self) -> Tensor:
        """A stored tensor, whose device and dtype the terms have."""
        return self.samples

    def nbytes(self) -> int:
        """Bytes held by the stored tensor."""
        return self.samples.numel() * self.samples.element_size()

    def detach(self: T) -> T:
        """Return the same terms (same class), detached from any autograd graph."""
        return dataclasses.replace(self, samples=self.samples.detach())  # type: ignore[type-var]


@dataclass(frozen=True)
class SampleTerms(FormedSamples):
    """``F = Σ_k vec(X_k) vec(X_k)ᵀ`` for general per-sample matrices.

    Attributes:
        samples: ``[K, M, N]`` per-sample matrices ``X_k``.
        route: The route these terms are solved by, ``formed`` (class attribute).
    """

    samples: Tensor
    route = Route.FORMED

    def scale_summary(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[tr F, 1, 1]`` (see :mod:`~kfoc_backpack.solver.rescale`)."""
        return samples_summary(self.samples, dtype)

    def scaled(self, out_exponent: int, in_exponent: int) -> SampleTerms:
        """Return the terms with ``X·2^(out_exponent + in_exponent)`` (exact; same class)."""
        factor = 2.0 ** (out_exponent + in_exponent)
        return dataclasses.replace(self, samples=self.samples * factor)

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> SampleTerms:
        """Return the terms (same class) of ``U_Lᵀ X_k U_R``.

        Args:
            left_basis: ``[M, P]`` ``U_L``.
            right_basis: ``[N, Q]`` ``U_R``.
        """
        samples = left_basis.to(self.samples).mT @ self.samples @ right_basis.to(self.samples)
        return dataclasses.replace(self, samples=samples)

    def to_right(self, left: Tensor) -> Tensor:
        """``Σ_k X_kᵀ L X_k`` (``[N, N]``)."""
        return samples_half_steps(self.samples)[0](left)

    def to_left(self, right: Tensor) -> Tensor:
        """``Σ_k X_k R X_kᵀ`` (``[M, M]``)."""
        return samples_half_steps(self.samples)[1](right)

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors, see :func:`~kfoc_backpack.solver.nearest_kronecker_samples`."""
        return nearest_kronecker_samples(
            self.samples, options=options, init=init, right_trace=right_trace
        )

    def norm_sq(self) -> Tensor:
        """``‖F‖²_F``."""
        flat = self.samples.flatten(start_dim=1)
        return (flat @ flat.T).square().sum()

    def error(self, left: Tensor, right: Tensor, relative: bool = True) -> Tensor:
        """Frobenius error of ``left ⊗ right`` against ``F``."""
        return kron_error_samples(self.samples, left, right, relative)

    def diagonal(self) -> Tensor:
        """``diag(F)`` as an ``[M, N]`` matrix (row-major ``vec``)."""
        return self.samples.square().sum(0)

    def dense(self) -> Tensor:
        """``F`` as a dense ``[M·N, M·N]`` matrix (for small layers and tests)."""
        flat = self.samples.flatten(start_dim=1)
        return flat.T @ flat


def nearest_kronecker_terms(
    terms: list,
    weights: list[float] | None = None,
    *,
    options: SolverOptions | None = None,
    init: Tensor | None = None,
    right_trace: Tensor | float | None = None,
) -> KroneckerFactors:
    """Optimal ``L ⊗ R`` for ``F = Σ_p w_p F_p`` over several structured blocks.

    The data set-level optimum of docs/conventions.md §4 when the per-batch terms fit in memory:
    the power method with half-steps summed over the blocks. Conventions as for every
    solver; the default start is the identity (positive semi-definite).

    Args:
        terms: Blocks ``F_p`` of equal factor sizes (e.g. one per batch): any objects
            with ``shape``, ``like``, ``to_right`` and ``to_left`` (``OuterTerms``,
            ``SampleTerms``, ``FactoredTerms``, a single ``L ⊗ R``).
        weights: Weights ``w_p`` (default all ones).
        options: Solver options.
        init: ``[M, M]`` warm start of the left factor (e.g. a running estimate).
        right_trace: Split the scale so that ``tr(right)`` equals this (default:
            even split).

    Returns:
        The optimal factors.

    Raises:
        ValueError: For an empty list, mismatched sizes or weights.
    """
    if not terms:
        raise ValueError("nearest_kronecker_terms needs at least one block of terms.")
    if len({t.shape for t in terms}) != 1:
        raise ValueError(f"All blocks need equal factor sizes, got {[t.shape for t in terms]}.")
    weights = [1.0] * len(terms) if weights is None else list(weights)
    if len(weights) != len(terms):
        raise ValueError(f"Got {len(weights)} weights for {len(terms)} blocks.")
    opts = resolve_options(options)
    m = terms[0].shape[0]
    like = terms[0].like
    start = torch.eye(m, dtype=like.dtype, device=like.device) if init is None else init
    left, right, iters, converged = factor_power_iteration(
        lambda mat: sum(w * t.to_right(mat) for w, t in zip(weights, terms)),
        lambda mat: sum(w * t.to_left(mat) for w, t in zip(weights, terms)),
        start.to(like.dtype),
        opts.tol,
        opts.max_iter,
        stop=opts.stop,
    )
    left, right = finalize(left, right, like.dtype, right_trace=right_trace)
    return KroneckerFactors(left, right, iters, converged)
