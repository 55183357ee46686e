"""Solver layer: Frobenius-optimal Kronecker products of structured sums.

Pure tensor maths on any device and floating dtype; knows nothing of BackPACK or
laplace-torch.
"""

from kfoc_backpack.solver._common import (
    DEFAULT_EXACT_MAX_TERMS,
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    KroneckerFactors,
    SolverOptions,
)
from kfoc_backpack.solver.aggregation import AGGREGATIONS, KroneckerAccumulator
from kfoc_backpack.solver.error import kron_error_dense, kron_error_outer, kron_error_samples
from kfoc_backpack.solver.factored import FactoredTerms, nearest_kronecker_factored
from kfoc_backpack.solver.kronecker import (
    merge_kronecker,
    nearest_kronecker_outer,
    nearest_kronecker_samples,
    nearest_kronecker_sum,
)
from kfoc_backpack.solver.terms import OuterTerms, SampleTerms, nearest_kronecker_terms

__all__ = [
    "AGGREGATIONS",
    "KroneckerAccumulator",
    "DEFAULT_EXACT_MAX_TERMS",
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "FactoredTerms",
    "KroneckerFactors",
    "OuterTerms",
    "SampleTerms",
    "SolverOptions",
    "kron_error_dense",
    "kron_error_outer",
    "kron_error_samples",
    "merge_kronecker",
    "nearest_kronecker_factored",
    "nearest_kronecker_outer",
    "nearest_kronecker_samples",
    "nearest_kronecker_sum",
    "nearest_kronecker_terms",
]
