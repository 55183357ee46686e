r"""The passes of one fit over its data: the one loop over a loader in the package.

Every approximation reads the data through a :class:`DataPass` — K-FOC with each
aggregation (one pass for ``approx``/``running``, one plus one per power iteration for a
streamed ``optimal``), K-FAC's factors, the eigenvalue correction's pass — and so does
every data-set function for BackPACK users. The pass owns what all of them share:

* splitting a loader's batches into model input and targets (``split``);
* the Monte-Carlo seed policy (below);
* the batch's weight in the data-set sum (:class:`~kfoc_backpack.enums.Reduction`);
* the combination over ``torch.distributed`` ranks (:meth:`DataPass.combine`,
  :meth:`DataPass.sum_over_ranks`, :meth:`DataPass.totals`), with a failure on one rank
  reported on every rank (:class:`~kfoc_backpack.dataset.distributed.DistributedFitError`);
* the progress bar.

**Seed policy** (docs/conventions.md §4, §8). A target that draws labels (the
Monte-Carlo Fisher) gets one base seed ``s`` per fit — ``seed`` if given, else one drawn
from torch's global generator when the pass is made (rank 0's, shared with the other
ranks) — and rank ``r``'s batch ``i`` draws its labels under ``s + i + r·2³²`` in every
pass. So every pass of one fit sees the same labels for the same batch, on one process
or many, and a fit is reproducible under ``torch.manual_seed``; the global generator
is left as it was after the base seed's draw. Exact targets draw nothing.

Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext

import torch
import tqdm
from torch import Tensor
from torch.nn import Parameter

from kfoc_backpack.blocks import Block, BlockSum
from kfoc_backpack.collect.batch import BatchQuantities, Collector, split_batch
from kfoc_backpack.dataset.distributed import Communication, Reducer, reduce_sums
from kfoc_backpack.enums import Curvature, Reduction

BatchSplitter = Callable[[object], tuple[object, Tensor]]
"""``split(batch) -> (X, y)``: model input and targets of a batch from the loader."""

Visit = Callable[[BatchQuantities, float], None]
"""``visit(batch, scale)``: one batch's quantities and its weight ``s_p`` in the sum."""


