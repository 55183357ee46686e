r"""What a route of a weight shared over positions declares, and the sizes it reads.

A weight shared over ``T`` positions (a convolution at its output positions, a
``Linear`` on tokens, a layer called several times) has per-sample matrices
``X_{j,k} = G_{j,k}ᵀ A_k`` (docs/conventions.md §1). Its nearest Kronecker product can
be solved along several equivalent *routes*; each is one subclass of
:class:`RouteTerms` that is at once the terms type the solver gets (a subclass of
:class:`~kfoc_backpack.solver.SampleTerms`, :class:`~kfoc_backpack.solver.FactoredTerms`
or :class:`~kfoc_backpack.solver.OuterTerms`, with that type's half-steps and the rest
of the terms protocol) and its own entry in the route table
(:mod:`~kfoc_backpack.solver.shared.table`): its name, the sizes it supports, its flops,
working memory and dispatched operations per Lanczos step for a layer of
:class:`LayerSizes`, how it is built from the layer's positions, whether its solve
runs Lanczos, and its special rules against the others.

Also here: :func:`krylov_solve`, the Lanczos solve the routes share, and
:func:`lanczos_steps`, the steps a solve ran (the unit of the flop counts).

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features (left factor ``[M, M]``), ``N`` input features (right ``[N, N]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from kfoc_backpack.enums import Route
from kfoc_backpack.solver._common import KroneckerFactors, SolverOptions
from kfoc_backpack.solver.coefficient import check_every
from kfoc_backpack.solver.krylov import lanczos_top
from kfoc_backpack.solver.scale import fetched_split, finalize, pair_scalars


class LayerSizes(NamedTuple):
    """What the solver is handed, in numbers: ``X_{j,k} = G_{j,k}ᵀ A_k``.

    Attributes:
        columns: ``J``, output-side vectors per input (MC samples, Hessian-root columns).
        samples: ``K``, inputs of the batch.
        positions: ``T``, positions sharing the weight (1 for a rank-one layer).
        out_features: ``M``, rows of the weight matrix (left factor ``[M, M]``).
        in_features: ``N``, columns of the weight matrix (right factor ``[N, N]``): a
            grouped convolution's input features per group.
        groups: The convolution's ``groups`` (1 otherwise).
    """

    columns: int
    samples: int
    positions: int
    out_features: int
    in_features: int
    groups: int = 1


def kfac_cost(sizes: LayerSizes) -> int:
    """Multiply-adds of K-FAC's factors of the same layer, ``K·T·N² + J·K·T·M²``."""
    cols, num, pos, m, n = sizes[:5]
    return num * pos * n * n + cols * num * pos * m * m


class RouteTerms:
    """Base of the routes of the table: a terms class that declares its own costs.

    A route derives from this class and from the solver's terms type it extends, sets
    :attr:`route` and ``ops_per_step``, and overrides :meth:`flops`,
    :meth:`working_bytes` and :meth:`from_positions` (and, where they differ from the
    defaults, :meth:`supports`, :meth:`takes_precedence`, :meth:`defers_to` and
    :meth:`runs_lanczos`). Listed in :data:`~kfoc_backpack.solver.shared.table.ROUTE_TABLE`,
    it is a candidate of :func:`~kfoc_backpack.solver.shared.table.choose_route` and can
    be forced by name; the chooser knows nothing else of it.

    Attributes:
        route: The route's name, as recorded in ``SolveRecord.route``.
        ops_per_step: Dispatched operations per Lanczos step (half-steps plus
            re-orthogonalisation), each worth a launch on accelerators.
    """

    route: ClassVar[Route]
    ops_per_step: ClassVar[int]

    @classmethod
    def supports(cls, sizes: LayerSizes) -> bool:
        """Whether the route can be built for a layer of ``sizes`` (default: ungrouped)."""
        return sizes.groups == 1

    @classmethod
    def flops(cls, sizes: LayerSizes, steps: int) -> int:
        """Multiply-adds of a solve of ``steps`` Lanczos steps (set-up and end included)."""
        raise NotImplementedError(f"{cls.__name__} declares no flops.")

    @classmethod
    def working_bytes(cls, sizes: LayerSizes, itemsize: int) -> float:
        """Working memory beyond the layer's inputs and vectors, in bytes."""
        raise NotImplementedError(f"{cls.__name__} declares no working memory.")

    @classmethod
    def takes_precedence(cls, sizes: LayerSizes, accelerator: bool) -> bool:
        """Whether the route is taken without counting costs, where it is a candidate."""
        return False

    @classmethod
    def defers_to(cls, sizes: LayerSizes, accelerator: bool) -> Route | None:
        """Return the route taken instead where this one has the least cost, or ``None``."""
        return None

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int = 1) -> RouteTerms:
        """Build the route's terms of a layer from its positions.

        Args:
            grads: ``[J, K, T, M]`` output-side vectors at the positions (any strides).
            inputs: ``[K, T, N·groups]`` inputs at the positions (any strides; a
                grouped layer's span all groups' input features).
            groups: Rows of the weight in ``groups`` blocks that see disjoint blocks of
                the input features (a grouped convolution's ``groups``).
        """
        raise NotImplementedError(f"{cls.__name__} cannot be built from positions.")

    def runs_lanczos(self) -> bool:
        """Whether ``solve`` of these terms runs :func:`krylov_solve` (default: yes)."""
        return True


