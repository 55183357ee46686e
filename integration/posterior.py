"""Does K-FOC give a better Laplace posterior than K-FAC? Measured on the paper's models.

For every data set and seed: split the data (random 90/10 train/test, and 10 % of the
training part held out for validation), train the paper's model to its MAP estimate
once (MLP-50 on the UCI sets, LeNet-5 on the MNIST subset; ``integration/models.py``),
and put every Laplace posterior on that same MAP model:

* ``map`` — no posterior (the MAP predictive; its records have ``prior_fit`` and
  ``curvature`` ``"none"`` and ``null`` marginal likelihood and fit time);
* ``diag`` — laplace-torch ``diag`` with ``BackPackGGN`` (the exact GGN diagonal; the
  default backend forms every per-sample Jacobian for it, minutes per LeNet-5 fit);
* ``kron`` — laplace-torch ``kron`` with its default backend (curvlinops' K-FAC);
* ``kron_backpack`` — ``kron`` with ``BackPackGGN`` (BackPACK's K-FLR / K-FAC);
* ``kfoc_approx``, ``kfoc_running``, ``kfoc_optimal`` — ``hessian_structure="kfoc"``
  with that ``aggregation``;
* ``full`` — laplace-torch ``full`` (exact GGN), where it fits in memory (the MLPs;
  on LeNet-5 it is skipped, and the reason is written to ``meta.json`` and the table).

Training is ``integration/models.py``'s (Adam, no weight decay, as in the paper's
reproduction; ``--weight-decay`` is a diagnostic).

The Kronecker methods run with the exact GGN (``curvature="ggn"``) and with the
Monte-Carlo Fisher (``"mc"``: ``backend_kwargs={"stochastic": True}``, one sampled
label per input); ``map``/``diag``/``full`` are ``"ggn"`` only. Every method sees the
same training batches (the training batch size, in data order), and ``torch``'s seed
is reset before each fit.

Protocol, identical for every method: a scalar prior precision fitted (a) by the
marginal likelihood, ``optimize_prior_precision(method="marglik")`` (laplace-torch's
defaults: 100 Adam steps from 1), and (b) by grid search on the validation split
(41 values ``10^-4 … 10^4``, the one with the lowest validation NLL of the predictive
below; a value whose posterior cannot be factorised counts as infinitely bad, as in
laplace-torch's own grid search). The predictive is the linearised ``glm`` one, probit
for classification; regression's observation noise ``σ`` is the MAP model's training
RMSE (the maximum likelihood ``σ`` at the MAP weights), the same for every method and
both prior fits, and the predictive is ``N(f(x), Jf Σ Jfᵀ + σ²)``. Regression targets
are standardised (``integration/data.py``), so NLL and RMSE are in standardised units.

The ``glm`` predictive's variance ``diag(J P⁻¹ Jᵀ)`` is computed here from each
posterior's public factors (``posterior_precision``'s eigendecomposition for the
Kronecker methods, ``posterior_variance`` for ``diag``, ``posterior_covariance`` for
``full``) and per-layer Jacobian factors (a ``Linear`` weight's Jacobian is an outer
product), because laplace-torch's own call forms the dense ``[N, C, P]`` Jacobians and
projects each one through the posterior: on LeNet-5 that costs about 15 s per 100
images on this machine, for every method, test set and grid value. The result is the
same predictive: ``--check-predictive`` compares it, on seed 0, with laplace-torch's
``la(x, pred_type="glm", link_approx="probit")`` for every method and fails if they
differ.

Metrics per seed: test NLL, RMSE (regression) or accuracy, expected calibration error
(15 equal-width confidence bins) and Brier score (classification), the log marginal
likelihood at the chosen prior precision, and the fit time (``la.fit``). MNIST is also
evaluated on its test images rotated by 0°, 15°, …, 180° (the Laplace Redux shift
benchmark; bilinear rotation about the centre, background kept).

Outputs in ``--out``: ``results.json`` (one record per data set × method × curvature ×
prior fit × seed, plus records with ``"angle"`` for rotated MNIST), ``summary.json``
(mean ± standard error over seeds), ``paired.json`` (K-FOC against K-FAC per seed:
wins, mean difference and its standard error), ``table.md``, ``meta.json`` and
``figure_posterior_*.png``.

Usage::

    python integration/posterior.py                      # full run (10 seeds)
    python integration/posterior.py --quick --out DIR    # minutes: 3 seeds, subsets
    python integration/posterior.py --datasets boston --methods kron kfoc_running
    python integration/posterior.py --replot DIR/results.json --out DIR   # table, figures
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import kfoc_backpack  # noqa: E402, F401 - registers hessian_structure="kfoc"
from integration import cli  # noqa: E402
from integration.data import DATASETS, TASKS, Dataset, load_dataset  # noqa: E402
from integration.models import TrainConfig, evaluate, make_loss, make_model, train  # noqa: E402

METHODS = (
    "map",
    "diag",
    "kron",
    "kron_backpack",
    "kfoc_approx",
    "kfoc_running",
    "kfoc_optimal",
    "full",
)
KRON_METHODS = ("kron", "kron_backpack", "kfoc_approx", "kfoc_running", "kfoc_optimal")
KFOC_METHODS = ("kfoc_approx", "kfoc_running", "kfoc_optimal")
REFERENCE = "kron"
"""K-FAC in the paired comparison: laplace-torch's ``kron`` with its default backend."""

CURVATURES = ("ggn", "mc")
PRIOR_FITS = ("marglik", "gridsearch")
ANGLES = tuple(range(0, 181, 15))
GRID = tuple(10.0**e for e in torch.linspace(-4, 4, 41).tolist())
"""Prior precisions of the grid search (41 values, 0.2 decades apart)."""

