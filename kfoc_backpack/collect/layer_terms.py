r"""One weight's per-sample quantities (:class:`LayerTerms`) and the record of its solves.

Both collection routes hand a weight's terms over as a :class:`LayerTerms`
(:func:`~kfoc_backpack.collect.handover.weight_terms` builds it): the structured block,
K-FOC's trace for the input-side factor, K-FAC's factors of the same samples on
request. See ``docs/conventions.md`` §1, §3.

Index conventions of this module: ``M`` columns per input, ``N`` inputs of the batch,
``O`` output features, ``I`` input features.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

from kfoc_backpack.blocks import DenseBlock, DiagonalKroneckerBlock, KroneckerBlock
from kfoc_backpack.enums import Grouped, Route
from kfoc_backpack.solver import (
    FactoredTerms,
    KroneckerFactors,
    LayerSizes,
    OuterTerms,
    SampleTerms,
    SolverOptions,
)
from kfoc_backpack.solver._common import launch_bound
from kfoc_backpack.solver.rescale import solve_rescaled
from kfoc_backpack.solver.scale import finalize
from kfoc_backpack.solver.shared.route import lanczos_steps
from kfoc_backpack.solver.shared.table import choose_route, route_class
from kfoc_backpack.solver.vocabulary import VocabularyTerms

Terms = OuterTerms | SampleTerms | FactoredTerms
"""The structured forms of a weight block ``F = Σ_k vec(X_k) vec(X_k)ᵀ``."""


class WeightSteps:
    """The Lanczos steps of one weight's last solve, for the route of its next batch.

    The cost model counts each route's flops for a number of Lanczos steps
    (:func:`~kfoc_backpack.solver.shared.table.choose_route`). A collection that sees
    the same weight batch after batch (the hook route's
    :class:`~kfoc_backpack.collect.hooks.TermCollector`, a reused BackPACK extension)
    keeps one of these per weight and hands it to :func:`weight_terms`: the choice then
    counts the steps the weight's previous solve took (the solver that will run, on
    the weight's own data), and :meth:`LayerTerms.solve` notes the new count.

    Attributes:
        last: Steps of the last Lanczos solve, ``None`` before the first (the choice
            then assumes :func:`~kfoc_backpack.solver.shared.table.assumed_steps`).
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: int | None = None

    def note(self, terms: object, factors: KroneckerFactors) -> None:
        """Remember the steps of a solve of ``terms`` (if it ran Lanczos)."""
        steps = lanczos_steps(terms, factors)
        if steps is not None:
            self.last = steps


T = TypeVar("T", bound="LayerTerms")


