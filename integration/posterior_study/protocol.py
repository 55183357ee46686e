"""The protocol of the posterior comparison: methods, configuration, data, fits, the run.

What ``integration/posterior.py``'s docstring describes, as code: the method names
(:data:`METHODS`) and the laplace-torch posterior of each (:class:`MethodSpec`,
:func:`make_laplace`), the run's settings (:class:`RunConfig`, made from the command line
by :func:`build_config`), the seeded train/validation/test splits and the rotated MNIST
test images, one seed's MAP model and evaluation features (:func:`prepare_seed`), the
prior-precision fits (:func:`fit_prior`: marginal likelihood or validation grid
search), one method on one seed (:func:`run_method`) and the loop over data sets, seeds
and methods (:func:`run`). The display names of methods, data sets and metrics
(:data:`LABELS`, :data:`NAMES`, :data:`HEADERS`) are here too, for the report and the
figures.

A record is a flat ``dict`` per data set × method × curvature × prior fit × seed (and
``"angle"`` for rotated MNIST): the test metrics of
:func:`integration.posterior_study.metrics.metrics`, ``log_marglik``, ``fit_seconds``,
``prior_precision`` and ``prior_seconds``. Images are ``[N, C, H, W]``; split indices are
sorted int64 ``[n]`` tensors into a data set's first dimension.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from data import DATASETS, Dataset, load_dataset
from models import TrainConfig, evaluate, make_loss, make_model, train
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import kfoc_backpack  # noqa: F401 - registers hessian_structure="kfoc"
from posterior_study.metrics import metrics
from posterior_study.predictive import (
    PREDICTIVE_TOL,
    Features,
    FunctionalVariance,
    check_against_laplace,
    jacobian_features,
    predictive,
)

METHODS = (
    "map",
    "diag",
    "kron",
    "kron_backpack",
    "kfoc_approx",
    "kfoc_running",
    "kfoc_optimal",
    "ekfoc",
    "ekfac",
    "full",
)
KFOC_METHODS = ("kfoc_approx", "kfoc_running", "kfoc_optimal")
CORRECTED_METHODS = ("ekfoc", "ekfac")
"""Eigenvalue-corrected posteriors: ``hessian_structure="ekfoc"`` (K-FOC's basis,
``"running"`` aggregation) and ``"ekfac"`` (K-FAC's basis)."""
KRON_METHODS = ("kron", "kron_backpack", *KFOC_METHODS, *CORRECTED_METHODS)
REFERENCE = "kron"
"""K-FAC in the paired comparison: laplace-torch's ``kron`` with its default backend."""
AGAINST_REFERENCE = (*KFOC_METHODS, *CORRECTED_METHODS)
"""The methods paired against :data:`REFERENCE` (table, figures, rotated MNIST)."""
COMPARISONS = (
    *((method, REFERENCE) for method in AGAINST_REFERENCE),
    ("ekfoc", "kfoc_running"),
    ("ekfoc", "ekfac"),
    ("ekfoc", "full"),
    ("ekfac", "full"),
    ("kfoc_running", "full"),
    (REFERENCE, "full"),
)
"""``(method, reference)`` pairs of the paired comparison (``full``: where it runs)."""

CURVATURES = ("ggn", "mc")
PRIOR_FITS = ("marglik", "gridsearch")
ANGLES = tuple(range(0, 181, 15))
GRID = tuple(10.0**e for e in torch.linspace(-4, 4, 41).tolist())
"""Prior precisions of the grid search (41 values, 0.2 decades apart)."""

TEST_FRACTION = 0.1
VAL_FRACTION = 0.1
FULL_MAX_PARAMS = 5000
"""``full`` is skipped above this many parameters (LeNet-5 has 61,706: a 15 GB matrix)."""

LABELS = {
    "map": "MAP",
    "diag": "diag",
    "kron": "K-FAC (kron)",
    "kron_backpack": "K-FAC (kron, BackPackGGN)",
    "kfoc_approx": "K-FOC_approx",
    "kfoc_running": "K-FOC_running",
    "kfoc_optimal": "K-FOC_optimal",
    "ekfoc": "EK-FOC (ekfoc)",
    "ekfac": "EK-FAC (ekfac)",
    "full": "full",
}
NAMES = {
    "boston": "Boston Housing",
    "concrete": "Concrete",
    "energy": "Energy (heating load)",
    "mnist": "MNIST subset",
    "mnist-rotated": "rotated MNIST (mean over angles)",
}
HEADERS = {
    "nll": "test NLL",
    "rmse": "RMSE",
    "accuracy": "accuracy (%)",
    "ece": "ECE",
    "brier": "Brier",
    "log_marglik": "log marglik",
    "fit_seconds": "fit (s)",
}


# --------------------------------------------------------------------------------------
# Data: splits and rotations
# --------------------------------------------------------------------------------------


def split_indices(
    num: int,
    seed: int,
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random train/validation/test indices of ``num`` samples for a seed.

    ``round(test_fraction · num)`` samples are the test set; of the rest,
    ``round(val_fraction · rest)`` are the validation set (for the grid search) and the
    others the training set. Each part is sorted; the three are disjoint and cover all.
    """
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_test = max(1, round(test_fraction * num))
    num_val = max(1, round(val_fraction * (num - num_test)))
    test = order[:num_test].sort().values
    val = order[num_test : num_test + num_val].sort().values
    train_index = order[num_test + num_val :].sort().values
    return train_index, val, test


def take(data: Dataset, index: Tensor) -> Dataset:
    """Return the samples ``index`` of a data set."""
    return Dataset(data.name, data.inputs[index], data.targets[index], data.task)


def rotate_images(images: Tensor, angle: float, background: float) -> Tensor:
    """Rotate ``[N, C, H, W]`` images by ``angle`` degrees about their centre.

    Bilinear interpolation (``affine_grid``/``grid_sample``, no torchvision); pixels
    rotated in from outside the image take the value ``background`` (the standardised
    value of a black pixel). ``angle = 0`` returns the images unchanged. Positive angles
    turn the image counter-clockwise as displayed (row 0 at the top), as torchvision's
    ``rotate``: 90° is ``torch.rot90(images, 1, (2, 3))`` up to rounding.
    """
    if angle % 360 == 0:
        return images
    rad = math.radians(angle)
    cos, sin = math.cos(rad), math.sin(rad)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    shifted = images - background
    rotated = F.grid_sample(
        shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return rotated + background


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One posterior to fit: method name, curvature, and laplace-torch arguments."""

    method: str
    curvature: str

    @property
    def label(self) -> str:
        """``K-FOC_running (mc)``."""
        return f"{LABELS[self.method]} ({self.curvature})" if self.method != "map" else "MAP"


def method_specs(methods: Sequence[str], curvatures: Sequence[str]) -> list[MethodSpec]:
    """Return the (method, curvature) pairs of a run.

    Kronecker methods with each curvature, ``diag``/``full`` with the exact GGN, ``map``
    with none.
    """
    specs = []
    for method in methods:
        if method == "map":
            specs.append(MethodSpec("map", "none"))
        elif method in KRON_METHODS:
            specs += [MethodSpec(method, c) for c in curvatures]
        elif "ggn" in curvatures:
            specs.append(MethodSpec(method, "ggn"))
    return specs


def skip_reason(spec: MethodSpec, model: nn.Module) -> str | None:
    """Why a method is not run on a model (``None``: it is run)."""
    if spec.method == "full":
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if params > FULL_MAX_PARAMS:
            gb = 2 * 4 * params**2 / 1e9
            return (
                f"full GGN of {params:,} parameters: a {params:,}² float32 matrix and its "
                f"inverse factor need {gb:.0f} GB (limit here: {FULL_MAX_PARAMS:,} parameters)"
            )
    return None


def make_laplace(spec: MethodSpec, model: nn.Module, task: str, sigma: float):
    """Build the (unfitted) laplace-torch posterior of a method on a copy of ``model``."""
    from laplace import Laplace
    from laplace.curvature import BackPackGGN

    kwargs: dict = {"sigma_noise": sigma} if task == "regression" else {}
    stochastic = {"stochastic": spec.curvature == "mc"}
    model = copy.deepcopy(model)
    if spec.method == "diag":
        return Laplace(model, task, "all", "diag", backend=BackPackGGN, **kwargs)
    if spec.method == "full":
        return Laplace(model, task, "all", "full", **kwargs)
    if spec.method == "kron":
        return Laplace(model, task, "all", "kron", backend_kwargs=stochastic, **kwargs)
    if spec.method == "kron_backpack":
        return Laplace(
            model, task, "all", "kron", backend=BackPackGGN, backend_kwargs=stochastic, **kwargs
        )
    if spec.method in CORRECTED_METHODS:
        return Laplace(model, task, "all", spec.method, backend_kwargs=stochastic, **kwargs)
    aggregation = spec.method.removeprefix("kfoc_")
    return Laplace(
        model, task, "all", "kfoc", aggregation=aggregation, backend_kwargs=stochastic, **kwargs
    )


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
        methods: Methods to run (:data:`METHODS`).
        curvatures: Curvatures of the Kronecker methods (:data:`CURVATURES`).
        prior_fits: Prior-precision fits (:data:`PRIOR_FITS`).
        data_dir: Directory of the UCI files (``None``: env var or default).
        subset: Samples per data set before splitting (``None``: all).
        train: Training schedule per task (its batch size is also the fit batch size).
        check_predictive: Test inputs of seed 0 on which every method's predictive is
            compared with laplace-torch's own (0: no check).
        weight_decay: Adam's (coupled) weight decay in training; 0 is
            ``integration/models.py``'s training, as in the paper's reproduction.
        quick: Whether this is the ``--quick`` configuration.
        threads: torch CPU threads.
    """

    datasets: list[str]
    seeds: int
    out: Path
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    curvatures: list[str] = field(default_factory=lambda: list(CURVATURES))
    prior_fits: list[str] = field(default_factory=lambda: list(PRIOR_FITS))
    data_dir: str | None = None
    subset: dict[str, int | None] = field(default_factory=dict)
    train: dict[str, TrainConfig] = field(default_factory=dict)
    check_predictive: int = 8
    weight_decay: float = 0.0
    quick: bool = False
    threads: int = 1


QUICK_SUBSET = {"boston": None, "concrete": None, "energy": None, "mnist": 1000}


def build_config(args: argparse.Namespace) -> RunConfig:
    """Turn the command line (checked by :func:`parse_args`) into a :class:`RunConfig`.

    ``--quick`` changes the defaults (3 seeds, 1000 MNIST images, 3 LeNet-5 epochs);
    ``--seeds``, ``--subset`` and ``--epochs`` given explicitly take precedence.
    """
    quick = args.quick
    subset: dict[str, int | None] = dict(QUICK_SUBSET) if quick else dict.fromkeys(DATASETS)
    if args.subset is not None:
        subset = dict.fromkeys(DATASETS, args.subset)
    train_cfg = {
        "regression": TrainConfig(epochs=40, batch_size=32, lr=1e-3),
        "classification": TrainConfig(epochs=3 if quick else 10, batch_size=64, lr=1e-3),
    }
    if args.epochs is not None:
        train_cfg = {k: TrainConfig(args.epochs, v.batch_size, v.lr) for k, v in train_cfg.items()}
    return RunConfig(
        datasets=list(args.datasets),
        seeds=args.seeds if args.seeds is not None else (3 if quick else 10),
        out=Path(args.out),
        methods=list(args.methods),
        curvatures=list(args.curvatures),
        prior_fits=list(args.prior_fits),
        data_dir=None if args.data_dir is None else str(args.data_dir),
        subset=subset,
        train=train_cfg,
        check_predictive=args.check_predictive,
        weight_decay=args.weight_decay,
        quick=quick,
        threads=args.threads,
    )


# --------------------------------------------------------------------------------------
# One seed
# --------------------------------------------------------------------------------------


@dataclass
class SeedData:
    """A seed's split, MAP model and evaluation features."""

    train: Dataset
    val: Dataset
    test: Dataset
    model: nn.Module
    sigma: float | None
    eval_sets: dict[str, tuple[Features, Tensor]]
    """``"val"``, ``"test"`` and ``"rot<angle>"`` → (features, targets)."""
    info: dict


def train_map(
    model: nn.Module, data: Dataset, config: TrainConfig, seed: int, weight_decay: float = 0.0
) -> float:
    """Train ``model`` in place; return its training loss (the mean over ``data``).

    Without weight decay this is :func:`integration.models.train`; with it, the same
    schedule (Adam, seeded shuffling) with Adam's ``weight_decay``.
    """
    if weight_decay == 0:
        return train(model, data, config, seed)
    loss_fn = make_loss(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), config.batch_size):
            index = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss_fn(model(data.inputs[index]), data.targets[index]).backward()
            optimizer.step()
    return evaluate(model, data)


def prepare_seed(data: Dataset, seed: int, config: RunConfig) -> SeedData:
    """Split, train the MAP model, and compute the evaluation sets' Jacobian factors."""
    train_index, val_index, test_index = split_indices(len(data), seed)
    train_set, val_set, test_set = (take(data, i) for i in (train_index, val_index, test_index))
    torch.manual_seed(seed)
    model, _ = make_model(data)
    start = time.perf_counter()
    loss = train_map(model, train_set, config.train[data.task], seed, config.weight_decay)
    model.eval()
    info = {
        "seed": seed,
        "train_loss": loss,
        "train_s": time.perf_counter() - start,
        "sizes": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
    }
    sigma = None
    if data.task == "regression":
        sigma = math.sqrt(loss)  # MSE of the MAP model on its training data
        info["sigma_noise"] = sigma
    start = time.perf_counter()
    eval_sets = {
        "val": (jacobian_features(model, val_set.inputs), val_set.targets),
        "test": (jacobian_features(model, test_set.inputs), test_set.targets),
    }
    if data.task == "classification":
        background = float(data.inputs.min())
        for angle in ANGLES:
            if angle == 0:
                eval_sets["rot0"] = eval_sets["test"]
                continue
            images = rotate_images(test_set.inputs, angle, background)
            eval_sets[f"rot{angle}"] = (jacobian_features(model, images), test_set.targets)
    info["features_s"] = time.perf_counter() - start
    return SeedData(train_set, val_set, test_set, model, sigma, eval_sets, info)


def fit_prior(la, prior_fit: str, val_variance, seed_data: SeedData, task: str):
    """Set ``la``'s prior precision by ``prior_fit``; return (seconds, grid NLLs or None)."""
    start = time.perf_counter()
    curve = None
    if prior_fit == "marglik":
        la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
    else:
        features, targets = seed_data.eval_sets["val"]
        curve = []
        for value in GRID:
            la.prior_precision = value
            try:
                f_var = val_variance()
            except torch.linalg.LinAlgError:  # as laplace-torch's gridsearch: skip the value
                curve.append(math.inf)
                continue
            prediction = predictive(task, features.f_mu, f_var, seed_data.sigma)
            nll = metrics(task, prediction, targets)["nll"]
            curve.append(nll if math.isfinite(nll) else math.inf)
        best = min(range(len(GRID)), key=lambda i: (curve[i], i))
        la.prior_precision = GRID[best]
    return time.perf_counter() - start, curve


def run_method(
    spec: MethodSpec, seed_data: SeedData, data: Dataset, seed: int, config: RunConfig, meta: dict
) -> list[dict]:
    """Fit one method on one seed and evaluate it with every prior fit."""
    task = data.task
    base = {"dataset": data.name, "method": spec.method, "curvature": spec.curvature, "seed": seed}
    records = []
    if spec.method == "map":
        for name, (features, targets) in seed_data.eval_sets.items():
            if name == "val":
                continue
            record = dict(base, prior_fit="none")
            record.update(
                metrics(task, predictive(task, features.f_mu, None, seed_data.sigma), targets)
            )
            record.update(log_marglik=None, fit_seconds=None, prior_precision=None)
            _set_angle(record, name)
            records.append(record)
        return records
    batch = config.train[task].batch_size
    loader = DataLoader(
        TensorDataset(seed_data.train.inputs, seed_data.train.targets), batch_size=batch
    )
    la = make_laplace(spec, seed_data.model, task, seed_data.sigma)
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        la.fit(loader)
        fit_seconds = time.perf_counter() - start
    key = f"{data.name}/{spec.method}/{spec.curvature}"
    for warning in caught:
        if "Full backward hook is firing" in str(warning.message) or issubclass(
            warning.category, DeprecationWarning
        ):
            continue  # BackPACK's hooks; torch.jit.script deprecation inside laplace-torch
        bucket = meta["warnings"].setdefault(key, {})
        message = f"{warning.category.__name__}: {warning.message}"
        bucket[message] = bucket.get(message, 0) + 1
    meta["backends"][key] = type(la.backend).__name__
    variances = {name: FunctionalVariance(la, f) for name, (f, _) in seed_data.eval_sets.items()}
    if seed == 0 and config.check_predictive > 0:
        inputs = seed_data.test.inputs[: config.check_predictive]
        diff = check_against_laplace(la, seed_data.model, task, inputs, seed_data.sigma)
        meta["predictive_check"][key] = diff
        if not diff <= PREDICTIVE_TOL[task]:
            raise RuntimeError(
                f"{key}: the glm predictive differs from laplace-torch's by {diff:.2e} "
                f"(tolerance {PREDICTIVE_TOL[task]:.0e})"
            )
    for prior_fit in config.prior_fits:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="By default `link_approx`")
            prior_seconds, _ = fit_prior(la, prior_fit, variances["val"], seed_data, task)
        prior = float(la.prior_precision.reshape(-1)[0])
        with torch.no_grad():
            log_marglik = float(la.log_marginal_likelihood())
        for name, (features, targets) in seed_data.eval_sets.items():
            if name == "val":
                continue
            prediction = predictive(task, features.f_mu, variances[name](), seed_data.sigma)
            record = dict(base, prior_fit=prior_fit)
            record.update(metrics(task, prediction, targets))
            record.update(
                log_marglik=log_marglik,
                fit_seconds=fit_seconds,
                prior_precision=prior,
                prior_seconds=prior_seconds,
            )
            _set_angle(record, name)
            records.append(record)
    return records


