r"""Flop and memory model of the routes for weights shared over positions, and the choice.

Counts are multiply-adds of the dominant products (module
:mod:`~kfoc_backpack.solver.conv_routes` derives each one), for ``s`` Lanczos steps:

=========  ==============================  =======================  ===========================
route      once                            per step                 end (``R``) / memory
=========  ==============================  =======================  ===========================
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

K-FAC's factors of the same layer cost ``K·T·N² + J·K·T·M²`` (:func:`kfac_cost`).
On accelerators every step also costs its kernel launches, counted as
:data:`LAUNCH_FLOPS` multiply-adds each.

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features, ``N`` input features.
"""

from __future__ import annotations

ROUTES = ("formed", "factored", "gram", "output-gram", "operator")
"""Route names, as recorded in ``SolveRecord.route``."""

KRYLOV_STEPS = {1: 16, 2: 6}
"""Lanczos steps the choice assumes for a weight's first solve, for one column per sample
and for several: the Monte-Carlo Fisher blocks of wide convolutions (one column,
``σ₂/σ₁`` near one) take the power method 30–50 steps to ``tol = 1e-5``, the exact GGN
blocks (``C`` columns) 3–6; Lanczos takes about a third and as many
(``integration/benchmark.py --resnet``). Later batches of the same weight are chosen
for the steps its previous solve took (``steps`` of :func:`choose_conv_route`)."""


def assumed_steps(cols: int) -> int:
    """Lanczos steps :func:`choose_conv_route` assumes for ``cols`` columns per sample."""
    return KRYLOV_STEPS[min(cols, 2)]


LAUNCH_FLOPS = {False: 2e4, True: 2e8}
"""Multiply-adds one dispatched operation is worth: CPU, accelerator (launch-bound)."""

OPS_PER_STEP = {"formed": 12, "factored": 14, "gram": 14, "output-gram": 14, "operator": 12}
"""Dispatched operations per Lanczos step (half-steps plus re-orthogonalisation)."""

MEMORY_FLOOR = 64 * 2**20
"""Bytes of working memory any route may use, whatever the layer's size."""

MEMORY_RATIO = 4
"""Working memory a route may use, in multiples of the layer's unfolded inputs and
output-side vectors ``K·T·(N + J·M)`` (K-FAC's step holds about as many already)."""


def route_flops(
    cols: int, num: int, pos: int, m: int, n: int, steps: int | None = None
) -> dict[str, float]:
    """Multiply-adds of each route for ``steps`` steps (table in the module docstring).

    Args:
        cols: ``J``, columns per sample.
        num: ``K``, samples.
        pos: ``T``, positions sharing the weight.
        m: ``M``, output features.
        n: ``N``, input features.
        steps: Lanczos steps (default :func:`assumed_steps`).

    Returns:
        ``{route: multiply-adds}``.
    """
    steps = assumed_steps(cols) if steps is None else steps
    jk = cols * num
    form = jk * pos * m * n
    right_factored = num * pos * n * (n + pos)
    right_formed = jk * m * n * (m + n)
    left_factored = cols * num * pos * m * (m + pos)
    return {
        "formed": form + 2 * steps * right_formed + right_formed,
        "factored": 2 * steps * (left_factored + right_factored) + right_factored,
        "gram": (num * pos) ** 2 * n
        + steps * (2 * num**2 * pos**3 + 2 * left_factored)
        + right_factored
        + left_factored,
        "output-gram": (jk * pos) ** 2 * m
        + jk * pos * n * n
        + steps * (2 * jk**2 * pos**3 + 2 * jk * pos * n * (n + pos))
        + left_factored
        + jk * pos * n * (n + pos),
        "operator": form + (jk * m) ** 2 * n + 2 * steps * jk**2 * m**3 + right_formed,
    }


