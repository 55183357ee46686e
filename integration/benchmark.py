"""Time and memory of K-FOC against BackPACK's K-FAC/KFLR, per batch.

For LeNet-5 (MNIST shape) and an MLP 784-1000-1000-10 at batch sizes 32, 128, 512
(default), or with ``--resnet`` for ResNet-sized convolutions at batch sizes 16 and 128
(``conv64`` … ``conv512``: one ``Conv2d(C, C, 3, padding=1)`` + ReLU + global
``AvgPool2d`` + ``Linear(C, 10)`` on ResNet-18's stage sizes 32², 16², 8², 4²; and
``resnet18``: ResNet-18's 17 3×3 convolutions for 32×32 input as a plain stack,
without skips, as BackPACK's ``KFLR`` cannot handle residual sums; BatchNorm removed):
forward + backward with nothing, with BackPACK's ``KFAC`` and ``KFLR``, and with
``KFOC`` and ``KFOCExact``. Timings are medians of ``--repeats`` runs after warm-up,
round-robin over the methods in one process (so drift hits all alike), synchronised on
CUDA. Peak memory is the peak of the bytes held by tensors created during the step
(parameters, inputs and the model's state before the step excluded): CUDA's
``max_memory_allocated`` on a GPU, and on the CPU the same quantity tracked exactly by
a dispatch mode that sees every tensor the step allocates and frees (the process's
resident set is useless here: the allocator reuses pages freed before the step).
Solver iterations per layer (mean over runs) and the solver route each layer took
(``SolveRecord.route``) are reported for the K-FOC methods.

Operation counts: ``ops`` is the number of ATen operations one step dispatches (a
deterministic count, whatever the machine's load). On a GPU, where a small step is
bound by the host's launching of kernels rather than by the kernels, the time ratio
follows the ratio of these counts; ``ops_accelerator_routes`` counts them with the
solver on the routes it takes on accelerators (``accelerator_routes``), so the CPU
shows what a GPU step will launch.

Usage::

    python integration/benchmark.py --device cpu --out results/benchmark
    python integration/benchmark.py --repeats 21 --warmup 3   # the README's CPU table
    python integration/benchmark.py --quick                   # smoke run, batch 32, 3 repeats
    python integration/benchmark.py --resnet --repeats 5 --warmup 1 --skip-ops
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import weakref
from collections import defaultdict
from pathlib import Path

import cli
import torch
from backpack import backpack, extend
from backpack.extensions import KFAC, KFLR
from models import lenet5
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from kfoc_backpack import KFOC, KFOCExact
from kfoc_backpack.solver import accelerator_routes

METHODS = {"none": None, "KFAC": KFAC, "KFLR": KFLR, "KFOC": KFOC, "KFOCExact": KFOCExact}
BASELINE = {"KFOC": "KFAC", "KFOCExact": "KFLR"}
BATCH_SIZES = (32, 128, 512)
MIN_REPEATS = 5
"""Fewest timed runs ``--repeats`` accepts (``--quick`` runs 3: a smoke run only)."""
QUICK = {"batch_sizes": [32], "repeats": 3}
"""What ``--quick`` runs (instead of ``--batch-sizes`` and ``--repeats``)."""


def mlp_1000() -> nn.Sequential:
    """MLP 784-1000-1000-10 for flattened MNIST."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 10),
    )


def conv_layer(channels: int) -> nn.Sequential:
    """One ``Conv2d(C, C, 3, padding=1)`` + ReLU + global ``AvgPool2d`` + ``Linear(C, 10)``."""
    side = CONV_SIDES[channels]
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(side),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


CONV_SIDES = {64: 32, 128: 16, 256: 8, 512: 4}
"""Spatial side of the input of each single-layer row: ResNet-18's stages on 32×32."""


def _basic_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """ResNet basic block's two 3×3 convolutions without the skip: ``relu(conv(relu(conv)))``.

    Plain, because BackPACK's ``KFLR`` has no accumulation rule for a residual sum
    (``Parallel``/``SumModule`` raise ``NotImplementedError`` in its backward pass).
    """
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.ReLU(),
    )


