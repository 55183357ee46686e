"""Module kinds: one file per family, each handing the solver its parameters' terms.

:data:`KINDS` is the one list of module kinds; :func:`kind_of` finds a module's. Layers
that share a weight over positions (:class:`~.base.LayerKind`: ``Linear``, convolutions)
get K-FOC's factors from their inputs and output-side vectors; normalisation layers
(:mod:`~.norm`) and embeddings (:mod:`~.embedding`) their exact per-sample gradients. A
module of no kind with trainable parameters gets per-sample gradients by ``torch.func``
(:mod:`kfoc_backpack.collect.loose`). Adding a kind means one file here and its entry
in :data:`KINDS` — plus, for ``with backpack(...)`` users of a layer kind, a BackPACK
module extension that names BackPACK's derivatives of the layer
(:mod:`kfoc_backpack.extensions`).
"""

from __future__ import annotations

from torch.nn import Module

from kfoc_backpack.collect.kinds.base import LayerKind, ModuleKind
from kfoc_backpack.collect.kinds.conv import ConvKind
from kfoc_backpack.collect.kinds.embedding import EmbeddingKind
from kfoc_backpack.collect.kinds.linear import LinearKind
from kfoc_backpack.collect.kinds.norm import (
    BatchNormKind,
    GroupNormKind,
    LayerNormKind,
    NormKind,
    RMSNormKind,
)

KINDS: tuple[ModuleKind, ...] = (
    LinearKind(),
    ConvKind(),
    LayerNormKind(),
    RMSNormKind(),
    GroupNormKind(),
    BatchNormKind(),
    EmbeddingKind(),
)
"""The module kinds."""


def kind_of(module: Module, exact_type: bool = False) -> ModuleKind | None:
    """Return the kind of ``module`` (``None`` for modules of no kind).

    Args:
        module: A module.
        exact_type: BackPACK's route: match types exactly (BackPACK dispatches on
            ``type(module)``), and only kinds BackPACK's module extensions cover; else
            subclasses count (the hook route runs their ``forward``).
    """
    for kind in KINDS:
        if exact_type and not kind.backpack:
            continue
        if type(module) in kind.types or (not exact_type and isinstance(module, kind.types)):
            return kind
    return None


__all__ = ["KINDS", "LayerKind", "ModuleKind", "NormKind", "kind_of"]
