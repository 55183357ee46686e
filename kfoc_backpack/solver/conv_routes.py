r"""Solve routes for weights shared over positions (convolutions, token ``Linear``), one class each.

Per-sample matrices ``X_{j,k} = G_{j,k}ᵀ A_k`` (docs/conventions.md §1). Every route
finds the same Frobenius-optimal ``L ⊗ R`` — the top eigenvector of the left power map
``S(L) = Σ_{jk} X_{jk} (Σ_{il} X_{il}ᵀ L X_{il}) X_{jk}ᵀ``, by the Lanczos iteration of
:mod:`~kfoc_backpack.solver.krylov`, then ``R = Σ X_{jk}ᵀ L X_{jk}`` once and the
conventions of ``finalize`` — and differs only in how ``S`` is applied:

* ``formed`` (:class:`FormedConvTerms`): ``X`` formed, ``[J·K, M, N]``; a step costs
  ``2·J·K·M·N·(M + N)``.
* ``factored`` (:class:`FactoredConvTerms`): through ``G`` and ``A``; a step costs
  ``2·(J·K·T·M·(M + T) + K·T·N·(N + T))``.
* ``gram`` (:class:`GramConvTerms`): through the position Gram ``Q_{km} = A_k A_mᵀ``
  (``[K·T, K·T]``, one product of ``(K·T)²·N``): ``R = Σ_k A_kᵀ W_k A_k`` is carried
  by its coefficients ``W_k = Σ_j G_{jk} L G_{jk}ᵀ`` (``T × T``), and
  ``A_k R A_kᵀ = Σ_m Q_{km} W_m Q_{km}ᵀ``: a step costs
  ``2·K²·T³ + 2·J·K·T·M·(M + T)``, whatever ``N``. The ``N × N`` factor is formed once
  at the end (``K·T·N·(N + T)``, as K-FAC forms its own).
* ``output-gram`` (:class:`OutputGramTerms`): ``gram`` on the transposed problem
  ``X_{jk}ᵀ = A_kᵀ G_{jk}``, through the Gram of the output-side vectors
  (``[J·K·T, J·K·T]``): a step costs ``2·(J·K)²·T³ + 2·J·K·T·N·(N + T)``, whatever ``M``.
* ``operator`` (:class:`OperatorConvTerms`): the same with the formed ``X`` as the
  "positions" (``T → M``, ``G = I``): ``P_{ab} = X_a X_bᵀ`` formed once
  (``(J·K·M)²·N``), a step ``L ↦ Σ_{ab} P_{ab} L P_{ab}ᵀ`` costs ``2·(J·K)²·M³``.

Each class keeps its parent's half-steps ``to_right``/``to_left`` (a data-set level fit
streams over them) and the rest of the terms protocol; only ``solve`` takes the route.
The route is chosen by :func:`~kfoc_backpack.solver.conv_cost.choose_conv_route`;
tiny formed layers on the CPU keep the power method
(:func:`~kfoc_backpack.solver.samples.nearest_kronecker_samples_scaled`).

Index conventions: ``J`` columns per sample, ``K`` samples, ``T`` positions, ``M``
output features (left factor ``[M, M]``), ``N`` input features (right ``[N, N]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    launch_bound,
    left_start,
    working_tensors,
    zero_solution,
)
from kfoc_backpack.solver.conv_cost import is_tiny
from kfoc_backpack.solver.factored import FactoredTerms
from kfoc_backpack.solver.krylov import lanczos_top
from kfoc_backpack.solver.power import output_major, samples_half_steps
from kfoc_backpack.solver.routes import check_every
from kfoc_backpack.solver.samples import nearest_kronecker_samples_scaled
from kfoc_backpack.solver.scale import fetched_split, finalize, pair_scalars
from kfoc_backpack.solver.symmetric import SYM_MIN_COLUMNS, congruence_sum, sym_gram
from kfoc_backpack.solver.terms import SampleTerms


def krylov_solve(
    apply: Callable[[Tensor], Tensor],
    to_right: Callable[[Tensor], Tensor],
    start: Tensor,
    opts: SolverOptions,
    out_dtype: torch.dtype,
    right_trace: Tensor | float | None,
    what: str,
    symmetric_right: bool = False,
) -> KroneckerFactors:
    """Lanczos on ``S = apply``, ``R = to_right(L)`` once, then the shared conventions.

    ``L`` is symmetrised here; ``to_right`` of a symmetric ``L`` must return an exactly
    symmetric ``R`` when ``symmetric_right`` (then ``finalize`` skips its ``R + Rᵀ``,
    which costs as much as forming ``R`` for wide layers), else ``finalize`` symmetrises.

    Args:
        apply: ``[M, M] → [M, M]``, the left power map ``S``.
        to_right: ``[M, M] → [N, N]``, ``L ↦ Σ_k X_kᵀ L X_k``.
        start: ``[M, M]`` start of the left factor.
        opts: Solver options (``tol``, ``max_iter``).
        out_dtype: Dtype of the returned factors.
        right_trace: Target trace of the right factor, or ``None`` (even split).
        what: Name for error messages.

    Returns:
        The optimal factors; ``iterations`` counts applications of ``S``.
    """
    left, steps, converged = lanczos_top(
        apply, start, opts.tol, opts.max_iter, check_every(start.device)
    )
    if not symmetric_right:
        left, right = finalize(left, to_right(left), out_dtype, right_trace=right_trace, what=what)
        return KroneckerFactors(left, right, steps, converged)
    left = (left + left.T) / 2
    right = to_right(left)
    # finalize's split, scaling the [N, N] factor in place (no second N × N buffer)
    _, _, _, scalars = pair_scalars(left, right, symmetric=False, right_trace=right_trace)
    c_left, c_right = fetched_split(torch.stack(scalars).tolist(), right_trace, what)
    return KroneckerFactors(
        (left * c_left).to(out_dtype), right.mul_(c_right).to(out_dtype), steps, converged
    )


@dataclass(frozen=True)
class FormedConvTerms(SampleTerms):
    """:class:`~kfoc_backpack.solver.SampleTerms` solved by Lanczos (route ``formed``).

    Attributes:
        samples: ``[J·K, M, N]`` per-sample matrices.
    """

    route = "formed"

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors; on accelerators and for tiny layers ``SampleTerms.solve``."""
        if launch_bound(self.samples.device):
            return super().solve(options, init, right_trace)
        if is_tiny(*self.samples.shape):
            return nearest_kronecker_samples_scaled(self.samples, options, init, right_trace)
        opts, out_dtype, (samples,) = working_tensors(options, self.samples)
        num, m, n = samples.shape
        if num == 0:
            return zero_solution(m, n, samples, out_dtype)
        gemm_right, to_left = samples_half_steps(samples, output_major(samples))
        start = left_start(m, samples, opts, init, lambda: to_left(torch.eye(n).to(samples)))

        def to_right(left: Tensor) -> Tensor:  # Σ X_aᵀ L X_a, symmetric product (2/3 flops)
            if n < SYM_MIN_COLUMNS:  # one general product: fewer operations
                return gemm_right(left)
            return congruence_sum((left + left.T) / 2, samples)

        return krylov_solve(
            lambda mat: to_left(to_right(mat)),
            lambda left: congruence_sum((left + left.T) / 2, samples),
            start,
            opts,
            out_dtype,
            right_trace,
            "formed convolution route",
            symmetric_right=True,
        )


