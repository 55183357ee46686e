r"""``torch.nn.Embedding``: a table whose rows the inputs' token ids pick.

The output at position ``t`` is row ``id_t`` of the weight ``W`` (``[V, D]``). With ``g`` the
gradient of an output-side vector at the output, the per-sample gradient of input ``n``
is ``X_{m,n} = Σ_t e_{id_t} g_{m,n,t}ᵀ`` (positions at ``padding_idx`` count for nothing,
as the layer's own backward gives them nothing). Its block follows the size rule of
:mod:`kfoc_backpack.collect.parameters`: a small table gets its exact dense block; a
larger one K-FOC's factors (a ``V × V`` vocabulary-side and a ``D × D`` width-side
factor). ``X_{m,n}ᵀ = Σ_t g_{m,n,t} e_{id_t}ᵀ`` is a layer's per-sample matrix with the
vectors ``g`` on its output side and the one-hot ids as its inputs, so the table is
solved by the layers' routes on the transposed problem
(:class:`~kfoc_backpack.solver.transposed.TransposedTerms`), never forming the
``M·N`` per-sample ``V × D`` matrices. K-FAC's factors (``hessian_structure="kfac"``)
are the KFC ones of that layer, swapped: the ids' frequencies ``diag(count)/T`` on the
vocabulary side, ``Σ g gᵀ`` on the width side. A table of more than
:data:`~kfoc_backpack.collect.loose.MAX_ENTRIES` entries is refused, naming the layer
(its ``V × V`` factor alone would not fit).

Index conventions: ``M`` vectors per input, ``N`` inputs, ``T`` positions (tokens),
``V`` rows (the vocabulary), ``D`` the width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Embedding, Module

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.batch_layout import BatchLayout
from kfoc_backpack.collect.handover import sum_of_squares, weight_terms
from kfoc_backpack.collect.jacobians import (
    Jacobian,
    PositionJacobian,
    RowJacobian,
    TransposedJacobian,
)
from kfoc_backpack.collect.kinds.base import ModuleKind, Terms
from kfoc_backpack.collect.layer_terms import LayerTerms, WeightSteps
from kfoc_backpack.collect.loose import MAX_ENTRIES
from kfoc_backpack.collect.parameters import block_shape, row_terms, zero_block
from kfoc_backpack.solver.transposed import TransposedTerms


class EmbeddingKind(ModuleKind):
    """``Embedding`` (``scale_grad_by_freq``, which couples the inputs, is refused)."""

    types = (Embedding,)
    any_batch_dim = True

    def coupling(self, module: Module) -> str | None:
        """``scale_grad_by_freq`` divides each row's gradient by its count in the whole batch."""
        if module.scale_grad_by_freq:
            return (
                "has scale_grad_by_freq=True: its gradient divides by the ids' counts in the "
                "whole batch, which couples the inputs (no per-sample gradients). Freeze it"
            )
        return None

    def problem(self, module: Module) -> str | None:
        """Name a table too large for per-sample rows, if it is."""
        if module.weight.numel() > MAX_ENTRIES:
            return (
                f"a table of {module.weight.numel()} entries (more than {MAX_ENTRIES}: its "
                "per-sample gradients would hold a copy of it per vector and input)"
            )
        return None

    def zero_blocks(self, module: Module) -> dict[str, Block]:
        """Return the weight's zero block (the size rule's structure)."""
        return {"weight": zero_block(module.weight)}

    def positions(
        self, module: Module, ids: list[Tensor], grads: list[Tensor], layout: BatchLayout
    ) -> tuple[Tensor, Tensor]:
        """``([N, T, V], [M, N, T, D])``: the one-hot ids and the vectors at the positions.

        Every call's positions together; a position at ``padding_idx`` has a zero one-hot
        row and zero vectors.
        """
        onehots, vectors = [], []
        for index, g in zip(ids, grads):
            split = layout.split(g, lead=1)  # [M, N, …, D]
            num = split.shape[1]
            flat = split.reshape(split.shape[0], num, -1, split.shape[-1])  # [M, N, T, D]
            flat_ids = layout.split(index).reshape(num, -1)  # [N, T]
            onehot = F.one_hot(flat_ids, module.num_embeddings).to(flat.dtype)
            if module.padding_idx is not None:
                keep = (flat_ids != module.padding_idx).to(flat.dtype)
                flat, onehot = flat * keep.unsqueeze(-1), onehot * keep.unsqueeze(-1)
            onehots.append(onehot)
            vectors.append(flat)
        return torch.cat(onehots, 1), torch.cat(vectors, 2)

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
        """Return the weight's terms: its exact dense block, or the transposed layer's terms."""
        if "weight" not in wanted:
            return {}
        onehot, vectors = self.positions(module, inputs, grads, layout)
        if block_shape(module.weight.shape) is None:
            rows = torch.einsum("ntv,mntd->mnvd", onehot, vectors)
            return {"weight": row_terms(rows, module.weight.shape, with_kfac)}
        inner = weight_terms(onehot, vectors, steps=steps)  # the terms of Xᵀ ([D, V])
        num, positions = onehot.shape[:2]
        kfac = None
        if with_kfac:  # KFC of the transposed layer, swapped: diag(count)/T ⊗ Σ g gᵀ / N
            flat = vectors.flatten(end_dim=2)
            kfac = (torch.diag(onehot.sum((0, 1)) / positions), flat.T @ flat / num)
        trace = sum_of_squares(vectors) / num  # the width-side factor's: a mean over inputs
        return {"weight": LayerTerms(TransposedTerms(inner.terms), trace, kfac, inner.sizes, steps)}

    def jacobians(
        self,
        module: Module,
        inputs: list[Tensor],
        grads: list[Tensor],
        layout: BatchLayout,
        wanted: set[str],
    ) -> dict[str, Jacobian]:
        """Return the weight's Jacobian: rows, or the transposed layer's position form."""
        if "weight" not in wanted:
            return {}
        onehot, vectors = self.positions(module, inputs, grads, layout)
        if block_shape(module.weight.shape) is None:
            rows = torch.einsum("ntv,cntd->cnvd", onehot, vectors)
            return {"weight": RowJacobian(rows.flatten(start_dim=2))}
        return {"weight": TransposedJacobian(PositionJacobian(vectors, onehot))}