def resnet18(num_classes: int = 10) -> nn.Sequential:
    """ResNet-18-shaped plain stack for 32×32 inputs (CIFAR stem, no max pooling).

    The 17 3×3 convolutions of ResNet-18 with their shapes (stem and 16 in the basic
    blocks) in sequence; no skip connections and hence none of the three 1×1 shortcut
    projections (BackPACK's ``KFLR`` cannot backpropagate through residual sums);
    BatchNorm removed (K-FOC's and BackPACK's extensions need independent inputs,
    docs/conventions.md §2).
    """
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_basic_block(c_in, c_out, stride), _basic_block(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


MODELS = {
    "lenet5": lenet5,
    "mlp784-1000-1000-10": mlp_1000,
    **{f"conv{c}": (lambda c=c: conv_layer(c)) for c in CONV_SIDES},
    "resnet18": resnet18,
}
INPUT_SHAPES = {
    "lenet5": (1, 28, 28),
    "mlp784-1000-1000-10": (1, 28, 28),
    **{f"conv{c}": (c, side, side) for c, side in CONV_SIDES.items()},
    "resnet18": (3, 32, 32),
}
DEFAULT_MODELS = ["lenet5", "mlp784-1000-1000-10"]
"""What runs without ``--models`` (the README's original table)."""
RESNET_MODELS = [*(f"conv{c}" for c in CONV_SIDES), "resnet18"]
"""What ``--resnet`` runs: ResNet-sized convolutions, at batch 16 and 128."""
RESNET_BATCH_SIZES = (16, 128)


def setup(model_name: str, batch: int, device: str, seed: int = 0):
    """Build the extended model, the loss and one random batch of the model's input shape."""
    torch.manual_seed(seed)
    model = extend(MODELS[model_name]().to(device))
    lossfunc = extend(nn.CrossEntropyLoss())
    inputs = torch.randn(batch, *INPUT_SHAPES[model_name], device=device)
    targets = torch.randint(0, 10, (batch,), device=device)
    return model, lossfunc, inputs, targets


def step(model, lossfunc, inputs, targets, method: str):
    """One forward + backward with the method's extension; returns the extension."""
    model.zero_grad(set_to_none=True)
    factory = METHODS[method]
    if factory is None:
        lossfunc(model(inputs), targets).backward()
        return None
    ext = factory()
    with backpack(ext):
        lossfunc(model(inputs), targets).backward()
    for p in model.parameters():  # free the factors like a user moving on would
        if hasattr(p, ext.savefield):
            delattr(p, ext.savefield)
    return ext


def sync(device: str) -> None:
    """Wait for queued CUDA work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(model_name: str, batch: int, device: str, repeats: int, warmup: int):
    """Median time (ms), mean iterations and the solver route per layer, methods interleaved."""
    model, lossfunc, inputs, targets = setup(model_name, batch, device)
    times, iters = defaultdict(list), defaultdict(lambda: defaultdict(list))
    routes: dict[str, dict[str, str]] = defaultdict(dict)
    for r in range(warmup + repeats):
        for method in METHODS:
            sync(device)
            start = time.perf_counter()
            ext = step(model, lossfunc, inputs, targets, method)
            sync(device)
            if r >= warmup:
                times[method].append(1e3 * (time.perf_counter() - start))
                for i, rec in enumerate(getattr(ext, "solve_log", [])):
                    layer = f"{i}:{rec.module}{list(rec.weight_shape)}"
                    iters[method][layer].append(rec.iterations)
                    routes[method][layer] = getattr(rec, "route", "")
    medians = {m: statistics.median(t) for m, t in times.items()}
    mean_iters = {
        m: {layer: statistics.mean(v) for layer, v in per.items()} for m, per in iters.items()
    }
    return medians, mean_iters, dict(routes)


class PeakTensorMemory(TorchDispatchMode):
    """Track the peak bytes of live tensor storages created inside the context."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, live tensor count]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            if ptr in self.live:
                self.live[ptr][1] += 1
            else:
                self.live[ptr] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out


def peak_memory_mb(model_name: str, batch: int, device: str, method: str) -> float:
    """Peak memory of the method's step, in MiB (see module docstring)."""
    model, lossfunc, inputs, targets = setup(model_name, batch, device)
    step(model, lossfunc, inputs, targets, method)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, lossfunc, inputs, targets, method)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    tracker = PeakTensorMemory()
    with tracker:
        step(model, lossfunc, inputs, targets, method)
    return tracker.peak / 2**20


