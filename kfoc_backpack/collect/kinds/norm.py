r"""Normalisation layers: their scale and shift, known by exact per-sample gradients.

``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``BatchNorm`` (in eval mode) compute
``y = x̂ ⊙ w + b`` from a normalised input ``x̂`` that depends on the input alone (its
own statistics, or BatchNorm's running ones). With ``g`` the gradient of an output-side
vector at ``y``, the per-sample gradients are ``Σ g ⊙ x̂`` (scale) and ``Σ g`` (shift),
summed over every dimension the parameter is shared over (tokens, pixels). Their
blocks follow the size rule of :mod:`kfoc_backpack.collect.parameters` (the exact dense
block for a channel vector), the same for every approximation.

A subclass that overrides ``forward`` (torchvision's ``LayerNorm2d``, timm's
``LayerNorm``) is taken only where the description reproduces its output on the first
batch (:meth:`~kfoc_backpack.collect.kinds.base.ModuleKind.reproduces`); otherwise its
parameters get per-sample gradients as any module's do
(:mod:`kfoc_backpack.collect.loose`), with the same blocks.

Index conventions: ``M`` vectors per input, ``N`` inputs, ``C`` channels, ``P`` a
parameter's entries.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    LayerNorm,
    Module,
    SyncBatchNorm,
)

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.batch_layout import BatchLayout
from kfoc_backpack.collect.jacobians import Jacobian, RowJacobian
from kfoc_backpack.collect.kinds.base import ModuleKind, Terms
from kfoc_backpack.collect.layer_terms import WeightSteps
from kfoc_backpack.collect.parameters import row_terms, zero_block

AFFINE = ("weight", "bias")


class NormKind(ModuleKind):
    """A normalisation layer ``y = x̂ ⊙ w + b`` (either parameter may be absent)."""

    fallback_loose = True

    @abstractmethod
    def normalized(self, module: Module, x: Tensor) -> Tensor:
        """``x̂``: the input ``x`` normalised, before the scale and shift."""

    @abstractmethod
    def arrange(self, tensor: Tensor, layout: BatchLayout, lead: int = 0) -> Tensor:
        """``tensor`` (``[*lead, …]``, in ``layout``) with its inputs in dimension ``lead``."""

    @abstractmethod
    def shared(self, module: Module, product: Tensor) -> Tensor:
        """``[M, N, P]``: ``product`` (arranged ``[M, N, …]``) summed over the shared dimensions."""

    def zero_blocks(self, module: Module) -> dict[str, Block]:
        """Return each affine parameter's zero block (the size rule's structure)."""
        return {
            name: zero_block(param)
            for name in AFFINE
            if (param := getattr(module, name, None)) is not None
        }

    def _rows(
        self,
        module: Module,
        inputs: list[Tensor],
        grads: list[Tensor],
        layout: BatchLayout,
        wanted: set[str],
    ) -> dict[str, Tensor]:
        """``[M, N, P]`` per-sample gradients of the ``wanted`` parameters, all calls summed."""
        rows: dict[str, Tensor] = {}
        for x, g in zip(inputs, grads):
            found = {}
            vectors = self.arrange(g, layout, lead=1)
            if "weight" in wanted:
                normalized = self.arrange(self.normalized(module, x), layout)
                found["weight"] = self.shared(module, vectors * normalized)
            if "bias" in wanted:
                found["bias"] = self.shared(module, vectors)
            for name, value in found.items():
                rows[name] = value if name not in rows else rows[name] + value
        return rows

    def terms(
        self,
        module: Module,
        inputs: list[Tensor],
        grads: list[Tensor],
        layout: BatchLayout,
        wanted: set[str],
        with_kfac: bool = False,
        steps: WeightSteps | None = None,
    ) -> dict[str, Terms]:
        """Each wanted parameter's terms from its exact per-sample gradients."""
        rows = self._rows(module, inputs, grads, layout, wanted)
        return {
            name: row_terms(value, getattr(module, name).shape, with_kfac)
            for name, value in rows.items()
        }

    def jacobians(
        self,
        module: Module,
        inputs: list[Tensor],
        grads: list[Tensor],
        layout: BatchLayout,
        wanted: set[str],
    ) -> dict[str, Jacobian]:
        """Each wanted parameter's Jacobian rows."""
        rows = self._rows(module, inputs, grads, layout, wanted)
        return {name: RowJacobian(value) for name, value in rows.items()}


class TrailingNormKind(NormKind):
    """Layers whose parameters have the input's last dimensions' shape."""

    any_batch_dim = True

    def arrange(self, tensor: Tensor, layout: BatchLayout, lead: int = 0) -> Tensor:
        """``[*lead, N, …, *normalized_shape]`` (a fold's rows beside the inputs)."""
        return layout.split(tensor, lead)

    def shared(self, module: Module, product: Tensor) -> Tensor:
        """Sum over the dimensions between the inputs and the normalised shape."""
        trailing = len(module.normalized_shape)
        flat = product.flatten(start_dim=product.dim() - trailing)  # [M, N, …, P]
        return flat.reshape(flat.shape[0], flat.shape[1], -1, flat.shape[-1]).sum(2)


class LayerNormKind(TrailingNormKind):
    """``torch.nn.LayerNorm``: ``x̂`` standardised over the normalised shape."""

    types = (LayerNorm,)

    def normalized(self, module: Module, x: Tensor) -> Tensor:
        """``x̂ = (x − mean) / √(var + eps)`` over the last dimensions."""
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormKind(TrailingNormKind):
    """``torch.nn.RMSNorm``: ``x̂`` divided by its root mean square over the normalised shape."""

    types = (torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()

    def normalized(self, module: Module, x: Tensor) -> Tensor:
        """``x̂ = x / √(mean(x²) + eps)`` over the last dimensions."""
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class ChannelNormKind(NormKind):
    """Layers whose parameters are one number per channel (dimension 1 of the input)."""

    def arrange(self, tensor: Tensor, layout: BatchLayout, lead: int = 0) -> Tensor:
        """``[*lead, N, C, T]``: the positions (and a fold's rows) flattened into ``T``."""
        if tensor.dim() == lead + 2:  # [*lead, N, C]: one position
            tensor = tensor.unsqueeze(-1)
        return layout.positions(tensor.flatten(start_dim=lead + 2), lead)

    def shared(self, module: Module, product: Tensor) -> Tensor:
        """Sum over the positions: ``[M, N, C]``."""
        return product.sum(3)


class GroupNormKind(ChannelNormKind):
    """``torch.nn.GroupNorm``: ``x̂`` standardised over each group of channels."""

    types = (GroupNorm,)

    def normalized(self, module: Module, x: Tensor) -> Tensor:
        """``x̂`` standardised per input over each group's channels and positions."""
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class BatchNormKind(ChannelNormKind):
    """``torch.nn.BatchNorm1d/2d/3d`` in eval mode: ``x̂`` standardised by the running statistics."""

    types = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)

    def coupling(self, module: Module) -> str | None:
        """Training mode (or no running statistics) normalises by the batch's statistics."""
        if module.training or module.running_mean is None:
            return (
                "normalises with the batch's own statistics (training mode or "
                "track_running_stats=False), which couples the inputs: its samples have no "
                "per-sample gradients. Put it in eval mode (laplace-torch's fit does) or "
                "freeze it"
            )
        return None

    def normalized(self, module: Module, x: Tensor) -> Tensor:
        """``x̂ = (x − running_mean) / √(running_var + eps)`` per channel."""
        return F.batch_norm(
            x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
        )
