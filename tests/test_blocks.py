"""Typed blocks against the dense matrices they represent, and against laplace-torch.

Every block structure (Kronecker factors, a dense block, an eigenvalue-corrected
block) answers the posterior's questions — powers, log-determinant, diagonal, products,
square forms — for a prior added, as the dense block-diagonal matrix does; the
Kronecker and dense blocks as laplace-torch's own ``Kron``/``KronDecomposed`` (damping
included). Sums add exactly over batches and serialise round trip.
"""

from __future__ import annotations

import pytest
import torch
from laplace.utils import Kron

from kfoc_backpack.blocks import Block, DenseBlock, EigenCorrected, KroneckerBlock
from kfoc_backpack.enums import Aggregation
from kfoc_backpack.laplace.posterior import BlockKron

DTYPE = torch.float64


def _orthonormal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))[0]


def _psd(n, gen, rank=None):
    a = torch.randn(n, rank or n + 2, generator=gen, dtype=DTYPE)
    return a @ a.T


def _blocks(seed=0) -> list[Block]:
    """One block of each structure, with a zero eigenvalue in the corrected one."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(4, 3, generator=gen, dtype=DTYPE) * 3 + 0.1
    s[0, 0] = 0.0  # an unused direction
    return [
        KroneckerBlock(_psd(3, gen), _psd(2, gen)),
        DenseBlock(_psd(5, gen)),
        EigenCorrected(_orthonormal(4, gen), _orthonormal(3, gen), s),
        DenseBlock(_psd(2, gen)),
    ]


def _dense(blocks, deltas, scalar=1.0):
    return torch.block_diag(
        *[scalar * b.dense() + d * torch.eye(b.size, dtype=DTYPE) for b, d in zip(blocks, deltas)]
    )


def _power(matrix, exponent):
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.pow(exponent)) @ vectors.T


@pytest.mark.parametrize("per_layer", [False, True])
def test_every_operation_matches_the_dense_matrix(per_layer):
    blocks = _blocks()
    deltas = torch.tensor([0.5, 1.5, 0.25, 2.0], dtype=DTYPE)
    if not per_layer:
        deltas = torch.full((4,), 0.7, dtype=DTYPE)
    prior = deltas if per_layer else torch.tensor(0.7, dtype=DTYPE)
    precision = BlockKron(blocks).decompose() * 2.5 + prior
    dense = _dense(blocks, deltas, scalar=2.5)
    params = dense.shape[0]
    assert params == 6 + 5 + 12 + 2
    assert torch.allclose(precision.to_matrix(), dense, atol=1e-10)
    assert torch.allclose(precision.to_matrix(-1), torch.linalg.inv(dense), atol=1e-10)
    assert precision.logdet().item() == pytest.approx(torch.logdet(dense).item(), rel=1e-10)
    assert torch.allclose(precision.diag(), torch.diagonal(dense), atol=1e-10)
    assert torch.allclose(precision.diag(-1), torch.diagonal(torch.linalg.inv(dense)), atol=1e-10)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(3, 2, params, generator=gen, dtype=DTYPE)
    for exponent in (1, -1, -0.5, 0.5):
        expected = W @ _power(dense, exponent)  # symmetric: (D^e Wᵀ)ᵀ
        assert torch.allclose(precision.bmm(W, exponent), expected, atol=1e-9), exponent
    assert torch.allclose(precision.bmm(W[0, 0], -1), W[0, 0] @ torch.linalg.inv(dense))
    assert torch.allclose(precision.bmm(W[:, 0], 1), W[:, 0] @ dense)
    square_form = torch.einsum("bkp,pq,bjq->bkj", W, torch.linalg.inv(dense), W)
    assert torch.allclose(precision.inv_square_form(W), square_form, atol=1e-10)
    # samples N(0, dense⁻¹): the covariance of bmm(z, -1/2)
    root = precision.bmm(torch.eye(params, dtype=DTYPE), -0.5)
    assert torch.allclose(root.T @ root, torch.linalg.inv(dense), atol=1e-10)


@pytest.mark.parametrize("damping", [False, True])
def test_kronecker_and_dense_blocks_are_laplace_torchs_kron(damping):
    """``BlockKron`` of Kronecker and dense blocks is laplace-torch's ``Kron`` (damping too)."""
    gen = torch.Generator().manual_seed(2)
    left, right, bias = _psd(3, gen), _psd(4, gen), _psd(3, gen, rank=2)
    ours = BlockKron([KroneckerBlock(left, right), DenseBlock(bias)]) * 1.7
    theirs = Kron([[left, right], [bias]]) * 1.7
    for a, b in zip(sum(ours.kfacs, []), sum(theirs.kfacs, [])):
        assert torch.equal(a, b)
    prior = torch.tensor([0.3, 1.2], dtype=DTYPE)
    ours = ours.decompose(damping=damping) * 0.9 + prior
    theirs = theirs.decompose(damping=damping) * 0.9 + prior
    theirs.damping = damping  # laplace-torch's arithmetic drops it
    W = torch.randn(2, 3, 15, generator=gen, dtype=DTYPE)
    assert ours.damping is damping
    assert torch.allclose(ours.to_matrix(), theirs.to_matrix())
    assert torch.allclose(ours.logdet(), theirs.logdet())
    assert torch.allclose(ours.diag(-1), theirs.diag(-1))
    assert torch.allclose(ours.bmm(W, -0.5), theirs.bmm(W, -0.5))
    assert torch.allclose(ours.inv_square_form(W), theirs.inv_square_form(W))
    for a, b in zip(sum(ours.eigenvalues, []), sum(theirs.eigenvalues, [])):
        torch.testing.assert_close(a, b)