@dataclass(frozen=True)
class LayerTerms:
    """The per-sample quantities of one weight.

    Attributes:
        terms: The weight block ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` in structured form:
            :class:`~kfoc_backpack.solver.OuterTerms` (rank one: ``Linear`` on 2-d
            input, or a single position), or for weights shared over positions the
            terms of the route the table picks
            (:func:`~kfoc_backpack.solver.shared.table.choose_route`).
        input_trace: ``tr(R_KFAC) = (1/N) Σ_n ‖â_n‖²_F``, the trace K-FOC gives its
            input-side factor (see :meth:`solve`).
        kfac: K-FAC's factors ``(L, R)`` of the same block from the same samples;
            for shared positions the KFC approximation (paper eq. 9),
            ``Σ_{k,t} ds_{k,t} ds_{k,t}ᵀ ⊗ (1/(N·T)) Σ_{n,t} â_{n,t} â_{n,t}ᵀ``.
            Only computed on request (``None`` otherwise). Its *split* is the
            paper's and laplace-torch's: with ``T`` shared positions its right factor
            is ``T`` times smaller (and its left ``T`` times larger) than the split of
            :meth:`solve`; the products are on the same (the dense block's) scale.
        sizes: The sizes the terms came from (cost models and reports), where known.
        steps: Where each solve's Lanczos steps are noted for the weight's next route
            choice (:class:`WeightSteps`), or ``None``.
    """

    terms: Terms
    input_trace: Tensor
    kfac: tuple[Tensor, Tensor] | None
    sizes: LayerSizes | None = None
    steps: WeightSteps | None = None

    @classmethod
    def from_positions(
        cls,
        inputs: Tensor,
        vectors: Tensor,
        input_trace: Tensor,
        kfac: tuple[Tensor, Tensor] | None = None,
        groups: int = 1,
        route: Route | str | None = None,
        steps: WeightSteps | None = None,
    ) -> LayerTerms:
        """Return the terms of the route the table picks (or ``route``) for the positions.

        The route is :func:`~kfoc_backpack.solver.shared.table.choose_route`'s for the
        layer's :class:`~kfoc_backpack.solver.LayerSizes`, its tensors' item size and
        device and the Lanczos steps of the weight's previous solve (``steps.last``).

        Args:
            inputs: ``[N, T, I·groups]`` inputs at the positions (any strides).
            vectors: ``[M, N, T, O]`` output-side vectors at the positions.
            input_trace: K-FAC's ``tr R`` of the weight (the split).
            kfac: K-FAC's factors of the same samples, or ``None``.
            groups: Rows in ``groups`` blocks over disjoint input features, coupled by
                one product over all rows (``formed`` or ``operator``).
            route: Force a route instead of the choice.
            steps: The weight's :class:`WeightSteps`, or ``None``.

        Raises:
            ValueError: For an unknown forced route, or one that does not support the
                layer's sizes.
        """
        columns, num, positions, out_features = vectors.shape
        in_features = inputs.shape[-1] // groups
        sizes = LayerSizes(columns, num, positions, out_features, in_features, groups)
        chosen = table_route(sizes, vectors, steps) if route is None else route_class(route, sizes)
        return cls(chosen.from_positions(vectors, inputs, groups), input_trace, kfac, sizes, steps)

    def with_structure(self, grouped: Grouped) -> LayerTerms:
        """Return the terms for a grouped weight's structure (ungrouped terms: themselves)."""
        return self

    def solve(self, options: SolverOptions | None = None, what: Naming = None) -> KroneckerFactors:
        """K-FOC's optimal factors in K-FAC's scale split, ``tr(R_in) = input_trace``.

        K-FAC's input-side factor is the mean (over the ``N`` inputs of the batch) of
        the unfolded input's second moment, ``R_KFAC = (1/N) Σ_n â_nᵀ â_n``; its
        output-side factor carries everything else (the batch sum, the loss
        reduction). K-FOC's factors are split so that ``tr(R_in) = tr(R_KFAC)``: they
        are directly comparable with BackPACK's ``KFAC``/``KFLR`` factors and damping
        (``√δ`` added to each factor) acts as it does for K-FAC. Terms whose block lies
        far from unit scale are solved rescaled by powers of two
        (:func:`~kfoc_backpack.solver.rescale.solve_rescaled`), so that float32 solves
        neither under- nor overflow.

        Args:
            options: Solver options.
            what: The weight, for errors (e.g. ``"KFOCLaplace: 'fc1.weight' (50, 20)"``).

        Raises:
            FloatingPointError: If the terms contain NaN or infinite values (or a value
                inside the solve is not finite), prefixed by ``what``.
        """
        with named_failures(what):
            factors = solve_rescaled(self.terms, options, right_trace=self.input_trace)
        if self.steps is not None:
            self.steps.note(self.terms, factors)
        return factors

    def kfoc(self, factors: KroneckerFactors) -> KroneckerBlock:
        """Return the block ``L_out ⊗ R_in`` of factors in any split, rescaled to K-FAC's split."""
        return kfac_scale_split(factors, self.input_trace)

    def kfoc_block(
        self, options: SolverOptions | None = None, what: Naming = None
    ) -> KroneckerBlock:
        """K-FOC's optimal block in K-FAC's split: :meth:`solve`, then :meth:`kfoc`.

        Warns (``RuntimeWarning``, naming ``what``) where the solve stopped at
        ``max_iter`` before reaching ``tol``: the block is then the last iterate's.
        """
        factors = self.solve(options, what)
        if not factors.converged:
            warn_unconverged(what, options)
        return self.kfoc(factors)

    def kfac_block(self) -> KroneckerBlock:
        """K-FAC's ``L_out ⊗ R_in`` of the same samples, in laplace-torch's split.

        ``kfac`` as it is: for weights shared over ``T`` positions the KFC split of
        laplace-torch's ``kron`` (curvlinops' ``"expand"``), ``L = Σ_{k,t} ds dsᵀ`` and
        ``R = (1/(N·T)) Σ_{n,t} â âᵀ`` — ``T`` times larger on the left than
        :meth:`solve`'s split, the same product. Damping (``√δ`` per factor) then acts
        as it does on laplace-torch's ``kron``.

        Raises:
            ValueError: If the quantities were collected without K-FAC's factors.
        """
        if self.kfac is None:
            raise ValueError("K-FAC's factors were not collected (with_kfac=False).")
        return KroneckerBlock(*self.kfac)

    def detach(self: T) -> T:
        """Return the same quantities, detached from any autograd graph."""
        kfac = None if self.kfac is None else tuple(f.detach() for f in self.kfac)
        return replace(
            self, terms=self.terms.detach(), input_trace=self.input_trace.detach(), kfac=kfac
        )


