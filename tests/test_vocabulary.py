"""Large embedding tables: the block ``diag(l) ⊗ R`` with a diagonal row side.

Ground truth is dense and independent: the per-sample matrices formed by a loop over
positions (solver level) or ``torch.func`` (whole model, ``tests/laplace_helpers.py``),
the optimum as the leading singular pair of the ``V × D²`` matrix whose rows are the
block's diagonal ``D × D`` blocks, float64. The size rule is lowered so that the tiny
transformer's 11-row table gets the diagonal row side, and one test keeps the default
rule on a table of BERT's 30,522 rows.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from laplace import Laplace
from laplace_helpers import DTYPE, single_thread  # noqa: F401
from test_every_parameter import batches, fit, named_blocks, reference
from torch import nn
from whole_models import TOKENS, VOCABULARY, WIDTH, whole_data

from kfoc_backpack.blocks import DiagonalCorrected, DiagonalKroneckerBlock
from kfoc_backpack.collect import parameters
from kfoc_backpack.solver import SolverOptions
from kfoc_backpack.solver.vocabulary import VocabularyTerms, nearest_diagonal_sum

STRUCTURES = ("kfoc", "kfac", "ekfoc", "ekfac")


def per_sample_matrices(ids, vectors, num_rows, padding_idx=None):
    """``[M, N, V, D]`` by a loop over the positions."""
    vectors_per, num, positions, width = vectors.shape
    out = torch.zeros(vectors_per, num, num_rows, width, dtype=vectors.dtype)
    for n in range(num):
        for t in range(positions):
            if ids[n, t] != padding_idx:
                out[:, n, ids[n, t]] += vectors[:, n, t]
    return out


def diagonal_optimum(dense, rows, cols):
    """The nearest ``diag(l) ⊗ R`` to ``dense`` by a dense SVD, and its relative error."""
    blocks = dense.reshape(rows, cols, rows, cols)
    Z = torch.stack([blocks[v, :, v, :].flatten() for v in range(rows)])
    u, s, vh = torch.linalg.svd(Z)
    best = torch.kron(torch.diag(u[:, 0] * s[0]), vh[0].reshape(cols, cols))
    return best, float((dense - best).norm() / dense.norm())


@pytest.fixture
def terms():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (5, 6), generator=gen)
    ids[0, :3] = 4  # an id repeated within an input
    vectors = torch.randn(2, 5, 6, 3, generator=gen, dtype=DTYPE)
    return ids, vectors, VocabularyTerms.from_positions(ids, vectors, 9, padding_idx=2)


def test_rows_are_the_per_sample_matrices(terms):
    ids, vectors, found = terms
    X = per_sample_matrices(ids, vectors, 9, padding_idx=2).reshape(10, -1)
    torch.testing.assert_close(found.dense(), X.T @ X)
    torch.testing.assert_close(found.norm_sq(), (X.T @ X).square().sum())
    basis = torch.linalg.qr(torch.randn(3, 3, dtype=DTYPE))[0]
    rotated = (X.reshape(10, 9, 3) @ basis).square().sum(0)
    torch.testing.assert_close(found.rotated(basis).diagonal(), rotated)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_solve_is_the_dense_optimum(terms, dtype):
    _, _, found = terms
    dense = found.dense()
    best, best_error = diagonal_optimum(dense, 9, 3)
    low = VocabularyTerms(found.rows.to(dtype), found.vocab, found.owner, 9, 5)
    factors = low.solve(SolverOptions(tol=1e-12 if dtype == torch.float64 else 1e-6), 2.5)
    assert factors.converged and factors.left.dtype == dtype
    assert float(factors.right.trace()) == pytest.approx(2.5)
    product = torch.kron(torch.diag(factors.left), factors.right).to(DTYPE)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(product, best, rtol=tol, atol=tol * float(best.abs().max()))
    error = found.error(factors.left.to(DTYPE), factors.right.to(DTYPE))
    assert float(error) == pytest.approx(best_error, abs=tol)
    assert bool((factors.left >= 0).all())


def test_zero_rows_give_zero_factors():
    ids = torch.zeros(2, 3, dtype=torch.long)
    factors = VocabularyTerms.from_positions(ids, torch.zeros(1, 2, 3, 4), 5).solve()
    assert factors.converged and not factors.left.any() and not factors.right.any()


def test_the_sum_of_products_is_the_dense_optimum():
    gen = torch.Generator().manual_seed(1)
    lefts = torch.rand(3, 6, generator=gen, dtype=DTYPE)
    rights = torch.randn(3, 4, 4, generator=gen, dtype=DTYPE)
    rights = rights @ rights.mT
    dense = sum(torch.kron(torch.diag(lefts[k]), rights[k]) for k in range(3))
    best, _ = diagonal_optimum(dense, 6, 4)
    left, right = nearest_diagonal_sum(lefts, rights, right_trace=1.0)
    torch.testing.assert_close(torch.kron(torch.diag(left), right), best)
    assert float(right.trace()) == pytest.approx(1.0)


@pytest.fixture
def diagonal_table(monkeypatch):
    """Give the tiny transformer's 11-row table the diagonal row side."""
    monkeypatch.setattr(parameters, "VOCABULARY_LIMIT", VOCABULARY - 1)


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_the_table_gets_the_optimal_diagonal_row_side(diagonal_table, curvature):
    model, X, y = whole_data("tiny_vit", "regression")
    data = [(X, y)]
    tight = {"backend_kwargs": {"tol": 1e-12, "max_iter": 1000}}
    la = fit("kfoc", model, "regression", data, curvature, aggregation="approx", **tight)
    dense = reference(model, X, y, "regression", curvature, data)["embed.weight"]
    block = named_blocks(la)["embed.weight"]
    assert isinstance(block, DiagonalKroneckerBlock) and block.shape == (VOCABULARY, WIDTH)
    best, _ = diagonal_optimum(dense, VOCABULARY, WIDTH)
    torch.testing.assert_close(block.dense(), best, rtol=1e-6, atol=1e-9)


