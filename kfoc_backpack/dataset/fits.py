r"""Data-set fits of a model and a loss by BackPACK: ``optimal_factors``, ``eigenvalue_correction``.

The same approximations as laplace-torch's Laplace classes
(:class:`~kfoc_backpack.dataset.kfoc.KFOCFactors`,
:func:`~kfoc_backpack.dataset.correction.corrected_blocks`) over the same
:class:`~kfoc_backpack.dataset.data_pass.DataPass`, reading the batches through
BackPACK's collection route (:class:`~kfoc_backpack.extensions.collector.BackPACKCollector`):

* :func:`optimal_factors` — the Frobenius-optimal factors of the whole data set, by the
  power method over the data (two passes per iteration) or over per-sample terms
  stored in memory when they fit, warm-started from ``"running"``;
* :func:`eigenvalue_correction` — the eigenbasis of any such factors with the data
  set's own eigenvalues in it (one pass): the eigenvalue-corrected K-FOC, or EK-FAC
  from K-FAC's factors.

Conventions (docs/conventions.md §4): a weight's result is ``[L_out, R_in]`` in
K-FAC's scale split, ``tr(R_in) = (1/N) Σ_n ‖â_n‖²`` over all ``N`` inputs of the data
set, a bias's is its exact block ``[B]``. The target is the data-set GGN/Fisher for the
loss as the user reduced it per batch: ``Σ_p F_p`` for ``reduction="sum"`` and
``Σ_p n_p F_p / N`` (the data-set mean) for ``reduction="mean"``. Under
``torch.distributed`` both combine the ranks' shards (§8). Index conventions:
:mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor
from torch.nn import Module

from kfoc_backpack.blocks import EigenCorrected
from kfoc_backpack.dataset.correction import corrected_blocks
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.dataset.distributed import Communication
from kfoc_backpack.dataset.kfoc import KFOCFactors
from kfoc_backpack.dataset.options import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PASSES,
    DEFAULT_OPTIMAL_TOL,
)
from kfoc_backpack.enums import Aggregation, Curvature, Reduction
from kfoc_backpack.extensions.collector import BackPACKCollector
from kfoc_backpack.extensions.terms import KFOCTerms


@dataclass(frozen=True)
class OptimalFactors:
    """Result of :func:`optimal_factors`.

    Attributes:
        factors: Per parameter name, ``[L_out, R_in]`` (weights, K-FAC split over all
            inputs) or ``[B]`` (biases, exact).
        loss: Sum over the batches (of all ranks) of the loss values (first pass).
        num_samples: Number of inputs in one pass over the data (of all ranks).
        passes: Passes over the data, the first one included.
        iterations: Largest number of power iterations of any weight.
        converged: Whether every weight reached the tolerance.
        stored: Whether the per-sample terms were kept in memory.
        communication: Collectives and bytes this rank sent (zero in one process).
    """

    factors: dict[str, list[Tensor]]
    loss: Tensor
    num_samples: int
    passes: int
    iterations: int
    converged: bool
    stored: bool
    communication: Communication = field(default_factory=Communication)


def model_pass(
    model: Module,
    lossfunc: Module,
    loader: Iterable,
    curvature: Curvature,
    mc_samples: int,
    seed: int | None,
    progress_bar: bool,
    process_group: object | None,
    owner: str,
) -> DataPass:
    """Return the :class:`DataPass` of a model and loss over ``loader``, collected by BackPACK.

    Raises:
        ValueError: For a loss without ``reduction`` ``"mean"``/``"sum"`` or a target
            BackPACK's route does not take.
    """
    reduction = Reduction.parse(getattr(lossfunc, "reduction", None), "lossfunc.reduction")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return DataPass(
        BackPACKCollector(model, lossfunc, curvature, mc_samples),
        loader,
        params,
        curvature=curvature,
        reduction=reduction,
        seed=seed,
        progress_bar=progress_bar,
        process_group=process_group,
        owner=owner,
    )


def optimal_factors(
    model: Module,
    lossfunc: Module,
    loader: Iterable,
    *,
    curvature: Curvature | str = Curvature.GGN,
    mc_samples: int = 1,
    init: dict[str, Tensor] | None = None,
    tol: float = DEFAULT_OPTIMAL_TOL,
    max_passes: int = DEFAULT_MAX_PASSES,
    store_terms: bool | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    seed: int | None = None,
    progress_bar: bool = False,
    process_group: object | None = None,
    exact: bool | None = None,
) -> OptimalFactors:
    """Frobenius-optimal K-FOC factors of a whole data set (docs/conventions.md §4, ``"optimal"``).

    For every trainable weight, the ``L_out ⊗ R_in`` closest to the data-set block of
    the GGN (``curvature="ggn"``, the ``KFOCExact`` target) or Monte-Carlo Fisher
    (``"mc"``, the ``KFOC`` target) for the loss as ``lossfunc`` reduces it:
    ``Σ_p F_p`` for ``reduction="sum"``, the data-set mean ``Σ_p n_p F_p / N`` for
    ``"mean"``. It is the lower bound for ``KFOCAccumulator``'s ``"approx"`` and
    ``"running"``. Biases get their exact block. The model and loss are extended with
    BackPACK only while the function runs; ``.grad`` of the parameters is left as it
    was::

        result = optimal_factors(model, torch.nn.CrossEntropyLoss(), loader)
        L, R = result.factors["0.weight"]

    Args:
        model: The model (only ``Linear``/``Conv1d``/``Conv2d``/``Conv3d`` layers may
            have trainable parameters).
        lossfunc: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` ``"mean"`` or ``"sum"``.
        loader: Re-iterable batches ``(X, y)`` of tensors (e.g. a ``DataLoader``).
        curvature: ``"ggn"`` (exact GGN, default) or ``"mc"`` (Monte-Carlo Fisher).
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
        init: Optional warm start of the left factor per weight name (default: the
            running aggregate of the per-batch optima).
        tol: Tolerance of the power method (change of the unit-norm left factor).
        max_passes: Cap on iterations (stored terms) or data passes (streaming).
        store_terms: ``True``/``False`` to force keeping the per-sample terms in
            memory or streaming over the data; ``None`` keeps them while they fit
            into ``max_memory`` bytes.
        max_memory: Byte budget for stored terms.
        seed: Base seed of the Monte-Carlo labels (default: drawn from torch's global
            generator, rank 0's in a distributed fit); rank ``r``'s batch ``i`` uses
            ``seed + i + r·2³²`` in every pass.
        progress_bar: Show tqdm progress bars.
        process_group: Under ``torch.distributed``, each rank passes its shard as
            ``loader`` and all ranks receive the optimum of the union of the shards
            (default group: the whole world when initialised).
        exact: Deprecated spelling of ``curvature`` (``True``: ``"ggn"``).

    Returns:
        :class:`OptimalFactors`; ``.factors`` maps parameter names to ``[L, R]`` /
        ``[B]``.

    Raises:
        ValueError: For a loss without ``reduction`` ``"mean"``/``"sum"``, dict-like
            batches, an empty loader or invalid options.
        NotImplementedError: For a trainable layer K-FOC does not support.
        DistributedFitError: On every rank, when one rank failed during the fit.
    """
    approximation = KFOCFactors(Aggregation.OPTIMAL, tol, max_passes, store_terms, max_memory)
    approximation.init = {
        name: (value[0] if isinstance(value, (list, tuple)) else value)
        for name, value in (init or {}).items()
    }
    data = model_pass(
        model,
        lossfunc,
        loader,
        KFOCTerms.check_curvature(curvature, exact),
        mc_samples,
        seed,
        progress_bar,
        process_group,
        "optimal_factors",
    )
    fitted = approximation.fit(data)
    factors = {name: list(block.kfacs) for name, block in fitted.blocks.items()}
    return OptimalFactors(
        factors,
        fitted.loss,
        fitted.num_samples,
        fitted.passes,
        fitted.iterations,
        fitted.converged,
        fitted.stored,
        data.communication,
    )


def eigenvalue_correction(
    model: Module,
    lossfunc: Module,
    loader: Iterable,
    factors: dict[str, list[Tensor]],
    *,
    curvature: Curvature | str = Curvature.GGN,
    mc_samples: int = 1,
    seed: int | None = None,
    progress_bar: bool = False,
    process_group: object | None = None,
    exact: bool | None = None,
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
        factors: ``[L_out, R_in]`` per weight name; biases' ``[B]`` are skipped.
        curvature: ``"ggn"`` (exact GGN, default) or ``"mc"`` (Monte-Carlo Fisher).
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
        seed: Base seed of the Monte-Carlo labels (required for the Monte-Carlo
            Fisher): pass the one given to :func:`optimal_factors` so that ``S``
            belongs to the Fisher the factors were fitted to.
        progress_bar: Show a tqdm progress bar.
        process_group: Under ``torch.distributed``, each rank passes its shard and
            all receive the sums over every rank (default: the world when initialised).
        exact: Deprecated spelling of ``curvature`` (``True``: ``"ggn"``).

    Returns:
        Per weight name an :class:`~kfoc_backpack.blocks.EigenCorrected`.

    Raises:
        ValueError: For a loss without ``reduction`` ``"mean"``/``"sum"``, a
            Monte-Carlo pass without ``seed``, dict-like batches, or factors that are
            not those of a trainable weight of the model.
    """
    target = KFOCTerms.check_curvature(curvature, exact)
    if target.stochastic and seed is None:
        raise ValueError(
            "eigenvalue_correction: a Monte-Carlo pass needs the seed of the fit whose "
            "factors it corrects (pass seed=, the one given to optimal_factors)."
        )
    data = model_pass(
        model,
        lossfunc,
        loader,
        target,
        mc_samples,
        seed,
        progress_bar,
        process_group,
        "eigenvalue_correction",
    )
    zeros = data.zero_blocks()
    bases = {}
    for name, value in factors.items():
        if name not in zeros:
            raise ValueError(
                f"eigenvalue_correction: {name!r} is not a trainable parameter of a "
                "supported layer of the model."
            )
        block = zeros[name].from_kfacs(value, f"eigenvalue_correction: {name!r}")
        basis = block.corrected_basis(f"eigenvalue_correction: {name!r}")
        if basis is not None:  # a bias's exact block has nothing to correct
            bases[name] = basis
    return corrected_blocks(data, bases)
