"""Pairwise influence scores on LeNet-5: this package's EK-FAC and EK-FOC against kronfluence's.

The same model (LeNet-5, the MNIST subset), ``--train`` training × ``--test`` test inputs,
the same curvature (the Monte-Carlo Fisher, one label drawn per input: kronfluence's
default), the same damping heuristic and batch size. Timed from the model to the
``[test, train]`` score matrix, in two phases — the curvature (kronfluence's
``fit_all_factors``; this package's ``Laplace.fit``) and the scores (its
``compute_pairwise_scores``; :meth:`kfoc_backpack.Influence.pairwise`) — the methods
interleaved, median over ``--repeats``. kronfluence writes its factors and scores to a
temporary directory, as it does in use. Needs kronfluence (and so torchvision): the
zoo's environment.

Usage::

    python integration/influence_speed.py            # 1000 × 100, 3 repeats
    python integration/influence_speed.py --repeats 5 --out DIR
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import cli
import torch
from data import load_dataset
from influence_study.ensembles import per_example_loss
from influence_study.lds import kronfluence_ekfac
from laplace import Laplace
from models import lenet5
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import kfoc_backpack  # noqa: F401 - registers the structures
from kfoc_backpack import Influence

METHODS = ("kronfluence_ekfac", "ekfac", "ekfoc")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--train", type=cli.positive_int, default=1000, help="training inputs")
    parser.add_argument("--test", type=cli.positive_int, default=100, help="test inputs")
    parser.add_argument("--batch", type=cli.positive_int, default=64, help="batch size")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed runs")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("results/influence_speed"))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def ours(model: nn.Module, train, test, structure: str, batch: int) -> tuple[float, float]:
    """``(curvature seconds, scores seconds)`` of this package's pipeline."""
    train_loader = DataLoader(train, batch_size=batch)
    start = time.perf_counter()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend_kwargs={"stochastic": True},
    )
    la.fit(train_loader)
    influence = Influence.from_laplace(la)
    middle = time.perf_counter()
    influence.pairwise(train_loader, DataLoader(test, batch_size=batch))
    return middle - start, time.perf_counter() - middle


def kronfluence_pipeline(model: nn.Module, train, test, batch: int) -> tuple[float, float]:
    """``(factors seconds, scores seconds)`` of kronfluence 1.0.1's EK-FAC, its defaults."""

    def loss(output: Tensor, y: Tensor) -> Tensor:
        return per_example_loss("classification", output, y)

    _, factors, scores = kronfluence_ekfac(model, "classification", loss, train, test, batch)
    return factors, scores


def table(result: dict) -> str:
    """Return the markdown table of a run's result."""
    settings = result["settings"]
    lines = [
        f"Pairwise scores, LeNet-5, {settings['train']} train × {settings['test']} test, "
        f"batch {settings['batch']}, {result['machine']['threads']} thread(s), "
        f"median of {settings['repeats']}",
        "",
        "| method | curvature s | scores s | total s | total / kronfluence |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['curvature_s']:.2f} | {row['scores_s']:.2f} "
            f"| {row['total_s']:.2f} | {row['total_ratio']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    cli.quiet_library_warnings()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    torch.manual_seed(0)
    model = lenet5().eval()
    X, y = data.inputs, data.targets
    train = TensorDataset(X[: args.train], y[: args.train])
    test = TensorDataset(
        X[args.train : args.train + args.test], y[args.train : args.train + args.test]
    )
    times: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _ in range(args.repeats):
        for method in METHODS:
            if method == "kronfluence_ekfac":
                times[method].append(kronfluence_pipeline(model, train, test, args.batch))
            else:
                times[method].append(ours(model, train, test, method, args.batch))
    rows = []
    for method in METHODS:
        curvature = statistics.median(t[0] for t in times[method])
        scores = statistics.median(t[1] for t in times[method])
        total = statistics.median(sum(t) for t in times[method])
        rows.append(
            {
                "method": method,
                "curvature_s": curvature,
                "scores_s": scores,
                "total_s": total,
                "runs": [list(t) for t in times[method]],
            }
        )
    reference = rows[0]["total_s"]
    for row in rows:
        row["total_ratio"] = row["total_s"] / reference
    result = {
        "command": ("python integration/influence_speed.py " + " ".join(argv or [])).strip(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "settings": {k: getattr(args, k) for k in ("train", "test", "batch", "repeats")},
        "rows": rows,
    }
    cli.write_report(args.out, "influence_speed", result, table(result))
    return result


if __name__ == "__main__":
    main()
