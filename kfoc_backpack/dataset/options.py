"""The options of the data-set optimum (docs/conventions.md §4).

The aggregations and reductions are :class:`~kfoc_backpack.enums.Aggregation` and
:class:`~kfoc_backpack.enums.Reduction`.

Index conventions of the data-set level: ``p`` batches, ``n_p`` inputs of batch ``p``,
``N = Σ_p n_p`` inputs in all, ``s_p`` the scale of batch ``p``'s block in the target
(``1`` for a loss with ``reduction="sum"``, ``n_p`` for ``"mean"``), ``M``/``N_in``
sizes of a weight's left (output) and right (input) factors, ``W`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MEMORY = 1 << 30
"""Bytes of per-sample terms ``"optimal"`` keeps in memory by default."""

DEFAULT_OPTIMAL_TOL = 1e-6
"""Tolerance of ``"optimal"``'s power method (change of the unit-norm left factor)."""

DEFAULT_MAX_PASSES = 50
"""Cap on ``"optimal"``'s iterations (stored terms) or passes over the data (streaming)."""


@dataclass(frozen=True)
class OptimalOptions:
    """Options of the data-set optimum (``aggregation="optimal"``).

    Attributes:
        tol: Stop once the unit-norm left factor changes by less than ``tol``
            (Frobenius norm) in an iteration.
        max_passes: Cap on iterations over stored terms, or on passes over the data
            (the first one included) when streaming.
        store_terms: Keep the per-sample terms in memory (``True``), stream over the
            data (``False``), or keep them while they fit into ``max_memory`` bytes
            (``None``).
        max_memory: Byte budget of the stored terms when ``store_terms`` is ``None``
            (per process).

    Raises:
        ValueError: For a non-positive ``tol`` or ``max_passes``, or a negative
            ``max_memory``.
    """

    tol: float = DEFAULT_OPTIMAL_TOL
    max_passes: int = DEFAULT_MAX_PASSES
    store_terms: bool | None = None
    max_memory: int = DEFAULT_MAX_MEMORY

    def __post_init__(self) -> None:
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol!r}.")
        if int(self.max_passes) != self.max_passes or self.max_passes < 1:
            raise ValueError(f"max_passes must be a positive integer, got {self.max_passes!r}.")
        if self.max_memory < 0:
            raise ValueError(f"max_memory must be non-negative, got {self.max_memory!r}.")
        object.__setattr__(self, "max_passes", int(self.max_passes))
