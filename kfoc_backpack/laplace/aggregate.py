"""Data-set K-FOC factors for laplace-torch: one fit's aggregation over the loader.

Everything here works on "raw" blocks: the GGN (or MC Fisher) of the *summed* loss,
without laplace-torch's likelihood ``factor``; weights as ``[L_out, R_in]`` with
``tr(R_in) = (1/N) Σ_n ‖â_n‖²`` over all ``N`` inputs seen (K-FAC's split), biases as
``[B]``. The caller applies the factor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import tqdm
from torch import Tensor

from kfoc_backpack.extensions.accumulate import (
    DEFAULT_MAX_MEMORY,
    BlockAccumulator,
    check_choice,
    solve_optimal,
)
from kfoc_backpack.laplace.backend import KFOCKronMixin, batch_inputs, zero_block

AGGREGATIONS = ("approx", "running", "optimal")
"""Aggregations over batches: K-FOC_approx, K-FOC_running, the data-set optimum."""

Prior = dict[str, tuple[list[Tensor], int]]
"""Earlier raw blocks per parameter name with their number of inputs (online fit)."""


def check_aggregation(aggregation: str) -> str:
    """Return ``aggregation`` if supported.

    Raises:
        ValueError: Naming the supported aggregations.
    """
    return check_choice(aggregation, "aggregation", AGGREGATIONS)


def _to_device(x: object, device: torch.device) -> object:
    """Move a tensor input to ``device``; dict-like inputs stay as they are (laplace-torch)."""
    return x.to(device) if isinstance(x, Tensor) else x


def fit_factors(
    backend: KFOCKronMixin,
    loader: Iterable,
    aggregation: str = "running",
    *,
    prior: Prior | None = None,
    check_batch: Callable[[Tensor, Tensor], None] | None = None,
    progress_bar: bool = False,
    tol: float = 1e-6,
    max_passes: int = 50,
    store_terms: bool | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    owner: str = "KFOCLaplace",
) -> tuple[Tensor, list[list[Tensor]], int]:
    """Raw data-set K-FOC blocks of the backend's trainable parameters.

    Args:
        backend: The curvature backend (its model, likelihood, MC or exact GGN).
        loader: Batches ``(X, y)`` or dict-like batches (``backend.dict_key_y`` holds
            the targets).
        aggregation: ``"approx"``, ``"running"`` or ``"optimal"`` (``docs/conventions.md`` §4).
        prior: Raw blocks of earlier data to include (online fit).
        check_batch: Called with every batch before its curvature is computed.
        progress_bar: Show a tqdm progress bar.
        tol: Power-method tolerance of ``"optimal"``.
        max_passes: Cap on iterations/passes of ``"optimal"``.
        store_terms: Keep per-sample terms in memory for ``"optimal"`` (``None``: if
            they fit into ``max_memory`` bytes).
        max_memory: Byte budget of the stored terms.
        owner: Name used in error messages.

    Returns:
        ``(loss, blocks, num_samples)``: the summed loss (no factor), per trainable
        parameter of the backend (in laplace-torch's order) ``[L_out, R_in]`` or
        ``[B]``, and the number of inputs in the loader.
    """
    check_aggregation(aggregation)
    params = backend.named_trainable
    device = next(iter(params.values())).device
    prior = prior or {}

    def prepared(batch: object) -> tuple[object, Tensor]:
        X, y = batch_inputs(batch, backend.dict_key_x, backend.dict_key_y, owner)
        X, y = _to_device(X, device), y.to(device)
        if check_batch is not None:
            check_batch(X, y)
        return X, y

    if aggregation == "optimal":
        result = solve_optimal(
            backend.collect,
            params,
            loader,
            split=prepared,
            stochastic=backend.stochastic,
            reduction="sum",
            prior=prior,
            tol=tol,
            max_passes=max_passes,
            store_terms=store_terms,
            max_memory=max_memory,
            progress_bar=progress_bar,
        )
        blocks = [result.factors.get(name) or zero_block(p) for name, p in params.items()]
        return result.loss, blocks, result.num_samples

    accumulators = {name: BlockAccumulator(aggregation) for name in params}
    for name, (block, num) in prior.items():
        if name in accumulators and num > 0:
            accumulators[name].update(block, num, 1.0)
    loss: Tensor | float = 0.0
    num_samples = 0
    pbar = tqdm.tqdm(loader, disable=not progress_bar)
    pbar.set_description("[Computing Hessian]")
    for batch in pbar:
        batch_loss, blocks, num = backend.kfoc(*prepared(batch))
        loss = loss + batch_loss
        num_samples += num
        for name, block in zip(params, blocks):
            accumulators[name].update(block, num, 1.0)
    results = []
    for name, param in params.items():
        acc = accumulators[name]
        results.append(zero_block(param) if acc.empty else acc.factors())
    return torch.as_tensor(loss), results, num_samples
