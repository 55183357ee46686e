"""The route table of weights shared over positions: declarations, choice, a new route.

Every route of :data:`~kfoc_backpack.solver.shared.table.ROUTE_TABLE` declares its
flops, bytes and operations per step, builds its terms from a layer's positions (grouped
where it supports groups), and solves them to the dense optimum; the chooser returns a
supported candidate for any sizes, and considers a route added to the table without
knowing it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from ground_truth import optimal_relative_error, relative_error, sum_of_outer

from kfoc_backpack.collect.handover import weight_terms
from kfoc_backpack.enums import Route
from kfoc_backpack.solver import ROUTE_TABLE, LayerSizes, RouteTerms, SolverOptions, choose_route
from kfoc_backpack.solver.shared import table
from kfoc_backpack.solver.shared.factored import FactoredRouteTerms
from kfoc_backpack.solver.shared.route import lanczos_steps
from kfoc_backpack.solver.shared.table import route_bytes, route_class, route_flops, supporting

OPTIONS = SolverOptions(tol=1e-10, max_iter=500)


def _positions(cols, num, pos, m, n, groups=1, seed=0):
    """Random ``grads [J, K, T, M]`` and ``inputs [K, T, N·groups]`` (transposed views)."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(cols, num, m, pos, generator=gen, dtype=torch.float64).mT
    inputs = torch.randn(num, n * groups, pos, generator=gen, dtype=torch.float64).mT
    return grads, inputs


def _dense(grads, inputs, groups):
    """The block ``Σ vec(X) vec(X)ᵀ`` of the ``[M, N]`` weight (block-diagonal if grouped)."""
    cols, num, pos, m = grads.shape
    samples = torch.einsum("jktm,ktn->jkmn", grads, inputs)  # [J, K, M, N·groups]
    if groups > 1:  # row block γ sees input block γ only
        blocks = samples.unflatten(2, (groups, -1)).unflatten(-1, (groups, -1))
        samples = torch.diagonal(blocks, dim1=2, dim2=4).movedim(-1, 2).flatten(2, 3)
    return samples.flatten(end_dim=1)


def _sizes_for(route):
    """Small sizes the route supports: one position for ``rank-one``, else a few."""
    grouped, shared = LayerSizes(2, 3, 4, 6, 5, 2), LayerSizes(2, 3, 4, 6, 5)
    single = shared._replace(positions=1)
    for sizes in (grouped, shared, single):
        if route.supports(sizes):
            return sizes
    raise AssertionError(f"{route.__name__} supports none of the test sizes")


@pytest.mark.parametrize("route", ROUTE_TABLE, ids=lambda r: r.route.value)
def test_every_route_declares_its_costs(route):
    assert issubclass(route, RouteTerms) and isinstance(route.route, Route)
    assert isinstance(route.ops_per_step, int) and route.ops_per_step > 0
    for name in ("flops", "working_bytes", "from_positions"):
        assert getattr(route, name).__func__ is not getattr(RouteTerms, name).__func__, name
    sizes = _sizes_for(route)
    assert route.supports(sizes)
    assert route.flops(sizes, 3) > 0 and route.flops(sizes, 3) >= route.flops(sizes, 1)
    assert route.working_bytes(sizes, 8) >= route.working_bytes(sizes, 4) > 0
    assert route_flops(sizes, 3)[route.route] == route.flops(sizes, 3)
    assert route_bytes(sizes, 4)[route.route] == route.working_bytes(sizes, 4)
    assert route_class(route.route.value, sizes) is route


def test_the_table_names_each_route_once():
    names = [route.route for route in ROUTE_TABLE]
    assert len(set(names)) == len(names) and set(names) == set(Route)


@pytest.mark.parametrize("route", ROUTE_TABLE, ids=lambda r: r.route.value)
def test_every_route_builds_terms_that_solve_to_the_dense_optimum(route):
    sizes = _sizes_for(route)
    cols, num, pos, m, n, groups = sizes
    grads, inputs = _positions(*sizes, seed=len(route.__name__))
    terms = route.from_positions(grads, inputs, groups)
    assert type(terms) is route and terms.route is route.route
    assert type(terms.detach()) is route and terms.shape == (m, n)
    factors = terms.solve(OPTIONS)
    assert factors.converged
    samples = _dense(grads, inputs, groups)
    dense = sum_of_outer(samples)
    best = optimal_relative_error(dense, m, n)
    assert relative_error(dense, factors.left, factors.right) <= best + 1e-9
    torch.testing.assert_close(terms.diagonal(), samples.square().sum(0))
    steps = lanczos_steps(terms, factors)
    assert steps == (factors.iterations if terms.runs_lanczos() else None)
    # the hand-over builds the same terms when the route is forced by name
    forced = weight_terms(inputs, grads, route=route.route.value, groups=groups)
    assert type(forced.terms) is route and forced.sizes == sizes


