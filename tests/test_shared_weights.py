"""Weights shared over positions: one hand-over, one route choice, rank one at ``T = 1``.

``Linear`` layers on tokens and convolutions hand the solver the same description,
``X_{m,n} = G_{m,n}ᵀ A_n`` over ``T`` positions (:func:`~kfoc_backpack.collect.handover.
weight_terms`). Tested here against the Frobenius-optimal Kronecker product of the dense
block (per-sample matrices formed directly, or the GGN block from ``torch.func``, float64):

* a token ``Linear`` on every route the cost model can choose, in float64 and float32,
  with non-contiguous inputs;
* the same route for a token ``Linear`` and a convolution of the same sizes;
* ``T = 1`` layers (a ``Linear`` on ``[N, 1, I]``, a 1×1 convolution on a 1×1 map, a 3×3
  convolution with one output position) as rank-one terms on the hook route and in
  ``with backpack(KFOCExact())``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from backpack import backpack, extend
from laplace_helpers import (
    dense_ggn_blocks,
    optimal_error,
    rel_error,
    single_thread,  # noqa: F401 (autouse fixture)
)
from layouts import conv_terms, linear_terms
from torch import nn

from kfoc_backpack import KFOCBackend, KFOCExact
from kfoc_backpack.collect.handover import sum_of_squares, weight_terms
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.enums import Route
from kfoc_backpack.solver import ROUTE_TABLE, OuterTerms, SolverOptions

TIGHT = {"tol": 1e-12, "max_iter": 5000}
ROUTES = tuple(route.route for route in ROUTE_TABLE if route.route is not Route.RANK_ONE)
RANK_ONE = Route.RANK_ONE
NUM = 6


def dense_block(grads: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``Σ_{m,n} vec(X_{m,n}) vec(X_{m,n})ᵀ`` with ``X = Σ_t g_t a_tᵀ`` formed directly."""
    samples = torch.einsum("mnto,nti->mnoi", grads.double(), inputs.double()).flatten(2)
    flat = samples.flatten(end_dim=1)
    return flat.T @ flat


