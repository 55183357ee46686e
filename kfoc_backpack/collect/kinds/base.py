"""What a layer kind hands the solver: inputs and output-side vectors at its positions.

Every supported layer is a weight ``W`` (``O × I``) shared over ``T`` positions: per
input ``n`` and output-side column ``m``, ``X_{m,n} = Σ_t g_{m,n,t} a_{n,t}ᵀ``
(docs/conventions.md §1). A :class:`LayerKind` turns what a collection route recorded
— the layer's input and the vectors at its output, in the layout the layer saw the
batch in — into the two tensors of that description; everything after it
(:func:`~kfoc_backpack.collect.handover.weight_terms`: rank one, the route choice, the
grouped form, K-FAC's factors, the bias block) is shared by all kinds and by both
collection routes (the hook route and BackPACK's module extensions).

Index conventions: ``N`` inputs, ``T`` positions, ``I`` input features (``C_in·Πkernel``
for convolutions), ``M`` output-side columns, ``O`` output features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor
from torch.nn import Module

from kfoc_backpack.blocks import Block, DenseBlock, KroneckerBlock
from kfoc_backpack.collect.batch_layout import PLAIN, BatchLayout


class LayerKind(ABC):
    """One kind of layer: its module types and how its quantities become positions.

    Subclasses live in one file each (:mod:`~kfoc_backpack.collect.kinds.linear`,
    :mod:`~kfoc_backpack.collect.kinds.conv`) and are listed in
    :data:`~kfoc_backpack.collect.kinds.KINDS`; a new kind is one more file and entry.
    """

    types: tuple[type[Module], ...]
    """Module types of this kind (subclasses with the same ``forward`` included)."""

    any_batch_dim: bool = False
    """Whether the batch may sit in dimension 1 of the layer's activations (layers that
    keep their features last, such as ``Linear`` in sequence-first attention)."""

    def problem(self, module: Module) -> str | None:
        """Name a setting of ``module`` this kind cannot represent (``None``: none)."""
        return None

    def groups(self, module: Module) -> int:
        """Return the layer's ``groups`` (rows of ``W`` that see disjoint input features)."""
        return 1

    @abstractmethod
    def inputs(self, module: Module, x: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[N, T, I]``: the layer's input ``x`` at its positions, inputs first."""

    @abstractmethod
    def vectors(self, module: Module, g: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[M, N, T, O]``: the output-side vectors ``g`` (``[M, *output]``) at the positions."""

    def zero_blocks(self, module: Module) -> dict[str, Block]:
        """Return the all-zero blocks of the layer's parameters: weight ``0 ⊗ 0``, bias ``[0]``.

        The weight ``W`` is the ``O × I`` matrix of its first dimension against the rest
        (a grouped convolution's ``I`` is its group's ``C_in/groups·Πkernel``); the bias
        gets its exact ``O × O`` block.
        """
        weight = module.weight
        blocks: dict[str, Block] = {
            "weight": KroneckerBlock.zeros(weight.shape[0], weight[0].numel(), weight.detach())
        }
        if getattr(module, "bias", None) is not None:
            blocks["bias"] = DenseBlock.zeros(module.bias.numel(), module.bias.detach())
        return blocks
