"""Reproduce the paper's Figure 1 and Table 1 (K-FOC, section 4 and appendix A.3/A.4).

For every data set and seed: train the paper's model (MLP-50 on the UCI sets, LeNet-5
on the MNIST subset), run **one** backward pass over the whole data set with
``KFOCTerms()`` (one label sampled from the model's predictive per input: the paper's
Fisher) and compute every estimator of each analysed layer's Fisher block from those
same per-sample quantities:

* ``diag`` — the exact diagonal of the block;
* ``kfac`` — K-FAC (KFC for convolutions, paper eq. 9); aggregated over batches with
  sample-count weights it does not depend on the batch size;
* ``kfoc_approx`` / ``kfoc_running`` — the batch-optimal K-FOC factors of every batch,
  aggregated by ``KroneckerAccumulator("approx" | "running")`` (K-FAC's scale split,
  sample-count weights, docs/conventions.md §4);
* ``kfoc_approx_paper`` — ``kfoc_approx`` with the paper's scale split (the per-batch
  input-side factor normalised to unit Frobenius norm, Algorithm 2's output), to
  measure how much of a difference to the paper is the split;
* ``kfoc_optimal`` — the data-set optimum (does not depend on the batch size).

The ground truth is the full-data block ``F = Σ_k vec(X_k) vec(X_k)ᵀ``; the metric is
the relative Frobenius error ``‖F − F̂‖_F / ‖F‖_F``. Runtime (Table 1): wall time of
one pass over the data with the public extensions (BackPACK's ``KFAC``/``DiagGGNMC``,
K-FOC's ``KFOC``/``KFOCTerms``, and a plain ``backward`` for reference), including the
aggregation over batches, median over repeats.

Usage::

    python integration/paper.py                  # full run (10 seeds)
    python integration/paper.py --quick          # minutes: 3 seeds, data subsets
    python integration/paper.py --datasets boston mnist --device cuda --out DIR
    python integration/plots.py DIR/results.json # redraw the figures of a run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cli
import torch
from backpack import backpack, extend
from backpack.extensions import KFAC, DiagGGNMC
from backpack.utils.conv import unfold_input
from data import DATASETS, Dataset, load_dataset
from models import (
    TrainConfig,
    describe_layers,
    make_loss,
    make_model,
    train,
)
from torch import Tensor, nn
from tqdm import tqdm

from kfoc_backpack import KFOC
from kfoc_backpack.collect import LayerTerms, kfac_scale_split
from kfoc_backpack.extensions import KFOCTerms
from kfoc_backpack.solver import (
    KroneckerAccumulator,
    OuterTerms,
    SampleTerms,
    SolverOptions,
    kron_error_dense,
    nearest_kronecker_terms,
)

Terms = OuterTerms | SampleTerms

METHODS = ("diag", "kfac", "kfoc_approx", "kfoc_running", "kfoc_optimal")
EXTRA_METHODS = ("kfoc_approx_paper",)
RUNTIME_METHODS = ("backward", "diag", "kfac", "kfoc_approx", "kfoc_running", "kfoc_optimal")
LABELS = {
    "diag": "diagonal",
    "kfac": "K-FAC",
    "kfoc_approx": "K-FOC_approx",
    "kfoc_running": "K-FOC_running",
    "kfoc_optimal": "K-FOC_optimal",
    "kfoc_approx_paper": "K-FOC_approx (paper's split)",
    "backward": "plain backward",
}

UCI_BATCH_SIZES = (1, 10, 100, None)  # None: the full data set
MNIST_BATCH_SIZES = (1, 10, 100, 1000)

DENSE_MAX_SIDE = 4096
"""Largest ``M·N`` for which the ground truth is formed densely (else structured)."""

PAPER = {
    # docs/conventions.md §7: the paper's poster, means over 10 seeds (batches 1, 10, 100, all).
    ("boston", "layer1", "kfac"): (0.64, 0.64, 0.67, 0.65),
    ("boston", "layer1", "kfoc_approx"): (0.53, 0.50, 0.48, 0.46),
    ("boston", "layer1", "kfoc_running"): (0.47, 0.48, 0.46, 0.46),
    ("boston", "layer2", "kfac"): (0.10, 0.10, 0.12, 0.10),
    ("boston", "layer2", "kfoc_approx"): (0.29, 0.11, 0.09, 0.00),
    ("boston", "layer2", "kfoc_running"): (0.0, 0.0, 0.0, 0.0),
    ("mnist", "conv1", "kfac"): (0.965, 0.965, 0.965, 0.965),
    ("mnist", "conv1", "kfoc_approx"): (0.65, 0.72, 0.61, 0.53),
    ("mnist", "conv1", "kfoc_running"): (0.52, 0.52, 0.51, 0.52),
    ("mnist", "conv2", "kfac"): (0.78, 0.78, 0.78, 0.78),
    ("mnist", "conv2", "kfoc_approx"): (0.76, 0.76, 0.68, 0.56),
    ("mnist", "conv2", "kfoc_running"): (0.55, 0.53, 0.52, 0.51),
}


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Everything a run depends on.

    Attributes:
        datasets: Data sets to run.
        seeds: Number of seeds (``0 … seeds−1``).
        out: Output directory.
        device: Torch device.
        data_dir: Directory of the UCI files (``None``: env var or default).
        subset: Samples per data set (``None``: all).
        train: Training schedule per task.
        runtime_repeats: Repeats of each timed pass (median reported; 0 skips).
        runtime_samples: Samples of the timed passes per data set (``None``: all).
        chunk: Samples per backward pass when collecting the per-sample terms.
        tol: Stopping precision of the per-batch solves (paper: ``1e-5``).
        max_iter: Iteration cap of the per-batch solves (paper: 100).
        quick: Whether this is the ``--quick`` configuration.
        fisher: ``"mc"`` (the paper's: one sampled label per input) or ``"exact"``
            (exact GGN; diagnostic, MLPs only).
        with_bias: Analyse ``[W, b]`` of ``Linear`` layers as one block (the paper's
            ``Ŵ``; diagnostic, MLPs only).
        activation: Hidden activation of the MLPs (default ReLU; diagnostic).
    """

    datasets: list[str]
    seeds: int
    out: Path
    device: str = "cpu"
    data_dir: str | None = None
    subset: dict[str, int | None] = field(default_factory=dict)
    train: dict[str, TrainConfig] = field(default_factory=dict)
    runtime_repeats: int = 3
    runtime_samples: dict[str, int | None] = field(default_factory=dict)
    chunk: int = 1000
    tol: float = 1e-5
    max_iter: int = 100
    quick: bool = False
    fisher: str = "mc"
    with_bias: bool = False
    activation: str = "relu"