def lanczos_steps(terms: object, factors: KroneckerFactors) -> int | None:
    """Return the Lanczos steps a solve of ``terms`` took (``None``: it ran no Lanczos).

    The unit of the routes' :meth:`~RouteTerms.flops`: a route's terms that
    :meth:`~RouteTerms.runs_lanczos` (every route but ``rank-one``, and ``formed`` on
    accelerators and on tiny layers) give their iterations; other terms ``None``.

    Args:
        terms: The terms that were solved.
        factors: What their solve returned.
    """
    runs = getattr(terms, "runs_lanczos", None)
    if runs is None or not runs():
        return None
    return int(factors.iterations)


def krylov_solve(
    apply: Callable[[Tensor], Tensor],
    to_right: Callable[[Tensor], Tensor],
    start: Tensor,
    opts: SolverOptions,
    out_dtype: torch.dtype,
    right_trace: Tensor | float | None,
    what: str,
    symmetric_right: bool = False,
) -> KroneckerFactors:
    """Lanczos on ``S = apply``, ``R = to_right(L)`` once, then the shared conventions.

    ``L`` is symmetrised here; ``to_right`` of a symmetric ``L`` must return an exactly
    symmetric ``R`` when ``symmetric_right`` (then ``finalize`` skips its ``R + Rᵀ``,
    which costs as much as forming ``R`` for wide layers), else ``finalize`` symmetrises.

    Args:
        apply: ``[M, M] → [M, M]``, the left power map ``S``.
        to_right: ``[M, M] → [N, N]``, ``L ↦ Σ_k X_kᵀ L X_k``.
        start: ``[M, M]`` start of the left factor.
        opts: Solver options (``tol``, ``max_iter``).
        out_dtype: Dtype of the returned factors.
        right_trace: Target trace of the right factor, or ``None`` (even split).
        what: Name for error messages.
        symmetric_right: Whether ``to_right`` of a symmetric ``L`` is exactly symmetric.

    Returns:
        The optimal factors; ``iterations`` counts applications of ``S``.
    """
    left, steps, converged = lanczos_top(
        apply, start, opts.tol, opts.max_iter, check_every(start.device), opts.stop
    )
    if not symmetric_right:
        left, right = finalize(left, to_right(left), out_dtype, right_trace=right_trace, what=what)
        return KroneckerFactors(left, right, steps, converged)
    left = (left + left.T) / 2
    right = to_right(left)
    # finalize's split, scaling the [N, N] factor in place (no second N × N buffer)
    _, _, _, scalars = pair_scalars(left, right, symmetric=False, right_trace=right_trace)
    c_left, c_right = fetched_split(torch.stack(scalars).tolist(), right_trace, what)
    return KroneckerFactors(
        (left * c_left).to(out_dtype), right.mul_(c_right).to(out_dtype), steps, converged
    )