def _set_angle(record: dict, name: str) -> None:
    if name.startswith("rot"):
        record["angle"] = int(name[3:])


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(config: RunConfig) -> tuple[list[dict], dict]:
    """Run the configured comparison; return its records and its ``meta.json`` content.

    Creates ``config.out``; :func:`integration.posterior_study.report.write_outputs`
    writes the outputs.
    """
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta: dict = {
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("out", "train")},
            "train": {k: asdict(v) for k, v in config.train.items()},
            "out": str(config.out),
            "grid": list(GRID),
            "angles": list(ANGLES),
        },
        "datasets": {},
        "skipped": [],
        "warnings": {},
        "backends": {},
        "predictive_check": {},
    }
    specs = method_specs(config.methods, config.curvatures)
    records: list[dict] = []
    outer = tqdm(total=len(config.datasets) * config.seeds, desc="posterior", unit="seed")
    for name in config.datasets:
        data = load_dataset(name, config.data_dir, config.subset.get(name))
        info: dict = {"samples": len(data), "seeds": []}
        for seed in range(config.seeds):
            outer.set_postfix_str(f"{name} seed {seed}: training")
            seed_data = prepare_seed(data, seed, config)
            seed_info = seed_data.info
            seed_info["methods_s"] = {}
            bar = tqdm(specs, desc=f"{name} seed {seed}", leave=False, unit="method")
            for spec in bar:
                bar.set_postfix_str(spec.label)
                reason = skip_reason(spec, seed_data.model)
                if reason is not None:
                    skip = {"dataset": name, "method": spec.method, "curvature": spec.curvature}
                    if seed == 0:
                        meta["skipped"].append(dict(skip, reason=reason))
                        tqdm.write(f"{name}: {spec.label} skipped: {reason}")
                    continue
                start = time.perf_counter()
                records += run_method(spec, seed_data, data, seed, config, meta)
                seed_info["methods_s"][f"{spec.method}/{spec.curvature}"] = (
                    time.perf_counter() - start
                )
            bar.close()
            info["seeds"].append(seed_info)
            outer.update(1)
            total = sum(seed_info["methods_s"].values())
            tqdm.write(
                f"{name} seed {seed}: train {seed_info['train_s']:.1f}s, "
                f"Jacobians {seed_info['features_s']:.1f}s, methods {total:.1f}s"
            )
        meta["datasets"][name] = info
    outer.close()
    meta["wall_s"] = time.perf_counter() - started
    meta["torch"] = torch.__version__
    meta["threads"] = torch.get_num_threads()
    meta["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    meta["quick"] = config.quick
    return records, meta