def build_config(args: argparse.Namespace) -> RunConfig:
    """Turn the command line (checked by :func:`parse_args`) into a :class:`RunConfig`.

    ``--quick`` changes the defaults (3 seeds, subsets, 5 MNIST epochs, 200 timed MNIST
    samples); ``--seeds``, ``--subset`` and ``--epochs`` given explicitly take precedence.
    """
    quick = args.quick
    subset: dict[str, int | None] = (
        {"boston": 200, "concrete": 200, "energy": 200, "mnist": 1000}
        if quick
        else dict.fromkeys(DATASETS)
    )
    if args.subset is not None:
        subset = dict.fromkeys(DATASETS, args.subset)
    runtime_samples: dict[str, int | None] = dict.fromkeys(DATASETS)
    runtime_samples["mnist"] = 200 if quick else 1000
    train_cfg = {
        "regression": TrainConfig(epochs=40, batch_size=32, lr=1e-3),
        "classification": TrainConfig(epochs=5 if quick else 10, batch_size=64, lr=1e-3),
    }
    if args.epochs is not None:
        train_cfg = {k: TrainConfig(args.epochs, v.batch_size, v.lr) for k, v in train_cfg.items()}
    return RunConfig(
        datasets=list(args.datasets),
        seeds=args.seeds if args.seeds is not None else (3 if quick else 10),
        out=Path(args.out),
        device=args.device,
        data_dir=None if args.data_dir is None else str(args.data_dir),
        subset=subset,
        train=train_cfg,
        runtime_repeats=args.runtime_repeats,
        runtime_samples=runtime_samples,
        quick=quick,
        fisher=args.fisher,
        with_bias=args.with_bias,
        activation=args.activation,
    )


def batch_sizes(name: str, num: int) -> list[int]:
    """Return the paper's batch sizes for ``num`` samples (capped, deduplicated)."""
    sizes = MNIST_BATCH_SIZES if name == "mnist" else UCI_BATCH_SIZES
    return sorted({min(num if size is None else size, num) for size in sizes})


# --------------------------------------------------------------------------------------
# Per-sample quantities: one pass, shared samples
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerData:
    """A layer's per-sample quantities over the whole data set.

    Attributes:
        terms: The weight's Fisher block ``F`` (``K = N`` terms, one per input, in data
            order; ``reduction="sum"`` so ``F`` is the sum over the data set).
        input_sq: ``[N]`` squared norms of the (unfolded) inputs, ``‖â_n‖²_F``:
            K-FAC's scale split of a batch needs their batch mean.
        kfac: K-FAC's factors of ``F`` from the same samples.
    """

    terms: Terms
    input_sq: Tensor
    kfac: tuple[Tensor, Tensor]


