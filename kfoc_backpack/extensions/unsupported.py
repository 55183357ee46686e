"""Layers BackPACK can backpropagate through but K-FOC has no factors for."""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from backpack.extensions.backprop_extension import FAIL_ERROR, FAIL_WARN
from backpack.extensions.mat_to_mat_jac_base import MatToJacMat
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.collect.registry import SUPPORTED_NAMES, unsupported_reason

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase

_PATHS: weakref.WeakKeyDictionary[Module, str] = weakref.WeakKeyDictionary()


def module_path(module: Module) -> str:
    """``"layer 'path' (Type)"`` for messages, the path found among the live modules.

    BackPACK's module extensions see a layer without its model, so the path is looked
    up once (a scan of the live ``nn.Module`` objects for the chain of parents) and
    cached; only messages (errors, warnings) pay for it. A module no parent holds is
    named by its type alone.
    """
    if module not in _PATHS:
        parents = {}
        for obj in gc.get_objects():
            if isinstance(obj, Module):
                for key, child in obj._modules.items():
                    if child is not None and id(child) not in parents:
                        parents[id(child)] = (obj, key)
        names, current, seen = [], module, set()
        while id(current) in parents and id(current) not in seen:
            seen.add(id(current))
            current, key = parents[id(current)]
            names.append(key)
        _PATHS[module] = ".".join(reversed(names))
    path = _PATHS[module]
    kind = type(module).__name__
    return f"layer '{path}' ({kind})" if path else kind


def unsupported_message(ext: KFOCBase, module: Module, reason: str | None = None) -> str:
    """Error text for a parameterised layer (or setting) without K-FOC factors."""
    what = reason or f"has trainable parameters but no K-FOC factors (supported: {SUPPORTED_NAMES})"
    return (
        f"{type(ext).__name__}: {module_path(module)} {what}. Freeze its parameters "
        f"(requires_grad=False) or construct the extension with fail_mode='WARNING' to "
        f"skip it (nothing is then written to '.{ext.savefield}' of its parameters)."
    )


def handle_unsupported(ext: KFOCBase, module: Module, reason: str | None = None) -> None:
    """Apply BackPACK's ``fail_mode`` to a layer with trainable, unsupported params.

    Raises:
        NotImplementedError: In ``fail_mode='ERROR'`` (the default).
    """
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return
    mode = ext.fail_mode
    if mode == FAIL_ERROR:
        raise NotImplementedError(unsupported_message(ext, module, reason))
    if mode == FAIL_WARN:
        warnings.warn(unsupported_message(ext, module, reason), UserWarning, stacklevel=3)


class UnsupportedParamsModule(MatToJacMat):
    """Backpropagate through a layer like ``SqrtGGN`` does, but write no quantity.

    Its parameters (or their setting, e.g. a grouped convolution) are unsupported:
    depending on the extension's ``fail_mode`` the layer raises (``'ERROR'``), warns
    (``'WARNING'``) or is skipped silently.
    """

    def __init__(self, inner: MatToJacMat):
        """Wrap BackPACK's ``SqrtGGN`` module extension ``inner`` of the layer."""
        super().__init__(inner.derivatives, params=None)
        self._inner = inner

    def check_hyperparameters_module_extension(
        self, ext: KFOCBase, module: Module, g_inp: tuple[Tensor, ...], g_out: tuple
    ) -> None:
        """Apply the fail mode before anything is computed."""
        handle_unsupported(ext, module, unsupported_reason(module, exact_type=True))

    def backpropagate(self, ext, module, grad_inp, grad_out, backproped):  # noqa: D102
        return self._inner.backpropagate(ext, module, grad_inp, grad_out, backproped)


class SkippedConvModule(UnsupportedParamsModule):
    """A convolution in a setting K-FOC does not support, skipped under ``fail_mode``.

    Backpropagates the square root through the layer by autograd's vector-Jacobian
    product of the layer's own convolution (``_conv_forward``: grouped, string
    padding, any padding mode), since BackPACK's derivatives assume integer zero
    padding. The convolution is linear in its input, so zeros stand in for it.
    """

    def backpropagate(self, ext, module, grad_inp, grad_out, backproped):  # noqa: D102
        columns, num = backproped.shape[:2]
        inputs = module.input0
        with torch.enable_grad():
            zeros = inputs.new_zeros(columns * num, *inputs.shape[1:]).requires_grad_(True)
            out = module._conv_forward(zeros, module.weight.detach(), None)
            (grad,) = torch.autograd.grad(out, zeros, backproped.flatten(end_dim=1))
        return grad.reshape(columns, num, *inputs.shape[1:])
