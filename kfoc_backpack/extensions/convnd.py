"""K-FOC module extensions for ``torch.nn.Conv1d``, ``Conv2d`` and ``Conv3d``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.utils.conv import unfold_input
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d

from kfoc_backpack.collect.layers import conv_terms
from kfoc_backpack.extensions.base import KFOCBaseModule, LayerTerms

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase

ConvNd = Conv1d | Conv2d | Conv3d


class KFOCConvNd(KFOCBaseModule):
    """K-FOC factors of an N-d convolution's weight (``[L_out, R_in]``) and bias.

    The weight ``[C_out, C_in/groups, *kernel]`` is treated as the
    ``C_out × (C_in/groups·Πkernel)`` matrix ``Ŵ`` (grouped and depthwise convolutions
    included, see :func:`~kfoc_backpack.collect.layers.conv_terms`); per sample
    ``X_{m,n} = Ds_{m,n} â_nᵀ`` sums over the output positions (``â_n`` the unfolded
    input, ``[C_in·Πkernel, T]``) and the factors come from the power method on
    per-sample matrices (paper Algorithm 2). They match the
    dense GGN block — unlike BackPACK's ``KFAC`` for convolutions, whose output-side
    factor is ``T`` times larger (its documented TODO).
    """

    def __init__(self, dim: int):
        """Set up the derivatives of a ``dim``-dimensional convolution."""
        self._conv_dim = dim
        derivatives = {1: Conv1DDerivatives, 2: Conv2DDerivatives, 3: Conv3DDerivatives}
        super().__init__(derivatives[dim]())

    def layer_terms(self, ext: KFOCBase, module: ConvNd, backproped: Tensor) -> LayerTerms:
        """Per-sample quantities; ``backproped`` is ``[M, N, C_out, *spatial_out]``."""
        unfolded = unfold_input(module, module.input0)  # [N, C_in·Πkernel, T]
        sqrt = backproped.flatten(start_dim=3)  # [M, N, C_out, T]
        return conv_terms(unfolded, sqrt, with_kfac=not ext.solves, groups=module.groups)

    def bias_sqrt(self, backproped: Tensor) -> Tensor:
        """Sum ``[M, N, C_out, *spatial]`` over the output positions."""
        return backproped.flatten(start_dim=3).sum(-1)


class KFOCConv1d(KFOCConvNd):
    """K-FOC extension for ``torch.nn.Conv1d``."""

    def __init__(self):
        super().__init__(1)


class KFOCConv2d(KFOCConvNd):
    """K-FOC extension for ``torch.nn.Conv2d``."""

    def __init__(self):
        super().__init__(2)


class KFOCConv3d(KFOCConvNd):
    """K-FOC extension for ``torch.nn.Conv3d``."""

    def __init__(self):
        super().__init__(3)
