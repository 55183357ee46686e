"""``torch.nn.Conv1d``/``Conv2d``/``Conv3d``: the positions are the output pixels.

The weight ``[C_out, C_in/groups, *kernel]`` is the matrix ``C_out × (C_in/groups·Πkernel)``;
the input at output position ``t`` is the unfolded patch (BackPACK's ``unfold_input``,
all ``C_in`` channels: a grouped layer's rows see their own group's block of it).
"""

from __future__ import annotations

from backpack.utils.conv import unfold_input
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Module

from kfoc_backpack.collect.batch_layout import PLAIN, BatchLayout
from kfoc_backpack.collect.kinds.base import LayerKind


class ConvKind(LayerKind):
    """N-d convolutions with integer padding and ``padding_mode='zeros'``, any ``groups``."""

    types = (Conv1d, Conv2d, Conv3d)

    def problem(self, module: Module) -> str | None:
        """Name the padding setting the unfolding does not represent, if any."""
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        return None

    def groups(self, module: Module) -> int:
        """Return the convolution's ``groups``."""
        return module.groups

    def inputs(self, module: Module, x: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[N, T, C_in·Πkernel]``: the unfolded input (a view of ``[N, I, T]``)."""
        return layout.positions(unfold_input(module, x)).transpose(1, 2)

    def vectors(self, module: Module, g: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[M, N, T, C_out]`` from ``[M, N·k, C_out, *spatial]`` (a view)."""
        return layout.positions(g.flatten(start_dim=3), lead=1).transpose(2, 3)
