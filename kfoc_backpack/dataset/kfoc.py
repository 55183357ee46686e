r"""K-FOC's Frobenius-optimal factors of a data set, aggregated over its batches.

Per weight, ``L ⊗ R`` nearest to the data set's block (docs/conventions.md §1, §4): per
batch the optimum of the batch's block, aggregated factor-wise (``approx``) or by the
optimal product of the estimate and each batch (``running``), or the data set's own
optimum (``optimal``, :mod:`~kfoc_backpack.dataset.optimal`). Biases keep their exact
blocks. Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.layer_terms import LayerTerms
from kfoc_backpack.dataset.approximation import Approximation, Fitted, WeightBlock, fit_per_batch
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.dataset.optimal import OptimalSolver
from kfoc_backpack.dataset.options import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PASSES,
    DEFAULT_OPTIMAL_TOL,
    OptimalOptions,
)
from kfoc_backpack.enums import Aggregation, Grouped, Structure
from kfoc_backpack.solver import SolverOptions


@dataclass
class KFOCFactors(Approximation):
    """K-FOC's factors of the data set's blocks (``hessian_structure="kfoc"``).

    Args:
        aggregation: ``"running"`` (default, the paper's K-FOC_running), ``"approx"``
            (K-FOC_approx: factor-wise sums) or ``"optimal"`` (the data set's
            Frobenius-optimal factors, warm-started from ``"running"``).
        tol: Power-method tolerance of ``"optimal"`` (change of the unit-norm left
            factor).
        max_passes: Cap on ``"optimal"``'s iterations (terms in memory) or passes over
            the data (streaming).
        store_terms: ``"optimal"`` keeps the per-sample terms in memory (``True``),
            streams over the data (``False``) or decides by ``max_memory`` (``None``).
        max_memory: Byte budget for the per-sample terms of ``"optimal"``.
        grouped: The block of a grouped convolution's weight
            (:class:`~kfoc_backpack.enums.Grouped`): ``"coupled"`` (default: one
            product over all rows) or ``"per-group"`` (one per group, cheaper).

    Raises:
        ValueError: For an unknown aggregation or invalid options.
    """

    aggregation: Aggregation | str = Aggregation.RUNNING  # type: ignore[assignment]
    tol: float = DEFAULT_OPTIMAL_TOL
    max_passes: int = DEFAULT_MAX_PASSES
    store_terms: bool | None = None
    max_memory: int = DEFAULT_MAX_MEMORY
    grouped: Grouped | str = Grouped.COUPLED  # type: ignore[assignment]
    structure = Structure.KFOC
    block_kinds = ("kronecker", "grouped_kronecker", "diagonal_kronecker", "dense")

    def __post_init__(self) -> None:
        self.aggregation = Aggregation.parse(self.aggregation, "aggregation")
        self.grouped = Grouped.parse(self.grouped, "grouped")
        self.options = OptimalOptions(self.tol, self.max_passes, self.store_terms, self.max_memory)
        self.solver_options: SolverOptions | None = None
        """Options of the per-batch solves (``None``: the defaults; a laplace-torch
        backend's own ``tol``/``max_iter`` under laplace-torch)."""
        self.init: dict[str, Tensor] = {}
        """Warm starts ``[M, M]`` of ``"optimal"``'s left factors, by weight name
        (default: the running aggregate)."""

    def fit(self, data: DataPass, earlier: Fitted | None = None) -> Fitted:
        """K-FOC's blocks; earlier blocks enter the aggregation as one more term."""
        if not self.aggregation.per_batch:
            return OptimalSolver(data, self.options, self.init, self.grouped).solve(earlier)

        block = self.weight_block(data.owner, data.params)
        return fit_per_batch(data, self, block, self.aggregation, earlier)

    def weight_block(self, owner: str, params: Mapping[str, Tensor]) -> WeightBlock:
        """Return a batch's K-FOC block of a weight, its failures and warnings naming the weight.

        Args:
            owner: The fit, for messages (e.g. ``"KFOCLaplace"``).
            params: The parameters by name (their shapes name the weight).
        """

        def block(name: str, terms: LayerTerms) -> Block:
            what = f"{owner}: the K-FOC solve of '{name}' {tuple(params[name].shape)}"
            return terms.with_structure(self.grouped).kfoc_block(self.solver_options, what=what)

        return block

    def template(self, zero: Block) -> Block:
        """Return the zero block in this fit's structure (a grouped weight's as ``grouped``)."""
        return zero.with_structure(self.grouped)  # type: ignore[arg-type]
