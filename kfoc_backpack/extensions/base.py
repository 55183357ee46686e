"""Shared part of the K-FOC module extensions: BackPACK's hooks around the layer maths.

The per-layer maths (per-sample terms, scale split, bias block) lives in
:mod:`kfoc_backpack.collect.handover`, shared with the hook route.

Index conventions (BackPACK's): ``M`` columns per input (Monte-Carlo samples or
classes), ``N`` inputs, ``C_out`` output channels or features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.blocks import EigenCorrected
from kfoc_backpack.collect.handover import bias_block, weight_terms
from kfoc_backpack.collect.kinds import LayerKind
from kfoc_backpack.collect.layer_terms import LayerTerms

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase


class KFOCBaseModule(SqrtGGNBaseModule):
    """Module extension of a parameterised layer with weight and bias.

    Backpropagation of the GGN/Fisher square root is BackPACK's (``SqrtGGN``); the
    parameter quantities are K-FOC's. The backpropagated quantity ``Ds`` has shape
    ``[M, N, C_out, *spatial]`` (``M`` Monte-Carlo samples or classes, ``N`` inputs)
    and already carries the loss reduction's ``1/√N``.
    """

    def __init__(self, derivatives: BaseDerivatives, kind: LayerKind):
        super().__init__(derivatives, params=["weight", "bias"])
        self.kind = kind

    def layer_terms(self, ext: KFOCBase, module: Module, backproped: Tensor) -> LayerTerms:
        """Per-sample quantities of the weight block, from the layer kind's positions.

        ``backproped`` is ``[M, N, *output]``; the kind
        (:mod:`kfoc_backpack.collect.kinds`) turns it and ``module.input0`` into the
        vectors and inputs at the layer's positions, as on the hook route.
        """
        return weight_terms(
            self.kind.inputs(module, module.input0),
            self.kind.vectors(module, backproped),
            with_kfac=ext.with_kfac,
            groups=self.kind.groups(module),
            steps=ext.weight_steps(module),
        )

    def weight(
        self,
        ext: KFOCBase,
        module: Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        backproped: Tensor,
    ) -> list[Tensor] | LayerTerms | EigenCorrected:
        """Return ``[L_out, R_in]``, ``L_out ⊗ R_in`` optimal for the weight block.

        Args:
            ext: The running K-FOC extension.
            module: The layer.
            g_inp: Gradients w.r.t. the layer inputs (unused).
            g_out: Gradients w.r.t. the layer outputs (unused).
            backproped: ``[M, N, C_out, *spatial]`` GGN/Fisher square root.

        Returns:
            What the extension makes of the weight's :class:`LayerTerms`
            (:meth:`KFOCBase.weight_result`): ``[L_out, R_in]`` (``[C_out, C_out]`` and
            ``[C_in·Πkernel, C_in·Πkernel]``) for ``KFOC``/``KFOCExact``, the
            eigenvalue-corrected block for ``EKFOC``, the terms themselves for
            ``KFOCTerms``.
        """
        return ext.weight_result(module, self.layer_terms(ext, module, backproped))

    def bias(
        self,
        ext: KFOCBase,
        module: Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        backproped: Tensor,
    ) -> list[Tensor]:
        """Exact GGN/Fisher block of the bias, ``[B]`` with ``B = Σ_{m,n} b b ᵀ``.

        ``b_{m,n} = Σ_t Ds_{m,n,:,t}`` sums over the output positions.

        Returns:
            ``[B]``, ``B`` of shape ``[C_out, C_out]``.
        """
        return [bias_block(self.kind.vectors(module, backproped).sum(2))]
