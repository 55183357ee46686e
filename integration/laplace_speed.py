"""Laplace.fit time of ``kfoc`` against laplace-torch's ``kron`` on the models people write.

One process, methods interleaved, median over repeats: ``Laplace(model, "classification",
"all", hessian_structure)`` fitted on a few batches with

* ``kfoc`` — K-FOC, ``aggregation="running"``, exact GGN (the hook route);
* ``kron`` — laplace-torch's ``kron`` with its default backend;
* ``kron-backpack`` — ``kron`` with ``BackPackGGN`` (BackPACK's K-FAC; it fails on models
  BackPACK cannot backpropagate through, which the table records).

Models: the benchmark's MLP 784-1000-1000-10 and LeNet-5 (MNIST-sized input), a small
ResNet for 32×32 RGB input (residual blocks, BatchNorm frozen in eval mode) and a small
transformer encoder (attention and LayerNorm frozen, ``Linear`` layers trainable).

Per layer kind it also counts the floating-point operations (``torch.utils.flop_counter``)
of K-FOC's solve on one batch's terms against forming K-FAC's two factors from the same
terms, and reports the solver's iterations. Usage::

    python integration/laplace_speed.py                 # all models, 5 repeats
    python integration/laplace_speed.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import cli
import torch
from benchmark import mlp_1000
from laplace import Laplace
from laplace.curvature import BackPackGGN
from models import lenet5
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import kfoc_backpack  # noqa: F401  (registers hessian_structure="kfoc")
from kfoc_backpack.collect import TermCollector
from kfoc_backpack.solver import OuterTerms

METHODS = ("kfoc", "kron", "kron-backpack")


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):  # noqa: D102
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for 32×32 RGB input: stem 16, stages 16/32/64 (one block each), linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.stages = nn.Sequential(
            BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2)
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):  # noqa: D102
        h = self.stages(torch.relu(self.bn(self.stem(x))))
        return self.head(h.mean((2, 3)))


class SmallTransformer(nn.Module):
    """Embedding, two encoder layers (width 64, 4 heads, feed-forward 128), mean pool, head."""

    def __init__(self, tokens_in: int = 16, width: int = 64, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(tokens_in, width)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, 4, 128, dropout=0.0, batch_first=True),
            num_layers=2,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):  # noqa: D102
        return self.head(self.encoder(self.embed(x)).mean(1))


def frozen(model: nn.Module) -> nn.Module:
    """Freeze every parameter that is not a ``Linear``/``Conv2d`` layer's (BN, LN, attention)."""
    for module in model.modules():
        trainable = type(module) in (nn.Linear, nn.Conv2d)
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)
    return model.eval()


MODELS = {
    "mlp784-1000-1000-10": (mlp_1000, (1, 28, 28)),
    "lenet5": (lenet5, (1, 28, 28)),
    "resnet-small": (SmallResNet, (3, 32, 32)),
    "transformer-small": (SmallTransformer, (32, 16)),
}
"""Name → (constructor, shape of one input)."""


def make(name: str, batch: int, batches: int, seed: int = 0):
    """Model (frozen where needed, eval mode) and a loader of ``batches`` batches."""
    builder, shape = MODELS[name]
    torch.manual_seed(seed)
    model = frozen(builder())
    X = torch.randn(batch * batches, *shape)
    y = torch.randint(0, 10, (batch * batches,))
    return model, DataLoader(TensorDataset(X, y), batch_size=batch)


def fit_once(model: nn.Module, loader: DataLoader, method: str) -> float:
    """Seconds of one ``Laplace.fit``."""
    if method == "kfoc":
        la = Laplace(model, "classification", "all", "kfoc", aggregation="running")
    elif method == "kron":
        la = Laplace(model, "classification", "all", "kron")
    else:
        la = Laplace(model, "classification", "all", "kron", backend=BackPackGGN)
    start = time.perf_counter()
    la.fit(loader)
    return time.perf_counter() - start


