"""Layer kinds: one file per kind, each handing the solver its inputs and vectors.

:data:`KINDS` is the one list of layer kinds with K-FOC factors; :func:`kind_of` finds a
module's. Adding a layer kind means one file here (a :class:`~.base.LayerKind`) and its
entry in :data:`KINDS` — plus, for ``with backpack(...)`` users, a BackPACK module
extension that names BackPACK's derivatives of the layer
(:mod:`kfoc_backpack.extensions`).
"""

from __future__ import annotations

from torch.nn import Module

from kfoc_backpack.collect.kinds.base import LayerKind
from kfoc_backpack.collect.kinds.conv import ConvKind
from kfoc_backpack.collect.kinds.linear import LinearKind

KINDS: tuple[LayerKind, ...] = (LinearKind(), ConvKind())
"""The supported layer kinds."""


def kind_of(module: Module, exact_type: bool = False) -> LayerKind | None:
    """Return the kind of ``module`` (``None`` for layers without K-FOC factors).

    Args:
        module: A layer.
        exact_type: Match types exactly (BackPACK dispatches on ``type(module)``); else
            subclasses count (the hook route runs their ``forward``).
    """
    for kind in KINDS:
        if type(module) in kind.types or (not exact_type and isinstance(module, kind.types)):
            return kind
    return None


__all__ = ["KINDS", "LayerKind", "kind_of"]
