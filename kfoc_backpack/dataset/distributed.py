r"""Cross-rank reductions of a data-set fit under ``torch.distributed`` (docs/conventions.md §8).

Each rank iterates over its own shard of the data. Only factor-sized tensors and
scalars cross ranks, never per-sample terms, and every payload of a step travels in one
bucket (all layers together). Each synchronisation point first exchanges a status word,
so an exception on one rank ends the fit on every rank with a
:class:`DistributedFitError` naming the failing rank instead of leaving the others
waiting in a collective.

Index conventions: ``W`` ranks in the group, ``r`` a rank, ``M``/``N_in`` sizes of a
weight's left and right factors.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch import distributed as dist

from kfoc_backpack.blocks import Block, BlockSum

RANK_SEED_STRIDE = 1 << 32
"""Rank ``r``'s batch ``i`` draws Monte-Carlo labels with seed ``seed + i + r·stride``."""


class DistributedFitError(RuntimeError):
    """Raised on every rank when a rank of a distributed fit failed."""


@dataclass
class Communication:
    """What one rank sent in a fit: collectives and payload bytes.

    Attributes:
        collectives: Number of collective calls (status words included).
        bytes: Sum of the payloads this rank contributed (a ring all-reduce moves about
            ``2 (W − 1)/W`` times its payload per rank, an all-gather ``W − 1`` times).
    """

    collectives: int = 0
    bytes: int = 0


def resolve_group(process_group: object | None) -> object | None:
    """Return the group a fit reduces over, or ``None`` for a fit in one process.

    Args:
        process_group: A ``torch.distributed`` group, or ``None`` for the default
            group when ``torch.distributed`` is initialised.

    Raises:
        ValueError: For a group given while ``torch.distributed`` is not initialised,
            or one this process is not a member of.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if process_group is not None:
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (or pass process_group=None)."
            )
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError("This process is not a member of the given process_group.")
    return group if dist.get_world_size(group) > 1 else None


class Reducer:
    """The collectives of one fit over the ranks of a group; a no-op in one process.

    Args:
        process_group: See :func:`resolve_group`.
    """

    def __init__(self, process_group: object | None = None):
        self.group = resolve_group(process_group)
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.world = dist.get_world_size(self.group) if self.group is not None else 1
        self.log = Communication()

    @classmethod
    def of(cls, process_group: object | None) -> Reducer:
        """Return the given :class:`Reducer` (its log continues), or one over ``process_group``."""
        return process_group if isinstance(process_group, Reducer) else cls(process_group)

    @property
    def active(self) -> bool:
        """Whether there are other ranks to combine with."""
        return self.group is not None

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _bucket(self, tensors: Sequence[Tensor]) -> Tensor:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        self.log.collectives += 1
        self.log.bytes += flat.numel() * flat.element_size()
        return flat.to(self._device())

    @staticmethod
    def _unbucket(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        parts = flat.split([t.numel() for t in like])
        return [p.reshape(t.shape).to(t.device, t.dtype) for p, t in zip(parts, like)]

    def all_reduce(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sum ``tensors`` (same shapes on every rank) over the ranks, in one collective."""
        if not self.active or not tensors:
            return list(tensors)
        flat = self._bucket(tensors)
        dist.all_reduce(flat, group=self.group)
        return self._unbucket(flat, tensors)

    def all_gather(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Every rank's ``tensors`` (same shapes on every rank), one collective."""
        if not self.active:
            return [list(tensors)]
        flat = self._bucket(tensors)
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat, group=self.group)
        return [self._unbucket(g, tensors) for g in gathered]

    def check(self, error: BaseException | None, where: str) -> None:
        """Exchange the ranks' status; raise on every rank if any rank failed.

        Raises:
            DistributedFitError: Naming the failing ranks and their errors (chained
                from this rank's own error, if it failed).
        """
        if not self.active:
            if error is not None:
                raise error
            return
        status = torch.zeros(self.world, dtype=torch.int32)
        status[self.rank] = int(error is not None)
        (status,) = self.all_reduce([status])
        failed = status.nonzero().flatten().tolist()
        if not failed:
            return
        own = None if error is None else f"{type(error).__name__}: {error}"
        messages: list[str | None] = [None] * self.world
        self.log.collectives += 1
        dist.all_gather_object(messages, own, group=self.group)
        details = "; ".join(f"rank {r} raised {messages[r]}" for r in failed)
        raise DistributedFitError(
            f"K-FOC fit over {self.world} ranks stopped during {where}: {details}."
        ) from error

    @contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Run local work; afterwards every rank learns whether any rank failed in it."""
        if not self.active:
            yield
            return
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by check()
            self.check(exc, where)
        self.check(None, where)

    def check_same_params(self, params: Mapping[str, Tensor], owner: str) -> None:
        """Raise on every rank unless all ranks fit parameters of equal names and shapes.

        Raises:
            ValueError: Naming the first rank whose parameters differ from rank 0's.
        """
        if not self.active:
            return
        text = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in params.items())
        code = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)
        codes = [c[0].item() for (c,) in self.all_gather([code])]
        if len(set(codes)) == 1:
            return
        texts: list[str] = [""] * self.world
        self.log.collectives += 1
        dist.all_gather_object(texts, text, group=self.group)
        other = next(r for r, c in enumerate(codes) if c != codes[0])
        raise ValueError(
            f"{owner}: the ranks fit different models: rank {other} has trainable "
            f"parameters [{texts[other]}], rank 0 has [{texts[0]}]. Every rank must hold "
            "the same model."
        )

    def shared_seed(self, seed: int | None) -> int:
        """``seed``, or one drawn from torch's global generator, as rank 0 has it."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        if not self.active:
            return int(seed)
        value = torch.tensor([seed if self.rank == 0 else 0], dtype=torch.int64)
        return int(self.all_reduce([value])[0].item())

    def batch_seed(self, seed: int, index: int) -> int:
        """Seed of the Monte-Carlo labels of this rank's batch ``index``."""
        return seed + index + self.rank * RANK_SEED_STRIDE

    @contextmanager
    def seeded(self, seed: int, index: int, params: Iterable[Tensor] = ()) -> Iterator[None]:
        """Draw this rank's batch ``index`` under its own seed; the global RNG is untouched.

        Args:
            seed: The fit's shared base seed.
            index: The batch's index in this rank's loader.
            params: The model's parameters: the CUDA devices they live on have their
                generators saved and restored as well as the CPU's.
        """
        devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.batch_seed(seed, index))
            yield

    def sum_scalars(self, values: Sequence[float | Tensor]) -> list[float]:
        """Sum host scalars over the ranks (float64, one collective)."""
        local = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return self.all_reduce([local])[0].tolist()


