r"""The eigenvalue correction over a data set: one pass once the bases are known.

For each weight with factors fitted over the data (K-FOC's, K-FAC's), the corrected
eigenvalues of the data set's block in the factors' eigenbasis ``U_L ⊗ U_R`` are the
sum over batches (and ``torch.distributed`` ranks) of each batch's
:func:`~kfoc_backpack.solver.correction.basis_diagonal`:

.. math::
    S = Σ_p s_p \, S_p , \qquad S_p[i, j] = Σ_{k ∈ p} ((U_Lᵀ X_k U_R)[i, j])^2 ,

with ``s_p = 1`` for batches of a summed loss and ``s_p = n_p / N`` for a mean
reduction (as :func:`~kfoc_backpack.dataset.solve_optimal`'s target). Sums are exact
under any split of the data into batches and ranks. Index conventions:
:mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from collections.abc import Iterable

import tqdm
from torch import Tensor
from torch.nn import Parameter

from kfoc_backpack.collect.layer_terms import LayerTerms
from kfoc_backpack.dataset.distributed import Reducer
from kfoc_backpack.dataset.optimal import split_batch
from kfoc_backpack.dataset.options import REDUCTIONS, check_choice
from kfoc_backpack.dataset.power import BatchCollector, BatchSplitter
from kfoc_backpack.solver.correction import basis_diagonal


def corrected_eigenvalues(
    collect: BatchCollector,
    bases: dict[str, tuple[Tensor, Tensor]],
    params: dict[str, Parameter],
    loader: Iterable,
    *,
    split: BatchSplitter | None = None,
    stochastic: bool = False,
    seed: int | None = None,
    reduction: str = "sum",
    progress_bar: bool = False,
    process_group: object | None = None,
) -> dict[str, Tensor]:
    """Corrected eigenvalues ``S`` (``[M, N]``) of each weight over the whole data set.

    Args:
        collect: ``collect(X, y) -> BatchQuantities`` (the hook route's
            :class:`~kfoc_backpack.collect.hooks.TermCollector` or a backend's).
        bases: ``(U_L, U_R)`` per weight name (``[M, M]``, ``[N, N]``), the same on
            every rank.
        params: The model's parameters by name (their devices seed Monte-Carlo draws).
        loader: Batches (this rank's shard).
        split: ``split(batch) -> (X, y)`` (default: pairs of tensors).
        stochastic: Whether ``collect`` draws labels (Monte-Carlo Fisher): every batch
            is then collected under the fit's per-batch seed, so ``S`` belongs to the
            Fisher the factors were fitted to.
        seed: That fit's shared base seed (required when ``stochastic``).
        reduction: ``"sum"`` (``Σ_p S_p``) or ``"mean"`` (``Σ_p n_p S_p / N``).
        progress_bar: Show a tqdm progress bar.
        process_group: The ``torch.distributed`` group to sum over (default: the world
            when initialised), or a :class:`~kfoc_backpack.dataset.distributed.Reducer`.

    Returns:
        ``S`` per name of ``bases``, in the dtype of the bases.

    Raises:
        ValueError: For an unknown reduction, a stochastic pass without its seed, or a
            name of ``bases`` whose quantity is not a weight's :class:`LayerTerms`.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    if stochastic and seed is None:
        raise ValueError("corrected_eigenvalues: a Monte-Carlo pass needs the fit's seed.")
    split = split_batch if split is None else split
    reducer = Reducer.of(process_group)
    totals = {name: left.new_zeros(len(left), len(right)) for name, (left, right) in bases.items()}
    num_samples = 0
    batches = tqdm.tqdm(loader, desc="[eigenvalue correction]", disable=not progress_bar)
    with reducer.guard("the eigenvalue correction's pass over the data"):
        for index, batch in enumerate(batches):
            X, y = split(batch)
            if stochastic:
                with reducer.seeded(seed, index, params.values()):
                    result = collect(X, y)
            else:
                result = collect(X, y)
            num_samples += result.num_samples
            scale = float(result.num_samples) if reduction == "mean" else 1.0
            for name, (left, right) in bases.items():
                value = result.quantities.get(name)
                if value is None:
                    continue
                if not isinstance(value, LayerTerms):
                    raise ValueError(f"corrected_eigenvalues: {name!r} is not a weight.")
                diagonal = basis_diagonal(value.terms, left, right).to(totals[name].dtype)
                totals[name].add_(diagonal, alpha=scale)
    names = list(totals)
    if reducer.active:
        summed = reducer.all_reduce([totals[name] for name in names])
        totals = dict(zip(names, summed))
        (num_samples,) = reducer.sum_scalars([num_samples])
    if reduction == "mean" and num_samples > 0:
        totals = {name: total / num_samples for name, total in totals.items()}
    return totals  # a weight no batch used keeps S = 0: its block is zero
