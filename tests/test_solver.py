"""Solver tests against a dense SVD of the Van Loan rearrangement."""

import pytest
import torch
from ground_truth import (
    optimal_relative_error,
    relative_error,
    sum_of_kron,
    sum_of_outer,
)

from kfoc_backpack.solver import (
    KroneckerAccumulator,
    OuterTerms,
    SampleTerms,
    SolverOptions,
    kron_error_dense,
    kron_error_outer,
    kron_error_samples,
    merge_kronecker,
    nearest_kronecker_outer,
    nearest_kronecker_samples,
    nearest_kronecker_sum,
    nearest_kronecker_terms,
)
from kfoc_backpack.solver._common import launch_bound

# float64: within 1e-8 of the optimum's relative error; float32 within 1e-4.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}
# a tighter stopping precision for float64 random problems whose spectral gap is small
OPTIONS = {torch.float64: SolverOptions(tol=1e-7, max_iter=2000), torch.float32: None}
SHAPES = [(1, 2, 3), (5, 3, 4), (12, 4, 2), (40, 3, 3)]  # K, M, N (K > M², N² last)


def assert_optimal(dense, result, m, n, dtype):
    assert result.left.shape == (m, m) and result.right.shape == (n, n)
    assert result.left.dtype == dtype and result.right.dtype == dtype
    assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()
    got = relative_error(dense, result.left, result.right)
    best = optimal_relative_error(dense, m, n)
    assert got <= best + TOLERANCE[dtype], (got, best)


def assert_psd(mat, dtype):
    evals = torch.linalg.eigvalsh(mat.double())
    assert evals.min() >= -TOLERANCE[dtype] * max(evals.abs().max().item(), 1.0)
    torch.testing.assert_close(mat, mat.T)


