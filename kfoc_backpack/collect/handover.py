r"""The one hand-over to the solver: a layer's positions become its :class:`LayerTerms`.

Both collection routes end here: BackPACK's module extensions (``KFOC``,
``KFOCExact``, ``KFOCTerms``) and the hook route of :mod:`kfoc_backpack.collect.hooks`
hand over a layer's input and the vectors at its output, at its ``T`` positions (a
:class:`~kfoc_backpack.collect.kinds.LayerKind` puts them there), and receive the
weight's :class:`~kfoc_backpack.collect.layer_terms.LayerTerms` and the exact bias
block. See ``docs/conventions.md`` §1. Which route the weight's terms take, and how
they are built, is the solver's route table's
(:mod:`kfoc_backpack.solver.shared.table`); collection adds the input trace, K-FAC's
factors of the same samples and the bias block.

Index conventions of this module: ``M`` columns per input (Monte-Carlo samples,
columns of the loss Hessian's square root, one for the empirical Fisher), ``N``
inputs of the batch, ``T`` positions that share the weight (tokens, output pixels),
``O`` output features, ``I`` input features (``C_in·Πkernel`` for convolutions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfoc_backpack.collect.grouped import GroupedLayerTerms
from kfoc_backpack.collect.layer_terms import LayerTerms, WeightSteps
from kfoc_backpack.enums import Route

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
    route: Route | str | None = None,
    groups: int = 1,
    steps: WeightSteps | None = None,
) -> LayerTerms:
    """Per-sample quantities of any supported weight, from its positions: the hand-over.

    Every layer kind (:mod:`kfoc_backpack.collect.kinds`) and both collection routes end
    here with the layer's inputs and output-side vectors at its ``T`` positions:
    ``X_{m,n} = Σ_t g_{m,n,t} a_{n,t}ᵀ = G_{m,n}ᵀ A_n`` (the exact per-sample block, not
    K-FAC's "expand" approximation that treats positions as samples). The route is
    :func:`~kfoc_backpack.solver.shared.table.choose_route`'s for the layer's
    :class:`~kfoc_backpack.solver.LayerSizes`, its tensors' item size and device and
    the Lanczos steps of the weight's previous solve (``steps.last``; the assumed
    count where unknown): ``rank-one`` for one ungrouped position, else the route of
    least estimated cost whose memory fits. The route's class builds the terms; every
    route gives the same optimal factors, and the terms' ``route`` names the one taken.
    A grouped layer's positions are handed over as they are
    (:class:`~kfoc_backpack.collect.grouped.GroupedLayerTerms`): each approximation
    takes them per group or coupled over all rows (:class:`~kfoc_backpack.enums.Grouped`),
    and the route is chosen then; a forced ``route`` couples them.

    Args:
        inputs: ``[N, T, I]`` inputs at the positions (any strides; a grouped layer's
            ``I`` spans all groups' input features).
        vectors: ``[M, N, T, O]`` output-side vectors at the positions (any strides).
        with_kfac: Also compute K-FAC's (KFC) factors of the same samples.
        route: Force a route (a :class:`~kfoc_backpack.enums.Route` or its value)
            instead of the choice.
        groups: Rows of the weight in ``groups`` blocks that see disjoint blocks of
            the input features (a grouped convolution's ``groups``).
        steps: The weight's :class:`WeightSteps` (the route choice counts its last
            solve's steps; this batch's solve notes its own), or ``None``.

    Returns:
        The weight's :class:`LayerTerms` (a grouped one's
        :class:`~kfoc_backpack.collect.grouped.GroupedLayerTerms`).

    Raises:
        ValueError: For an unknown forced route, or one that does not support the
            layer's sizes.
    """
    kfac = None
    if with_kfac and groups == 1:
        kfac = kfc_factors(vectors, inputs)
    elif with_kfac:
        kfac = grouped_kfc_factors(vectors.transpose(2, 3), inputs.transpose(1, 2), groups)
    if groups > 1 and route is None:
        return GroupedLayerTerms.of_positions(inputs, vectors, groups, kfac, steps)
    input_trace = sum_of_squares(inputs) / inputs.shape[0]
    return LayerTerms.from_positions(inputs, vectors, input_trace, kfac, groups, route, steps)


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
