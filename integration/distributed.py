"""K-FOC Laplace fitted by several processes: agreement with one process, and wall time.

Run with ``torchrun``; every process fits ``KFOCLaplace`` on LeNet-5 over its shard of
the 5,000-image MNIST subset (a ``DistributedSampler`` without shuffling), and the ranks
combine their shards (docs/conventions.md §8)::

    torchrun --standalone --nproc_per_node=2 integration/distributed.py
    torchrun --standalone --nproc_per_node=2 integration/distributed.py --quick

For each aggregation, rank 0 first fits alone on the batches of all shards (the other
ranks wait), then all ranks fit together; it prints the relative difference of every layer's
Kronecker product ``‖L₁ ⊗ R₁ − L_W ⊗ R_W‖_F / ‖L₁ ⊗ R₁‖_F`` between the two fits, the
collectives and bytes each rank sent, and the wall time of both fits (medians over
``--repeats``); for ``approx`` and ``running`` also the largest difference of both fits to
the one-process ``optimal`` (when it is among the aggregations). The one-process fit uses
every CPU core, each of the ``W`` processes its share. The same code uses NCCL on GPUs
(``--device cuda``: one GPU per process) and gloo on CPUs. Started without ``torchrun`` it
runs as a world of one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import cli
import torch
from data import load_mnist
from models import lenet5
from precision import product_difference
from torch import distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from kfoc_backpack import KFOCLaplace

AGGREGATIONS = ("optimal", "approx", "running")


def build_parser() -> argparse.ArgumentParser:
    """Return the command line of this script."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    parser.add_argument(
        "--aggregations", nargs="+", choices=AGGREGATIONS, default=list(AGGREGATIONS),
        help="aggregations to fit",
    )  # fmt: skip
    parser.add_argument("--samples", type=cli.positive_int, default=5000, help="MNIST images used")
    parser.add_argument("--batch-size", type=cli.positive_int, default=128, help="batch size")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed fits per mode")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    parser.add_argument("--quick", action="store_true", help="500 images, one repeat")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser


def setup(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes (or none); return ``(rank, world)``."""
    if "RANK" not in os.environ:
        return 0, 1
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def fit(model, loader, aggregation: str, group) -> tuple[KFOCLaplace, float]:
    """One timed fit (synchronised across the group's ranks)."""
    la = KFOCLaplace(model, "classification", aggregation=aggregation, process_group=group)
    if group is not None:
        dist.barrier(group)
    start = time.perf_counter()
    la.fit(loader)
    if group is not None:
        dist.barrier(group)
    return la, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    samples, repeats = (500, 1) if args.quick else (args.samples, args.repeats)
    rank, world = setup(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else "cpu"
    data = load_mnist().subset(samples)
    dataset = TensorDataset(data.inputs.to(device), data.targets.to(device))
    torch.manual_seed(0)
    model = lenet5().to(device)
    cores = os.cpu_count() or 1
    alone = dist.new_group([0]) if world > 1 else None  # rank 0 by itself: one process
    shards = [
        DataLoader(dataset, args.batch_size, sampler=DistributedSampler(dataset, world, r, False))
        for r in range(world)
    ]
    shard = shards[rank]
    full = [batch for loader in shards for batch in loader]  # the same batches, in one process
    results = {"world": world, "samples": samples, "device": str(device), "rows": []}
    optimum = None  # the one-process "optimal" fit, to measure the others against
    for aggregation in args.aggregations:
        times_one, times_all = [], []
        for _ in range(repeats):
            if rank == 0:
                torch.set_num_threads(cores)
                one, seconds = fit(model, full, aggregation, alone)
                times_one.append(seconds)
            if world > 1:
                dist.barrier()
            torch.set_num_threads(max(1, cores // world))
            together, seconds = fit(model, shard, aggregation, None)
            times_all.append(seconds)
        if rank == 0:
            diffs = [
                product_difference(a, b) for a, b in zip(one.H_facs.kfacs, together.H_facs.kfacs)
            ]
            log = together.communication
            if aggregation == "optimal":
                optimum = one
            gap = {}
            if optimum is not None and aggregation != "optimal":
                for label, fitted in (("1", one), (str(world), together)):
                    gap[label] = max(
                        product_difference(a, b)
                        for a, b in zip(optimum.H_facs.kfacs, fitted.H_facs.kfacs)
                    )
            row = {
                "aggregation": aggregation,
                "max_relative_difference": max(diffs),
                "per_layer": diffs,
                "n_data": [one.n_data, together.n_data],
                "collectives": log.collectives if log else 0,
                "bytes": log.bytes if log else 0,
                "seconds_1": statistics.median(times_one),
                f"seconds_{world}": statistics.median(times_all),
                "max_difference_to_optimal": gap,
            }
            results["rows"].append(row)
            print(
                f"{aggregation:>8}: max relative difference {max(diffs):.2e} "
                f"(layers: {', '.join(f'{d:.1e}' for d in diffs)}); n_data {one.n_data} / "
                f"{together.n_data}; {row['collectives']} collectives, {row['bytes']:,} bytes "
                f"per rank; wall time 1 process {row['seconds_1']:.2f} s, {world} processes "
                f"{row[f'seconds_{world}']:.2f} s",
                flush=True,
            )
            for label, value in gap.items():
                print(
                    f"{'':>10}max relative difference to one process's optimal, {label} "
                    f"process(es): {value:.2e}",
                    flush=True,
                )
    if rank == 0 and args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