def reduce_sums(sums: Mapping[str, BlockSum], reducer: Reducer) -> dict[str, tuple[Block, int]]:
    """Combine every rank's per-parameter sums: one all-gather, one all-reduce, one all-gather.

    The one place a fit's data-set sums cross ranks. Each rank's sums list the same
    parameters in the same order; a parameter that no batch of a rank used contributes
    zeros (its sum's zero block). The numbers of inputs and the sums' presence travel in
    one all-gather; every sum's :meth:`~kfoc_backpack.blocks.BlockSum.summed` parts (bias
    blocks, ``approx``'s factor sums, corrected eigenvalues) in one all-reduce; every
    sum's :meth:`~kfoc_backpack.blocks.BlockSum.gathered` parts (``running``'s products)
    in one all-gather.

    Args:
        sums: This rank's sums by parameter name.
        reducer: The ranks to combine (inactive: this process's sums as they are).

    Returns:
        Per parameter with data on some rank: its block over all ranks and the number of
        inputs behind it.
    """
    names = list(sums)
    if not reducer.active:
        return {n: (s.result(), s.num_samples) for n, s in sums.items() if not s.empty}
    counts = torch.tensor([float(sums[n].num_samples) for n in names], dtype=torch.float64)
    flags = torch.tensor([float(not sums[n].empty) for n in names], dtype=torch.float64)
    gathered = reducer.all_gather([counts, flags])
    all_counts = torch.stack([g[0] for g in gathered])  # [W, P]
    present = torch.stack([g[1] for g in gathered]).sum(0) > 0
    summed_parts = {n: sums[n].summed() for n in names}
    summed = iter(reducer.all_reduce([t for n in names for t in summed_parts[n]]))
    gathered_parts = {n: sums[n].gathered() for n in names}
    flat = [t for n in names for t in gathered_parts[n]]
    per_rank = [iter(parts) for parts in reducer.all_gather(flat)] if flat else []
    result = {}
    for index, name in enumerate(names):
        own = [next(summed) for _ in summed_parts[name]]
        ranks = [[next(parts) for _ in gathered_parts[name]] for parts in per_rank]
        column = all_counts[:, index]
        if bool(present[index]):
            result[name] = (sums[name].combine(own, ranks, column), int(column.sum()))
    return result
