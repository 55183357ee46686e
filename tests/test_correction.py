"""Eigenvalue correction: the block's diagonal in the factors' eigenbasis, against dense.

Ground truth: the per-sample matrices formed by ``einsum``, the dense block
``Σ vec(X) vec(X)ᵀ``, its diagonal in ``U_L ⊗ U_R`` from ``torch.kron`` of the
eigenvectors (``torch.linalg.eigh``). Checked for every terms class and route, with
K-FOC's and K-FAC's factors, float64 and float32, and the edge cases.
"""

from __future__ import annotations

import pytest
import torch
from ground_truth import sum_of_outer
from laplace_helpers import neighbour

from kfoc_backpack.blocks import EigenCorrected
from kfoc_backpack.collect.handover import weight_terms
from kfoc_backpack.enums import Route
from kfoc_backpack.solver import (
    ROUTE_TABLE,
    FactoredTerms,
    LayerSizes,
    OuterTerms,
    SampleTerms,
    SolverOptions,
    factored,
)
from kfoc_backpack.solver.correction import basis_diagonal, eigenbases
from kfoc_backpack.solver.factored import DIAGONAL_ROUTES, choose_diagonal_route

TOL = {torch.float64: 1e-8, torch.float32: 2e-4}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _outer(k, j, m, n, dtype, seed=0):
    gen = _gen(seed)
    sqrt_out = torch.randn(k, j, m, generator=gen, dtype=torch.float64)
    inputs = torch.randn(k, n, generator=gen, dtype=torch.float64)
    samples = torch.einsum("kjm,kn->kjmn", sqrt_out, inputs).flatten(end_dim=1)
    return OuterTerms(sqrt_out.to(dtype), inputs.to(dtype)), samples


def _samples(k, m, n, dtype, seed=0):
    samples = torch.randn(k, m, n, generator=_gen(seed), dtype=torch.float64)
    return SampleTerms(samples.to(dtype)), samples


def _factored(j, k, t, m, n, dtype, seed=0):
    gen = _gen(seed)
    grads = torch.randn(j, k, t, m, generator=gen, dtype=torch.float64)
    inputs = torch.randn(k, t, n, generator=gen, dtype=torch.float64)
    samples = torch.einsum("jktm,ktn->jkmn", grads, inputs).flatten(end_dim=1)
    return FactoredTerms(grads.to(dtype), inputs.to(dtype)), samples


CASES = {
    "outer": lambda dtype: _outer(7, 3, 5, 4, dtype),
    "outer-one-sample": lambda dtype: _outer(1, 1, 3, 6, dtype),
    "samples": lambda dtype: _samples(6, 4, 7, dtype),
    "factored": lambda dtype: _factored(2, 5, 3, 6, 4, dtype),
    "factored-one-position": lambda dtype: _factored(3, 4, 1, 5, 3, dtype),
}


def _dense_diagonal(samples, left_basis, right_basis):
    dense = sum_of_outer(samples)
    basis = torch.kron(left_basis.double(), right_basis.double())
    m, n = left_basis.shape[0], right_basis.shape[0]
    return torch.diagonal(basis.T @ dense @ basis).reshape(m, n), dense