def slice_terms(terms: Terms, index: Tensor | slice) -> Terms:
    """Return the block of the selected terms (rows of ``K``)."""
    if isinstance(terms, OuterTerms):
        return OuterTerms(terms.sqrt_out[index], terms.inputs[index])
    return SampleTerms(terms.samples[index])


def cat_terms(parts: Sequence[Terms]) -> Terms:
    """Concatenate blocks of terms along ``K``."""
    if isinstance(parts[0], OuterTerms):
        return OuterTerms(
            torch.cat([p.sqrt_out for p in parts]), torch.cat([p.inputs for p in parts])
        )
    return SampleTerms(torch.cat([p.samples for p in parts]))


def terms_to(terms: Terms, dtype: torch.dtype) -> Terms:
    """Cast a block of terms (detached from the autograd graph)."""
    if isinstance(terms, OuterTerms):
        return OuterTerms(terms.sqrt_out.detach().to(dtype), terms.inputs.detach().to(dtype))
    return SampleTerms(terms.samples.detach().to(dtype))


def input_norms_sq(module: nn.Module, inputs: Tensor) -> Tensor:
    """``[N]``: ``‖â_n‖²_F`` of a layer's inputs (unfolded for convolutions)."""
    if isinstance(module, nn.Linear):
        return inputs.flatten(start_dim=1).square().sum(1)
    return unfold_input(module, inputs).flatten(start_dim=1).square().sum(1)


def collect_layers(
    model: nn.Module,
    data: Dataset,
    layers: dict[str, int],
    seed: int,
    chunk: int,
    device: str,
    dtype: torch.dtype = torch.float64,
    exact: bool = False,
    with_bias: bool = False,
) -> dict[str, LayerData]:
    """Per-sample quantities of the analysed layers in one pass over the data set.

    One label is sampled per input from the model's predictive (``KFOCTerms()``), with
    ``torch.manual_seed(seed)``; the pass runs in chunks of ``chunk`` samples and the
    chunks are concatenated (the sum reduction makes that exact). ``exact=True`` uses
    the exact GGN instead (diagnostics, tests against an independent reference).
    ``with_bias=True`` analyses ``[W, b]`` of ``Linear`` layers as one block, as the
    paper does (its ``Ŵ`` appends the bias): the inputs get a constant 1.

    With ``exact=True`` a convolution's terms are ordered by output column, then
    sample (BackPACK's layout), so they must not be sliced into batches.

    Raises:
        NotImplementedError: For ``with_bias`` on a convolution (its per-sample bias
            gradients are not among the stored quantities).
    """
    for index in layers.values():
        if with_bias and not isinstance(model[index], nn.Linear):
            raise NotImplementedError("with_bias is a diagnostic for Linear layers only.")
    model = extend(model)
    loss_fn = extend(make_loss(data, reduction="sum"))
    parts: dict[str, list] = defaultdict(list)
    seen: dict[str, Tensor] = {}
    hooks = [
        model[index].register_forward_hook(
            lambda _m, args, _out, name=name: seen.__setitem__(name, args[0].detach())
        )
        for name, index in layers.items()
    ]
    torch.manual_seed(seed)
    for start in range(0, len(data), chunk):
        inputs = data.inputs[start : start + chunk].to(device)
        targets = data.targets[start : start + chunk].to(device)
        model.zero_grad()
        with backpack(KFOCTerms("ggn" if exact else "mc")):
            loss_fn(model(inputs), targets).backward()
        for name, index in layers.items():
            module = model[index]
            layer_terms = module.weight.kfoc_terms
            layer_terms = LayerTerms(
                terms_to(layer_terms.terms, dtype),
                layer_terms.input_trace.detach(),
                tuple(f.detach().to(dtype) for f in layer_terms.kfac),
            )
            norms = input_norms_sq(module, seen[name])
            parts[name].append((layer_terms, norms, len(inputs)))
    for hook in hooks:
        hook.remove()
    result = {}
    for name, chunks in parts.items():
        terms = cat_terms([c[0].terms for c in chunks])
        input_sq = torch.cat([c[1] for c in chunks]).to(dtype)
        total = sum(c[2] for c in chunks)
        left = sum(c[0].kfac[0] for c in chunks)
        right = sum(c[0].kfac[1] * c[2] for c in chunks) / total
        if with_bias:
            ones = torch.ones_like(terms.inputs[:, :1])
            terms = OuterTerms(terms.sqrt_out, torch.cat([terms.inputs, ones], 1))
            input_sq = input_sq + 1
            right = terms.inputs.T @ terms.inputs / total
        result[name] = LayerData(terms, input_sq, (left, right))
    for module in model.modules():  # drop the stored quantities of the last chunk
        for param in module.parameters(recurse=False):
            if hasattr(param, "kfoc_terms"):
                del param.kfoc_terms
    return result