@dataclass(frozen=True)
class DiagonalLayerTerms(LayerTerms):
    """The per-sample rows of a table whose block is ``diag(l) ⊗ R``.

    Attributes:
        terms: The table's :class:`~kfoc_backpack.solver.vocabulary.VocabularyTerms`.
        input_trace: ``tr R``: the width side's mean squared vector (the split).
        kfac: K-FAC's ``(l [V], R [D, D])`` of the same samples, or ``None``.
    """

    terms: VocabularyTerms

    def solve(self, options: SolverOptions | None = None, what: Naming = None) -> KroneckerFactors:
        """Return the nearest ``diag(l) ⊗ R`` (``l`` ``[V]``), ``tr R = input_trace``.

        Raises:
            FloatingPointError: If the rows or the factors are not finite, prefixed by ``what``.
        """
        with named_failures(what):
            return self.terms.solve(options, right_trace=self.input_trace)

    def kfoc(self, factors: KroneckerFactors) -> DiagonalKroneckerBlock:  # type: ignore[override]
        """Return the block of factors :meth:`solve` gave (already in K-FAC's split)."""
        return DiagonalKroneckerBlock(factors.left, factors.right)

    def kfac_block(self) -> DiagonalKroneckerBlock:  # type: ignore[override]
        """K-FAC's ``diag(l) ⊗ R``: the ids' frequencies on the row side.

        Raises:
            ValueError: If the quantities were collected without K-FAC's factors.
        """
        if self.kfac is None:
            raise ValueError("K-FAC's factors were not collected (with_kfac=False).")
        return DiagonalKroneckerBlock(*self.kfac)


@dataclass(frozen=True)
class DenseTerms:
    """A parameter with a dense block: its exact block, and K-FAC's where asked.

    Biases, normalisation layers' affine parameters and the small parameters of any
    module (:mod:`kfoc_backpack.collect.parameters`) have these.

    Attributes:
        exact: ``Σ_{m,n} b_{m,n} b_{m,n}ᵀ``, ``b_{m,n}`` the per-sample gradient (for a
            bias ``Σ_t g_{m,n,t}``): the exact block.
        kfac: K-FAC's block of the same samples: for a bias the KFC block, the
            positions counted as samples, ``Σ_{m,n,t} g gᵀ`` (laplace-torch's ``kron``
            bias block; equal to ``exact`` for a single position); for other
            parameters ``exact``. ``None`` unless collected.
    """

    exact: DenseBlock
    kfac: DenseBlock | None = None

    def kfac_block(self) -> DenseBlock:
        """Return K-FAC's block.

        Raises:
            ValueError: If the quantities were collected without K-FAC's blocks.
        """
        if self.kfac is None:
            raise ValueError("K-FAC's blocks were not collected (with_kfac=False).")
        return self.kfac


def table_route(sizes: LayerSizes, like: Tensor, steps: WeightSteps | None = None) -> type:
    """Return the route class the table picks for a weight of ``sizes``.

    :func:`~kfoc_backpack.solver.shared.table.choose_route` for the item size and device
    of ``like`` (one of the weight's tensors) and the Lanczos steps of its previous solve
    (``steps.last``; the assumed count where unknown).
    """
    return choose_route(
        sizes,
        itemsize=max(like.element_size(), 4),
        accelerator=launch_bound(like.device),
        steps=None if steps is None else steps.last,
    )


Naming = str | Callable[[], str] | None
"""What a solve is of, for its errors: a string, or a function that makes it only when
an error occurs (BackPACK's module paths cost a scan of the live modules)."""


@contextmanager
def named_failures(what: Naming) -> Iterator[None]:
    """Re-raise a numerical failure of a solve as ``FloatingPointError`` naming ``what``.

    ``FloatingPointError`` (non-finite terms or factors) and ``torch.linalg``'s
    ``LinAlgError`` (an eigendecomposition of a non-finite Lanczos matrix) become one
    ``FloatingPointError("{what}: …")``; without ``what`` they pass unchanged.
    """
    try:
        yield
    except (FloatingPointError, torch.linalg.LinAlgError) as error:
        if what is None:
            raise
        name = what() if callable(what) else what
        raise FloatingPointError(f"{name}: {error}") from error


def warn_unconverged(what: Naming, options: SolverOptions | None, stacklevel: int = 3) -> None:
    """Warn that the power method of ``what`` stopped at ``max_iter`` before ``tol``."""
    opts = SolverOptions() if options is None else options
    name = what() if callable(what) else (what or "K-FOC")
    warnings.warn(
        f"{name}: the power method stopped at max_iter={opts.max_iter} before reaching "
        f"tol={opts.tol:g}; the factors are the last iterate. Increase max_iter for an "
        "optimal result.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def kfac_scale_split(factors: KroneckerFactors, input_trace: Tensor) -> KroneckerBlock:
    """Rescale ``left ⊗ right`` (product unchanged) so that ``tr(right) = input_trace``.

    Args:
        factors: Factors of a Kronecker product, any scale split.
        input_trace: Target trace of the right factor, K-FAC's
            ``tr(R_KFAC) = (1/N) Σ_n ‖â_n‖²_F``.

    Returns:
        The block in K-FAC's split (see :meth:`LayerTerms.solve`).
    """
    left, right = finalize(factors.left, factors.right, factors.left.dtype, right_trace=input_trace)
    return KroneckerBlock(left, right)
