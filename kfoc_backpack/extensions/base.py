"""Shared parts of the K-FOC module extensions: scale convention, bias block, checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.solver import KroneckerFactors, OuterTerms, SampleTerms, SolverOptions
from kfoc_backpack.solver._common import finalize

if TYPE_CHECKING:
    from kfoc_backpack.extensions.kfoc import KFOCBase


@dataclass(frozen=True)
class LayerTerms:
    """The per-sample quantities of one weight, as stored by ``KFOCTerms``.

    Attributes:
        terms: The weight block ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` in structured form.
        input_trace: ``tr(R_KFAC) = (1/N) Σ_n ‖â_n‖²_F``, the trace K-FOC gives its
            input-side factor (see :meth:`solve`).
        kfac: K-FAC's factors ``(L, R)`` of the same block from the same samples;
            for convolutions the KFC approximation (paper eq. 9),
            ``Σ_{k,t} ds_{k,t} ds_{k,t}ᵀ ⊗ (1/(N·T)) Σ_{n,t} â_{n,t} â_{n,t}ᵀ``.
            Only computed by ``KFOCTerms`` (``None`` inside the solving extensions).
            Its *split* is the paper's: for convolutions its right factor is ``T``
            times smaller (and its left ``T`` times larger) than the split of
            :meth:`solve` and of BackPACK's ``KFAC``, whose right factor is
            ``(1/N) Σ_n â_nᵀ â_n`` summed over the ``T`` positions; the products
            are on the same (the dense block's) scale.
    """

    terms: OuterTerms | SampleTerms
    input_trace: Tensor
    kfac: tuple[Tensor, Tensor] | None

    def solve(self, options: SolverOptions | None = None) -> KroneckerFactors:
        """K-FOC's optimal factors in K-FAC's scale split, ``tr(R_in) = input_trace``.

        K-FAC's input-side factor is the mean (over the ``N`` inputs of the batch) of
        the unfolded input's second moment, ``R_KFAC = (1/N) Σ_n â_nᵀ â_n``; its
        output-side factor carries everything else (the batch sum, the loss
        reduction). K-FOC's factors are split so that ``tr(R_in) = tr(R_KFAC)``: they
        are directly comparable with BackPACK's ``KFAC``/``KFLR`` factors and damping
        (``√δ`` added to each factor) acts as it does for K-FAC.
        """
        return self.terms.solve(options, right_trace=self.input_trace)

    def kfoc(self, factors: KroneckerFactors) -> list[Tensor]:
        """``[L_out, R_in]`` from factors in any split, rescaled to K-FAC's split."""
        return kfac_scale_split(factors, self.input_trace)


def kfac_scale_split(factors: KroneckerFactors, input_trace: Tensor) -> list[Tensor]:
    """Rescale ``left ⊗ right`` (product unchanged) so that ``tr(right) = input_trace``.

    Args:
        factors: Factors of a Kronecker product, any scale split.
        input_trace: Target trace of the right factor, K-FAC's
            ``tr(R_KFAC) = (1/N) Σ_n ‖â_n‖²_F``.

    Returns:
        ``[left, right]`` in K-FAC's split (see :meth:`LayerTerms.solve`).
    """
    left, right = finalize(factors.left, factors.right, factors.left.dtype, right_trace=input_trace)
    return [left, right]


def kfc_factors(sqrt: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """K-FAC/KFC factors (paper eq. 9) of a layer with shared weights.

    Args:
        sqrt: ``[M, N, T, out]`` square-root GGN at the output positions.
        inputs: ``[N, T, in]`` (unfolded) inputs at the same positions.

    Returns:
        ``(Σ_{m,n,t} ds ds ᵀ, (1/(N·T)) Σ_{n,t} â âᵀ)``.
    """
    flat_sqrt = sqrt.flatten(end_dim=2)
    flat_inputs = inputs.flatten(end_dim=1)
    return flat_sqrt.T @ flat_sqrt, flat_inputs.T @ flat_inputs / flat_inputs.shape[0]


class KFOCBaseModule(SqrtGGNBaseModule):
    """Module extension of a parameterised layer with weight and bias.

    Backpropagation of the GGN/Fisher square root is BackPACK's (``SqrtGGN``); the
    parameter quantities are K-FOC's. The backpropagated quantity ``Ds`` has shape
    ``[M, N, C_out, *spatial]`` (``M`` Monte-Carlo samples or classes, ``N`` inputs)
    and already carries the loss reduction's ``1/√N``.
    """

    def __init__(self, derivatives: BaseDerivatives):
        super().__init__(derivatives, params=["weight", "bias"])

    def layer_terms(self, ext: KFOCBase, module: Module, backproped: Tensor) -> LayerTerms:
        """Per-sample quantities of the weight block (implemented per layer type)."""
        raise NotImplementedError

    def weight(
        self,
        ext: KFOCBase,
        module: Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        backproped: Tensor,
    ) -> list[Tensor] | LayerTerms:
        """Return ``[L_out, R_in]``, ``L_out ⊗ R_in`` optimal for the weight block.

        Args:
            ext: The running K-FOC extension.
            module: The layer.
            g_inp: Gradients w.r.t. the layer inputs (unused).
            g_out: Gradients w.r.t. the layer outputs (unused).
            backproped: ``[M, N, C_out, *spatial]`` GGN/Fisher square root.

        Returns:
            ``[L_out, R_in]`` (``[C_out, C_out]`` and ``[C_in·Πkernel, C_in·Πkernel]``),
            or the :class:`LayerTerms` themselves for ``KFOCTerms``.
        """
        terms = self.layer_terms(ext, module, backproped)
        if not ext.solves:
            return terms
        factors = terms.solve(ext.solver_options)
        self.record(ext, module, factors)
        return [factors.left, factors.right]

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
        sqrt = self.bias_sqrt(backproped).flatten(end_dim=1)
        return [sqrt.T @ sqrt]

    def bias_sqrt(self, backproped: Tensor) -> Tensor:
        """``[M, N, C_out]``: the square root summed over positions (per layer type)."""
        raise NotImplementedError

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
