"""The eigenvalue correction's pass against one K-FAC factor pass, A/B in one run.

``hessian_structure="ekfoc"``/``"ekfac"`` fit their factors, then make one more pass over
the data for the corrected eigenvalues ``S`` (:mod:`kfoc_backpack.dataset.correction`).
This script times that pass against one pass that fits K-FAC's factors over the same
batches, interleaved in one process (medians over repeats, after a warm-up round):

* ``correction`` — :func:`~kfoc_backpack.dataset.correction.corrected_eigenvalues` with
  the hook route's collector (what ``ekfoc`` runs), in the eigenbasis of the model's
  K-FOC factors (computed once, untimed);
* ``kron`` — laplace-torch's ``kron`` fit with its default backend (curvlinops' K-FAC),
  less its ``Kron.decompose`` (the factor pass laplace-torch users run);
* ``backpack-kflr`` — forward and backward with BackPACK's ``KFLR`` extension on every
  batch (the BackPACK users' K-FAC factor pass of the exact GGN; models BackPACK cannot
  run record the error);

all three of the exact GGN (``ekfoc``'s default curvature; BackPACK's ``KFAC`` would
draw one Monte-Carlo label per input instead of backpropagating ``C`` columns)

and, for the whole fits, ``kfoc``, ``ekfoc`` and ``ekfac`` against ``kron`` (fit less
decomposition; ``ekfoc`` = ``kfoc`` + the correction pass + eigenbases).

Models: the benchmark's (``integration/benchmark.py``: LeNet-5, the MLP
784-1000-1000-10, the ResNet-sized convolutions ``conv64`` … ``conv512`` and the plain
ResNet-18 stack) and, where torchvision/timm/transformers are installed, the model zoo's
(``integration/zoo.py``). Usage::

    python integration/correction_cost.py --out results/correction     # all models
    python integration/correction_cost.py --models lenet5 conv64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import benchmark
import cli
import torch
import zoo
from backpack import backpack
from backpack.extensions import KFLR
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import kfoc_backpack  # noqa: F401  (registers the structures)
from kfoc_backpack.dataset import DataPass, corrected_blocks
from kfoc_backpack.extensions import extended, preserved_grads

BENCHMARK_MODELS = {
    "lenet5": 32,
    "mlp784-1000-1000-10": 32,
    **{f"{name}-stack" if name in zoo.MODELS else name: 16 for name in benchmark.RESNET_MODELS},
}
"""Benchmark models and the batch size each runs at; ``resnet18-stack`` is the benchmark's
plain ResNet-18 convolution stack, ``resnet18`` torchvision's model in the zoo."""
PASSES = ("correction", "kron", "backpack-kflr")
FITS = ("kron", "kfoc", "ekfoc", "ekfac")


def case_for(name: str, batches: int) -> zoo.Case:
    """Build the model (eval mode) and its random batches: a benchmark or zoo model."""
    if name in BENCHMARK_MODELS:
        batch = BENCHMARK_MODELS[name]
        source = name.removesuffix("-stack")
        torch.manual_seed(0)
        model = benchmark.MODELS[source]().eval()
        num = batch * batches
        data = TensorDataset(
            torch.randn(num, *benchmark.INPUT_SHAPES[source]), torch.randint(0, 10, (num,))
        )
        return zoo.Case(model, DataLoader(data, batch_size=batch), [])
    return zoo.make(name, 16, batches)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def fit_seconds(case: zoo.Case, structure: str) -> float:
    """One ``Laplace.fit`` less its ``Kron.decompose``."""
    la = Laplace(case.model, "classification", "all", structure, **case.laplace_kwargs)
    with zoo.decompose_timer() as spent:
        total = timed(lambda: la.fit(case.loader))
    return total - sum(spent)


def correction_pass(case: zoo.Case) -> Callable[[], object]:
    """Return ``ekfoc``'s correction pass in the K-FOC factors' eigenbasis (set up untimed)."""
    la = Laplace(case.model, "classification", "all", "ekfoc", **case.laplace_kwargs)
    la.fit(case.loader)
    params = la.backend.named_trainable
    bases = {}
    for name, block in zip(params, la.H_facs.blocks):
        basis = block.corrected_basis()
        if basis is not None:  # the weights; biases are exact
            bases[name] = basis
    split = la.backend.splitter(owner="correction_cost")
    return lambda: corrected_blocks(
        DataPass(la.backend.collector, case.loader, params, split=split), bases
    )


