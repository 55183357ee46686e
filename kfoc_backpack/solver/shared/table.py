r"""The route table of weights shared over positions, and the choice among its routes.

Every route (:class:`~kfoc_backpack.solver.shared.route.RouteTerms`) declares its costs
for a layer of :class:`~kfoc_backpack.solver.shared.route.LayerSizes`; for ``s`` Lanczos
steps, in multiply-adds of the dominant products:

=========  ==============================  =======================  ===========================
route      once                            per step                 end (``R``) / memory
=========  ==============================  =======================  ===========================
rank-one   ``K²·(J²·M + N)`` (Grams)       ``O(K²)``                ``J·K·M² + K·N²`` / ``2·K²``
formed     ``J·K·T·M·N`` (form ``X``)      ``2·J·K·M·N·(M+N)``      ``J·K·M·N·(M+N)`` / ``J·K·M·N``
factored   —                               ``2·(J·K·T·M·(M+T)``     ``K·T·N·(N+T)`` /
                                           ``+ K·T·N·(N+T))``       ``J·K·T²``
gram       ``(K·T)²·N`` (``Q``)            ``2·K²·T³``              ``K·T·N·(N+T)`` /
                                           ``+ 2·J·K·T·M·(M+T)``    ``2·(K·T)²``
output-    ``(J·K·T)²·M`` (Gram of ``G``)  ``2·(J·K)²·T³``          ``J·K·T·M·(M+T)`` /
gram       ``+ J·K·T·N²``                  ``+ 2·J·K·T·N·(N+T)``    ``2·(J·K·T)² + 2·J·K·T·N``
operator   ``J·K·T·M·N + (J·K·M)²·N``      ``2·(J·K)²·M³``          ``J·K·M·N·(M+N)`` /
                                                                    ``J·K·M·N + 2·(J·K·M)²``
=========  ==============================  =======================  ===========================

K-FAC's factors of the same layer cost ``K·T·N² + J·K·T·M²``
(:func:`~kfoc_backpack.solver.shared.route.kfac_cost`). On accelerators every step also
costs its kernel launches, ``RouteTerms.ops_per_step``
of them at :data:`LAUNCH_FLOPS` multiply-adds each.

:func:`choose_route` iterates :data:`ROUTE_TABLE` and knows no route by name: the routes
that support the sizes are the candidates, a candidate that takes precedence wins
outright (``rank-one`` on one ungrouped position, ``formed`` on accelerators where the
solver squares its map), else the least cost whose memory fits, unless that route
defers to another candidate (``operator`` to ``formed`` for tiny layers on the CPU).
Adding a route is one class listed in :data:`ROUTE_TABLE`.

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features, ``N`` input features.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kfoc_backpack.enums import Route
from kfoc_backpack.solver.shared.factored import FactoredRouteTerms
from kfoc_backpack.solver.shared.formed import FormedRouteTerms, OperatorRouteTerms
from kfoc_backpack.solver.shared.gram import GramRouteTerms, OutputGramRouteTerms
from kfoc_backpack.solver.shared.rank_one import RankOneRouteTerms
from kfoc_backpack.solver.shared.route import LayerSizes, RouteTerms

RouteClass = type[RouteTerms]
"""A route of the table: its terms class, which declares its costs."""

ROUTE_TABLE: tuple[RouteClass, ...] = (
    RankOneRouteTerms,
    FormedRouteTerms,
    FactoredRouteTerms,
    GramRouteTerms,
    OutputGramRouteTerms,
    OperatorRouteTerms,
)
"""The routes, in the order the chooser breaks ties in."""

KRYLOV_STEPS = {1: 16, 2: 6}
"""Lanczos steps the choice assumes for a weight's first solve, for one column per sample
and for several: the Monte-Carlo Fisher blocks of wide convolutions (one column,
``σ₂/σ₁`` near one) take the power method 30–50 steps to ``tol = 1e-5``, the exact GGN
blocks (``C`` columns) 3–6; Lanczos takes about a third and as many
(``integration/benchmark.py --resnet``). Later batches of the same weight are chosen
for the steps its previous solve took (``steps`` of :func:`choose_route`)."""


def assumed_steps(cols: int) -> int:
    """Lanczos steps :func:`choose_route` assumes for ``cols`` columns per sample."""
    return KRYLOV_STEPS[min(cols, 2)]


LAUNCH_FLOPS = {False: 2e4, True: 2e8}
"""Multiply-adds one dispatched operation is worth: CPU, accelerator (launch-bound)."""

MEMORY_FLOOR = 64 * 2**20
"""Bytes of working memory any route may use, whatever the layer's size."""

MEMORY_RATIO = 4
"""Working memory a route may use, in multiples of the layer's unfolded inputs and
output-side vectors ``K·T·(N + J·M)`` (K-FAC's step holds about as many already)."""


