r"""Routes of weights shared over positions: convolutions, ``Linear`` layers on tokens.

A weight shared over ``T`` positions has per-sample matrices ``X_{j,k} = G_{j,k}ᵀ A_k``
(docs/conventions.md §1), and its nearest Kronecker product can be solved along several
equivalent routes. Each route is one class, both the terms type the solver gets and
its own declaration of sizes supported, flops, bytes and operations per step:

* ``route`` — what a route declares (:class:`~.route.RouteTerms`), the sizes it reads
  (:class:`~.route.LayerSizes`), the Lanczos solve the routes share;
* ``rank_one`` — ``rank-one``: a single position, rank-one per-sample matrices;
* ``formed`` — ``formed`` and ``operator``: the per-sample matrices formed;
* ``factored`` — ``factored``: through ``G`` and ``A``, ``X`` never formed;
* ``gram`` — ``gram`` and ``output-gram``: through a Gram of the positions;
* ``table`` — :data:`~.table.ROUTE_TABLE` and :func:`~.table.choose_route`, which
  iterates it.

The package's ``__init__`` imports none of them: :mod:`kfoc_backpack.solver.factored`
reads :class:`~.route.LayerSizes` while the routes that extend its terms are defined.
"""
