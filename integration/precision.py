"""Float32 K-FOC factors against float64 ones, per layer, on the benchmark's models.

Builds a model of ``integration/benchmark.py`` in float32 (seeded), copies it to float64,
runs ``KFOC`` (with the same Monte-Carlo labels) and ``KFOCExact`` on one random batch in
both precisions (float32 at ``--tol``, float64 at :data:`REFERENCE_TOL`), and prints for
every layer the relative difference of the Kronecker products
``‖L₃₂ ⊗ R₃₂ − L₆₄ ⊗ R₆₄‖_F / ‖L₆₄ ⊗ R₆₄‖_F`` (computed from factor inner products, never
formed). Deep layers' blocks are tiny in ResNet-18 at
initialisation; this is the check that the float32 solvers do not lose them.

Usage::

    python integration/precision.py                          # ResNet-18, batch 16
    python integration/precision.py --models lenet5 --batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import cli
import torch
from backpack import backpack, extend
from benchmark import INPUT_SHAPES, MODELS
from torch import nn

from kfoc_backpack import KFOC, KFOCExact

METHODS = {"KFOC": KFOC, "KFOCExact": KFOCExact}
REFERENCE_TOL = 1e-12
"""Tolerance of the float64 reference solves."""


def product_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Return ``‖⊗a − ⊗b‖_F / ‖⊗a‖_F`` from factor inner products (no product formed)."""

    def inner(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
        value = 1.0
        for p, q in zip(x, y):
            value *= float((p.double() * q.double()).sum())
        return value

    aa, bb, ab = inner(a, a), inner(b, b), inner(a, b)
    return max(aa + bb - 2 * ab, 0.0) ** 0.5 / aa**0.5 if aa > 0 else 0.0


def build_parser() -> argparse.ArgumentParser:
    """Return the command line of this script."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet18"],
                        help="models of integration/benchmark.py")  # fmt: skip
    parser.add_argument("--batch-size", type=cli.positive_int, default=16, help="batch size")
    parser.add_argument("--tol", type=cli.nonnegative_float, default=1e-6,
                        help="tolerance of the float32 solves")  # fmt: skip
    parser.add_argument("--max-iter", type=cli.positive_int, default=500, help="solver step cap")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser


def factors(model: nn.Module, inputs, targets, method: str, tol: float, max_iter: int):
    """``[L, R]`` of every weight after one step of ``method`` (labels seeded alike)."""
    ext = METHODS[method](tol=tol, max_iter=max_iter)
    lossfunc = extend(nn.CrossEntropyLoss())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same Monte-Carlo labels in both precisions
    with backpack(ext):
        lossfunc(model(inputs), targets).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
    return {n: [f.detach() for f in getattr(p, ext.savefield)] for n, p in named}


def compare(model_name: str, batch: int, tol: float, max_iter: int) -> list[dict]:
    """Per method and layer: the float32-vs-float64 relative difference of ``L ⊗ R``."""
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    model32 = MODELS[model_name]()
    inputs = torch.randn(batch, *INPUT_SHAPES[model_name])
    targets = torch.randint(0, 10, (batch,))
    model64 = copy.deepcopy(model32).double()
    rows = []
    try:
        for method in METHODS:
            torch.set_default_dtype(torch.float32)
            low = factors(extend(model32), inputs, targets, method, tol, max_iter)
            torch.set_default_dtype(torch.float64)  # BackPACK builds some modules anew
            high = factors(
                extend(model64), inputs.double(), targets, method, REFERENCE_TOL, max_iter
            )
            for name in high:
                diff = product_difference(high[name], low[name])
                rows.append({"model": model_name, "method": method, "layer": name, "diff": diff})
    finally:
        torch.set_default_dtype(default)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    cli.quiet_library_warnings()
    rows = []
    for model_name in args.models:
        found = compare(model_name, args.batch_size, args.tol, args.max_iter)
        rows += found
        for method in METHODS:
            mine = [r for r in found if r["method"] == method]
            worst = max(mine, key=lambda r: r["diff"])
            print(
                f"{model_name} {method}: largest relative difference of a layer's L ⊗ R, "
                f"float32 vs float64: {worst['diff']:.2e} "
                f"({worst['layer']}, of {len(mine)} layers)",
                flush=True,
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
