"""The two stopping rules of the factor-space iterations: on the factors, on the objective.

``stop="objective"`` stops once the captured squared norm ``σ²`` (the error is
``‖F‖² − σ²``) settles; ``stop="factors"`` once the left factor does. Checked against the
dense SVD of the rearranged block (``tests/ground_truth.py``) on every route over
positions, the general per-sample route, and the power method's and Lanczos' own loops:
the objective rule reaches the optimum's error to its tolerance in no more steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from ground_truth import optimal_relative_error, relative_error, sum_of_outer
from layouts import conv_terms

from kfoc_backpack.enums import Route, Stop
from kfoc_backpack.solver import ROUTE_TABLE, SolverOptions, nearest_kronecker_samples
from kfoc_backpack.solver.krylov import lanczos_top
from kfoc_backpack.solver.power import factor_power_iteration, samples_half_steps

ROUTES = tuple(route.route for route in ROUTE_TABLE if route.route is not Route.RANK_ONE)


def _layer(cols, num, pos, m, n, seed=0, correlated=True):
    """``unfolded`` ``[K, N, T]`` and ``sqrt`` ``[J, K, M, T]``, float64.

    ``correlated``: positions share a common component (as neighbouring pixels do), so
    that the block is far from a single product and the iteration takes several steps.
    """
    gen = torch.Generator().manual_seed(seed)
    unfolded = torch.randn(num, n, pos, generator=gen, dtype=torch.float64)
    sqrt = torch.randn(cols, num, m, pos, generator=gen, dtype=torch.float64)
    if correlated:
        unfolded = unfolded + torch.randn(num, n, 1, generator=gen, dtype=torch.float64)
    return unfolded, sqrt


def _dense(unfolded, sqrt):
    samples = torch.einsum("jkmt,knt->jkmn", sqrt, unfolded)
    return sum_of_outer(samples.flatten(end_dim=1))


def test_options_take_the_rule_as_a_string_enum():
    assert SolverOptions(stop="objective").stop is Stop.OBJECTIVE
    with pytest.raises(ValueError, match=r"stop 'error'.*'factors', 'objective'"):
        SolverOptions(stop="error")


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_stops_at_the_optimums_error(route):
    unfolded, sqrt = _layer(2, 6, 5, 7, 8)
    dense = _dense(unfolded, sqrt)
    best = optimal_relative_error(dense, 7, 8)
    terms = conv_terms(unfolded, sqrt, route=route)
    steps = {}
    for stop in Stop:
        factors = terms.solve(SolverOptions(tol=1e-10, max_iter=500, stop=stop))
        assert factors.converged
        found = relative_error(dense, factors.left, factors.right)
        assert found == pytest.approx(best, abs=1e-9), stop
        steps[stop] = factors.iterations
    assert steps[Stop.OBJECTIVE] <= steps[Stop.FACTORS]


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_the_objectives_tolerance_bounds_the_error(tol):
    """``e² − e*² = (σ*² − σ²)/‖F‖²``: a settled ``σ²`` leaves the error near the optimum's."""
    unfolded, sqrt = _layer(3, 8, 6, 9, 10, seed=1)
    dense = _dense(unfolded, sqrt)
    best = optimal_relative_error(dense, 9, 10)
    for route in ROUTES:
        factors = conv_terms(unfolded, sqrt, route=route).solve(
            SolverOptions(tol=tol, max_iter=500, stop="objective")
        )
        found = relative_error(dense, factors.left, factors.right)
        assert best - 1e-12 <= found <= best + 10 * math.sqrt(tol), route


def test_the_power_method_and_lanczos_loops():
    gen = torch.Generator().manual_seed(2)
    samples = torch.randn(20, 6, 5, generator=gen, dtype=torch.float64)
    samples = samples + torch.randn(1, 6, 5, generator=gen, dtype=torch.float64)
    dense = sum_of_outer(samples)
    best = optimal_relative_error(dense, 6, 5)
    to_right, to_left = samples_half_steps(samples)
    start = torch.eye(6, dtype=torch.float64)
    for stop in Stop:
        left, right, steps, converged = factor_power_iteration(
            to_right, to_left, start, 1e-12, 500, stop=stop
        )
        assert converged and relative_error(dense, left, right) == pytest.approx(best, abs=1e-9)
        torch.testing.assert_close(right, to_right(left))  # the right factor of this left
        left, steps, converged = lanczos_top(
            lambda m: to_left(to_right(m)), start, 1e-12, 500, stop=stop
        )
        assert converged
        assert relative_error(dense, left, to_right(left)) == pytest.approx(best, abs=1e-9)
    factors = nearest_kronecker_samples(samples, options=SolverOptions(tol=1e-12, stop="objective"))
    assert relative_error(dense, factors.left, factors.right) == pytest.approx(best, abs=1e-9)


def test_a_zero_block_stops_at_once():
    zeros = torch.zeros(4, 3, 2, dtype=torch.float64)
    to_right, to_left = samples_half_steps(zeros)
    left, right, steps, converged = factor_power_iteration(
        to_right, to_left, torch.eye(3, dtype=torch.float64), 1e-8, 50, stop="objective"
    )
    assert converged and steps == 1 and not right.any()
