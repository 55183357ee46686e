r"""The block of a parameter known by its per-sample gradients, and the size rule that picks it.

A layer's weight hands the solver its inputs and output-side vectors at its positions
(:mod:`kfoc_backpack.collect.kinds`). Every other trainable parameter — a normalisation
layer's scale and shift, a ``cls_token``, a ``pos_embed``, a layer scale ``gamma``, the
parameters of a module no kind describes — is known by its per-sample gradients, the
rows ``b_{m,n} = ∂⟨f(x_n), v_{m,n}⟩/∂θ`` (one per output-side vector ``m`` of input
``n``), and its block is built from them here. The one size rule
(:func:`block_shape`):

* a parameter with at most one dimension longer than one (a vector: scales, shifts,
  ``cls_token`` ``[1, 1, D]``, a layer scale ``[C, 1, 1]``), or with at most
  :data:`DENSE_LIMIT` entries, gets its exact dense block ``Σ b bᵀ``
  (:class:`~kfoc_backpack.collect.layer_terms.DenseTerms`), as a bias does;
* a larger one gets Kronecker factors of its per-sample gradient matrices
  ``X_{m,n}`` (``O × I``, ``O`` its first dimension longer than one, ``I`` the rest:
  a ``pos_embed`` ``[1, T, D]`` is ``T × D``), K-FOC's optimum of
  ``Σ vec(X) vec(X)ᵀ`` by the solver's general route
  (:class:`~kfoc_backpack.solver.SampleTerms`). Its input-side factor carries the scale
  split ``tr R = I`` (there is no input whose second moment would fix it); K-FAC's
  factors of it (``hessian_structure="kfac"``) are the trace-preserving product of its
  marginal second moments, ``(1/I) Σ X Xᵀ ⊗ I·Σ XᵀX / Σ ‖X‖²_F``.

An embedding table (:mod:`kfoc_backpack.collect.kinds.embedding`) follows the same rule,
and one more (:func:`diagonal_rows`): a table of more than :data:`VOCABULARY_LIMIT` rows,
or of more than :data:`~kfoc_backpack.collect.loose.MAX_ENTRIES` entries, gets a
diagonal row side, ``diag(l) ⊗ R`` (:mod:`kfoc_backpack.solver.vocabulary`).

Index conventions: ``M`` vectors per input, ``N`` inputs, ``P`` the parameter's entries,
``O``/``I`` the rows and columns of its matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kfoc_backpack.blocks import Block, DenseBlock, KroneckerBlock
from kfoc_backpack.collect.layer_terms import DenseTerms, LayerTerms
from kfoc_backpack.solver import SampleTerms

DENSE_LIMIT = 1024
"""Parameters of more than one long dimension with at most this many entries get their
exact dense block; larger ones Kronecker factors. The posterior eigendecomposes each
block: ``P³`` multiply-adds for a dense one (a second at ``P = 4096`` on a CPU core, a
millisecond at 1024), ``O³ + I³`` for factors."""


VOCABULARY_LIMIT = 4096
"""Embedding tables of more rows get a diagonal row side (``diag(l) ⊗ R``): a dense
``V × V`` factor holds ``V²`` numbers (64 MiB at 4096 rows in float32, 3.7 GB for BERT's
30,522) and its eigendecomposition costs ``V³``."""


def diagonal_rows(num_rows: int, width: int) -> bool:
    """Whether a ``[V, D]`` table's block is ``diag(l) ⊗ R`` (else ``L ⊗ R`` or dense)."""
    from kfoc_backpack.collect.loose import MAX_ENTRIES

    return num_rows > VOCABULARY_LIMIT or num_rows * width > MAX_ENTRIES


def block_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """Return the ``(O, I)`` matrix whose Kronecker factors a parameter gets, or ``None`` (dense).

    Args:
        shape: The parameter's shape.

    Returns:
        ``None`` for a parameter with an exact dense block (at most one dimension longer
        than one, or at most :data:`DENSE_LIMIT` entries); else its first dimension
        longer than one against the rest.
    """
    long = [size for size in shape if size != 1]
    if len(long) < 2 or math.prod(long) <= DENSE_LIMIT:
        return None
    return long[0], math.prod(long[1:])


def zero_block(param: Tensor) -> Block:
    """Return the all-zero block of a parameter with per-sample-gradient terms."""
    shape = block_shape(param.shape)
    if shape is None:
        return DenseBlock.zeros(param.numel(), param.detach())
    return KroneckerBlock.zeros(*shape, param.detach())


def row_terms(
    rows: Tensor, shape: torch.Size | tuple[int, ...], with_kfac: bool = False
) -> DenseTerms | LayerTerms:
    """Return a parameter's terms from its per-sample gradients, shaped by :func:`block_shape`.

    Args:
        rows: ``[M, N, *shape]`` or ``[M, N, P]`` per-sample gradients.
        shape: The parameter's shape.
        with_kfac: Also K-FAC's block of the same samples.

    Returns:
        :class:`~kfoc_backpack.collect.layer_terms.DenseTerms` (exact block, K-FAC's the
        same) or :class:`~kfoc_backpack.collect.layer_terms.LayerTerms` of the
        per-sample matrices.
    """
    matrix = block_shape(shape)
    flat = rows.reshape(rows.shape[0] * rows.shape[1], -1)  # [M·N, P]
    if matrix is None:
        block = DenseBlock(flat.T @ flat)
        return DenseTerms(block, block if with_kfac else None)
    samples = flat.view(-1, *matrix)  # [M·N, O, I]
    columns = torch.tensor(float(matrix[1]), dtype=rows.dtype, device=rows.device)
    kfac = marginal_factors(samples, columns) if with_kfac else None
    return LayerTerms(SampleTerms(samples), columns, kfac)


def marginal_factors(samples: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """K-FAC's factors of ``Σ vec(X) vec(X)ᵀ`` without layer inputs: the marginals' product.

    Args:
        samples: ``[K, O, I]`` per-sample matrices.
        columns: ``I`` (0-d), the input-side factor's trace.

    Returns:
        ``((1/I) Σ X Xᵀ, I·Σ XᵀX / Σ ‖X‖²)``: the trace of the product is ``Σ ‖X‖²_F``,
        the block's (``R = I·(identity)/I`` where every ``X`` is zero).
    """
    left = torch.einsum("koi,kpi->op", samples, samples)
    right = torch.einsum("koi,koj->ij", samples, samples)
    total = left.trace()
    if total > 0:
        right = right * (columns / total)
    else:
        right = torch.eye(right.shape[0], dtype=right.dtype, device=right.device)
    return left / columns, right
