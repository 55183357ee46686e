"""Data-set level: approximations fitted over the batches of a loader, and over ranks.

* :mod:`~kfoc_backpack.dataset.data_pass` — :class:`DataPass`, the passes of one fit
  over its data (batches, Monte-Carlo seeds, reductions, ranks, progress bar): the one
  loop over a loader;
* :mod:`~kfoc_backpack.dataset.approximation` — what an approximation is
  (:class:`Approximation`, its :class:`Fitted` result) and the per-batch fit they share;
* :mod:`~kfoc_backpack.dataset.kfoc`, :mod:`~kfoc_backpack.dataset.kfac`,
  :mod:`~kfoc_backpack.dataset.correction` — the siblings: K-FOC's factors (with
  :mod:`~kfoc_backpack.dataset.optimal`, the data-set optimum), K-FAC's, and either
  eigenvalue-corrected;
* :mod:`~kfoc_backpack.dataset.distributed` — the reductions across
  ``torch.distributed`` ranks;
* :mod:`~kfoc_backpack.dataset.fits`, :mod:`~kfoc_backpack.dataset.accumulator` —
  ``optimal_factors``, ``eigenvalue_correction`` and ``KFOCAccumulator`` for users of
  the plain BackPACK extensions;
* :mod:`~kfoc_backpack.dataset.options` — the options of the data-set optimum.
"""

from kfoc_backpack.dataset.accumulator import KFOCAccumulator
from kfoc_backpack.dataset.approximation import Approximation, Fitted
from kfoc_backpack.dataset.correction import (
    EigenCorrection,
    EKFACFactors,
    EKFOCFactors,
    corrected_blocks,
)
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.dataset.distributed import Communication, DistributedFitError
from kfoc_backpack.dataset.fits import OptimalFactors, eigenvalue_correction, optimal_factors
from kfoc_backpack.dataset.kfac import KFACFactors
from kfoc_backpack.dataset.kfoc import KFOCFactors
from kfoc_backpack.dataset.options import DEFAULT_MAX_MEMORY, OptimalOptions

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "Approximation",
    "Communication",
    "DataPass",
    "DistributedFitError",
    "EKFACFactors",
    "EKFOCFactors",
    "EigenCorrection",
    "Fitted",
    "KFACFactors",
    "KFOCAccumulator",
    "KFOCFactors",
    "OptimalFactors",
    "OptimalOptions",
    "corrected_blocks",
    "eigenvalue_correction",
    "optimal_factors",
]