ECE_BINS = 15
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
    "full": "full",
}
NAMES = {
    "boston": "Boston Housing",
    "concrete": "Concrete",
    "energy": "Energy (heating load)",
    "mnist": "MNIST subset",
    "mnist-rotated": "rotated MNIST (mean over angles)",
}
LOWER_IS_BETTER = {
    "nll": True,
    "rmse": True,
    "ece": True,
    "brier": True,
    "accuracy": False,
    "log_marglik": False,
}
PREDICTIVE_TOL = {"classification": 1e-4, "regression": 1e-3}
"""Largest difference to laplace-torch's predictive that ``--check-predictive`` accepts:
absolute on class probabilities, relative on regression variances."""


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def classification_nll(log_probs: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood ``-mean_n log p_n[y_n]`` of ``[N, C]`` log-probabilities."""
    return float(-log_probs.double().gather(1, targets.view(-1, 1)).mean())


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of inputs whose most probable class is the label (ties: lowest index)."""
    return float((probs.argmax(1) == targets).double().mean())


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Multi-class Brier score ``mean_n Σ_c (p_nc − 1[y_n = c])²`` (0 best, 2 worst)."""
    onehot = F.one_hot(targets, probs.shape[1]).double()
    return float((probs.double() - onehot).square().sum(1).mean())


def expected_calibration_error(probs: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """Return the expected calibration error with ``bins`` equal-width confidence bins.

    The confidence of an input is its largest class probability; bin ``b`` holds the
    confidences in ``(b/bins, (b+1)/bins]`` (a confidence of 0 goes to the first bin).
    ``ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|`` over non-empty bins.
    """
    confidence, predicted = probs.double().max(1)
    correct = (predicted == targets).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((acc_sum - conf_sum).abs().sum() / len(targets))


def classification_metrics(log_probs: Tensor, targets: Tensor) -> dict[str, float]:
    """NLL, accuracy, ECE and Brier score of ``[N, C]`` predictive log-probabilities."""
    probs = log_probs.double().exp()
    return {
        "nll": classification_nll(log_probs, targets),
        "accuracy": accuracy(probs, targets),
        "ece": expected_calibration_error(probs, targets),
        "brier": brier_score(probs, targets),
    }


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> float:
    """Mean Gaussian NLL ``½ log(2π v) + (y − μ)² / (2 v)`` (all tensors ``[N]``)."""
    mean, var, targets = mean.double(), var.double(), targets.double()
    return float(
        (0.5 * torch.log(2 * math.pi * var) + (targets - mean).square() / (2 * var)).mean()
    )


def rmse(mean: Tensor, targets: Tensor) -> float:
    """Root mean squared error."""
    return float((mean.double() - targets.double()).square().mean().sqrt())


def regression_metrics(mean: Tensor, var: Tensor, targets: Tensor) -> dict[str, float]:
    """Gaussian NLL and RMSE of a predictive ``N(mean, var)`` (``[N]`` each)."""
    return {"nll": gaussian_nll(mean, var, targets), "rmse": rmse(mean, targets)}


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
# Jacobian factors and the glm predictive
# --------------------------------------------------------------------------------------


@dataclass
class OuterBlock:
    """Jacobian of a ``Linear`` weight: ``J[n, c] = g[n, c] ⊗ a[n]`` (row-major ``vec``).

    Attributes:
        g: ``[N, C, out]`` gradients of output ``c`` w.r.t. the layer's output.
        a: ``[N, in]`` the layer's inputs.
    """

    g: Tensor
    a: Tensor

    @property
    def numel(self) -> int:
        """Number of parameters of the block."""
        return self.g.shape[-1] * self.a.shape[-1]

    def dense(self) -> Tensor:
        """``[N, C, out·in]`` dense Jacobian."""
        return torch.einsum("nco,ni->ncoi", self.g, self.a).flatten(2)


@dataclass
class DenseBlock:
    """Jacobian of a parameter as a dense ``[N, C, p]`` tensor (biases, convolutions)."""

    J: Tensor

    @property
    def numel(self) -> int:
        """Number of parameters of the block."""
        return self.J.shape[-1]

    def dense(self) -> Tensor:
        """``[N, C, p]`` dense Jacobian."""
        return self.J


Block = OuterBlock | DenseBlock


@dataclass
class Features:
    """What the glm predictive needs of one evaluation set: outputs and Jacobians.

    Attributes:
        f_mu: ``[N, C]`` outputs of the MAP model.
        blocks: Jacobian blocks, one per trainable parameter in ``model.parameters()``
            order (laplace-torch's block order).
    """

    f_mu: Tensor
    blocks: list[Block]

    def __len__(self) -> int:
        return self.f_mu.shape[0]


def _cat_blocks(parts: list[list[Block]]) -> list[Block]:
    blocks = []
    for column in zip(*parts):
        if isinstance(column[0], OuterBlock):
            blocks.append(
                OuterBlock(torch.cat([b.g for b in column]), torch.cat([b.a for b in column]))
            )
        else:
            blocks.append(DenseBlock(torch.cat([b.J for b in column])))
    return blocks


def jacobian_features(model: nn.Module, inputs: Tensor, chunk: int = 250) -> Features:
    """Return the outputs and per-parameter Jacobian factors of ``model`` on ``inputs``.

    One forward pass and one backward pass per output (per chunk of ``chunk`` inputs);
    forward hooks record each layer's input and output. ``Linear`` weights keep the
    outer-product form, ``Conv2d`` weights and all biases are dense.

    Raises:
        NotImplementedError: For a trainable module other than ``Linear`` (2-d input) or
            ``Conv2d`` (``groups=1``, zero padding given as integers).
    """
    layers = [
        m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    order = [p for m in layers for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    for module in layers:
        ok = isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
        if not ok or not module.weight.requires_grad:
            raise NotImplementedError(f"jacobian_features: unsupported layer {module!r}")
    if [id(p) for p in order] != [id(p) for p in params]:
        raise NotImplementedError("jacobian_features: parameters not in layer order")
    parts: list[list[Block]] = []
    outputs: list[Tensor] = []
    for start in range(0, len(inputs), chunk):
        x = inputs[start : start + chunk]
        seen: list[tuple[Tensor, Tensor]] = []
        hooks = [
            m.register_forward_hook(
                lambda _m, args, out, seen=seen: seen.append((args[0].detach(), out))
            )
            for m in layers
        ]
        try:
            with torch.enable_grad():
                f = model(x)
                grads = [
                    torch.autograd.grad(
                        f[:, c].sum(), [o for _, o in seen], retain_graph=c < f.shape[1] - 1
                    )
                    for c in range(f.shape[1])
                ]
        finally:
            for hook in hooks:
                hook.remove()
        blocks: list[Block] = []
        for i, (module, (a, _)) in enumerate(zip(layers, seen)):
            g = torch.stack([grad[i] for grad in grads], 1)  # [N, C, out, ...]
            if isinstance(module, nn.Linear):
                if a.ndim != 2:
                    raise NotImplementedError("jacobian_features: Linear with >2-d input")
                blocks.append(OuterBlock(g, a))
                if module.bias is not None:
                    blocks.append(DenseBlock(g))
            else:
                unfolded = F.unfold(
                    a, module.kernel_size, module.dilation, module.padding, module.stride
                )  # [N, in·kh·kw, T]
                g = g.flatten(3)  # [N, C, out, T]
                blocks.append(DenseBlock(torch.einsum("ncot,ndt->ncod", g, unfolded).flatten(2)))
                if module.bias is not None:
                    blocks.append(DenseBlock(g.sum(-1)))
        parts.append(blocks)
        outputs.append(f.detach())
    return Features(torch.cat(outputs), _cat_blocks(parts))


class FunctionalVariance:
    """``diag(J P⁻¹ Jᵀ)`` (``[N, C]``) of a fitted Laplace posterior on one evaluation set.

    Read at the posterior's *current* prior precision on every call, so that a grid
    search only sets ``la.prior_precision`` and calls again. For the Kronecker methods
    the projections of the Jacobians on the eigenvectors are computed once (they do
    not depend on the prior precision or on ``σ``); the formula is laplace-torch's
    ``KronDecomposed.inv_square_form`` restricted to the diagonal.

    Args:
        la: A fitted ``KronLaplace`` (also ``KFOCLaplace``), ``DiagLaplace`` or
            ``FullLaplace`` over all weights.
        features: :func:`jacobian_features` of the evaluation inputs.
    """

    def __init__(self, la, features: Features):
        from laplace import DiagLaplace, FullLaplace, KronLaplace

        self.la, self.features = la, features
        self._projected: list[tuple[str, Tensor, Tensor | None]] | None = None
        if isinstance(la, KronLaplace):
            self.kind = "kron"
            self._project(la.posterior_precision)
        elif isinstance(la, DiagLaplace):
            self.kind = "diag"
        elif isinstance(la, FullLaplace):
            self.kind = "full"
            self._dense = torch.cat([b.dense() for b in features.blocks], 2)
        else:
            raise TypeError(f"FunctionalVariance: unsupported Laplace class {type(la).__name__}")

    def _project(self, precision) -> None:
        """Squared projections of each Jacobian block on the eigenvectors."""
        if len(precision.eigenvectors) != len(self.features.blocks):
            raise ValueError(
                f"posterior has {len(precision.eigenvectors)} blocks, the Jacobians "
                f"{len(self.features.blocks)}"
            )
        projected = []
        for Qs, block in zip(precision.eigenvectors, self.features.blocks):
            if len(Qs) == 2:
                Q1, Q2 = Qs
                if Q1.shape[0] * Q2.shape[0] != block.numel:
                    raise ValueError("posterior block and Jacobian block differ in size")
                if isinstance(block, OuterBlock):
                    u = (block.g @ Q1).square()  # [N, C, out]
                    v = (block.a @ Q2).square()  # [N, in]
                    projected.append(("outer", u, v))
                else:  # Q1ᵀ J Q2 as two large products, kept as [N, C, in, out]
                    N, C, _ = block.J.shape
                    out, inp = Q1.shape[0], Q2.shape[0]
                    JQ2 = (block.J.reshape(N * C * out, inp) @ Q2).reshape(N * C, out, inp)
                    Z = JQ2.transpose(1, 2).reshape(N * C * inp, out) @ Q1
                    projected.append(("dense2", Z.reshape(N, C, inp, out).square(), None))
            elif len(Qs) == 1:
                (Q,) = Qs
                if Q.shape[0] != block.numel:
                    raise ValueError("posterior block and Jacobian block differ in size")
                projected.append(("dense1", (block.dense() @ Q).square(), None))
            else:
                raise ValueError(f"Kronecker block with {len(Qs)} factors")
        self._projected = projected

    def __call__(self) -> Tensor:
        """``[N, C]`` functional variances at the current prior precision."""
        if self.kind == "kron":
            return self._kron(self.la.posterior_precision)
        if self.kind == "diag":
            return self._diag(self.la.posterior_variance)
        cov = self.la.posterior_covariance
        return torch.einsum("ncp,pq,ncq->nc", self._dense, cov, self._dense)

    def _kron(self, precision) -> Tensor:
        damping = getattr(precision, "damping", False)
        total = torch.zeros_like(self.features.f_mu)
        for (kind, u, v), ls, delta in zip(
            self._projected, precision.eigenvalues, precision.deltas
        ):
            if len(ls) == 2:
                l1, l2 = ls
                if damping:
                    inv = 1 / torch.outer(l1 + delta.sqrt(), l2 + delta.sqrt())
                else:
                    inv = 1 / (torch.outer(l1, l2) + delta)
                if kind == "outer":
                    total += (u * (v @ inv.T).unsqueeze(1)).sum(-1)
                else:
                    total += (u * inv.T).sum((-2, -1))
            else:
                total += u @ (1 / (ls[0] + delta))
        return total

    def _diag(self, variance: Tensor) -> Tensor:
        total = torch.zeros_like(self.features.f_mu)
        start = 0
        for block in self.features.blocks:
            v = variance[start : start + block.numel]
            start += block.numel
            if isinstance(block, OuterBlock):
                V = v.reshape(block.g.shape[-1], block.a.shape[-1])
                total += (block.g.square() * (block.a.square() @ V.T).unsqueeze(1)).sum(-1)
            else:
                total += block.J.square() @ v
        return total


def predictive(
    task: str, f_mu: Tensor, f_var: Tensor | None, sigma: float | None = None
) -> tuple[Tensor, Tensor | None]:
    """Return the glm predictive from outputs and functional variances.

    Classification: ``log softmax(κ f)`` with the probit factor
    ``κ = 1 / sqrt(1 + π/8 · f_var)`` (laplace-torch's ``link_approx="probit"``),
    returned as ``(log_probs, None)``. Regression: ``(mean, variance)`` with variance
    ``f_var + σ²``. ``f_var = None`` is the MAP predictive (no posterior).
    """
    f_mu = f_mu.double()
    if task == "classification":
        if f_var is None:
            return torch.log_softmax(f_mu, 1), None
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.double())
        return torch.log_softmax(kappa * f_mu, 1), None
    var = (
        torch.full_like(f_mu[:, 0], sigma**2) if f_var is None else f_var[:, 0].double() + sigma**2
    )
    return f_mu[:, 0], var


def metrics(task: str, prediction: tuple[Tensor, Tensor | None], targets: Tensor) -> dict:
    """Metrics of a :func:`predictive` on the targets."""
    if task == "classification":
        return classification_metrics(prediction[0], targets)
    return regression_metrics(prediction[0], prediction[1], targets.view(-1))


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


def check_against_laplace(la, model: nn.Module, task: str, inputs: Tensor, sigma) -> float:
    """Largest difference of our glm predictive to laplace-torch's on ``inputs``.

    Classification: absolute difference of the probit class probabilities. Regression:
    relative difference of the functional variances.
    """
    features = jacobian_features(model, inputs)
    ours = FunctionalVariance(la, features)()
    f_mu = features.f_mu
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "classification":
            theirs = la(inputs, pred_type="glm", link_approx="probit")
            mine = predictive(task, f_mu, ours)[0].exp()
            return float((mine - theirs.double()).abs().max())
        _, f_var = la(inputs, pred_type="glm")
    f_var = f_var.reshape(len(inputs), -1)[:, :1].double()
    return float(((ours.double() - f_var).abs() / f_var.abs().clamp_min(1e-30)).max())


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
# Summaries
# --------------------------------------------------------------------------------------


def metric_names(task: str) -> list[str]:
    """Metrics of a task, in table order."""
    if task == "classification":
        return ["nll", "accuracy", "ece", "brier", "log_marglik", "fit_seconds"]
    return ["nll", "rmse", "log_marglik", "fit_seconds"]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def _key(record: dict) -> tuple:
    return (
        record["dataset"],
        record["method"],
        record["curvature"],
        record["prior_fit"],
        record.get("angle"),
    )


def summarize(records: list[dict]) -> list[dict]:
    """Mean ± standard error over seeds per data set, method, curvature, prior fit, angle."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[_key(record)].append(record)
    out = []
    for key, group in groups.items():
        dataset, method, curvature, prior_fit, angle = key
        row = {
            "dataset": dataset,
            "method": method,
            "curvature": curvature,
            "prior_fit": prior_fit,
            "seeds": len(group),
        }
        if angle is not None:
            row["angle"] = angle
        for name in metric_names(TASKS[dataset]) + ["prior_precision"]:
            values = [r[name] for r in group if r.get(name) is not None]
            if values:
                row[f"{name}_mean"], row[f"{name}_se"] = mean_se(values)
        out.append(row)
    return out


def rotated_means(records: list[dict]) -> list[dict]:
    """Return per seed the mean of each metric over the rotation angles.

    The records' ``dataset`` is ``"<dataset>-rotated"``.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("angle") is not None:
            key = (record["dataset"], record["method"], record["curvature"], record["prior_fit"])
            groups[key + (record["seed"],)].append(record)
    out = []
    for (dataset, method, curvature, prior_fit, seed), group in groups.items():
        row = {
            "dataset": f"{dataset}-rotated",
            "method": method,
            "curvature": curvature,
            "prior_fit": prior_fit,
            "seed": seed,
        }
        for name in ("nll", "accuracy", "ece", "brier"):
            row[name] = statistics.fmean(r[name] for r in group)
        out.append(row)
    return out


def paired_comparison(records: list[dict], reference: str = REFERENCE) -> list[dict]:
    """K-FOC against K-FAC (``reference``) per seed, same data set/curvature/prior fit.

    For each metric: seeds where K-FOC is better, equal (difference below 1e-12) or
    worse, the mean difference ``K-FOC − K-FAC`` with its standard error, and the
    seed-to-seed standard deviation of the reference's metric (the spread the
    difference is to be read against). Rotated MNIST enters as ``mnist-rotated``, the
    per-seed mean over the angles.
    """
    base = [r for r in records if r.get("angle") is None] + rotated_means(records)
    table: dict[tuple, dict] = {}
    for r in base:
        table[(r["dataset"], r["method"], r["curvature"], r["prior_fit"], r["seed"])] = r
    out = []
    combos = sorted({(r["dataset"], r["curvature"], r["prior_fit"]) for r in base})
    for dataset, curvature, prior_fit in combos:
        for method in KFOC_METHODS:
            for name, lower in LOWER_IS_BETTER.items():
                pairs = []
                for seed in sorted({r["seed"] for r in base if r["dataset"] == dataset}):
                    ours = table.get((dataset, method, curvature, prior_fit, seed))
                    ref = table.get((dataset, reference, curvature, prior_fit, seed))
                    if ours is None or ref is None:
                        continue
                    if ours.get(name) is None or ref.get(name) is None:
                        continue
                    pairs.append((ours[name], ref[name]))
                if not pairs:
                    continue
                diffs = [a - b for a, b in pairs]
                sign = -1 if lower else 1
                wins = sum(sign * d > 1e-12 for d in diffs)
                losses = sum(sign * d < -1e-12 for d in diffs)
                mean, se = mean_se(diffs)
                refs = [b for _, b in pairs]
                out.append(
                    {
                        "dataset": dataset,
                        "curvature": curvature,
                        "prior_fit": prior_fit,
                        "method": method,
                        "reference": reference,
                        "metric": name,
                        "seeds": len(pairs),
                        "wins": wins,
                        "ties": len(pairs) - wins - losses,
                        "losses": losses,
                        "mean_diff": mean,
                        "se_diff": se,
                        "reference_sd": statistics.stdev(refs) if len(refs) > 1 else 0.0,
                    }
                )
    return out


def paired_by_angle(records: list[dict], reference: str = REFERENCE) -> list[dict]:
    """K-FOC − K-FAC per rotation angle: mean paired difference of NLL and ECE ± SE."""
    table = {
        (r["method"], r["curvature"], r["prior_fit"], r["angle"], r["seed"]): r
        for r in records
        if r.get("angle") is not None
    }
    out = []
    for method, curvature, prior_fit, angle in sorted({k[:4] for k in table}):
        if method not in KFOC_METHODS:
            continue
        for name in ("nll", "ece"):
            diffs = [
                table[(method, curvature, prior_fit, angle, seed)][name]
                - table[(reference, curvature, prior_fit, angle, seed)][name]
                for (m, c, f, a, seed) in table
                if (m, c, f, a) == (method, curvature, prior_fit, angle)
                and (reference, curvature, prior_fit, angle, seed) in table
            ]
            if diffs:
                mean, se = mean_se(diffs)
                out.append(
                    {
                        "method": method,
                        "curvature": curvature,
                        "prior_fit": prior_fit,
                        "angle": angle,
                        "metric": name,
                        "mean_diff": mean,
                        "se_diff": se,
                        "seeds": len(diffs),
                    }
                )
    return out


def _fmt(row: dict, name: str) -> str:
    if f"{name}_mean" not in row:
        return "—"
    mean, se = row[f"{name}_mean"], row[f"{name}_se"]
    if name == "log_marglik":
        return f"{mean:.1f} ± {se:.1f}"
    if name == "fit_seconds":
        return f"{mean:.2f} ± {se:.2f}"
    if name == "accuracy":
        return f"{100 * mean:.2f} ± {100 * se:.2f}"
    return f"{mean:.3f} ± {se:.3f}"


HEADERS = {
    "nll": "test NLL",
    "rmse": "RMSE",
    "accuracy": "accuracy (%)",
    "ece": "ECE",
    "brier": "Brier",
    "log_marglik": "log marglik",
    "fit_seconds": "fit (s)",
}


def _row_order(row: dict) -> tuple:
    return (
        (("none",) + PRIOR_FITS).index(row["prior_fit"]),
        METHODS.index(row["method"]),
        (("none",) + CURVATURES).index(row["curvature"]),
    )


def markdown_tables(
    summary: list[dict], paired: list[dict], skipped: list[dict], seeds: int
) -> str:
    """Format the results as markdown: per data set, rotated MNIST, paired comparison."""
    lines = [
        f"## Test metrics (mean ± standard error over {seeds} seed(s))",
        "",
        "Regression: NLL and RMSE in standardised target units. log marglik: the log "
        "marginal likelihood at the chosen prior precision (a sum over the training set). "
        "fit: `la.fit` wall time.",
        "",
    ]
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    for dataset in datasets:
        names = metric_names(TASKS[dataset])
        rows = sorted(
            (r for r in summary if r["dataset"] == dataset and "angle" not in r), key=_row_order
        )
        lines += [
            f"### {NAMES.get(dataset, dataset)}",
            "",
            "| prior fit | method | curvature | " + " | ".join(HEADERS[n] for n in names) + " |",
            "|---|---|---|" + "---|" * len(names),
        ]
        for row in rows:
            cells = [_fmt(row, n) for n in names]
            lines.append(
                f"| {row['prior_fit']} | {LABELS[row['method']]} | {row['curvature']} | "
                + " | ".join(cells)
                + " |"
            )
        for skip in skipped:
            if skip["dataset"] == dataset:
                lines.append(
                    f"| — | {LABELS[skip['method']]} | {skip['curvature']} | skipped: "
                    f"{skip['reason']} |" + " |" * (len(names) - 1)
                )
        lines.append("")
    rotated = [r for r in summary if "angle" in r]
    if rotated:
        angles = sorted({r["angle"] for r in rotated})
        shown = [a for a in angles if a in (0, 45, 90, 135, 180)] or angles
        for name in ("nll", "ece"):
            lines += [
                f"### Rotated MNIST: {HEADERS[name]} against the angle",
                "",
                "| prior fit | method | curvature | "
                + " | ".join(f"{a}°" for a in shown)
                + " | mean over all angles |",
                "|---|---|---|" + "---|" * (len(shown) + 1),
            ]
            keys = sorted(
                {(r["prior_fit"], r["method"], r["curvature"]) for r in rotated},
                key=lambda k: _row_order({"prior_fit": k[0], "method": k[1], "curvature": k[2]}),
            )
            for prior_fit, method, curvature in keys:
                cells = []
                by_angle = {
                    r["angle"]: r
                    for r in rotated
                    if (r["prior_fit"], r["method"], r["curvature"])
                    == (prior_fit, method, curvature)
                }
                for angle in shown:
                    cells.append(_fmt(by_angle[angle], name) if angle in by_angle else "—")
                overall = statistics.fmean(by_angle[a][f"{name}_mean"] for a in by_angle)
                cells.append(f"{overall:.3f}")
                lines.append(
                    f"| {prior_fit} | {LABELS[method]} | {curvature} | " + " | ".join(cells) + " |"
                )
            lines.append("")
    if paired:
        lines += paired_table(paired)
    return "\n".join(lines)


PAIRED_COLUMNS = (
    ("nll", "Δ test NLL", 1, 4),
    ("ece", "Δ ECE", 1, 4),
    ("accuracy", "Δ accuracy (%)", 100, 2),
    ("log_marglik", "Δ log marglik", 1, 1),
)


def paired_table(paired: list[dict]) -> list[str]:
    """Format the paired comparison as markdown lines.

    One row per data set, prior fit, curvature and K-FOC variant; a cell is
    ``mean ± SE (W/T/L)``.

    RMSE is left out: the glm predictive's mean is the MAP output for every method,
    so RMSE differences are exactly 0.
    """
    lines = [
        f"## K-FOC against K-FAC ({LABELS[REFERENCE]}), paired per seed",
        "",
        "Difference K-FOC − K-FAC on the same seed (same split, MAP model and prior-fit "
        "protocol): mean ± standard error over seeds, then (W/T/L) the seeds where K-FOC is "
        "better / equal / worse (NLL, ECE: lower is better; accuracy, log marglik: higher). "
        "K-FAC SD: the seed-to-seed standard deviation of K-FAC's test NLL, the spread to "
        "read the NLL difference against. `mnist-rotated`: per seed, the mean over the 13 "
        "rotation angles. RMSE is not listed: the glm predictive mean is the MAP output for "
        "every method, so its difference is exactly 0.",
        "",
        "| data set | prior fit | curvature | method | "
        + " | ".join(header for _, header, _, _ in PAIRED_COLUMNS)
        + " | K-FAC NLL SD |",
        "|---|---|---|---|" + "---|" * (len(PAIRED_COLUMNS) + 1),
    ]
    index = {(p["dataset"], p["prior_fit"], p["curvature"], p["method"], p["metric"]): p
             for p in paired}  # fmt: skip
    keys = list(dict.fromkeys(k[:4] for k in index))
    for dataset, prior_fit, curvature, method in keys:
        cells = []
        for metric, _, scale, digits in PAIRED_COLUMNS:
            p = index.get((dataset, prior_fit, curvature, method, metric))
            if p is None:
                cells.append("—")
                continue
            cells.append(
                f"{scale * p['mean_diff']:+.{digits}f} ± {scale * p['se_diff']:.{digits}f} "
                f"({p['wins']}/{p['ties']}/{p['losses']})"
            )
        nll = index.get((dataset, prior_fit, curvature, method, "nll"))
        sd = f"{nll['reference_sd']:.4f}" if nll else "—"
        lines.append(
            f"| {dataset} | {prior_fit} | {curvature} | {LABELS[method]} | "
            + " | ".join(cells)
            + f" | {sd} |"
        )
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------

STYLE = {
    "map": ("tab:gray", "o"),
    "diag": ("tab:orange", "s"),
    "kron": ("tab:green", "^"),
    "kron_backpack": ("tab:olive", "v"),
    "kfoc_approx": ("tab:blue", "o"),
    "kfoc_running": ("tab:red", "D"),
    "kfoc_optimal": ("tab:purple", "x"),
    "full": ("black", "*"),
}


def plot_rotation(summary: list[dict], paired_angles: list[dict], out: Path) -> Path | None:
    """Rotated MNIST against the angle; rows: prior fits; GGN solid, MC dashed.

    Columns: test NLL and ECE of every method (mean over seeds, band ± standard error),
    then the paired differences K-FOC − K-FAC of NLL and ECE (mean ± standard error).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if "angle" in r]
    if not rows:
        return None
    prior_fits = [p for p in PRIOR_FITS if any(r["prior_fit"] == p for r in rows)]
    fig, axes = plt.subplots(
        len(prior_fits), 4, figsize=(19, 3.7 * len(prior_fits) + 1.0), squeeze=False, sharex=True
    )
    seeds = max(r["seeds"] for r in rows)
    for i, prior_fit in enumerate(prior_fits):
        for j, name in enumerate(("nll", "ece")):
            ax = axes[i][j]
            for method in METHODS:
                for curvature in ("none",) + CURVATURES:
                    pts = sorted(
                        (
                            r
                            for r in rows
                            if r["method"] == method
                            and r["curvature"] == curvature
                            and r["prior_fit"] in (prior_fit, "none")
                        ),
                        key=lambda r: r["angle"],
                    )
                    if pts:
                        _angle_line(ax, pts, name, method, curvature, band=False)
            ax.set_title(f"prior by {prior_fit}: test {HEADERS[name].removeprefix('test ')}")
            ax.set_ylabel(HEADERS[name])
        for j, name in enumerate(("nll", "ece"), start=2):
            ax = axes[i][j]
            for method in KFOC_METHODS:
                for curvature in CURVATURES:
                    pts = sorted(
                        (
                            p
                            for p in paired_angles
                            if (p["method"], p["curvature"], p["prior_fit"], p["metric"])
                            == (method, curvature, prior_fit, name)
                        ),
                        key=lambda p: p["angle"],
                    )
                    if pts:
                        _angle_line(ax, pts, "diff", method, curvature)
            ax.axhline(0, color="black", linewidth=0.8)
            short = HEADERS[name].removeprefix("test ")
            ax.set_title(f"prior by {prior_fit}: {short} of K-FOC − K-FAC (paired)")
            ax.set_ylabel(f"{short} difference (< 0: K-FOC better)")
        for ax in axes[i]:
            ax.set_xticks(list(ANGLES)[::2])
            ax.grid(alpha=0.3)
            if i == len(prior_fits) - 1:
                ax.set_xlabel("rotation angle (degrees)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle(
        f"LeNet-5 on rotated MNIST test images: mean over {seeds} seed(s) (differences: band "
        "± standard error of the paired difference; the tables give every standard error); "
        "solid: exact GGN, dashed: MC Fisher; K-FAC = laplace-torch kron (default backend)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path = out / "figure_posterior_rotation.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _angle_line(
    ax, pts: list[dict], name: str, method: str, curvature: str, band: bool = True
) -> None:
    """Draw one method's line against the angle (with a ± standard-error band)."""
    colour, marker = STYLE[method]
    x = [r["angle"] for r in pts]
    if name == "diff":
        y = [r["mean_diff"] for r in pts]
        se = [r["se_diff"] for r in pts]
    else:
        y = [r[f"{name}_mean"] for r in pts]
        se = [r[f"{name}_se"] for r in pts]
    label = LABELS[method] + ("" if curvature in ("none", "ggn") else " (MC)")
    ax.plot(
        x,
        y,
        color=colour,
        marker=marker,
        markersize=4,
        linestyle="--" if curvature == "mc" else "-",
        linewidth=1.2,
        label=label,
    )
    if band:
        low = [a - b for a, b in zip(y, se)]
        high = [a + b for a, b in zip(y, se)]
        ax.fill_between(x, low, high, color=colour, alpha=0.1, linewidth=0)


def plot_datasets(summary: list[dict], out: Path) -> Path | None:
    """Test NLL per method on every data set (rows: prior fits), mean ± standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if "angle" not in r]
    if not rows:
        return None
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    prior_fits = [p for p in PRIOR_FITS if any(r["prior_fit"] == p for r in rows)] or ["none"]
    fig, axes = plt.subplots(
        len(prior_fits),
        len(datasets),
        figsize=(3.6 * len(datasets) + 1.5, 3.4 * len(prior_fits) + 0.6),
        squeeze=False,
    )
    seeds = max(r["seeds"] for r in rows)
    for i, prior_fit in enumerate(prior_fits):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            pts = sorted(
                (
                    r
                    for r in rows
                    if r["dataset"] == dataset and r["prior_fit"] in (prior_fit, "none")
                ),
                key=lambda r: (METHODS.index(r["method"]), r["curvature"]),
            )
            labels = []
            for k, r in enumerate(pts):
                colour, marker = STYLE[r["method"]]
                ax.errorbar(
                    r["nll_mean"],
                    k,
                    xerr=r["nll_se"],
                    color=colour,
                    marker=marker,
                    markerfacecolor="white" if r["curvature"] == "mc" else colour,
                    capsize=2,
                )
                labels.append(MethodSpec(r["method"], r["curvature"]).label)
            ax.set_yticks(range(len(pts)))
            ax.set_yticklabels(labels if j == 0 else [""] * len(pts), fontsize=8)
            ax.invert_yaxis()
            ax.grid(alpha=0.3, axis="x")
            ax.set_title(f"{NAMES.get(dataset, dataset)}, prior: {prior_fit}", fontsize=9)
            ax.set_xlabel("test NLL (lower is better)", fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"Test NLL, mean ± standard error over {seeds} seed(s) (regression: standardised "
        "targets; open markers: MC Fisher)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = out / "figure_posterior_datasets.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_paired(paired: list[dict], out: Path) -> Path | None:
    """Plot K-FOC − K-FAC test-NLL differences per data set, relative to the spread.

    Each point is the mean paired difference divided by K-FAC's seed-to-seed standard
    deviation (error bar: the standard error, divided alike); the text beside it is
    the number of seeds K-FOC wins / ties / loses.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p for p in paired if p["metric"] == "nll"]
    if not rows:
        return None
    datasets = list(dict.fromkeys(p["dataset"] for p in rows))
    keys = [
        (prior_fit, curvature, method)
        for prior_fit in PRIOR_FITS
        for curvature in CURVATURES
        for method in KFOC_METHODS
        if any((p["prior_fit"], p["curvature"], p["method"]) == (prior_fit, curvature, method)
               for p in rows)
    ]  # fmt: skip
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(2.6 * len(datasets) + 2.6, 0.32 * len(keys) + 1.8),
        squeeze=False, sharey=True,
    )  # fmt: skip
    for j, dataset in enumerate(datasets):
        ax = axes[0][j]
        for k, (prior_fit, curvature, method) in enumerate(keys):
            match = [
                p
                for p in rows
                if (p["dataset"], p["prior_fit"], p["curvature"], p["method"])
                == (dataset, prior_fit, curvature, method)
            ]
            if not match:
                continue
            p = match[0]
            sd = p["reference_sd"] if p["reference_sd"] > 0 else 1.0
            colour, marker = STYLE[method]
            ax.errorbar(
                p["mean_diff"] / sd, k, xerr=p["se_diff"] / sd, color=colour, marker=marker,
                markerfacecolor="white" if curvature == "mc" else colour, capsize=2,
            )  # fmt: skip
            ax.annotate(
                f"{p['wins']}/{p['ties']}/{p['losses']}", (1.0, k), xycoords=("axes fraction",
                "data"), xytext=(3, 0), textcoords="offset points", fontsize=6, va="center",
            )  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([f"{LABELS[m]}, {c}, {f}" for f, c, m in keys], fontsize=7)
        ax.set_ylim(len(keys) - 0.5, -0.5)
        ax.grid(alpha=0.3, axis="x")
        ax.set_title(NAMES.get(dataset, dataset), fontsize=9)
        ax.set_xlabel("ΔNLL / SD of K-FAC's NLL", fontsize=8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        "Paired test-NLL difference K-FOC − K-FAC (kron), in units of K-FAC's seed-to-seed "
        "SD: mean ± SE over seeds (< 0: K-FOC better); text: seeds won/tied/lost",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93), w_pad=2.5)
    path = out / "figure_posterior_paired.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (nothing runs; :func:`parse_args` adds the checks)."""
    parser = argparse.ArgumentParser(
        prog="posterior.py",
        description=__doc__.split("\n\n")[0]
        + "\n\nK-FOC and K-FAC Laplace posteriors (and MAP, diag, full) on the same MAP "
        "models:\ntest NLL, RMSE/accuracy, ECE, Brier, log marginal likelihood, rotated "
        "MNIST.",
        epilog="Usage examples:\n" + __doc__.split("Usage::\n\n")[1].rstrip(),
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=cli.directory,
        default="results/posterior",
        metavar="DIR",
        help="output directory",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of minutes: 3 seeds, 1000 MNIST images, 3 LeNet-5 epochs; --seeds, "
        "--subset and --epochs given explicitly take precedence",
    )
    parser.add_argument(
        "--seeds",
        metavar="N",
        type=cli.positive_int,
        default=None,
        help="number of seeds, 0 … N−1 (default: 10; 3 with --quick)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        default=list(DATASETS),
        metavar="NAME",
        help=f"data sets, from: {' '.join(DATASETS)}",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="NAME",
        help=f"methods, from: {' '.join(METHODS)} (the paired comparison needs kron and a "
        "kfoc_* method)",
    )
    parser.add_argument(
        "--curvatures",
        nargs="+",
        choices=CURVATURES,
        default=list(CURVATURES),
        metavar="NAME",
        help="curvature of the Kronecker methods: ggn (exact GGN), mc (Monte-Carlo "
        "Fisher); diag and full run with ggn only",
    )
    parser.add_argument(
        "--prior-fits",
        nargs="+",
        choices=PRIOR_FITS,
        default=list(PRIOR_FITS),
        metavar="NAME",
        help="prior-precision fits: marglik (marginal likelihood), gridsearch (validation NLL)",
    )
    cli.add_data_dir(parser)
    parser.add_argument(
        "--subset",
        metavar="N",
        type=cli.int_at_least(30),
        default=None,
        help="samples per data set before the split, a fixed random subset (default: all; "
        "with --quick 1000 MNIST images)",
    )
    parser.add_argument(
        "--epochs",
        metavar="N",
        type=cli.nonnegative_int,
        default=None,
        help="training epochs of every model, 0: untrained (default: 40 for the MLPs, 10 "
        "for LeNet-5; 3 for LeNet-5 with --quick)",
    )
    parser.add_argument(
        "--check-predictive",
        metavar="N",
        type=cli.nonnegative_int,
        default=8,
        help="compare the glm predictive with laplace-torch's own on N test inputs of "
        "seed 0, for every method (fails if they differ); 0: no check",
    )
    parser.add_argument(
        "--weight-decay",
        metavar="WD",
        type=cli.nonnegative_float,
        default=0.0,
        help="Adam weight decay of the MAP training (diagnostic; 0: integration/models.py's "
        "training, as in the paper's reproduction)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=cli.positive_int,
        default=1,
        help="torch CPU threads (the Jacobians and fits are many small operations; on a "
        "busy 2-core machine 2 threads made them 6-13× slower than 1)",
    )
    parser.add_argument(
        "--replot",
        metavar="RESULTS",
        type=cli.existing_file,
        default=None,
        help="redraw table.md and the figures of an earlier run's results.json into --out "
        "(its meta.json is read when it lies beside), without running anything (default: "
        "none, run the comparison)",
    )
    return parser