def _random_sizes(rng):
    cols, num, pos = rng.choice((1, 2, 9, 10)), rng.randint(1, 512), rng.choice((1, 2, 9, 64))
    m, n = rng.choice((1, 3, 16, 64, 512, 4608)), rng.choice((1, 5, 27, 576, 4608))
    groups = rng.choice([g for g in (1, 2, m) if m % g == 0])
    return LayerSizes(cols, num, pos, m, n, groups)


def test_the_chooser_returns_a_supported_candidate():
    rng = random.Random(0)
    for _ in range(2000):
        sizes = _random_sizes(rng)
        routes = rng.choice((None, ("formed", "operator"), (Route.FACTORED, Route.GRAM)))
        candidates = supporting(sizes, routes)
        if not candidates:
            with pytest.raises(ValueError, match="No route supports"):
                choose_route(sizes, routes=routes)
            continue
        chosen = choose_route(
            sizes,
            itemsize=rng.choice((4, 8)),
            accelerator=rng.random() < 0.5,
            memory_cap=rng.choice((None, 1 << 20)),
            steps=rng.choice((None, 1, 16)),
            routes=routes,
        )
        assert chosen in candidates and chosen.supports(sizes)
        if sizes.positions == 1 and sizes.groups == 1 and routes is None:
            assert chosen.route is Route.RANK_ONE


def test_a_forced_route_must_support_the_sizes():
    sizes = LayerSizes(2, 3, 4, 6, 5, groups=2)
    with pytest.raises(ValueError, match=r"'gram'.*groups=2.*'formed' and 'operator'"):
        route_class("gram", sizes)
    with pytest.raises(ValueError, match="'rank-one'.*positions=4"):
        route_class(Route.RANK_ONE, sizes._replace(groups=1))
    with pytest.raises(ValueError, match="Unknown route 'dense'; supported: 'rank-one'"):
        route_class("dense", sizes)


@dataclass(frozen=True)
class FreeFactoredTerms(FactoredRouteTerms):
    """A test route: the factored solve, declared free (so cheaper than every other)."""

    ops_per_step = 0

    @classmethod
    def flops(cls, sizes, steps):
        return 0

    @classmethod
    def working_bytes(cls, sizes, itemsize):
        return 0


def test_a_route_added_to_the_table_is_considered(monkeypatch):
    sizes = LayerSizes(2, 3, 4, 6, 5)
    extended = (*ROUTE_TABLE, FreeFactoredTerms)
    assert choose_route(sizes) is not FreeFactoredTerms
    assert choose_route(sizes, table=extended) is FreeFactoredTerms
    assert choose_route(sizes._replace(positions=1), table=extended).route is Route.RANK_ONE
    assert choose_route(sizes._replace(groups=2), table=extended) is not FreeFactoredTerms
    # the hand-over reads the table too: the new route's terms, the same optimum
    monkeypatch.setattr(table, "ROUTE_TABLE", extended)
    grads, inputs = _positions(*sizes)
    layer = weight_terms(inputs, grads)
    assert type(layer.terms) is FreeFactoredTerms
    factors = layer.terms.solve(OPTIONS)
    dense = sum_of_outer(_dense(grads, inputs, 1))
    best = optimal_relative_error(dense, 6, 5)
    assert relative_error(dense, factors.left, factors.right) <= best + 1e-9


def test_precedence_and_deferral_are_the_routes_declarations():
    sizes = LayerSizes(2, 3, 4, 6, 5)

    class Urgent(FreeFactoredTerms):
        @classmethod
        def flops(cls, sizes, steps):
            return 10**30

        @classmethod
        def takes_precedence(cls, sizes, accelerator):
            return True

    class Modest(FreeFactoredTerms):
        @classmethod
        def defers_to(cls, sizes, accelerator):
            return Route.GRAM

    assert choose_route(sizes, table=(*ROUTE_TABLE, Urgent)) is Urgent
    assert choose_route(sizes, table=(*ROUTE_TABLE, Modest)).route is Route.GRAM
    # a deferral to a route that is not a candidate keeps the route
    assert choose_route(sizes, routes=("factored",), table=(Modest,)) is Modest