def assert_balanced(result):
    norm_l = torch.linalg.matrix_norm(result.left.double())
    norm_r = torch.linalg.matrix_norm(result.right.double())
    torch.testing.assert_close(norm_l, norm_r, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_samples_random(shape, dtype, device):
    k, m, n = shape
    gen = torch.Generator().manual_seed(sum(shape))
    samples = torch.randn(k, m, n, generator=gen, dtype=dtype).to(device)
    result = nearest_kronecker_samples(samples, options=OPTIONS[dtype])
    dense = sum_of_outer(samples.double()).cpu()
    assert result.left.device == samples.device
    assert_optimal(
        dense, result._replace(left=result.left.cpu(), right=result.right.cpu()), m, n, dtype
    )
    assert_psd(result.left.cpu(), dtype)
    assert_psd(result.right.cpu(), dtype)
    assert_balanced(result)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_samples_operator_route_is_optimal(shape, dtype, monkeypatch):
    """The accelerator route of Algorithm 2 (squaring the M²×M² matrix of the left map)
    is taken for these shapes and reaches the dense optimum, with the same split."""
    from kfoc_backpack.solver import samples as kronecker
    from kfoc_backpack.solver._common import accelerator_routes

    calls = []
    original = kronecker._samples_operator_solve
    monkeypatch.setattr(
        kronecker, "_samples_operator_solve", lambda *a: calls.append(1) or original(*a)
    )
    k, m, n = shape
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    samples = torch.randn(k, m, n, generator=gen, dtype=dtype)
    with accelerator_routes(True):
        result = nearest_kronecker_samples(samples, options=OPTIONS[dtype], right_trace=2.0)
    assert calls, "operator route not taken"
    assert_optimal(sum_of_outer(samples.double()), result, m, n, dtype)
    assert_psd(result.left, dtype)
    assert_psd(result.right, dtype)
    torch.testing.assert_close(torch.trace(result.right).double(), torch.tensor(2.0).double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["gram", "power", "auto"])
@pytest.mark.parametrize("cols", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_outer_random(shape, cols, method, dtype, device):
    k, m, n = shape
    gen = torch.Generator().manual_seed(7 * sum(shape) + cols)
    sqrt_out = torch.randn(k, cols, m, generator=gen, dtype=dtype).to(device)
    inputs = torch.randn(k, n, generator=gen, dtype=dtype).to(device)
    result = nearest_kronecker_outer(sqrt_out, inputs, options=OPTIONS[dtype], method=method)
    samples = torch.einsum("kjp,kq->kjpq", sqrt_out, inputs).reshape(-1, m, n)
    dense = sum_of_outer(samples.double()).cpu()
    result = result._replace(left=result.left.cpu(), right=result.right.cpu())
    assert_optimal(dense, result, m, n, dtype)
    assert_psd(result.left, dtype)
    assert_psd(result.right, dtype)


@pytest.mark.parametrize("cap", [1 << 24, 50])
def test_outer_gram_routes_agree(routes, cap, monkeypatch):
    """Every Gram route (explicit blocks, pairs, all pairs at once or in row blocks)
    gives the Gram matrix and the traces of the dense terms ``S_kᵀS_k``."""
    from kfoc_backpack.solver import outer as kronecker

    monkeypatch.setattr(kronecker, "_EXPLICIT_GRAM_MAX_ELEMENTS", cap)
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(6, 10, 2, generator=gen, dtype=torch.float64)  # explicit route
    large = torch.randn(7, 2, 30, generator=gen, dtype=torch.float64)  # pairwise route
    single = torch.randn(5, 1, 4, generator=gen, dtype=torch.float64)  # one column
    for sqrt_out in (small, large, single):
        blocks = torch.einsum("kjp,kjq->kpq", sqrt_out, sqrt_out)
        gram, traces = kronecker._outer_grams(sqrt_out)
        torch.testing.assert_close(gram, blocks.flatten(1) @ blocks.flatten(1).T)
        torch.testing.assert_close(traces, blocks.diagonal(dim1=1, dim2=2).sum(1))
        torch.testing.assert_close(kronecker.outer_gram_left(sqrt_out), gram)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["gram", "power"])
@pytest.mark.parametrize("kind", ["psd", "symmetric", "general"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sum_random(shape, kind, method, dtype, routes):
    k, m, n = shape
    gen = torch.Generator().manual_seed(11 * sum(shape) + len(kind))
    left = torch.randn(k, m, m, generator=gen, dtype=dtype)
    right = torch.randn(k, n, n, generator=gen, dtype=dtype)
    if kind == "psd":
        left, right = left @ left.mT, right @ right.mT
    elif kind == "symmetric":
        left, right = left + left.mT, right + right.mT
    result = nearest_kronecker_sum(left, right, method=method, options=OPTIONS[dtype])
    assert_optimal(sum_of_kron(left.double(), right.double()), result, m, n, dtype)
    if kind == "psd":
        assert_psd(result.left, dtype)
        assert_psd(result.right, dtype)


@pytest.mark.parametrize("method", ["closed_form", "gram", "power"])
@pytest.mark.parametrize(
    ("left_scale", "right_scale"),
    [(2.0**-58, 2.0**8), (2.0**-100, 1.0), (2.0**-70, 2.0**-70), (2.0**60, 2.0**-10)],
)
def test_sum_of_terms_far_apart_in_scale_in_float32(left_scale, right_scale, method):
    """One term far from the others (a confidently classified sample's ``L_k ≈ 1e-17``
    beside ``R_k ≈ 240``, as the paper's running K-FOC of LeNet-5 met at batch size 1;
    a term at ``2⁻²⁰⁰`` or ``2⁻¹⁴⁰`` relative; a huge one): optimal in float32, with
    no overflow in the closed form and no endless rescaling (both raised before)."""
    gen = torch.Generator().manual_seed(41)
    num = 2 if method == "closed_form" else 5
    left = torch.randn(num, 3, 3, generator=gen, dtype=torch.float64)
    right = torch.randn(num, 4, 4, generator=gen, dtype=torch.float64)
    left, right = left @ left.mT, right @ right.mT
    left[1] *= left_scale
    right[1] *= right_scale
    result = nearest_kronecker_sum(left.float(), right.float(), method=method)
    exact = sum_of_kron(left.float().double(), right.float().double())
    assert_optimal(exact, result, 3, 4, torch.float32)


def test_running_sum_takes_a_sample_far_below_the_others():
    """``KroneckerAccumulator("running")`` over per-sample factors where one sample's
    left factor is ``2⁻⁵⁸`` of the others': the float64 accumulation's factors."""
    gen = torch.Generator().manual_seed(42)
    found, exact = KroneckerAccumulator("running"), KroneckerAccumulator("running")
    for k in range(6):
        left = torch.randn(3, 3, generator=gen, dtype=torch.float64)
        right = torch.randn(4, 4, generator=gen, dtype=torch.float64)
        left, right = left @ left.T, right @ right.T
        if k == 2:
            left, right = left * 2.0**-58, right * 2.0**8
        found.update(left.float(), right.float(), 1.0)
        exact.update(left.float().double(), right.float().double(), 1.0)
    got, want = found.factors(), exact.factors()
    product = torch.kron(*(f.double() for f in got))
    expected = torch.kron(*want)
    assert float((product - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sum_weighted_and_closed_form(dtype, routes):
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2):
        left = torch.randn(k, 3, 3, generator=gen, dtype=dtype)
        right = torch.randn(k, 4, 4, generator=gen, dtype=dtype)
        weights = torch.rand(k, generator=gen, dtype=dtype) + 0.5
        result = nearest_kronecker_sum(left, right, weights)
        assert result.iterations == 0 and result.converged
        dense = sum_of_kron(left.double() * weights.double()[:, None, None], right.double())
        assert_optimal(dense, result, 3, 4, dtype)


def test_merge_is_exact_two_term_optimum():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    d = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    a, b, c, d = a @ a.T, b @ b.T, c @ c.T, d @ d.T
    merged = merge_kronecker(a, b, c, d, 0.3, 0.7)
    dense = 0.3 * torch.kron(a, b) + 0.7 * torch.kron(c, d)
    got = relative_error(dense, merged.left, merged.right)
    assert abs(got - optimal_relative_error(dense, 4, 3)) < 1e-12


# ---------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_zero_input_gives_zero_factors(dtype, routes):
    zeros = torch.zeros(4, 3, 5, dtype=dtype)
    for result in (
        nearest_kronecker_samples(zeros),
        nearest_kronecker_outer(torch.zeros(4, 2, 3, dtype=dtype), torch.zeros(4, 5, dtype=dtype)),
        nearest_kronecker_outer(torch.randn(4, 2, 3).to(dtype), torch.zeros(4, 5, dtype=dtype)),
        nearest_kronecker_sum(torch.zeros(4, 3, 3, dtype=dtype), torch.zeros(4, 5, 5, dtype=dtype)),
        nearest_kronecker_sum(torch.zeros(2, 3, 3, dtype=dtype), torch.ones(2, 5, 5, dtype=dtype)),
    ):
        assert result.left.dtype == dtype
        assert not result.left.any() and not result.right.any()
        assert result.converged


def test_zero_terms_among_nonzero_and_empty(routes):
    gen = torch.Generator().manual_seed(5)
    samples = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    samples[::2] = 0
    result = nearest_kronecker_samples(samples)
    assert_optimal(sum_of_outer(samples), result, 3, 4, torch.float64)
    empty = nearest_kronecker_samples(torch.zeros(0, 3, 4))
    assert empty.left.shape == (3, 3) and not empty.left.any()


def test_rank_deficient_terms(routes):
    gen = torch.Generator().manual_seed(6)
    u = torch.randn(8, 4, 1, generator=gen, dtype=torch.float64)
    v = torch.randn(8, 1, 5, generator=gen, dtype=torch.float64)
    samples = u @ v  # rank one, through the general route
    result = nearest_kronecker_samples(samples, options=OPTIONS[torch.float64])
    assert_optimal(sum_of_outer(samples), result, 4, 5, torch.float64)
    same = (u[:1] @ v[:1]).expand(5, 4, 5)  # identical rank-one terms: F is Kronecker
    result = nearest_kronecker_samples(same)
    assert relative_error(sum_of_outer(same), result.left, result.right) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tied_singular_values_give_optimal_psd_product(dtype, routes):
    """σ₁ = σ₂: any product from the tied pair is optimal; ours must be, and PSD."""
    eye = torch.eye(3, dtype=dtype)
    samples = torch.stack([torch.outer(eye[0], eye[0]), torch.outer(eye[1], eye[1])])
    dense = sum_of_outer(samples.double())
    sv = torch.linalg.svdvals(dense.reshape(3, 3, 3, 3).permute(0, 2, 1, 3).reshape(9, 9))
    assert torch.isclose(sv[0], sv[1])
    diag = torch.stack([torch.diag(eye[0]), torch.diag(eye[1])])
    for result in (
        nearest_kronecker_samples(samples),
        nearest_kronecker_outer(eye[:2, None, :], eye[:2]),
        nearest_kronecker_sum(diag, diag),  # closed form
        nearest_kronecker_sum(diag, diag, method="gram"),
        nearest_kronecker_sum(diag, diag, method="power"),
    ):
        assert_optimal(dense, result, 3, 3, dtype)
        assert_psd(result.left, dtype)
        assert_psd(result.right, dtype)


def test_ties_in_sum_of_kron(routes):
    eye = torch.eye(3, dtype=torch.float64)
    diag = torch.stack([torch.diag(eye[i]) for i in range(3)])
    for k in (2, 3):
        result = nearest_kronecker_sum(diag[:k], diag[:k])
        assert_optimal(sum_of_kron(diag[:k], diag[:k]), result, 3, 3, torch.float64)
        assert_psd(result.left, torch.float64)


def test_k_equals_one_is_exact(routes):
    gen = torch.Generator().manual_seed(8)
    sample = torch.randn(1, 3, 4, generator=gen, dtype=torch.float64)
    result = nearest_kronecker_samples(sample)  # vec(X)vec(X)ᵀ is Kronecker iff rank X = 1
    assert_optimal(sum_of_outer(sample), result, 3, 4, torch.float64)
    rank_one = sample[:, :, :1] @ sample[:, :1, :]
    result = nearest_kronecker_samples(rank_one)
    assert relative_error(sum_of_outer(rank_one), result.left, result.right) < 1e-10
    s, a = torch.randn(1, 1, 3, generator=gen, dtype=torch.float64), torch.randn(1, 4).double()
    result = nearest_kronecker_outer(s, a)
    dense = torch.kron(s[0].T @ s[0], a.T @ a)
    assert relative_error(dense, result.left, result.right) < 1e-12


def test_non_contiguous_inputs(routes):
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)
    samples = base.transpose(1, 2)[:, ::2, :]  # [5, 3, 4], not contiguous
    assert not samples.is_contiguous()
    result = nearest_kronecker_samples(samples, options=OPTIONS[torch.float64])
    assert_optimal(sum_of_outer(samples.contiguous()), result, 3, 4, torch.float64)
    sqrt_out = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64).transpose(0, 1)
    inputs = torch.randn(4, 6, generator=gen, dtype=torch.float64).T
    result = nearest_kronecker_outer(sqrt_out, inputs, options=OPTIONS[torch.float64])
    samples = torch.einsum("kjp,kq->kjpq", sqrt_out, inputs).reshape(-1, 5, 4)
    assert_optimal(sum_of_outer(samples), result, 5, 4, torch.float64)
    left = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64)[:, :, :3].mT
    right = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64).mT
    result = nearest_kronecker_sum(left, right)
    assert_optimal(sum_of_kron(left, right), result, 3, 2, torch.float64)


