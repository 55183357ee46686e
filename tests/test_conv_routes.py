"""Every route of a weight shared over positions gives the dense optimum (convolutions).

Layers shaped so that the route choice selects each route (``T < M``, ``T > M``,
``K·T < N``), and each route forced on one small problem; float64 and float32. The
reference is the dense SVD of the rearranged block (``tests/ground_truth.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from ground_truth import optimal_relative_error, relative_error, sum_of_outer
from layouts import conv_terms

from kfoc_backpack.collect import handover, layer_terms
from kfoc_backpack.collect.handover import sum_of_squares
from kfoc_backpack.enums import Route
from kfoc_backpack.solver import ROUTE_TABLE, LayerSizes, SolverOptions, choose_route
from kfoc_backpack.solver.shared import formed as formed_routes
from kfoc_backpack.solver.shared import gram as gram_routes
from kfoc_backpack.solver.shared.table import route_flops
from kfoc_backpack.solver.symmetric import congruence_sum, sym_gram

DTYPES = [torch.float64, torch.float32]
SLACK = {torch.float64: 1e-9, torch.float32: 2e-4}
ROUTES = tuple(route.route for route in ROUTE_TABLE if route.route is not Route.RANK_ONE)
"""The routes over positions (every one but ``rank-one``, which needs a single position)."""


def chosen_route(*shape, **kwargs):
    """The chosen route's name for ``(J, K, T, M, N)``."""
    return choose_route(LayerSizes(*shape), **kwargs).route


def _layer(cols, num, pos, m, n, dtype, seed=0):
    """Random ``unfolded`` ``[K, N, T]`` and ``sqrt`` ``[J, K, M, T]``."""
    gen = torch.Generator().manual_seed(seed)
    unfolded = torch.randn(num, n, pos, generator=gen, dtype=torch.float64).to(dtype)
    sqrt = torch.randn(cols, num, m, pos, generator=gen, dtype=torch.float64).to(dtype)
    return unfolded, sqrt


def _dense(unfolded, sqrt):
    samples = torch.einsum("jkmt,knt->jkmn", sqrt.double(), unfolded.double())
    return sum_of_outer(samples.flatten(end_dim=1))


def _check_optimal(layer_terms, dense, m, n, dtype):
    options = SolverOptions(tol=1e-9 if dtype == torch.float64 else 1e-6, max_iter=500)
    factors = layer_terms.solve(options)
    assert factors.converged
    left, right = factors.left, factors.right
    assert left.dtype == dtype and right.dtype == dtype
    assert left.shape == (m, m) and right.shape == (n, n)
    best = optimal_relative_error(dense, m, n)
    assert relative_error(dense, left, right) <= best + SLACK[dtype]
    # conventions: symmetric, PSD by trace, tr(R) = input trace (K-FAC's split)
    assert torch.equal(right, right.T) or torch.allclose(right, right.T, atol=1e-6)
    assert torch.trace(left) >= 0
    assert torch.trace(right.double()).item() == pytest.approx(
        layer_terms.input_trace.item(), rel=1e-4
    )
    return left, right


# (J, K, T, M, N) chosen so that the route choice takes the named route
SELECTED = {
    "operator": (1, 3, 12, 2, 40),  # T > M, one column: X_a X_bᵀ blocks
    "gram": (2, 2, 3, 5, 700),  # K·T < N (and T < M): position Gram
    "formed": (3, 5, 2, 3, 4),  # tiny layer: fewest operations
    "factored": (2, 40, 6, 30, 6),  # T < M and K·T > N: neither Gram pays
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", list(SELECTED))
def test_selected_route_is_optimal(route, dtype, monkeypatch):
    # the shapes are tiny (dense ground truth): let the flop model choose, as for large layers
    monkeypatch.setattr(formed_routes, "TINY_STEP_FLOPS", 0)
    cols, num, pos, m, n = SELECTED[route]
    assert chosen_route(cols, num, pos, m, n) == route
    unfolded, sqrt = _layer(cols, num, pos, m, n, dtype)
    layer_terms = conv_terms(unfolded, sqrt)
    assert layer_terms.terms.route == route
    _check_optimal(layer_terms, _dense(unfolded, sqrt), m, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 7, 4, 9), (3, 2, 4, 6, 5)])
def test_every_route_forced_on_the_same_problem_agrees(shape, dtype):
    cols, num, pos, m, n = shape
    unfolded, sqrt = _layer(cols, num, pos, m, n, dtype, seed=1)
    dense = _dense(unfolded, sqrt)
    products = {}
    for route in ROUTES:
        layer_terms = conv_terms(unfolded, sqrt, route=route)
        assert layer_terms.terms.route == route
        left, right = _check_optimal(layer_terms, dense, m, n, dtype)
        products[route] = torch.kron(left.double(), right.double())
    ref = products["factored"]
    for route, prod in products.items():
        assert torch.allclose(prod, ref, rtol=0, atol=50 * SLACK[dtype] * ref.abs().max()), route


