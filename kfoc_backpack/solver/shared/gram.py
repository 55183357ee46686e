r"""The routes through a Gram of positions: ``gram`` and ``output-gram``.

* ``gram`` (:class:`GramRouteTerms`): through the position Gram ``Q_{km} = A_k A_mᵀ``
  (``[K·T, K·T]``, one product of ``(K·T)²·N``): ``R = Σ_k A_kᵀ W_k A_k`` is carried
  by its coefficients ``W_k = Σ_j G_{jk} L G_{jk}ᵀ`` (``T × T``), and
  ``A_k R A_kᵀ = Σ_m Q_{km} W_m Q_{km}ᵀ``: a step costs
  ``2·K²·T³ + 2·J·K·T·M·(M + T)``, whatever ``N``. The ``N × N`` factor is formed once
  at the end (``K·T·N·(N + T)``, as K-FAC forms its own).
* ``output-gram`` (:class:`OutputGramRouteTerms`): ``gram`` on the transposed problem
  ``X_{jk}ᵀ = A_kᵀ G_{jk}``, through the Gram of the output-side vectors
  (``[J·K·T, J·K·T]``): a step costs ``2·(J·K)²·T³ + 2·J·K·T·N·(N + T)``, whatever ``M``.

:class:`PositionGram` is the Gram and its map; the ``operator`` route
(:mod:`~kfoc_backpack.solver.shared.formed`) uses it too, with the formed ``X`` as the
"positions".

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features (left factor ``[M, M]``), ``N`` input features (right ``[N, N]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.enums import Route
from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    left_start,
    working_tensors,
    zero_solution,
)
from kfoc_backpack.solver.factored import FactoredTerms
from kfoc_backpack.solver.scale import finalize
from kfoc_backpack.solver.shared.factored import factored_flops, kfac_left
from kfoc_backpack.solver.shared.route import LayerSizes, RouteTerms, krylov_solve
from kfoc_backpack.solver.symmetric import congruence_sum, sym_gram

GRAM_CHUNK_ELEMENTS = 1 << 22
"""Above this many Gram entries the map runs in :data:`GRAM_CHUNKS` blocks of samples."""

GRAM_CHUNKS = 4
"""Blocks of the map of a large Gram: its intermediate is a quarter of the Gram."""


def gram_bytes(rows: int, itemsize: int) -> float:
    """Bytes of a symmetric ``[rows, rows]`` Gram and its map's intermediate.

    A second Gram-sized buffer below :data:`GRAM_CHUNK_ELEMENTS` entries, a quarter of
    one (:data:`GRAM_CHUNKS` blocks) above.
    """
    return itemsize * rows**2 * (1.25 if rows**2 > 1 << 22 else 2)


class PositionGram:
    """The position Gram ``Q_{km} = A_k A_mᵀ`` of ``inputs`` ``[K, T, N]`` and its map.

    Stored once as the symmetric ``[K·T, K·T]`` matrix (``(K·T)²·N`` flops, the lower
    blocks only, :func:`~kfoc_backpack.solver.symmetric.sym_gram`), it applies
    ``W ↦ V``, ``V_k = Σ_m Q_{km} W_m Q_{km}ᵀ`` (``[K, T, T]`` both) in ``2·K²·T³``
    flops by two batched products per block of samples, without copies of ``Q``.
    """

    def __init__(self, inputs: Tensor):
        num, pos, _ = inputs.shape
        flat = inputs.reshape(num * pos, -1)
        self.num, self.pos = num, pos
        self.full = sym_gram(flat.T)  # [(k, t), (m, s)]
        self.by_row = self.full.view(num, pos, num * pos)  # [m, s, (k, t)]
        self.by_col = self.full.view(num * pos, num, pos).permute(1, 0, 2)  # [k, (m,s), t]
        self.chunks = GRAM_CHUNKS if self.full.numel() > GRAM_CHUNK_ELEMENTS else 1

    def release(self) -> None:
        """Drop the Gram (the map cannot be applied afterwards)."""
        self.full = self.by_row = self.by_col = None

    def apply(self, coef: Tensor) -> Tensor:
        """``V_k = Σ_m Q_{km} W_m Q_{km}ᵀ`` for ``coef`` ``W`` ``[K, T, T]`` (or ``[T, T]``)."""
        num, pos = self.num, self.pos
        out = self.full.new_empty(num, pos, pos)
        width = -(-num // self.chunks)
        for lo in range(0, num, width):
            hi = min(num, lo + width)
            # mixed[m, s', (k, t)] = (Q_{km} W_m)[t, s'] for the samples k in [lo, hi)
            mixed = torch.matmul(coef.mT, self.by_row[:, :, lo * pos : hi * pos])
            by_k = mixed.view(num * pos, hi - lo, pos).permute(1, 2, 0)  # [k, t, (m, s')]
            out[lo:hi] = torch.bmm(by_k, self.by_col[lo:hi])
        return out

    def apply_summed(self, coef: Tensor) -> Tensor:
        """``Σ_k V_k = Σ_{k,m} Q_{km} W Q_{km}ᵀ`` for one ``W`` ``[T, T]`` shared by all ``m``.

        Two products at full GEMM speed (``K²·T³`` multiply-adds each): ``Q (I ⊗ W)``
        over all ``(k, t, m)`` rows at once, then one batched product over ``k`` with
        inner size ``K·T``. Holds one temporary of the Gram's size.
        """
        num, pos = self.num, self.pos
        mixed = torch.mm(self.full.view(-1, pos), coef)  # [(k, t, m), s'] = (Q_km W)[t, s']
        return torch.bmm(mixed.view(num, pos, num * pos), self.by_row.mT).sum(0)


@dataclass(frozen=True)
class GramRouteTerms(FactoredTerms, RouteTerms):
    """Factored terms solved through the position Gram (route ``gram``).

    Wins where ``K·T`` is small against ``N`` (wide late layers on few positions): a
    step never touches the ``N``-dimensional input side. Half-steps and the rest of
    the protocol are those of :class:`~kfoc_backpack.solver.FactoredTerms`.

    Attributes:
        grads: ``[J, K, T, M]`` output-side vectors.
        inputs: ``[K, T, N]`` input-side vectors.
    """

    route = Route.GRAM
    ops_per_step = 14

    @classmethod
    def flops(cls, sizes: LayerSizes, steps: int) -> int:
        """``(K·T)²·N`` once, ``2·K²·T³ + 2·J·K·T·M·(M + T)`` a step, ``R`` at the end."""
        _, num, pos, _, n = sizes[:5]
        left_factored, right_factored = factored_flops(sizes)
        return (
            (num * pos) ** 2 * n
            + steps * (2 * num**2 * pos**3 + 2 * left_factored)
            + right_factored
            + left_factored
        )

    @classmethod
    def working_bytes(cls, sizes: LayerSizes, itemsize: int) -> float:
        """Count the ``[K·T, K·T]`` Gram (:func:`gram_bytes`)."""
        _, num, pos = sizes[:3]
        return gram_bytes(num * pos, itemsize)

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int = 1) -> GramRouteTerms:
        """``G`` and ``A`` as they are (ungrouped layers only)."""
        return cls(grads, inputs)

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors: Lanczos in the coefficient space of the position Gram."""
        opts, out_dtype, (grads, inputs) = working_tensors(options, self.grads, self.inputs)
        cols, num, pos, m = grads.shape
        n = inputs.shape[-1]
        if cols * num * pos == 0:
            return zero_solution(m, n, grads, out_dtype)
        gram = PositionGram(inputs)
        # G by sample and position, [K, T, J·M] (one copy): the output side of a step is
        # two GEMMs over all rows and two batched products with inner size J·M
        held = [grads.permute(1, 2, 0, 3).reshape(num, pos, cols * m).contiguous()]

        def to_coef(left: Tensor) -> Tensor:  # W_k = Σ_j G_jk L G_jkᵀ, [K, T, T]
            by_pos = held[0]
            mixed = (by_pos.view(-1, m) @ left).view(num, pos, cols * m)  # G_jk L
            return torch.bmm(mixed, by_pos.mT)

        def apply(left: Tensor) -> Tensor:  # L ↦ Σ_jk G_jkᵀ V_k G_jk
            by_pos = held[0]
            moved = torch.bmm(gram.apply(to_coef(left)), by_pos)  # V_k G_jk, [K, T, J·M]
            return by_pos.view(-1, m).T @ moved.view(-1, m)

        def to_right(left: Tensor) -> Tensor:  # R = Σ_k A_kᵀ W_k A_k, formed once
            coef = to_coef(left)
            gram.release()  # the Gram and the copy of G are done with: free them before R
            held.clear()
            return congruence_sum(coef, inputs)

        start = left_start(m, grads, opts, init, lambda: kfac_left(grads))
        return krylov_solve(
            apply, to_right, start, opts, out_dtype, right_trace, "gram route", True
        )