def _check(terms, samples, left, right, dtype):
    corrected = EigenCorrected.of_terms(terms, left, right)
    s_dense, dense = _dense_diagonal(samples, corrected.left_basis, corrected.right_basis)
    scale = s_dense.abs().max()
    assert corrected.diagonal.dtype == dtype
    assert torch.allclose(corrected.diagonal.double(), s_dense, rtol=0, atol=TOL[dtype] * scale)
    trace = torch.trace(dense)
    assert corrected.trace().double().item() == pytest.approx(trace.item(), rel=TOL[dtype])
    # the Frobenius projection onto matrices with this eigenbasis: never worse than L ⊗ R
    error_corrected = torch.linalg.norm(dense - corrected.dense().double())
    error_kron = torch.linalg.norm(dense - torch.kron(left.double(), right.double()))
    assert error_corrected <= error_kron + TOL[dtype] * torch.linalg.norm(dense)
    return corrected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_diagonal_in_the_kfoc_basis_is_the_dense_blocks(case, dtype):
    terms, samples = CASES[case](dtype)
    factors = terms.solve(SolverOptions(tol=1e-10, max_iter=500))
    _check(terms, samples, factors.left, factors.right, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_diagonal_in_the_kfac_basis_is_the_dense_blocks(case):
    terms, samples = CASES[case](torch.float64)
    m, n = samples.shape[1:]
    # K-FAC's factors of a weight: output-side and input-side second moments
    if isinstance(terms, OuterTerms):
        flat = terms.sqrt_out.flatten(end_dim=1)
        left, right = flat.T @ flat, terms.inputs.T @ terms.inputs
    elif isinstance(terms, FactoredTerms):
        flat_g, flat_a = terms.grads.reshape(-1, m), terms.inputs.reshape(-1, n)
        left, right = flat_g.T @ flat_g, flat_a.T @ flat_a
    else:  # general per-sample matrices: any symmetric factors
        rows, cols = samples.mT.reshape(-1, m), samples.reshape(-1, n)
        left, right = rows.T @ rows, cols.T @ cols
    _check(terms, samples, left, right, torch.float64)


@pytest.mark.parametrize("route", [route.route for route in ROUTE_TABLE])
def test_every_route_gives_the_same_diagonal(route):
    gen = _gen(3)
    positions = 1 if route == Route.RANK_ONE else 5
    inputs = torch.randn(4, positions, 6, generator=gen, dtype=torch.float64)
    vectors = torch.randn(2, 4, positions, 3, generator=gen, dtype=torch.float64)
    layer = weight_terms(inputs, vectors, route=route)
    assert layer.terms.route == route
    samples = torch.einsum("jktm,ktn->jkmn", vectors, inputs).flatten(end_dim=1)
    factors = layer.solve(SolverOptions(tol=1e-10, max_iter=500))
    _check(layer.terms, samples, factors.left, factors.right, torch.float64)


@pytest.mark.parametrize("diagonal_route", DIAGONAL_ROUTES)
@pytest.mark.parametrize("shape", [(1, 3, 7, 4, 5), (3, 2, 1, 6, 2), (2, 5, 4, 3, 8)])
@pytest.mark.parametrize("chunk", [1, None])
def test_both_diagonal_routes_give_the_dense_diagonal(monkeypatch, diagonal_route, shape, chunk):
    """``formed`` and ``pairs`` (forced), a sample at a time or all at once, float32/64."""
    monkeypatch.setattr(factored, "choose_diagonal_route", lambda *_: diagonal_route)
    if chunk is not None:
        monkeypatch.setattr(factored, "DIAGONAL_CHUNK", chunk)
    for dtype in (torch.float64, torch.float32):
        terms, samples = _factored(*shape, dtype, seed=sum(shape))
        dense = samples.square().sum(0)
        torch.testing.assert_close(
            terms.diagonal().double(), dense, rtol=TOL[dtype], atol=TOL[dtype] * dense.max()
        )


@pytest.mark.parametrize("norm_route", ["positions", "formed"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 1), (1, 3, 7, 4, 5), (3, 2, 1, 6, 2), (2, 5, 4, 3, 8)]
)
@pytest.mark.parametrize("chunk", [1, None])
def test_both_norm_routes_give_the_gram_of_the_formed_matrices(
    monkeypatch, norm_route, shape, chunk
):
    """``‖F‖²`` by position Grams or formed rows (forced), float32/64, strided, zeros."""
    other = "formed" if norm_route == "positions" else "positions"
    monkeypatch.setattr(factored, "norm_flops", lambda *_: {norm_route: 0, other: 1})
    if chunk is not None:
        monkeypatch.setattr(factored, "DIAGONAL_CHUNK", chunk)
    for dtype in (torch.float64, torch.float32):
        terms, samples = _factored(*shape, dtype, seed=sum(shape))
        flat = samples.flatten(start_dim=1)
        dense = (flat @ flat.T).square().sum()
        torch.testing.assert_close(terms.norm_sq().double(), dense, rtol=TOL[dtype], atol=0)
        # strided inputs (a transposed copy's view) and a zero column: the same sum
        strided = factored.FactoredTerms(
            terms.grads.mT.contiguous().mT, terms.inputs.mT.contiguous().mT
        )
        zeroed = factored.FactoredTerms(torch.cat([terms.grads, 0 * terms.grads[:1]]), terms.inputs)
        for variant in (strided, zeroed):
            torch.testing.assert_close(variant.norm_sq().double(), dense, rtol=TOL[dtype], atol=0)


def test_the_norm_route_is_the_one_with_fewer_flops():
    # ResNet-18's layer3 at 224 px (14 × 14 positions, exact GGN, batch 8): formed
    flops = factored.norm_flops(LayerSizes(9, 8, 196, 256, 2304))
    assert flops["formed"] < flops["positions"]
    # a few positions (a late layer at 32 px, a Linear on one token): position Grams
    flops = factored.norm_flops(LayerSizes(10, 16, 1, 512, 512))
    assert flops["positions"] < flops["formed"]


