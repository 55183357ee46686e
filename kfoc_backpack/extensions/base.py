"""Shared part of the K-FOC module extensions: BackPACK's hooks around the layer maths.

The per-layer maths (per-sample terms, scale split, bias block) lives in
:mod:`kfoc_backpack.collect.handover`, shared with the hook route.

Index conventions (BackPACK's): ``M`` columns per input (Monte-Carlo samples or
classes), ``N`` inputs, ``C_out`` output channels or features.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.collect.handover import bias_block, kfc_factors, weight_terms
from kfoc_backpack.collect.kinds import LayerKind
from kfoc_backpack.collect.layer_terms import LayerTerms, kfac_scale_split
from kfoc_backpack.extensions.unsupported import module_path
from kfoc_backpack.solver import KroneckerFactors
from kfoc_backpack.solver.correction import EigenCorrected

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase

__all__ = ["KFOCBaseModule", "LayerTerms", "kfac_scale_split", "kfc_factors"]


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
            with_kfac=not ext.solves,
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
            ``[L_out, R_in]`` (``[C_out, C_out]`` and ``[C_in·Πkernel, C_in·Πkernel]``),
            what the extension makes of them (:meth:`KFOCBase.weight_result`: the
            eigenvalue-corrected block for ``EKFOC``), or the :class:`LayerTerms`
            themselves for ``KFOCTerms``.
        """
        terms = self.layer_terms(ext, module, backproped)
        if not ext.solves:
            return terms
        ext.note_route(module, terms.terms.route)

        def what() -> str:
            return (
                f"{type(ext).__name__}: the K-FOC solve of the weight "
                f"{tuple(module.weight.shape)} of {module_path(module)}"
            )

        factors = terms.solve(ext.solver_options, what=what)
        self.record(ext, module, factors)
        return ext.weight_result(terms, factors)

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

    def record(self, ext: KFOCBase, module: Module, factors: KroneckerFactors) -> None:
        """Log the solve on the extension and warn if it did not converge."""
        ext.log_solve(module, factors)
        if not factors.converged:
            warnings.warn(
                f"{type(ext).__name__}: the power method for the weight "
                f"{tuple(module.weight.shape)} of {module_path(module)} stopped at "
                f"max_iter={ext.solver_options.max_iter}"
                f" before reaching tol={ext.solver_options.tol:g}; the factors are the "
                "last iterate. Increase max_iter for an optimal result.",
                RuntimeWarning,
                stacklevel=2,
            )