@dataclass(frozen=True)
class OutputGramRouteTerms(FactoredTerms, RouteTerms):
    """Factored terms solved through the Gram of the output-side vectors (``output-gram``).

    The mirror of :class:`GramRouteTerms`: the problem transposed,
    ``X_{jk}ᵀ = A_kᵀ G_{jk}``, is one of ``J·K`` samples with output side ``A_k``
    (``[T, N]``) and input side ``G_{jk}`` (``[T, M]``), solved by :class:`GramRouteTerms`
    through the position Gram ``G_{jk} G_{il}ᵀ`` (``[J·K·T, J·K·T]``, one product of
    ``(J·K·T)²·M``). A step costs ``2·(J·K)²·T³ + 2·J·K·T·N·(N + T)`` and never touches
    the ``M``-dimensional output side: it wins where ``J·K·T`` is small against ``M`` (a
    wide ``Linear`` on few tokens or a 1×1 convolution on a small map, e.g. ConvNeXt's
    late MLPs), where every other route pays ``J·K·T·M²`` per step. The ``M × M`` factor
    is formed once at the end (``J·K·T·M·(M + T)``, as K-FAC forms its own). The factors
    are those of the transposed problem, swapped.

    Attributes:
        grads: ``[J, K, T, M]`` output-side vectors.
        inputs: ``[K, T, N]`` input-side vectors.
    """

    route = Route.OUTPUT_GRAM
    ops_per_step = 14

    @classmethod
    def flops(cls, sizes: LayerSizes, steps: int) -> int:
        """``(J·K·T)²·M + J·K·T·N²`` once, ``2·(J·K)²·T³ + 2·J·K·T·N·(N + T)`` a step."""
        cols, num, pos, m, n = sizes[:5]
        jk = cols * num
        left_factored, _ = factored_flops(sizes)
        return (
            (jk * pos) ** 2 * m
            + jk * pos * n * n
            + steps * (2 * jk**2 * pos**3 + 2 * jk * pos * n * (n + pos))
            + left_factored
            + jk * pos * n * (n + pos)
        )

    @classmethod
    def working_bytes(cls, sizes: LayerSizes, itemsize: int) -> float:
        """Count the ``[J·K·T, J·K·T]`` Gram as :func:`gram_bytes` and ``A`` copied ``J`` times."""
        cols, num, pos, _, n = sizes[:5]
        rows = cols * num * pos
        return itemsize * (rows**2 * (1.25 if rows**2 > 1 << 22 else 2) + 2 * rows * n)

    @classmethod
    def from_positions(cls, grads: Tensor, inputs: Tensor, groups: int = 1) -> OutputGramRouteTerms:
        """``G`` and ``A`` as they are (ungrouped layers only)."""
        return cls(grads, inputs)

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors: the transposed problem through the output-side Gram."""
        opts, out_dtype, (grads, inputs) = working_tensors(options, self.grads, self.inputs)
        cols, num, pos, m = grads.shape
        n = inputs.shape[-1]
        if cols * num * pos == 0:
            return zero_solution(m, n, grads, out_dtype)
        # transposed samples (j, k): output side A_k, input side G_jk
        mirrored = GramRouteTerms(
            inputs.expand(cols, num, pos, n).reshape(1, cols * num, pos, n),
            grads.reshape(cols * num, pos, m),
        )
        # a start of L is a start of the mirror's right factor: one half-step gives its left
        start = None if init is None else self.to_right(init.to(grads))
        factors = mirrored.solve(opts, init=start)
        left, right = finalize(
            factors.right, factors.left, out_dtype, right_trace=right_trace, what="output-gram"
        )
        return KroneckerFactors(left, right, factors.iterations, factors.converged)
