"""``torch.nn.Linear``: the positions are every dimension between the batch and the features."""

from __future__ import annotations

from torch import Tensor
from torch.nn import Linear, Module

from kfoc_backpack.collect.batch_layout import PLAIN, BatchLayout
from kfoc_backpack.collect.kinds.base import LayerKind


def _positions(tensor: Tensor, lead: int) -> Tensor:
    """``[*lead, N, …, F]`` as ``[*lead, N, T, F]`` (``T = 1`` for ``[*lead, N, F]``)."""
    if tensor.dim() == lead + 2:
        return tensor.unsqueeze(lead + 1)
    return tensor.flatten(start_dim=lead + 1, end_dim=-2)


class LinearKind(LayerKind):
    """``Linear`` on ``[N, I]`` (one position: rank one) or ``[N, *, I]`` (tokens).

    A folded batch (``k`` rows per input) and sequence-first inputs are put in place by
    the layout; a fold's ``k`` rows become positions.
    """

    types = (Linear,)
    any_batch_dim = True

    def inputs(self, module: Module, x: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[N, T, I]`` from the input ``[N, *, I]`` (in ``layout``)."""
        return _positions(layout.split(x), 0)

    def vectors(self, module: Module, g: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[M, N, T, O]`` from ``[M, N, *, O]`` (in ``layout``)."""
        return _positions(layout.split(g, lead=1), 1)
