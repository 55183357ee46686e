"""The basis diagonal's two routes against each other, A/B in one run, at ResNet-18's sizes.

:meth:`~kfoc_backpack.solver.factored.FactoredTerms.diagonal` sums
``Σ_{j,k} X_{j,k} ⊙ X_{j,k}`` (``[M, N]``) for a weight shared over ``T`` positions either
by forming every ``X_{j,k}`` (``formed``) or over position pairs (``pairs``), whichever
:func:`~kfoc_backpack.solver.factored.choose_diagonal_route` counts fewer multiply-adds
for. This script forces each route on random per-sample factors of one
``Conv2d(C, C, 3, padding=1)`` per ResNet-18 stage on 32 × 32 images (``C`` = 64 … 512 at
32² … 4² positions; ``J = 9`` columns of the exact GGN, ``K`` samples) and reports the
medians, interleaved, with the route the cost model picks. Routes with more than
``--max-flop-ratio`` times the other's multiply-adds are not timed. Usage::

    python integration/diagonal_routes.py --out results/diagonal_routes
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cli
import torch

from kfoc_backpack.solver import (
    DIAGONAL_ROUTES,
    FactoredTerms,
    LayerSizes,
    choose_diagonal_route,
    diagonal_flops,
)

STAGES = {"conv64": (64, 32), "conv128": (128, 16), "conv256": (256, 8), "conv512": (512, 4)}
"""ResNet-18 stage: (channels, side of the feature map on 32 × 32 images)."""


def measure(name: str, cols: int, num: int, repeats: int, max_ratio: float) -> dict:
    """Median seconds of each route's diagonal (warm-up first), with the route chosen."""
    channels, side = STAGES[name]
    pos, m, n = side * side, channels, 9 * channels
    torch.manual_seed(0)
    terms = FactoredTerms(torch.randn(cols, num, pos, m), torch.randn(num, pos, n))
    flops = diagonal_flops(LayerSizes(cols, num, pos, m, n))
    timed = [r for r in DIAGONAL_ROUTES if flops[r] <= max_ratio * min(flops.values())]
    seconds: dict[str, list[float]] = {route: [] for route in timed}
    for round_ in range(repeats + 1):  # round 0 warms up
        for route in timed if round_ % 2 == 0 else timed[::-1]:
            start = time.perf_counter()
            terms.diagonal(route)
            spent = time.perf_counter() - start
            if round_ > 0:
                seconds[route].append(spent)
    record = {
        "layer": name,
        "J·K·T·M·N": f"{cols}·{num}·{pos}·{m}·{n}",
        "chosen": choose_diagonal_route(LayerSizes(cols, num, pos, m, n)),
        **{f"{route}_gflop": flops[route] / 1e9 for route in DIAGONAL_ROUTES},
        **{f"{route}_s": statistics.median(values) for route, values in seconds.items()},
    }
    return record


def table(records: list[dict]) -> str:
    lines = [
        "| layer | J·K·T·M·N | formed GFLOP | pairs GFLOP | formed s | pairs s | chosen |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in records:
        times = [
            f"{r[f'{route}_s']:.3f}" if f"{route}_s" in r else "—" for route in ("formed", "pairs")
        ]
        lines.append(
            f"| {r['layer']} | {r['J·K·T·M·N']} | {r['formed_gflop']:.1f} | {r['pairs_gflop']:.1f} "
            f"| {times[0]} | {times[1]} | {r['chosen']} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    parser.add_argument("--layers", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--samples", type=cli.positive_int, default=16, help="K")
    parser.add_argument("--columns", type=cli.positive_int, default=9, help="J")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed rounds")
    parser.add_argument(
        "--max-flop-ratio", type=float, default=20.0, help="skip routes this much costlier"
    )
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads")
    parser.add_argument(
        "--out", type=Path, default=Path("results/diagonal_routes"), help="output directory"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    records = [
        measure(name, args.columns, args.samples, args.repeats, args.max_flop_ratio)
        for name in args.layers
    ]
    result = {"torch": torch.__version__, "threads": args.threads, "layers": records}
    cli.write_report(args.out, "diagonal_routes", result, table(records))
    return result


if __name__ == "__main__":
    main()
