"""Test-side layouts: a convolution's or a token ``Linear``'s tensors at their positions.

The package's hand-over (:func:`kfoc_backpack.collect.handover.weight_terms`) takes a
layer's inputs ``[N, T, I]`` and output-side vectors ``[M, N, T, O]``; the tests build
them in the layouts BackPACK and the layers use.
"""

from __future__ import annotations

from torch import Tensor

from kfoc_backpack.collect.handover import weight_terms
from kfoc_backpack.collect.layer_terms import LayerTerms
from kfoc_backpack.enums import Grouped


def conv_terms(unfolded: Tensor, sqrt: Tensor, *args, **kwargs) -> LayerTerms:
    """:func:`weight_terms` of a convolution (``unfolded [N, I, T]``, ``sqrt [M, N, O, T]``).

    A grouped convolution's coupled over all its rows (the default structure).
    """
    terms = weight_terms(unfolded.transpose(1, 2), sqrt.transpose(2, 3), *args, **kwargs)
    return terms.with_structure(Grouped.COUPLED)


def linear_terms(inputs: Tensor, sqrt: Tensor, *args, **kwargs) -> LayerTerms:
    """:func:`weight_terms` of a ``Linear`` on ``[N, (*), I]`` (``sqrt [M, N, (*), O]``)."""
    if inputs.dim() == 2:
        return weight_terms(inputs.unsqueeze(1), sqrt.unsqueeze(2), *args, **kwargs)
    flat = inputs.flatten(start_dim=1, end_dim=-2)
    return weight_terms(flat, sqrt.flatten(start_dim=2, end_dim=-2), *args, **kwargs)
