r"""The one hand-over to the solver: a layer's positions become its :class:`LayerTerms`.

Both collection routes end here: BackPACK's module extensions (``KFOC``,
``KFOCExact``, ``KFOCTerms``) and the hook route of :mod:`kfoc_backpack.collect.hooks`
hand over a layer's input and the vectors at its output, at its ``T`` positions (a
:class:`~kfoc_backpack.collect.kinds.LayerKind` puts them there), and receive the
weight's :class:`~kfoc_backpack.collect.layer_terms.LayerTerms` and the exact bias
block. See ``docs/conventions.md`` §1.

Index conventions of this module: ``M`` columns per input (Monte-Carlo samples,
columns of the loss Hessian's square root, one for the empirical Fisher), ``N``
inputs of the batch, ``T`` positions that share the weight (tokens, output pixels),
``O`` output features, ``I`` input features (``C_in·Πkernel`` for convolutions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfoc_backpack.collect.layer_terms import LayerTerms, WeightSteps
from kfoc_backpack.solver import LayerSizes, OuterTerms
from kfoc_backpack.solver._common import launch_bound
from kfoc_backpack.solver.conv_cost import ROUTES, choose_conv_route
from kfoc_backpack.solver.conv_routes import (
    RANK_ONE,
    FactoredConvTerms,
    FormedConvTerms,
    GramConvTerms,
    OperatorConvTerms,
    OutputGramTerms,
)

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


def bias_block(sqrt: Tensor) -> Tensor:
    """Exact block ``Σ_{m,n} b_{m,n} b_{m,n}ᵀ`` of a bias from ``sqrt`` ``[M, N, O]``."""
    flat = sqrt.flatten(end_dim=1)
    return flat.T @ flat
