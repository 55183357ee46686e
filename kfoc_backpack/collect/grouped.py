r"""A grouped convolution's hand-over: its positions, solved per group or coupled.

A convolution with ``groups = G > 1`` hands over its positions once
(:class:`GroupedLayerTerms`); the approximation says which block the weight gets
(:class:`~kfoc_backpack.enums.Grouped`):

* **per group** — each group is an ungrouped layer of ``M = C_out/G`` rows and ``N =
  C_in/G·Πkernel`` input features (:meth:`GroupedLayerTerms.kfoc_block`: its formed
  matrices solved by Lanczos; depthwise layers, ``M = 1``, in one batched product:
  each channel's block is its exact ``N × N`` block);
* **coupled** — one product over all ``C_out`` rows, on the route the table picks
  (:meth:`GroupedLayerTerms.coupled`).

K-FAC's factors of the same samples are laplace-torch's (the groups counted as
positions, coupled). See docs/conventions.md §11.

Index conventions: ``J`` columns per input, ``K`` inputs, ``T`` positions, ``G``
groups, ``M``/``N`` rows/input features per group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kfoc_backpack.blocks import GroupedKroneckerBlock, KroneckerBlock
from kfoc_backpack.blocks.grouped import split_blocks
from kfoc_backpack.collect.layer_terms import (
    LayerTerms,
    Naming,
    WeightSteps,
    named_failures,
    table_route,
)
from kfoc_backpack.enums import Grouped
from kfoc_backpack.solver import LayerSizes, SolverOptions
from kfoc_backpack.solver.grouped import GroupedTerms
from kfoc_backpack.solver.shared.formed import FormedRouteTerms


@dataclass(frozen=True)
class GroupedLayerTerms(LayerTerms):
    """The per-sample quantities of a grouped weight (a weight's terms, handed over once).

    Attributes:
        terms: The per-sample matrices by group
            (:class:`~kfoc_backpack.solver.grouped.GroupedTerms`, formed once: the
            matrices the coupled routes hold).
        input_trace: ``[G]``: each group's K-FAC ``tr R_g = (1/K) Σ_k ‖â_{k,g}‖²_F``.
        kfac: K-FAC's coupled factors of the same samples (laplace-torch's ``kron``),
            or ``None``.
        sizes: The layer's sizes (``groups = G``).
        steps: Where the solves note their Lanczos steps, or ``None``.
    """

    terms: GroupedTerms  # type: ignore[assignment]

    @classmethod
    def of_positions(
        cls,
        inputs: Tensor,
        vectors: Tensor,
        groups: int,
        kfac: tuple[Tensor, Tensor] | None = None,
        steps: WeightSteps | None = None,
    ) -> GroupedLayerTerms:
        """Return the terms of ``[K, T, G·N]`` inputs and ``[J, K, T, G·M]`` vectors."""
        columns, num, positions, out_features = vectors.shape
        per_group = inputs.unflatten(2, (groups, -1))
        traces = torch.linalg.vector_norm(per_group, dim=(0, 1, 3)).square() / num
        sizes = LayerSizes(columns, num, positions, out_features, per_group.shape[-1], groups)
        terms = GroupedTerms.from_positions(vectors, inputs, groups)
        return cls(terms, traces, kfac, sizes, steps)

    def with_structure(self, grouped: Grouped) -> LayerTerms:
        """Return these terms (per group) or :meth:`coupled`, as ``grouped`` says."""
        return self if grouped is Grouped.PER_GROUP else self.coupled()

    def coupled(self) -> LayerTerms:
        """Return the terms of one product over all rows, on the route the table picks.

        The grouped routes (``formed``, ``operator``) both hold the matrices over all
        rows: the choice is between their solves, by the layer's sizes.
        """
        chosen = table_route(self.sizes, self.terms.samples, self.steps)
        terms = chosen(self.terms.coupled())
        return LayerTerms(terms, self.input_trace.sum(), self.kfac, self.sizes, self.steps)

    def solve(self, options: SolverOptions | None = None, what: Naming = None):  # type: ignore[override]
        """Refused: a grouped weight's factors are per group (:meth:`kfoc_block`) or coupled.

        Raises:
            TypeError: Always; take :meth:`with_structure` first.
        """
        raise TypeError(
            "GroupedLayerTerms has no single pair of factors: use kfoc_block() for one "
            "product per group, or with_structure(Grouped.COUPLED) for one over all rows."
        )

    def group(self, index: int) -> LayerTerms:
        """Group ``index`` as an ungrouped weight's terms (its matrices, route ``formed``)."""
        rows, features = self.terms.shape
        columns, num, positions = self.sizes[:3]
        sizes = LayerSizes(columns, num, positions, rows, features)
        terms = FormedRouteTerms(self.terms.group(index).samples)
        return LayerTerms(terms, self.input_trace[index], None, sizes, self.steps)

    def kfoc_block(
        self, options: SolverOptions | None = None, what: Naming = None
    ) -> GroupedKroneckerBlock:
        """Each group's K-FOC block in K-FAC's split: ``blockdiag_g(L_g ⊗ R_g)``.

        One row per group: each channel's exact block in one product. Otherwise each
        group's :meth:`LayerTerms.kfoc_block`, warning (naming ``what`` and the group)
        where a solve stopped at ``max_iter``.

        Raises:
            FloatingPointError: For terms or factors that are not finite, naming ``what``.
        """
        if self.terms.shape[0] == 1:
            with named_failures(what):
                blocks = self.terms.blocks()
                if not torch.isfinite(blocks).all():
                    raise FloatingPointError("the per-sample terms are not finite.")
            return GroupedKroneckerBlock(*split_blocks(blocks, self.input_trace.to(blocks)))
        lefts, rights = [], []
        for index in range(self.terms.groups):
            block = self.group(index).kfoc_block(options, _of_group(what, index))
            lefts.append(block.left)
            rights.append(block.right)
        return GroupedKroneckerBlock(torch.stack(lefts), torch.stack(rights))

    def kfac_block(self) -> KroneckerBlock:
        """K-FAC's coupled ``L ⊗ R`` (laplace-torch's ``kron`` of a grouped layer).

        Raises:
            ValueError: If the quantities were collected without K-FAC's factors.
        """
        if self.kfac is None:
            raise ValueError("K-FAC's factors were not collected (with_kfac=False).")
        return KroneckerBlock(*self.kfac)

    def detach(self) -> GroupedLayerTerms:
        """Return the same quantities, detached from any autograd graph."""
        kfac = None if self.kfac is None else tuple(f.detach() for f in self.kfac)
        return replace(
            self, terms=self.terms.detach(), input_trace=self.input_trace.detach(), kfac=kfac
        )


def _of_group(what: Naming, index: int) -> Naming:
    """Return ``what`` with the group's index appended (still made only when needed)."""
    if what is None:
        return f"group {index}"
    return lambda: f"{what() if callable(what) else what}, group {index}"
