r"""The eigenvalue correction over a data set: one pass once the bases are known.

For each weight with Kronecker factors fitted over the data (K-FOC's, K-FAC's), the
corrected eigenvalues of the data set's block in the factors' eigenbasis
``U_L ⊗ U_R`` are the sum over batches (and ``torch.distributed`` ranks) of each batch's
diagonal in that basis (docs/conventions.md §9):

.. math::
    S = Σ_p s_p \, S_p , \qquad S_p[i, j] = Σ_{k ∈ p} ((U_Lᵀ X_k U_R)[i, j])^2 ,

with ``s_p = 1`` for batches of a summed loss and ``s_p = n_p`` (then divided by ``N``)
for a mean reduction. Sums are exact under any split of the data into batches and
ranks. The pass draws the same Monte-Carlo labels as the factors' passes (one
:class:`~kfoc_backpack.dataset.data_pass.DataPass` per fit).

:class:`EigenCorrection` puts the correction after any approximation's fit:
``EKFOCFactors`` (``hessian_structure="ekfoc"``) and ``EKFACFactors`` (``"ekfac"``).
Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfoc_backpack.blocks import Block, EigenCorrected
from kfoc_backpack.collect.batch import BatchQuantities
from kfoc_backpack.collect.layer_terms import DenseTerms
from kfoc_backpack.dataset.approximation import Approximation, Fitted
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.dataset.kfac import KFACFactors
from kfoc_backpack.dataset.kfoc import KFOCFactors
from kfoc_backpack.dataset.options import DEFAULT_MAX_MEMORY
from kfoc_backpack.enums import Aggregation, Reduction, Structure


def corrected_blocks(data: DataPass, bases: dict[str, EigenCorrected]) -> dict[str, EigenCorrected]:
    """Return the data set's eigenvalues ``S`` in each weight's basis: one pass over ``data``.

    The factors' pass's batches that ``data`` kept (:meth:`DataPass.keep
    <kfoc_backpack.dataset.data_pass.DataPass.keep>`) from memory, the others read again
    (:meth:`DataPass.revisit <kfoc_backpack.dataset.data_pass.DataPass.revisit>`).

    Args:
        data: The fit's passes (the same labels as the factors' passes).
        bases: Per weight name, its eigenbasis
            (:meth:`~kfoc_backpack.blocks.Block.corrected_basis`), the same on every rank.

    Returns:
        Per name of ``bases``, the basis with the data set's ``S`` (zero for a weight
        no batch used).

    Raises:
        ValueError: For a name of ``bases`` that the collection gives no per-sample
            terms (not a weight).
    """
    sums = {name: basis.new_sum(Aggregation.APPROX) for name, basis in bases.items()}

    def add(batch: BatchQuantities, scale: float) -> None:
        for name, total in sums.items():
            terms = batch.weights.get(name)
            if terms is None:
                if name in batch.dense:
                    raise ValueError(f"corrected eigenvalues: {name!r} is not a weight.")
                continue
            basis = bases[name]
            total.add(basis.with_diagonal(basis.diagonal_of(terms.terms)), batch.num_samples, scale)

    local = data.revisit(add, "[eigenvalue correction]")
    combined = data.combine(sums)
    num_samples = data.totals(*local)[1] if data.reduction is Reduction.MEAN else 0
    result = {}
    for name, basis in bases.items():
        block = combined[name][0] if name in combined else basis
        if num_samples > 0:
            block = block.scaled(1.0 / num_samples)
        result[name] = block
    return result  # type: ignore[return-value]


class EigenCorrection(Approximation):
    """The eigenbasis of an approximation's factors with the data set's own eigenvalues.

    Put before the approximation it corrects (``class EKFOCFactors(EigenCorrection,
    KFOCFactors)``): the approximation fits its factors, then one more pass gives each
    weight's ``S`` in their eigenbasis (:func:`corrected_blocks`; from the factors' pass's
    per-sample terms kept in memory — those that fit in :attr:`replay_memory`, and its last
    batch's — and the other batches read again) — never farther from the block in the
    Frobenius norm than ``L ⊗ R``, and trace-exact. Biases stay exact.
    Online, the earlier factors enter the approximation's fit as one more term, and the
    earlier ``S`` is projected onto the new basis
    (:meth:`~kfoc_backpack.blocks.EigenCorrected.projected`) and added.
    """

    supports_damping = False
    block_kinds = ("corrected", "grouped_corrected", "diagonal_corrected", "dense")
    replay_memory: int = DEFAULT_MAX_MEMORY
    """Byte budget of the factors' pass's per-sample terms kept for the correction
    (besides its last batch's): the kept batches are not read again."""

    def dense_block(self, terms: DenseTerms) -> Block:
        """Return a bias's exact block (whatever the corrected approximation's own)."""
        return terms.exact

    def fit(self, data: DataPass, earlier: Fitted | None = None) -> Fitted:
        """Fit the factors, then ``S`` in one pass (plus the earlier ``S`` projected)."""
        uncorrected = None
        if earlier is not None:
            factors = {name: block.uncorrected() for name, block in earlier.blocks.items()}
            uncorrected = Fitted(earlier.loss, factors, earlier.num_samples)
        data.keep(self.replay_memory)
        fitted = super().fit(data, uncorrected)  # type: ignore[safe-super]
        bases = {}
        for name, block in fitted.blocks.items():
            basis = block.corrected_basis(f"'{name}'")
            if basis is not None:
                bases[name] = basis
        corrected = corrected_blocks(data, bases)  # type: ignore[arg-type]
        blocks: dict[str, Block] = {}
        for name, block in fitted.blocks.items():
            if name not in corrected:
                blocks[name] = block
                continue
            new = corrected[name]
            old = None if earlier is None else earlier.blocks.get(name)
            if old is not None:
                new = new.with_diagonal(new.diagonal + old.projected(new))  # type: ignore[attr-defined]
            blocks[name] = new
        return Fitted(
            fitted.loss,
            blocks,
            fitted.num_samples,
            data.passes,
            fitted.iterations,
            fitted.converged,
            fitted.stored,
        )


@dataclass
class EKFOCFactors(EigenCorrection, KFOCFactors):
    """The eigenvalue-corrected K-FOC (``hessian_structure="ekfoc"``): arguments as K-FOC's."""

    structure = Structure.EKFOC

    @property
    def replay_memory(self) -> int:  # type: ignore[override]
        """K-FOC's ``max_memory``: the budget of every kept per-sample term."""
        return self.max_memory


@dataclass
class EKFACFactors(EigenCorrection, KFACFactors):
    """EK-FAC (``hessian_structure="ekfac"``): K-FAC's eigenbasis, the data's eigenvalues."""

    structure = Structure.EKFAC
