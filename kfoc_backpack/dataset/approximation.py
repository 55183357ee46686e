r"""What every approximation of a data set's curvature is, and the per-batch fit they share.

An :class:`Approximation` turns the passes of a :class:`~kfoc_backpack.dataset.data_pass.DataPass`
into one typed block per trainable parameter (:mod:`kfoc_backpack.blocks`), the
:class:`Fitted` result. The siblings — K-FOC's factors
(:class:`~kfoc_backpack.dataset.kfoc.KFOCFactors`), K-FAC's
(:class:`~kfoc_backpack.dataset.kfac.KFACFactors`), and either in eigenvalue-corrected
form (:mod:`~kfoc_backpack.dataset.correction`) — declare their own arguments as
dataclass fields and know nothing of each other's insides; laplace-torch's Laplace
classes and the BackPACK users' functions call them alike. A new approximation is one
more sibling: its fields and a :meth:`Approximation.fit`.

"Raw" blocks are the curvature of the loss as the data pass reduces it (laplace-torch:
the summed loss, without its likelihood ``factor``): weights as Kronecker factors in
K-FAC's split (``tr R = (1/N) Σ_n ‖â_n‖²`` over all ``N`` inputs), biases and the other
parameters with dense blocks exact.
Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.batch import BatchQuantities
from kfoc_backpack.collect.layer_terms import DenseTerms, LayerTerms
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.enums import Aggregation, Grouped, Reduction, Structure


@dataclass
class Fitted:
    """The raw curvature of one fit (or of the fits so far, online).

    Attributes:
        loss: Summed loss over the fit's data (all ranks).
        blocks: Per trainable parameter (in the parameters' order), its block.
        num_samples: Inputs of the fit's data (all ranks); for an ``earlier`` fit
            handed to :meth:`Approximation.fit`, of the earlier data.
        passes: Passes over the data the fit took.
        iterations: Power iterations of the data-set optimum (its largest over the
            weights; ``0`` for per-batch aggregations).
        converged: Whether every iteration reached its tolerance.
        stored: Whether the data-set optimum kept the per-sample terms in memory.
    """

    loss: Tensor
    blocks: dict[str, Block]
    num_samples: int
    passes: int = 1
    iterations: int = 0
    converged: bool = True
    stored: bool = False


class Approximation(ABC):
    """A structured approximation of a data set's curvature, fitted by passes over it.

    Subclasses are dataclasses whose fields are the arguments a user may set; the
    Laplace classes of :mod:`kfoc_backpack.laplace` take exactly those (anything else
    is a ``TypeError``).
    """

    structure: ClassVar[Structure]
    """laplace-torch's ``hessian_structure`` name of the approximation."""

    supports_damping: ClassVar[bool] = True
    """Whether laplace-torch's ``damping`` (``√δ`` added to each factor) applies."""

    with_kfac: ClassVar[bool] = False
    """Whether the passes collect K-FAC's factors of the samples."""

    block_kinds: ClassVar[tuple[str, ...]] = ("kronecker", "diagonal_kronecker", "dense")
    """The kinds of block (``Block.kind``) the fit produces."""

    @property
    def aggregation(self) -> Aggregation:
        """How per-batch curvature is combined over the data set."""
        return Aggregation.APPROX

    @abstractmethod
    def fit(self, data: DataPass, earlier: Fitted | None = None) -> Fitted:
        """Blocks of ``data``'s curvature, including ``earlier``'s (online) if given.

        ``earlier.blocks`` are the raw blocks of the data of earlier fits
        (``earlier.num_samples`` inputs), the same on every rank; they count once.
        """

    def template(self, zero: Block) -> Block:
        """Return a parameter's zero block in this approximation's structure.

        ``zero`` is the collector's; by default a grouped convolution's groups are
        coupled (:meth:`~kfoc_backpack.blocks.Block.with_structure`), as K-FAC's
        factors couple them.
        """
        return zero.with_structure(Grouped.COUPLED)

    def dense_block(self, terms: DenseTerms) -> Block:
        """Return the block of a parameter with dense terms: its exact block (default).

        Biases, normalisation layers' scales and the other parameters of
        ``BatchQuantities.dense``.
        """
        return terms.exact


WeightBlock = Callable[[str, LayerTerms], Block]
"""``block(name, terms)``: the block an approximation makes of one weight's batch terms."""


def fit_per_batch(
    data: DataPass,
    approximation: Approximation,
    weight_block: WeightBlock,
    aggregation: Aggregation,
    earlier: Fitted | None = None,
) -> Fitted:
    """One pass: every batch's blocks added in each parameter's sum, combined over ranks.

    Weights get ``weight_block``'s block of their batch terms, aggregated as
    ``aggregation`` says; parameters with dense blocks get the approximation's
    :meth:`~Approximation.dense_block`, summed. Earlier blocks (online) enter as one
    more term, on one rank only. A mean reduction divides the sums by the number of
    inputs.

    Args:
        data: The fit's passes.
        approximation: The approximation (its dense blocks, whether it needs K-FAC's
            factors).
        weight_block: A weight's block from its batch terms.
        aggregation: ``approx`` or ``running``.
        earlier: Blocks of earlier data (online) with their number of inputs.

    Returns:
        The blocks (zero for a parameter no batch of any rank used), loss and inputs.
    """
    zeros = {name: approximation.template(zero) for name, zero in data.zero_blocks().items()}
    sums = {name: zero.new_sum(aggregation) for name, zero in zeros.items()}
    if earlier is not None and earlier.num_samples > 0 and data.reducer.rank == 0:
        for name, block in earlier.blocks.items():
            if name in sums:
                sums[name].add(block, earlier.num_samples, 1.0)

    def add(batch: BatchQuantities, scale: float) -> None:
        for name, terms in batch.weights.items():
            sums[name].add(weight_block(name, terms), batch.num_samples, scale)
        for name, dense in batch.dense.items():
            sums[name].add(approximation.dense_block(dense), batch.num_samples, scale)

    local = data.run(add, "[Computing Hessian]", with_kfac=approximation.with_kfac)
    combined = data.combine(sums)
    loss, num_samples = data.totals(*local)
    blocks = {}
    for name, zero in zeros.items():
        block = combined[name][0] if name in combined else zero
        if data.reduction is Reduction.MEAN and num_samples > 0:
            block = block.scaled(1.0 / num_samples)
        blocks[name] = block
    return Fitted(loss, blocks, num_samples)
