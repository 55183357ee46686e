"""Lifetime of what a curvature pass leaves on the model: BackPACK hooks and ``.grad``.

Used by the data-set functions for BackPACK users, which extend the model only while
they run and leave the user's gradients as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from backpack import extend
from backpack.context import CTX
from torch import Tensor
from torch.nn import Module


@contextmanager
def extended(*modules: Module) -> Iterator[None]:
    """Extend ``modules`` with BackPACK inside the block and undo it afterwards.

    BackPACK's ``extend`` installs hooks in place, and an extended model no longer
    works with ``torch.func`` (docs/conventions.md §6). Here only the hooks this call installs are
    removed again, so a model the user extended stays extended, and one that was not
    is left exactly as it was (inputs/outputs stored by BackPACK are deleted).
    """
    flagged = {
        id(m) for mod in modules for m in mod.modules() if getattr(m, "_backpack_extend", False)
    }
    start = len(CTX.hook_handles)
    try:
        for module in modules:
            extend(module)
        yield
    finally:
        added = CTX.hook_handles[start:]
        added_ids = {id(handle) for handle in added}
        for handle in added:
            handle.remove()
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) not in added_ids]
        for module in modules:
            for sub in module.modules():
                if id(sub) not in flagged and getattr(sub, "_backpack_extend", False):
                    sub._backpack_extend = False
                forget_io(sub)


def forget_io(module: Module) -> None:
    """Delete the ``input0``, ``input1``, … and ``output`` tensors BackPACK's hooks stored.

    Unlike BackPACK's ``memory_cleanup``, attributes that are the module's own children,
    parameters or buffers are kept: Hugging Face's ``BertAttention`` and ``BertLayer``
    have a child module named ``output``, which a plain ``delattr`` would remove.
    """
    registered = {*module._modules, *module._parameters, *module._buffers}
    names = ["output"]
    while f"input{len(names) - 1}" in module.__dict__:
        names.append(f"input{len(names) - 1}")
    for name in names:
        if name not in registered and name in module.__dict__:
            delattr(module, name)


@contextmanager
def preserved_grads(params: Iterable[Tensor]) -> Iterator[None]:
    """Restore the parameters' ``.grad`` after the block (curvature passes leave no trace)."""
    params = list(params)
    saved = [p.grad for p in params]
    for param in params:  # backward would accumulate into the saved tensors in place
        param.grad = None
    try:
        yield
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad
