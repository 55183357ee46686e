r"""Per-sample quantities of one layer from its inputs and output-side vectors.

Both collection routes end here: BackPACK's module extensions (``KFOC``,
``KFOCExact``, ``KFOCTerms``) and the hook route of :mod:`kfoc_backpack.collect.route`
hand over a layer's input and the vectors at its output, and receive the layer's
:class:`LayerTerms` (weight) and exact bias block. See ``docs/conventions.md``.

Index conventions of this module: ``M`` columns per input (Monte-Carlo samples,
columns of the loss Hessian's square root, one for the empirical Fisher), ``N``
inputs of the batch, ``T`` positions that share the weight (tokens, output pixels),
``O`` output features, ``I`` input features (``C_in·Πkernel`` for convolutions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from kfoc_backpack.solver import KroneckerFactors, OuterTerms, SampleTerms, SolverOptions
from kfoc_backpack.solver._common import launch_bound
from kfoc_backpack.solver.conv_cost import ROUTES, choose_conv_route
from kfoc_backpack.solver.conv_routes import (
    RANK_ONE,
    FactoredConvTerms,
    FormedConvTerms,
    GramConvTerms,
    OperatorConvTerms,
    OutputGramTerms,
    lanczos_steps,
)
from kfoc_backpack.solver.factored import FactoredTerms
from kfoc_backpack.solver.rescale import solve_rescaled
from kfoc_backpack.solver.scale import finalize

Terms = OuterTerms | SampleTerms | FactoredTerms
"""The structured forms of a weight block ``F = Σ_k vec(X_k) vec(X_k)ᵀ``."""


class LayerSizes(NamedTuple):
    """What the solver is handed, in numbers: ``X_{j,k} = G_{j,k}ᵀ A_k``.

    Attributes:
        columns: ``J``, output-side vectors per input (MC samples, Hessian-root columns).
        samples: ``K``, inputs of the batch.
        positions: ``T``, positions sharing the weight (1 for a rank-one layer).
        out_features: ``M``, rows of the weight matrix (left factor ``[M, M]``).
        in_features: ``N``, columns of the weight matrix (right factor ``[N, N]``).
        groups: The convolution's ``groups`` (1 otherwise).
    """

    columns: int
    samples: int
    positions: int
    out_features: int
    in_features: int
    groups: int = 1


class WeightSteps:
    """The Lanczos steps of one weight's last solve, for the route of its next batch.

    The cost model counts each route's flops for a number of Lanczos steps
    (:func:`~kfoc_backpack.solver.conv_cost.choose_conv_route`). A collection that sees
    the same weight batch after batch (the hook route's
    :class:`~kfoc_backpack.collect.route.TermCollector`, a reused BackPACK extension)
    keeps one of these per weight and hands it to :func:`weight_terms`: the choice then
    counts the steps the weight's previous solve took (the solver that will run, on
    the weight's own data), and :meth:`LayerTerms.solve` notes the new count.

    Attributes:
        last: Steps of the last Lanczos solve, ``None`` before the first (the choice
            then assumes :func:`~kfoc_backpack.solver.conv_cost.assumed_steps`).
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: int | None = None

    def note(self, terms: object, factors: KroneckerFactors) -> None:
        """Remember the steps of a solve of ``terms`` (if it ran Lanczos)."""
        steps = lanczos_steps(terms, factors)
        if steps is not None:
            self.last = steps


