r"""K-FAC's factors of the same per-sample quantities, the reference of K-FOC.

Per weight, K-FAC's ``Σ_p L_p ⊗ Σ_p (n_p/N) R_p`` (KFC for weights shared over positions,
in laplace-torch's split, :meth:`~kfoc_backpack.collect.layer_terms.LayerTerms.kfac_block`):
left factors summed, right factors averaged over the inputs, whatever the batches — the
factors of laplace-torch's ``kron`` with its default backend. Biases get their exact
blocks (laplace-torch's ``kron`` approximates a convolution's bias block by treating its
positions as samples). Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfoc_backpack.blocks import Block, KroneckerBlock
from kfoc_backpack.collect.layer_terms import DenseTerms, LayerTerms
from kfoc_backpack.dataset.approximation import Approximation, Fitted, fit_per_batch
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.enums import Aggregation, Structure


@dataclass
class KFACFactors(Approximation):
    """K-FAC's factors of the data set's blocks (``hessian_structure="kfac"``).

    No arguments: K-FAC's factors are sums over the batches.
    """

    structure = Structure.KFAC
    with_kfac = True

    def fit(self, data: DataPass, earlier: Fitted | None = None) -> Fitted:
        """K-FAC's blocks; earlier factors are added (weighted by inputs)."""
        return fit_per_batch(data, self, self._batch_block, Aggregation.APPROX, earlier)

    def dense_block(self, terms: DenseTerms) -> Block:
        """Return K-FAC's bias block: positions counted as samples (laplace-torch's)."""
        return terms.kfac_block()

    @staticmethod
    def _batch_block(name: str, terms: LayerTerms) -> KroneckerBlock:
        return terms.kfac_block()