def test_running_aggregation_is_the_optimum_of_the_batches_products(diagonal_table):
    model, X, y = whole_data("tiny_vit", "regression")
    data = batches(X, y)
    tight = {"backend_kwargs": {"tol": 1e-12, "max_iter": 1000}}
    la = fit("kfoc", model, "regression", data, aggregation="running", **tight)
    block = named_blocks(la)["embed.weight"]
    products = []
    for Xb, yb in data:
        dense = reference(model, Xb, yb, "regression", "ggn", [(Xb, yb)])["embed.weight"]
        products.append(diagonal_optimum(dense, VOCABULARY, WIDTH)[0])
    best, _ = diagonal_optimum(sum(products), VOCABULARY, WIDTH)
    torch.testing.assert_close(block.dense(), best, rtol=1e-6, atol=1e-9)


def test_kfac_of_the_table_is_the_ids_frequencies(diagonal_table):
    model, X, y = whole_data("tiny_vit", "classification")
    la = fit("kfac", model, "classification", batches(X, y, [X.shape[0]]))
    block = named_blocks(la)["embed.weight"]
    counts = torch.bincount(X[X != 0].flatten(), minlength=VOCABULARY).to(DTYPE)
    assert isinstance(block, DiagonalKroneckerBlock)
    torch.testing.assert_close(block.left, counts / TOKENS)
    with pytest.MonkeyPatch.context() as undo:  # the dense-factor route's K-FAC: the same
        undo.setattr(parameters, "VOCABULARY_LIMIT", 4096)
        undo.setattr(parameters, "DENSE_LIMIT", 16)
        other = named_blocks(fit("kfac", model, "classification", batches(X, y, [X.shape[0]])))
    torch.testing.assert_close(block.dense(), other["embed.weight"].dense())


@pytest.mark.parametrize("structure", ["ekfoc", "ekfac"])
def test_the_corrected_table_is_the_blocks_diagonal_in_its_basis(diagonal_table, structure):
    model, X, y = whole_data("tiny_vit", "classification")
    data = batches(X, y)
    la = fit(structure, model, "classification", data)
    dense = reference(model, X, y, "classification", "ggn", data)["embed.weight"]
    block = named_blocks(la)["embed.weight"]
    assert isinstance(block, DiagonalCorrected)
    torch.testing.assert_close(block.diagonal.sum(), dense.trace())
    basis = block.basis()
    torch.testing.assert_close(block.diagonal.flatten(), torch.diagonal(basis.T @ dense @ basis))


def test_state_dict_online_fit_and_ranks_keep_the_table(diagonal_table):
    model, X, y = whole_data("tiny_vit", "classification")
    la = fit("ekfoc", model, "classification", batches(X, y))
    other = Laplace(copy.deepcopy(model), "classification", "all", "ekfoc")
    other.load_state_dict(la.state_dict())
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())
    online = fit("kfoc", model, "classification", batches(X, y)[:1], aggregation="approx")
    online.fit(batches(X, y)[1:], override=False)
    assert isinstance(named_blocks(online)["embed.weight"], DiagonalKroneckerBlock)
    # two ranks' sums combine into the sum of both (what reduce_sums does with them)
    first, second = (
        named_blocks(fit("kfoc", model, "classification", [b]))["embed.weight"]
        for b in batches(X, y)
    )
    for aggregation in ("approx", "running"):
        whole = first.new_sum(aggregation)
        whole.add(first, 5)
        whole.add(second, 7)
        ranks = [first.new_sum(aggregation), first.new_sum(aggregation)]
        ranks[0].add(first, 5)
        ranks[1].add(second, 7)
        summed = [sum(parts) for parts in zip(*(r.summed() for r in ranks))]
        combined = ranks[0].combine(summed, [r.gathered() for r in ranks], torch.tensor([5, 7]))
        torch.testing.assert_close(combined.dense(), whole.result().dense())


def test_the_data_sets_optimum_is_refused_naming_the_table(diagonal_table):
    model, X, y = whole_data("tiny_vit", "classification")
    with pytest.raises(ValueError, match=r"'embed.weight'.*diagonal row side.*'running'"):
        fit("kfoc", model, "classification", batches(X, y), aggregation="optimal")


class Bag(nn.Module):
    """BERT's vocabulary (30,522 ids), mean-pooled into a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30522, 16, padding_idx=0)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_a_table_of_bert_vocabulary_fits_and_predicts(structure):
    torch.manual_seed(0)
    model = Bag()
    X = torch.randint(0, 30522, (24, 10))
    y = torch.randint(0, 3, (24,))
    la = Laplace(model, "classification", "all", structure)
    placeholders = [f for kfacs in la.H.kfacs for f in kfacs]  # before the fit: no V × V zero
    assert max(f.untyped_storage().nbytes() for f in placeholders) <= 8
    la.fit(batches(X, y, [16, 8]))
    assert isinstance(named_blocks(la)["embed.weight"], (DiagonalKroneckerBlock, DiagonalCorrected))
    assert math.isfinite(la.log_marginal_likelihood().item())
    probs = la(X[:5], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