def test_bad_arguments_are_named():
    blocks = _blocks()
    with pytest.raises(ValueError, match="damping"):
        BlockKron(blocks).decompose(damping=True)  # the corrected block has no factors
    precision = BlockKron(blocks).decompose()
    with pytest.raises(ValueError, match="scalar"):
        precision * torch.ones(3)
    with pytest.raises(ValueError, match="parameters"):
        precision.bmm(torch.ones(1, 1, 7), -1)
    with pytest.raises(ValueError, match=r"\(3,\) to 4 blocks.*'layerwise'"):
        precision + torch.ones(3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"'0.weight'.*KroneckerBlock's 2 matrices"):
        blocks[0].from_kfacs([torch.eye(3)], "'0.weight'")
    with pytest.raises(ValueError, match=r"shapes \[\(5, 5\)\], got \[\(4, 4\)\]"):
        blocks[1].from_kfacs([torch.eye(4)])
    with pytest.raises(ValueError, match="Unknown block kind 'sparse'"):
        Block.from_state({"kind": "sparse"})


def test_states_round_trip_and_from_kfacs_rebuilds_the_structure():
    blocks = _blocks()
    blocks[2] = EigenCorrected(
        blocks[2].left_basis, blocks[2].right_basis, blocks[2].diagonal, blocks[0].scaled(2.0)
    )
    for block in blocks:
        again = Block.from_state(block.state())
        assert type(again) is type(block)
        torch.testing.assert_close(again.dense(), block.dense())
    again = Block.from_state(blocks[2].state())
    assert torch.equal(again.factors.left, blocks[2].factors.left)
    for block in (blocks[0], blocks[1]):
        rebuilt = block.from_kfacs(block.kfacs)
        assert type(rebuilt) is type(block) and torch.equal(rebuilt.dense(), block.dense())


def test_scaling_keeps_kfacs_split_or_spreads_evenly():
    block = _blocks()[0]
    kept, even = block.scaled(4.0), block.scaled(4.0, even=True)
    torch.testing.assert_close(kept.dense(), 4 * block.dense())
    torch.testing.assert_close(even.dense(), 4 * block.dense())
    assert torch.equal(kept.right, block.right)  # K-FAC's split: the input side is the data's
    torch.testing.assert_close(even.right, 2 * block.right)
    assert block.trace().item() == pytest.approx(torch.trace(block.dense()).item())


@pytest.mark.parametrize("aggregation", list(Aggregation.of_factors()))
def test_sums_add_batches_exactly_where_exact(aggregation):
    gen = torch.Generator().manual_seed(3)
    dense = [DenseBlock(_psd(3, gen)) for _ in range(3)]
    total = dense[0].new_sum(aggregation)
    for block, num in zip(dense, (4, 4, 3)):
        total.add(block, num, scale=float(num))
    expected = sum(num * b.matrix for b, num in zip(dense, (4, 4, 3)))
    torch.testing.assert_close(total.result().matrix, expected)
    assert total.num_samples == 11
    corrected = _blocks()[2]
    diagonals = corrected.new_sum(aggregation)
    for scale in (1.0, 2.0):
        diagonals.add(corrected, 5, scale)
    torch.testing.assert_close(diagonals.result().diagonal, 3 * corrected.diagonal)
    with pytest.raises(ValueError, match="changed structure"):
        total.add(corrected, 1)
    kron = KroneckerBlock(_psd(3, gen), _psd(2, gen))
    factors = kron.new_sum(aggregation)
    factors.add(kron, 4)
    factors.add(kron, 4)
    torch.testing.assert_close(factors.result().dense(), 2 * kron.dense())
    with pytest.raises(ValueError, match=r"aggregation 'optimal'; supported: 'approx', 'running'"):
        kron.new_sum(Aggregation.OPTIMAL)