@pytest.mark.parametrize("route", ROUTES)
def test_half_steps_stream_as_the_factored_ones(route):
    """Data-set fits stream over ``to_right``/``to_left``: every route keeps them."""
    unfolded, sqrt = _layer(2, 3, 4, 5, 6, torch.float64, seed=2)
    ref = conv_terms(unfolded, sqrt, route="factored").terms
    terms = conv_terms(unfolded, sqrt, route=route).terms
    left, right = torch.randn(5, 5, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    assert torch.allclose(terms.to_right(left), ref.to_right(left))
    assert torch.allclose(terms.to_left(right), ref.to_left(right))
    assert terms.shape == (5, 6) and terms.nbytes() > 0
    assert type(terms.detach()) is type(terms)
    assert torch.allclose(terms.norm_sq(), ref.norm_sq())
    assert torch.allclose(terms.diagonal(), ref.diagonal())


def test_chunked_gram_map_matches(monkeypatch):
    monkeypatch.setattr(gram_routes, "GRAM_CHUNK_ELEMENTS", 1)
    unfolded, sqrt = _layer(1, 5, 3, 4, 50, torch.float64, seed=3)
    gram = gram_routes.PositionGram(unfolded.transpose(1, 2))
    assert gram.chunks > 1
    coef = torch.randn(5, 3, 3, dtype=torch.float64)
    inputs = unfolded.transpose(1, 2)
    full = inputs @ inputs.reshape(-1, 50).T  # [k, t, (m, s)]
    blocks = full.view(5, 3, 5, 3).permute(0, 2, 1, 3)  # Q_km
    expected = (blocks @ coef.unsqueeze(0) @ blocks.mT).sum(1)
    assert torch.allclose(gram.apply(coef), expected)
    _check_optimal(
        conv_terms(unfolded, sqrt, route="gram"), _dense(unfolded, sqrt), 4, 50, torch.float64
    )


def test_symmetric_products_are_exact():
    rows = torch.randn(30, 500, dtype=torch.float64)
    out = sym_gram(rows)
    assert torch.equal(out, out.T)
    assert torch.allclose(out, rows.T @ rows)
    coef = torch.randn(3, 4, 4, dtype=torch.float64)
    coef = coef + coef.mT  # indefinite: both signs of eigenvalues
    blocks = torch.randn(3, 4, 7, dtype=torch.float64)
    expected = (blocks.mT @ coef @ blocks).sum(0)
    assert torch.allclose(congruence_sum(coef, blocks), expected)


@pytest.mark.parametrize("failure", ["raises", "nan"])
@pytest.mark.parametrize("shared", [True, False])
def test_symmetric_products_survive_a_failed_eigh(monkeypatch, failure, shared):
    """float32 ``eigh`` of a nearly rank-deficient ``W`` may not converge (or return NaN)."""
    from kfoc_backpack.solver import symmetric

    gen = torch.Generator().manual_seed(0)
    coef = torch.randn(3, 5, 5, generator=gen)
    coef = coef + coef.mT
    coef = coef[0] if shared else coef
    blocks = torch.randn(3, 5, 400, generator=gen)
    expected = (blocks.mT @ coef @ blocks).sum(0)

    def broken(matrix):
        if failure == "raises":
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        values, vectors = torch.linalg.eigh.__wrapped__(matrix)
        return values, torch.full_like(vectors, float("nan"))

    original = torch.linalg.eigh
    broken.__wrapped__ = original
    monkeypatch.setattr(symmetric.torch.linalg, "eigh", broken)
    found = congruence_sum(coef, blocks)
    monkeypatch.setattr(symmetric.torch.linalg, "eigh", original)
    assert torch.equal(found, found.T)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-3)


def test_route_choice_follows_the_flop_model():
    # the layers at batch 16, one column
    assert chosen_route(1, 16, 64, 256, 2304) == "gram"  # K·T = 1024 < N
    assert chosen_route(1, 16, 16, 512, 4608) == "gram"
    assert chosen_route(1, 16, 1024, 64, 576) == "operator"  # M ≪ T
    # tiny layers (LeNet-5's second convolution, ResNet's stem) keep SampleTerms.solve
    assert chosen_route(1, 32, 64, 16, 150) == "formed"
    assert chosen_route(10, 16, 1024, 64, 27) == "formed"
    flops = route_flops(LayerSizes(1, 16, 64, 256, 2304))
    assert flops["gram"] < flops["factored"] < flops["formed"]
    with pytest.raises(ValueError, match="route"):
        conv_terms(*_layer(1, 2, 3, 4, 5, torch.float64), route="dense")


