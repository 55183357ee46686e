"""Shared parts of the K-FOC module extensions: scale convention, bias block, checks."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.solver import KroneckerFactors

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase


def kfac_scale_split(factors: KroneckerFactors, input_trace: Tensor) -> list[Tensor]:
    """Split the scale of ``left ⊗ right`` the way K-FAC splits it.

    K-FAC's input-side factor is the mean (over the ``N`` inputs of the batch) of the
    unfolded input's second moment, ``R_KFAC = (1/N) Σ_n â_nᵀ â_n``; its output-side
    factor carries everything else (the batch sum, the loss reduction). K-FOC's
    factors are rescaled, ``left·c`` and ``right/c``, so that
    ``tr(right) = tr(R_KFAC)``. The product is unchanged, the factors are directly
    comparable with BackPACK's ``KFAC``/``KFLR`` factors and damping (``√δ`` added to
    each factor) acts as it does for K-FAC. All-zero factors stay zero.

    Args:
        factors: Optimal factors from a solver (any split).
        input_trace: Scalar ``tr(R_KFAC) = (1/N) Σ_n ‖â_n‖²_F``.

    Returns:
        ``[left, right]`` in BackPACK's Kronecker layout.
    """
    trace_right = torch.diagonal(factors.right).sum()
    valid = (trace_right > 0) & (input_trace > 0)
    scale = torch.where(valid, input_trace / torch.where(valid, trace_right, 1.0), 1.0)
    return [factors.left / scale, factors.right * scale]


class KFOCBaseModule(SqrtGGNBaseModule):
    """Module extension of a parameterised layer with weight and bias.

    Backpropagation of the GGN/Fisher square root is BackPACK's (``SqrtGGN``); the
    parameter quantities are K-FOC's. The backpropagated quantity ``Ds`` has shape
    ``[M, N, C_out, *spatial]`` (``M`` Monte-Carlo samples or classes, ``N`` inputs)
    and already carries the loss reduction's ``1/√N``.
    """

    def __init__(self, derivatives: BaseDerivatives):
        super().__init__(derivatives, params=["weight", "bias"])

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
        sqrt = backproped.flatten(start_dim=3).sum(-1) if backproped.dim() > 3 else backproped
        sqrt = sqrt.flatten(end_dim=1)
        return [sqrt.T @ sqrt]

    def record(self, ext: KFOCBase, module: Module, factors: KroneckerFactors) -> None:
        """Log the solve on the extension and warn if it did not converge."""
        ext.log_solve(module, factors)
        if not factors.converged:
            warnings.warn(
                f"{type(ext).__name__}: the power method for the weight of "
                f"{module.__class__.__name__} stopped at max_iter={ext.solver_options.max_iter}"
                f" before reaching tol={ext.solver_options.tol:g}; the factors are the "
                "last iterate. Increase max_iter for an optimal result.",
                RuntimeWarning,
                stacklevel=2,
            )
