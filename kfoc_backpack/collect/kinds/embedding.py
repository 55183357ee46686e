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
:data:`~kfoc_backpack.collect.parameters.VOCABULARY_LIMIT` rows (or
:data:`~kfoc_backpack.collect.loose.MAX_ENTRIES` entries), whose ``V × V`` factor would
not fit, gets ``diag(l) ⊗ R`` instead (:mod:`kfoc_backpack.solver.vocabulary`): its
per-sample rows are kept merged by id (:class:`~kfoc_backpack.solver.vocabulary.VocabularyTerms`),
no one-hot or ``V × V`` matrix is formed, and K-FAC's row side is the ids' frequencies.

Index conventions: ``M`` vectors per input, ``N`` inputs, ``T`` positions (tokens),
``V`` rows (the vocabulary), ``D`` the width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Embedding, Module

from kfoc_backpack.blocks import Block, DiagonalKroneckerBlock
from kfoc_backpack.collect.batch_layout import BatchLayout
from kfoc_backpack.collect.handover import sum_of_squares, weight_terms
from kfoc_backpack.collect.jacobians import (
    Jacobian,
    PositionJacobian,
    RowJacobian,
    TransposedJacobian,
    VocabularyJacobian,
)
from kfoc_backpack.collect.kinds.base import ModuleKind, Terms
from kfoc_backpack.collect.layer_terms import DiagonalLayerTerms, LayerTerms, WeightSteps
from kfoc_backpack.collect.parameters import block_shape, diagonal_rows, row_terms, zero_block
from kfoc_backpack.solver.transposed import TransposedTerms
from kfoc_backpack.solver.vocabulary import VocabularyTerms


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

    def zero_blocks(self, module: Module) -> dict[str, Block]:
        """Return the weight's zero block (the size rule's structure)."""
        if self.diagonal(module):
            weight = module.weight.detach()
            return {"weight": DiagonalKroneckerBlock.zeros(*weight.shape, weight)}
        return {"weight": zero_block(module.weight)}

    def positions(
        self, module: Module, ids: list[Tensor], grads: list[Tensor], layout: BatchLayout
    ) -> tuple[Tensor, Tensor]:
        """``([N, T], [M, N, T, D])``: the ids and the vectors at the positions.

        Every call's positions together; a position at ``padding_idx`` keeps its id and
        has zero vectors (its one-hot row is zeroed by :meth:`onehot`).
        """
        flat_ids, vectors = [], []
        for index, g in zip(ids, grads):
            split = layout.split(g, lead=1)  # [M, N, …, D]
            num = split.shape[1]
            flat = split.reshape(split.shape[0], num, -1, split.shape[-1])  # [M, N, T, D]
            index = layout.split(index).reshape(num, -1)  # [N, T]
            if module.padding_idx is not None:
                flat = flat * (index != module.padding_idx).to(flat.dtype).unsqueeze(-1)
            flat_ids.append(index)
            vectors.append(flat)
        return torch.cat(flat_ids, 1), torch.cat(vectors, 2)

    @staticmethod
    def onehot(module: Module, ids: Tensor, like: Tensor) -> Tensor:
        """``[N, T, V]`` one-hot rows of ``ids`` (zero at ``padding_idx``), in ``like``'s dtype."""
        onehot = F.one_hot(ids, module.num_embeddings).to(like.dtype)
        if module.padding_idx is not None:
            onehot = onehot * (ids != module.padding_idx).to(like.dtype).unsqueeze(-1)
        return onehot

    @staticmethod
    def diagonal(module: Module) -> bool:
        """Whether the table's block has a diagonal row side (the size rule)."""
        return diagonal_rows(module.num_embeddings, module.embedding_dim)

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
        ids, vectors = self.positions(module, inputs, grads, layout)
        num, positions = ids.shape
        trace = sum_of_squares(vectors) / num  # the width-side factor's: a mean over inputs
        frequencies = width = None
        if with_kfac:  # KFC of the transposed layer, swapped: diag(count)/T ⊗ Σ g gᵀ / N
            flat = vectors.flatten(end_dim=2)
            frequencies = self.onehot_counts(module, ids, vectors) / positions
            width = flat.T @ flat / num
        if self.diagonal(module):
            terms = VocabularyTerms.from_positions(
                ids, vectors, module.num_embeddings, module.padding_idx
            )
            kfac = None if frequencies is None else (frequencies, width)
            return {"weight": DiagonalLayerTerms(terms, trace, kfac)}
        onehot = self.onehot(module, ids, vectors)
        if block_shape(module.weight.shape) is None:
            rows = torch.einsum("ntv,mntd->mnvd", onehot, vectors)
            return {"weight": row_terms(rows, module.weight.shape, with_kfac)}
        inner = weight_terms(onehot, vectors, steps=steps)  # the terms of Xᵀ ([D, V])
        kfac = None if frequencies is None else (torch.diag(frequencies), width)
        return {"weight": LayerTerms(TransposedTerms(inner.terms), trace, kfac, inner.sizes, steps)}

    @staticmethod
    def onehot_counts(module: Module, ids: Tensor, like: Tensor) -> Tensor:
        """``[V]`` how often each id occurs (``padding_idx`` not counted), in ``like``'s dtype."""
        keep = ids.flatten()
        if module.padding_idx is not None:
            keep = keep[keep != module.padding_idx]
        return torch.bincount(keep, minlength=module.num_embeddings).to(like.dtype)

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
        ids, vectors = self.positions(module, inputs, grads, layout)
        if self.diagonal(module):
            jacobian = VocabularyJacobian(ids, vectors, module.num_embeddings, module.padding_idx)
            return {"weight": jacobian}
        onehot = self.onehot(module, ids, vectors)
        if block_shape(module.weight.shape) is None:
            rows = torch.einsum("ntv,cntd->cnvd", onehot, vectors)
            return {"weight": RowJacobian(rows.flatten(start_dim=2))}
        return {"weight": TransposedJacobian(PositionJacobian(vectors, onehot))}