# --------------------------------------------------------------------------------------
# Errors against the ground truth
# --------------------------------------------------------------------------------------


class GroundTruth:
    """The full-data block ``F`` and relative Frobenius errors against it.

    Dense (``[MN, MN]``) when ``M·N ≤ dense_max_side``, else the structured error of
    the terms (no dense ``F``).
    """

    def __init__(self, terms: Terms, dense_max_side: int = DENSE_MAX_SIDE):
        self.terms = terms
        rows, cols = terms.shape
        self.dense = terms.dense() if rows * cols <= dense_max_side else None
        norm_sq = (
            self.dense.square().sum() if self.dense is not None else terms.norm_sq()
        ).clamp_min(0)
        self.norm_sq = float(norm_sq)

    def error(self, left: Tensor, right: Tensor) -> float:
        """``‖F − left ⊗ right‖_F / ‖F‖_F``."""
        left, right = left.to(self._dtype), right.to(self._dtype)
        if self.dense is not None:
            return float(kron_error_dense(self.dense, left, right))
        return float(self.terms.error(left, right))

    def diagonal_error(self) -> float:
        """``‖F − diag(F)‖_F / ‖F‖_F`` (the exact diagonal of the block)."""
        diag_sq = float(self.terms.diagonal().square().sum())
        if self.norm_sq == 0:
            return 0.0
        return math.sqrt(max(self.norm_sq - diag_sq, 0.0) / self.norm_sq)

    @property
    def _dtype(self) -> torch.dtype:
        return self.dense.dtype if self.dense is not None else _terms_dtype(self.terms)


def _terms_dtype(terms: Terms) -> torch.dtype:
    return terms.inputs.dtype if isinstance(terms, OuterTerms) else terms.samples.dtype


@dataclass
class LayerErrors:
    """Per-(batch size, method) errors of one layer and seed, plus solver statistics."""

    errors: dict[tuple[int, str], float] = field(default_factory=dict)
    solves: int = 0
    unconverged: int = 0


def layer_errors(
    layer: LayerData,
    order: Tensor,
    sizes: Sequence[int],
    options: SolverOptions,
    progress: tqdm | None = None,
) -> LayerErrors:
    """Every estimator's relative error at every batch size, for one layer and seed.

    Args:
        layer: The layer's per-sample quantities.
        order: Permutation of the samples; batches are its consecutive slices.
        sizes: Batch sizes.
        options: Options of the per-batch solves.
        progress: Optional bar advanced once per batch.
    """
    truth = GroundTruth(layer.terms)
    out = LayerErrors()
    diag = truth.diagonal_error()
    kfac = truth.error(*layer.kfac)
    terms = slice_terms(layer.terms, order)
    input_sq = layer.input_sq[order]
    num = input_sq.shape[0]
    running_left = None
    for size in sizes:
        approx = KroneckerAccumulator("approx")
        running = KroneckerAccumulator("running")
        paper_left = paper_right = None
        for start in range(0, num, size):
            batch = slice(start, start + size)
            count = min(size, num - start)
            factors = slice_terms(terms, batch).solve(options)
            out.solves += 1
            out.unconverged += int(not factors.converged)
            left, right = kfac_scale_split(factors, input_sq[batch].mean())
            approx.update(left / count, right, weight=count)
            running.update(left / count, right, weight=count)
            norm = torch.linalg.matrix_norm(factors.right)
            unit = torch.where(norm > 0, norm, torch.ones_like(norm))
            left_p, right_p = factors.left * unit, factors.right / unit
            paper_left = left_p if paper_left is None else paper_left + left_p
            paper_right = right_p if paper_right is None else paper_right + right_p
            if progress is not None:
                progress.update(1)
        batches = math.ceil(num / size)
        out.errors[(size, "diag")] = diag
        out.errors[(size, "kfac")] = kfac
        out.errors[(size, "kfoc_approx")] = truth.error(*approx.factors())
        running_factors = running.factors()
        out.errors[(size, "kfoc_running")] = truth.error(*running_factors)
        out.errors[(size, "kfoc_approx_paper")] = truth.error(paper_left, paper_right / batches)
        if size == max(sizes):
            running_left = running_factors[0]
    optimal_options = SolverOptions(tol=1e-10, max_iter=2000)
    optimal = nearest_kronecker_terms([layer.terms], options=optimal_options, init=running_left)
    optimal_error = truth.error(optimal.left, optimal.right)
    for size in sizes:
        out.errors[(size, "kfoc_optimal")] = optimal_error
    return out