def test_the_diagonal_route_is_the_one_with_fewer_flops():
    # few positions, many columns (a 512-channel convolution at 4 × 4, exact GGN): pairs
    assert choose_diagonal_route(LayerSizes(10, 16, 16, 512, 4608)) == "pairs"
    # one position: (Σ_j g²)(a²)ᵀ
    assert choose_diagonal_route(LayerSizes(3, 16, 1, 5, 5)) == "pairs"
    # many positions (convolutions at 8 × 8 and more, tokens of a ViT): formed
    assert choose_diagonal_route(LayerSizes(10, 16, 64, 256, 2304)) == "formed"
    assert choose_diagonal_route(LayerSizes(10, 16, 65, 192, 768)) == "formed"


def test_tied_eigenvalues_zero_terms_and_strided_inputs(monkeypatch):
    terms, samples = _factored(2, 6, 4, 5, 3, torch.float64, seed=1)
    # ties: identity factors (every eigenvalue equal) — S is the block's diagonal itself
    s_identity = basis_diagonal(terms, torch.eye(5).double(), torch.eye(3).double())
    assert torch.allclose(s_identity, terms.diagonal()) and torch.allclose(
        s_identity, samples.square().sum(0)
    )
    _check(terms, samples, torch.eye(5).double(), torch.eye(3).double(), torch.float64)
    # non-contiguous stored tensors, and the diagonal formed a sample at a time
    strided = FactoredTerms(
        terms.grads.transpose(0, 1).contiguous().transpose(0, 1), terms.inputs.mT.contiguous().mT
    )
    assert not strided.grads.is_contiguous() and not strided.inputs.is_contiguous()
    monkeypatch.setattr(factored, "DIAGONAL_CHUNK", 1)
    left, right = torch.randn(5, 5).double(), torch.randn(3, 3).double()
    assert torch.allclose(
        basis_diagonal(strided, *eigenbases(left, right)),
        basis_diagonal(terms, *eigenbases(left, right)),
    )
    # all-zero terms: zero eigenvalues in any basis
    zero = OuterTerms(torch.zeros(3, 2, 4), torch.zeros(3, 5))
    corrected = EigenCorrected.of_terms(zero, torch.eye(4), torch.eye(5))
    assert torch.equal(corrected.diagonal, torch.zeros(4, 5))
    assert torch.equal(corrected.dense(), torch.zeros(20, 20))


def test_non_finite_factors_are_refused():
    terms, _ = _samples(3, 2, 2, torch.float64)
    left = torch.eye(2).double()
    left[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="left factor"):
        EigenCorrected.of_terms(terms, left, torch.eye(2).double())


def test_eigh_failures_fall_back_to_a_shift_then_float64(monkeypatch):
    """Where LAPACK's ``eigh`` fails — raises, or returns NaN — the basis still comes out."""
    terms, samples = _samples(4, 3, 5, torch.float64, seed=2)
    left = torch.einsum("kmn,kpn->mp", samples, samples)
    right = torch.einsum("kmn,kmp->np", samples, samples)
    expected = EigenCorrected.of_terms(terms, left, right)
    eigh, calls = torch.linalg.eigh, []

    def fails_unless(succeeds, silently=False):
        def flaky(matrix, **kwargs):
            calls.append(matrix.dtype)
            if not succeeds(matrix, len(calls)):
                if silently:  # LAPACK's silent failure: NaN eigenvectors
                    values, vectors = eigh(matrix, **kwargs)
                    return values, torch.full_like(vectors, float("nan"))
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return eigh(matrix, **kwargs)

        monkeypatch.setattr(torch.linalg, "eigh", flaky)

    float32 = (SampleTerms(samples.float()), left.float(), right.float())
    for silently in (False, True):
        # float32 fails unshifted: the shifted float32 matrix has the same eigenvectors
        calls.clear()
        fails_unless(lambda _, call: call % 2 == 0, silently)
        corrected = EigenCorrected.of_terms(*float32)
        assert calls == [torch.float32] * 4
        assert corrected.left_basis.dtype == torch.float32
        torch.testing.assert_close(
            corrected.dense().double(), expected.dense(), rtol=1e-4, atol=1e-4
        )
        # float32 fails: solved in float64, returned in float32, the same block
        calls.clear()
        fails_unless(lambda matrix, _: matrix.dtype == torch.float64, silently)
        corrected = EigenCorrected.of_terms(*float32)
        assert calls[:3] == [torch.float32, torch.float32, torch.float64]
        torch.testing.assert_close(
            corrected.dense().double(), expected.dense(), rtol=1e-4, atol=1e-4
        )
    # float64 fails (and is not retried unchanged): shifted
    calls.clear()
    fails_unless(lambda _, call: call % 2 == 0)
    again = EigenCorrected.of_terms(terms, left, right)
    torch.testing.assert_close(again.dense(), expected.dense())
    assert calls == [torch.float64] * 4
    # nothing converges: a clear error naming the factor
    fails_unless(lambda *_: False)
    with pytest.raises(FloatingPointError, match=r"left factor \(3 × 3\) has no eigendecomp"):
        EigenCorrected.of_terms(terms, left, right)


