"""``EKFOC`` and ``EKFOCExact``: the eigenvalue-corrected K-FOC for BackPACK users.

:class:`KFOC`/:class:`KFOCExact` with another result: the eigenbasis of the batch's K-FOC
factors with the batch block's own eigenvalues in it (docs/conventions.md §9).
"""

from __future__ import annotations

from torch.nn import Module

from kfoc_backpack.blocks import EigenCorrected
from kfoc_backpack.collect.layer_terms import LayerTerms
from kfoc_backpack.extensions.kfoc import KFOC, KFOCBase, KFOCExact


class EKFOCBase(KFOCBase):
    """What :class:`EKFOC` and :class:`EKFOCExact` add: the eigenvalue-corrected result.

    The weight's savefield holds an
    :class:`~kfoc_backpack.blocks.EigenCorrected` block: ``left_basis``
    ``U_L`` and ``right_basis`` ``U_R`` (the eigenvectors of the batch's K-FOC factors)
    and ``diagonal`` ``S`` (``[C_out, C_in·Πkernel]``), the batch block's exact
    diagonal in ``U_L ⊗ U_R`` — the Frobenius-nearest matrix with that eigenbasis, never
    farther from the block than K-FOC's ``L ⊗ R``, and trace-exact. Biases hold their
    exact block ``[B]``.
    """

    def weight_result(self, module: Module, terms: LayerTerms) -> EigenCorrected:
        """Return the K-FOC factors' eigenbasis with the block's own eigenvalues in it."""
        factors = self.solve(module, terms)
        return EigenCorrected.of_terms(terms.terms, factors.left, factors.right)


class EKFOC(EKFOCBase, KFOC):
    """Eigenvalue-corrected K-FOC of the Monte-Carlo Fisher, savefield ``ekfoc``.

    Arguments as :class:`KFOC` (the K-FOC solve whose factors give the basis)::

        with backpack(EKFOC()):
            lossfunc(model(X), y).backward()
        block = model[0].weight.ekfoc      # EigenCorrected
        U_L, U_R, S = block.left_basis, block.right_basis, block.diagonal
    """

    SAVEFIELD = "ekfoc"


class EKFOCExact(EKFOCBase, KFOCExact):
    """Eigenvalue-corrected K-FOC of the exact GGN, savefield ``ekfoc_exact``.

    Arguments as :class:`KFOCExact`; the weight's savefield as :class:`EKFOC`'s.
    """

    SAVEFIELD = "ekfoc_exact"