@dataclass(frozen=True)
class LayerTerms:
    """The per-sample quantities of one weight.

    Attributes:
        terms: The weight block ``F = Σ_k vec(X_k) vec(X_k)ᵀ`` in structured form:
            :class:`~kfoc_backpack.solver.OuterTerms` (rank one: ``Linear`` on 2-d
            input, or a single position), or for weights shared over positions the
            terms of the route :func:`shared_terms` picks (subclasses of
            :class:`~kfoc_backpack.solver.factored.FactoredTerms` or
            :class:`~kfoc_backpack.solver.SampleTerms`).
        input_trace: ``tr(R_KFAC) = (1/N) Σ_n ‖â_n‖²_F``, the trace K-FOC gives its
            input-side factor (see :meth:`solve`).
        kfac: K-FAC's factors ``(L, R)`` of the same block from the same samples;
            for shared positions the KFC approximation (paper eq. 9),
            ``Σ_{k,t} ds_{k,t} ds_{k,t}ᵀ ⊗ (1/(N·T)) Σ_{n,t} â_{n,t} â_{n,t}ᵀ``.
            Only computed on request (``None`` otherwise). Its *split* is the
            paper's: with ``T`` shared positions its right factor is ``T`` times
            smaller (and its left ``T`` times larger) than the split of
            :meth:`solve` and of BackPACK's ``KFAC``; the products are on the same
            (the dense block's) scale.
        sizes: The sizes the terms came from (cost models and reports), where known.
        steps: Where each solve's Lanczos steps are noted for the weight's next route
            choice (:class:`WeightSteps`), or ``None``.
    """

    terms: Terms
    input_trace: Tensor
    kfac: tuple[Tensor, Tensor] | None
    sizes: LayerSizes | None = None
    steps: WeightSteps | None = None

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

    def kfoc(self, factors: KroneckerFactors) -> list[Tensor]:
        """``[L_out, R_in]`` from factors in any split, rescaled to K-FAC's split."""
        return kfac_scale_split(factors, self.input_trace)

    def kfac_blocks(self) -> list[Tensor]:
        """K-FAC's ``[L_out, R_in]`` of the same samples in :meth:`solve`'s split.

        ``tr(R_in) = input_trace``, as BackPACK's ``KFAC``/``KFLR`` and
        laplace-torch's ``kron`` split their factors (for shared positions the
        paper's split of :attr:`kfac` has a ``T`` times smaller right factor).

        Raises:
            ValueError: If the quantities were collected without K-FAC's factors.
        """
        if self.kfac is None:
            raise ValueError("K-FAC's factors were not collected (with_kfac=False).")
        left, right = self.kfac
        return kfac_scale_split(KroneckerFactors(left, right, 0, True), self.input_trace)

    def detach(self) -> LayerTerms:
        """Return the same quantities, detached from any autograd graph."""
        kfac = None if self.kfac is None else tuple(f.detach() for f in self.kfac)
        return LayerTerms(
            self.terms.detach(), self.input_trace.detach(), kfac, self.sizes, self.steps
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


def kfac_scale_split(factors: KroneckerFactors, input_trace: Tensor) -> list[Tensor]:
    """Rescale ``left ⊗ right`` (product unchanged) so that ``tr(right) = input_trace``.

    Args:
        factors: Factors of a Kronecker product, any scale split.
        input_trace: Target trace of the right factor, K-FAC's
            ``tr(R_KFAC) = (1/N) Σ_n ‖â_n‖²_F``.

    Returns:
        ``[left, right]`` in K-FAC's split (see :meth:`LayerTerms.solve`).
    """
    left, right = finalize(factors.left, factors.right, factors.left.dtype, right_trace=input_trace)
    return [left, right]


SQUARES_ROW = 4096
"""Length of the rows whose squares :func:`sum_of_squares` sums by one batched dot each."""

SQUARES_MIN = 1 << 22
"""Below this many entries :func:`sum_of_squares` is ``square().sum()`` (two operations:
small layers are bound by dispatched operations, not by the copy)."""


def dense_order(tensor: Tensor) -> Tensor:
    """``tensor`` with its dimensions in memory order where that makes it contiguous.

    A permuted view of a contiguous tensor (a convolution's unfolded input handed over
    as ``[N, T, I]``) then flattens without a copy; order-free reductions (sums of
    squares) can run on it. Other tensors are returned as they are.
    """
    order = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    permuted = tensor.permute(order)
    return permuted if permuted.is_contiguous() else tensor


def sum_of_squares(tensor: Tensor) -> Tensor:
    """``Σ x²`` over all entries of ``tensor`` (a 0-d tensor), without a squared copy.

    ``tensor.square().sum()`` writes a squared copy first: for a convolution's unfolded
    input (``N·I·T`` numbers, 300 MB for ResNet-18's first stage at batch 128) that costs
    more than a K-FOC step. Here rows of :data:`SQUARES_ROW` entries are dotted with
    themselves by one batched product and the row sums added (pairwise, as ``sum``
    does); the few remaining entries are squared directly.

    Args:
        tensor: Floating tensor (a copy is made only if no order of its dimensions
            can be viewed flat, :func:`dense_order`; half precisions and tensors below
            :data:`SQUARES_MIN` entries take ``square().sum()``).

    Returns:
        The sum of squares, in ``tensor``'s dtype.
    """
    if tensor.numel() < SQUARES_MIN or tensor.dtype not in (torch.float32, torch.float64):
        return tensor.square().sum()
    flat = dense_order(tensor).reshape(-1)
    body = flat.numel() - flat.numel() % SQUARES_ROW
    rows = flat[:body].view(-1, 1, SQUARES_ROW)
    total = torch.bmm(rows, rows.mT).sum()
    if body < flat.numel():
        total = total + flat[body:].square().sum()
    return total


def kfc_factors(sqrt: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """K-FAC/KFC factors (paper eq. 9) of a layer with shared weights.

    Args:
        sqrt: ``[M, N, T, O]`` output-side vectors at the positions.
        inputs: ``[N, T, I]`` (unfolded) inputs at the same positions.

    Returns:
        ``(Σ_{m,n,t} ds dsᵀ, (1/(N·T)) Σ_{n,t} â âᵀ)``.
    """
    flat_sqrt = sqrt.flatten(end_dim=2)
    flat_inputs = inputs.flatten(end_dim=1)
    return flat_sqrt.T @ flat_sqrt, flat_inputs.T @ flat_inputs / flat_inputs.shape[0]


def linear_terms(inputs: Tensor, sqrt: Tensor, with_kfac: bool = False) -> LayerTerms:
    """Per-sample quantities of a ``Linear`` weight ``[O, I]`` (:func:`weight_terms`).

    2-d input: ``X_{m,n} = s_{m,n} a_nᵀ`` has rank one (one position); input with extra
    dimensions (tokens): every dimension between the batch and the features is a position.

    Args:
        inputs: ``[N, *, I]`` layer inputs.
        sqrt: ``[M, N, *, O]`` output-side vectors (the batch's loss scaling included).
        with_kfac: Also compute K-FAC's factors of the same samples.

    Returns:
        The weight's :class:`LayerTerms`.
    """
    if inputs.dim() == 2:
        return weight_terms(inputs.unsqueeze(1), sqrt.unsqueeze(2), with_kfac)
    flat_inputs = inputs.flatten(start_dim=1, end_dim=-2)  # [N, T, I]
    return weight_terms(flat_inputs, sqrt.flatten(start_dim=2, end_dim=-2), with_kfac)


def weight_terms(
    inputs: Tensor,
    vectors: Tensor,
    with_kfac: bool = False,
    route: str | None = None,
    groups: int = 1,
    steps: WeightSteps | None = None,
) -> LayerTerms:
    """Per-sample quantities of any supported weight, from its positions: the hand-over.

    Every layer kind (:mod:`kfoc_backpack.collect.kinds`) and both collection routes end
    here with the layer's inputs and output-side vectors at its ``T`` positions.
    ``groups = 1``: :func:`shared_terms` (rank one for ``T = 1``, else the route of
    least estimated cost); ``groups > 1``: the grouped form of :func:`conv_terms`, its
    per-sample matrices formed and solved on the cheaper of ``formed`` and ``operator``
    by the same cost model.

    Args:
        inputs: ``[N, T, I]`` inputs at the positions (any strides; a grouped layer's
            ``I`` spans all groups' input features).
        vectors: ``[M, N, T, O]`` output-side vectors at the positions.
        with_kfac: Also compute K-FAC's factors of the same samples.
        route: Force a route (see :func:`shared_terms`; grouped: ``formed`` or
            ``operator``).
        groups: Rows of the weight in ``groups`` blocks that see disjoint blocks of
            the input features (a grouped convolution's ``groups``).
        steps: The weight's :class:`WeightSteps` (the route choice counts its last
            solve's steps; this batch's solve notes its own), or ``None``.

    Returns:
        The weight's :class:`LayerTerms`.
    """
    input_trace = sum_of_squares(inputs) / inputs.shape[0]
    if groups == 1:
        return shared_terms(vectors, inputs, input_trace, with_kfac, route, steps)
    columns, num, positions, out_features = vectors.shape
    kfac = None
    if with_kfac:
        kfac = grouped_kfc_factors(vectors.transpose(2, 3), inputs.transpose(1, 2), groups)
    sizes = LayerSizes(columns, num, positions, out_features, inputs.shape[-1] // groups, groups)
    if route is None:
        route = choose_route(sizes, vectors, steps, GROUPED_ROUTES)
    if route not in GROUPED_ROUTES:
        raise ValueError(
            f"a grouped convolution (groups={groups}) takes the routes 'formed' and "
            f"'operator', got {route!r}."
        )
    per_group = torch.einsum(  # [g, O/g, M, N, I/g], output-major
        "mntgo,ntgi->gomni",
        vectors.unflatten(3, (groups, -1)),
        inputs.unflatten(2, (groups, -1)),
    )
    samples = per_group.reshape(out_features, columns * num, -1).transpose(0, 1)
    kind = FormedConvTerms if route == "formed" else OperatorConvTerms
    return LayerTerms(kind(samples), input_trace, kfac, sizes, steps)


def choose_route(
    sizes: LayerSizes, like: Tensor, steps: WeightSteps | None, routes: tuple[str, ...] = ROUTES
) -> str:
    """Return the cost model's route for a weight of ``sizes`` in tensors like ``like``.

    :func:`~kfoc_backpack.solver.conv_cost.choose_conv_route` for the layer's
    ``(J, K, T, M, N)``, its tensors' item size and device, and the Lanczos steps of
    the weight's previous solve (``steps.last``; the assumed count where unknown).
    """
    return choose_conv_route(
        sizes.columns,
        sizes.samples,
        sizes.positions,
        sizes.out_features,
        sizes.in_features,
        itemsize=max(like.element_size(), 4),
        accelerator=launch_bound(like.device),
        steps=None if steps is None else steps.last,
        routes=routes,
    )


GROUPED_ROUTES = ("formed", "operator")
"""Routes of a grouped convolution, whose per-sample matrices are formed by one grouped
product (the factored routes would need the output-side vectors zero-padded to every
group)."""


def shared_terms(
    grads: Tensor,
    inputs: Tensor,
    input_trace: Tensor,
    with_kfac: bool = False,
    route: str | None = None,
    steps: WeightSteps | None = None,
) -> LayerTerms:
    """Per-sample quantities of a weight shared over ``T`` positions: the one hand-over.

    ``X_{m,n} = Σ_t g_{m,n,t} a_{n,t}ᵀ = G_{m,n}ᵀ A_n`` (the exact per-sample block, not
    K-FAC's "expand" approximation that treats positions as samples). ``Linear`` layers
    on tokens, convolutions of any kernel (``A_n`` the unfolded input) and layers called
    several times all end here, and one cost model picks the form the solver gets:

    * ``T = 1``: ``X_{m,n}`` has rank one, kept as
      :class:`~kfoc_backpack.solver.OuterTerms` (route ``rank-one``, as a ``Linear`` on
      2-d inputs) — a 1×1 convolution on a 1×1 map, a ``Linear`` on ``[N, 1, I]``;
    * else the route of least estimated flops whose memory fits
      (:func:`~kfoc_backpack.solver.conv_cost.choose_conv_route`, on the CPU and for
      accelerators): ``formed``, ``factored``, ``gram`` or ``operator``
      (:mod:`~kfoc_backpack.solver.conv_routes`). Every route gives the same optimal
      factors; :func:`~kfoc_backpack.solver.conv_routes.route_of` names the one taken.

    Args:
        grads: ``[M, N, T, O]`` output-side vectors at the positions (any strides).
        inputs: ``[N, T, I]`` inputs at the positions (any strides).
        input_trace: ``(1/N) Σ_{n,t} ‖a_{n,t}‖²``.
        with_kfac: Also compute K-FAC's (KFC) factors of the same samples.
        route: Force a route (``rank-one`` where ``T = 1``, or one of
            :data:`~kfoc_backpack.solver.conv_cost.ROUTES`) instead of the choice.
        steps: The weight's :class:`WeightSteps`: the choice counts the steps of its
            last solve (else the assumed count), and this batch's solve notes its own.

    Returns:
        The weight's :class:`LayerTerms`.
    """
    columns, num, positions, out_features = grads.shape
    sizes = LayerSizes(columns, num, positions, out_features, inputs.shape[-1])
    kfac = kfc_factors(grads, inputs) if with_kfac else None
    if route == RANK_ONE and positions != 1:
        raise ValueError(f"route {RANK_ONE!r} needs one position, got {positions}.")
    if positions == 1 and route in (None, RANK_ONE):
        rank_one = OuterTerms(grads[:, :, 0].transpose(0, 1), inputs[:, 0])
        return LayerTerms(rank_one, input_trace, kfac, sizes, steps)
    if route is None:
        route = choose_route(sizes, grads, steps)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {(RANK_ONE, *ROUTES)}, got {route!r}.")
    factored = {
        "factored": FactoredConvTerms,
        "gram": GramConvTerms,
        "output-gram": OutputGramTerms,
    }
    if route in factored:
        return LayerTerms(factored[route](grads, inputs), input_trace, kfac, sizes, steps)
    if columns == 1:  # one column: a single batched product
        prods = torch.bmm(grads[0].mT, inputs).unsqueeze(0)  # [1, N, O, I]
        out_major = prods.permute(2, 0, 1, 3).contiguous()
    else:  # einsum contracts batched over N with M·O rows, no copy of the input
        out_major = torch.einsum("mnto,nti->omni", grads, inputs).contiguous()
    samples = out_major.flatten(start_dim=1, end_dim=2).transpose(0, 1)
    kind = FormedConvTerms if route == "formed" else OperatorConvTerms
    return LayerTerms(kind(samples), input_trace, kfac, sizes, steps)


def grouped_kfc_factors(sqrt: Tensor, unfolded: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """K-FAC/KFC factors of a grouped convolution, its groups counted as positions.

    Group ``γ``'s output channels see only its own input channels, so each position
    ``t`` of each group is one more position sharing the ``[C_out, C_in/groups·Πkernel]``
    weight, with an output-side vector that is zero outside the group: the left factor
    is block-diagonal over the groups, the right factor averages over groups and
    positions (paper eq. 9 with ``groups·T`` positions).

    Args:
        sqrt: ``[M, N, O, T]`` output-side vectors (``O = C_out``).
        unfolded: ``[N, I, T]`` unfolded inputs of all input channels (``I = C_in·Πkernel``).
        groups: The convolution's ``groups``.

    Returns:
        ``(blockdiag_γ Σ_{m,n,t} ds_γ ds_γᵀ, (1/(N·groups·T)) Σ_{n,γ,t} â_γ â_γᵀ)``.
    """
    columns, num, out_features, positions = sqrt.shape
    per_group = sqrt.unflatten(2, (groups, -1)).permute(2, 0, 1, 4, 3)  # [g, M, N, T, O/g]
    flat = per_group.reshape(groups, -1, out_features // groups)
    left = torch.block_diag(*(flat.mT @ flat))
    inputs = unfolded.unflatten(1, (groups, -1)).permute(0, 1, 3, 2)  # [N, g, T, I/g]
    inputs = inputs.reshape(-1, inputs.shape[-1])
    return left, inputs.T @ inputs / inputs.shape[0]


def conv_terms(
    unfolded: Tensor,
    sqrt: Tensor,
    with_kfac: bool = False,
    route: str | None = None,
    groups: int = 1,
) -> LayerTerms:
    """Per-sample quantities of a convolution weight ``[C_out, C_in/groups·Πkernel]``.

    ``X_{m,n} = Ds_{m,n} â_nᵀ`` (sum over the ``T`` output positions): a weight shared
    over positions, handed to :func:`shared_terms` as every such layer is (rank one
    where ``T = 1``, else the route of least estimated cost whose memory fits).

    A grouped convolution (``groups > 1``; depthwise for ``groups = C_in``) is the
    ``[C_out, C_in/groups·Πkernel]`` matrix its weight is: group ``γ``'s rows of
    ``X_{m,n}`` are ``Ds_{m,n,γ} â_{n,γ}ᵀ`` with ``â_{n,γ}`` the unfolded input of the
    group's own channels. Its per-sample matrices are formed by one batched product
    (``M·N·C_out·(C_in/groups·Πkernel)·T`` multiply-adds, a ``groups``-th of an ungrouped
    layer's) and solved on the cheaper of the ``formed`` and ``operator`` routes
    (:data:`GROUPED_ROUTES`); K-FAC's factors are :func:`grouped_kfc_factors`.

    Args:
        unfolded: ``[N, I, T]`` unfolded inputs (``I = C_in·Πkernel``, all channels).
        sqrt: ``[M, N, O, T]`` output-side vectors at the output positions.
        with_kfac: Also compute K-FAC's (KFC) factors of the same samples.
        route: Force a route (see :func:`shared_terms`) instead of the choice;
            grouped convolutions take ``formed`` or ``operator``.
        groups: The convolution's ``groups``.

    Returns:
        The weight's :class:`LayerTerms`.
    """
    return weight_terms(unfolded.transpose(1, 2), sqrt.transpose(2, 3), with_kfac, route, groups)


def bias_block(sqrt: Tensor) -> Tensor:
    """Exact block ``Σ_{m,n} b_{m,n} b_{m,n}ᵀ`` of a bias from ``sqrt`` ``[M, N, O]``."""
    flat = sqrt.flatten(end_dim=1)
    return flat.T @ flat