# --------------------------------------------------------------------------------------
# Runtime: one pass over the data with the public extensions
# --------------------------------------------------------------------------------------


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and m.weight.requires_grad
    ]


def timed_pass(
    method: str, model: nn.Module, loss_fn: nn.Module, data: Dataset, size: int, device: str
) -> dict[nn.Parameter, tuple[Tensor, ...]]:
    """One pass over ``data`` in batches of ``size`` computing ``method``'s curvature.

    ``loss_fn`` has ``reduction="mean"``, so each batch's curvature is a batch mean and
    the aggregation weights batches by their sample count (docs/conventions.md §4). Returns the
    weights' aggregated curvature (so that nothing is optimised away).
    """
    weights = _weights(model)
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    accumulators: dict[nn.Parameter, object] = {}
    stored: dict[nn.Parameter, list[Terms]] = defaultdict(list)
    for start in range(0, len(data), size):
        batch_in, batch_out = inputs[start : start + size], targets[start : start + size]
        count = batch_in.shape[0]
        model.zero_grad()
        if method == "backward":
            loss_fn(model(batch_in), batch_out).backward()
            continue
        extension = {
            "diag": DiagGGNMC,
            "kfac": KFAC,
            "kfoc_approx": KFOC,
            "kfoc_running": KFOC,
            "kfoc_optimal": KFOCTerms,
        }[method]()
        with backpack(extension):
            loss_fn(model(batch_in), batch_out).backward()
        for weight in weights:
            if method == "diag":
                value = weight.diag_ggn_mc * count
                previous = accumulators.get(weight)
                accumulators[weight] = value if previous is None else previous + value
            elif method == "kfoc_optimal":
                stored[weight].append(weight.kfoc_terms.terms)
            else:
                if weight not in accumulators:
                    kind = "running" if method == "kfoc_running" else "approx"
                    accumulators[weight] = KroneckerAccumulator(kind)
                left, right = weight.kfac if method == "kfac" else weight.kfoc
                accumulators[weight].update(left, right, weight=count)
    if method == "kfoc_optimal":
        # Terms of a mean-reduced batch carry 1/√n_p: rescale them so that the stored
        # blocks add up to the data-set block Σ_p n_p F_p, then solve once over all.
        result = {}
        for weight, parts in stored.items():
            scaled = [_scale_terms(p, math.sqrt(_num_terms(p))) for p in parts]
            factors = cat_terms(scaled).solve()
            result[weight] = (factors.left, factors.right)
        return result
    if method in ("backward", "diag"):
        return {w: (v,) for w, v in accumulators.items()}
    return {w: acc.factors() for w, acc in accumulators.items()}


def _scale_terms(terms: Terms, factor: float) -> Terms:
    if isinstance(terms, OuterTerms):
        return OuterTerms(terms.sqrt_out * factor, terms.inputs)
    return SampleTerms(terms.samples * factor)


