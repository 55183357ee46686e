"""K-FOC module extensions for ``torch.nn.Conv1d``, ``Conv2d`` and ``Conv3d``."""

from __future__ import annotations

from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives

from kfoc_backpack.collect.kinds.conv import ConvKind
from kfoc_backpack.extensions.base import KFOCBaseModule


class KFOCConvNd(KFOCBaseModule):
    """K-FOC factors of an N-d convolution's weight (``[L_out, R_in]``) and bias.

    The weight ``[C_out, C_in/groups, *kernel]`` is treated as the
    ``C_out × (C_in/groups·Πkernel)`` matrix ``Ŵ`` (grouped and depthwise convolutions
    included, :class:`~kfoc_backpack.collect.kinds.conv.ConvKind`, as on the hook route);
    per sample
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
        super().__init__(derivatives[dim](), ConvKind())


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
