r"""A table's per-sample rows, and the nearest Kronecker product with a diagonal row side.

An embedding table ``W`` (``[V, D]``, a row per id of the vocabulary) has per-sample
gradients ``X_k = Σ_u e_{v_u} x_{k,u}ᵀ`` with a handful of non-zero rows: the ids input
``k`` holds, each row the sum of its positions' vectors. For a large vocabulary a dense
``V × V`` factor of ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` does not fit (30,522 ids: 3.7 GB in
float32, and its eigendecomposition). The nearest product whose row side is diagonal,

.. math::

    \min_{l, R} \|F - \operatorname{diag}(l) \otimes R\|_F,

sees only ``F``'s ``D × D`` diagonal blocks ``F_vv = Σ_k x_{k,v} x_{k,v}ᵀ``: ``l`` and
``vec R`` are the leading singular vectors of the ``V × D²`` matrix with rows
``vec(F_vv)`` (every ``F_vv`` is positive semi-definite, so ``l ≥ 0`` and ``R ⪰ 0``).
The power method alternates

.. math::

    R \leftarrow \sum_v l_v F_{vv} = \sum_{k,u} l_{v_u} x_{k,u} x_{k,u}^\top, \qquad
    l_v \leftarrow \langle F_{vv}, R\rangle = \sum_{k,u:\,v_u = v} x_{k,u}^\top R\, x_{k,u},

``2·K·U·D²`` multiply-adds a step over the stored rows — a K-FAC factor's cost — never a
``V × V`` or ``V·D × V·D`` matrix. K-FAC's factors of a table (the ids' frequencies on
the row side) are diagonal there already.

Index conventions: ``M`` vectors per input, ``N`` inputs, ``T`` positions, ``U`` distinct
(input, id) pairs of a batch, ``V`` the table's rows, ``D`` its width, ``K`` products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.enums import Stop
from kfoc_backpack.solver._common import KroneckerFactors, SolverOptions

GRAM_CHUNK_ELEMENTS = 1 << 24
"""Entries of the dense pieces :meth:`VocabularyTerms.norm_sq` and joint output products
form at a time."""


def merge_rows(
    ids: Tensor, vectors: Tensor, num_rows: int, padding_idx: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum each input's vectors over the positions that hold the same id.

    Args:
        ids: ``[N, T]`` ids in ``0 … V − 1``.
        vectors: ``[M, N, T, D]`` the vectors at the positions.
        num_rows: ``V``.
        padding_idx: An id whose positions count for nothing, or ``None``.

    Returns:
        ``(rows [M, U, D], vocab [U], owner [U])``: per distinct (input, id) pair its
        summed vectors, its id and its input, ordered by input, then id.
    """
    num, positions = ids.shape
    inputs = torch.arange(num, device=ids.device).unsqueeze(1).expand(num, positions)
    keys = (inputs * num_rows + ids).flatten()
    flat = vectors.reshape(vectors.shape[0], num * positions, vectors.shape[-1])
    if padding_idx is not None:
        keep = ids.flatten() != padding_idx
        keys, flat = keys[keep], flat[:, keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    rows = flat.new_zeros(flat.shape[0], len(unique), flat.shape[-1])
    rows.index_add_(1, inverse, flat)
    return rows, unique % num_rows, torch.div(unique, num_rows, rounding_mode="floor")


def dense_rows(rows: Tensor, vocab: Tensor, owner: Tensor, num: int, num_rows: int) -> Tensor:
    """``[M, N, V, D]``: the per-sample matrices ``X_{m,n}`` formed (small tables and tests)."""
    out = rows.new_zeros(rows.shape[0], num, num_rows, rows.shape[-1])
    out[:, owner, vocab] = rows
    return out


def compact_chunks(vocab: Tensor, width: int, outer: int):
    """Yield ``(selected entries, their index in the chunk, the chunk's ids)`` over the ids.

    The distinct ids of ``vocab`` are taken in chunks so that a dense ``[outer, chunk,
    width]`` piece holds at most :data:`GRAM_CHUNK_ELEMENTS` entries.
    """
    ids, position = torch.unique(vocab, return_inverse=True)
    chunk = max(1, GRAM_CHUNK_ELEMENTS // max(1, width * outer))
    for start in range(0, len(ids), chunk):
        stop = min(start + chunk, len(ids))
        selected = ((position >= start) & (position < stop)).nonzero().squeeze(1)
        yield selected, position[selected] - start, ids[start:stop]


@dataclass(frozen=True)
class VocabularyTerms:
    """``F = Σ_{m,n} vec(X_{m,n}) vec(X_{m,n})ᵀ`` of a table, kept as its non-zero rows.

    Attributes:
        rows: ``[M, U, D]``: row ``vocab[u]`` of ``X_{m, owner[u]}``.
        vocab: ``[U]`` the rows' ids.
        owner: ``[U]`` the rows' inputs.
        num_rows: ``V``.
        num_inputs: ``N``.
    """

    rows: Tensor
    vocab: Tensor
    owner: Tensor
    num_rows: int
    num_inputs: int

    @classmethod
    def from_positions(
        cls, ids: Tensor, vectors: Tensor, num_rows: int, padding_idx: int | None = None
    ) -> VocabularyTerms:
        """Return the terms of a table's positions (see :func:`merge_rows` for the shapes)."""
        rows, vocab, owner = merge_rows(ids, vectors, num_rows, padding_idx)
        return cls(rows, vocab, owner, num_rows, ids.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(V, D)``: the sizes of the row-side diagonal and of the width-side factor."""
        return self.num_rows, self.rows.shape[-1]

    @property
    def like(self) -> Tensor:
        """A stored tensor, whose device and dtype the terms have."""
        return self.rows

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.vocab, self.owner))

    def detach(self) -> VocabularyTerms:
        """Return the same terms, detached from any autograd graph."""
        return VocabularyTerms(
            self.rows.detach(), self.vocab, self.owner, self.num_rows, self.num_inputs
        )

    def to_right(self, left: Tensor) -> Tensor:
        """``Σ_v l_v F_vv`` (``[D, D]``) for the row-side diagonal ``left`` (``[V]``)."""
        weighted = self.rows * left.to(self.rows)[self.vocab].unsqueeze(-1)
        return torch.einsum("mud,mue->de", weighted, self.rows)

    def to_left(self, right: Tensor) -> Tensor:
        """``[⟨F_vv, R⟩]_v`` (``[V]``) for the width-side factor ``right`` (``[D, D]``)."""
        quadratic = ((self.rows @ right.to(self.rows)) * self.rows).sum((0, 2))
        return self.rows.new_zeros(self.num_rows).index_add_(0, self.vocab, quadratic)

    def solve(
        self, options: SolverOptions | None = None, right_trace: Tensor | float | None = None
    ) -> KroneckerFactors:
        """Return ``(l [V], R [D, D])`` nearest to ``F``, ``tr R = right_trace`` where given.

        The power method of the module's docstring from ``R = Σ_v F_vv``, on the rows
        scaled by a power of two to unit mean square (float32 neither under- nor
        overflows), until the unit-norm ``l`` (``stop="factors"``) or the captured
        ``σ² = ‖R‖²`` (``stop="objective"``) changes by less than ``options.tol``.

        Raises:
            FloatingPointError: If the rows or the factors are not finite.
        """
        opts = options or SolverOptions()
        if not torch.isfinite(self.rows).all():
            raise FloatingPointError("the per-sample rows contain NaN or infinite values.")
        width = self.rows.shape[-1]
        mean_square = float(self.rows.double().square().mean()) if self.rows.numel() else 0.0
        if mean_square == 0.0:
            zeros = self.rows.new_zeros
            return KroneckerFactors(zeros(self.num_rows), zeros(width, width), 0, True)
        exponent = round(math.log2(mean_square) / 2)
        terms = VocabularyTerms(
            self.rows * 2.0**-exponent, self.vocab, self.owner, self.num_rows, self.num_inputs
        )
        right = terms.to_right(self.rows.new_ones(self.num_rows))
        left = terms.to_left(right)
        left = left / torch.linalg.vector_norm(left)
        converged, steps, captured = False, 0, None
        objective = opts.stop is Stop.OBJECTIVE
        while steps < opts.max_iter and not converged:
            right = terms.to_right(left)
            steps += 1
            if objective:  # σ² = ‖R‖² at the unit l
                value = float(right.square().sum())
                converged = captured is not None and abs(value - captured) <= opts.tol * value
                captured = value
                if converged:
                    break
            new = terms.to_left(right)
            new = new / torch.linalg.vector_norm(new)
            converged = bool(torch.linalg.vector_norm(new - left) <= opts.tol)
            left = new
        if not (objective and converged):  # else R is the last step's, at this l
            right = terms.to_right(left)  # l ⊗ R with ‖l‖ = 1 is the optimum: R = Σ l_v F_vv
        left = left * 2.0 ** (2 * exponent)
        return KroneckerFactors(*split_diagonal(left, right, right_trace), steps, converged)

    def norm_sq(self) -> Tensor:
        """``‖F‖²_F = Σ_{k,k'} ⟨X_k, X_k'⟩²``, from the Gram of the per-sample matrices."""
        vectors, width = self.rows.shape[0], self.rows.shape[-1]
        samples = vectors * self.num_inputs
        gram = self.rows.new_zeros(samples, samples)
        for selected, index, ids in compact_chunks(self.vocab, width, samples):
            piece = self.rows.new_zeros(vectors, self.num_inputs, len(ids), width)
            piece[:, self.owner[selected], index] = self.rows[:, selected]
            flat = piece.reshape(samples, -1)
            gram += flat @ flat.T
        return gram.square().sum()

    def error(self, left: Tensor, right: Tensor, relative: bool = True) -> Tensor:
        """Frobenius error of ``diag(left) ⊗ right`` against ``F``, relative to ``‖F‖``."""
        norm_sq = self.norm_sq()
        inner = (self.to_left(right) * left.to(self.rows)).sum()
        approx = left.square().sum() * right.square().sum()
        error = (norm_sq - 2 * inner + approx).clamp(min=0).sqrt()
        return error / norm_sq.sqrt() if relative and norm_sq > 0 else error

    def rotated(self, right_basis: Tensor) -> VocabularyTerms:
        """Return the terms of ``X_k U_R`` (the row side's basis is the identity)."""
        return VocabularyTerms(
            self.rows @ right_basis.to(self.rows),
            self.vocab,
            self.owner,
            self.num_rows,
            self.num_inputs,
        )

    def diagonal(self) -> Tensor:
        """``diag(F)`` as a ``[V, D]`` matrix: ``Σ_k X_k ⊙ X_k``."""
        squares = self.rows.square().sum(0)
        return squares.new_zeros(self.num_rows, squares.shape[-1]).index_add_(
            0, self.vocab, squares
        )

    def dense(self) -> Tensor:
        """``F`` as a dense ``[V·D, V·D]`` matrix (small tables and tests)."""
        matrices = dense_rows(self.rows, self.vocab, self.owner, self.num_inputs, self.num_rows)
        flat = matrices.reshape(-1, self.num_rows * self.rows.shape[-1])
        return flat.T @ flat


def split_diagonal(
    left: Tensor, right: Tensor, right_trace: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Rescale ``diag(left) ⊗ right`` (product kept): ``tr right = right_trace``, else even.

    Raises:
        FloatingPointError: If a factor or the scale is not finite.
    """
    trace = float(right.diagonal().sum())
    target = None if right_trace is None else float(right_trace)
    if target is not None and target > 0 and trace > 0:
        ratio = target / trace
    else:
        left_norm, right_norm = float(left.norm()), float(right.norm())
        ratio = math.sqrt(left_norm / right_norm) if left_norm > 0 and right_norm > 0 else 1.0
    left, right = left / ratio, right * ratio
    if not (math.isfinite(ratio) and torch.isfinite(left).all() and torch.isfinite(right).all()):
        raise FloatingPointError(
            "the factors of diag(l) ⊗ R are not representable in "
            f"{left.dtype} (scale {ratio:g}); solve in float64."
        )
    return left, (right + right.mT) / 2


def nearest_diagonal_sum(
    lefts: Tensor, rights: Tensor, right_trace: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Return the nearest ``diag(l) ⊗ R`` to ``Σ_k diag(l_k) ⊗ R_k``, in closed form.

    The best rank-one approximation of ``Σ_k l_k vec(R_k)ᵀ``, through the ``K × K``
    problem left by orthonormalising both sides (``K`` ranks or batches: small).

    Args:
        lefts: ``[K, V]``.
        rights: ``[K, D, D]``.
        right_trace: Target ``tr R`` (default: an even split).

    Returns:
        ``(l [V], R [D, D])``.
    """
    dtype = lefts.dtype
    work = torch.float64
    left_q, left_r = torch.linalg.qr(lefts.T.to(work))
    right_q, right_r = torch.linalg.qr(rights.flatten(1).T.to(work))
    u, s, vh = torch.linalg.svd(left_r @ right_r.T)
    left = left_q @ u[:, 0] * s[0]
    right = (right_q @ vh[0]).reshape(rights.shape[1:])
    if left.sum() < 0:
        left, right = -left, -right
    return split_diagonal(left.to(dtype), right.to(dtype), right_trace)
