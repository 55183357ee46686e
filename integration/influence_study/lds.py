"""Scores of every method and the linear datamodeling score (LDS) of one repeat.

One repeat of one problem (:func:`run_repeat`):

1. train the full model on the training set (the problem's recipe, the repeat's seed);
2. the per-sample gradients once: every training input's loss gradient and every test
   input's measurement gradient (:meth:`kfoc_backpack.Influence.gradients`);
3. per method, its curvature on the full model and training set, and its scores
   ``τ[i, j] = g_testᵀ (B + λ)⁻¹ g_train`` at each damping (``λ = damping ×`` each
   block's mean eigenvalue, the same rule for every method): identity, K-FAC, K-FOC,
   EK-FAC, EK-FOC (this package's Laplace classes, exact GGN), the exact dense GGN where
   the model has at most :data:`GGN_LIMIT` parameters (the UCI MLPs), and kronfluence
   1.0.1's own EK-FAC where it is installed (its defaults: sampled-label Fisher, biases
   folded into the weights' blocks, its heuristic damping; only at damping 0.1, the
   heuristic's value);
4. ``M`` random halves of the training set, each trained with ``seeds`` initialisations
   by the same recipe (:func:`~influence_study.ensembles.train_ensemble`), each test
   input's measurement averaged over the seeds;
5. per method, the predicted measurement of subset ``S`` is ``−Σ_{j∈S} τ[i, j]`` (a
   gradient step on input ``j`` changes the measurement by ``−η τ[i, j]`` to first
   order), and the LDS is the Spearman correlation over the ``M`` subsets between
   predicted and measured, averaged over the test inputs.

Index conventions: ``M`` subsets, ``T`` test inputs, ``N`` training inputs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from influence_study.ensembles import measurement, train_ensemble
from influence_study.problems import Problem
from kfoc_backpack import Influence, Preconditioner
from kfoc_backpack.influence import exact_curvature

STRUCTURES = ("kfac", "kfoc", "ekfac", "ekfoc")
METHODS = ("identity", *STRUCTURES, "ggn", "kronfluence_ekfac")
LABELS = {
    "identity": "identity",
    "kfac": "K-FAC",
    "kfoc": "K-FOC",
    "ekfac": "EK-FAC",
    "ekfoc": "EK-FOC",
    "ggn": "exact GGN",
    "kronfluence_ekfac": "kronfluence EK-FAC",
}
DEFAULT_DAMPING = 0.1
GGN_LIMIT = 4096
"""Most parameters the study gives the exact dense GGN (its ``eigh`` in float64 takes
minutes beyond; the library's own limit is
:data:`~kfoc_backpack.influence.preconditioner.DENSE_LIMIT`)."""


def ranks(values: Tensor) -> Tensor:
    """Ranks along dimension 0 (ties broken by order; the measurements are continuous)."""
    order = values.argsort(dim=0)
    result = torch.empty_like(values)
    positions = torch.arange(len(values), dtype=values.dtype).unsqueeze(1).expand_as(values)
    result.scatter_(0, order, positions)
    return result


def spearman(predicted: Tensor, measured: Tensor) -> Tensor:
    """``[T]``: Spearman's correlation over dimension 0 (``[M, T]`` each)."""
    a, b = ranks(predicted), ranks(measured)
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp(min=1e-30)


def lds(scores: Tensor, masks: Tensor, measured: Tensor) -> float:
    """Return the LDS of ``[T, N]`` scores on ``[M, N]`` subsets with ``[M, T]`` measurements."""
    predicted = -(masks.to(scores.dtype) @ scores.T)
    return float(spearman(predicted, measured.to(scores.dtype)).mean())


def lossfunc(task: str) -> nn.Module:
    """Return the training loss, summed (each input's own loss is differentiated)."""
    if task == "regression":
        return nn.MSELoss(reduction="sum")
    return nn.CrossEntropyLoss(reduction="sum")


def train_full(problem: Problem, seed: int) -> nn.Module:
    """Return the full model: the recipe on the whole training set, initialisation ``seed``."""
    X, y = problem.train
    masks = torch.ones(1, len(X))
    ensemble = train_ensemble(
        problem.make, X, y, problem.task, problem.recipe, masks, [seed], seed + 1
    )
    return ensemble.model(0, problem.make).eval()


def kronfluence_ekfac(
    model: nn.Module,
    task_name: str,
    measure: Callable[[Tensor, Tensor], Tensor],
    train: TensorDataset,
    test: TensorDataset,
    batch: int,
) -> tuple[Tensor, float, float]:
    """Kronfluence 1.0.1's EK-FAC with its defaults: scores, factor and score seconds.

    Its default curvature (one label drawn from the model per input), its heuristic
    damping, its files in a temporary directory; the factor seconds include wrapping the
    model (``prepare_model``).

    Args:
        model: The trained model (copied).
        task_name: ``"regression"`` or ``"classification"``: the training loss, summed.
        measure: ``measure(output, y) -> [N]``, the test measurement.
        train: Training inputs and targets.
        test: Test inputs and targets.
        batch: Batch size of every pass.

    Raises:
        ImportError: Where kronfluence is not installed.
    """
    import tempfile

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class StudyTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            X, y = batch
            output = model(X)
            if sample:
                with torch.no_grad():
                    if task_name == "regression":
                        y = output + torch.randn_like(output)
                    else:
                        y = torch.multinomial(torch.softmax(output, -1), 1).squeeze(-1)
            return lossfunc(task_name)(output, y)

        def compute_measurement(self, batch, model):
            X, y = batch
            return measure(model(X), y).sum()

    task = StudyTask()
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        tracked = prepare_model(copy.deepcopy(model), task)
        analyzer = Analyzer("lds", tracked, task, cpu=True, disable_tqdm=True, output_dir=directory)
        analyzer.fit_all_factors(
            "ekfac",
            train,
            per_device_batch_size=batch,
            factor_args=FactorArguments(strategy="ekfac"),
        )
        middle = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=batch,
            per_device_train_batch_size=batch,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        return scores, middle - start, time.perf_counter() - middle


