r"""``solve_optimal``: the Frobenius-optimal K-FOC factors of a whole data set.

The engine of :func:`~kfoc_backpack.dataset.optimal_factors` (BackPACK's route) and
of laplace-torch's ``aggregation="optimal"`` (the hook route); the power method itself
is in :mod:`kfoc_backpack.dataset.power`. Index conventions:
:mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.nn import Parameter

from kfoc_backpack.dataset.distributed import Reducer
from kfoc_backpack.dataset.options import REDUCTIONS, OptimalOptions, check_choice
from kfoc_backpack.dataset.power import (
    BatchCollector,
    BatchSplitter,
    OptimalFactors,
    OptimalSolver,
)

__all__ = ["BatchCollector", "BatchSplitter", "OptimalFactors", "solve_optimal", "split_batch"]


BATCH_FORMAT = "K-FOC needs batches (X, y) of tensors (BackPACK does not support dict-like inputs)"
"""What the BackPACK route accepts as a batch, the start of its error messages."""


def batch_size(X: object) -> int:
    """Return the number of inputs of a batch; only tensor inputs are supported."""
    if isinstance(X, Tensor):
        return int(X.shape[0])
    raise ValueError(f"{BATCH_FORMAT}, got X of type {type(X).__name__}.")


def split_batch(batch: object) -> tuple[Tensor, Tensor]:
    """``(X, y)`` of a batch given as a pair of tensors.

    Raises:
        ValueError: For anything else (e.g. dict-like batches).
    """
    if isinstance(batch, Sequence) and len(batch) == 2:
        X, y = batch
        batch_size(X)
        return X, y
    raise ValueError(f"{BATCH_FORMAT}, got a batch of type {type(batch).__name__}.")


def solve_optimal(
    collect: BatchCollector,
    params: dict[str, Parameter],
    loader: Iterable,
    *,
    split: BatchSplitter | None = None,
    stochastic: bool = False,
    reduction: str = "sum",
    init: dict[str, Tensor] | None = None,
    prior: dict[str, tuple[list[Tensor], int]] | None = None,
    options: OptimalOptions | None = None,
    seed: int | None = None,
    progress_bar: bool = False,
    process_group: object | None = None,
) -> OptimalFactors:
    """Data-set-optimal K-FOC factors from a caller-supplied batch collector.

    The first pass collects every batch's per-sample terms, exact bias blocks and
    loss, and the warm start: the running aggregate of the per-batch optima (or
    ``init``). Then, per weight, the power method for ``F = Σ_p s_p F_p (+ prior)``
    runs over the terms kept in memory when they fit, else over the data, two passes
    per iteration; with a stochastic target (Monte-Carlo labels) every batch is
    collected under a per-batch seed, so every pass sees the same Fisher.

    Under ``torch.distributed`` each rank passes its own shard as ``loader`` and every
    rank receives the optimum of the union of the shards (docs/conventions.md §8):
    the half-steps' partial sums are summed over the ranks, one collective per
    half-step for all weights; loss, sample count and bias blocks are summed. A rank
    with an empty shard contributes nothing.

    Args:
        collect: ``collect(X, y) -> BatchQuantities``, see :data:`BatchCollector`.
        params: The parameters to approximate, by name (the same on every rank).
        loader: Re-iterable batches (this rank's shard).
        split: ``split(batch) -> (X, y)`` (default: ``(X, y)`` pairs of tensors).
        stochastic: Whether ``collect`` draws random labels (Monte-Carlo Fisher).
        reduction: The loss reduction per batch: ``"sum"`` (target ``Σ_p F_p``) or
            ``"mean"`` (target ``Σ_p n_p F_p / N``).
        init: Optional warm start ``[M, M]`` of the left factor per weight name
            (default: the running aggregate, computed in the first pass).
        prior: Optional earlier approximation per name for an online update,
            ``([L, R] or [B], n)``: its product is added to the target and its ``n``
            inputs count in the K-FAC split. Only with ``reduction="sum"``; in a
            distributed fit the same on every rank (it is added once).
        options: Tolerance, pass cap and memory policy (:class:`OptimalOptions`).
        seed: Base seed of the Monte-Carlo labels (default: drawn from torch's
            global generator, rank 0's in a distributed fit); rank ``r``'s batch
            ``i`` uses ``seed + i + r·2³²``.
        progress_bar: Show a tqdm progress bar per pass.
        process_group: The ``torch.distributed`` group to combine over (default: the
            whole world when ``torch.distributed`` is initialised, else none).

    Returns:
        The optimal factors and diagnostics.

    Raises:
        ValueError: For invalid arguments, an empty loader (on every rank), malformed
            batches, or ranks holding different parameters.
        DistributedFitError: On every rank, when one rank failed during the fit.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    if prior and reduction != "sum":
        raise ValueError("prior is only supported with reduction='sum'.")
    init = {name: (v[0] if isinstance(v, (list, tuple)) else v) for name, v in (init or {}).items()}
    solver = OptimalSolver(
        collect,
        split_batch if split is None else split,
        dict(params),
        loader,
        stochastic=stochastic,
        reduction=reduction,
        options=OptimalOptions() if options is None else options,
        seed=seed,
        progress_bar=progress_bar,
        reducer=Reducer.of(process_group),
    )
    return solver.solve(init, dict(prior or {}))
