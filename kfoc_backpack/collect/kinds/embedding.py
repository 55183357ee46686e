r"""``torch.nn.Embedding``: a table whose rows the inputs' token ids pick.

The output at position ``t`` is row ``id_t`` of the weight ``W`` (``[V, D]``). With ``g`` the
gradient of an output-side vector at the output, the per-sample gradient of input ``n``
is ``X_{m,n} = Σ_t e_{id_t} g_{m,n,t}ᵀ``: the vectors ``g`` added into the rows of the
ids the input holds (positions at ``padding_idx`` get none, as the layer's own backward
gives them none). Its block follows the size rule of
:mod:`kfoc_backpack.collect.parameters`: the exact dense block for a small table, else
K-FOC's factors of the per-sample matrices (a ``V × V`` vocabulary-side factor and a
``D × D`` width-side one). A table of more than
:data:`~kfoc_backpack.collect.loose.MAX_ENTRIES` entries is refused (its per-sample
gradients hold ``M·N`` copies of it), naming the layer.

Index conventions: ``M`` vectors per input, ``N`` inputs, ``T`` positions (tokens),
``V`` rows (the vocabulary), ``D`` the width.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import Embedding, Module

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.batch_layout import BatchLayout
from kfoc_backpack.collect.jacobians import Jacobian, RowJacobian
from kfoc_backpack.collect.kinds.base import ModuleKind, Terms
from kfoc_backpack.collect.layer_terms import WeightSteps
from kfoc_backpack.collect.loose import MAX_ENTRIES
from kfoc_backpack.collect.parameters import row_terms, zero_block


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

    def _rows(
        self, module: Module, ids: list[Tensor], grads: list[Tensor], layout: BatchLayout
    ) -> Tensor:
        """``[M, N, V, D]``: each vector's gradient added into its ids' rows, all calls summed."""
        rows = None
        for index, g in zip(ids, grads):
            index = layout.split(index)  # [N, …]
            vectors = layout.split(g, lead=1)  # [M, N, …, D]
            num = vectors.shape[1]
            flat_ids = index.reshape(num, -1)  # [N, T]
            flat = vectors.reshape(vectors.shape[0], num, -1, vectors.shape[-1])  # [M, N, T, D]
            if module.padding_idx is not None:
                flat = flat * (flat_ids != module.padding_idx).unsqueeze(-1).to(flat)
            table = flat.new_zeros(flat.shape[0], num, module.num_embeddings, flat.shape[-1])
            where = flat_ids.unsqueeze(0).unsqueeze(-1).expand_as(flat)
            table.scatter_add_(2, where, flat)
            rows = table if rows is None else rows + table
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
        """Return the weight's terms from its per-sample rows."""
        if "weight" not in wanted:
            return {}
        rows = self._rows(module, inputs, grads, layout)
        return {"weight": row_terms(rows, module.weight.shape, with_kfac)}

    def jacobians(
        self,
        module: Module,
        inputs: list[Tensor],
        grads: list[Tensor],
        layout: BatchLayout,
        wanted: set[str],
    ) -> dict[str, Jacobian]:
        """Return the weight's Jacobian rows."""
        if "weight" not in wanted:
            return {}
        rows = self._rows(module, inputs, grads, layout)
        return {"weight": RowJacobian(rows.flatten(start_dim=2))}