@dataclass(frozen=True)
class FactoredConvTerms(FactoredTerms):
    """:class:`~kfoc_backpack.solver.factored.FactoredTerms` solved by Lanczos (``factored``).

    Attributes:
        grads: ``[J, K, T, M]`` output-side vectors.
        inputs: ``[K, T, N]`` input-side vectors.
    """

    route = "factored"

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors by Lanczos on the factored half-steps."""
        opts, out_dtype, tensors = working_tensors(options, self.grads, self.inputs)
        # contiguous once (a convolution's vectors arrive as a transposed view): every
        # half-step's products then run over all rows without a copy
        terms = FactoredTerms(*(t.contiguous() for t in tensors))
        m, n = terms.shape
        if terms.num_terms == 0 or terms.grads.shape[2] == 0:
            return zero_solution(m, n, terms.grads, out_dtype)
        start = left_start(m, terms.grads, opts, init, lambda: kfac_left(terms.grads))
        return krylov_solve(
            lambda mat: terms.to_left(terms.to_right(mat)),
            terms.to_right,
            start,
            opts,
            out_dtype,
            right_trace,
            "factored convolution route",
        )


def kfac_left(grads: Tensor) -> Tensor:
    """K-FAC's left factor ``Σ_{j,k,t} g gᵀ`` (``[M, M]``) of ``grads`` ``[J, K, T, M]``."""
    flat = grads.reshape(-1, grads.shape[-1])
    return flat.T @ flat


GRAM_CHUNK_ELEMENTS = 1 << 22
"""Above this many Gram entries the map runs in :data:`GRAM_CHUNKS` blocks of samples."""

