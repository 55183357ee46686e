"""``KFOCTerms``: each weight's per-sample quantities instead of its factors.

The extension the data-set functions (:mod:`kfoc_backpack.dataset.fits`) and the paper's
comparison collect through; also the one place that says which curvature targets
BackPACK's route backpropagates (:meth:`KFOCTerms.check_curvature`).
"""

from __future__ import annotations

import warnings

from backpack.extensions.backprop_extension import FAIL_ERROR
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from torch.nn import Module

from kfoc_backpack.collect.layer_terms import LayerTerms
from kfoc_backpack.enums import Curvature
from kfoc_backpack.extensions.kfoc import KFOCBase


class KFOCTerms(KFOCBase):
    """Store each weight's per-sample quantities instead of solving (savefield ``kfoc_terms``).

    ``weight.kfoc_terms`` is a :class:`~kfoc_backpack.collect.layer_terms.LayerTerms`:
    the structured block ``F`` (``OuterTerms`` for a ``Linear`` on 2-d input, the
    route's terms for weights shared over positions), K-FOC's input trace and, with
    ``with_kfac``, K-FAC's factors of the same samples. It is what aggregation over a
    data set and the paper's comparison build on: every estimator and the ground truth
    from one backward pass with shared samples. ``bias.kfoc_terms`` is ``[B]``, the
    exact bias block.

    Args:
        curvature: ``"mc"`` (Monte-Carlo Fisher, default) or ``"ggn"`` (exact GGN)
            (:class:`~kfoc_backpack.enums.Curvature`).
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
        fail_mode: ``'ERROR'``, ``'WARNING'`` or ``'SILENT'`` (see :class:`KFOCBase`).
        with_kfac: Also compute K-FAC's factors of the same samples.
        exact: Deprecated spelling of ``curvature`` (``True``: ``"ggn"``).

    Raises:
        ValueError: For a curvature BackPACK's route does not backpropagate.
    """

    def __init__(
        self,
        curvature: Curvature | str = Curvature.MC,
        mc_samples: int = 1,
        fail_mode: str = FAIL_ERROR,
        with_kfac: bool = True,
        *,
        exact: bool | None = None,
    ):
        self.curvature = self.check_curvature(curvature, exact)
        strategy = (
            LossHessianStrategy.EXACT
            if self.curvature is Curvature.GGN
            else LossHessianStrategy.SAMPLING
        )
        super().__init__(strategy, "kfoc_terms", fail_mode=fail_mode, mc_samples=mc_samples)
        self.with_kfac = with_kfac

    @staticmethod
    def check_curvature(curvature: Curvature | str | bool, exact: bool | None = None) -> Curvature:
        """Return the target BackPACK's route backpropagates: ``"ggn"`` or ``"mc"``.

        Args:
            curvature: A :class:`~kfoc_backpack.enums.Curvature` or its value (a bool is
                read as the deprecated ``exact``).
            exact: Deprecated: ``True`` for ``"ggn"``, ``False`` for ``"mc"``.

        Raises:
            ValueError: For ``"ef"`` (BackPACK's square root has no empirical Fisher)
                or an unknown value.
        """
        if isinstance(curvature, bool):
            curvature, exact = Curvature.MC, curvature
        if exact is not None:
            warnings.warn(
                "exact= is deprecated; pass curvature='ggn' (exact=True) or curvature='mc'.",
                DeprecationWarning,
                stacklevel=3,
            )
            return Curvature.GGN if exact else Curvature.MC
        target = Curvature.parse(curvature, "curvature")
        if target is Curvature.EF:
            raise ValueError(
                "curvature='ef': BackPACK's route backpropagates the exact GGN ('ggn') and "
                "the Monte-Carlo Fisher ('mc'); for the empirical Fisher use the hook "
                "route (kfoc_backpack.collect.hooks.TermCollector, KFOCEFBackend)."
            )
        return target

    def weight_result(self, module: Module, terms: LayerTerms) -> LayerTerms:
        """Return the terms themselves."""
        return terms
