"""Data-set level: K-FOC factors aggregated over the batches of a loader, and over ranks.

* :mod:`~kfoc_backpack.dataset.options` — aggregation and reduction names, the options
  of the data-set optimum;
* :mod:`~kfoc_backpack.dataset.blocks` — one parameter's aggregate over batches;
* :mod:`~kfoc_backpack.dataset.power`, :mod:`~kfoc_backpack.dataset.optimal` — the
  data-set optimum (power method over stored terms or passes over the data);
* :mod:`~kfoc_backpack.dataset.distributed` — the reductions across
  ``torch.distributed`` ranks;
* :mod:`~kfoc_backpack.dataset.correction` — the eigenvalue correction in given bases
  (one pass over the data);
* :mod:`~kfoc_backpack.dataset.for_backpack` — ``KFOCAccumulator``, ``optimal_factors``
  and ``eigenvalue_correction`` for users of the plain BackPACK extensions.
"""

from kfoc_backpack.dataset.blocks import BlockAccumulator, KroneckerTerm
from kfoc_backpack.dataset.distributed import Communication, DistributedFitError
from kfoc_backpack.dataset.for_backpack import (
    KFOCAccumulator,
    eigenvalue_correction,
    optimal_factors,
)
from kfoc_backpack.dataset.optimal import OptimalFactors, solve_optimal
from kfoc_backpack.dataset.options import (
    AGGREGATIONS,
    BATCH_AGGREGATIONS,
    DEFAULT_MAX_MEMORY,
    REDUCTIONS,
    OptimalOptions,
)

__all__ = [
    "AGGREGATIONS",
    "BATCH_AGGREGATIONS",
    "DEFAULT_MAX_MEMORY",
    "REDUCTIONS",
    "BlockAccumulator",
    "Communication",
    "DistributedFitError",
    "KFOCAccumulator",
    "KroneckerTerm",
    "OptimalFactors",
    "OptimalOptions",
    "eigenvalue_correction",
    "optimal_factors",
    "solve_optimal",
]