def route_bytes(cols: int, num: int, pos: int, m: int, n: int, itemsize: int) -> dict[str, int]:
    """Working memory of each route beyond the layer's inputs and vectors, in bytes."""
    jk = cols * num
    return {
        "formed": itemsize * jk * m * n,
        "factored": itemsize * (jk * pos * pos + num * pos * max(m, n)),
        "gram": itemsize * (num * pos) ** 2 * (1.25 if (num * pos) ** 2 > 1 << 22 else 2),
        "output-gram": itemsize
        * ((jk * pos) ** 2 * (1.25 if (jk * pos) ** 2 > 1 << 22 else 2) + 2 * jk * pos * n),
        "operator": itemsize * (jk * m * n + 2 * (jk * m) ** 2),
    }


def kfac_cost(cols: int, num: int, pos: int, m: int, n: int) -> float:
    """Multiply-adds of K-FAC's factors of the same layer, ``K·T·N² + J·K·T·M²``."""
    return num * pos * n * n + cols * num * pos * m * m


DIAGONAL_ROUTES = ("formed", "pairs")
"""How :meth:`~kfoc_backpack.solver.factored.FactoredTerms.diagonal` sums ``X ⊙ X``."""


def diagonal_flops(cols: int, num: int, pos: int, m: int, n: int) -> dict[str, float]:
    """Multiply-adds of the diagonal ``Σ_{j,k} X_{j,k} ⊙ X_{j,k}`` (``[M, N]``) per route.

    ``formed`` forms every ``X_{j,k}`` (``J·K·T·M·N``) and writes ``J·K·M·N`` numbers
    to square them; ``pairs`` expands each square over the position pairs ``t ≤ t'``,
    ``Σ_k Σ_{t≤t'} w_{tt'} (Σ_j g_{jkt} ⊙ g_{jkt'}) (a_{kt} ⊙ a_{kt'})ᵀ``, one product
    with inner size ``K·T(T+1)/2`` that writes ``M·N`` numbers once
    (``K·T(T+1)/2·(M·N + J·M + N)``).
    """
    pairs = pos * (pos + 1) // 2
    return {
        "formed": cols * num * pos * m * n,
        "pairs": num * pairs * (m * n + cols * m + n),
    }


def choose_diagonal_route(cols: int, num: int, pos: int, m: int, n: int) -> str:
    """Return the diagonal's route with fewer multiply-adds (``pairs`` where ``T + 1 ≲ 2·J``).

    Where the counts are close ``pairs`` is faster still: its one product is bound by
    arithmetic, ``formed`` by writing the ``J·K·M·N`` products: 0.20 s against 1.57 s for
    16 samples of a ``Conv2d(512, 512, 3)`` at 4 × 4 positions with 9 columns, one CPU
    thread (``python integration/diagonal_routes.py``).
    """
    flops = diagonal_flops(cols, num, pos, m, n)
    return "pairs" if flops["pairs"] <= flops["formed"] else "formed"


def rank_one_flops(cols: int, num: int, m: int, n: int) -> float:
    """Multiply-adds of a rank-one solve (``T = 1``) in ``K``-dimensional coefficient space.

    The two Gram matrices of the terms (``K²·(J²·M + N)``), steps of ``K²`` each
    (negligible), and the factors formed once at the end as K-FAC forms its own
    (``J·K·M² + K·N²``) — see :mod:`~kfoc_backpack.solver.outer`.
    """
    return num * num * (cols * cols * m + n) + kfac_cost(cols, num, 1, m, n)


SQUARING_MAX_PAIRS = 1 << 24
"""Largest ``(J·K·M)²`` of the formed route's squaring on accelerators."""

SQUARING_MAX_FLOPS = 10**10
"""Largest flop count of the formed route's squaring on accelerators."""


def squaring_fits(samples: int, m: int, n: int) -> bool:
    """Whether ``SampleTerms.solve`` squares the ``M² × M²`` left map on accelerators.

    Mirrors the solver's own test (``(J·K·M)² ≤ 2²⁴`` pair products and
    ``2·(J·K·M)²·(N + M²) ≤ 10¹⁰`` flops): there a fixed few dozen launches and an
    exact finish solve the layer, which no route here beats on a launch-bound device.
    """
    pairs = (samples * m) ** 2
    return pairs <= SQUARING_MAX_PAIRS and 2 * pairs * (n + m * m) <= SQUARING_MAX_FLOPS


