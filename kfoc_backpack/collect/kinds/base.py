"""What a kind of module hands the solver; the kind of layers sharing a weight over positions.

A :class:`ModuleKind` turns what the hook route recorded at one module — its inputs and
the gradients of the output-side vectors at its output, in the layout the module saw
the batch in — into the terms of its parameters
(:class:`~kfoc_backpack.collect.layer_terms.LayerTerms` or
:class:`~kfoc_backpack.collect.layer_terms.DenseTerms`) and into their output Jacobians
(:mod:`kfoc_backpack.collect.jacobians`). Two families:

* :class:`LayerKind`: a weight ``W`` (``O × I``) shared over ``T`` positions, per input
  ``n`` and output-side column ``m`` ``X_{m,n} = Σ_t g_{m,n,t} a_{n,t}ᵀ``
  (docs/conventions.md §1), and its bias. A kind says how the layer's input and the
  vectors at its output become the two tensors of that description; everything after
  it (:func:`~kfoc_backpack.collect.handover.weight_terms`: rank one, the route choice,
  the grouped form, K-FAC's factors, the bias block) is shared by all such kinds and
  by both collection routes (the hook route and BackPACK's module extensions);
* kinds whose parameters are known by their per-sample gradients (normalisation
  layers, :mod:`~kfoc_backpack.collect.kinds.norm`), whose blocks follow the one size
  rule of :mod:`kfoc_backpack.collect.parameters`.

Index conventions: ``M`` vectors per input, ``N`` inputs, ``T`` positions, ``I`` input
features (``C_in·Πkernel`` for convolutions), ``O`` output features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.blocks import Block, DenseBlock, GroupedKroneckerBlock, KroneckerBlock
from kfoc_backpack.collect.batch_layout import PLAIN, BatchLayout
from kfoc_backpack.collect.handover import bias_block, weight_terms
from kfoc_backpack.collect.jacobians import Jacobian, PositionJacobian, RowJacobian
from kfoc_backpack.collect.layer_terms import DenseTerms, LayerTerms, WeightSteps

Terms = LayerTerms | DenseTerms
"""A parameter's per-sample quantities: Kronecker terms or a dense block."""


class ModuleKind(ABC):
    """One kind of module: its types, and its parameters' terms and Jacobians from a batch.

    Subclasses live in one file per family in :mod:`kfoc_backpack.collect.kinds` and are
    listed in :data:`~kfoc_backpack.collect.kinds.KINDS`.
    """

    types: tuple[type[Module], ...]
    """Module types of this kind."""

    any_batch_dim: bool = False
    """Whether the batch may sit in dimension 1 of the module's activations (modules
    that keep their features last, such as ``Linear`` in sequence-first attention)."""

    backpack: ClassVar[bool] = False
    """Whether BackPACK's module extensions of this package cover the kind
    (:mod:`kfoc_backpack.extensions`); the others exist on the hook route only."""

    def problem(self, module: Module) -> str | None:
        """Name a setting of ``module`` this kind cannot represent (``None``: none)."""
        return None

    def coupling(self, module: Module) -> str | None:
        """Name a state in which ``module`` couples the batch's inputs (``None``: none).

        Checked at every batch: such a module has no per-sample gradients (BatchNorm
        in training mode).
        """
        return None

    fallback_loose: ClassVar[bool] = False
    """Whether a module the kind does not describe (:meth:`reproduces`) may get
    per-sample gradients by ``torch.func`` instead: its blocks have the same structure
    either way. Otherwise such a module is refused."""

    def base_type(self, module: Module) -> type[Module]:
        """Return the kind's type ``module`` is an instance of (its nearest in the MRO)."""
        return next(t for t in type(module).__mro__ if t in self.types)

    def reproduces(self, module: Module, inputs: Tensor, output: Tensor) -> bool:
        """Whether the kind's type's ``forward`` on ``inputs`` gives ``module``'s ``output``.

        Checked once, on the first batch: a subclass that overrides ``forward``
        (torchvision's ``LayerNorm2d``, a ``Linear`` that scales its output) is described
        by the kind only where its ``forward`` computes what the kind's type's does.
        """
        base = self.base_type(module)
        if base.forward is type(module).forward:
            return True
        try:
            with torch.no_grad():
                expected = base.forward(module, inputs)
        except (RuntimeError, ValueError, IndexError, TypeError):
            return False
        if not isinstance(expected, Tensor) or expected.shape != output.shape:
            return False
        scale = float(output.detach().abs().max()) if output.numel() else 0.0
        return torch.allclose(expected, output.detach(), rtol=1e-4, atol=1e-4 * scale + 1e-12)

    @abstractmethod
    def zero_blocks(self, module: Module) -> dict[str, Block]:
        """Return the all-zero block of each of the module's own parameters, by name."""

    @abstractmethod
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
        """Return the terms of the module's ``wanted`` parameters from one batch.

        Args:
            module: The module.
            inputs: Its input at each of its calls in the forward pass (detached).
            grads: ``[M, *output]`` the output-side vectors' gradients at each call's
                output.
            layout: Where the module's activations keep the inputs.
            wanted: Names of the parameters to return (the trainable ones).
            with_kfac: Also K-FAC's factors of the same samples.
            steps: The Lanczos steps of the weight's last solve (route choice).
        """

    @abstractmethod
    def jacobians(
        self,
        module: Module,
        inputs: list[Tensor],
        grads: list[Tensor],
        layout: BatchLayout,
        wanted: set[str],
    ) -> dict[str, Jacobian]:
        """Return the output Jacobians of the ``wanted`` parameters (``grads``: one per output)."""


