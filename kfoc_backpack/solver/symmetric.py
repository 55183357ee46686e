r"""Symmetric products at about half the flops of a general matrix product.

PyTorch has no ``syrk``: ``Bᵀ B`` as ``B.T @ B`` costs ``P·N²`` multiply-adds although
half of the result is the transpose of the other half. :class:`SymAccumulator` computes
the blocks on and below the diagonal only (``P·N²·(b + 1)/(2b)`` for ``b`` column
blocks), accumulating ``± BᵀB`` in place into one ``[N, N]`` buffer, and mirrors them
once at the end. :func:`congruence_sum` forms ``R = Σ_k A_kᵀ W_k A_k`` for symmetric
``W_k`` this way, through ``W_k = U_k Λ_k U_kᵀ``: ``R = B₊ᵀB₊ − B₋ᵀB₋`` with the rows
``√|λ| uᵀ A_k`` of positive and negative eigenvalues (exact; rows of eigenvalues at
round-off level, ``|λ| ≤ T·ε·max|λ|``, are dropped, so rank-deficient ``W_k`` cost
only their rank). Memory: the ``[N, N]`` result and the rows of a chunk of samples
(at most :data:`CHUNK_ELEMENTS` numbers, or one sample), no other ``N × N`` buffer.

Index conventions: ``K`` blocks, ``T`` rows per block, ``P`` rows in all, ``N``
columns (the result is ``[N, N]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

SYM_BLOCKS = 3
"""Column blocks of the symmetric product (``2/3`` of the general product's flops; more
blocks lose more to the narrower products than they save on two CPU cores)."""

SYM_MIN_COLUMNS = 384
"""Below this many columns the symmetric product is one general product."""

MIRROR_TILE = 256
"""Tile of the in-place mirroring of the diagonal blocks (temporaries of this size)."""

CHUNK_ELEMENTS = 1 << 20
"""Rows ``√|λ| uᵀ A_k`` of :func:`congruence_sum` are formed for chunks of samples of
at most this many numbers (4 MiB in float32), not for all samples at once."""


class SymAccumulator:
    """``Σ ± BᵢᵀBᵢ`` (``[N, N]``) in one buffer, from the blocks on and below the diagonal.

    Args:
        n: ``N``, columns of the ``Bᵢ``.
        like: Tensor whose dtype and device the result takes.
        blocks: Column blocks (one general product below :data:`SYM_MIN_COLUMNS`).
    """

    def __init__(self, n: int, like: Tensor, blocks: int = SYM_BLOCKS):
        self.out = like.new_zeros(n, n)
        blocks = 1 if n < SYM_MIN_COLUMNS else max(1, blocks)
        edges = [round(i * n / blocks) for i in range(blocks + 1)]
        self.spans = list(zip(edges[:-1], edges[1:], strict=True))

    def add(self, rows: Tensor, sign: float = 1.0) -> None:
        """Accumulate ``sign · rowsᵀ rows`` (``rows`` ``[P, N]``, any strides), lower blocks."""
        if rows.shape[0] == 0:
            return
        for lo, hi in self.spans:  # block row: the blocks left of and on the diagonal
            self.out[lo:hi, :hi].addmm_(rows[:, lo:hi].T, rows[:, :hi], alpha=sign)

    def result(self) -> Tensor:
        """Return the exactly symmetric sum (lower blocks mirrored in place; no copy)."""
        out = self.out
        for row, (lo, hi) in enumerate(self.spans):
            for lo_c, hi_c in self.spans[:row]:  # strictly lower blocks
                out[lo_c:hi_c, lo:hi].copy_(out[lo:hi, lo_c:hi_c].T)
            _mirror_lower(out[lo:hi, lo:hi])
        return out


def _mirror_lower(square: Tensor) -> None:
    """Copy the lower triangle of ``square`` onto its upper one, in place, by tiles."""
    size = square.shape[0]
    edges = list(range(0, size, MIRROR_TILE)) + [size]
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    for row, (lo, hi) in enumerate(spans):
        for lo_c, hi_c in spans[:row]:
            square[lo_c:hi_c, lo:hi].copy_(square[lo:hi, lo_c:hi_c].T)
        tile = square[lo:hi, lo:hi]  # a product need not be bitwise symmetric
        tile.copy_(tile.tril() + tile.tril(-1).T)


def sym_gram(rows: Tensor, blocks: int = SYM_BLOCKS) -> Tensor:
    """``rowsᵀ rows`` (``[N, N]``) from the blocks on and below the diagonal.

    Args:
        rows: ``[P, N]`` matrix (any strides).
        blocks: Number of column blocks.

    Returns:
        The ``[N, N]`` Gram matrix, exactly symmetric (so callers need not symmetrise
        it: ``R + Rᵀ`` of a large ``R`` costs as much as the product on the CPU).
    """
    acc = SymAccumulator(rows.shape[1], rows, blocks)
    acc.add(rows)
    return acc.result()


def congruence_sum(coef: Tensor, blocks: Tensor) -> Tensor:
    """``Σ_k A_kᵀ W_k A_k`` (``[N, N]``) for symmetric ``W_k`` by symmetric products.

    ``eigh`` orders each ``W_k``'s eigenvalues ascending: the negative ones come first,
    the positive ones last. The rows of both signs are formed from the scaled columns
    ``√|λ| u`` of the first ``n₋`` and last ``n₊`` eigenvectors (the largest counts
    over the samples; columns of dropped eigenvalues are scaled by zero), so no
    gather or scaling touches the ``N``-wide rows.

    Args:
        coef: ``[K, T, T]`` symmetric ``W_k`` (or ``[T, T]``, the same for every ``k``).
        blocks: ``[K, T, N]`` matrices ``A_k``.

    Returns:
        The symmetric ``[N, N]`` sum (module docstring); where ``eigh`` of the ``W_k``
        fails or is not finite (float32 on a nearly rank-deficient ``W``), the same sum
        by general products (:func:`plain_congruence_sum`).
    """
    num, pos, n = blocks.shape
    try:
        values, vectors = torch.linalg.eigh(coef)
    except RuntimeError:  # torch.linalg.LinAlgError: no convergence (float32, rank-deficient)
        return plain_congruence_sum(coef, blocks)
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return plain_congruence_sum(coef, blocks)  # LAPACK can return NaN silently
    floor = pos * torch.finfo(values.dtype).eps * values.abs().max()
    counts = torch.stack([(values < -floor).sum(-1).max(), (values > floor).sum(-1).max()])
    n_neg, n_pos = (int(c) for c in counts.tolist())
    acc = SymAccumulator(n, blocks)
    for sign, cols in ((-1.0, slice(0, n_neg)), (1.0, slice(pos - n_pos, pos))):
        if cols.stop <= cols.start:
            continue
        vals = values[..., cols]
        weight = (vals * sign).clamp_min(0).masked_fill((vals * sign) <= floor, 0).sqrt()
        scaled = vectors[..., cols] * weight.unsqueeze(-2)  # [(K,) T, n±]: √|λ| u
        if scaled.dim() == 2:
            scaled = scaled.expand(num, pos, cols.stop - cols.start)
        width = max(1, CHUNK_ELEMENTS // max(1, scaled.shape[-1] * n))
        for lo in range(0, num, width):
            hi = min(num, lo + width)
            rows = scaled[lo:hi].mT @ blocks[lo:hi]  # [k, n±, N]: √|λ| uᵀ A_k
            acc.add(rows.reshape(-1, n), sign)
            del rows
    return acc.result()


def plain_congruence_sum(coef: Tensor, blocks: Tensor) -> Tensor:
    """``Σ_k A_kᵀ (W_k A_k)`` by general products, symmetrised: no decomposition of ``W_k``.

    About twice :func:`congruence_sum`'s flops for full-rank ``W_k``, its fallback where
    ``eigh`` fails. A chunk of samples at a time (at most :data:`CHUNK_ELEMENTS` numbers).

    Args:
        coef: ``[K, T, T]`` or ``[T, T]`` symmetric ``W_k``.
        blocks: ``[K, T, N]`` matrices ``A_k``.

    Returns:
        The ``[N, N]`` sum, exactly symmetric.
    """
    num, pos, n = blocks.shape
    out = blocks.new_zeros(n, n)
    width = max(1, CHUNK_ELEMENTS // max(1, pos * n))
    for lo in range(0, num, width):
        hi = min(num, lo + width)
        weights = coef if coef.dim() == 2 else coef[lo:hi]
        products = weights @ blocks[lo:hi]  # [k, T, N]
        out.addmm_(blocks[lo:hi].reshape(-1, n).T, products.reshape(-1, n))
    return (out + out.T) / 2
