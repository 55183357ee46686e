"""Layers BackPACK can backpropagate through but K-FOC has no factors for."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from backpack.extensions.backprop_extension import FAIL_ERROR, FAIL_WARN
from backpack.extensions.mat_to_mat_jac_base import MatToJacMat
from torch import Tensor
from torch.nn import Module

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase

SUPPORTED_LAYERS = "Linear, Conv1d, Conv2d, Conv3d"


def unsupported_message(ext: KFOCBase, module: Module) -> str:
    """Error text for a parameterised layer without K-FOC factors."""
    return (
        f"{type(ext).__name__} does not support the parameterised layer "
        f"{module.__class__.__name__}: K-FOC factors exist for {SUPPORTED_LAYERS}. "
        f"Freeze its parameters (requires_grad=False) or construct the extension with "
        f"fail_mode='WARNING' to skip it (nothing is then written to "
        f"'.{ext.savefield}' of its parameters)."
    )


def handle_unsupported(ext: KFOCBase, module: Module) -> None:
    """Apply BackPACK's ``fail_mode`` to a layer with trainable, unsupported params.

    Raises:
        NotImplementedError: In ``fail_mode='ERROR'`` (the default).
    """
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return
    mode = ext.fail_mode
    if mode == FAIL_ERROR:
        raise NotImplementedError(unsupported_message(ext, module))
    if mode == FAIL_WARN:
        warnings.warn(unsupported_message(ext, module), UserWarning, stacklevel=3)


class UnsupportedParamsModule(MatToJacMat):
    """Backpropagate through a layer like ``SqrtGGN`` does, but write no quantity.

    Its parameters are unsupported: depending on the extension's ``fail_mode`` the
    layer raises (``'ERROR'``), warns (``'WARNING'``) or is skipped silently.
    """

    def __init__(self, inner: MatToJacMat):
        """Wrap BackPACK's ``SqrtGGN`` module extension ``inner`` of the layer."""
        super().__init__(inner.derivatives, params=None)
        self._inner = inner

    def check_hyperparameters_module_extension(
        self, ext: KFOCBase, module: Module, g_inp: tuple[Tensor, ...], g_out: tuple
    ) -> None:
        """Apply the fail mode before anything is computed."""
        handle_unsupported(ext, module)

    def backpropagate(self, ext, module, grad_inp, grad_out, backproped):  # noqa: D102
        return self._inner.backpropagate(ext, module, grad_inp, grad_out, backproped)
