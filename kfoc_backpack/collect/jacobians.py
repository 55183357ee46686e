r"""The model output's Jacobian with respect to each parameter, in the parameter's own form.

For the GLM predictive the posterior needs ``J P⁻¹ Jᵀ`` per input, ``J`` the Jacobian of
the ``C`` outputs with respect to the parameters. It is never formed whole (``batch ×
outputs × parameters`` numbers): each parameter's part comes in the form its layer has,

* a weight shared over ``T`` positions (:class:`PositionJacobian`): row ``c`` of input
  ``n`` is the matrix ``J_{n,c} = Σ_t g_{c,n,t} a_{n,t}ᵀ`` (``O × I``), kept as the
  output-side vectors ``g`` (the backpropagation of each output unit to the layer's
  output) and the inputs ``a`` — the per-sample terms of §1 with one column per output;
* a large embedding table as its ids and vectors (:class:`VocabularyJacobian`);
* any other parameter (a bias, ``Σ_t g_{c,n,t}``) as its rows (:class:`RowJacobian`),

and a posterior block (:meth:`kfoc_backpack.blocks.Decomposed.output_covariance`) turns
each into its share of the output covariance, a layer at a time.

Index conventions: ``C`` outputs per input, ``N`` inputs, ``T`` positions, ``O``/``I`` a
weight's output/input features (``I`` per group for a grouped convolution), ``P`` a
parameter's entries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.solver.shared.formed import formed_samples
from kfoc_backpack.solver.vocabulary import compact_chunks, dense_rows, merge_rows


@dataclass(frozen=True)
class RowJacobian:
    """A parameter's output Jacobian as rows.

    Attributes:
        values: ``[C, N, P]``: ``∂f_{n,c}/∂θ`` for each output ``c`` of input ``n``.
    """

    values: Tensor

    @property
    def num_inputs(self) -> int:
        """``N``."""
        return self.values.shape[1]

    def rows(self) -> Tensor:
        """``[C, N, P]``."""
        return self.values

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> Tensor:
        """``[C, N, O, I]``: each row, as an ``O × I`` matrix ``J``, in ``Q_Lᵀ J Q_R``."""
        outputs, num, _ = self.values.shape
        matrices = self.values.reshape(outputs, num, len(left_basis), len(right_basis))
        return left_basis.T @ matrices @ right_basis

    def chunk(self, start: int, stop: int) -> RowJacobian:
        """Return the Jacobian of inputs ``start … stop − 1``."""
        return RowJacobian(self.values[:, start:stop])


@dataclass(frozen=True)
class PositionJacobian:
    """A weight's output Jacobian over its positions: ``J_{n,c} = Σ_t g_{c,n,t} a_{n,t}ᵀ``.

    Attributes:
        vectors: ``[C, N, T, O]``: each output's backpropagation to the layer's output.
        inputs: ``[N, T, I·groups]``: the layer's (unfolded) input at the positions.
        groups: Blocks of the weight's rows that see disjoint blocks of the input
            features (a grouped convolution's ``groups``).
    """

    vectors: Tensor
    inputs: Tensor
    groups: int = 1

    @property
    def num_inputs(self) -> int:
        """``N``."""
        return self.inputs.shape[0]

    def rows(self) -> Tensor:
        """``[C, N, O·I]``: the Jacobian formed (``C·N·T·O·I`` multiply-adds)."""
        outputs, num = self.vectors.shape[:2]
        return formed_samples(self.vectors, self.inputs, self.groups).reshape(outputs, num, -1)

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> Tensor:
        """``[C, N, O, I]``: ``Q_Lᵀ J_{n,c} Q_R``, the factors rotated before ``J`` is formed.

        ``(G Q_L)ᵀ (A Q_R)``: ``C·N·T·O² + N·T·I² + C·N·T·O·I`` multiply-adds instead of
        rotating the formed ``O × I`` matrices (``C·N·(O²·I + O·I²)``). A grouped layer's
        rows see their own group's inputs, so its left rotation follows the formed
        product; with a basis per group (``[G, O/G, O/G]`` and ``[G, I, I]``) each group's
        factors are rotated by its own, ``[C, N, G, O/G, I]``.
        """
        outputs, num, _, out_features = self.vectors.shape
        if left_basis.dim() == 3:  # a basis per group: [C, N, G, O/G, I]
            groups = left_basis.shape[0]
            vectors = self.vectors.unflatten(3, (groups, -1))
            vectors = torch.einsum("cntgo,gop->cntgp", vectors, left_basis).flatten(3)
            inputs = self.inputs.unflatten(2, (groups, -1))
            inputs = torch.einsum("ntgi,gij->ntgj", inputs, right_basis).flatten(2)
            formed = formed_samples(vectors, inputs, groups)
            return formed.reshape(outputs, num, groups, -1, formed.shape[-1])
        if self.groups == 1:
            formed = formed_samples(self.vectors @ left_basis, self.inputs @ right_basis)
            return formed.reshape(outputs, num, out_features, -1)
        inputs = (self.inputs.unflatten(2, (self.groups, -1)) @ right_basis).flatten(2)
        formed = formed_samples(self.vectors, inputs, self.groups)
        return left_basis.T @ formed.reshape(outputs, num, out_features, -1)

    def chunk(self, start: int, stop: int) -> PositionJacobian:
        """Return the Jacobian of inputs ``start … stop − 1``."""
        return PositionJacobian(self.vectors[:, start:stop], self.inputs[start:stop], self.groups)


@dataclass(frozen=True)
class TransposedJacobian:
    """A parameter's output Jacobian as the transposes of another form's matrices.

    An embedding table's ``J_{n,c} = Σ_t e_{id_t} g_{c,n,t}ᵀ`` (``V × D``) is the transpose of
    a weight's position Jacobian with the one-hot ids as its inputs.

    Attributes:
        inner: The Jacobian of the transposed matrices (``[C, N, D, V]`` rotated).
    """

    inner: PositionJacobian

    @property
    def num_inputs(self) -> int:
        """``N``."""
        return self.inner.num_inputs

    def rows(self) -> Tensor:
        """``[C, N, V·D]``: the transposed matrices formed, in the parameter's ``vec`` order."""
        outputs, num = self.inner.vectors.shape[:2]
        columns = self.inner.vectors.shape[-1]
        matrices = self.inner.rows().reshape(outputs, num, columns, -1)
        return matrices.transpose(2, 3).reshape(outputs, num, -1)

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> Tensor:
        """``[C, N, V, D]``: ``Q_Lᵀ J Q_R``, from the inner ``Q_Rᵀ Jᵀ Q_L``."""
        return self.inner.rotated(right_basis, left_basis).transpose(2, 3)

    def chunk(self, start: int, stop: int) -> TransposedJacobian:
        """Return the Jacobian of inputs ``start … stop − 1``."""
        return TransposedJacobian(self.inner.chunk(start, stop))


@dataclass(frozen=True)
class VocabularyJacobian:
    """A large table's output Jacobian ``J_{n,c} = Σ_t e_{id_t} g_{c,n,t}ᵀ`` as ids and vectors.

    The ``V × D`` matrices are never formed: a block with a diagonal row side
    (:class:`~kfoc_backpack.blocks.DiagonalKroneckerBlock`) weighs only the rows the
    inputs hold (:meth:`weighted_products`).

    Attributes:
        ids: ``[N, T]`` the ids at the positions.
        vectors: ``[C, N, T, D]``: each output's backpropagation to the table's output.
        num_rows: ``V``.
        padding_idx: An id whose positions count for nothing, or ``None``.
    """

    ids: Tensor
    vectors: Tensor
    num_rows: int
    padding_idx: int | None = None

    @property
    def num_inputs(self) -> int:
        """``N``."""
        return self.ids.shape[0]

    def merged(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows [C, U, D], vocab [U], owner [U])``: the non-zero rows of every ``J_{n,c}``."""
        return merge_rows(self.ids, self.vectors, self.num_rows, self.padding_idx)

    def rows(self) -> Tensor:
        """``[C, N, V·D]``: the matrices formed (small tables and tests)."""
        rows, vocab, owner = self.merged()
        matrices = dense_rows(rows, vocab, owner, self.num_inputs, self.num_rows)
        return matrices.flatten(start_dim=2)

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> Tensor:
        """``[C, N, V, D]``: ``Q_Lᵀ J Q_R`` of the formed matrices (small tables and tests)."""
        outputs, num = self.vectors.shape[:2]
        matrices = self.rows().reshape(outputs, num, self.num_rows, -1)
        return left_basis.T @ matrices @ right_basis

    def weighted_products(
        self, right_basis: Tensor, weights: Tensor, joint: bool = False
    ) -> Tensor:
        """``Σ_{v,j} Ĵ_a[v, j] Ĵ_b[v, j] weights[v, j]`` with ``Ĵ = J Q_R``.

        Args:
            right_basis: ``[D, D]`` ``Q_R``.
            weights: ``[V, D]``.
            joint: Between every pair of (input, output) rows (input-major), not only
                the outputs of each input.

        Returns:
            ``[N, C, C]``, or ``[N·C, N·C]`` with ``joint``.
        """
        rows, vocab, owner = self.merged()
        rotated = rows @ right_basis
        weighted = rotated * weights[vocab]
        outputs, num = rows.shape[0], self.num_inputs
        if not joint:
            products = torch.einsum("cud,eud->uce", rotated, weighted)
            out = products.new_zeros(num, outputs, outputs)
            return out.index_add_(0, owner, products)
        out = rows.new_zeros(num * outputs, num * outputs)
        width = rows.shape[-1]
        for selected, index, ids in compact_chunks(vocab, width, num * outputs):
            piece = rows.new_zeros(outputs, num, len(ids), width)
            piece[:, owner[selected], index] = rotated[:, selected]
            flat = piece.transpose(0, 1).reshape(num * outputs, -1)
            out += flat @ (piece * weights[ids]).transpose(0, 1).reshape(num * outputs, -1).T
        return out

    def chunk(self, start: int, stop: int) -> VocabularyJacobian:
        """Return the Jacobian of inputs ``start … stop − 1``."""
        return VocabularyJacobian(
            self.ids[start:stop], self.vectors[:, start:stop], self.num_rows, self.padding_idx
        )


Jacobian = RowJacobian | PositionJacobian | TransposedJacobian | VocabularyJacobian
"""A parameter's output Jacobian in one of its forms."""


@dataclass(frozen=True)
class OutputJacobians:
    """The model output on a batch and each trainable parameter's Jacobian of it.

    Attributes:
        output: ``[N, C]`` the model output.
        parameters: Per trainable parameter the batch's forward pass used, its Jacobian.
    """

    output: Tensor
    parameters: dict[str, Jacobian]


def chunks(jacobian: Jacobian, size: int) -> Iterator[tuple[int, Jacobian]]:
    """``(start, Jacobian)`` of consecutive blocks of at most ``size`` inputs."""
    for start in range(0, jacobian.num_inputs, size):
        yield start, jacobian.chunk(start, min(start + size, jacobian.num_inputs))
