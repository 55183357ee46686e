"""K-FOC module extension for ``torch.nn.Linear``.

Index conventions (BackPACK's): ``M`` columns per input (Monte-Carlo samples or
classes), ``N`` inputs, ``T`` extra positions, ``out``/``in`` the layer's features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backpack.core.derivatives.linear import LinearDerivatives
from torch import Tensor
from torch.nn import Linear

from kfoc_backpack.collect.layers import linear_terms
from kfoc_backpack.extensions.base import KFOCBaseModule, LayerTerms

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase


class KFOCLinear(KFOCBaseModule):
    """K-FOC factors of a ``Linear`` layer's weight (``[L_out, R_in]``) and bias.

    * 2-d input ``[N, in]``: per-sample weight gradients ``X_{m,n} = s_{m,n} a_nᵀ``
      are rank one; the solve runs in ``N``-dimensional coefficient space
      (:func:`~kfoc_backpack.solver.nearest_kronecker_outer`) and never allocates
      anything of size ``N·out·in``.
    * input with extra dimensions ``[N, *, in]`` (shared weight, like a
      convolution): ``X_{m,n} = Σ_t s_{m,n,t} a_{n,t}ᵀ``, handed over as every
      weight-shared layer is (:func:`~kfoc_backpack.collect.layers.shared_terms`:
      rank one for a single position, else the route the cost model picks).
    """

    def __init__(self):
        super().__init__(LinearDerivatives())

    def layer_terms(self, ext: KFOCBase, module: Linear, backproped: Tensor) -> LayerTerms:
        """Per-sample quantities of the weight; ``backproped`` is ``[M, N, *, out]``."""
        return linear_terms(module.input0, backproped, with_kfac=not ext.solves)

    def bias_sqrt(self, backproped: Tensor) -> Tensor:
        """Sum ``[M, N, *, out]`` over the extra input dimensions."""
        if backproped.dim() == 3:
            return backproped
        return backproped.flatten(start_dim=2, end_dim=-2).sum(2)