class CountOps(TorchDispatchMode):
    """Count the ATen operations dispatched inside the context."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.count += 1
        return func(*args, **(kwargs or {}))


def op_count(model_name: str, batch: int, device: str, method: str, accelerator: bool) -> int:
    """ATen operations of one step (after a warm-up step), optionally on accelerator routes."""
    model, lossfunc, inputs, targets = setup(model_name, batch, device)
    with accelerator_routes(accelerator or device.startswith("cuda")):
        step(model, lossfunc, inputs, targets, method)
        with CountOps() as counter:
            step(model, lossfunc, inputs, targets, method)
    return counter.count


def run(
    device: str, batch_sizes, repeats: int, warmup: int, models, count_ops: bool = True
) -> list[dict]:
    """All records of the benchmark (``ops`` are ``None`` unless ``count_ops``)."""
    records = []
    jobs = [(m, b) for m in models for b in batch_sizes]
    for model_name, batch in tqdm(jobs, desc="benchmark", unit="config"):
        medians, iters, routes = time_methods(model_name, batch, device, repeats, warmup)
        for method, median in medians.items():
            records.append(
                {
                    "model": model_name,
                    "batch_size": batch,
                    "device": device,
                    "method": method,
                    "median_ms": round(median, 3),
                    "peak_mem_mb": round(peak_memory_mb(model_name, batch, device, method), 2),
                    "iterations_per_layer": iters.get(method, {}),
                    "ops": op_count(model_name, batch, device, method, False)
                    if count_ops
                    else None,
                    "ops_accelerator_routes": op_count(model_name, batch, device, method, True)
                    if count_ops
                    else None,
                    "routes": routes.get(method, {}),
                }
            )
    return records


def table(records: list[dict]) -> str:
    """Markdown table with ratios against KFAC (and KFOCExact against KFLR)."""
    by_key = {(r["model"], r["batch_size"], r["method"]): r for r in records}
    lines = [
        "| model | batch | method | median ms | × KFAC | peak MiB | × KFAC mem | ops (acc.) "
        "| mean iters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        kfac = by_key[(r["model"], r["batch_size"], "KFAC")]
        ratio = r["median_ms"] / kfac["median_ms"]
        mem = r["peak_mem_mb"] / kfac["peak_mem_mb"] if kfac["peak_mem_mb"] > 0 else float("nan")
        base = BASELINE.get(r["method"])
        if base == "KFLR":
            kflr = by_key[(r["model"], r["batch_size"], "KFLR")]
            ratio_text = f"{ratio:.2f} ({r['median_ms'] / kflr['median_ms']:.2f}× KFLR)"
        else:
            ratio_text = f"{ratio:.2f}"
        its = r["iterations_per_layer"]
        iters = ", ".join(f"{v:.1f}" for v in its.values()) if its else ""
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['method']} | {r['median_ms']:.1f} | "
            f"{ratio_text} | {r['peak_mem_mb']:.1f} | {mem:.2f} | "
            f"{_ops(r)} | {iters} |"
        )
    return "\n".join(lines)


def _ops(record: dict) -> str:
    if record["ops"] is None:
        return "–"
    return f"{record['ops']} ({record['ops_accelerator_routes']})"


def summary(records: list[dict]) -> str:
    """Compact markdown table: K-FOC against K-FAC and KFOCExact against KFLR."""
    by_key = {(r["model"], r["batch_size"], r["method"]): r for r in records}
    lines = [
        "| model | batch | KFAC ms | KFOC ms | KFOC/KFAC | KFOC mem/KFAC "
        "| KFLR ms | KFOCExact ms | KFOCExact/KFLR | ops KFOC/KFAC (acc.) "
        "| ops KFOCExact/KFLR (acc.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, batch in dict.fromkeys((r["model"], r["batch_size"]) for r in records):
        kfac, kfoc = by_key[(model, batch, "KFAC")], by_key[(model, batch, "KFOC")]
        kflr, exact = by_key[(model, batch, "KFLR")], by_key[(model, batch, "KFOCExact")]
        mem = kfoc["peak_mem_mb"] / kfac["peak_mem_mb"] if kfac["peak_mem_mb"] else float("nan")
        lines.append(
            f"| {model} | {batch} | {kfac['median_ms']:.1f} | {kfoc['median_ms']:.1f} | "
            f"{kfoc['median_ms'] / kfac['median_ms']:.2f} | {mem:.2f} | "
            f"{kflr['median_ms']:.1f} | {exact['median_ms']:.1f} | "
            f"{exact['median_ms'] / kflr['median_ms']:.2f} | "
            f"{_ops_ratio(kfoc, kfac)} | {_ops_ratio(exact, kflr)} |"
        )
    return "\n".join(lines)


def _ops_ratio(record: dict, base: dict) -> str:
    if record["ops"] is None or base["ops"] is None:
        return "–"
    own = record["ops"] / base["ops"]
    acc = record["ops_accelerator_routes"] / base["ops_accelerator_routes"]
    return f"{own:.2f} ({acc:.2f})"


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (nothing runs; :func:`parse_args` adds the checks)."""
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n")[0],
        epilog="Usage examples:\n" + __doc__.split("Usage::\n\n")[1].rstrip(),
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--device",
        type=cli.device,
        default="cpu",
        metavar="DEVICE",
        help="torch device: cpu, cuda or cuda:N, where available",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: batch size {QUICK['batch_sizes'][0]} only, {QUICK['repeats']} "
        "repeats (timings not for reporting); not allowed with --repeats or --batch-sizes",
    )
    parser.add_argument(
        "--repeats",
        type=cli.int_at_least(MIN_REPEATS),
        default=7,
        metavar="N",
        help=f"timed runs per method and configuration, median reported (at least {MIN_REPEATS})",
    )
    parser.add_argument(
        "--warmup",
        type=cli.nonnegative_int,
        default=2,
        metavar="N",
        help="untimed runs per method before the timed ones",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=list(MODELS),
        metavar="MODEL",
        help=f"models to time, from: {' '.join(MODELS)} (default: {' '.join(DEFAULT_MODELS)}; "
        f"with --resnet: {' '.join(RESNET_MODELS)})",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=cli.positive_int,
        default=None,
        metavar="N",
        help=f"batch sizes (default: {' '.join(map(str, BATCH_SIZES))}; with --resnet: "
        f"{' '.join(map(str, RESNET_BATCH_SIZES))})",
    )
    parser.add_argument(
        "--resnet",
        action="store_true",
        help="ResNet-sized rows: one wide convolution per stage of "
        "ResNet-18 on 32x32 (conv64 ... conv512) and ResNet-18 itself, at batch sizes "
        f"{' '.join(map(str, RESNET_BATCH_SIZES))} unless --models/--batch-sizes say otherwise",
    )
    parser.add_argument(
        "--skip-ops",
        action="store_true",
        help="do not count dispatched operations (saves four steps per method and row)",
    )
    parser.add_argument(
        "--out",
        type=cli.directory,
        default=Path("results/benchmark"),
        metavar="DIR",
        help="output directory of benchmark.json and benchmark_meta.json",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (exit status 2 and argparse's message if bad).

    Besides each flag's type and choices: ``--quick`` not with an explicit ``--repeats``
    or ``--batch-sizes`` (it sets both); no model or batch size twice. ``--quick``
    replaces ``args.repeats`` and ``args.batch_sizes`` by :data:`QUICK`'s.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.reject_together(
        parser,
        argv,
        "--quick",
        ["--repeats", "--batch-sizes"],
        reason=f"--quick runs batch size {QUICK['batch_sizes'][0]} with {QUICK['repeats']} "
        "repeats; drop --quick to choose them",
    )
    if args.models is None:
        args.models = list(RESNET_MODELS if args.resnet else DEFAULT_MODELS)
    if args.batch_sizes is None:
        args.batch_sizes = list(RESNET_BATCH_SIZES if args.resnet else BATCH_SIZES)
    cli.reject_duplicates(parser, "--models", args.models)
    cli.reject_duplicates(parser, "--batch-sizes", args.batch_sizes)
    if args.quick:
        args.batch_sizes, args.repeats = list(QUICK["batch_sizes"]), QUICK["repeats"]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point: run, write benchmark.json/benchmark_meta.json, print tables."""
    cli.quiet_library_warnings()
    args = parse_args(argv)
    batch_sizes, repeats = args.batch_sizes, args.repeats
    records = run(args.device, batch_sizes, repeats, args.warmup, args.models, not args.skip_ops)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    (args.out / "benchmark.json").write_text(json.dumps(records, indent=1))
    (args.out / "benchmark_meta.json").write_text(json.dumps(meta, indent=1))
    print(f"\n{meta}\n")
    print(table(records))
    print()
    print(summary(records))
    return records


if __name__ == "__main__":
    main()