def backpack_pass(case: zoo.Case) -> Callable[[], object]:
    """Forward and backward with BackPACK's ``KFLR`` on every batch."""
    lossfunc = nn.CrossEntropyLoss()
    model = case.model
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        with preserved_grads(params), extended(model, lossfunc):
            for X, y in case.loader:
                with backpack(KFLR()):
                    lossfunc(model(X), y).backward()
                for p in params:
                    if hasattr(p, "kflr"):
                        del p.kflr

    return run


def measure(name: str, batches: int, repeats: int) -> dict[str, object]:
    """Medians of the passes and fits, interleaved, with the errors raised."""
    case = case_for(name, batches)
    errors: dict[str, str] = {}
    setups = {"correction": correction_pass, "backpack-kflr": backpack_pass}
    passes: dict[str, Callable[[], object]] = {}
    for key, setup in setups.items():
        try:
            passes[key] = setup(case)
        except Exception as error:  # recorded in the table; the others go on
            errors[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    calls: dict[str, Callable[[], float]] = {
        **{key: (lambda run=run: timed(run)) for key, run in passes.items()},
        "kron": lambda: fit_seconds(case, "kron"),
        **{f"fit-{s}": (lambda s=s: fit_seconds(case, s)) for s in FITS if s != "kron"},
    }
    seconds: dict[str, list[float]] = defaultdict(list)
    for round_ in range(repeats + 1):  # round 0 warms up
        order = list(calls) if round_ % 2 == 0 else list(calls)[::-1]
        for key in order:
            if key in errors:
                continue
            try:
                value = calls[key]()
            except Exception as error:  # recorded in the table; the others go on
                errors[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                continue
            if round_ > 0:
                seconds[key].append(value)
    record: dict[str, object] = {
        "model": name,
        "batches": batches,
        "batch": case.loader.batch_size,
        "errors": errors,
    }
    record.update({f"{key}_s": statistics.median(v) for key, v in seconds.items()})
    kron = record.get("kron_s")
    for key in ("correction", "backpack-kflr", *(f"fit-{s}" for s in FITS if s != "kron")):
        if f"{key}_s" in record and kron:
            record[f"{key}/kron"] = record[f"{key}_s"] / kron
    if "correction_s" in record and "backpack-kflr_s" in record:
        record["correction/backpack-kflr"] = record["correction_s"] / record["backpack-kflr_s"]
    return record


def fmt(record: dict, key: str, digits: int = 3) -> str:
    value = record.get(key)
    return "—" if value is None else f"{value:.{digits}f}"


def table(records: list[dict]) -> str:
    """Markdown table: the passes' seconds and ratios, then the fits' ratios to ``kron``."""
    lines = [
        "| model | batches × size | correction s | kron pass s | BackPACK KFLR pass s "
        "| correction/kron | correction/BackPACK KFLR | kfoc/kron fit | ekfoc/kron fit "
        "| ekfac/kron fit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['batches']} × {r['batch']} | {fmt(r, 'correction_s')} "
            f"| {fmt(r, 'kron_s')} | {fmt(r, 'backpack-kflr_s')} | {fmt(r, 'correction/kron', 2)} "
            f"| {fmt(r, 'correction/backpack-kflr', 2)} | {fmt(r, 'fit-kfoc/kron', 2)} "
            f"| {fmt(r, 'fit-ekfoc/kron', 2)} | {fmt(r, 'fit-ekfac/kron', 2)} |"
        )
    notes = [f"* {r['model']}: {k} failed: {v}" for r in records for k, v in r["errors"].items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def available_models() -> list[str]:
    """Return the benchmark's models and the zoo's whose library is installed."""
    names = list(BENCHMARK_MODELS)
    for name in zoo.MODELS:
        try:
            zoo.make(name, 1, 1)
        except ImportError:
            continue
        names.append(name)
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=[*BENCHMARK_MODELS, *zoo.MODELS],
        default=None,
        help="models (default: the benchmark's and every zoo model whose library is installed)",
    )
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed rounds")
    parser.add_argument("--batches", type=cli.positive_int, default=2, help="batches per pass")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads")
    parser.add_argument(
        "--out", type=Path, default=Path("results/correction"), help="output directory"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    cli.quiet_library_warnings()
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models or available_models()
    records = [measure(name, args.batches, args.repeats) for name in tqdm(models, desc="models")]
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "models": records,
    }
    cli.write_report(args.out, "correction_cost", result, table(records))
    return result


if __name__ == "__main__":
    main()