RUN_FLAGS = [
    "--quick",
    "--seeds",
    "--datasets",
    "--methods",
    "--curvatures",
    "--prior-fits",
    "--data-dir",
    "--subset",
    "--epochs",
    "--check-predictive",
    "--weight-decay",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (exit status 2 and argparse's message if bad).

    Besides each flag's own type and choices: no value twice in a multi-valued flag;
    ``--replot`` only with ``--out`` and ``--threads`` (it runs nothing).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, values in (
        ("--datasets", args.datasets),
        ("--methods", args.methods),
        ("--curvatures", args.curvatures),
        ("--prior-fits", args.prior_fits),
    ):
        cli.reject_duplicates(parser, flag, values)
    cli.reject_together(parser, argv, "--replot", RUN_FLAGS, "--replot runs nothing")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the comparison (or redraw one); write results, summaries, table and figures."""
    cli.quiet_library_warnings()
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.replot is not None:
            records = json.loads(Path(args.replot).read_text())
            meta_path = Path(args.replot).with_name("meta.json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            return write_outputs(records, Path(args.out), meta, replot=True)
        return _run(build_config(args))
    finally:
        torch.set_num_threads(threads)


def _run(config: RunConfig) -> dict:
    """Run the configured comparison and write its outputs."""
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
    return write_outputs(records, config.out, meta)


def _rounded(record: dict) -> dict:
    """Return the record with its floats rounded to 7 significant digits."""
    return {
        k: float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v
        for k, v in record.items()
    }


def grid_edge_notes(records: list[dict]) -> list[str]:
    """One line per data set and grid end: how many grid searches stopped there."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    for r in records:
        if r["prior_fit"] != "gridsearch" or r.get("angle") is not None:
            continue
        totals[r["dataset"]] += 1
        if r["prior_precision"] >= GRID[-1] * (1 - 1e-6):
            counts[(r["dataset"], "upper end 10^4 (practically the MAP predictive)")] += 1
        elif r["prior_precision"] <= GRID[0] * (1 + 1e-6):
            counts[(r["dataset"], "lower end 10^-4")] += 1
    return [
        f"grid search on {dataset}: the {end} in {count} of {totals[dataset]} "
        "(method, curvature, seed) fits"
        for (dataset, end), count in counts.items()
    ]


def write_outputs(records: list[dict], out: Path, meta: dict, replot: bool = False) -> dict:
    """Write results.json, summary.json, paired.json, table.md, meta.json and figures.

    The records are rounded to 7 significant digits first (so that a ``--replot`` of the
    written file reproduces the table exactly) and written one per line. With
    ``replot=True`` only ``table.md`` and the figures are written.
    """
    out.mkdir(parents=True, exist_ok=True)
    records = [_rounded(r) for r in records]
    summary = summarize(records)
    paired = paired_comparison(records)
    seeds = len({r["seed"] for r in records})
    skipped = meta.get("skipped", [])
    table = markdown_tables(summary, paired, skipped, seeds)
    notes = []
    if meta.get("predictive_check"):
        worst = max(meta["predictive_check"].values())
        notes.append(
            f"glm predictive checked against laplace-torch's on seed 0 for "
            f"{len(meta['predictive_check'])} method(s): largest difference {worst:.1e}"
        )
    notes += grid_edge_notes(records)
    for key, messages in meta.get("warnings", {}).items():
        for message, count in messages.items():
            notes.append(f"{key}: {count}× {message}")
    if "wall_s" in meta:
        kind = "quick" if meta.get("quick") else "full"
        notes.append(f"wall time {meta['wall_s']:.0f} s ({kind} run, {meta.get('machine')})")
    if notes:
        table += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if not replot:
        lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in records)
        (out / "results.json").write_text(f"[\n{lines}\n]\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "paired.json").write_text(json.dumps(paired, indent=1))
        (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    (out / "table.md").write_text(table)
    figures = [
        str(path)
        for path in (
            plot_datasets(summary, out),
            plot_rotation(summary, paired_by_angle(records), out),
            plot_paired(paired, out),
        )
        if path is not None
    ]
    print(table)
    return {
        "records": records,
        "summary": summary,
        "paired": paired,
        "figures": figures,
        "table": table,
    }


if __name__ == "__main__":
    main()