def test_solve_log_records_the_route():
    from backpack import backpack, extend
    from torch import nn

    from kfoc_backpack import KFOC

    torch.manual_seed(0)
    model = extend(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    )
    lossfunc = extend(nn.CrossEntropyLoss())
    ext = KFOC()
    with backpack(ext):
        lossfunc(model(torch.randn(5, 3, 6, 6)), torch.randint(0, 3, (5,))).backward()
    routes = {rec.module: rec.route for rec in ext.solve_log}
    assert routes["Conv2d"] in ROUTES
    assert routes["Linear"] == "rank-one"  # 2-d input: rank-one per-sample matrices


@pytest.mark.parametrize("scale", [2.0**-20, 2.0**-29, 2.0**20])
@pytest.mark.parametrize("route", ROUTES)
def test_tiny_blocks_are_solved_not_stopped_at_the_start(route, scale):
    """Deep layers' blocks are tiny (ResNet-18 at initialisation: ``S(u)`` near 1e-27).

    In float32 the norm of such a vector underflowed: the iteration stopped at its
    start as "converged" (K-FAC's left factor, not the optimum) or took 50 steps on
    wrong coefficients. With the output-side vectors scaled by powers of two (exact;
    ``S`` scales by their fourth power: ``2⁻⁸⁰`` as in ResNet-18, ``2⁻¹¹⁶`` at the
    edge of float32's normal range, ``2⁸⁰``) the solve must still be optimal.
    """
    cols, num, pos, m, n = 2, 3, 5, 4, 30
    unfolded, sqrt = _layer(cols, num, pos, m, n, torch.float32, seed=4)
    sqrt = sqrt * scale
    layer_terms = conv_terms(unfolded, sqrt, route=route)
    factors = layer_terms.solve(SolverOptions(tol=1e-6, max_iter=500))
    assert factors.iterations > 1
    _check_optimal(layer_terms, _dense(unfolded, sqrt), m, n, torch.float32)


@pytest.mark.parametrize("top_exponent", [-40, -12, -11, -9, 0, 8, 9, 40])
def test_scaled_samples_solve_is_optimal_inside_and_outside_its_window(top_exponent, monkeypatch):
    """Formed float32 blocks with ``max|X| = 2^p``: unscaled inside the window, scaled outside.

    The window is the layers' (``2^LOW ≤ tr F ≤ 2^HIGH``, :mod:`~kfoc_backpack.solver.rescale`;
    here ``tr F ≈ 2^{2p+6}``): at its edges (``p = -11``, ``9``) the unscaled power method
    must still be optimal in float32; outside it the solve scales. Against the dense
    optimum of the same samples in float64.
    """
    from kfoc_backpack.solver import rescale
    from kfoc_backpack.solver import samples as samples_module

    seen = []
    solve = samples_module.nearest_kronecker_samples

    def recording(mats, **kwargs):
        seen.append(float(mats.abs().max()))
        return solve(mats, **kwargs)

    monkeypatch.setattr(samples_module, "nearest_kronecker_samples", recording)
    gen = torch.Generator().manual_seed(11)
    num, m, n = 7, 5, 6
    samples = torch.randn(num, m, n, generator=gen, dtype=torch.float64)
    samples = samples / samples.abs().max() * 2.0**top_exponent
    options = SolverOptions(tol=1e-6, max_iter=500)
    factors = samples_module.nearest_kronecker_samples(samples.float(), options=options)
    assert factors.converged and factors.iterations > 1
    assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()
    dense = sum_of_outer(samples)
    best = optimal_relative_error(dense, m, n)
    assert relative_error(dense, factors.left.double(), factors.right.double()) <= best + 2e-4
    trace = float(samples.float().double().square().sum())
    inside = rescale.LOW <= math.log2(trace) <= rescale.HIGH
    assert len(seen) == (1 if inside else 2) and seen[0] == 2.0**top_exponent
    if not inside:  # scaled by 2^e to tr F ≈ 1
        assert abs(math.log2(trace * (seen[1] / seen[0]) ** 2)) <= 1


