r"""Symmetric products at about half the flops of a general matrix product.

PyTorch has no ``syrk``: ``Bᵀ B`` as ``B.T @ B`` costs ``P·N²`` multiply-adds although
half of the result is the transpose of the other half. :func:`sym_gram` computes the
blocks on and below the diagonal only (``P·N²·(b + 1)/(2b)`` for ``b`` column blocks)
and mirrors them. :func:`congruence_sum` forms ``R = Σ_k A_kᵀ W_k A_k`` for symmetric
``W_k`` this way, through ``W_k = U_k Λ_k U_kᵀ``: ``R = B₊ᵀB₊ − B₋ᵀB₋`` with the rows
``√|λ| uᵀ A_k`` of positive and negative eigenvalues (exact; rows of eigenvalues at
round-off level, ``|λ| ≤ T·ε·max|λ|``, are dropped, so rank-deficient ``W_k`` cost
only their rank).

Index conventions: ``K`` blocks, ``T`` rows per block, ``P`` rows in all, ``N``
columns (the result is ``[N, N]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

SYM_BLOCKS = 3
"""Column blocks of :func:`sym_gram` (``2/3`` of the general product's flops; more blocks
lose more to the narrower products than they save on two CPU cores)."""

SYM_MIN_COLUMNS = 384
"""Below this many columns :func:`sym_gram` is one general product."""


def sym_gram(rows: Tensor, blocks: int = SYM_BLOCKS) -> Tensor:
    """``rowsᵀ rows`` (``[N, N]``) from the blocks on and below the diagonal.

    Args:
        rows: ``[P, N]`` matrix (any strides).
        blocks: Number of column blocks.

    Returns:
        The ``[N, N]`` Gram matrix, exactly symmetric (so callers need not symmetrise
        it: ``R + Rᵀ`` of a large ``R`` costs as much as the product on the CPU).
    """
    n = rows.shape[1]
    if n < SYM_MIN_COLUMNS or blocks < 2:
        out = rows.T @ rows
        return out.triu() + out.triu(1).T
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    out = rows.new_empty(n, n)
    for lo, hi in spans:  # block row: the blocks left of and on the diagonal
        torch.mm(rows[:, lo:hi].T, rows[:, :hi], out=out[lo:hi, :hi])
    for row, (lo, hi) in enumerate(spans):  # mirror the strictly lower blocks
        for lo_c, hi_c in spans[:row]:
            out[lo_c:hi_c, lo:hi].copy_(out[lo:hi, lo_c:hi_c].T)
        diag = out[lo:hi, lo:hi]  # a product need not be bitwise symmetric
        diag.copy_(diag.triu() + diag.triu(1).T)
    return out


def congruence_sum(coef: Tensor, blocks: Tensor) -> Tensor:
    """``Σ_k A_kᵀ W_k A_k`` (``[N, N]``) for symmetric ``W_k`` by symmetric products.

    Args:
        coef: ``[K, T, T]`` symmetric ``W_k`` (or ``[T, T]``, the same for every ``k``).
        blocks: ``[K, T, N]`` matrices ``A_k``.

    Returns:
        The symmetric ``[N, N]`` sum (module docstring).
    """
    values, vectors = torch.linalg.eigh(coef)
    rows = vectors.mT @ blocks  # [K, T, N]: u_iᵀ A_k
    pos = rows.shape[-2]
    values = values.expand(rows.shape[:-1]).reshape(-1)
    rows = rows.reshape(-1, rows.shape[-1])
    floor = pos * torch.finfo(values.dtype).eps * values.abs().max()
    keep_pos, keep_neg = values > floor, values < -floor
    plus = rows[keep_pos] * values[keep_pos].sqrt().unsqueeze(-1)
    out = sym_gram(plus)
    if bool(keep_neg.any()):
        minus = rows[keep_neg] * (-values[keep_neg]).sqrt().unsqueeze(-1)
        out = out - minus.T @ minus
    return out
