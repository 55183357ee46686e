"""K-FOC module extension for ``torch.nn.Linear``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backpack.core.derivatives.linear import LinearDerivatives
from torch import Tensor, einsum
from torch.nn import Linear

from kfoc_backpack.extensions.base import KFOCBaseModule, LayerTerms, kfc_factors
from kfoc_backpack.solver import OuterTerms, SampleTerms

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase


class KFOCLinear(KFOCBaseModule):
    """K-FOC factors of a ``Linear`` layer's weight (``[L_out, R_in]``) and bias.

    * 2-d input ``[N, in]``: per-sample weight gradients ``X_{m,n} = s_{m,n} a_nᵀ``
      are rank one; the solve runs in ``N``-dimensional coefficient space
      (:func:`~kfoc_backpack.solver.nearest_kronecker_outer`) and never allocates
      anything of size ``N·out·in``.
    * input with extra dimensions ``[N, *, in]`` (shared weight, like a
      convolution): ``X_{m,n} = Σ_t s_{m,n,t} a_{n,t}ᵀ`` and the per-sample route.
    """

    def __init__(self):
        super().__init__(LinearDerivatives())

    def layer_terms(self, ext: KFOCBase, module: Linear, backproped: Tensor) -> LayerTerms:
        """Per-sample quantities of the weight; ``backproped`` is ``[M, N, *, out]``."""
        inputs = module.input0
        num = inputs.shape[0]
        input_trace = inputs.square().sum() / num
        if inputs.dim() == 2:
            terms = OuterTerms(backproped.transpose(0, 1), inputs)
            kfac = None if ext.solves else kfc_factors(backproped.unsqueeze(2), inputs.unsqueeze(1))
            return LayerTerms(terms, input_trace, kfac)
        sqrt = backproped.flatten(start_dim=2, end_dim=-2)  # [M, N, T, out]
        flat_inputs = inputs.flatten(start_dim=1, end_dim=-2)  # [N, T, in]
        samples = einsum("mnto,nti->mnoi", sqrt, flat_inputs).flatten(end_dim=1)
        kfac = None if ext.solves else kfc_factors(sqrt, flat_inputs)
        return LayerTerms(SampleTerms(samples), input_trace, kfac)

    def bias_sqrt(self, backproped: Tensor) -> Tensor:
        """Sum ``[M, N, *, out]`` over the extra input dimensions."""
        if backproped.dim() == 3:
            return backproped
        return backproped.flatten(start_dim=2, end_dim=-2).sum(2)
