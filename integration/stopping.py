"""Stopping on the objective or on the factors: steps, solve time and error per layer.

For each zoo model (``integration/zoo.py``: library constructors, random weights, the
curvature table's frozen set) the per-sample terms of every weight on the first batch
(exact GGN) are solved with each stopping rule of :class:`~kfoc_backpack.enums.Stop`
at the tolerances given, and to convergence (``stop="factors"``, ``tol=1e-12``, float64).
Per layer the script records the steps and solve time (float32, as users run it) and the
relative Frobenius error ``‖F − L ⊗ R‖ / ‖F‖`` of each rule's factors, of the converged
optimum and of K-FAC's factors of the same samples — computed in float64 from the
per-sample terms without forming ``F`` (``‖F‖²`` from the Gram of the per-sample
matrices, ``⟨F, L ⊗ R⟩`` from one half-step).

Usage (the zoo's environment, see ``integration/zoo.py``)::

    python integration/stopping.py --models resnet18 vit_tiny --out results/stopping
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import cli
import torch
import tqdm
import zoo

from kfoc_backpack import Grouped, KFOCBackend
from kfoc_backpack.solver import SolverOptions, kron_error_from

RULES = (
    ("factors", 1e-5),
    ("objective", 1e-5),
    ("objective", 1e-4),
)
"""``(stop, tol)`` of each rule measured: the paper's rule at its tolerance, the objective
rule at the same and a looser one."""

CONVERGED = SolverOptions(tol=1e-12, max_iter=2000, stop="factors")


def first_batch(case: zoo.Case):
    batch = next(iter(case.loader))
    if isinstance(batch, dict):
        return batch, batch["labels"]
    return batch


def collect(case: zoo.Case, dtype: torch.dtype, grouped: Grouped = Grouped.COUPLED) -> dict:
    """Return the first batch's per-sample terms of every weight in ``dtype`` (and K-FAC's).

    A grouped convolution's in the structure ``grouped`` (default: coupled over all rows,
    the default structure; ``PER_GROUP``: its
    :class:`~kfoc_backpack.collect.grouped.GroupedLayerTerms`).
    """
    model = copy.deepcopy(case.model).to(dtype)
    backend = KFOCBackend(model, "classification", **case.laplace_kwargs)
    x, y = first_batch(case)
    if dtype is not torch.float32:
        if isinstance(x, dict):
            x = dict(x)  # ids stay integers
        else:
            x = x.to(dtype)
    weights = backend.collector(x, y, with_kfac=True).weights
    return {name: terms.with_structure(grouped) for name, terms in weights.items()}


def relative_error(terms, norm_sq: torch.Tensor, left, right) -> float:
    """``‖F − L ⊗ R‖ / ‖F‖`` from the layer's ``‖F‖²`` (computed once) and one half-step."""
    left, right = left.double(), right.double()
    return float(kron_error_from(norm_sq, (terms.to_right(left) * right).sum(), left, right))


def model_rows(name: str, batch: int, rules, image_size: int = zoo.IMAGE_SIZE) -> list[dict]:
    case = zoo.make(name, batch, 1, image_size=image_size)
    low = collect(case, torch.float32)
    high = collect(case, torch.float64)
    rows = []
    for weight, value in tqdm.tqdm(low.items(), desc=name):
        exact = high[weight]
        norm_sq = exact.terms.norm_sq()
        best = exact.solve(CONVERGED)
        row = {
            "model": name,
            "weight": weight,
            "route": str(value.terms.route),
            "sizes": list(value.sizes) if value.sizes is not None else None,
            "optimum_error": relative_error(exact.terms, norm_sq, best.left, best.right),
            "optimum_steps": best.iterations,
            "kfac_error": relative_error(exact.terms, norm_sq, *exact.kfac),
            "rules": {},
        }
        for stop, tol in rules:
            options = SolverOptions(tol=tol, stop=stop)
            value.solve(options)  # warm-up
            start = time.perf_counter()
            factors = value.solve(options)
            elapsed = time.perf_counter() - start
            accurate = exact.solve(options)  # the same rule in float64, for its error
            row["rules"][f"{stop}:{tol:g}"] = {
                "steps": factors.iterations,
                "solve_ms": 1e3 * elapsed,
                "error": relative_error(exact.terms, norm_sq, accurate.left, accurate.right),
                "float32_error": relative_error(exact.terms, norm_sq, factors.left, factors.right),
            }
        rows.append(row)
    return rows


def summary(rows: list[dict], rules) -> list[dict]:
    """Per model and rule: steps and solve time summed, the largest error gap."""
    out = []
    for name in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == name]
        for stop, tol in rules:
            key = f"{stop}:{tol:g}"
            gaps = [row["rules"][key]["float32_error"] - row["optimum_error"] for row in mine]
            out.append(
                {
                    "model": name,
                    "rule": key,
                    "layers": len(mine),
                    "steps": sum(row["rules"][key]["steps"] for row in mine),
                    "solve_s": sum(row["rules"][key]["solve_ms"] for row in mine) / 1e3,
                    "max_error_gap": max(gaps),
                    "max_kfac_gap": max(row["kfac_error"] - row["optimum_error"] for row in mine),
                }
            )
    return out


def table(summaries: list[dict]) -> str:
    lines = [
        "| model | rule | layers | steps | solve s | largest error − optimum's (float32) "
        "| largest K-FAC error − optimum's |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['model']} | {s['rule']} | {s['layers']} | {s['steps']} | {s['solve_s']:.2f} "
            f"| {s['max_error_gap']:.2e} | {s['max_kfac_gap']:.3f} |"
        )
    return "\n".join(lines)


def build_parser(
    description: str = __doc__.split("\n\n")[0], out: str = "results/stopping"
) -> argparse.ArgumentParser:
    """Options of this script and of ``integration/grouped.py``: zoo models, batch, threads."""
    parser = argparse.ArgumentParser(description=description, formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "--models", nargs="+", choices=list(zoo.MODELS), default=list(zoo.MODELS), help="models"
    )
    parser.add_argument("--batch", type=cli.positive_int, default=16, help="batch size")
    parser.add_argument(
        "--image-size", type=cli.positive_int, default=zoo.IMAGE_SIZE, help="side of the images"
    )
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path(out), help="output directory")
    return parser


def save(args: argparse.Namespace, script: str, argv, results: dict, markdown: str) -> dict:
    """Write ``<script>.json`` (with the command and machine) and ``<script>.md`` to ``--out``."""
    result = {
        "command": f"python integration/{script}.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        **results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{script}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{script}.md").write_text(markdown + "\n")
    print(markdown)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += model_rows(name, args.batch, RULES, args.image_size)
    summaries = summary(rows, RULES)
    return save(args, "stopping", argv, {"summary": summaries, "layers": rows}, table(summaries))


if __name__ == "__main__":
    main()