def kronfluence_scores(problem: Problem, model: nn.Module, batch: int) -> Tensor | None:
    """Return kronfluence 1.0.1's EK-FAC scores (its defaults), or ``None`` without it."""
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return None

    def measure(output: Tensor, y: Tensor) -> Tensor:
        return measurement(problem.task, output, y)

    train, test = TensorDataset(*problem.train), TensorDataset(*problem.test)
    return kronfluence_ekfac(model, problem.task, measure, train, test, batch)[0]


def method_scores(
    problem: Problem,
    model: nn.Module,
    methods: Sequence[str],
    dampings: Sequence[float],
    batch: int,
) -> tuple[dict[tuple[str, float], Tensor], dict[str, float]]:
    """Per (method, damping) its ``[T, N]`` scores, and per method its seconds."""
    from laplace import Laplace

    loss = lossfunc(problem.task)
    train_loader = DataLoader(TensorDataset(*problem.train), batch_size=batch)
    test_loader = DataLoader(TensorDataset(*problem.test), batch_size=batch)
    probe = Influence(model, loss, Preconditioner.identity(model))
    start = time.perf_counter()
    test_measure = "loss" if problem.task == "regression" else "margin"
    test = probe.gradients(test_loader, test_measure)
    train = probe.gradients(train_loader)
    seconds = {"gradients": time.perf_counter() - start}
    scores: dict[tuple[str, float], Tensor] = {}
    size = sum(p.numel() for p in model.parameters())
    for method in methods:
        start = time.perf_counter()
        if method == "identity":
            value = Preconditioner.identity(model).scores(test, train)
            for damping in dampings:
                scores[method, damping] = value
        elif method in STRUCTURES:
            la = Laplace(model, problem.task, subset_of_weights="all", hessian_structure=method)
            la.fit(train_loader)
            for damping in dampings:
                pre = Preconditioner.from_laplace(la, damping)
                scores[method, damping] = pre.scores(test, train)
        elif method == "ggn":
            if size > GGN_LIMIT:
                continue
            names, sizes, matrix = exact_curvature(model, loss, train_loader)
            for damping in dampings:
                pre = Preconditioner.dense(names, sizes, matrix, damping)
                scores[method, damping] = pre.scores(test, train)
        elif method == "kronfluence_ekfac":
            value = kronfluence_scores(problem, model, batch)
            if value is None:
                continue
            scores[method, DEFAULT_DAMPING] = value.to(torch.float32)
        seconds[method] = time.perf_counter() - start
    return scores, seconds


def subset_measurements(
    problem: Problem, num_subsets: int, seeds: int, repeat_seed: int, chunk: int
) -> tuple[Tensor, Tensor]:
    """``[M, N]`` random halves and ``[M, T]`` their models' measurements, seed-averaged."""
    X, y = problem.train
    generator = torch.Generator().manual_seed(repeat_seed)
    masks = torch.zeros(num_subsets, len(X))
    for m in range(num_subsets):
        masks[m, torch.randperm(len(X), generator=generator)[: len(X) // 2]] = 1
    jobs = [(m, s) for m in range(num_subsets) for s in range(seeds)]
    measured = torch.zeros(num_subsets, len(problem.test[0]))
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        init = [repeat_seed * 100_003 + 7919 * m + s for m, s in part]
        ensemble = train_ensemble(
            problem.make,
            X,
            y,
            problem.task,
            problem.recipe,
            masks[[m for m, _ in part]],
            init,
            repeat_seed + start,
        )
        with torch.no_grad():
            values = measurement(problem.task, ensemble(problem.test[0]), problem.test[1])
        for (m, _), value in zip(part, values):
            measured[m] += value / seeds
    return masks, measured


def run_repeat(
    problem: Problem,
    repeat: int,
    methods: Sequence[str],
    dampings: Sequence[float],
    num_subsets: int,
    seeds: int,
    chunk: int,
    batch: int = 256,
) -> list[dict]:
    """Return the records ``{problem, repeat, method, damping, lds, seconds}`` of one repeat."""
    model = train_full(problem, 1000 + repeat)
    scores, seconds = method_scores(problem, model, methods, dampings, batch)
    start = time.perf_counter()
    masks, measured = subset_measurements(problem, num_subsets, seeds, 2000 + repeat, chunk)
    training = time.perf_counter() - start
    records = []
    for (method, damping), value in scores.items():
        records.append(
            {
                "problem": problem.name,
                "repeat": repeat,
                "method": method,
                "damping": damping,
                "lds": lds(value, masks, measured),
                "seconds": seconds[method],
                "gradients_seconds": seconds["gradients"],
                "subset_training_seconds": training,
            }
        )
    return records
