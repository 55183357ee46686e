r"""The data-set functions for users of the plain BackPACK extensions.

* :class:`KFOCAccumulator` — fed after every ``backward`` with ``KFOC``/``KFOCExact``,
  it aggregates each parameter's per-batch blocks with ``"approx"`` (the paper's
  K-FOC_approx) or ``"running"`` (K-FOC_running);
* :func:`optimal_factors` — the Frobenius-optimal factors of the whole data set,
  by the power method over the data (two passes per iteration) or over per-sample
  terms stored in memory when they fit, warm-started from ``"running"``;
* :func:`eigenvalue_correction` — the eigenbasis of any such factors with the data
  set's own eigenvalues in it (one pass): the eigenvalue-corrected K-FOC, or EK-FAC
  from K-FAC's factors.

Conventions (docs/conventions.md §4): a weight's result is ``[L_out, R_in]`` in
K-FAC's scale split, ``tr(R_in) = (1/N) Σ_n ‖â_n‖²`` over all ``N`` inputs of the data
set, a bias's is its exact block ``[B]``. The target is the data-set GGN/Fisher for the
loss as the user reduced it per batch: ``Σ_p F_p`` for ``reduction="sum"`` and
``Σ_p n_p F_p / N`` (the data-set mean) for ``reduction="mean"``. Batches are weighted
by their sample count ``n_p``, never by batch count. Under ``torch.distributed`` both
combine the ranks' shards (§8). Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from backpack import backpack
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.collect.hooks import BatchQuantities
from kfoc_backpack.collect.layer_terms import LayerTerms
from kfoc_backpack.dataset.blocks import BlockAccumulator
from kfoc_backpack.dataset.correction import corrected_eigenvalues
from kfoc_backpack.dataset.distributed import Reducer, combine_blocks
from kfoc_backpack.dataset.optimal import (
    BatchCollector,
    OptimalFactors,
    batch_size,
    solve_optimal,
)
from kfoc_backpack.dataset.options import (
    BATCH_AGGREGATIONS,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PASSES,
    DEFAULT_OPTIMAL_TOL,
    REDUCTIONS,
    OptimalOptions,
    check_choice,
)
from kfoc_backpack.extensions.kfoc import KFOCTerms
from kfoc_backpack.extensions.lifetime import extended, preserved_grads
from kfoc_backpack.solver.correction import EigenCorrected, eigenbases


class KFOCAccumulator:
    """Aggregate the K-FOC factors of a model over the batches of a data set.

    Call :meth:`update` after each ``backward`` inside ``with backpack(KFOC())`` (or
    ``KFOCExact()``); :meth:`factors` returns, per trainable parameter, the data-set
    factors ``[L_out, R_in]`` (weights) or the exact block ``[B]`` (biases)::

        acc = KFOCAccumulator(model, aggregation="running")
        for X, y in loader:
            with backpack(KFOCExact()):
                lossfunc(model(X), y).backward()
            acc.update(len(X))
        factors = acc.factors()        # {"0.weight": [L, R], "0.bias": [B], ...}

    Args:
        model: The (extended) model.
        aggregation: ``"running"`` (default, the paper's K-FOC_running: after each
            batch the optimal Kronecker product of the running estimate plus the
            batch) or ``"approx"`` (K-FOC_approx: factor-wise sums as in K-FAC).
            The data-set optimum needs per-sample terms: :func:`optimal_factors`.
        savefield: The extension's savefield, ``"kfoc"`` (``KFOC``) or
            ``"kfoc_exact"`` (``KFOCExact``).
        reduction: How the loss was reduced over each batch: ``"mean"`` (default;
            the result approximates the data-set mean ``Σ_p n_p F_p / N``) or
            ``"sum"`` (the data-set sum ``Σ_p F_p``).
        process_group: Under ``torch.distributed``, :meth:`factors` combines the
            ranks' aggregates over this group (default: the whole world when
            initialised); every rank must then call it. ``"approx"`` equals one
            process over all shards up to rounding, ``"running"`` is the optimal
            product of the ranks' running estimates (docs/conventions.md §8).

    Raises:
        ValueError: For an unknown ``aggregation`` or ``reduction``.
    """

    def __init__(
        self,
        model: Module,
        aggregation: str = "running",
        savefield: str = "kfoc",
        reduction: str = "mean",
        process_group: object | None = None,
    ):
        check_choice(
            aggregation,
            "aggregation",
            BATCH_AGGREGATIONS,
            " For the data-set optimum use optimal_factors().",
        )
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.aggregation = aggregation
        self.savefield = savefield
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._blocks = {name: BlockAccumulator(aggregation) for name in self._params}
        self.num_samples = 0
        self.process_group = process_group

    def update(self, num_samples: int) -> None:
        """Add the current batch, read from every parameter's savefield.

        Call once per batch, after its backward pass; parameters without the
        savefield (skipped layers) are left out.

        Args:
            num_samples: Number of inputs of the batch.

        Raises:
            TypeError: If the savefield holds per-sample terms (``KFOCTerms``).
            RuntimeError: If no parameter holds the savefield.
        """
        found = False
        scale = 1.0 if self.reduction == "sum" else float(num_samples)
        for name, param in self._params.items():
            block = getattr(param, self.savefield, None)
            if block is None:
                continue
            if isinstance(block, LayerTerms):
                raise TypeError(
                    f"'{name}.{self.savefield}' holds per-sample terms (KFOCTerms); "
                    "aggregate those with optimal_factors(), or use KFOC/KFOCExact here."
                )
            self._blocks[name].update(block, num_samples, scale)
            found = True
        if not found:
            raise RuntimeError(
                f"No trainable parameter has '.{self.savefield}'. Call update() after a "
                "backward pass inside `with backpack(ext)` where ext is KFOC() (savefield "
                "'kfoc') or KFOCExact() (savefield 'kfoc_exact')."
            )
        self.num_samples += int(num_samples)

    def factors(self) -> dict[str, list[Tensor]]:
        """Return the aggregated ``[L_out, R_in]`` or ``[B]`` per parameter name.

        Under ``torch.distributed``, a collective: every rank calls it and receives
        the same factors of all ranks' batches.

        Raises:
            RuntimeError: If :meth:`update` was never called (on any rank).
        """
        reducer = Reducer(self.process_group)
        (num_samples,) = reducer.sum_scalars([self.num_samples])
        if num_samples == 0:
            raise RuntimeError("KFOCAccumulator.factors() called before any update().")
        combined = combine_blocks(self._blocks, self._params, reducer)
        result = {}
        for name, (factors, _) in combined.items():
            if self.reduction == "mean":
                factors = [factors[0] / num_samples, *factors[1:]]
            result[name] = factors
        return result


def term_collector(
    model: Module, lossfunc: Module, params: dict[str, Tensor], exact: bool, mc_samples: int
) -> BatchCollector:
    """``collect(X, y)``: one batch's per-sample terms by BackPACK (``KFOCTerms``).

    The model and loss are extended only during the call; ``.grad`` is left as it was.
    """

    def collect(X: Tensor, y: Tensor) -> BatchQuantities:
        extension = KFOCTerms(exact=exact, mc_samples=mc_samples)
        with preserved_grads(params.values()), extended(model, lossfunc), torch.enable_grad():
            loss = lossfunc(model(X), y)
            with backpack(extension):
                loss.backward()
        quantities = {}
        for name, param in params.items():
            value = getattr(param, extension.savefield, None)
            if value is not None:
                quantities[name] = value
                delattr(param, extension.savefield)
        return BatchQuantities(loss.detach(), batch_size(X), quantities)

    return collect


def eigenvalue_correction(
    model: Module,
    lossfunc: Module,
    loader: Iterable,
    factors: dict[str, list[Tensor]],
    *,
    exact: bool = True,
    mc_samples: int = 1,
    seed: int | None = None,
    progress_bar: bool = False,
    process_group: object | None = None,
) -> dict[str, EigenCorrected]:
    """Eigenvalue-corrected blocks of a data set in the eigenbasis of given factors.

    For every weight of ``factors`` (``[L_out, R_in]``: K-FOC's from
    :class:`KFOCAccumulator` or :func:`optimal_factors` — the eigenvalue-corrected
    K-FOC —, or K-FAC's, e.g. BackPACK's ``KFAC`` summed over batches — EK-FAC), the
    eigenbasis ``U_L ⊗ U_R`` of the factors and the exact diagonal ``S`` of the
    data-set block in it (one pass over the data)::

        result = optimal_factors(model, lossfunc, loader)
        corrected = eigenvalue_correction(model, lossfunc, loader, result.factors)
        block = corrected["0.weight"]    # block.left_basis, block.right_basis, block.diagonal

    The target is the one of :func:`optimal_factors` (the loss as ``lossfunc`` reduces
    it, summed or averaged over the data set by sample count); biases, whose blocks
    the factors already hold exactly, are not returned.

    Args:
        model: The model (as for :func:`optimal_factors`).
        lossfunc: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` ``"mean"`` or ``"sum"``.
        loader: Re-iterable batches ``(X, y)`` of tensors.
        factors: ``[L_out, R_in]`` per weight name (biases' ``[B]`` are skipped).
        exact: Exact GGN (default) or Monte-Carlo Fisher.
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
        seed: Base seed of the Monte-Carlo labels (required for the Monte-Carlo
            Fisher): pass the one given to :func:`optimal_factors` so that ``S``
            belongs to the Fisher the factors were fitted to.
        progress_bar: Show a tqdm progress bar.
        process_group: Under ``torch.distributed``, each rank passes its shard and
            all receive the sums over every rank (default: the world when initialised).

    Returns:
        Per weight name an :class:`~kfoc_backpack.solver.correction.EigenCorrected`.

    Raises:
        ValueError: For a loss without ``reduction`` ``"mean"``/``"sum"``, a
            Monte-Carlo pass without ``seed``, or dict-like batches.
    """
    reduction = getattr(lossfunc, "reduction", None)
    check_choice(reduction, "lossfunc.reduction", REDUCTIONS)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    bases = {name: eigenbases(*block) for name, block in factors.items() if len(block) == 2}
    diagonals = corrected_eigenvalues(
        term_collector(model, lossfunc, params, exact, mc_samples),
        bases,
        params,
        loader,
        stochastic=not exact,
        seed=seed,
        reduction=reduction,
        progress_bar=progress_bar,
        process_group=process_group,
    )
    return {name: EigenCorrected(*bases[name], diagonals[name]) for name in bases}


def optimal_factors(
    model: Module,
    lossfunc: Module,
    loader: Iterable,
    *,
    exact: bool = True,
    mc_samples: int = 1,
    init: dict[str, Tensor] | None = None,
    tol: float = DEFAULT_OPTIMAL_TOL,
    max_passes: int = DEFAULT_MAX_PASSES,
    store_terms: bool | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    seed: int | None = None,
    progress_bar: bool = False,
    process_group: object | None = None,
) -> OptimalFactors:
    """Frobenius-optimal K-FOC factors of a whole data set (docs/conventions.md §4, ``"optimal"``).

    For every trainable weight, the ``L_out ⊗ R_in`` closest to the data-set block of
    the GGN (``exact=True``, the ``KFOCExact`` target) or Monte-Carlo Fisher (the
    ``KFOC`` target) for the loss as ``lossfunc`` reduces it: ``Σ_p F_p`` for
    ``reduction="sum"``, the data-set mean ``Σ_p n_p F_p / N`` for ``"mean"``. It is
    the lower bound for ``KFOCAccumulator``'s ``"approx"`` and ``"running"``. Biases
    get their exact block. The model and loss are extended with BackPACK only while
    the function runs; ``.grad`` of the parameters is left as it was::

        result = optimal_factors(model, torch.nn.CrossEntropyLoss(), loader)
        L, R = result.factors["0.weight"]

    Args:
        model: The model (only ``Linear``/``Conv1d``/``Conv2d``/``Conv3d`` layers may
            have trainable parameters).
        lossfunc: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` ``"mean"`` or ``"sum"``.
        loader: Re-iterable batches ``(X, y)`` of tensors (e.g. a ``DataLoader``).
        exact: Exact GGN (default) or Monte-Carlo Fisher.
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
        init: Optional warm start of the left factor per weight name (default: the
            running aggregate of the per-batch optima).
        tol: Tolerance of the power method (change of the unit-norm left factor).
        max_passes: Cap on iterations (stored terms) or data passes (streaming).
        store_terms: ``True``/``False`` to force keeping the per-sample terms in
            memory or streaming over the data; ``None`` keeps them while they fit
            into ``max_memory`` bytes.
        max_memory: Byte budget for stored terms.
        seed: Base seed of the Monte-Carlo labels.
        progress_bar: Show tqdm progress bars.
        process_group: Under ``torch.distributed``, each rank passes its shard as
            ``loader`` and all ranks receive the optimum of the union of the shards
            (default group: the whole world when initialised), see
            :func:`~kfoc_backpack.dataset.solve_optimal`.

    Returns:
        :class:`OptimalFactors`; ``.factors`` maps parameter names to ``[L, R]`` /
        ``[B]``.

    Raises:
        ValueError: For a loss without ``reduction`` ``"mean"``/``"sum"``, dict-like
            batches or invalid options.
        NotImplementedError: For a trainable layer K-FOC does not support.
    """
    reduction = getattr(lossfunc, "reduction", None)
    check_choice(reduction, "lossfunc.reduction", REDUCTIONS)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return solve_optimal(
        term_collector(model, lossfunc, params, exact, mc_samples),
        params,
        loader,
        stochastic=not exact,
        reduction=reduction,
        init=init,
        options=OptimalOptions(tol, max_passes, store_terms, max_memory),
        seed=seed,
        progress_bar=progress_bar,
        process_group=process_group,
    )
