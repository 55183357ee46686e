"""How slowly the power method converges on the benchmark's layers, and the exact finish.

For each ``Linear`` layer of the MLP 784-1000-1000-10 of ``integration/benchmark.py``
(one random MNIST-shaped batch per batch size, Monte-Carlo Fisher): the ratio of the top
two eigenvalues of ``G_R G_L`` (the power method's rate) and the steps it implies for
the default ``tol``; then the relative Frobenius error and the iterations of the plain
power method (``exact_max_terms=0``) and of the default solve, against the float64
optimum from a tight plain solve. Then the warm start from the previous batch: for
LeNet-5 and the MLP, five consecutive random batches, each layer's terms solved by the
plain power method from K-FAC's start and from the previous batch's left factor, on the
CPU routes and on the accelerator routes (iterations per layer, cold → warm). Last, the
CPU time of one float64 ``eigh`` of a ``K × K`` matrix (what the exact finish runs
twice), beside seven float32 squarings.

Usage::

    python integration/convergence.py

The script has no options (its settings are those the notes quote); ``--help`` prints
this description and any other argument is an error.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import cli
import torch
from backpack import backpack
from benchmark import MODELS, setup

from kfoc_backpack.extensions import KFOCTerms
from kfoc_backpack.solver import (
    DEFAULT_TOL,
    OuterTerms,
    SolverOptions,
    accelerator_routes,
    outer_gram_left,
)

MODEL = "mlp784-1000-1000-10"


def layer_report(batch: int) -> None:
    """Rates and errors of the MLP's layers at one batch size."""
    model, lossfunc, inputs, targets = setup(MODEL, batch, "cpu")
    with backpack(KFOCTerms()):
        lossfunc(model(inputs), targets).backward()
    for layer in (m for m in model if isinstance(m, torch.nn.Linear)):
        layer_terms = layer.weight.kfoc_terms
        terms = layer_terms.terms
        exact = OuterTerms(terms.sqrt_out.double(), terms.inputs.double())
        gram_left = outer_gram_left(exact.sqrt_out)
        gram_right = (exact.inputs @ exact.inputs.T).square()
        evals = torch.linalg.eigvals(gram_right @ gram_left).real.sort(descending=True).values
        ratio = (evals[1] / evals[0]).item()
        steps = math.log(DEFAULT_TOL) / math.log(ratio) if 0 < ratio < 1 else float("nan")
        best = exact.solve(SolverOptions(tol=1e-13, max_iter=5000, exact_max_terms=0))
        best_err = exact.error(best.left, best.right).item()
        row = [
            f"{batch:4d} {tuple(layer.weight.shape)!s:12} ratio {ratio:.3f} (~{steps:.0f} steps)"
        ]
        for name, options in (("plain", SolverOptions(exact_max_terms=0)), ("default", None)):
            res = terms.solve(options, right_trace=layer_terms.input_trace)
            err = exact.error(res.left.double(), res.right.double()).item()
            row.append(f"{name}: {res.iterations} it, converged {res.converged}, err {err:.10f}")
        print(" | ".join(row + [f"optimum {best_err:.10f} ({best.iterations} it)"]))


def warm_start_report(model_name: str, batch: int, batches: int = 5) -> None:
    """Plain power-method iterations per layer from K-FAC's start and warm-started."""
    model, lossfunc, _, _ = setup(model_name, batch, "cpu")
    plain = SolverOptions(exact_max_terms=0)
    previous: dict[tuple[int, bool], torch.Tensor] = {}
    pairs: dict[tuple[int, bool], list[str]] = {}
    for _ in range(batches):
        inputs = torch.randn(batch, 1, 28, 28)
        targets = torch.randint(0, 10, (batch,))
        with backpack(KFOCTerms()):
            lossfunc(model(inputs), targets).backward()
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        for index, layer in enumerate(layers):
            layer_terms = layer.weight.kfoc_terms
            for accelerator in (False, True):
                key = (index, accelerator)
                with accelerator_routes(accelerator):
                    cold = layer_terms.terms.solve(plain, right_trace=layer_terms.input_trace)
                    if key in previous:
                        warm = layer_terms.terms.solve(
                            plain, init=previous[key], right_trace=layer_terms.input_trace
                        )
                        pairs.setdefault(key, []).append(f"{cold.iterations}→{warm.iterations}")
                previous[key] = cold.left
    for (index, accelerator), steps in sorted(pairs.items()):
        routes = "accelerator routes" if accelerator else "CPU routes"
        print(f"{model_name} {batch:4d} layer {index} ({routes}): {' '.join(steps)}")


def timing_report(sizes=(32, 64, 128, 256, 512), repeats: int = 20) -> None:
    """Median CPU time of one float64 ``eigh`` and of seven float32 squarings."""
    for size in sizes:
        mat = torch.randn(size, size, dtype=torch.float64)
        mat = mat @ mat.T
        single = mat.float()

        def squarings(m: torch.Tensor) -> None:
            for _ in range(7):
                m = m @ m

        medians = []
        for fn, arg in ((torch.linalg.eigh, mat), (squarings, single)):
            fn(arg)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(arg)
                times.append(1e3 * (time.perf_counter() - start))
            medians.append(statistics.median(times))
        print(
            f"K={size:4d}: eigh float64 {medians[0]:.3f} ms, "
            f"7 float32 squarings {medians[1]:.3f} ms"
        )


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser: no options besides ``--help`` (nothing runs)."""
    return argparse.ArgumentParser(
        prog="convergence.py",
        description=__doc__.split("Usage::")[0].rstrip(),
        formatter_class=cli.HelpFormatter,
    )


def main(argv: list[str] | None = None) -> None:
    """Print every report (the settings quoted in the notes and the README)."""
    cli.quiet_library_warnings()
    build_parser().parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for batch_size in (32, 128, 512):
        layer_report(batch_size)
    for name in MODELS:
        for batch_size in (32, 128, 512):
            warm_start_report(name, batch_size)
    timing_report()


if __name__ == "__main__":
    main()
