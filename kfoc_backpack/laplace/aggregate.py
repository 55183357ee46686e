"""Data-set K-FOC factors for laplace-torch: one fit's aggregation over the loader.

Everything here works on "raw" blocks: the GGN (or MC Fisher) of the *summed* loss,
without laplace-torch's likelihood ``factor``; weights as ``[L_out, R_in]`` with
``tr(R_in) = (1/N) Σ_n ‖â_n‖²`` over all ``N`` inputs seen (K-FAC's split), biases as
``[B]``. The caller applies the factor. Under ``torch.distributed`` the ranks' shards
are combined (docs/conventions.md §8).

Index conventions: ``N`` inputs of the data set (all ranks), ``L_out``/``R_in`` a
weight's output-side and input-side factors, ``B`` a bias block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import tqdm
from torch import Tensor

from kfoc_backpack.dataset import (
    AGGREGATIONS,
    BlockAccumulator,
    Communication,
    OptimalOptions,
    solve_optimal,
)
from kfoc_backpack.dataset.blocks import zero_block
from kfoc_backpack.dataset.distributed import Reducer, combine_blocks
from kfoc_backpack.dataset.options import check_choice
from kfoc_backpack.laplace.backend import KFOCKronMixin, batch_inputs

BatchBlocks = Callable[[object, Tensor], tuple[Tensor, list[list[Tensor]], int]]
"""``(X, y) -> (loss, blocks, n)``: one batch's summed loss, raw blocks per trainable
parameter and number of inputs (:meth:`~kfoc_backpack.laplace.backend.KFOCKronMixin.kfoc`)."""

Prior = dict[str, tuple[list[Tensor], int]]
"""Earlier raw blocks per parameter name with their number of inputs (online fit)."""


class RawFit(NamedTuple):
    """What :func:`fit_factors` returns.

    Attributes:
        loss: The summed loss over all batches (of all ranks), without ``factor``.
        blocks: Per trainable parameter of the backend (laplace-torch's order),
            ``[L_out, R_in]`` or ``[B]``.
        num_samples: Number of inputs seen (by all ranks).
        communication: Collectives and bytes this rank sent (zero in one process).
    """

    loss: Tensor
    blocks: list[list[Tensor]]
    num_samples: int
    communication: Communication


def check_aggregation(aggregation: str) -> str:
    """Return ``aggregation`` if supported.

    Raises:
        ValueError: Naming the supported aggregations.
    """
    return check_choice(aggregation, "aggregation", AGGREGATIONS)


def _to_device(x: object, device: torch.device) -> object:
    """Move a tensor input to ``device``; dict-like inputs stay as they are (laplace-torch)."""
    return x.to(device) if isinstance(x, Tensor) else x


def batch_splitter(
    backend: KFOCKronMixin,
    check_batch: Callable[[Tensor, Tensor], None] | None = None,
    owner: str = "KFOCLaplace",
) -> Callable[[object], tuple[object, Tensor]]:
    """``batch -> (X, y)`` as every pass of a fit reads the loader's batches.

    ``(X, y)`` pairs or dict-like batches (``backend.dict_key_y`` the targets), moved to
    the parameters' device and checked by ``check_batch``.
    """
    device = next(iter(backend.named_trainable.values())).device

    def prepared(batch: object) -> tuple[object, Tensor]:
        X, y = batch_inputs(batch, backend.dict_key_x, backend.dict_key_y, owner)
        X, y = _to_device(X, device), y.to(device)
        if check_batch is not None:
            check_batch(X, y)
        return X, y

    return prepared


def fit_factors(
    backend: KFOCKronMixin,
    loader: Iterable,
    aggregation: str = "running",
    *,
    prior: Prior | None = None,
    check_batch: Callable[[Tensor, Tensor], None] | None = None,
    progress_bar: bool = False,
    options: OptimalOptions | None = None,
    owner: str = "KFOCLaplace",
    process_group: object | None = None,
    seed: int | None = None,
    per_batch: BatchBlocks | None = None,
) -> RawFit:
    """Raw data-set K-FOC blocks of the backend's trainable parameters.

    Args:
        backend: The curvature backend (its model, likelihood, MC or exact GGN).
        loader: Batches ``(X, y)`` or dict-like batches (``backend.dict_key_y`` holds
            the targets); under ``torch.distributed`` this rank's shard.
        aggregation: ``"approx"``, ``"running"`` or ``"optimal"`` (``docs/conventions.md`` §4).
        prior: Raw blocks of earlier data to include (online fit; the same on every
            rank, counted once).
        check_batch: Called with every batch before its curvature is computed.
        progress_bar: Show a tqdm progress bar.
        options: Options of ``"optimal"`` (tolerance, pass cap, memory policy).
        owner: Name used in error messages.
        process_group: The ``torch.distributed`` group to combine over (default: the
            whole world when initialised, else none), or a
            :class:`~kfoc_backpack.dataset.distributed.Reducer` whose log continues.
        seed: Base seed of the Monte-Carlo labels (a stochastic backend): batch ``i``
            of rank ``r`` draws under ``seed + i + r·2³²``, so that a later pass over the
            same loader (the eigenvalue correction) sees the same Fisher. Default: in a
            distributed fit one drawn and shared by the ranks, else torch's global
            generator as it runs.
        per_batch: ``per_batch(X, y) -> (loss, blocks, n)``, one batch's blocks
            (default ``backend.kfoc``: K-FOC's; ``backend.kfac``: K-FAC's); not with
            ``"optimal"``, whose passes collect the per-sample terms themselves.

    Returns:
        The raw blocks, summed loss, number of inputs and communication log.
    """
    check_aggregation(aggregation)
    params = backend.named_trainable
    prior = prior or {}
    prepared = batch_splitter(backend, check_batch, owner)

    if aggregation == "optimal":
        if per_batch is not None:
            raise ValueError(f"{owner}: aggregation='optimal' solves K-FOC's own blocks only.")
        result = solve_optimal(
            backend.collect,
            params,
            loader,
            split=prepared,
            stochastic=backend.stochastic,
            reduction="sum",
            seed=seed,
            prior=prior,
            options=options,
            progress_bar=progress_bar,
            process_group=process_group,
        )
        blocks = [result.factors.get(name) or zero_block(p) for name, p in params.items()]
        return RawFit(result.loss, blocks, result.num_samples, result.communication)

    reducer = Reducer.of(process_group)
    reducer.check_same_params(params, owner)
    per_batch = backend.kfoc if per_batch is None else per_batch
    if backend.stochastic and (reducer.active or seed is not None):
        seed = reducer.shared_seed(seed)
    else:
        seed = None
    accumulators = {name: BlockAccumulator(aggregation) for name in params}
    if reducer.rank == 0:  # an online fit's earlier factors count once
        for name, (block, num) in prior.items():
            if name in accumulators and num > 0:
                accumulators[name].update(block, num, 1.0)
    loss: Tensor | float = 0.0
    num_samples = 0
    pbar = tqdm.tqdm(loader, disable=not progress_bar)
    pbar.set_description("[Computing Hessian]")
    with reducer.guard("the pass over the data"):
        for index, batch in enumerate(pbar):
            seeded = (
                contextlib.nullcontext()
                if seed is None
                else reducer.seeded(seed, index, params.values())
            )
            with seeded:
                batch_loss, blocks, num = per_batch(*prepared(batch))
            loss = loss + batch_loss
            num_samples += num
            for name, block in zip(params, blocks):
                accumulators[name].update(block, num, 1.0)
    combined = combine_blocks(accumulators, params, reducer)
    if reducer.active:
        total_loss, num_samples = reducer.sum_scalars([loss, num_samples])
        like = next(iter(params.values()))
        loss, num_samples = torch.tensor(total_loss, dtype=like.dtype), int(num_samples)
    results = [
        combined[name][0] if name in combined else zero_block(p) for name, p in params.items()
    ]
    return RawFit(torch.as_tensor(loss), results, num_samples, reducer.log)