TINY_STEP_FLOPS = 3 * 10**8
"""On the CPU, layers whose formed step ``2·J·K·M·N·(M + N)`` is below this many
multiply-adds (a few milliseconds: LeNet-5's convolutions, ResNet's stem) are bound by
dispatched operations, not flops: formed, they run ``SampleTerms.solve``, the power
method of a few operations per step, instead of a Lanczos route with its dozens
(``integration/benchmark.py``'s operation counts)."""


def is_tiny(samples: int, m: int, n: int) -> bool:
    """Whether a step over ``samples = J·K`` ``[M, N]`` matrices is below the tiny limit."""
    return 2 * samples * m * n * (m + n) < TINY_STEP_FLOPS


def choose_conv_route(
    cols: int,
    num: int,
    pos: int,
    m: int,
    n: int,
    itemsize: int = 4,
    accelerator: bool = False,
    memory_cap: int | None = None,
    steps: int | None = None,
    routes: tuple[str, ...] = ROUTES,
) -> str:
    """Return the route of least estimated cost whose working memory fits.

    On accelerators, ``formed`` wherever :func:`squaring_fits` (the solver's own
    launch-bound route). Else cost: :func:`route_flops` plus :data:`OPS_PER_STEP`
    launches per step at :data:`LAUNCH_FLOPS`, for ``steps`` Lanczos steps — the
    steps the same weight's previous solve took where the caller knows them
    (:class:`~kfoc_backpack.collect.layer_terms.WeightSteps`), else :func:`assumed_steps`.
    Memory cap (default): the larger of :data:`MEMORY_FLOOR` and :data:`MEMORY_RATIO`
    times the bytes of the layer's own inputs and output-side vectors
    ``K·T·(N + J·M)``, which the collection holds anyway; where no candidate fits, the
    smallest (``factored`` always fits, ``formed`` where it is smaller). On the CPU a
    tiny layer (:func:`is_tiny`) for which ``operator`` wins takes ``formed``
    (``factored`` and ``gram`` keep the few positions in the smaller stored form).

    Args:
        cols: ``J``, columns per sample.
        num: ``K``, samples.
        pos: ``T``, positions.
        m: ``M``, output features.
        n: ``N``, input features.
        itemsize: Bytes per number.
        accelerator: Whether the tensors live on a launch-bound device.
        memory_cap: Override of the memory cap, in bytes.
        steps: Lanczos steps to count (default :func:`assumed_steps`).
        routes: The candidate routes (a grouped convolution's per-sample matrices are
            formed: ``formed`` and ``operator``). Where none fits the memory cap, the
            smallest (``factored`` always fits, ``formed`` where it is smaller).

    Returns:
        One of ``routes``.
    """
    steps = assumed_steps(cols) if steps is None else max(int(steps), 1)
    if accelerator and "formed" in routes and squaring_fits(cols * num, m, n):
        return "formed"
    cap = memory_cap
    if cap is None:
        cap = max(MEMORY_FLOOR, MEMORY_RATIO * itemsize * num * pos * (n + cols * m))
    flops = route_flops(cols, num, pos, m, n, steps)
    sizes = route_bytes(cols, num, pos, m, n, itemsize)
    launch = LAUNCH_FLOPS[accelerator] * steps
    costs = {r: flops[r] + launch * OPS_PER_STEP[r] for r in routes if sizes[r] <= cap}
    if not costs:
        return min(routes, key=sizes.__getitem__)
    best = min(costs, key=costs.__getitem__)
    if best == "operator" and not accelerator and is_tiny(cols * num, m, n):
        return "formed"  # a tiny layer on many positions: the power method's few operations
    return best