GRAM_CHUNKS = 4
"""Blocks of the map of a large Gram: its intermediate is a quarter of the Gram."""


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
class GramConvTerms(FactoredTerms):
    """Factored terms solved through the position Gram (route ``gram``).

    Wins where ``K·T`` is small against ``N`` (wide late layers on few positions): a
    step never touches the ``N``-dimensional input side. Half-steps and the rest of
    the protocol are those of :class:`~kfoc_backpack.solver.factored.FactoredTerms`.

    Attributes:
        grads: ``[J, K, T, M]`` output-side vectors.
        inputs: ``[K, T, N]`` input-side vectors.
    """

    route = "gram"

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
            apply, to_right, start, opts, out_dtype, right_trace, "gram convolution route", True
        )


@dataclass(frozen=True)
class OutputGramTerms(FactoredTerms):
    """Factored terms solved through the Gram of the output-side vectors (``output-gram``).

    The mirror of :class:`GramConvTerms`: the problem transposed,
    ``X_{jk}ᵀ = A_kᵀ G_{jk}``, is one of ``J·K`` samples with output side ``A_k``
    (``[T, N]``) and input side ``G_{jk}`` (``[T, M]``), solved by :class:`GramConvTerms`
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

    route = "output-gram"

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
        mirrored = GramConvTerms(
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


@dataclass(frozen=True)
class OperatorConvTerms(SampleTerms):
    """Formed terms solved through ``P_{ab} = X_a X_bᵀ`` (route ``operator``).

    Wins where ``J·K·M`` is small against ``N`` and ``M`` small against ``T`` (early
    layers with few output channels on many positions, one column per sample): a step
    ``L ↦ Σ_{ab} P_{ab} L P_{ab}ᵀ`` costs ``2·(J·K)²·M³`` and never touches ``N``.

    Attributes:
        samples: ``[J·K, M, N]`` per-sample matrices.
    """

    route = "operator"

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors: Lanczos through the ``P_{ab}`` blocks."""
        opts, out_dtype, (samples,) = working_tensors(options, self.samples)
        num, m, n = samples.shape
        if num == 0:
            return zero_solution(m, n, samples, out_dtype)
        gram = PositionGram(samples)  # "positions" are the M rows of each X_a

        def to_right(left: Tensor) -> Tensor:  # Σ_a X_aᵀ L X_a, formed once
            gram.release()
            return congruence_sum(left, samples)

        def apply(left: Tensor) -> Tensor:  # Σ_ab P_ab L P_abᵀ
            return gram.apply_summed(left)

        def default() -> Tensor:  # Σ_a X_a X_aᵀ: one half-step from R = I
            return torch.diagonal(gram.full.view(num, m, num, m), dim1=0, dim2=2).sum(-1)

        start = left_start(m, samples, opts, init, default)
        return krylov_solve(
            apply, to_right, start, opts, out_dtype, right_trace, "operator convolution route", True
        )


RANK_ONE = "rank-one"
"""Route name of rank-one per-sample matrices (:class:`~kfoc_backpack.solver.OuterTerms`:
a ``Linear`` on 2-d inputs, any weight shared over a single position)."""


def route_of(terms: object) -> str:
    """Name of the route a terms object solves by (``formed`` for plain ``SampleTerms``)."""
    name = getattr(terms, "route", None)
    if name is not None:
        return name
    return {"SampleTerms": "formed", "FactoredTerms": "factored", "OuterTerms": RANK_ONE}.get(
        type(terms).__name__, type(terms).__name__
    )


LANCZOS_TERMS = (FactoredConvTerms, GramConvTerms, OutputGramTerms, OperatorConvTerms)
"""Terms whose solve always runs :func:`krylov_solve`."""


def lanczos_steps(terms: object, factors: KroneckerFactors) -> int | None:
    """Return the Lanczos steps a solve of ``terms`` took (``None``: it ran no Lanczos).

    The unit of :func:`~kfoc_backpack.solver.conv_cost.route_flops`: every route's
    terms run :func:`krylov_solve` except ``formed`` on accelerators and on tiny layers
    (the power method of ``SampleTerms``), and rank-one or plain terms.

    Args:
        terms: The terms that were solved.
        factors: What their solve returned.
    """
    if isinstance(terms, FormedConvTerms):
        samples = terms.samples
        if launch_bound(samples.device) or is_tiny(*samples.shape):
            return None
    elif not isinstance(terms, LANCZOS_TERMS):
        return None
    return int(factors.iterations)