def time_fits(name: str, batch: int, batches: int, repeats: int) -> dict[str, object]:
    """Median fit time per method (methods interleaved) or the error a method raised."""
    model, loader = make(name, batch, batches)
    times: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, str] = {}
    for _ in range(repeats + 1):  # the first round warms up
        for method in METHODS:
            if method in errors:
                continue
            try:
                times[method].append(fit_once(model, loader, method))
            except Exception as error:  # recorded: BackPACK fails on custom modules
                errors[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"
    result: dict[str, object] = {"model": name, "batch": batch, "batches": batches}
    for method in METHODS:
        if method in errors:
            result[method] = errors[method]
        else:
            result[method] = statistics.median(times[method][1:])
    return result


def layer_kind(module: nn.Module, terms) -> str:
    """``Linear``, ``Linear (tokens)`` or ``Conv2d``, with the terms' structure."""
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    return "Linear" if isinstance(terms, OuterTerms) else "Linear (tokens)"


def kfac_flops(module: nn.Module, layer_input: torch.Tensor, columns: int) -> int:
    """Flops of K-FAC's two factors of a layer: ``2·N·T·(I² + M·O²)``.

    ``N·T`` rows of (unfolded) inputs of width ``I`` and ``M·N·T`` output-side vectors
    of width ``O`` (``M`` columns per input, ``T`` positions).
    """
    if isinstance(module, nn.Conv2d):
        rows = torch.nn.functional.unfold(
            layer_input, module.kernel_size, module.dilation, module.padding, module.stride
        )
        width, rows = rows.shape[1], rows.shape[0] * rows.shape[2]
        out = module.out_channels
    else:
        width, rows, out = layer_input.shape[-1], layer_input[..., 0].numel(), module.out_features
    return 2 * rows * (width**2 + columns * out**2)


def route_flops(name: str, batch: int) -> list[dict[str, object]]:
    """Per layer of one batch: K-FOC solve flops and iterations against K-FAC's factors.

    The exact GGN of the 10-class cross-entropy: ``M = 10`` columns per input.
    """
    model, loader = make(name, batch, 1)
    X, y = next(iter(loader))
    collector = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))
    batch_terms = collector(X, y)
    modules = dict(model.named_modules())
    rows = []
    for pname, value in batch_terms.weights.items():
        terms = value.terms
        module = modules[pname.rsplit(".", 1)[0]]
        with FlopCounterMode(display=False) as counter:
            factors = value.solve()
        kfac = kfac_flops(module, collector_input(model, module, X), columns=10)
        rows.append(
            {
                "layer": pname,
                "kind": layer_kind(module, terms),
                "terms": type(terms).__name__,
                "iterations": factors.iterations,
                "kfoc_flops": counter.get_total_flops(),
                "kfac_flops": kfac,
            }
        )
    return rows


def collector_input(model: nn.Module, module: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Input of ``module`` in a forward pass of ``model`` on ``X``."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(X)
    handle.remove()
    return seen[0]


def fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else f"fails ({value})"


def table(records: list[dict]) -> str:
    lines = [
        "| model | batch × batches | kfoc s | kron s (default backend) | kron s (BackPackGGN) "
        "| kfoc / kron |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        ratio = (
            f"{r['kfoc'] / r['kron']:.2f}"
            if isinstance(r["kfoc"], float) and isinstance(r["kron"], float)
            else "–"
        )
        lines.append(
            f"| {r['model']} | {r['batch']} × {r['batches']} | {fmt(r['kfoc'])} | "
            f"{fmt(r['kron'])} | {fmt(r['kron-backpack'])} | {ratio} |"
        )
    return "\n".join(lines)


def flops_table(flops: dict[str, list[dict]]) -> str:
    lines = [
        "| model | layer kind | layers | terms | mean iterations | K-FOC solve GFLOP "
        "| K-FAC factors GFLOP | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in flops.items():
        kinds: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            kinds[row["kind"]].append(row)
        for kind, group in kinds.items():
            kfoc = sum(r["kfoc_flops"] for r in group) / 1e9
            kfac = sum(r["kfac_flops"] for r in group) / 1e9
            iters = statistics.mean(r["iterations"] for r in group)
            terms = "/".join(sorted({r["terms"] for r in group}))
            lines.append(
                f"| {model} | {kind} | {len(group)} | {terms} | {iters:.1f} | {kfoc:.3f} | "
                f"{kfac:.3f} | {kfoc / kfac:.1f} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 8, 2 batches")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed fits per method")
    parser.add_argument("--batch", type=cli.positive_int, default=32, help="batch size")
    parser.add_argument("--batches", type=cli.positive_int, default=4, help="batches per fit")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models"
    )
    parser.add_argument(
        "--threads", type=cli.positive_int, default=2, help="torch intra-op threads"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/laplace_speed"), help="output directory"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.reject_together(parser, argv, "--quick", ["--repeats", "--batch", "--batches"])
    if args.quick:
        args.repeats, args.batch, args.batches = 1, 8, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    cli.quiet_library_warnings()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    records, flops = [], {}
    for name in tqdm(args.models, desc="models"):
        records.append(time_fits(name, args.batch, args.batches, args.repeats))
        flops[name] = route_flops(name, args.batch)
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "fits": records,
        "flops": flops,
    }
    text = table(records) + "\n\n" + flops_table(flops)
    cli.write_report(args.out, "laplace_speed", result, text)
    return result


if __name__ == "__main__":
    main()
