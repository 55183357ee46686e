"""BackPACK's collection route as a :class:`~kfoc_backpack.collect.batch.Collector`.

One backward pass inside ``with backpack(KFOCTerms(...))`` per batch gives every weight's
per-sample :class:`~kfoc_backpack.collect.layer_terms.LayerTerms` and every bias's exact
block, as the hook route's :class:`~kfoc_backpack.collect.hooks.TermCollector` does; the
data-set functions (:func:`~kfoc_backpack.optimal_factors`,
:func:`~kfoc_backpack.eigenvalue_correction`) read batches through it. The model and
loss are extended only during a call; ``.grad`` is left as it was.
"""

from __future__ import annotations

import torch
from backpack import backpack
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.batch import BatchQuantities, batch_size, model_zero_blocks
from kfoc_backpack.collect.layer_terms import DenseTerms, LayerTerms
from kfoc_backpack.enums import Curvature
from kfoc_backpack.extensions.lifetime import extended, preserved_grads
from kfoc_backpack.extensions.terms import KFOCTerms


class BackPACKCollector:
    """Per-sample quantities of one batch by BackPACK (``KFOCTerms``).

    Args:
        model: The model (``Linear``/``Conv*`` layers may have trainable parameters).
        lossfunc: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        curvature: ``"ggn"`` (exact GGN) or ``"mc"`` (Monte-Carlo Fisher).
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
    """

    def __init__(
        self,
        model: Module,
        lossfunc: Module,
        curvature: Curvature | str = Curvature.GGN,
        mc_samples: int = 1,
    ):
        self.model, self.lossfunc = model, lossfunc
        self.curvature = KFOCTerms.check_curvature(curvature)
        self.mc_samples = mc_samples
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def __call__(self, X: Tensor, y: Tensor, *, with_kfac: bool = False) -> BatchQuantities:
        """Forward, backward with ``KFOCTerms`` and the savefields of one batch."""
        extension = KFOCTerms(self.curvature, self.mc_samples, with_kfac=with_kfac)
        params = self.params
        with preserved_grads(params.values()), extended(self.model, self.lossfunc):
            with torch.enable_grad():
                loss = self.lossfunc(self.model(X), y)
                with backpack(extension):
                    loss.backward()
        zeros = self.zero_blocks()
        batch = BatchQuantities(loss.detach(), batch_size(X), {}, {})
        for name, param in params.items():
            value = getattr(param, extension.savefield, None)
            if value is None:
                continue
            delattr(param, extension.savefield)
            if isinstance(value, LayerTerms):
                batch.weights[name] = value
            else:
                batch.dense[name] = DenseTerms(zeros[name].from_kfacs(value, f"'{name}'"))
        return batch

    def zero_blocks(self) -> dict[str, Block]:
        """Every trainable parameter of a supported layer, its zero block."""
        return model_zero_blocks(self.model)