class LayerKind(ModuleKind):
    """Layers with a weight shared over positions, and a bias.

    Subclasses say how the layer's input and output-side vectors become positions
    (:meth:`inputs`, :meth:`vectors`); a subclass of a layer type whose ``forward``
    differs is taken as the layer (the hook route records its input and output).
    """

    backpack = True

    def groups(self, module: Module) -> int:
        """Return the layer's ``groups`` (rows of ``W`` that see disjoint input features)."""
        return 1

    @abstractmethod
    def inputs(self, module: Module, x: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[N, T, I]``: the layer's input ``x`` at its positions, inputs first."""

    @abstractmethod
    def vectors(self, module: Module, g: Tensor, layout: BatchLayout = PLAIN) -> Tensor:
        """``[M, N, T, O]``: the output-side vectors ``g`` (``[M, *output]``) at the positions."""

    def positions(
        self, module: Module, inputs: list[Tensor], grads: list[Tensor], layout: BatchLayout
    ) -> tuple[Tensor, Tensor]:
        """``([N, T, I], [M, N, T, O])``: the inputs and vectors of all calls at the positions.

        A layer called several times: its calls are positions of one weight (one call:
        the views as they are, no copy).
        """
        at = [self.inputs(module, x, layout) for x in inputs]
        vectors = [self.vectors(module, g, layout) for g in grads]
        return (
            at[0] if len(at) == 1 else torch.cat(at, 1),
            vectors[0] if len(vectors) == 1 else torch.cat(vectors, 2),
        )

    def zero_blocks(self, module: Module) -> dict[str, Block]:
        """Return the all-zero blocks of the layer's parameters: weight ``0 ⊗ 0``, bias ``[0]``.

        The weight ``W`` is the ``O × I`` matrix of its first dimension against the rest
        (a grouped convolution's ``I`` is its group's ``C_in/groups·Πkernel``, and its
        zero is per group: :class:`~kfoc_backpack.blocks.GroupedKroneckerBlock`, which
        an approximation that couples the groups replaces by its
        :meth:`~kfoc_backpack.blocks.GroupedKroneckerBlock.coupled_zero`); the bias
        gets its exact ``O × O`` block.
        """
        weight = module.weight.detach()
        rows, columns, groups = weight.shape[0], weight[0].numel(), self.groups(module)
        zero: Block = KroneckerBlock.zeros(rows, columns, weight)
        if groups > 1:
            zero = GroupedKroneckerBlock.zeros(groups, rows // groups, columns, weight)
        blocks: dict[str, Block] = {"weight": zero}
        if getattr(module, "bias", None) is not None:
            blocks["bias"] = DenseBlock.zeros(module.bias.numel(), module.bias.detach())
        return blocks

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
        """Return the weight's :class:`LayerTerms` (the hand-over) and the bias's exact block."""
        at, vectors = self.positions(module, inputs, grads, layout)
        result: dict[str, Terms] = {}
        if "weight" in wanted:
            groups = self.groups(module)
            result["weight"] = weight_terms(at, vectors, with_kfac, groups=groups, steps=steps)
        if "bias" in wanted:
            kfac = DenseBlock(bias_block(vectors.flatten(1, 2))) if with_kfac else None
            result["bias"] = DenseTerms(DenseBlock(bias_block(vectors.sum(2))), kfac)
        return result

    def jacobians(
        self,
        module: Module,
        inputs: list[Tensor],
        grads: list[Tensor],
        layout: BatchLayout,
        wanted: set[str],
    ) -> dict[str, Jacobian]:
        """Return the weight's :class:`PositionJacobian` and the bias's rows."""
        at, vectors = self.positions(module, inputs, grads, layout)
        result: dict[str, Jacobian] = {}
        if "weight" in wanted:
            result["weight"] = PositionJacobian(vectors, at, self.groups(module))
        if "bias" in wanted:
            result["bias"] = RowJacobian(vectors.sum(2))
        return result