def test_nan_input_raises(routes):
    samples = torch.randn(3, 2, 2)
    samples[1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        nearest_kronecker_samples(samples, options=SolverOptions(max_iter=3))
    with pytest.raises(FloatingPointError, match="NaN"):
        nearest_kronecker_outer(
            samples[:, :1, :], torch.randn(3, 2), options=SolverOptions(max_iter=3)
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="tol"):
        SolverOptions(tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        SolverOptions(max_iter=0)
    with pytest.raises(ValueError, match="samples"):
        nearest_kronecker_samples(torch.randn(3, 4))
    with pytest.raises(ValueError, match="same number"):
        nearest_kronecker_sum(torch.randn(3, 2, 2), torch.randn(2, 2, 2))
    with pytest.raises(ValueError, match="method"):
        nearest_kronecker_sum(torch.randn(3, 2, 2), torch.randn(3, 2, 2), method="svd")
    with pytest.raises(TypeError, match="floating"):
        nearest_kronecker_samples(torch.ones(2, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="aggregation"):
        KroneckerAccumulator("mean")


# ------------------------------------------------------------------ options and warm starts


def test_warm_start_and_generator_reproducible(routes):
    gen = torch.Generator().manual_seed(10)
    samples = torch.randn(20, 4, 5, generator=gen, dtype=torch.float64)
    cold = nearest_kronecker_samples(samples, options=SolverOptions(tol=1e-10, max_iter=500))
    warm = nearest_kronecker_samples(
        samples, options=SolverOptions(tol=1e-10, max_iter=500), init=cold.left
    )
    if routes == "accelerator-routes":  # squaring: the first test comes after 33 steps
        assert warm.iterations <= cold.iterations
    else:
        assert warm.iterations < cold.iterations
    torch.testing.assert_close(warm.left, cold.left)
    opts = [
        SolverOptions(random_init=True, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    first = nearest_kronecker_samples(samples, options=opts[0])
    second = nearest_kronecker_samples(samples, options=opts[1])
    torch.testing.assert_close(first.left, second.left, rtol=0, atol=0)
    torch.testing.assert_close(first.left, cold.left, rtol=1e-4, atol=1e-6)
    s, a = torch.randn(20, 2, 4, generator=gen).double(), torch.randn(20, 5, generator=gen).double()
    cold = nearest_kronecker_outer(s, a, options=SolverOptions(tol=1e-12, max_iter=1000))
    warm = nearest_kronecker_outer(
        s, a, options=SolverOptions(tol=1e-12, max_iter=1000), init=cold.left
    )
    assert warm.iterations <= cold.iterations
    torch.testing.assert_close(warm.left, cold.left)


def test_max_iter_reported_as_not_converged(routes):
    gen = torch.Generator().manual_seed(12)
    samples = torch.randn(30, 5, 5, generator=gen, dtype=torch.float64)
    plain = SolverOptions(tol=1e-14, max_iter=2, exact_max_terms=0)
    result = nearest_kronecker_samples(samples, options=plain)
    assert result.iterations == 2 and not result.converged


# --------------------------------------------------------------------- errors and terms


def test_structured_errors_match_dense():
    gen = torch.Generator().manual_seed(13)
    samples = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    left = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    right = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    dense = sum_of_outer(samples)
    torch.testing.assert_close(
        kron_error_samples(samples, left, right), kron_error_dense(dense, left, right)
    )
    s, a = torch.randn(7, 2, 3, generator=gen).double(), torch.randn(7, 4, generator=gen).double()
    dense = sum_of_outer(torch.einsum("kjp,kq->kjpq", s, a).reshape(-1, 3, 4))
    torch.testing.assert_close(
        kron_error_outer(s, a, left, right), kron_error_dense(dense, left, right)
    )


def test_terms_objects_consistent():
    gen = torch.Generator().manual_seed(14)
    s, a = torch.randn(6, 2, 3, generator=gen).double(), torch.randn(6, 4, generator=gen).double()
    outer = OuterTerms(s, a)
    samples = SampleTerms(torch.einsum("kjp,kq->kjpq", s, a).reshape(-1, 3, 4))
    left = torch.randn(3, 3, generator=gen).double()
    right = torch.randn(4, 4, generator=gen).double()
    torch.testing.assert_close(outer.dense(), samples.dense())
    torch.testing.assert_close(outer.to_right(left), samples.to_right(left))
    torch.testing.assert_close(outer.to_left(right), samples.to_left(right))
    torch.testing.assert_close(outer.norm_sq(), samples.norm_sq())
    torch.testing.assert_close(outer.diagonal(), samples.diagonal())
    torch.testing.assert_close(outer.diagonal().flatten(), torch.diagonal(outer.dense()))
    torch.testing.assert_close(outer.error(left, right), samples.error(left, right))


def test_multi_block_optimum_and_aggregation(routes):
    gen = torch.Generator().manual_seed(15)
    sizes = (5, 5, 2)  # uneven last batch
    blocks = [
        OuterTerms(
            torch.randn(n, 1, 3, generator=gen).double(), torch.randn(n, 4, generator=gen).double()
        )
        for n in sizes
    ]
    weights = [n / sum(sizes) for n in sizes]
    dense = sum(w * b.dense() for w, b in zip(weights, blocks, strict=True))
    best = optimal_relative_error(dense, 3, 4)
    opt = nearest_kronecker_terms(blocks, weights, options=SolverOptions(tol=1e-9, max_iter=500))
    assert relative_error(dense, opt.left, opt.right) <= best + 1e-8
    errors = {}
    for agg in ("approx", "running"):
        acc = KroneckerAccumulator(agg)
        for block, n in zip(blocks, sizes, strict=True):
            res = block.solve()
            acc.update(res.left, res.right, n)
        left, right = acc.factors(normalize=True)
        errors[agg] = relative_error(dense, left, right)
        assert errors[agg] >= best - 1e-10
    # one block covering everything: all aggregations give the optimum
    single = OuterTerms(
        torch.cat([b.sqrt_out for b in blocks]), torch.cat([b.inputs for b in blocks])
    )
    res = single.solve()
    for agg in ("approx", "running"):
        acc = KroneckerAccumulator(agg)
        acc.update(res.left, res.right, 12)
        left, right = acc.factors(normalize=True)
        dense1 = single.dense()
        assert relative_error(dense1, left, right) <= optimal_relative_error(dense1, 3, 4) + 1e-8


def test_running_keeps_kfac_scale_split(routes):
    gen = torch.Generator().manual_seed(16)
    acc = KroneckerAccumulator("running")
    traces = []
    for n in (3, 4):
        s, a = (
            torch.randn(n, 1, 3, generator=gen).double(),
            torch.randn(n, 4, generator=gen).double(),
        )
        res = nearest_kronecker_outer(s, a)
        acc.update(res.left, res.right, n)
        traces.append(torch.trace(res.right) * n)
    left, right = acc.factors()
    torch.testing.assert_close(torch.trace(right), sum(traces) / 7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_squaring_route_matches_stepwise(dtype):
    """The accelerator route (repeated squaring) reaches the same optimum."""
    from kfoc_backpack.solver.gram import (
        coefficient_power_iteration,
        coefficient_squaring_iteration,
    )
    from kfoc_backpack.solver.outer import outer_gram_left

    gen = torch.Generator().manual_seed(17)
    sqrt_out = torch.randn(30, 2, 4, generator=gen, dtype=dtype)
    inputs = torch.randn(30, 5, generator=gen, dtype=dtype) * 1e3  # large scales
    gram_left = outer_gram_left(sqrt_out)
    gram_right = (inputs @ inputs.T).square()
    ones = torch.ones(30, dtype=dtype)
    step = coefficient_power_iteration(gram_left, gram_right, ones, 1e-7, 5000)
    square = coefficient_squaring_iteration(gram_left, gram_right, ones, 1e-7, 5000)
    assert square[3] and step[3]
    assert (square[0] >= 0).all()
    flat = sqrt_out.flatten(end_dim=1)
    for alpha in (step[0], square[0]):
        assert torch.isfinite(alpha).all()
    lefts = [(flat * a.repeat_interleave(2)[:, None]).T @ flat for a in (step[0], square[0])]
    torch.testing.assert_close(lefts[0], lefts[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_iter", [1, 2, 3, 33, 34, 64, 65, 66, 100])
def test_squaring_respects_max_iter_and_retries(max_iter):
    """A slow problem: the squaring route tests after 2ˢ+1 steps, squares again while the
    step count fits ``max_iter``, finishes with ordinary steps, and never overshoots."""
    from kfoc_backpack.solver.gram import (
        coefficient_power_iteration,
        coefficient_squaring_iteration,
    )

    # M = G_R G_L = diag(1, 0.97, 0.5): ratio 0.97, about 500 steps to 1e-7
    gram_left = torch.diag(torch.tensor([1.0, 0.97, 0.5], dtype=torch.float64))
    gram_right = torch.eye(3, dtype=torch.float64)
    init = torch.ones(3, dtype=torch.float64)
    alpha, beta, iters, converged, values = coefficient_squaring_iteration(
        gram_left, gram_right, init, 1e-7, max_iter, scalars=lambda a, b: [a @ b]
    )
    assert iters == max_iter and not converged
    step = coefficient_power_iteration(gram_left, gram_right, init, 1e-7, iters)
    torch.testing.assert_close(alpha, step[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(values[0], 1.0)  # ‖L‖² of the returned pair


def test_squaring_retry_converges_like_stepping():
    from kfoc_backpack.solver.gram import (
        coefficient_power_iteration,
        coefficient_squaring_iteration,
    )

    gram_left = torch.diag(torch.tensor([1.0, 0.9, 0.5], dtype=torch.float64))
    gram_right = torch.eye(3, dtype=torch.float64)
    init = torch.ones(3, dtype=torch.float64)
    square = coefficient_squaring_iteration(gram_left, gram_right, init, 1e-9, 1000)
    step = coefficient_power_iteration(gram_left, gram_right, init, 1e-12, 1000)
    # ratio 0.9: ~200 steps to 1e-9; tests after 33, 65, 129 and 257 steps
    assert square[3] and square[2] == 2**8 + 1
    torch.testing.assert_close(square[0], step[0], rtol=0, atol=1e-8)


def test_outer_solve_fetches_from_the_device_once(routes):
    """The Gram route of ``Linear`` layers reads the device once for the terms' scale
    (:func:`~kfoc_backpack.solver.rescale.needed_exponents`) and once per stopping test
    (the test and the scale split share the transfer); the first test usually suffices."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountTransfers(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.stack):
                self.count += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(5)
    sqrt_out = torch.randn(64, 1, 10, generator=gen)
    inputs = torch.randn(64, 20, generator=gen) + 1.0
    with CountTransfers() as counter:
        result = nearest_kronecker_outer(sqrt_out, inputs, method="gram")
    assert result.converged and result.iterations == 33
    assert counter.count == 2


@pytest.mark.parametrize("max_iter", [1, 2, 40, 500])
def test_squaring_with_identity_metric_finds_top_eigenvector(max_iter):
    """``gram_left=None``: the power method for the top eigenvector of a PSD matrix."""
    from kfoc_backpack.solver.gram import coefficient_squaring_iteration

    gen = torch.Generator().manual_seed(21)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    evals = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    mat = basis @ torch.diag(evals) @ basis.T
    alpha, beta, iters, converged, values = coefficient_squaring_iteration(
        None, mat, None, 1e-10, max_iter, scalars=lambda a, b: [a @ (mat @ a)]
    )
    assert iters <= max_iter and torch.equal(alpha, beta)
    torch.testing.assert_close(alpha.norm(), torch.tensor(1.0, dtype=torch.float64))
    if max_iter >= 100:  # ratio 2/3: ~60 steps to 1e-10, Rayleigh quotient = top eigenvalue
        assert converged
        torch.testing.assert_close(values[0], 3.0)
        torch.testing.assert_close(alpha.abs(), basis[:, 0].abs())


# ------------------------------------------------------------ exact coefficient solve


def _terms(num, left_dim, right_dim, gen, dtype=torch.float64):
    """Rows ``u_k``, ``v_k`` of ``A = Σ_k u_k v_kᵀ`` and the two Gram matrices."""
    u = torch.randn(num, left_dim, generator=gen, dtype=dtype)
    v = torch.randn(num, right_dim, generator=gen, dtype=dtype)
    return u, v, u @ u.T, v @ v.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num", [1, 5, 40])
def test_exact_coefficients_give_the_dense_top_singular_pair(num, dtype):
    """``L = Σ α_k u_k`` and ``R = Σ β_k v_k`` against the SVD of ``A = Σ_k u_k v_kᵀ``."""
    from kfoc_backpack.solver.gram import exact_coefficients

    gen = torch.Generator().manual_seed(num)
    u, v, gram_u, gram_v = _terms(num, 7, 6, gen, dtype)
    for init in (None, torch.rand(num, generator=gen, dtype=dtype)):
        alpha, beta = exact_coefficients(gram_u, gram_v, init)
        assert alpha.dtype == dtype and beta.dtype == dtype
        left_svec, svals, right_svecT = torch.linalg.svd((u.T @ v).double())
        left, right = (alpha @ u).double(), (beta @ v).double()
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(left.norm().item(), 1.0, rtol=tol, atol=0)
        sign = torch.sign(left @ left_svec[:, 0])
        torch.testing.assert_close(sign * left, left_svec[:, 0], rtol=0, atol=tol)
        top_right = svals[0] * right_svecT[0]
        torch.testing.assert_close(sign * right, top_right, rtol=0, atol=tol * svals[0])


def test_exact_coefficients_identity_metric_is_top_eigenvector():
    from kfoc_backpack.solver.gram import exact_coefficients

    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    mat = basis @ torch.diag(torch.tensor([3.0, 2.9, 1.0, 0.5, 0.0, 0.0]).double()) @ basis.T
    alpha, beta = exact_coefficients(None, mat, None)
    assert torch.equal(alpha, beta)
    torch.testing.assert_close(alpha.abs(), basis[:, 0].abs(), rtol=0, atol=1e-12)


def test_exact_coefficients_ties_orthogonal_start_zero_and_nan():
    """Tied top: the power method's limit (non-negative); orthogonal start: the top."""
    from kfoc_backpack.solver.gram import coefficient_power_iteration, exact_coefficients

    eye = torch.eye(3, dtype=torch.float64)
    for second in (1.0, 1.0 - 1e-9):  # exact tie and a tie below TIE_RTOL
        gram_left = torch.diag(torch.tensor([1.0, second, 0.5], dtype=torch.float64))
        alpha, beta = exact_coefficients(gram_left, eye, None)
        # the first step G_L·1 projected onto the cluster, normalised in the G_L metric
        expected = torch.tensor([1.0, second, 0.0], dtype=torch.float64) / (1 + second**3) ** 0.5
        torch.testing.assert_close(alpha, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(beta, gram_left @ expected, rtol=0, atol=1e-12)
        if second == 1.0:  # where stepping settles
            limit = coefficient_power_iteration(gram_left, eye, None, 1e-14, 5000)[0]
            torch.testing.assert_close(alpha, limit, rtol=0, atol=1e-12)
    gram_left = torch.diag(torch.tensor([1.0, 0.9, 0.5], dtype=torch.float64))
    alpha, _ = exact_coefficients(gram_left, eye, torch.tensor([0.0, 0.0, 1.0]).double())
    torch.testing.assert_close(alpha.abs(), eye[0])  # stepping would stay at e₃
    zeros = exact_coefficients(torch.zeros(3, 3), torch.zeros(3, 3), None)
    assert all(torch.equal(z, torch.zeros(3)) for z in zeros)
    assert exact_coefficients(torch.full((3, 3), float("nan")), eye, None) is None


def _slow_outer_problem(num, dtype, gen):
    """``Σ_k (s_k s_kᵀ) ⊗ (a_k a_kᵀ)`` whose top two singular values differ by 0.5 %."""
    half = num // 2
    weights = torch.cat([torch.ones(half), torch.full((num - half,), 0.995**0.5)])
    basis = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(num - half).long()])
    sqrt_out = torch.eye(4)[basis] * weights[:, None] / half**0.5
    sqrt_out = sqrt_out + 1e-3 * torch.rand(num, 4, generator=gen)
    inputs = torch.eye(5)[basis] + 1e-3 * torch.rand(num, 5, generator=gen)
    return sqrt_out[:, None, :].to(dtype), inputs.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num", [40, 200])  # squaring route on the CPU, stepping route
def test_slow_outer_problem_is_finished_exactly(num, dtype, device):
    """Default options: optimal and converged where 100 power steps are far from it.

    The Gram route (``method="gram"``; ``"auto"`` takes the factor route for factors
    this small, which has no exact finish).
    """
    gen = torch.Generator().manual_seed(num)
    sqrt_out, inputs = _slow_outer_problem(num, dtype, gen)
    sqrt_out, inputs = sqrt_out.to(device), inputs.to(device)
    dense = sum_of_outer(
        torch.einsum("kjp,kq->kjpq", sqrt_out.double(), inputs.double()).flatten(end_dim=1)
    )

    def solve(**options):
        return nearest_kronecker_outer(
            sqrt_out, inputs, options=SolverOptions(**options), method="gram"
        )

    plain = solve(exact_max_terms=0)
    assert not plain.converged and plain.iterations == 100
    result = solve()
    stepping = num > 192 and not launch_bound(sqrt_out.device)
    assert result.converged and result.iterations == (100 if stepping else 33)
    assert result.left.device == sqrt_out.device
    left, right = result.left.cpu(), result.right.cpu()
    assert_optimal(dense.cpu(), result._replace(left=left, right=right), 4, 5, dtype)
    assert_psd(left, dtype) and assert_psd(right, dtype)
    best = optimal_relative_error(dense.cpu(), 4, 5)
    plain_error = relative_error(dense.cpu(), plain.left.cpu(), plain.right.cpu())
    assert plain_error > best + 2e-4  # the gap it closes
    assert not solve(exact_max_terms=num - 1).converged


@pytest.mark.parametrize("transposed", [False, True])
def test_float32_scale_of_a_wide_exactly_kronecker_block(transposed):
    """A block that is one Kronecker product with a wide, rank-deficient factor.

    (EfficientNet-B0's depthwise layers on 1 × 1 maps at 32 px: only the centre tap of a
    ``5 × 5`` kernel is not padding, ``F = (Σ x xᵀ) ⊗ e eᵀ`` with ``1152``-wide
    ``x``.) The float32 factors' product must carry the scale to float32's accuracy:
    torch's float32 CPU norm of such a factor is off by up to ``1e-4``, and the product
    scale is ``1/‖L‖²`` (it was ``2e-4`` off before the norms were accumulated in float64).
    """
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(100, 2048, generator=gen)
    samples = torch.zeros(100, 2048, 5)
    samples[:, :, 2] = x
    if transposed:
        samples = samples.transpose(1, 2).contiguous()
    found = nearest_kronecker_samples(samples)
    error = kron_error_samples(samples.double(), found.left.double(), found.right.double())
    assert error < 3e-5


def test_a_layer_solve_tests_its_scale_once_and_sub_problems_again(monkeypatch):
    """``solve_rescaled`` tests the terms' scale; the pure solver it calls on the same
    tensors does not test again, one called on other tensors (a group, a scaled copy)
    does — and solves those optimally however far from unit scale they are."""
    import dataclasses

    from kfoc_backpack.solver import rescale
    from kfoc_backpack.solver.transposed import TransposedTerms

    calls = []
    original = rescale.rescale_exponents
    monkeypatch.setattr(
        rescale, "rescale_exponents", lambda summary: calls.append(summary) or original(summary)
    )
    gen = torch.Generator().manual_seed(3)
    terms = OuterTerms(torch.randn(20, 2, 6, generator=gen), torch.randn(20, 5, generator=gen))
    rescale.solve_rescaled(terms)
    assert len(calls) == 1
    terms.solve()  # a direct call tests
    assert len(calls) == 2
    rescale.solve_rescaled(TransposedTerms(terms))  # wrapped terms: the same tensors
    assert len(calls) == 3

    @dataclasses.dataclass(frozen=True)
    class TinyCopy(OuterTerms):  # its solve works on other tensors: 2⁻⁴⁰ times its own
        def solve(self, options=None, init=None, right_trace=None):
            return nearest_kronecker_outer(self.sqrt_out * 2.0**-40, self.inputs)

    calls.clear()
    found = rescale.solve_rescaled(TinyCopy(terms.sqrt_out, terms.inputs))
    assert len(calls) == 3  # the layer's test, the copy's own, its scaled copy's
    exact = OuterTerms(terms.sqrt_out.double(), terms.inputs.double())
    best = exact.solve(SolverOptions(tol=1e-10, max_iter=500))
    scaled = (found.left.double() * 2.0**80, found.right.double())
    assert exact.error(*scaled) <= exact.error(best.left, best.right) + 1e-5
    assert not rescale._TESTED.get()  # reset after the solve


@pytest.mark.parametrize("scale", [2.0**-40, 2.0**-70, 2.0**40])
@pytest.mark.parametrize("kind", ["samples", "outer", "factored"])
@pytest.mark.parametrize("right_trace", [None, 3.0])
def test_the_pure_solvers_take_blocks_far_from_unit_scale_in_float32(scale, kind, right_trace):
    """Tiny and huge float32 terms: the float64 optimum's error, not zeros or overflow.

    (Squares of the block's squares leave float32's range at ``|X| ≈ 2⁻⁴⁰``; before the
    pure solvers scaled their inputs by powers of two they returned zero factors — an
    error of 1 — or reported a finite input as not finite.)
    """
    from kfoc_backpack.solver import FactoredTerms

    gen = torch.Generator().manual_seed(23)
    s = torch.randn(20, 3, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 20, 4, 6, generator=gen, dtype=torch.float64)
    aa = torch.randn(20, 4, 5, generator=gen, dtype=torch.float64)
    terms = {
        "samples": SampleTerms(torch.einsum("kjp,kq->kjpq", s * scale, a).reshape(-1, 6, 5)),
        "outer": OuterTerms(s * scale, a),
        "factored": FactoredTerms(g * scale, aa),
    }[kind]
    single = type(terms)(
        *[
            t.float()
            for t in (getattr(terms, f) for f in terms.__dataclass_fields__)
            if torch.is_tensor(t)
        ]
    )
    if right_trace is not None and scale < 2.0**-60:  # L alone carries 2⁻²⁸⁰: not float32
        with pytest.raises(FloatingPointError, match="normal range in the requested split"):
            single.solve(right_trace=right_trace)
        return
    found = single.solve(right_trace=right_trace)
    best = terms.solve(SolverOptions(tol=1e-10, max_iter=500))
    assert torch.isfinite(found.left).all() and torch.isfinite(found.right).all()
    error = terms.error(found.left.double(), found.right.double())
    assert error <= terms.error(best.left, best.right) + 1e-4
    if right_trace is not None:
        assert abs(float(found.right.trace()) - right_trace) <= 1e-5 * right_trace