def _num_terms(terms: Terms) -> int:
    return terms.inputs.shape[0] if isinstance(terms, OuterTerms) else terms.samples.shape[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_runtime(
    model: nn.Module,
    data: Dataset,
    sizes: Sequence[int],
    repeats: int,
    device: str,
    progress: tqdm | None = None,
) -> list[dict]:
    """Median wall time (ms) of one pass over ``data`` per method and batch size.

    Every method first runs on one batch (warm-up); then the ``repeats`` rounds
    interleave the methods (round-robin), so that load from other processes affects
    all methods alike.
    """
    model = extend(copy.deepcopy(model))
    loss_fn = extend(make_loss(data, reduction="mean"))
    records = []
    for size in sizes:
        warm_up = data.subset(size)
        for method in RUNTIME_METHODS:
            timed_pass(method, model, loss_fn, warm_up, size, device)
        times: dict[str, list[float]] = defaultdict(list)
        for repeat in range(repeats):
            for method in RUNTIME_METHODS:
                torch.manual_seed(repeat)
                _sync(device)
                start = time.perf_counter()
                timed_pass(method, model, loss_fn, data, size, device)
                _sync(device)
                times[method].append(1e3 * (time.perf_counter() - start))
                if progress is not None:
                    progress.update(1)
        records += [
            {
                "dataset": data.name,
                "batch_size": size,
                "method": method,
                "median_ms": statistics.median(times[method]),
                "repeats": repeats,
                "samples": len(data),
            }
            for method in RUNTIME_METHODS
        ]
    return records


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------


def run_dataset(name: str, config: RunConfig, meta: dict) -> tuple[list[dict], list[dict], Dataset]:
    """All seeds of one data set: per-seed error records and the runtime records."""
    data = load_dataset(name, config.data_dir, config.subset.get(name))
    sizes = batch_sizes(name, len(data))
    options = SolverOptions(tol=config.tol, max_iter=config.max_iter)
    per_seed: list[dict] = []
    info: dict = {"samples": len(data), "batch_sizes": sizes, "seeds": []}
    trained = None
    batches_per_seed = sum(math.ceil(len(data) / s) for s in sizes)
    for seed in range(config.seeds):
        torch.manual_seed(seed)
        model, layers = make_model(data, config.activation)
        model = model.to(config.device)
        info.setdefault("layers", _layer_descriptions(model, layers, config.with_bias))
        start = time.perf_counter()
        loss = train(model, data, config.train[data.task], seed, config.device)
        seed_info = {"seed": seed, "train_loss": loss, "train_s": time.perf_counter() - start}
        if data.task == "classification":
            with torch.no_grad():
                logits = model(data.inputs.to(config.device))
            accuracy = (logits.argmax(1).cpu() == data.targets).float().mean()
            seed_info["train_accuracy"] = float(accuracy)
        if trained is None:
            trained = copy.deepcopy(model)
        start = time.perf_counter()
        collected = collect_layers(
            model,
            data,
            layers,
            seed,
            config.chunk,
            config.device,
            exact=config.fisher == "exact",
            with_bias=config.with_bias,
        )
        seed_info["terms_s"] = time.perf_counter() - start
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        order = order.to(config.device)
        start = time.perf_counter()
        bar = tqdm(
            total=batches_per_seed * len(layers),
            desc=f"{name} seed {seed}",
            leave=False,
            unit="batch",
        )
        for layer, layer_data in collected.items():
            result = layer_errors(layer_data, order, sizes, options, bar)
            seed_info.setdefault("solves", 0)
            seed_info["solves"] += result.solves
            seed_info.setdefault("unconverged", 0)
            seed_info["unconverged"] += result.unconverged
            for (size, method), error in result.errors.items():
                per_seed.append(
                    {
                        "dataset": name,
                        "layer": layer,
                        "batch_size": size,
                        "method": method,
                        "seed": seed,
                        "error": error,
                    }
                )
        bar.close()
        seed_info["errors_s"] = time.perf_counter() - start
        info["seeds"].append(seed_info)
        tqdm.write(
            f"{name} seed {seed}: train loss {loss:.3f}, "
            f"terms {seed_info['terms_s']:.1f}s, errors {seed_info['errors_s']:.1f}s"
        )
    runtime: list[dict] = []
    if config.runtime_repeats > 0:
        timed_data = data.subset(config.runtime_samples.get(name))
        timed_sizes = batch_sizes(name, len(timed_data))
        bar = tqdm(
            total=len(timed_sizes) * len(RUNTIME_METHODS) * config.runtime_repeats,
            desc=f"{name} runtime",
            leave=False,
        )
        start = time.perf_counter()
        runtime = measure_runtime(
            trained, timed_data, timed_sizes, config.runtime_repeats, config.device, bar
        )
        bar.close()
        info["runtime_s"] = time.perf_counter() - start
    meta[name] = info
    return per_seed, runtime, data


def _layer_descriptions(model: nn.Module, layers: dict[str, int], with_bias: bool) -> dict:
    """Figure titles' layer descriptions (``"Linear 13→50"``; ``+ bias`` for ``[W, b]``)."""
    suffix = " + bias" if with_bias else ""
    return {name: text + suffix for name, text in describe_layers(model, layers).items()}


def summarize(per_seed: list[dict]) -> list[dict]:
    """Mean, min and max over seeds per (data set, layer, batch size, method)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for rec in per_seed:
        groups[(rec["dataset"], rec["layer"], rec["batch_size"], rec["method"])].append(
            rec["error"]
        )
    return [
        {
            "dataset": dataset,
            "layer": layer,
            "batch_size": size,
            "method": method,
            "error_mean": statistics.fmean(values),
            "error_min": min(values),
            "error_max": max(values),
            "seeds": len(values),
        }
        for (dataset, layer, size, method), values in groups.items()
    ]


def check_acceptance(results: list[dict], tol: float = 1e-6) -> list[str]:
    """Check the issue's inequalities ``optimal ≤ running ≤ K-FAC`` (seed means).

    Also checks that single-output layers (one output unit) give K-FOC_running and
    K-FOC_optimal errors ≈ 0. Returns human-readable lines, failures marked ``FAIL``.
    """
    table = {(r["dataset"], r["layer"], r["batch_size"], r["method"]): r for r in results}
    panels = sorted({key[:3] for key in table})
    lines = []
    failures = 0
    for dataset, layer, size in panels:

        def mean(method: str, d=dataset, la=layer, s=size) -> float:
            return table[(d, la, s, method)]["error_mean"]

        ok = mean("kfoc_optimal") <= mean("kfoc_running") + tol <= mean("kfac") + 2 * tol
        if not ok:
            failures += 1
            lines.append(
                f"FAIL {dataset}/{layer}/bs={size}: optimal {mean('kfoc_optimal'):.4f}, "
                f"running {mean('kfoc_running'):.4f}, K-FAC {mean('kfac'):.4f}"
            )
    lines.insert(
        0,
        f"optimal ≤ running ≤ K-FAC (seed means): {len(panels) - failures}/{len(panels)} "
        "panel×batch-size cells hold",
    )
    single = [
        r
        for r in results
        if r["layer"] == "layer2" and r["method"] in ("kfoc_running", "kfoc_optimal")
    ]
    if single:
        worst = max(r["error_max"] for r in single)
        flag = "" if worst < 1e-4 else "FAIL "
        lines.append(f"{flag}one-output layers: K-FOC_running/optimal max error {worst:.1e}")
    return lines


def format_size(size: int, num: int) -> str:
    """Column label of a batch size."""
    return f"full ({num})" if size == num else str(size)


def markdown_tables(results: list[dict], runtime: list[dict], samples: dict[str, int]) -> str:
    """Format the error (mean [min, max]) and runtime tables, with the paper's means."""
    lines = ["## Relative Frobenius error (mean [min, max] over seeds; paper's mean)", ""]
    by_key = {(r["dataset"], r["layer"], r["batch_size"], r["method"]): r for r in results}
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        sizes = sorted({r["batch_size"] for r in results if r["dataset"] == dataset})
        layers = list(dict.fromkeys(r["layer"] for r in results if r["dataset"] == dataset))
        head = [format_size(s, samples[dataset]) for s in sizes]
        lines += [
            f"### {dataset}",
            "",
            "| layer | method | " + " | ".join(head) + " |",
            "|---|---|" + "---|" * len(sizes),
        ]
        for layer in layers:
            for method in METHODS + EXTRA_METHODS:
                cells = []
                paper = PAPER.get((dataset, layer, method))
                for i, size in enumerate(sizes):
                    rec = by_key.get((dataset, layer, size, method))
                    if rec is None:
                        cells.append("")
                        continue
                    cell = (
                        f"{rec['error_mean']:.3f} [{rec['error_min']:.3f}, {rec['error_max']:.3f}]"
                    )
                    if paper is not None and i < len(paper):
                        cell += f" ({paper[i]:.2f})"
                    cells.append(cell)
                lines.append(f"| {layer} | {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    if runtime:
        lines += ["## Runtime of one pass over the data (ms, median over repeats)", ""]
        for dataset in dict.fromkeys(r["dataset"] for r in runtime):
            recs = [r for r in runtime if r["dataset"] == dataset]
            sizes = sorted({r["batch_size"] for r in recs})
            num = recs[0]["samples"]
            lines += [
                f"### {dataset} ({num} samples)",
                "",
                "| method | " + " | ".join(format_size(s, num) for s in sizes) + " |",
                "|---|" + "---|" * len(sizes),
            ]
            for method in RUNTIME_METHODS:
                cells = []
                for size in sizes:
                    rec = next(r for r in recs if r["batch_size"] == size and r["method"] == method)
                    cells.append(f"{rec['median_ms']:.1f}")
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


MLP_DATASETS = tuple(name for name in DATASETS if name != "mnist")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (nothing runs; :func:`parse_args` adds the checks)."""
    parser = argparse.ArgumentParser(
        prog="paper.py",
        description=__doc__.split("\n\n")[0],
        epilog="Usage examples:\n" + __doc__.split("Usage::\n\n")[1].rstrip(),
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--out", type=cli.directory, default="results/paper", metavar="DIR", help="output directory"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of minutes: 3 seeds, 200 samples per UCI set and "
        "1000 MNIST images, 5 MNIST epochs, 200 timed MNIST images; --seeds, --subset and "
        "--epochs given explicitly take precedence",
    )
    parser.add_argument(
        "--seeds",
        metavar="N",
        type=cli.positive_int,
        default=None,
        help="number of seeds, 0 … N−1 (default: 10; 3 with --quick)",
    )
    parser.add_argument(
        "--device",
        type=cli.device,
        default="cpu",
        metavar="DEVICE",
        help="torch device: cpu, cuda or cuda:N, where available",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        default=list(DATASETS),
        metavar="NAME",
        help=f"data sets, from: {' '.join(DATASETS)}",
    )
    cli.add_data_dir(parser)
    parser.add_argument(
        "--subset",
        metavar="N",
        type=cli.positive_int,
        default=None,
        help="samples per data set, a fixed random subset (at most the data set; default: "
        "all; with --quick 200 per UCI set and 1000 MNIST images)",
    )
    parser.add_argument(
        "--epochs",
        metavar="N",
        type=cli.nonnegative_int,
        default=None,
        help="training epochs of every model, 0: untrained (default: 40 for the MLPs, 10 "
        "for LeNet-5; 5 for LeNet-5 with --quick)",
    )
    parser.add_argument(
        "--runtime-repeats",
        metavar="N",
        type=cli.nonnegative_int,
        default=3,
        help="timed repeats of each pass for the runtime table (median); 0: no runtime",
    )
    parser.add_argument(
        "--fisher",
        choices=("mc", "exact"),
        default="mc",
        help="mc: one label sampled per input (the paper's Fisher); exact: the exact GGN "
        "(diagnostic, MLP data sets only)",
    )
    parser.add_argument(
        "--with-bias",
        action="store_true",
        help="analyse [W, b] of the MLP layers as one block, like the paper's Ŵ "
        "(diagnostic, MLP data sets only)",
    )
    parser.add_argument(
        "--activation",
        choices=("relu", "tanh", "sigmoid"),
        default="relu",
        help="hidden activation of the MLPs (the paper does not state it; diagnostic)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=cli.positive_int,
        default=1,
        help="torch CPU threads (the work is many small operations, and several threads "
        "on a busy machine slow them down by an order of magnitude)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (exit status 2 and argparse's message if bad).

    Besides each flag's own type and choices: no data set twice in ``--datasets``;
    ``--fisher exact`` and ``--with-bias`` only without ``mnist`` (they are diagnostics
    of the MLPs); a non-default ``--activation`` not with ``mnist`` alone (LeNet-5 has
    no such option, the flag would do nothing).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.reject_duplicates(parser, "--datasets", args.datasets)
    mlp_only = " ".join(MLP_DATASETS)
    if "mnist" in args.datasets:
        for flag, used in (("--fisher", args.fisher == "exact"), ("--with-bias", args.with_bias)):
            if used:
                parser.error(
                    f"argument {flag}: a diagnostic for the MLP data sets, not allowed with "
                    f"mnist in --datasets (choose from: {mlp_only})"
                )
    if args.activation != "relu" and set(args.datasets) == {"mnist"}:
        parser.error(
            "argument --activation: applies to the MLP data sets only, not to --datasets "
            f"mnist (LeNet-5 uses ReLU; add one of: {mlp_only})"
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the experiment; write results.json, runtime.json, figures and the tables."""
    cli.quiet_library_warnings()
    args = parse_args(argv)
    config = build_config(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: RunConfig) -> dict:
    """Run the configured experiment and write its outputs."""
    from plots import plot_dataset

    config.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_seed: list[dict] = []
    runtime: list[dict] = []
    meta: dict = {}
    samples: dict[str, int] = {}
    for name in config.datasets:
        records, timed, data = run_dataset(name, config, meta)
        per_seed += records
        runtime += timed
        samples[name] = len(data)
    results = summarize(per_seed)
    (config.out / "results.json").write_text(json.dumps(results, indent=1))
    (config.out / "runtime.json").write_text(json.dumps(runtime, indent=1))
    (config.out / "per_seed.json").write_text(json.dumps(per_seed))
    figures = [
        str(plot_dataset(results, name, samples[name], config.out, meta[name]["layers"]))
        for name in config.datasets
    ]
    checks = check_acceptance(results)
    table = markdown_tables(results, runtime, samples)
    wall = time.perf_counter() - started
    text = table + "\n## Checks\n\n" + "\n".join(f"- {c}" for c in checks) + "\n"
    text += f"\nWall time: {wall:.0f} s ({'quick' if config.quick else 'full'} run).\n"
    (config.out / "table.md").write_text(text)
    run_meta = {
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("out", "train")},
            "train": {k: asdict(v) for k, v in config.train.items()},
            "out": str(config.out),
        },
        "datasets": meta,
        "wall_s": wall,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "checks": checks,
    }
    (config.out / "meta.json").write_text(json.dumps(run_meta, indent=1, default=str))
    print(text)
    return {"results": results, "runtime": runtime, "figures": figures, "checks": checks}


if __name__ == "__main__":
    main()
