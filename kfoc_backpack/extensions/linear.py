"""K-FOC module extension for ``torch.nn.Linear``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backpack.core.derivatives.linear import LinearDerivatives
from torch import Tensor, einsum
from torch.nn import Linear

from kfoc_backpack.extensions.base import KFOCBaseModule, kfac_scale_split
from kfoc_backpack.solver import nearest_kronecker_outer, nearest_kronecker_samples

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

    def weight(
        self,
        ext: KFOCBase,
        module: Linear,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        backproped: Tensor,
    ) -> list[Tensor]:
        """Return ``[L_out, R_in]`` with ``L_out ⊗ R_in`` optimal for the weight block.

        Args:
            ext: The running K-FOC extension.
            module: The layer.
            g_inp: Gradients w.r.t. the layer inputs (unused).
            g_out: Gradients w.r.t. the layer outputs (unused).
            backproped: ``[M, N, *, out]`` GGN/Fisher square root at the output.

        Returns:
            ``[L_out, R_in]`` of shapes ``[out, out]`` and ``[in, in]``.
        """
        inputs = module.input0
        num = inputs.shape[0]
        options = ext.solver_options
        if inputs.dim() == 2:
            factors = nearest_kronecker_outer(
                backproped.transpose(0, 1), inputs, options=options
            )
        else:
            sqrt = backproped.flatten(start_dim=2, end_dim=-2)
            flat_inputs = inputs.flatten(start_dim=1, end_dim=-2)
            samples = einsum("mnto,nti->mnoi", sqrt, flat_inputs)
            factors = nearest_kronecker_samples(samples.flatten(end_dim=1), options=options)
        self.record(ext, module, factors)
        return kfac_scale_split(factors, inputs.square().sum() / num)
