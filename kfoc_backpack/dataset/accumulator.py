r"""``KFOCAccumulator``: BackPACK's per-batch K-FOC factors aggregated over a data set.

Fed after every ``backward`` inside ``with backpack(KFOC())`` (or ``KFOCExact()``), it
adds each parameter's savefield to the parameter's block sum
(:meth:`~kfoc_backpack.blocks.Block.new_sum`: ``"approx"`` or ``"running"`` for the
weights' factors, exact sums for biases) — the sums laplace-torch's fits use — and
combines them over ``torch.distributed`` ranks in the one reduction
(:func:`~kfoc_backpack.dataset.distributed.reduce_sums`). Conventions as for
:mod:`~kfoc_backpack.dataset.fits`.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import Module

from kfoc_backpack.collect.batch import model_zero_blocks
from kfoc_backpack.collect.layer_terms import LayerTerms
from kfoc_backpack.dataset.distributed import Reducer, reduce_sums
from kfoc_backpack.enums import Aggregation, Grouped, Reduction


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
        aggregation: Aggregation | str = Aggregation.RUNNING,
        savefield: str = "kfoc",
        reduction: Reduction | str = Reduction.MEAN,
        process_group: object | None = None,
    ):
        hint = " For the data-set optimum use optimal_factors()."
        self.aggregation = Aggregation.parse(
            aggregation, "aggregation", hint, members=Aggregation.of_factors()
        )
        self.reduction = Reduction.parse(reduction, "reduction")
        self.savefield = savefield
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        # the savefields' layout: a grouped convolution's factors coupled over all rows
        self._zeros = {
            name: zero.with_structure(Grouped.COUPLED)
            for name, zero in model_zero_blocks(model).items()
        }
        self._sums = {name: zero.new_sum(self.aggregation) for name, zero in self._zeros.items()}
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
            ValueError: For a savefield that is not the parameter's ``[L, R]``/``[B]``.
        """
        found = False
        scale = self.reduction.batch_scale(num_samples)
        for name, total in self._sums.items():
            value = getattr(self._params[name], self.savefield, None)
            if value is None:
                continue
            if isinstance(value, LayerTerms):
                raise TypeError(
                    f"'{name}.{self.savefield}' holds per-sample terms (KFOCTerms); "
                    "aggregate those with optimal_factors(), or use KFOC/KFOCExact here."
                )
            block = self._zeros[name].from_kfacs(value, f"'{name}.{self.savefield}'")
            total.add(block, num_samples, scale)
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
        result = {}
        for name, (block, _) in reduce_sums(self._sums, reducer).items():
            if self.reduction is Reduction.MEAN:
                block = block.scaled(1.0 / num_samples)
            result[name] = list(block.kfacs)
        return result