def test_summed_gram_map_of_one_coefficient_matches():
    """The operator route's map ``Σ_{k,m} Q_km W Q_kmᵀ`` equals the per-sample map, summed."""
    unfolded, _ = _layer(1, 4, 3, 2, 7, torch.float64, seed=5)
    gram = gram_routes.PositionGram(unfolded.transpose(1, 2))
    coef = torch.randn(3, 3, dtype=torch.float64)  # not symmetric: the map is linear in W
    inputs = unfolded.transpose(1, 2)
    blocks = (inputs @ inputs.reshape(-1, 7).T).view(4, 3, 4, 3).permute(0, 2, 1, 3)
    expected = (blocks @ coef @ blocks.mT).sum((0, 1))
    assert torch.allclose(gram.apply_summed(coef), expected)
    assert torch.allclose(gram.apply_summed(coef), gram.apply(coef).sum(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [0, 5, 4096, 3 * 4096 + 17])
def test_input_trace_is_the_sum_of_squares(numel, dtype, monkeypatch):
    """``sum_of_squares`` (the input trace) against a float64 sum, on strided views too."""
    monkeypatch.setattr(handover, "SQUARES_MIN", 0)  # the batched-dot path at any size
    gen = torch.Generator().manual_seed(numel)
    values = torch.randn(2 * numel, generator=gen, dtype=torch.float64)
    strided = values.to(dtype)[::2]  # every other entry: not viewable flat, copied
    assert not strided.is_contiguous() or numel <= 1
    expected = values[::2].square().sum().item()
    for tensor in (strided, strided.contiguous().reshape(1, -1, 1)):
        total = sum_of_squares(tensor)
        assert total.dtype == dtype and total.shape == ()
        assert total.item() == pytest.approx(expected, rel=SLACK[dtype] / 10, abs=1e-12)
    half = sum_of_squares(strided.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16


def test_route_choice_counts_the_steps_it_is_given():
    # conv128 with the exact GGN's C − 1 = 9 columns at batch 16: at the assumed 6 steps
    # the position Gram's set-up pays off, at the 3 steps such blocks take it does not
    shape = (9, 16, 256, 128, 1152)
    assert chosen_route(*shape) == chosen_route(*shape, steps=6) == "gram"
    assert chosen_route(*shape, steps=3) == "factored"
    flops = {s: route_flops(LayerSizes(*shape), s) for s in (3, 6)}
    assert flops[3]["factored"] < flops[3]["gram"] and flops[6]["gram"] < flops[6]["factored"]
    # candidates: a grouped layer's formed matrices take formed or operator
    assert chosen_route(*shape, routes=("formed", "operator")) in ("formed", "operator")
    assert chosen_route(1, 16, 1024, 64, 576, routes=("formed",)) == "formed"


def _weight_terms(unfolded, sqrt, **kwargs):
    return handover.weight_terms(unfolded.transpose(1, 2), sqrt.transpose(2, 3), **kwargs)


@pytest.mark.parametrize("route", list(SELECTED))
def test_a_weight_is_chosen_for_the_steps_its_last_solve_took(route, monkeypatch):
    monkeypatch.setattr(formed_routes, "TINY_STEP_FLOPS", 0)  # every route runs Lanczos
    unfolded, sqrt = _layer(*SELECTED[route], torch.float64)
    steps = handover.WeightSteps()
    seen = []
    choose = layer_terms.choose_route

    def spy(*args, **kwargs):
        seen.append(kwargs["steps"])
        return choose(*args, **kwargs)

    monkeypatch.setattr(layer_terms, "choose_route", spy)
    first = _weight_terms(unfolded, sqrt, steps=steps)
    assert first.terms.route == route and first.steps is steps and steps.last is None
    factors = first.solve(SolverOptions(tol=1e-9, max_iter=500))
    assert seen == [None] and steps.last == factors.iterations >= 1
    _weight_terms(unfolded, sqrt, steps=steps)
    assert seen == [None, factors.iterations]
    assert first.detach().steps is steps


def test_solves_without_lanczos_note_no_steps():
    # a tiny layer (the power method of SampleTerms.solve) and a rank-one layer
    for shape in (SELECTED["formed"], (2, 3, 1, 4, 5)):
        steps = handover.WeightSteps()
        terms = _weight_terms(*_layer(*shape, torch.float64), steps=steps)
        assert terms.solve().iterations >= 1 and steps.last is None


def test_collections_keep_each_weights_steps_across_batches(monkeypatch):
    from backpack import backpack, extend
    from torch import nn

    from kfoc_backpack import KFOC, KFOCExact
    from kfoc_backpack.collect.hooks import TermCollector

    monkeypatch.setattr(formed_routes, "TINY_STEP_FLOPS", 0)  # every layer on a Lanczos route
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    X, y = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))
    collect = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))
    terms = collect(X, y).weights["0.weight"]
    assert terms.steps is collect.weight_steps["0"] and terms.steps.last is None
    factors = terms.solve()
    assert collect.weight_steps["0"].last == factors.iterations
    assert collect(X, y).weights["0.weight"].steps is collect.weight_steps["0"]

    # BackPACK's idiom: a new extension per batch; the layer's record outlives it
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    for _ in range(2):
        ext = KFOC()
        with backpack(ext):
            lossfunc(model(X), y).backward()
        (conv_solve,) = [rec for rec in ext.solve_log if rec.module == "Conv2d"]
        assert conv_solve.route in ROUTES
        assert KFOC().weight_steps(model[0]).last == conv_solve.iterations
    assert KFOCExact().weight_steps(model[0]).last is None  # another curvature, own record
