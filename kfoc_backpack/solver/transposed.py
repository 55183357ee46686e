r"""The terms of ``X_k`` given as the terms of their transposes ``Y_k = X_kᵀ``.

A parameter whose per-sample matrices are the transposes of a layer's —
``X_k = Σ_t e_{id_t} g_tᵀ`` of an embedding table (``V × D``), whose output-side
vectors ``g`` sit on its columns and whose one-hot "inputs" on its rows — is solved by
the layer routes of the transposed problem: :class:`TransposedTerms` wraps the terms of
``Y_k`` (any route of :mod:`kfoc_backpack.solver.shared`) and presents those of ``X_k``.
Since ``vec(Yᵀ)`` is a permutation of ``vec(Y)``, the Kronecker problem of ``X`` is that
of ``Y`` with the factors swapped: ``F_X ≈ L ⊗ R`` exactly where ``F_Y ≈ R ⊗ L``.

Index conventions: ``M``/``N`` the rows/columns of ``X`` (``N``/``M`` of ``Y``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kfoc_backpack.solver._common import KroneckerFactors, SolverOptions
from kfoc_backpack.solver.scale import finalize


@dataclass(frozen=True)
class TransposedTerms:
    """``F = Σ_k vec(X_k) vec(X_k)ᵀ`` from the terms of ``Y_k = X_kᵀ``.

    Attributes:
        inner: The terms of ``Y_k`` (``[N, M]`` matrices): any terms type with the
            solver's protocol (``shape``, ``to_right``, ``to_left``, ``solve``,
            ``rotated``, ``diagonal``, …).
    """

    inner: Any

    @property
    def route(self) -> object:
        """The route the inner terms are solved by."""
        return self.inner.route

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N)``: the sizes of the left and right factors of ``X``'s block."""
        rows, cols = self.inner.shape
        return cols, rows

    @property
    def like(self) -> Tensor:
        """A stored tensor, whose device and dtype the terms have."""
        return self.inner.like

    def nbytes(self) -> int:
        """Bytes held by the inner terms."""
        return self.inner.nbytes()

    def detach(self) -> TransposedTerms:
        """Return the same terms, detached from any autograd graph."""
        return TransposedTerms(self.inner.detach())

    def scale_summary(self, dtype: torch.dtype | None = None) -> Tensor:
        """Return the inner summary with the two sides' mean squares swapped."""
        summary = self.inner.scale_summary(dtype)
        return summary[[0, 2, 1]]

    def scaled(self, out_exponent: int, in_exponent: int) -> TransposedTerms:
        """Return the terms of ``X·2^(out_exponent + in_exponent)`` (the sides swapped inside)."""
        return TransposedTerms(self.inner.scaled(in_exponent, out_exponent))

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> TransposedTerms:
        """Return the terms of ``U_Lᵀ X_k U_R`` (``U_Rᵀ Y_k U_L`` inside)."""
        return TransposedTerms(self.inner.rotated(right_basis, left_basis))

    def to_right(self, left: Tensor) -> Tensor:
        """``Σ_k X_kᵀ L X_k = Σ_k Y_k L Y_kᵀ`` (``[N, N]``)."""
        return self.inner.to_left(left)

    def to_left(self, right: Tensor) -> Tensor:
        """``Σ_k X_k R X_kᵀ = Σ_k Y_kᵀ R Y_k`` (``[M, M]``)."""
        return self.inner.to_right(right)

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Return the optimal factors: the inner solve's, swapped (``init`` is not used)."""
        inner = self.inner.solve(options)
        left, right = finalize(inner.right, inner.left, inner.left.dtype, right_trace=right_trace)
        return KroneckerFactors(left, right, inner.iterations, inner.converged)

    def norm_sq(self) -> Tensor:
        """``‖F‖²_F``."""
        return self.inner.norm_sq()

    def error(self, left: Tensor, right: Tensor, relative: bool = True) -> Tensor:
        """Frobenius error of ``left ⊗ right`` against ``F``."""
        return self.inner.error(right, left, relative)

    def diagonal(self, *args: Any, **kwargs: Any) -> Tensor:
        """``diag(F)`` as an ``[M, N]`` matrix (the inner diagonal transposed)."""
        return self.inner.diagonal(*args, **kwargs).T

    def dense(self) -> Tensor:
        """``F`` as a dense ``[M·N, M·N]`` matrix (for small blocks and tests)."""
        cols, rows = self.inner.shape
        inner = self.inner.dense().reshape(cols, rows, cols, rows)
        return inner.permute(1, 0, 3, 2).reshape(rows * cols, rows * cols)
