"""Solver layer: Frobenius-optimal Kronecker products of structured sums.

Pure tensor maths on any device and floating dtype; knows nothing of BackPACK or
laplace-torch.

Every solver returns :class:`KroneckerFactors` ``(left, right, iterations, converged)``
with ``left ⊗ right ≈ F`` optimal in the Frobenius norm, and follows the same
conventions (see :func:`~kfoc_backpack.solver.scale.finalize`): symmetric factors, sign
fixed by ``tr(left) ≥ 0`` (both factors positive semi-definite when ``F`` is), scale
split evenly (``‖left‖_F = ‖right‖_F``), the input's device and dtype, all-zero input
giving all-zero factors. Vectorisation is PyTorch's row-major one, so
``torch.kron(left, right)`` is directly comparable with ``F``.

Modules, by structure of ``F``:

* ``sum`` — ``F = Σ_k w_k L_k ⊗ R_k`` (paper Algorithm 1) and the two-term merge;
* ``samples`` — ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` (paper Algorithm 2; convolutions);
* ``outer`` — ``F = Σ_k (S_kᵀ S_k) ⊗ (a_k a_kᵀ)`` (``Linear`` layers);
* ``factored`` — ``X_{j,k} = G_{j,k}ᵀ A_k`` over shared positions, never formed (and
  the two routes of its diagonal);
* ``shared`` — a weight shared over positions (convolutions, ``Linear`` on tokens)
  solved along one of the routes of one table (rank-one, formed, factored, position
  Gram, output Gram, operator), each route one class that declares its costs
  (``shared.route``, one module per family), chosen by ``shared.table``, iterated by
  ``krylov`` (Lanczos), ``R`` formed by ``symmetric``;
* ``terms`` — the per-sample terms as objects, and blocks of them summed;
* ``aggregation`` — Kronecker factors aggregated over batches;
* ``correction`` — eigenvalue correction: the block's own diagonal in the factors'
  eigenbasis (EK-FAC's correction, in any basis);

and the pieces they share: ``gram`` (coefficient-space power method), ``power``
(factor-space power method and half-steps), ``coefficient`` (the coefficient-space
solve, and where each solver takes it), ``scale`` (sign and scale split), ``error``
(Frobenius error), ``_common`` (options, result type, device, starts).

Index conventions of this package: ``K`` terms (samples), ``J`` columns per sample,
``T`` shared positions, ``M`` output features (left factor ``[M, M]``), ``N`` input
features (right factor ``[N, N]``).
"""

from kfoc_backpack.solver._common import (
    DEFAULT_EXACT_MAX_TERMS,
    DEFAULT_MAX_ITER,
    DEFAULT_STOP,
    DEFAULT_TOL,
    KroneckerFactors,
    SolverOptions,
    accelerator_routes,
    launch_bound,
)
from kfoc_backpack.solver.aggregation import KroneckerAccumulator
from kfoc_backpack.solver.error import (
    kron_error_dense,
    kron_error_from,
    kron_error_outer,
    kron_error_samples,
)
from kfoc_backpack.solver.factored import (
    DIAGONAL_ROUTES,
    FactoredTerms,
    choose_diagonal_route,
    diagonal_flops,
    nearest_kronecker_factored,
)
from kfoc_backpack.solver.outer import nearest_kronecker_outer, outer_gram_left
from kfoc_backpack.solver.samples import nearest_kronecker_samples
from kfoc_backpack.solver.shared.route import LayerSizes, RouteTerms
from kfoc_backpack.solver.shared.table import ROUTE_TABLE, choose_route, route_flops
from kfoc_backpack.solver.sum import merge_kronecker, nearest_kronecker_sum
from kfoc_backpack.solver.terms import OuterTerms, SampleTerms, nearest_kronecker_terms

__all__ = [
    "DIAGONAL_ROUTES",
    "KroneckerAccumulator",
    "DEFAULT_EXACT_MAX_TERMS",
    "DEFAULT_MAX_ITER",
    "DEFAULT_STOP",
    "DEFAULT_TOL",
    "FactoredTerms",
    "KroneckerFactors",
    "LayerSizes",
    "OuterTerms",
    "ROUTE_TABLE",
    "RouteTerms",
    "SampleTerms",
    "SolverOptions",
    "accelerator_routes",
    "choose_diagonal_route",
    "choose_route",
    "diagonal_flops",
    "kron_error_dense",
    "kron_error_from",
    "kron_error_outer",
    "kron_error_samples",
    "launch_bound",
    "merge_kronecker",
    "nearest_kronecker_factored",
    "nearest_kronecker_outer",
    "nearest_kronecker_samples",
    "nearest_kronecker_sum",
    "nearest_kronecker_terms",
    "outer_gram_left",
    "route_flops",
]