def default_memory_cap(sizes: LayerSizes, itemsize: int) -> int:
    """Return the working memory a route of a layer of ``sizes`` may use, in bytes.

    The larger of :data:`MEMORY_FLOOR` and :data:`MEMORY_RATIO` times the bytes of the
    layer's own inputs and output-side vectors ``K·T·(N + J·M)``, which the collection
    holds anyway.
    """
    cols, num, pos, m, n = sizes[:5]
    return max(MEMORY_FLOOR, MEMORY_RATIO * itemsize * num * pos * (n + cols * m))


def supporting(
    sizes: LayerSizes,
    routes: Iterable[Route | str] | None = None,
    table: Sequence[RouteClass] | None = None,
) -> list[RouteClass]:
    """Return the routes of ``table`` (default :data:`ROUTE_TABLE`) that support ``sizes``.

    Args:
        sizes: The layer's sizes.
        routes: Only these routes (members of :class:`~kfoc_backpack.enums.Route` or
            their values), or all.
        table: The route table.
    """
    table = ROUTE_TABLE if table is None else table
    wanted = None if routes is None else {Route.parse(r, "route") for r in routes}
    return [r for r in table if r.supports(sizes) and (wanted is None or r.route in wanted)]


def choose_route(
    sizes: LayerSizes,
    itemsize: int = 4,
    accelerator: bool = False,
    memory_cap: int | None = None,
    steps: int | None = None,
    routes: Iterable[Route | str] | None = None,
    table: Sequence[RouteClass] | None = None,
) -> RouteClass:
    """Return the route of least estimated cost whose working memory fits.

    The candidates are the routes of the table that support ``sizes``
    (:meth:`~RouteTerms.supports`), in table order. The first that
    :meth:`~RouteTerms.takes_precedence` is taken. Else each candidate's cost is its
    :meth:`~RouteTerms.flops` plus ``ops_per_step`` launches per step
    at :data:`LAUNCH_FLOPS`, for ``steps`` Lanczos steps — the steps the same weight's
    previous solve took where the caller knows them
    (:class:`~kfoc_backpack.collect.layer_terms.WeightSteps`), else
    :func:`assumed_steps`; the least cost among those whose
    :meth:`~RouteTerms.working_bytes` fit the memory cap wins (the smallest where none
    fits), unless it :meth:`~RouteTerms.defers_to` another candidate (a route that is
    not a candidate is not deferred to).

    Args:
        sizes: The layer's sizes.
        itemsize: Bytes per number.
        accelerator: Whether the tensors live on a launch-bound device.
        memory_cap: Override of the memory cap, in bytes (default
            :func:`default_memory_cap`).
        steps: Lanczos steps to count (default :func:`assumed_steps`).
        routes: The candidate routes (default: every route of the table).
        table: The route table (default :data:`ROUTE_TABLE`).

    Returns:
        The chosen route's class (its :attr:`~RouteTerms.route` names it).

    Raises:
        ValueError: If no candidate supports ``sizes``.
    """
    candidates = supporting(sizes, routes, table)
    if not candidates:
        raise ValueError(f"No route supports {sizes}.")
    for route in candidates:
        if route.takes_precedence(sizes, accelerator):
            return route
    steps = assumed_steps(sizes.columns) if steps is None else max(int(steps), 1)
    cap = default_memory_cap(sizes, itemsize) if memory_cap is None else memory_cap
    launch = LAUNCH_FLOPS[accelerator] * steps
    nbytes = {route: route.working_bytes(sizes, itemsize) for route in candidates}
    costs = {
        route: route.flops(sizes, steps) + launch * route.ops_per_step
        for route in candidates
        if nbytes[route] <= cap
    }
    if not costs:
        return min(candidates, key=nbytes.__getitem__)
    best = min(costs, key=costs.__getitem__)
    deferred = best.defers_to(sizes, accelerator)
    return next((route for route in candidates if route.route == deferred), best)


def route_class(
    route: Route | str, sizes: LayerSizes, table: Sequence[RouteClass] | None = None
) -> RouteClass:
    """Return the class of a forced ``route`` for a layer of ``sizes``.

    Raises:
        ValueError: For an unknown route, or one that does not support ``sizes``
            (naming the route, the sizes and the routes that do).
    """
    member = Route.parse(route, "route")
    table = ROUTE_TABLE if table is None else table
    found = next((r for r in table if r.route == member), None)
    if found is not None and found.supports(sizes):
        return found
    names = [repr(r.route.value) for r in supporting(sizes, table=table)]
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    raise ValueError(
        f"route {member.value!r} does not support a layer of {sizes}; the routes that do: {listed}."
    )


def route_flops(sizes: LayerSizes, steps: int | None = None) -> dict[Route, int]:
    """Return the multiply-adds of each route that supports ``sizes``, for ``steps`` steps.

    ``steps`` defaults to :func:`assumed_steps` (the table in the module docstring).
    """
    steps = assumed_steps(sizes.columns) if steps is None else steps
    return {route.route: route.flops(sizes, steps) for route in supporting(sizes)}


def route_bytes(sizes: LayerSizes, itemsize: int) -> dict[Route, float]:
    """Return the working memory of each route that supports ``sizes``, in bytes."""
    return {route.route: route.working_bytes(sizes, itemsize) for route in supporting(sizes)}