@pytest.mark.parametrize(("curvature", "fisher_type"), [("ggn", "type-2"), ("ef", "empirical")])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_kfac_basis_correction_equals_curvlinops_ekfac(curvature, fisher_type, loss):
    """EK-FAC of an MLP's weights: our correction in K-FAC's basis against curvlinops 3.

    Linear layers on 2-d inputs (one position), where curvlinops' per-example
    eigenvalue correction is the exact one; with shared positions its ``expand``
    approximation treats positions as examples, ours squares the per-sample sums.
    """
    curvlinops = neighbour("curvlinops", "EKFACLinearOperator")
    from torch import nn

    from kfoc_backpack.collect.hooks import TermCollector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(24, 4, dtype=torch.float64)
    if loss == "mse":
        lossfunc, y = nn.MSELoss(reduction="sum"), torch.randn(24, 3, dtype=torch.float64)
    else:
        lossfunc, y = nn.CrossEntropyLoss(reduction="sum"), torch.randint(0, 3, (24,))
    params = list(model.parameters())
    ekfac = curvlinops.EKFACLinearOperator(
        model, lossfunc, params, [(X, y)], fisher_type=fisher_type, check_deterministic=False
    )
    dense_ekfac = ekfac @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    batch = TermCollector(model, lossfunc, curvature=curvature, with_kfac=True)(X, y)
    offset = 0
    for name, param in model.named_parameters():
        size = param.numel()
        if name.endswith("weight"):
            layer = batch.weights[name]
            ours = EigenCorrected.of_terms(layer.terms, *layer.kfac).dense()
            theirs = dense_ekfac[offset : offset + size, offset : offset + size]
            assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max()), name
        offset += size


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_data_set_pass_sums_each_batchs_diagonal_exactly(reduction):
    """``S`` over a loader (uneven last batch) equals the dense data-set GGN's diagonal."""
    from ground_truth import dense_ggn_block, dense_ggn_sqrt
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from kfoc_backpack.collect.hooks import TermCollector
    from kfoc_backpack.dataset import DataPass
    from kfoc_backpack.dataset.correction import corrected_blocks

    def corrected_eigenvalues(collect, bases, params, loader, reduction="sum"):
        data = DataPass(collect, loader, params, reduction=reduction)
        zero = {n: EigenCorrected(a, b, a.new_zeros(len(a), len(b))) for n, (a, b) in bases.items()}
        return {n: block.diagonal for n, block in corrected_blocks(data, zero).items()}

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    ).double()
    X, y = torch.randn(11, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (11,))
    loader = DataLoader(TensorDataset(X, y), batch_size=4)  # 4, 4, 3
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    gen = _gen(5)
    bases = {}
    for name in ("0.weight", "3.weight"):
        m, n = (3, 18) if name == "0.weight" else (4, 12)
        a, b = (torch.randn(d, d, generator=gen, dtype=torch.float64) for d in (m, n))
        bases[name] = eigenbases(a @ a.T, b @ b.T)
    params = dict(model.named_parameters())
    collect = TermCollector(model, lossfunc)
    S = corrected_eigenvalues(collect, bases, params, loader, reduction=reduction)
    sqrt = dense_ggn_sqrt(model, lossfunc, X, y)  # the data set's summed-loss GGN
    for name, (left, right) in bases.items():
        s_dense, dense = _dense_diagonal(
            sqrt[name].flatten(end_dim=1).flatten(start_dim=1).unflatten(1, (len(left), -1)),
            left,
            right,
        )
        assert torch.allclose(dense, dense_ggn_block(sqrt[name]))
        if reduction == "mean":  # Σ_p n_p S_p / N: batches weighted by their size
            per_batch = [
                corrected_eigenvalues(collect, {name: (left, right)}, params, [(xb, yb)])[name]
                for xb, yb in loader
            ]
            s_dense = sum(len(xb) * s for (xb, _), s in zip(loader, per_batch)) / 11
        assert torch.allclose(S[name], s_dense, rtol=1e-10, atol=1e-12 * s_dense.abs().max())