class DataPass:
    """The passes of one fit over a loader (see the module docstring).

    Args:
        collect: The collection route: one batch's :class:`BatchQuantities`, and every
            trainable parameter's zero block.
        loader: Re-iterable batches (under ``torch.distributed``, this rank's shard).
        params: The trainable parameters by name, the same on every rank (checked).
        split: ``split(batch) -> (X, y)`` (default: pairs of tensors).
        curvature: The target; :attr:`~kfoc_backpack.enums.Curvature.MC` draws labels
            and so seeds every batch.
        reduction: How the loss was reduced over each batch.
        seed: The base seed of the Monte-Carlo labels (default: drawn, see above).
        progress_bar: Show a tqdm progress bar per pass.
        process_group: The ``torch.distributed`` group to combine over (default: the
            whole world when initialised, else none), or a
            :class:`~kfoc_backpack.dataset.distributed.Reducer` whose log continues.
        owner: Name used in error messages.

    Raises:
        ValueError: For an unknown curvature or reduction, or ranks holding different
            parameters (on every rank).
    """

    def __init__(
        self,
        collect: Collector,
        loader: Iterable,
        params: Mapping[str, Parameter],
        *,
        split: BatchSplitter | None = None,
        curvature: Curvature | str = Curvature.GGN,
        reduction: Reduction | str = Reduction.SUM,
        seed: int | None = None,
        progress_bar: bool = False,
        process_group: object | None = None,
        owner: str = "K-FOC",
    ):
        self.collect, self.loader, self.params = collect, loader, dict(params)
        self.split = split_batch if split is None else split
        self.curvature = Curvature.parse(curvature, "curvature")
        self.reduction = Reduction.parse(reduction, "reduction")
        self.progress_bar, self.owner = progress_bar, owner
        self.reducer = Reducer.of(process_group)
        self.reducer.check_same_params(self.params, owner)
        self.seed = self.reducer.shared_seed(seed) if self.curvature.stochastic else None
        self.passes = 0
        self._zero_blocks: dict[str, Block] | None = None
        self._keep_bytes: int | None = None
        self._kept: _Kept | None = None

    @property
    def communication(self) -> Communication:
        """Collectives and bytes this rank sent so far (zero in one process)."""
        return self.reducer.log

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to combine with."""
        return self.reducer.active

    def zero_blocks(self) -> dict[str, Block]:
        """Every trainable parameter's zero block (the collector's), in ``params``' order."""
        if self._zero_blocks is None:
            blocks = self.collect.zero_blocks()
            self._zero_blocks = {name: blocks[name] for name in self.params if name in blocks}
        return self._zero_blocks

    def run(
        self, visit: Visit, description: str, *, with_kfac: bool = False
    ) -> tuple[Tensor | float, int]:
        """One pass over the loader: ``visit(batch, scale)`` per batch, under its seed.

        A failure on any rank, inside the collection or inside ``visit``, raises on
        every rank once the pass ends.

        Args:
            visit: Called with every batch's quantities and its weight ``s_p``.
            description: What the pass is for (progress bar and error messages).
            with_kfac: Collect K-FAC's factors of the samples as well.

        Returns:
            This rank's summed loss and number of inputs of the pass (all ranks':
            :meth:`totals`).
        """
        budget, self._keep_bytes, self._kept = self._keep_bytes, None, None
        kept, totals = _Kept(), _Totals(self.reduction)
        last: tuple[int, BatchQuantities] | None = None

        def collect(X: object, y: Tensor) -> None:
            nonlocal last
            last = None  # not the pass's last batch: dropped before the next is collected
            batch = self.collect(X, y, with_kfac=with_kfac)
            index = kept.num_batches
            kept.num_batches += 1
            if budget is not None:
                size = batch.nbytes()
                if kept.nbytes + size <= budget:
                    kept.batches[index] = batch
                    kept.nbytes += size
                else:
                    last = (index, batch)
            totals.add(batch, visit)

        self.each(collect, description)
        if budget is not None:
            if last is not None:
                kept.batches[last[0]] = last[1]
            self._kept = kept
        return totals.loss, totals.num_samples

    def each(self, visit: Callable[[object, Tensor], None], description: str) -> None:
        """One pass over the loader: ``visit(X, y)`` per batch, under the batch's seed.

        The loop every pass makes (:meth:`run`'s, and passes that need the batches
        themselves, e.g. the per-sample gradients of :mod:`kfoc_backpack.influence`):
        the batch split into input and targets, the progress bar, the Monte-Carlo seed,
        a failure on any rank raised on every rank once the pass ends.
        """
        where = f"{description.strip('[]')} (pass {self.passes + 1} over the data)"
        with self.reducer.guard(where):
            self._loop(lambda index, X, y: visit(X, y), description)

    def _loop(self, visit: Callable[[int, object, Tensor], None], description: str) -> None:
        """Loop as :meth:`each` does, without its guard: ``visit(index, X, y)`` per batch."""
        self.passes += 1
        batches = tqdm.tqdm(self.loader, desc=description, disable=not self.progress_bar)
        for index, raw in enumerate(batches):
            X, y = self.split(raw)
            with self._seeded(index):
                visit(index, X, y)

    def keep(self, max_bytes: int) -> None:
        """Keep the next pass's batches for one :meth:`revisit`.

        Its batches are kept in order while their per-sample terms fit in ``max_bytes``
        (:meth:`BatchQuantities.nbytes
        <kfoc_backpack.collect.batch.BatchQuantities.nbytes>` summed), and its last
        batch in any case: the pass held that batch's terms while it visited them, so
        keeping them until the pass is revisited raises no peak. The others are read
        again by the revisit.
        """
        self._keep_bytes = max(int(max_bytes), 0)

    def revisit(self, visit: Visit, description: str) -> tuple[Tensor | float, int]:
        """Visit every batch of the pass :meth:`keep` kept, reading only the others again.

        The kept batches first (each dropped once visited), then — unless all were
        kept — a pass over the loader that collects the other batches under their
        own Monte-Carlo seeds: the same quantities under the same labels as the kept
        pass, so the result is that of a pass over the data. A kept pass is revisited
        once; without one (or after its revisit) this is :meth:`run`.

        Returns:
            As :meth:`run`.
        """
        kept, self._kept = self._kept, None
        if kept is None:
            return self.run(visit, description)
        totals = _Totals(self.reduction)
        in_memory = frozenset(kept.batches)
        unread = kept.num_batches - len(in_memory)
        where = "the kept pass" if unread == 0 else f"pass {self.passes + 1} over the data"

        def read(index: int, X: object, y: Tensor) -> None:
            if index not in in_memory:
                totals.add(self.collect(X, y), visit)

        with self.reducer.guard(f"{description.strip('[]')} ({where})"):
            for index in sorted(in_memory):
                totals.add(kept.batches.pop(index), visit)
            if unread > 0:
                self._loop(read, description)
        return totals.loss, totals.num_samples

    def _seeded(self, index: int):
        if self.seed is None:
            return nullcontext()
        return self.reducer.seeded(self.seed, index, self.params.values())

    def totals(self, loss: Tensor | float, num_samples: int) -> tuple[Tensor, int]:
        """Return a pass's ``(loss, inputs)`` (:meth:`run`'s) summed over the ranks.

        One collective in a distributed fit.

        The loss is a tensor in the parameters' dtype when combined over ranks.
        """
        if not self.reducer.active:
            return torch.as_tensor(loss), num_samples
        loss, num_samples = self.reducer.sum_scalars([loss, num_samples])
        like = next(iter(self.params.values()))
        return torch.tensor(loss, dtype=like.dtype), int(num_samples)

    def combine(self, sums: Mapping[str, BlockSum]) -> dict[str, tuple[Block, int]]:
        """Every parameter's sum over the ranks (see :func:`reduce_sums`)."""
        return reduce_sums(sums, self.reducer)

    def sum_over_ranks(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sum same-shaped tensors over the ranks, in one collective."""
        return self.reducer.all_reduce(tensors)

    def guard(self, where: str):
        """Local work after which every rank learns whether any rank failed in it."""
        return self.reducer.guard(where)


class _Kept:
    """The batches a pass kept (by index), its number of batches, and their bytes."""

    def __init__(self) -> None:
        self.batches: dict[int, BatchQuantities] = {}
        self.num_batches = 0
        self.nbytes = 0


class _Totals:
    """A pass's summed loss and number of inputs, as it visits each batch."""

    def __init__(self, reduction: Reduction) -> None:
        self.reduction = reduction
        self.loss: Tensor | float = 0.0
        self.num_samples = 0

    def add(self, batch: BatchQuantities, visit: Visit) -> None:
        """Count ``batch`` and visit it with its weight ``s_p``."""
        self.loss = self.loss + batch.loss
        self.num_samples += batch.num_samples
        visit(batch, self.reduction.batch_scale(batch.num_samples))
