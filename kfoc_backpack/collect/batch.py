r"""What a collection route hands the data-set level per batch, and what a collector is.

Both collection routes — the hook route (:class:`~kfoc_backpack.collect.hooks.TermCollector`)
and BackPACK's (:class:`~kfoc_backpack.extensions.collector.BackPACKCollector`) — are
:class:`Collector`\\ s: called on a batch they return its :class:`BatchQuantities`, and they
know every trainable parameter's block structure (:meth:`Collector.zero_blocks`) before
any batch is seen, so that a parameter no batch used still has its (zero) block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor
from torch.nn import Module

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.kinds import kind_of
from kfoc_backpack.collect.layer_terms import DenseTerms, LayerTerms
from kfoc_backpack.collect.parameters import zero_block

BATCH_FORMAT = "K-FOC needs batches (X, y) of tensors (BackPACK does not support dict-like inputs)"
"""What the BackPACK route accepts as a batch, the start of its error messages."""


def batch_size(X: object) -> int:
    """Return the number of inputs of a batch; only tensor inputs are supported."""
    if isinstance(X, Tensor):
        return int(X.shape[0])
    raise ValueError(f"{BATCH_FORMAT}, got X of type {type(X).__name__}.")


def split_batch(batch: object) -> tuple[Tensor, Tensor]:
    """``(X, y)`` of a batch given as a pair of tensors.

    Raises:
        ValueError: For anything else (e.g. dict-like batches).
    """
    if isinstance(batch, Sequence) and len(batch) == 2:
        X, y = batch
        batch_size(X)
        return X, y
    raise ValueError(f"{BATCH_FORMAT}, got a batch of type {type(batch).__name__}.")


@dataclass
class BatchQuantities:
    """What one batch contributes.

    Attributes:
        loss: The batch's loss as ``lossfunc`` reduces it (detached).
        num_samples: Number of inputs ``N``.
        weights: Per parameter with Kronecker factors (a layer's weight, a large
            parameter of another kind, :mod:`kfoc_backpack.collect.parameters`), its
            per-sample :class:`LayerTerms`, which an approximation turns into its block.
        dense: Per parameter with an exact dense block (biases, normalisation
            layers' affine parameters, small parameters of any module), its
            :class:`DenseTerms` (the exact block, and K-FAC's where asked).

    Parameters the batch's forward pass did not use are absent from both.
    """

    loss: Tensor
    num_samples: int
    weights: dict[str, LayerTerms]
    dense: dict[str, DenseTerms]

    def nbytes(self) -> int:
        """Bytes the batch's per-sample terms and blocks hold."""
        total = 0
        for weight in self.weights.values():
            total += weight.terms.nbytes()
            total += sum(f.numel() * f.element_size() for f in weight.kfac or ())
        for dense in self.dense.values():
            blocks = [dense.exact]
            if dense.kfac is not None and dense.kfac is not dense.exact:
                blocks.append(dense.kfac)
            for block in blocks:
                total += sum(t.numel() * t.element_size() for t in block.tensors().values())
        return total


class Collector(Protocol):
    """One batch's per-sample quantities, and the parameters' block structures."""

    def __call__(self, X: object, y: Tensor, *, with_kfac: bool = False) -> BatchQuantities:
        """Collect one batch (``with_kfac``: K-FAC's factors of the samples as well)."""
        ...

    def zero_blocks(self) -> dict[str, Block]:
        """Per trainable parameter (in ``named_parameters`` order), its all-zero block."""
        ...


def layer_zero_blocks(
    layers: dict[str, Module],
    names: dict[int, str],
    loose: Sequence[str] = (),
    model: Module | None = None,
) -> dict[str, Block]:
    """Return the zero block of every trainable parameter of ``layers`` and ``loose``, by full name.

    Args:
        layers: Modules of a kind by module path.
        names: Full parameter names by ``id`` of the parameter.
        loose: Full names of parameters with per-sample-gradient terms (the size rule of
            :mod:`kfoc_backpack.collect.parameters`).
        model: The model ``loose`` names parameters of.

    Returns:
        ``{name: block}`` ordered as ``names``.
    """
    blocks = {}
    for module in layers.values():
        for pname, block in kind_of(module).zero_blocks(module).items():
            param = getattr(module, pname)
            if param.requires_grad:
                blocks[names[id(param)]] = block
    if loose:
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in loose:
            blocks[name] = zero_block(params[name])
    order = list(names.values())
    return {name: blocks[name] for name in order if name in blocks}


def model_zero_blocks(model: Module) -> dict[str, Block]:
    """Return the zero block of every trainable parameter of ``model``'s supported layers.

    Parameters of layers without K-FOC factors are left out (BackPACK's ``fail_mode``
    decides what happens to them).
    """
    layers = {
        name: module
        for name, module in model.named_modules()
        if (kind := kind_of(module)) is not None
        and kind.backpack
        and any(p.requires_grad for p in module.parameters(recurse=False))
    }
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    return layer_zero_blocks(layers, names)