def random_tokens(cols, num, pos, out, inp, dtype, seed=0):
    """``[M, N, T, O]`` vectors and ``[N, T, I]`` inputs, the inputs a transposed view."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(cols, num, pos, out, generator=gen, dtype=torch.float64)
    inputs = torch.randn(num, inp, pos, generator=gen, dtype=torch.float64).mT
    return grads.to(dtype), inputs.to(dtype)


# (M columns, N inputs, T positions, O outputs, I inputs)
TOKEN_SHAPES = {
    "few-tokens": (2, 5, 3, 6, 7),
    "many-tokens": (1, 4, 9, 5, 4),
    "wide": (3, 3, 2, 8, 10),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", list(TOKEN_SHAPES))
def test_token_linear_is_optimal_on_every_route(shape, route, dtype):
    grads, inputs = random_tokens(*TOKEN_SHAPES[shape], dtype)
    assert not inputs.is_contiguous()
    trace = sum_of_squares(inputs) / inputs.shape[0]
    terms = weight_terms(inputs, grads, route=route)
    assert terms.terms.route == route
    tol = 1e-12 if dtype == torch.float64 else 1e-7
    left, right = terms.kfoc(terms.solve(SolverOptions(tol=tol, max_iter=5000)))
    assert left.dtype == right.dtype == dtype
    block = dense_block(grads, inputs)
    best = optimal_error(block, grads.shape[-1], inputs.shape[-1])
    assert rel_error(block, left.double(), right.double()) == pytest.approx(
        best, abs=1e-8 if dtype == torch.float64 else 2e-4
    )
    # K-FAC's split: tr(R_in) is the mean over inputs of ‖A_n‖²
    torch.testing.assert_close(right.trace().double(), trace.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(1, 8, 16, 24, 32), (4, 16, 4, 64, 48), (1, 32, 49, 8, 72)])
def test_token_linear_and_convolution_share_the_route_choice(shape):
    """A token ``Linear`` and a convolution of the same sizes take the same route."""
    cols, num, pos, out, inp = shape
    grads, inputs = random_tokens(cols, num, pos, out, inp, torch.float32)
    tokens = linear_terms(inputs, grads)
    conv = conv_terms(inputs.mT, grads.mT)  # [N, I, T], [M, N, O, T]
    assert tokens.terms.route == conv.terms.route
    assert tokens.terms.route in ROUTES


def test_one_position_is_rank_one_and_forced_routes_agree():
    grads, inputs = random_tokens(2, 5, 1, 4, 6, torch.float64)
    chosen = weight_terms(inputs, grads)
    assert isinstance(chosen.terms, OuterTerms) and chosen.terms.route == RANK_ONE
    block = dense_block(grads, inputs)
    best = optimal_error(block, 4, 6)
    for route in (None, *ROUTES):  # every route still solves a single position
        terms = weight_terms(inputs, grads, route=route)
        left, right = terms.kfoc(terms.solve(SolverOptions(**TIGHT)))
        assert rel_error(block, left, right) == pytest.approx(best, abs=1e-9)
    with pytest.raises(ValueError, match="rank-one"):
        weight_terms(*random_tokens(1, 3, 2, 4, 5, torch.float64)[::-1], route=RANK_ONE)
    with pytest.raises(ValueError, match="Unknown route 'dense'"):
        weight_terms(inputs, grads, route="dense")


# (model constructor, input shape, name of the weight with T = 1)
ONE_POSITION = {
    "linear-one-token": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)),
        (NUM, 1, 5),
        "0.weight",
    ),
    "conv1x1-one-pixel": (
        lambda: nn.Sequential(nn.Conv2d(5, 4, 1), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)),
        (NUM, 5, 1, 1),
        "0.weight",
    ),
    "conv3x3-one-output": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)),
        (NUM, 3, 3, 3),
        "0.weight",
    ),
}


def one_position_problem(case):
    build, shape, name = ONE_POSITION[case]
    torch.manual_seed(0)
    model = build().double()
    return model, torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (NUM,)), name


def assert_weight_optimal(block, weight, factors):
    best = optimal_error(block, weight.shape[0], weight[0].numel())
    assert rel_error(block, *factors) == pytest.approx(best, abs=1e-8)


@pytest.mark.parametrize("case", list(ONE_POSITION))
def test_one_position_layers_on_the_hook_route(case):
    model, X, y, name = one_position_problem(case)
    batch = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))(X, y)
    assert isinstance(batch.weights[name].terms, OuterTerms)
    _, kron = KFOCBackend(model, "classification", **TIGHT).kron(X, y, N=NUM)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = dense_ggn_blocks(model, X, "classification")
    weight = dict(model.named_parameters())[name]
    assert_weight_optimal(blocks[name], weight, kron.kfacs[names.index(name) // 2])


@pytest.mark.parametrize("case", list(ONE_POSITION))
def test_one_position_layers_in_backpack(case):
    model, X, y, name = one_position_problem(case)
    blocks = dense_ggn_blocks(model, X, "classification")
    extended = extend(copy.deepcopy(model))
    lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
    ext = KFOCExact(**TIGHT)
    with backpack(ext):
        lossfunc(extended(X), y).backward()
    weight = dict(extended.named_parameters())[name]
    assert_weight_optimal(blocks[name], weight, weight.kfoc_exact)
    assert {rec.route for rec in ext.solve_log} == {RANK_ONE}


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_accepts_a_start_of_the_left_factor(route):
    """A start (e.g. another batch's ``L``) changes the steps, not the optimum."""
    grads, inputs = random_tokens(*TOKEN_SHAPES["few-tokens"], torch.float64)
    terms = weight_terms(inputs, grads, route=route)
    other, _ = random_tokens(*TOKEN_SHAPES["few-tokens"], torch.float64, seed=1)
    start = weight_terms(inputs, other).solve(SolverOptions(**TIGHT)).left
    factors = terms.terms.solve(SolverOptions(**TIGHT), init=start)
    left, right = factors.left, factors.right
    block = dense_block(grads, inputs)
    best = optimal_error(block, grads.shape[-1], inputs.shape[-1])
    assert rel_error(block, left, right) == pytest.approx(best, abs=1e-9)


def test_few_positions_on_a_wide_output_take_the_output_gram():
    """ConvNeXt's late MLPs (``J·K·T`` = 576 rows against 640 outputs): every other route
    pays ``J·K·T·M²`` per step; the output-side Gram does not."""
    grads, inputs = random_tokens(9, 16, 4, 640, 160, torch.float32)
    assert linear_terms(inputs, grads).terms.route == "output-gram"
    grads, inputs = random_tokens(9, 16, 64, 64, 576, torch.float32)  # many positions
    assert linear_terms(inputs, grads).terms.route != "output-gram"
