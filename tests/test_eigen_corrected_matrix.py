"""``EigenCorrectedDecomposed`` against the dense block-diagonal matrix it represents.

Random orthonormal bases and positive corrected eigenvalues (weights), dense symmetric
bias blocks; every operation laplace-torch's ``KronDecomposed`` offers is checked in
float64 against ``torch.linalg`` on the dense matrix, and against ``KronDecomposed``
itself where the corrected eigenvalues are an outer product (plain Kronecker blocks).
"""

from __future__ import annotations

import pytest
import torch
from laplace.utils import KronDecomposed

from kfoc_backpack.laplace.eigen_corrected import EigenCorrectedDecomposed
from kfoc_backpack.solver.correction import EigenCorrected

SIZES = [(3, 4), 5, (2, 3), 2]  # weight [M, N] or bias B, in parameter order


def _orthonormal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


def _blocks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for size in SIZES:
        if isinstance(size, tuple):
            m, n = size
            s = torch.rand(m, n, generator=gen, dtype=torch.float64) * 3 + 0.1
            s[0, 0] = 0.0  # a zero eigenvalue (an unused direction)
            blocks.append(EigenCorrected(_orthonormal(m, gen), _orthonormal(n, gen), s))
        else:
            a = torch.randn(size, size + 2, generator=gen, dtype=torch.float64)
            blocks.append(a @ a.T)
    return blocks


def _dense(blocks, deltas, scalar=1.0):
    parts = [b.dense() if isinstance(b, EigenCorrected) else b for b in blocks]
    return torch.block_diag(
        *[scalar * p + d * torch.eye(len(p), dtype=torch.float64) for p, d in zip(parts, deltas)]
    )


def _power(matrix, exponent):
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.pow(exponent)) @ vectors.T


@pytest.mark.parametrize("per_layer", [False, True])
def test_every_operation_matches_the_dense_matrix(per_layer):
    blocks = _blocks()
    deltas = torch.tensor([0.5, 1.5, 0.25, 2.0], dtype=torch.float64)
    if not per_layer:
        deltas = torch.full((4,), 0.7, dtype=torch.float64)
    prior = deltas if per_layer else torch.tensor(0.7, dtype=torch.float64)
    precision = EigenCorrectedDecomposed.from_blocks(blocks) * 2.5 + prior
    dense = _dense(blocks, deltas, scalar=2.5)
    params = dense.shape[0]
    assert params == 12 + 5 + 6 + 2
    assert torch.allclose(precision.to_matrix(), dense, atol=1e-10)
    assert torch.allclose(precision.to_matrix(-1), torch.linalg.inv(dense), atol=1e-10)
    assert precision.logdet().item() == pytest.approx(torch.logdet(dense).item(), rel=1e-10)
    assert torch.allclose(precision.diag(), torch.diagonal(dense), atol=1e-10)
    assert torch.allclose(precision.diag(-1), torch.diagonal(torch.linalg.inv(dense)), atol=1e-10)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(3, 2, params, generator=gen, dtype=torch.float64)
    for exponent in (1, -1, -0.5, 0.5):
        expected = W @ _power(dense, exponent)  # symmetric: (D^e Wᵀ)ᵀ
        assert torch.allclose(precision.bmm(W, exponent), expected, atol=1e-9), exponent
    assert torch.allclose(precision.bmm(W[0, 0], -1), W[0, 0] @ torch.linalg.inv(dense))
    assert torch.allclose(precision.bmm(W[:, 0], 1), W[:, 0] @ dense)
    square_form = torch.einsum("bkp,pq,bjq->bkj", W, torch.linalg.inv(dense), W)
    assert torch.allclose(precision.inv_square_form(W), square_form, atol=1e-10)
    # samples N(0, dense⁻¹): the covariance of bmm(z, -1/2)
    root = precision.bmm(torch.eye(params, dtype=torch.float64), -0.5)
    assert torch.allclose(root.T @ root, torch.linalg.inv(dense), atol=1e-10)


def test_outer_product_eigenvalues_are_laplace_torchs_kron_decomposed():
    gen = torch.Generator().manual_seed(2)
    q_left, q_right = _orthonormal(3, gen), _orthonormal(4, gen)
    l_left = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    l_right = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    bias_q, bias_l = _orthonormal(3, gen), torch.rand(3, generator=gen, dtype=torch.float64)
    theirs = KronDecomposed([[q_left, q_right], [bias_q]], [[l_left, l_right], [bias_l]])
    ours = EigenCorrectedDecomposed(
        [[q_left, q_right], [bias_q]], [[torch.outer(l_left, l_right)], [bias_l]]
    )
    prior = torch.tensor([0.3, 1.2], dtype=torch.float64)
    theirs, ours = theirs * 1.7 + prior, ours * 1.7 + prior
    W = torch.randn(2, 3, 15, generator=gen, dtype=torch.float64)
    assert torch.allclose(ours.to_matrix(), theirs.to_matrix())
    assert torch.allclose(ours.logdet(), theirs.logdet())
    assert torch.allclose(ours.diag(-1), theirs.diag(-1))
    assert torch.allclose(ours.bmm(W, -0.5), theirs.bmm(W, -0.5))
    assert torch.allclose(ours.inv_square_form(W), theirs.inv_square_form(W))


def test_bad_arguments_are_named():
    block = _blocks()[0]
    with pytest.raises(ValueError, match="damping"):
        EigenCorrectedDecomposed(
            [[block.left_basis, block.right_basis]], [[block.diagonal]], None, True
        )
    with pytest.raises(ValueError, match="block 0 has eigenvectors of sizes"):
        EigenCorrectedDecomposed([[block.left_basis, block.right_basis]], [[block.diagonal.T]])
    precision = EigenCorrectedDecomposed.from_blocks(_blocks())
    with pytest.raises(ValueError, match="scalar"):
        precision * torch.ones(3)
    with pytest.raises(ValueError, match="parameters"):
        precision.bmm(torch.ones(1, 1, 7), -1)
